"""Pixel rendering for the synthetic benchmark: shape masks, backgrounds and compositing.

Every shape is rasterised on a supersampled canvas and box-filtered down, so its anti-aliased
coverage (``alpha``) is exact and its bounding box can be read off the supersampled mask. The
box is therefore the rendered shape's true extent, on a grid of ``1 / supersample`` pixels,
and the pixels with non-zero coverage span exactly ``[floor(x), ceil(x + w))``. That holds for
turned and stretched shapes too (the ``"varied"`` appearance, see ``appearance.py``).

The backgrounds here are the ``"classic"`` appearance's; the varied ones live in
``appearance.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUNDS",
    "SHAPES",
    "ShapeMask",
    "composite",
    "rasterize_shape",
    "render_background",
]

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "hexagon",
    "diamond",
    "cross",
    "heart",
    "pentagon",
    "ring",
)
"""Shape names; these are the detection categories."""

BACKGROUNDS: tuple[str, ...] = ("plain", "noise", "stripes", "checker")
"""Background textures. All are low-saturation greys so every object colour stays visible."""

_RING_INNER_RATIO = 0.55
_STAR_INNER_RATIO = 0.42
_CROSS_HALF_WIDTH = 0.32
_HEART_POINTS = 96
_ELLIPSE_POINTS = 96  # a turned or stretched circle is drawn as a polygon; 96 sides look round

# Grey levels of the backgrounds. Object colours are saturated (or white), so they stay far
# from these in RGB even at the brightest texture tone plus noise.
_BACKGROUND_LEVEL = (60.0, 100.0)
_BACKGROUND_TINT = 6.0
_TEXTURE_CONTRAST = (18.0, 30.0)
_NOISE_STD = 10.0


@dataclass(frozen=True)
class ShapeMask:
    """Anti-aliased coverage of one rendered shape.

    Attributes:
        alpha: ``float32`` array ``(h, w)`` of coverage fractions in ``[0, 1]`` (multiples of
            ``1 / supersample**2``), placed with its top-left corner at pixel ``(left, top)``.
        left: Column of ``alpha[:, 0]`` in the image.
        top: Row of ``alpha[0, :]`` in the image.
        bbox: Tight box ``(x, y, w, h)`` of the supersampled shape in image pixels.
    """

    alpha: np.ndarray
    left: int
    top: int
    bbox: tuple[float, float, float, float]

    @property
    def area(self) -> float:
        """Covered area in pixels (sum of coverage)."""
        return float(self.alpha.sum(dtype=np.float64))


def _regular_polygon(sides: int, start_deg: float) -> list[tuple[float, float]]:
    start = math.radians(start_deg)
    return [
        (math.cos(start + 2 * math.pi * k / sides), math.sin(start + 2 * math.pi * k / sides))
        for k in range(sides)
    ]


def _star() -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = 1.0 if k % 2 == 0 else _STAR_INNER_RATIO
        angle = math.radians(-90 + 36 * k)
        points.append((radius * math.cos(angle), radius * math.sin(angle)))
    return points


def _cross() -> list[tuple[float, float]]:
    a = _CROSS_HALF_WIDTH
    return [
        (-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a),
        (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a),
    ]  # fmt: skip


def _heart() -> list[tuple[float, float]]:
    points = []
    for k in range(_HEART_POINTS):
        t = 2 * math.pi * k / _HEART_POINTS
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        points.append((x, -y))  # image rows grow downwards
    return points


_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": [(0, -1), (1, 1), (-1, 1)],
    "star": _star(),
    "hexagon": _regular_polygon(6, 0),
    "diamond": [(0, -1), (1, 0), (0, 1), (-1, 0)],
    "cross": _cross(),
    "heart": _heart(),
    "pentagon": _regular_polygon(5, -90),
}


def _fit_unit_box(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Scale uniformly so the longer side spans [0, 1], centred: shapes keep their proportions."""
    xs, ys = zip(*points, strict=True)
    span = max(max(xs) - min(xs), max(ys) - min(ys))
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    return [((x - cx) / span + 0.5, (y - cy) / span + 0.5) for x, y in points]


