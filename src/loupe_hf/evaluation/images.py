"""The image files of an evaluation: each read once, unreadable ones skipped and named.

One truncated or corrupt file among thousands should not abort a benchmark run with an error
that does not say which file it was: :func:`open_rgb_images` reads every file, keeps the images
that decode, and returns the others as :class:`SkippedImage` records (path and reason), so that
the caller can drop what belongs to them and report the count and the names.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import PIL.Image

__all__ = ["SkippedImage", "open_rgb_image", "open_rgb_images", "skipped_report"]


class SkippedImage(NamedTuple):
    """An image file that could not be read: its `path` and the `reason` PIL gave."""

    path: str
    reason: str


def open_rgb_image(path: str | os.PathLike) -> PIL.Image.Image:
    """The image at `path`, fully decoded and converted to RGB; an `OSError` naming the file when it
    is missing, truncated or not an image (PIL decodes lazily, so a truncated file would
    otherwise fail later, in the middle of a batch, without its name)."""
    try:
        with PIL.Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise OSError(f"cannot read image {os.fspath(path)}: {error}") from error


def open_rgb_images(
    paths: Sequence[str | os.PathLike],
) -> tuple[list[PIL.Image.Image | None], list[SkippedImage]]:
    """Every image of `paths` (RGB), with `None` in place of each unreadable one, and the list of
    those skipped. Each distinct path is read once, so images shared by many items (RefCOCO's
    expressions) are decoded once."""
    opened: dict[str, PIL.Image.Image | None] = {}
    skipped: list[SkippedImage] = []
    for path in paths:
        key = os.fspath(path)
        if key in opened:
            continue
        try:
            opened[key] = open_rgb_image(key)
        except OSError as error:
            opened[key] = None
            skipped.append(SkippedImage(key, str(error.__cause__ or error)))
    return [opened[os.fspath(path)] for path in paths], skipped


def skipped_report(skipped: Sequence[SkippedImage], total: int) -> dict[str, object]:
    """The JSON summary of the skipped images: their count, the total, and each file and reason."""
    return {
        "count": len(skipped),
        "of": total,
        "files": [{"file": str(Path(item.path)), "reason": item.reason} for item in skipped],
    }
