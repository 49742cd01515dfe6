"""Pictures people would rather look at than numbers: boxes drawn on images."""

from __future__ import annotations

from collections.abc import Sequence

import PIL.Image
import PIL.ImageDraw

PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
)


def draw_boxes(
    image: PIL.Image.Image,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[str] | None = None,
    scores: Sequence[float] | None = None,
    scale: float = 1.0,
    width: int = 2,
) -> PIL.Image.Image:
    """Returns a copy of `image` (enlarged by `scale`) with `(x0, y0, x1, y1)` pixel boxes and captions."""
    canvas = image.convert("RGB")
    if scale != 1.0:
        canvas = canvas.resize(
            (round(canvas.width * scale), round(canvas.height * scale)), PIL.Image.NEAREST
        )
    draw = PIL.ImageDraw.Draw(canvas)
    for index, box in enumerate(boxes):
        colour = PALETTE[index % len(PALETTE)]
        x0, y0, x1, y1 = (value * scale for value in box)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        text = _caption(index, labels, scores)
        if text:
            left, top, right, bottom = draw.textbbox((x0, y0), text)
            draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=colour)
            draw.text((x0, y0), text, fill=(255, 255, 255))
    return canvas


def picture_grid(tiles: Sequence[PIL.Image.Image], columns: int) -> PIL.Image.Image:
    """Tiles (same size) laid out row by row, `columns` per row, on a white canvas."""
    width, height = tiles[0].size
    rows = (len(tiles) + columns - 1) // columns
    canvas = PIL.Image.new("RGB", (width * columns, height * rows), "white")
    for index, tile in enumerate(tiles):
        canvas.paste(tile, ((index % columns) * width, (index // columns) * height))
    return canvas


def _caption(index: int, labels: Sequence[str] | None, scores: Sequence[float] | None) -> str:
    parts = []
    if labels is not None:
        parts.append(str(labels[index]))
    if scores is not None:
        parts.append(f"{scores[index]:.2f}")
    return " ".join(parts)


def plot_learning_curves(
    log_history: Sequence[dict], path: str, keys: Sequence[str] | None = None
) -> str | None:
    """Plots the logged loss components against the step (Trainer `state.log_history`) to `path`.

    Returns the path, or None when nothing was logged. Needs matplotlib (the `eval`/`demo` extras).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = keys or ("loss", "cmc_loss", "tsa_loss", "fsa_loss", "unsil_loss", "eval_loss")
    series = {
        key: [(row["step"], row[key]) for row in log_history if key in row and "step" in row]
        for key in keys
    }
    series = {key: points for key, points in series.items() if points}
    if not series:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    for key, points in series.items():
        steps, values = zip(*points, strict=True)
        axis.plot(steps, values, label=key, marker="o" if len(points) < 3 else None)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


__all__ = ["PALETTE", "draw_boxes", "picture_grid", "plot_learning_curves"]