_UNIT_OUTLINES = {name: _fit_unit_box(points) for name, points in _OUTLINES.items()}
_ROUND_SHAPES = ("circle", "ring")
_CIRCLE_ANGLES = np.arange(_ELLIPSE_POINTS) * (2 * np.pi / _ELLIPSE_POINTS)
_UNIT_CIRCLE = np.stack([np.cos(_CIRCLE_ANGLES), np.sin(_CIRCLE_ANGLES)], axis=1)


def _posed_outlines(shape: str, turn: float, aspect: float) -> list[np.ndarray]:
    """Outline(s) of ``shape`` stretched to width/height ``aspect``, turned by ``turn`` degrees
    (clockwise on screen) and scaled so that the longer side spans exactly [0, 1].

    Stretching happens in the shape's own frame before the turn, so a square becomes a turned
    rectangle, never a parallelogram. A ring is two outlines: the disc and the hole to clear.
    """
    if shape in _ROUND_SHAPES:
        outer = _UNIT_CIRCLE
        outlines = [outer, _RING_INNER_RATIO * outer] if shape == "ring" else [outer]
    elif shape in _OUTLINES:
        outlines = [np.asarray(_OUTLINES[shape], dtype=np.float64)]
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    theta = math.radians(turn)
    stretch = np.array([math.sqrt(aspect), 1 / math.sqrt(aspect)])
    rotation = np.array([[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]])
    posed = [(points * stretch) @ rotation for points in outlines]
    low, high = posed[0].min(axis=0), posed[0].max(axis=0)
    span = (high - low).max()
    # (points - low) / span puts the longer side's extremes at exactly 0.0 and 1.0 (no rounding
    # drift), so the drawn extent is exactly the nominal side; the shorter side is centred.
    return [(points - low) / span + (1 - (high - low) / span) / 2 for points in posed]


def _draw_posed(
    draw: ImageDraw.ImageDraw,
    shape: str,
    origin: tuple[int, int],
    last: int,
    pose: tuple[float, float],
) -> None:
    for fill, points in zip((255, 0), _posed_outlines(shape, *pose), strict=False):
        # A flat [x0, y0, x1, ...] list: building it in numpy is far faster than per vertex.
        draw.polygon((points * last + np.asarray(origin)).ravel().tolist(), fill=fill)


