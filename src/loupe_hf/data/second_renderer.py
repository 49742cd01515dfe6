"""A second, independent renderer of the synthetic shapes benchmark, for evaluation only (issue 14).

The training renderer (``shapes.py`` + ``synthetic.py``) draws ten shapes with PIL; its classic look
has ten fixed colours, dark grey backgrounds and three size buckets with gaps between them, and its
varied look (the default, ``appearance.py``) jitters those, but always with its own drawing code,
colour anchors, shape proportions and photos. A model that learnt those pixels rather than the
words can look good on the validation split and still fail on any other picture. This module draws the *same vocabulary* (the ten shape names, the ten colour
names, the size words, the caption and referring-expression grammar) with *other code and another
look*, so that the headline table can be reported on it next to the validation split:

* drawing: ``skimage.draw.polygon`` / ``skimage.draw.disk`` on a supersampled canvas, box-filtered
  down (nothing from ``shapes.py`` is used);
* colours: each name has its own anchor (crimson rather than red, a darker blue, an off-white, …),
  jittered per object, always nearer in CIELAB to the training colour of the same name than to
  any other training colour, so the name stays right;
* proportions: a fatter star, a thinner cross, a thinner ring, an equilateral triangle, a narrow
  diamond, a pointy-top hexagon, a heart built from a square and two half discs; every shape
  rotated by up to ``max_rotation`` degrees;
* sizes: continuous, from 1/8 to 1/2 of the image side (the training buckets span 0.14–0.44 with
  gaps in its classic look); the size word is read off the drawn box with edges halfway between the training buckets;
* backgrounds (:data:`SECOND_BACKGROUNDS`): light and mid-grey plains, two-colour gradients,
  smooth colour blotches, tinted crops of CC0 textures (:data:`TEXTURES`) and crops of CC0 /
  public-domain photos (:data:`PHOTOS`) shipped with scikit-image, none of which the training
  renderer uses. Classic training backgrounds are all dark (mean level 58–114 of 255).

Samples have exactly the schema of :func:`loupe_hf.data.generate_sample` (and
:func:`loupe_hf.data.dataset_features`), so every synthetic evaluation runs on them unchanged.
Sample ``i`` is a pure function of ``(config, split, i)``. Needs scikit-image (the ``test`` and
``demo`` extras), imported only when a sample is drawn.

(One module over 500 lines because issue 14 asked for one; its seams, if it grows: drawing
(shapes, backgrounds) and words (referring expressions, captions).)
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image

from loupe_hf.data.synthetic import (
    _RELATION_SIDES,
    _RELATION_WORDS,
    MIN_IMAGE_SIZE,
    SIZE_FRACTIONS,
    SIZES,
    SyntheticConfig,
    _beyond,
    _minimal_descriptions,
    _word,
    dataset_features,
    split_combinations,
)

__all__ = [
    "EXTENT_RANGE",
    "PHOTOS",
    "SECOND_BACKGROUNDS",
    "SECOND_COLOUR_RGB",
    "TEXTURES",
    "SecondRendererConfig",
    "build_second_renderer_dataset",
    "contact_sheet",
    "render_second_background",
    "second_renderer_layers",
    "second_renderer_sample",
    "size_word",
]

SECOND_COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (200, 20, 55),
    "green": (75, 150, 35),
    "blue": (25, 60, 180),
    "yellow": (225, 200, 20),
    "purple": (120, 40, 160),
    "orange": (240, 120, 10),
    "pink": (235, 155, 220),
    "cyan": (20, 175, 190),
    "brown": (105, 60, 30),
    "white": (232, 232, 222),
}
"""Anchor colour of each name; 30–56 RGB units from the training colour of the same name."""
COLOUR_JITTER = 12
"""Per-channel uniform jitter around the anchor; even at the corners of this cube every colour
stays nearest (CIELAB) to its own name's training colour (checked in the tests)."""

EXTENT_RANGE: tuple[float, float] = (1 / 8, 1 / 2)
"""Range of an object's longer extent as a fraction of the image side (continuous)."""