def _draw_supersampled(
    shape: str,
    canvas: int,
    origin: tuple[int, int],
    extent: int,
    pose: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    """Boolean mask of ``shape`` filling the ``extent``-wide square at ``origin`` on a canvas."""
    image = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(image)
    ox, oy = origin
    last = extent - 1  # PIL coordinates are inclusive pixel indices
    if pose != (0.0, 1.0):
        # Upright shapes keep the classic drawing code below, so classic samples stay identical.
        _draw_posed(draw, shape, origin, last, pose)
    elif shape in _ROUND_SHAPES:
        draw.ellipse((ox, oy, ox + last, oy + last), fill=255)
        if shape == "ring":
            inset = last * (1 - _RING_INNER_RATIO) / 2
            draw.ellipse((ox + inset, oy + inset, ox + last - inset, oy + last - inset), fill=0)
    elif shape in _UNIT_OUTLINES:
        draw.polygon([(ox + u * last, oy + v * last) for u, v in _UNIT_OUTLINES[shape]], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.asarray(image) > 0


def rasterize_shape(
    shape: str,
    side: int,
    left: int,
    top: int,
    supersample: int = 4,
    subpixel_offset: tuple[int, int] = (0, 0),
    turn: float = 0.0,
    aspect: float = 1.0,
) -> ShapeMask:
    """Render ``shape`` inside a ``side``-pixel square and measure its exact extent.

    Args:
        shape: One of :data:`SHAPES`.
        side: Nominal size in pixels; the shape's longer side spans it.
        left: Image column of the footprint's left edge.
        top: Image row of the footprint's top edge.
        supersample: Sub-pixels per pixel along each axis.
        subpixel_offset: Shift ``(dx, dy)`` in sub-pixels, each in ``[0, supersample)``, so
            boxes are not all aligned to whole pixels.
        turn: Rotation in degrees, clockwise on screen (0: upright).
        aspect: Width / height of the shape in its own frame before the turn (1: as designed).
            Turned or stretched, the shape is rescaled so its longer side still spans ``side``.

    Returns:
        The shape's coverage over its footprint of ``side + 1`` pixels square (the extra pixel
        absorbs the sub-pixel shift) and its tight box in image coordinates.
    """
    if side < 1:
        raise ValueError(f"side must be >= 1, got {side}")
    if not all(0 <= d < supersample for d in subpixel_offset):
        raise ValueError(f"subpixel_offset must lie in [0, {supersample}), got {subpixel_offset}")
    if aspect <= 0:
        raise ValueError(f"aspect must be positive, got {aspect}")
    footprint = side + 1
    mask = _draw_supersampled(
        shape, footprint * supersample, subpixel_offset, side * supersample, (turn, aspect)
    )
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    bbox = (
        left + cols[0] / supersample,
        top + rows[0] / supersample,
        (cols[-1] + 1 - cols[0]) / supersample,
        (rows[-1] + 1 - rows[0]) / supersample,
    )
    # Summing each supersample x supersample block gives exact coverage fractions (box filter).
    blocks = mask.reshape(footprint, supersample, footprint, supersample).sum(axis=(1, 3))
    alpha = (blocks / supersample**2).astype(np.float32)
    return ShapeMask(alpha=alpha, left=left, top=top, bbox=tuple(float(v) for v in bbox))


def _grey(rng: np.random.Generator) -> np.ndarray:
    level = rng.uniform(*_BACKGROUND_LEVEL)
    return level + rng.uniform(-_BACKGROUND_TINT, _BACKGROUND_TINT, size=3)


def _two_tone(pattern: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    base = _grey(rng)
    contrast = rng.uniform(*_TEXTURE_CONTRAST)
    return base + contrast * pattern[..., None].astype(np.float32)


def render_background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render a ``size`` x ``size`` background as a ``float32`` RGB array in ``[0, 255]``.

    Args:
        kind: One of :data:`BACKGROUNDS`.
        size: Image side in pixels.
        rng: Source of the tone, pattern period/orientation and noise.
    """
    rows, cols = np.mgrid[0:size, 0:size]
    if kind == "plain":
        image = np.broadcast_to(_grey(rng), (size, size, 3))
    elif kind == "noise":
        noise = rng.normal(0.0, _NOISE_STD, size=(size, size, 1))
        image = _grey(rng) + noise
    elif kind == "stripes":
        half_period = int(rng.integers(3, 8))
        coordinate = [rows, cols, rows + cols][int(rng.integers(3))]
        image = _two_tone((coordinate // half_period) % 2, rng)
    elif kind == "checker":
        cell = int(rng.integers(4, 11))
        image = _two_tone((rows // cell + cols // cell) % 2, rng)
    else:
        raise ValueError(f"unknown background {kind!r}; expected one of {BACKGROUNDS}")
    return np.clip(image, 0.0, 255.0).astype(np.float32)


def composite(
    background: np.ndarray,
    masks: list[ShapeMask],
    colours: list[tuple[int, int, int]],
) -> Image.Image:
    """Alpha-blend solid-colour shapes over a background and quantise to an RGB image.

    Masks must lie inside the image; they may not overlap (blending order would then matter).
    """
    canvas = np.array(background, dtype=np.float32, copy=True)
    for mask, colour in zip(masks, colours, strict=True):
        h, w = mask.alpha.shape
        region = canvas[mask.top : mask.top + h, mask.left : mask.left + w]
        alpha = mask.alpha[..., None]
        region[...] = region * (1.0 - alpha) + np.asarray(colour, dtype=np.float32) * alpha
    pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)