SECOND_BACKGROUNDS: tuple[str, ...] = ("light", "grey", "gradient", "blotches", "texture", "photo")
BACKGROUND_CHOICES: tuple[str, ...] = (*SECOND_BACKGROUNDS, "mixed")
PHOTOS: tuple[str, ...] = ("coffee", "chelsea", "astronaut", "rocket")
"""``skimage.data`` photos used as backgrounds. Licences as scikit-image states them: ``coffee``
CC0 (Rachel Michetti), ``chelsea`` CC0 (Stefan van der Walt), ``astronaut`` NASA, public domain,
``rocket`` SpaceX, released into the public domain. (``coins`` is left out: "no known copyright
restrictions" is not a licence.)"""
TEXTURES: tuple[str, ...] = ("grass", "gravel", "brick")
"""``skimage.data`` grey textures (all CC0: DeviantArt / CC0Textures), tinted per image."""

_BACKGROUND_WORDS = {
    "light": "light",
    "grey": "grey",
    "gradient": "gradient",
    "blotches": "mottled",
    "texture": "textured",
    "photo": "photographic",
}
# An independent template set with the training grammar: phrases "a {size} {colour} {shape}",
# joined by ", " and " and ".
_CAPTION_TEMPLATES = (
    "{objects}",
    "a picture of {objects}",
    "an image of {objects}",
    "there is {objects}",
    "a drawing of {objects}",
    "{objects} on a {background} background",
    "a picture of {objects} on a {background} background",
)
# An object's colour must differ from the background under it by this CIELAB ΔE on 80 % of its
# pixels when any allowed colour can; otherwise a white star on a light plain is invisible.
MIN_CONTRAST = 20.0

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class SecondRendererConfig:
    """Settings of the second renderer; samples are a pure function of this, the split and index.

    Attributes:
        image_size: Side of the square images (>= 32; 128 like the training data).
        min_objects: Fewest objects per image.
        max_objects: Most objects per image.
        background: One of :data:`SECOND_BACKGROUNDS`, or ``"mixed"`` for one per image.
        max_rotation: Objects turn by a uniform angle in ``[-max_rotation, max_rotation]``
            degrees (kept small: a square turned 45° is a diamond).
        relation_probability: Chance that a caption with >= 2 objects states a relation.
        seed: Base seed (>= 0).
        supersample: Sub-pixels per pixel and axis for anti-aliasing.
        training: The training data's config: only its held-out combinations are read, so that
            ``validation`` and ``compositional`` draw from the same combinations as there.
    """

    image_size: int = 128
    min_objects: int = 1
    max_objects: int = 4
    background: str = "mixed"
    max_rotation: float = 20.0
    relation_probability: float = 0.3
    seed: int = 0
    supersample: int = 4
    training: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError("need 1 <= min_objects <= max_objects")
        if self.background not in BACKGROUND_CHOICES:
            raise ValueError(f"background must be one of {BACKGROUND_CHOICES}")
        if self.supersample < 1 or self.seed < 0 or not 0 <= self.max_rotation <= 45:
            raise ValueError("need supersample >= 1, seed >= 0 and 0 <= max_rotation <= 45")
        cell = self.image_size // math.ceil(math.sqrt(self.max_objects))
        if cell < self.smallest + self.gap + 2:
            raise ValueError(f"image_size={self.image_size} cannot hold {self.max_objects} objects")

    @property
    def gap(self) -> int:
        """Minimum gap in pixels between the squares that hold the objects."""
        return max(2, round(0.03 * self.image_size))

    @property
    def smallest(self) -> float:
        """Smallest object extent in pixels."""
        return EXTENT_RANGE[0] * self.image_size


def size_word(extent_fraction: float) -> str:
    """The size word of an object whose longer box side is ``extent_fraction`` of the image side:
    bucket edges lie halfway between the training buckets (0.225 and 0.335)."""
    bounds = list(SIZE_FRACTIONS.values())
    for word, (_, high), (low, _) in zip(SIZES, bounds, bounds[1:], strict=False):
        if extent_fraction < (high + low) / 2:
            return word
    return SIZES[-1]


# --------------------------------------------------------------------------------------------
# Shapes: unit outlines (x right, y down), their own proportions


def _polygon(sides: int, start_deg: float, radii: Sequence[float] = (1.0,)) -> np.ndarray:
    count = sides * len(radii)
    angles = np.radians(start_deg) + 2 * np.pi * np.arange(count) / count
    radius = np.resize(np.asarray(radii), count)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _cross(half_width: float = 0.2) -> np.ndarray:
    a = half_width
    return np.array([
        (-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a),
        (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a),
    ])  # fmt: skip


def _heart(points_per_lobe: int = 48) -> np.ndarray:
    """A square on its corner with a half disc on each upper side (not the training's curve)."""
    radius = math.sqrt(0.5)
    left = np.radians(np.linspace(135, 315, points_per_lobe))
    right = np.radians(np.linspace(225, 405, points_per_lobe))
    lobes = [
        np.stack([-0.5 + radius * np.cos(left), -0.5 + radius * np.sin(left)], axis=1),
        np.stack([0.5 + radius * np.cos(right), -0.5 + radius * np.sin(right)], axis=1),
    ]
    return np.concatenate([[(0.0, 1.0)], *lobes])


_OUTLINES: dict[str, np.ndarray] = {
    "square": np.array([(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]),
    "triangle": _polygon(3, -90),  # equilateral (training: as tall as wide)
    "star": _polygon(5, -90, radii=(1.0, 0.55)),  # fatter (training inner radius 0.42)
    "hexagon": _polygon(6, -90),  # pointy top (training: pointy sides)
    "diamond": np.array([(0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)]),  # narrow
    "cross": _cross(),  # thinner arms (training half width 0.32)
    "heart": _heart(),
    "pentagon": _polygon(5, -90),
}
_RING_INNER_RATIO = 0.68  # thinner band than training's 0.55


@dataclass(frozen=True)
class _Slot:
    """A square of side ``extent`` centred at ``(cx, cy)`` that one object fills."""

    cx: float
    cy: float
    extent: float
    angle: float


@dataclass(frozen=True)
class Coverage:
    """Anti-aliased coverage of one drawn object.

    Attributes:
        alpha: ``float32`` ``(h, w)`` coverage in ``[0, 1]`` with its top-left pixel at
            ``(left, top)`` of the image.
        left: Image column of ``alpha[:, 0]``.
        top: Image row of ``alpha[0]``.
        bbox: Tight ``(x, y, w, h)`` box of the supersampled shape, in image pixels.
    """

    alpha: np.ndarray
    left: int
    top: int
    bbox: Box

    def full(self, image_size: int) -> np.ndarray:
        """The coverage placed on an empty ``image_size`` square."""
        canvas = np.zeros((image_size, image_size), dtype=np.float32)
        h, w = self.alpha.shape
        canvas[self.top : self.top + h, self.left : self.left + w] = self.alpha
        return canvas


def _draw_mask(
    shape: str, slot: _Slot, origin: tuple[int, int], canvas: tuple[int, int], s: int
) -> np.ndarray:
    """Boolean supersampled mask of ``shape`` in ``slot``; sub-pixel ``j`` has its centre at image
    coordinate ``origin + (j + 0.5) / s``, hence the ``- 0.5`` below."""
    from skimage.draw import disk, polygon

    mask = np.zeros(canvas, dtype=bool)
    centre_r = (slot.cy - origin[1]) * s - 0.5
    centre_c = (slot.cx - origin[0]) * s - 0.5
    if shape in ("circle", "ring"):
        mask[disk((centre_r, centre_c), slot.extent * s / 2, shape=canvas)] = True
        if shape == "ring":
            inner = slot.extent * s / 2 * _RING_INNER_RATIO
            mask[disk((centre_r, centre_c), inner, shape=canvas)] = False
        return mask
    turn = np.radians(slot.angle)
    rotation = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    points = _OUTLINES[shape] @ rotation.T
    # Scale after turning, so the longer side of the turned shape spans exactly the extent.
    low, high = points.min(axis=0), points.max(axis=0)
    points = (points - (low + high) / 2) * (slot.extent * s / (high - low).max())
    mask[polygon(points[:, 1] + centre_r, points[:, 0] + centre_c, shape=canvas)] = True
    return mask


def _rasterise(shape: str, slot: _Slot, image_size: int, supersample: int) -> Coverage:
    """Draw ``shape`` filling ``slot`` and measure its coverage and tight box."""
    s = supersample
    half = slot.extent / 2
    left, top = max(0, math.floor(slot.cx - half) - 1), max(0, math.floor(slot.cy - half) - 1)
    right = min(image_size, math.ceil(slot.cx + half) + 1)
    bottom = min(image_size, math.ceil(slot.cy + half) + 1)
    canvas = ((bottom - top) * s, (right - left) * s)
    mask = _draw_mask(shape, slot, (left, top), canvas, s)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    bbox = (
        left + cols[0] / s,
        top + rows[0] / s,
        (cols[-1] + 1 - cols[0]) / s,
        (rows[-1] + 1 - rows[0]) / s,
    )
    blocks = mask.reshape(bottom - top, s, right - left, s).sum(axis=(1, 3))
    alpha = (blocks / s**2).astype(np.float32)
    return Coverage(alpha, left, top, tuple(float(v) for v in bbox))


# --------------------------------------------------------------------------------------------
# Backgrounds


@cache
def _skimage_picture(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


def _crop(picture: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (35–100 % of the shorter side), maybe mirrored, resized to ``size``."""
    height, width = picture.shape[:2]
    side = int(rng.uniform(0.35, 1.0) * min(height, width))
    top, left = int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1))
    crop = picture[top : top + side, left : left + side]
    crop = crop[:, ::-1] if rng.random() < 0.5 else crop
    resized = Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def _tint(rng: np.random.Generator, spread: float) -> np.ndarray:
    return rng.uniform(-spread, spread, size=3)


def _texture(size: int, rng: np.random.Generator) -> np.ndarray:
    grey = _crop(_skimage_picture(TEXTURES[int(rng.integers(len(TEXTURES)))]), size, rng)
    level, contrast = rng.uniform(90, 215), rng.uniform(0.4, 0.9)
    return (level + contrast * (grey - grey.mean()))[..., None] + _tint(rng, 18)


def _blotches(size: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth blotches: white noise blurred to blobs of about 1/6 the side, rescaled to unit
    spread (blurring alone shrinks it), mostly in brightness with a weaker colour part, so the
    background does not turn into confetti of object colours."""
    from skimage.filters import gaussian

    noise = rng.normal(0.0, 1.0, size=(size, size, 4))
    blobs = gaussian(noise, sigma=size / 14, channel_axis=-1, mode="wrap")
    blobs /= blobs.std(axis=(0, 1), keepdims=True)
    pattern = blobs[..., :1] + 0.4 * blobs[..., 1:]
    level = rng.uniform(100, 220) + _tint(rng, 25)
    return level + rng.uniform(15, 35) * pattern


def _gradient(size: int, rng: np.random.Generator) -> np.ndarray:
    turn = rng.uniform(0, 2 * np.pi)
    rows, cols = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    ramp = (np.cos(turn) * cols + np.sin(turn) * rows) / math.sqrt(0.5) + 0.5
    ends = [rng.uniform(40, 240) + _tint(rng, 30) for _ in range(2)]
    return ends[0] + ramp[..., None] * (ends[1] - ends[0])


def render_second_background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A ``size`` square background as ``float32`` RGB in ``[0, 255]``."""
    if kind == "light":
        image = np.broadcast_to(rng.uniform(185, 240) + _tint(rng, 10), (size, size, 3))
    elif kind == "grey":
        image = np.broadcast_to(rng.uniform(115, 165) + _tint(rng, 10), (size, size, 3))
    elif kind == "gradient":
        image = _gradient(size, rng)
    elif kind == "blotches":
        image = _blotches(size, rng)
    elif kind == "texture":
        image = _texture(size, rng)
    elif kind == "photo":
        image = _crop(_skimage_picture(PHOTOS[int(rng.integers(len(PHOTOS)))]), size, rng)
    else:
        raise ValueError(f"unknown background {kind!r}; expected one of {SECOND_BACKGROUNDS}")
    return np.clip(image, 0.0, 255.0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Layout: squares that keep a gap, continuous sizes, continuous positions


def _clashes(slot: _Slot, others: list[_Slot], gap: int) -> bool:
    return any(
        abs(slot.cx - o.cx) < (slot.extent + o.extent) / 2 + gap
        and abs(slot.cy - o.cy) < (slot.extent + o.extent) / 2 + gap
        for o in others
    )


def _place(
    extent: float, slots: list[_Slot], config: SecondRendererConfig, rng: np.random.Generator
) -> _Slot | None:
    """Rejection sampling with a bounded number of tries, shrinking the object when crowded."""
    angle = float(rng.uniform(-config.max_rotation, config.max_rotation))
    while extent >= config.smallest:
        for _ in range(40):
            # One pixel of slack on each side keeps the anti-aliased edge inside the image.
            cx, cy = rng.uniform(extent / 2 + 1, config.image_size - extent / 2 - 1, size=2)
            slot = _Slot(float(cx), float(cy), extent, angle)
            if not _clashes(slot, slots, config.gap):
                return slot
        extent *= 0.8
    return None


def _grid_layout(count: int, config: SecondRendererConfig, rng: np.random.Generator) -> list[_Slot]:
    """Smallest objects in distinct grid cells: always fits (checked by the config)."""
    per_row = math.ceil(math.sqrt(count))
    cell = config.image_size / per_row
    cells = rng.permutation(per_row * per_row)[:count]
    half = config.smallest / 2 + 1
    slots = []
    for index in cells:
        row, col = divmod(int(index), per_row)
        cx = col * cell + rng.uniform(half, cell - half - config.gap)
        cy = row * cell + rng.uniform(half, cell - half - config.gap)
        angle = float(rng.uniform(-config.max_rotation, config.max_rotation))
        slots.append(_Slot(float(cx), float(cy), config.smallest, angle))
    return slots


def _layout(config: SecondRendererConfig, rng: np.random.Generator) -> list[_Slot]:
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    extents = np.sort(rng.uniform(*EXTENT_RANGE, size=count) * config.image_size)[::-1]
    slots: list[_Slot] = []
    for extent in extents:  # largest first: they are the ones that may not fit later
        slot = _place(float(extent), slots, config, rng)
        if slot is not None:
            slots.append(slot)
    return slots if len(slots) >= config.min_objects else _grid_layout(count, config, rng)


# --------------------------------------------------------------------------------------------
# Dressing the slots: shape and colour, visible and referable


@dataclass(frozen=True)
class _Object:
    shape: str
    colour: str
    size: str
    rgb: tuple[float, float, float]
    coverage: Coverage


def _contrast(rgb: np.ndarray, coverage: Coverage, background_lab: np.ndarray) -> float:
    """20th percentile of the CIELAB ΔE between the colour and the background it covers."""
    from skimage.color import rgb2lab

    h, w = coverage.alpha.shape
    under = background_lab[coverage.top : coverage.top + h, coverage.left : coverage.left + w]
    inside = under[coverage.alpha >= 0.5]
    lab = rgb2lab(rgb[None, None] / 255.0)[0, 0]
    return float(np.percentile(np.linalg.norm(inside - lab, axis=-1), 20))


def _referable(objects: list[_Object]) -> bool:
    boxes = [obj.coverage.bbox for obj in objects]
    return all(_minimal_descriptions(k, objects, boxes) for k in range(len(objects)))


def _dress(
    slots: list[_Slot],
    combinations: list[tuple[str, str]],
    background: np.ndarray,
    config: SecondRendererConfig,
    rng: np.random.Generator,
) -> list[_Object]:
    """Give each slot the first (shape, colour), in a random order of the split's combinations,
    that is visible on the background and keeps every object referable; failing visibility, the
    most visible referable one. A combination nobody else has is always referable."""
    from skimage.color import rgb2lab

    background_lab = rgb2lab(background / 255.0)
    objects: list[_Object] = []
    for slot in slots:
        best: tuple[float, _Object] | None = None
        for k in rng.permutation(len(combinations)):
            shape, colour = combinations[int(k)]
            jitter = rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=3)
            rgb = np.clip(np.asarray(SECOND_COLOUR_RGB[colour]) + jitter, 0, 255)
            coverage = _rasterise(shape, slot, config.image_size, config.supersample)
            size = size_word(max(coverage.bbox[2:]) / config.image_size)
            candidate = _Object(shape, colour, size, tuple(float(v) for v in rgb), coverage)
            if not _referable([*objects, candidate]):
                continue
            contrast = _contrast(rgb, coverage, background_lab)
            if best is None or contrast > best[0]:  # never None at the end: see the docstring
                best = (contrast, candidate)
            if contrast >= MIN_CONTRAST:
                break
        objects.append(best[1])
    return objects


# --------------------------------------------------------------------------------------------
# Captions (the training phrase grammar: a size word, a colour and a shape); referring expressions
# come from the training grammar itself (`synthetic._minimal_descriptions`, `synthetic._word`)


def _phrase(obj: _Object) -> str:
    return f"a {obj.size} {obj.colour} {obj.shape}"


def _caption(
    objects: list[_Object],
    background: str,
    config: SecondRendererConfig,
    rng: np.random.Generator,
) -> tuple[str, dict[int, tuple[int, int]], list[dict[str, Any]]]:
    """Caption text, the span of each object's phrase, and the relation it states (if any)."""
    items = [[(_phrase(obj), k)] for k, obj in enumerate(objects)]
    relations = []
    if len(objects) >= 2 and rng.random() < config.relation_probability:
        first, second = objects[0].coverage.bbox, objects[1].coverage.bbox
        valid = [r for r, side in _RELATION_SIDES.items() if _beyond(first, second, side)]
        if valid:
            relation = valid[int(rng.integers(len(valid)))]
            items[:2] = [[*items[0], (f" {_RELATION_WORDS[relation]} ", None), *items[1]]]
            relations.append({"subject": 0, "predicate": relation, "object": 1})
    prefix, suffix = _CAPTION_TEMPLATES[int(rng.integers(len(_CAPTION_TEMPLATES)))].split(
        "{objects}"
    )
    pieces: list[tuple[str, int | None]] = [(prefix, None)]
    for k, item in enumerate(items):
        pieces += [(" and " if k == len(items) - 1 else ", ", None)] if k else []
        pieces += item
    pieces.append((suffix.format(background=_BACKGROUND_WORDS[background]), None))
    spans, length = {}, 0
    for text, owner in pieces:
        if owner is not None:
            spans[owner] = (length, length + len(text))
        length += len(text)
    return "".join(text for text, _ in pieces), spans, relations


# --------------------------------------------------------------------------------------------
# Samples


def _rngs(config: SecondRendererConfig, split: str, index: int) -> list[np.random.Generator]:
    """Independent streams for background, layout, dressing and text of one sample."""
    key = [config.seed, zlib.crc32(b"second-renderer"), zlib.crc32(split.encode()), index]
    return [np.random.default_rng(child) for child in np.random.SeedSequence(key).spawn(4)]


def _composite(background: np.ndarray, objects: list[_Object]) -> Image.Image:
    canvas = background.copy()
    for obj in objects:
        cover = obj.coverage
        h, w = cover.alpha.shape
        region = canvas[cover.top : cover.top + h, cover.left : cover.left + w]
        alpha = cover.alpha[..., None]
        region[...] = region * (1.0 - alpha) + np.asarray(obj.rgb, dtype=np.float32) * alpha
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))


def second_renderer_layers(
    index: int, config: SecondRendererConfig | None = None, split: str = "validation"
) -> tuple[dict[str, Any], np.ndarray, list[np.ndarray]]:
    """Sample ``index`` together with its layers: the background (``float32`` RGB) and each
    object's full-image coverage, in the order of ``sample["objects"]``."""
    config = config or SecondRendererConfig()
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    background_rng, layout_rng, dress_rng, text_rng = _rngs(config, split, int(index))
    kind = config.background
    if kind == "mixed":
        kind = SECOND_BACKGROUNDS[int(background_rng.integers(len(SECOND_BACKGROUNDS)))]
    background = render_second_background(kind, config.image_size, background_rng)
    combinations = split_combinations(split, config.training)
    objects = _dress(_layout(config, layout_rng), combinations, background, config, dress_rng)
    objects = [objects[int(k)] for k in text_rng.permutation(len(objects))]  # mention order
    caption, spans, relations = _caption(objects, kind, config, text_rng)
    boxes = [obj.coverage.bbox for obj in objects]
    expressions = []
    for k in range(len(objects)):
        options = _minimal_descriptions(k, objects, boxes)
        choice = options[int(text_rng.integers(len(options)))]
        expressions.append({"text": _word(choice, objects), "object_index": k})
    sample = {
        "image": _composite(background, objects),
        "image_id": int(index),
        "split": f"second_{split}",
        "width": config.image_size,
        "height": config.image_size,
        "caption": caption,
        "background": kind,
        "objects": _objects_record(objects, spans),
        "referring_expressions": expressions,
        "relations": relations,
    }
    return sample, background, [obj.coverage.full(config.image_size) for obj in objects]


def _objects_record(objects: list[_Object], spans: dict[int, tuple[int, int]]) -> dict[str, list]:
    return {
        "bbox": [list(obj.coverage.bbox) for obj in objects],
        "area": [float(obj.coverage.alpha.sum(dtype=np.float64)) for obj in objects],
        "category": [obj.shape for obj in objects],
        "colour": [obj.colour for obj in objects],
        "size": [obj.size for obj in objects],
        "name": [f"{obj.size} {obj.colour} {obj.shape}" for obj in objects],
        "phrase": [_phrase(obj) for obj in objects],
        "phrase_span": [list(spans[k]) for k in range(len(objects))],
    }


def second_renderer_sample(
    index: int, config: SecondRendererConfig | None = None, split: str = "validation"
) -> dict[str, Any]:
    """Sample ``index`` of the second renderer, in the schema of ``generate_sample``.

    ``split`` picks the colour-shape combinations (``validation``: the training ones,
    ``compositional``: the held-out ones); the sample's ``split`` field is ``second_<split>``.
    """
    return second_renderer_layers(index, config, split)[0]


# --------------------------------------------------------------------------------------------
# Hugging Face datasets and a picture


def _rows(
    config: SecondRendererConfig, split: str, ranges: list[tuple[int, int]]
) -> Iterator[dict[str, Any]]:
    for start, stop in ranges:
        for index in range(start, stop):
            sample = second_renderer_sample(index, config, split)
            buffer = io.BytesIO()
            sample["image"].save(buffer, format="PNG", compress_level=1)
            yield {**sample, "image": {"bytes": buffer.getvalue(), "path": None}}


def build_second_renderer_dataset(
    num_samples: int,
    config: SecondRendererConfig | None = None,
    *,
    split: str = "validation",
    start: int = 0,
    num_proc: int | None = None,
    cache_dir: str | Path | None = None,
) -> datasets.Dataset:
    """Samples ``start .. start + num_samples - 1`` as a ``Dataset`` with
    ``dataset_features()``, cached under a fingerprint of the arguments and of this file."""
    if num_samples < 1 or start < 0:
        raise ValueError("need num_samples >= 1 and start >= 0")
    config = config or SecondRendererConfig()
    blocks = min(num_proc or 1, num_samples)
    bounds = np.linspace(start, start + num_samples, blocks + 1).round().astype(int)
    ranges = [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
    source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    key = json.dumps([source, repr(config), split, start, num_samples])
    return datasets.Dataset.from_generator(
        _rows,
        features=dataset_features(),
        gen_kwargs={"config": config, "split": split, "ranges": ranges},
        num_proc=num_proc if blocks > 1 else None,
        cache_dir=str(cache_dir) if cache_dir is not None else None,
        fingerprint=hashlib.sha256(key.encode()).hexdigest()[:32],
        split=datasets.NamedSplit(f"second_{split}"),
    )


def contact_sheet(
    indices: Sequence[int] = range(16),
    config: SecondRendererConfig | None = None,
    columns: int = 4,
    scale: float = 2.0,
) -> Image.Image:
    """Samples with their boxes and names drawn, ``columns`` per row (for the docs)."""
    from loupe_hf.visualization import draw_boxes, picture_grid

    tiles = []
    for index in indices:
        sample = second_renderer_sample(index, config)
        boxes = [(x, y, x + w, y + h) for x, y, w, h in sample["objects"]["bbox"]]
        tiles.append(draw_boxes(sample["image"], boxes, sample["objects"]["name"], scale=scale))
    return picture_grid(tiles, columns)
