"""Deterministic synthetic image-caption benchmark with exact grounding ground truth.

(One module over 500 lines: scenes, captions, referring expressions and the dataset builders share
the per-index random streams that make every sample reproducible; the data redesign of issue 14
is the moment to split it.)

Each image shows a few (by default 1-4) coloured shapes; its caption names them as noun
phrases ("a small red star"), sometimes with a spatial relation computed from the boxes. Every
object carries its box, the character span of its phrase in the caption, and a referring
expression that provably singles it out. Sample ``i`` of a split depends only on
``(config, split, i)``, so any index can be generated on its own, in any order and in any
process.

Splits: ``train`` and ``validation`` draw from the same colour-shape combinations;
``compositional`` uses only a held-out set of combinations (chosen by the seed), while every
shape and every colour still appears in training in other combinations.

Appearance (``SyntheticConfig.appearance``): ``"varied"`` (the default) draws the scenes with
light to dark backgrounds, gradients and photo crops, jittered colours, continuous sizes and
mildly turned and stretched shapes (``appearance.py``); ``"classic"`` draws them as before issue
14 (dark grey textures, exact palette colours, size buckets with gaps, upright shapes),
byte for byte.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image

from loupe_hf.data.appearance import (
    APPEARANCES,
    COLOUR_JITTER,
    PHOTO_DIR,
    UPRIGHT,
    VARIED_BACKGROUNDS,
    BackgroundSpec,
    ObjectStyle,
    choose_background,
    jitter_colour,
    object_pose,
    render_varied_background,
)
from loupe_hf.data.shapes import (
    BACKGROUNDS,
    SHAPES,
    ShapeMask,
    composite,
    rasterize_shape,
    render_background,
)

__all__ = [
    "APPEARANCES",
    "BACKGROUNDS",
    "COLOURS",
    "COLOUR_RGB",
    "SHAPES",
    "SHAPE_CATEGORY_IDS",
    "SIZES",
    "SIZE_FRACTIONS",
    "SPLITS",
    "VARIED_BACKGROUNDS",
    "VARIED_SIZE_FRACTIONS",
    "SyntheticConfig",
    "build_dataset",
    "build_iterable_dataset",
    "dataset_features",
    "generate_sample",
    "held_out_combinations",
    "iter_samples",
    "save_coco_json",
    "split_combinations",
    "to_coco",
    "training_captions",
]

SPLITS: tuple[str, ...] = ("train", "validation", "compositional")

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
    "pink": (250, 130, 200),
    "cyan": (40, 210, 220),
    "brown": (140, 80, 30),
    "white": (250, 250, 250),
}
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)

SIZE_FRACTIONS: dict[str, tuple[float, float]] = {
    "small": (0.14, 0.20),
    "medium": (0.25, 0.31),
    "large": (0.36, 0.44),
}
"""Classic appearance: range of an object's nominal side (its longer extent) as a fraction of
the image side. The gaps between the buckets keep the size words apart."""
VARIED_SIZE_FRACTIONS: dict[str, tuple[float, float]] = {
    "small": (0.125, 0.225),
    "medium": (0.225, 0.335),
    "large": (0.335, 0.5),
}
"""Varied appearance: contiguous buckets, ``[low, high)`` except the last, which holds 1/2. The
edges lie halfway between the classic buckets, as in ``second_renderer.size_word``, so both
renderers give an extent the same word."""
SIZES: tuple[str, ...] = tuple(SIZE_FRACTIONS)

SHAPE_CATEGORY_IDS: dict[str, int] = {shape: k + 1 for k, shape in enumerate(SHAPES)}
"""Stable COCO category id of each shape (1-based, in :data:`SHAPES` order)."""

MIN_IMAGE_SIZE = 32
BACKGROUND_CHOICES: tuple[str, ...] = (*BACKGROUNDS, "mixed")
"""Classic appearance's ``background`` settings (varied: :data:`VARIED_BACKGROUNDS` too)."""

# The words for a background: its kind, and in the varied appearance its tone when the whole
# background is dark or light (BackgroundSpec.tone). Tone words come first: "a dark striped".
_BACKGROUND_ADJECTIVES = {
    "plain": "plain",
    "noise": "noisy",
    "stripes": "striped",
    "checker": "checkered",
    "gradient": "gradient",
    "photo": "photographic",
    "dark": "dark",
    "light": "light",
}
# The one template of captions that name the shapes alone (`shape_caption_share`): nothing but the
# shapes tells them apart.
_SHAPE_CAPTION_TEMPLATE = "an image of {objects}."
_CAPTION_TEMPLATES = (
    "{objects}",
    "a photo of {objects}",
    "an image of {objects}",
    "there is {objects}",
    "a picture showing {objects}",
    "{objects} on a {background} background",
    "a photo of {objects} on a {background} background",
)
# The varied appearance adds these (the classic one keeps its seven, so its draws stay the same).
_VARIED_CAPTION_TEMPLATES = (
    *_CAPTION_TEMPLATES,
    "a scene with {objects}",
    "an illustration of {objects}",
    "{objects} against a {background} background",
    "an image showing {objects} on a {background} background",
)
# Relation name -> caption words. "left" reads "subject to the left of object".
_RELATION_WORDS = {
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
}
# The side of the object on which a relation puts its subject (see _beyond).
_RELATION_SIDES = {"left": "left", "right": "right", "above": "top", "below": "bottom"}
# Referring expressions: "the red star on the left" for two candidates, "the leftmost red star"
# for three or more.
_POSITION_SUFFIX = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
_POSITION_SUPERLATIVE = {
    "left": "leftmost",
    "right": "rightmost",
    "top": "topmost",
    "bottom": "bottommost",
}
# Attribute subsets tried in order of length; the shape noun is always present.
_ATTRIBUTE_TIERS: tuple[tuple[tuple[str, ...], ...], ...] = (
    ((),),
    (("colour",), ("size",)),
    (("size", "colour"),),
)

Box = tuple[float, float, float, float]
Combination = tuple[str, str]


@dataclass(frozen=True)
class SyntheticConfig:
    """Generation settings. Samples are a pure function of this config, the split and the index.

    Attributes:
        image_size: Side of the square images in pixels (>= 32).
        min_objects: Fewest objects per image (>= 1).
        max_objects: Most objects per image.
        background: One of ``"plain"``, ``"noise"``, ``"stripes"``, ``"checker"``, with the
            varied appearance also ``"gradient"`` or ``"photo"``, or ``"mixed"`` to draw one of
            those per image.
        relation_probability: Chance that a caption with >= 2 objects states a spatial relation.
        seed: Base seed (>= 0); also selects the held-out colour-shape combinations.
        holdout_fraction: Share of colour-shape combinations reserved for ``compositional``,
            in ``(0, 0.5]``.
        supersample: Sub-pixels per pixel and axis used for anti-aliasing (1 disables it).
        margin: Minimum gap in pixels between objects' footprints; ``None`` picks
            ``max(2, round(0.03 * image_size))``.
        contrast_group: Consecutive indices form groups of this many samples that differ in one
            attribute of one object only: member 0 is a scene, each other member changes one
            object's shape (two edits in three) or colour, each edit different, so a batch that
            holds whole groups has negatives that colour and size alone cannot tell apart. 1 (the
            default) makes every index its own scene.
        appearance: ``"varied"`` (default) or ``"classic"``; see the module docstring and
            ``appearance.py``. Only the pixels, the size ranges and the caption templates differ:
            splits, hold-out, words and grounding rules are the same.
        omit_attributes: In the varied look, let each caption phrase name the object's size and
            colour only sometimes (both half the time, else colour, size or neither alike), as real
            captions do, so that colour and size cannot match every phrase. Off by default: at the
            main job's budget it cost colour accuracy and gave no shape (docs/design_choices.md).
        shape_caption_share: The share of samples, in ``[0, 1]``, whose caption names the objects'
            shapes alone: "an image of a star." (objects joined by "and"), with no template,
            attribute, relation or background word. Only the text changes. When shape is the only
            word that tells captions apart, contrastive training has to read it: a curriculum's
            first stage (docs/design_choices.md). 0 by default.
    """

    image_size: int = 128
    min_objects: int = 1
    max_objects: int = 4
    background: str = "mixed"
    relation_probability: float = 0.3
    seed: int = 0
    holdout_fraction: float = 0.2
    supersample: int = 4
    margin: int | None = None
    contrast_group: int = 1
    appearance: str = "varied"
    omit_attributes: bool = False
    shape_caption_share: float = 0.0

    def __post_init__(self) -> None:
        _check_int("image_size", self.image_size, minimum=MIN_IMAGE_SIZE)
        _check_int("min_objects", self.min_objects, minimum=1)
        _check_int("max_objects", self.max_objects, minimum=1)
        if self.min_objects > self.max_objects:
            raise ValueError(
                f"min_objects ({self.min_objects}) must not exceed max_objects ({self.max_objects})"
            )
        if not isinstance(self.omit_attributes, bool):
            raise ValueError(f"omit_attributes must be True or False, got {self.omit_attributes!r}")
        share = self.shape_caption_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
            raise ValueError(f"shape_caption_share must be a number in [0, 1], got {share!r}")
        if self.appearance not in APPEARANCES:
            raise ValueError(f"appearance must be one of {APPEARANCES}, got {self.appearance!r}")
        choices = BACKGROUND_CHOICES if self.classic else (*VARIED_BACKGROUNDS, "mixed")
        if self.background not in choices:
            raise ValueError(
                f"background must be one of {choices} with appearance={self.appearance!r}, "
                f"got {self.background!r}"
            )
        if not 0.0 <= self.relation_probability <= 1.0:
            raise ValueError(
                f"relation_probability must lie in [0, 1], got {self.relation_probability}"
            )
        _check_int("seed", self.seed, minimum=0)
        if not 0.0 < self.holdout_fraction <= 0.5:
            raise ValueError(f"holdout_fraction must lie in (0, 0.5], got {self.holdout_fraction}")
        _check_int("supersample", self.supersample, minimum=1)
        if self.margin is not None:
            _check_int("margin", self.margin, minimum=1)
        _check_int("contrast_group", self.contrast_group, minimum=1)
        self._check_feasible()

    @property
    def classic(self) -> bool:
        """Whether samples are drawn with the classic (pre-issue-14) appearance."""
        return self.appearance == "classic"

    @property
    def size_fractions(self) -> dict[str, tuple[float, float]]:
        """Range of each size word's nominal side as a fraction of the image side."""
        return SIZE_FRACTIONS if self.classic else VARIED_SIZE_FRACTIONS

    @property
    def gap(self) -> int:
        """Minimum gap in pixels between object footprints."""
        return self.margin if self.margin is not None else max(2, round(0.03 * self.image_size))

    def _check_feasible(self) -> None:
        # Every image of the compositional split may need max_objects distinct held-out
        # combinations to make each object referable (see _make_referable).
        held_out = _held_out_count(self.holdout_fraction)
        if held_out < self.max_objects:
            raise ValueError(
                f"holdout_fraction={self.holdout_fraction} holds out {held_out} colour-shape "
                f"combinations, fewer than max_objects={self.max_objects}"
            )
        # The fallback layout puts small objects in a grid; it must fit, so that min_objects can
        # always be placed without unbounded retries.
        cell = self.image_size // _grid_side(self.max_objects)
        if cell < _side_range("small", self)[1] + 1 + self.gap:
            raise ValueError(
                f"image_size={self.image_size} is too small for max_objects={self.max_objects} "
                f"with margin {self.gap}"
            )


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _held_out_count(fraction: float) -> int:
    return round(fraction * len(SHAPES) * len(COLOURS))


def _grid_side(count: int) -> int:
    return math.ceil(math.sqrt(count))


def _side_range(size: str, config: SyntheticConfig) -> tuple[int, int]:
    """Fewest and most pixels of a ``size`` object's nominal side (classic: roughly)."""
    low, high = config.size_fractions[size]
    if config.classic:
        return round(low * config.image_size), round(high * config.image_size)
    # Whole-pixel sides of contiguous buckets: a side belongs to exactly one bucket (rounded to
    # 1e-9 first, so that 0.225 * 200 is 45, not 45.000000000000007).
    first = math.ceil(round(low * config.image_size, 9))
    past = round(high * config.image_size, 9)
    last = math.floor(past) if size == SIZES[-1] else math.ceil(past) - 1
    return max(2, first), max(2, last)


# --------------------------------------------------------------------------------------------
# Seeds and splits


def _stable_key(text: str) -> int:
    # Python's hash() is salted per process; CRC32 is the same everywhere.
    return zlib.crc32(text.encode("utf-8"))


def _sample_rngs(config: SyntheticConfig, split: str, index: int) -> list[np.random.Generator]:
    """Independent generators for layout, text, background and object styles of one sample.

    Separate streams keep, e.g., the layout unchanged when only the background setting changes.
    Children are keyed by their position, so the first three are those of the classic generator
    before the style stream was added.
    """
    sequence = np.random.SeedSequence([config.seed, _stable_key(split), index])
    return [np.random.default_rng(child) for child in sequence.spawn(4)]


@lru_cache(maxsize=64)
def _held_out(seed: int, fraction: float) -> frozenset[Combination]:
    rng = np.random.default_rng(np.random.SeedSequence([seed, _stable_key("holdout")]))
    shapes = [SHAPES[k] for k in rng.permutation(len(SHAPES))]
    colours = [COLOURS[k] for k in rng.permutation(len(COLOURS))]
    # Walk the cyclic diagonals of the shuffled shape x colour grid: one diagonal holds each
    # shape once and each colour once (there are as many shapes as colours), so the held-out set
    # is balanced and, with at most half held out, every shape and colour keeps half of its
    # combinations for training.
    diagonals = (
        (shapes[i], colours[(i + d) % len(colours)])
        for d in range(len(colours))
        for i in range(len(shapes))
    )
    return frozenset(itertools.islice(diagonals, _held_out_count(fraction)))


def held_out_combinations(config: SyntheticConfig | None = None) -> frozenset[Combination]:
    """The ``(shape, colour)`` combinations reserved for the ``compositional`` split."""
    config = config or SyntheticConfig()
    return _held_out(config.seed, config.holdout_fraction)


def split_combinations(split: str, config: SyntheticConfig | None = None) -> list[Combination]:
    """The ``(shape, colour)`` combinations objects of ``split`` are drawn from, in fixed order."""
    _check_split(split)
    held_out = held_out_combinations(config)
    want_held_out = split == "compositional"
    # Sorted by the constants' order, never by set iteration order (which depends on the
    # per-process string hash salt).
    return [
        (shape, colour)
        for shape in SHAPES
        for colour in COLOURS
        if ((shape, colour) in held_out) == want_held_out
    ]


# --------------------------------------------------------------------------------------------
# Layout


@dataclass(frozen=True)
class _Object:
    shape: str
    colour: str
    size: str
    side: int
    left: int
    top: int
    offset: tuple[int, int]
    style: ObjectStyle = UPRIGHT

    @property
    def footprint(self) -> int:
        return self.side + 1


def _free_positions(
    occupied: list[_Object], footprint: int, image_size: int, gap: int
) -> np.ndarray:
    """Boolean grid ``[top, left]`` of positions keeping ``gap`` pixels from every object."""
    coords = np.arange(image_size - footprint + 1)
    free = np.ones((coords.size, coords.size), dtype=bool)
    for other in occupied:
        clash_x = (coords < other.left + other.footprint + gap) & (
            other.left < coords + footprint + gap
        )
        clash_y = (coords < other.top + other.footprint + gap) & (
            other.top < coords + footprint + gap
        )
        free &= ~(clash_y[:, None] & clash_x[None, :])
    return free


def _draw_side(size: str, config: SyntheticConfig, rng: np.random.Generator) -> int:
    if config.classic:
        return max(2, round(rng.uniform(*SIZE_FRACTIONS[size]) * config.image_size))
    first, last = _side_range(size, config)
    return int(rng.integers(first, last + 1))


def _place(
    combination: Combination,
    size_index: int,
    occupied: list[_Object],
    config: SyntheticConfig,
    rng: np.random.Generator,
) -> _Object | None:
    """Place an object uniformly among all free positions, shrinking it if it does not fit.

    Enumerating the free positions is exact rejection sampling without the unbounded loop.
    """
    for size in reversed(SIZES[: size_index + 1]):
        side = _draw_side(size, config, rng)
        free = np.flatnonzero(_free_positions(occupied, side + 1, config.image_size, config.gap))
        if free.size:
            top, left = divmod(int(free[rng.integers(free.size)]), config.image_size - side)
            offset = tuple(int(v) for v in rng.integers(config.supersample, size=2))
            return _Object(*combination, size, side, left, top, offset)
    return None


def _grid_layout(
    combinations: list[Combination], config: SyntheticConfig, rng: np.random.Generator
) -> list[_Object]:
    """Small objects in distinct grid cells: always fits (checked by the config)."""
    per_row = _grid_side(len(combinations))
    cell = config.image_size // per_row
    cells = rng.permutation(per_row * per_row)[: len(combinations)]
    objects = []
    for combination, cell_index in zip(combinations, cells, strict=True):
        side = _draw_side("small", config, rng)
        slack = cell - (side + 1) - config.gap
        row, col = divmod(int(cell_index), per_row)
        left = col * cell + int(rng.integers(slack + 1))
        top = row * cell + int(rng.integers(slack + 1))
        offset = tuple(int(v) for v in rng.integers(config.supersample, size=2))
        objects.append(_Object(*combination, "small", side, left, top, offset))
    return objects


def _sample_layout(
    combinations: list[Combination], config: SyntheticConfig, rng: np.random.Generator
) -> list[_Object]:
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    chosen = [combinations[k] for k in rng.integers(len(combinations), size=count)]
    size_indices = rng.integers(len(SIZES), size=count)
    objects: list[_Object] = []
    # Large objects first: they are the ones that may not fit once the image fills up.
    for k in np.argsort(-size_indices, kind="stable"):
        placed = _place(chosen[k], int(size_indices[k]), objects, config, rng)
        if placed is not None:
            objects.append(placed)
    if len(objects) < config.min_objects:
        objects = _grid_layout(chosen, config, rng)
    return objects


def _styled(
    objects: list[_Object], config: SyntheticConfig, rng: np.random.Generator
) -> list[_Object]:
    """Give each object its own look (varied appearance); classic objects stay upright."""
    if config.classic:
        return objects
    return [replace(obj, style=ObjectStyle.draw(rng)) for obj in objects]


def _render(obj: _Object, supersample: int) -> ShapeMask:
    turn, aspect = object_pose(obj.shape, obj.style)
    return rasterize_shape(
        obj.shape, obj.side, obj.left, obj.top, supersample, obj.offset, turn, aspect
    )


def _object_rgb(obj: _Object, config: SyntheticConfig) -> tuple[float, float, float]:
    rgb = COLOUR_RGB[obj.colour]
    return rgb if config.classic else jitter_colour(rgb, COLOUR_JITTER[obj.colour], obj.style)


# --------------------------------------------------------------------------------------------
# Referring expressions


@dataclass(frozen=True)
class _Description:
    """A referring expression before wording: shape plus optional attributes and position."""

    shape: str
    colour: str | None = None
    size: str | None = None
    position: str | None = None

    def matches(self, obj: _Object) -> bool:
        return (
            obj.shape == self.shape
            and self.colour in (None, obj.colour)
            and self.size in (None, obj.size)
        )


def _beyond(box: Box, other: Box, position: str) -> bool:
    """Whether ``box`` lies strictly on the ``position`` side of ``other`` (no overlap)."""
    x, y, w, h = box
    ox, oy, ow, oh = other
    return {
        "left": x + w <= ox,
        "right": ox + ow <= x,
        "top": y + h <= oy,
        "bottom": oy + oh <= y,
    }[position]


def _denoted(description: _Description, objects: list[_Object], boxes: list[Box]) -> list[int]:
    """Indices of the objects an expression applies to; unique iff exactly one."""
    candidates = [k for k, obj in enumerate(objects) if description.matches(obj)]
    if description.position is None:
        return candidates
    return [
        k
        for k in candidates
        if all(_beyond(boxes[k], boxes[j], description.position) for j in candidates if j != k)
    ]


def _minimal_descriptions(
    target: int, objects: list[_Object], boxes: list[Box]
) -> list[_Description]:
    """All uniquely denoting descriptions of ``target`` with the fewest words.

    Attributes alone are preferred; a position is added only when no attribute subset works.
    """
    obj = objects[target]
    for positions in ((None,), tuple(_POSITION_SUFFIX)):
        for tier in _ATTRIBUTE_TIERS:
            found = []
            for attributes in tier:
                for position in positions:
                    description = _Description(
                        obj.shape,
                        colour=obj.colour if "colour" in attributes else None,
                        size=obj.size if "size" in attributes else None,
                        position=position,
                    )
                    if _denoted(description, objects, boxes) == [target]:
                        found.append(description)
            if found:
                return found
    return []


def _word(description: _Description, objects: list[_Object]) -> str:
    noun = " ".join(w for w in (description.size, description.colour, description.shape) if w)
    if description.position is None:
        return f"the {noun}"
    candidates = sum(description.matches(obj) for obj in objects)
    if candidates == 2:
        return f"the {noun} {_POSITION_SUFFIX[description.position]}"
    return f"the {_POSITION_SUPERLATIVE[description.position]} {noun}"


def _make_referable(
    objects: list[_Object],
    masks: list[ShapeMask],
    combinations: list[Combination],
    config: SyntheticConfig,
    rng: np.random.Generator,
) -> None:
    """Recolour/reshape objects that no expression can single out (in place).

    Only happens for look-alikes that no position separates. An object given a combination
    nobody else has is unique, and this never makes another object unreferable, so one pass
    per object suffices.
    """
    for _ in range(len(objects)):
        boxes = [mask.bbox for mask in masks]
        stuck = [k for k in range(len(objects)) if not _minimal_descriptions(k, objects, boxes)]
        if not stuck:
            return
        used = {(obj.shape, obj.colour) for obj in objects}
        spare = [c for c in combinations if c not in used]
        shape, colour = spare[rng.integers(len(spare))]
        objects[stuck[0]] = replace(objects[stuck[0]], shape=shape, colour=colour)
        masks[stuck[0]] = _render(objects[stuck[0]], config.supersample)


def _contrast_edits(
    objects: list[_Object],
    combinations: list[Combination],
    config: SyntheticConfig,
    split: str,
    group: int,
) -> list[tuple[int, str, str]]:
    """The one-attribute edits `(object, "shape" | "colour", new value)` of a group's scene, in the
    order its members take them: distinct, shuffled by the group's own stream, two shape edits
    for each colour edit (shape is what colour and size do not give away). Every edit keeps the
    object's (shape, colour) combination within the split, so the compositional hold-out holds."""
    allowed = set(combinations)
    rng = np.random.default_rng(
        np.random.SeedSequence([config.seed, _stable_key(split), group, _stable_key("contrast")])
    )
    by_attribute: dict[str, list[tuple[int, str, str]]] = {"shape": [], "colour": []}
    for k, obj in enumerate(objects):
        by_attribute["shape"] += [
            (k, "shape", shape)
            for shape in SHAPES
            if shape != obj.shape and (shape, obj.colour) in allowed
        ]
        by_attribute["colour"] += [
            (k, "colour", colour)
            for colour in COLOURS
            if colour != obj.colour and (obj.shape, colour) in allowed
        ]
    shapes, colours = (
        [edits[i] for i in rng.permutation(len(edits))] for edits in by_attribute.values()
    )
    ordered = []
    while shapes or colours:
        ordered += [shapes.pop() for _ in range(2) if shapes]
        ordered += [colours.pop()] if colours else []
    return ordered


# --------------------------------------------------------------------------------------------
# Captions


class _CaptionBuilder:
    """Concatenates caption text while recording the span of each object's phrase."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.spans: dict[int, tuple[int, int]] = {}

    def add(self, text: str, object_index: int | None = None) -> None:
        if object_index is not None:
            self.spans[object_index] = (self.length, self.length + len(text))
        self.parts.append(text)
        self.length += len(text)

    @property
    def text(self) -> str:
        return "".join(self.parts)


# The attributes a varied caption's phrase names, drawn uniformly per object: real captions seldom
# name every attribute, and a phrase naming only the shape is one that colour and size cannot
# match (they single out most full captions of a batch, so the loss never needed shape).
_VARIED_PHRASE_ATTRIBUTES: tuple[tuple[str, ...], ...] = (
    ("size", "colour"),
    ("size", "colour"),
    ("size", "colour"),
    ("colour",),
    ("size",),
    (),
)


def _phrase(obj: _Object, attributes: tuple[str, ...] = ("size", "colour")) -> str:
    return " ".join(["a", *(getattr(obj, name) for name in attributes), obj.shape])


def _valid_relations(subject: Box, other: Box) -> list[str]:
    return [name for name, side in _RELATION_SIDES.items() if _beyond(subject, other, side)]


def _caption_items(
    objects: list[_Object],
    boxes: list[Box],
    config: SyntheticConfig,
    rng: np.random.Generator,
    shapes_alone: bool = False,
) -> tuple[list[list[tuple[str, int | None]]], list[dict[str, Any]]]:
    """Caption list items as (text, object) pieces; objects are already in mention order."""
    named = [("size", "colour")] * len(objects)
    if shapes_alone:
        return [[(_phrase(obj, ()), k)] for k, obj in enumerate(objects)], []
    if config.omit_attributes and not config.classic:
        choices = rng.integers(len(_VARIED_PHRASE_ATTRIBUTES), size=len(objects))
        named = [_VARIED_PHRASE_ATTRIBUTES[int(k)] for k in choices]
    items: list[list[tuple[str, int | None]]] = [
        [(_phrase(obj, attributes), k)]
        for k, (obj, attributes) in enumerate(zip(objects, named, strict=True))
    ]
    relations: list[dict[str, Any]] = []
    if len(objects) >= 2 and rng.random() < config.relation_probability:
        valid = _valid_relations(boxes[0], boxes[1])
        if valid:  # always true for non-overlapping boxes; kept as a guard
            relation = valid[int(rng.integers(len(valid)))]
            words = _RELATION_WORDS[relation]
            items[:2] = [items[0] + [(f" {words} ", None)] + items[1]]
            relations.append({"subject": 0, "predicate": relation, "object": 1})
    return items, relations


def _background_words(kind: str, backdrop: BackgroundSpec | None) -> str:
    tone = backdrop.tone if backdrop is not None else None
    return " ".join(_BACKGROUND_ADJECTIVES[word] for word in (tone, kind) if word)


def _compose_caption(
    objects: list[_Object],
    boxes: list[Box],
    background_words: str,
    config: SyntheticConfig,
    rng: np.random.Generator,
    shapes_alone: bool = False,
) -> tuple[str, dict[int, tuple[int, int]], list[dict[str, Any]]]:
    items, relations = _caption_items(objects, boxes, config, rng, shapes_alone)
    if shapes_alone:
        template = _SHAPE_CAPTION_TEMPLATE
    else:
        templates = _CAPTION_TEMPLATES if config.classic else _VARIED_CAPTION_TEMPLATES
        template = templates[int(rng.integers(len(templates)))]
    prefix, suffix = template.split("{objects}")
    oxford = len(items) >= 3 and rng.random() < 0.5
    builder = _CaptionBuilder()
    builder.add(prefix)
    for k, item in enumerate(items):
        if k == len(items) - 1 and k > 0:
            builder.add(", and " if oxford else " and ")
        elif k > 0:
            builder.add(", ")
        for text, object_index in item:
            builder.add(text, object_index)
    builder.add(suffix.format(background=background_words))
    return builder.text, builder.spans, relations


# --------------------------------------------------------------------------------------------
# Samples


@dataclass
class _Scene:
    """Everything about a sample except its pixels."""

    index: int
    split: str
    objects: list[_Object]
    masks: list[ShapeMask]
    background: str
    backdrop: BackgroundSpec | None  # the varied appearance's background, before its pixels
    caption: str
    spans: dict[int, tuple[int, int]]
    relations: list[dict[str, Any]]
    referring_expressions: list[dict[str, Any]]
    background_rng: np.random.Generator


def _choose_background(
    config: SyntheticConfig, colours: list[tuple[float, float, float]], rng: np.random.Generator
) -> tuple[str, BackgroundSpec | None]:
    """The sample's background kind and, in the varied appearance, its spec (clear of
    ``colours``; it may turn a texture into ``"plain"`` when the colours leave no room)."""
    kinds = BACKGROUNDS if config.classic else VARIED_BACKGROUNDS
    kind = config.background
    if kind == "mixed":
        kind = kinds[int(rng.integers(len(kinds)))]
    if config.classic:
        return kind, None
    backdrop = choose_background(kind, colours, rng)
    return backdrop.kind, backdrop


def _group_colours(
    objects: list[_Object], edits: list[tuple[int, str, str]], config: SyntheticConfig
) -> list[tuple[float, float, float]]:
    """The colours a scene shows, plus those its contrast-group edits bring in.

    Every member of a group gets the same background, so it must keep clear of all of them.
    (A member that _make_referable recolours after its edit, which is rare, may show one more.)
    """
    colours = [_object_rgb(obj, config) for obj in objects]
    return colours + [
        _object_rgb(replace(objects[k], colour=value), config)
        for k, attribute, value in edits
        if attribute == "colour"
    ]


def _build_scene(index: int, split: str, config: SyntheticConfig) -> _Scene:
    _check_split(split)
    _check_int("index", index, minimum=0)
    # Members of a contrast group share their scene's random streams: the same layout, look,
    # background and caption structure, until the member's own edit.
    group, member = divmod(int(index), config.contrast_group)
    layout_rng, text_rng, background_rng, style_rng = _sample_rngs(
        config, split, int(index) if config.contrast_group == 1 else group
    )
    combinations = split_combinations(split, config)
    objects = _styled(_sample_layout(combinations, config, layout_rng), config, style_rng)
    # Drawn after the styling, from its stream, so that a share of 0 changes no other draw.
    share = config.shape_caption_share
    shapes_alone = share >= 1 or (share > 0 and style_rng.random() < share)
    masks = [_render(obj, config.supersample) for obj in objects]
    _make_referable(objects, masks, combinations, config, layout_rng)
    edits = []
    if config.contrast_group > 1:
        edits = _contrast_edits(objects, combinations, config, split, group)
    colours = _group_colours(objects, edits[: config.contrast_group - 1], config)
    if member > 0:
        k, attribute, value = edits[(member - 1) % len(edits)]
        objects[k] = replace(objects[k], **{attribute: value})
        masks[k] = _render(objects[k], config.supersample)
        _make_referable(objects, masks, combinations, config, layout_rng)

    # Objects are stored in the order the caption mentions them.
    order = [int(k) for k in text_rng.permutation(len(objects))]
    objects = [objects[k] for k in order]
    masks = [masks[k] for k in order]
    boxes = [mask.bbox for mask in masks]

    background, backdrop = _choose_background(config, colours, background_rng)
    caption, spans, relations = _compose_caption(
        objects, boxes, _background_words(background, backdrop), config, text_rng, shapes_alone
    )
    expressions = []
    for k in range(len(objects)):
        options = _minimal_descriptions(k, objects, boxes)
        choice = options[int(text_rng.integers(len(options)))]
        expressions.append({"text": _word(choice, objects), "object_index": k})
    return _Scene(
        index=int(index),
        split=split,
        objects=objects,
        masks=masks,
        background=background,
        backdrop=backdrop,
        caption=caption,
        spans=spans,
        relations=relations,
        referring_expressions=expressions,
        background_rng=background_rng,
    )


def _objects_record(scene: _Scene) -> dict[str, list[Any]]:
    objects = scene.objects
    return {
        "bbox": [list(mask.bbox) for mask in scene.masks],
        "area": [mask.area for mask in scene.masks],
        "category": [obj.shape for obj in objects],
        "colour": [obj.colour for obj in objects],
        "size": [obj.size for obj in objects],
        "name": [f"{obj.size} {obj.colour} {obj.shape}" for obj in objects],
        "phrase": [scene.caption[slice(*scene.spans[k])] for k in range(len(objects))],
        "phrase_span": [list(scene.spans[k]) for k in range(len(objects))],
    }


def generate_sample(
    index: int, split: str = "train", config: SyntheticConfig | None = None
) -> dict[str, Any]:
    """Generate sample ``index`` of ``split``; identical in every process and run.

    Returns:
        A dict with ``image`` (RGB ``PIL.Image``), ``image_id`` (= ``index``), ``split``,
        ``width``, ``height``, ``caption``, ``background``, ``objects`` (columns ``bbox``
        ``[x, y, w, h]``, ``area``, ``category``, ``colour``, ``size``, ``name``, ``phrase``,
        ``phrase_span`` with ``caption[start:end] == phrase``), ``referring_expressions``
        (``{"text", "object_index"}`` per object) and ``relations`` (``{"subject",
        "predicate", "object"}`` stated in the caption; predicate is one of ``left``,
        ``right``, ``above``, ``below``).
    """
    config = config or SyntheticConfig()
    scene = _build_scene(index, split, config)
    size = config.image_size
    if scene.backdrop is None:
        background = render_background(scene.background, size, scene.background_rng)
    else:
        background = render_varied_background(scene.backdrop, size)
    colours = [_object_rgb(obj, config) for obj in scene.objects]
    return {
        "image": composite(background, scene.masks, colours),
        "image_id": scene.index,
        "split": split,
        "width": size,
        "height": size,
        "caption": scene.caption,
        "background": scene.background,
        "objects": _objects_record(scene),
        "referring_expressions": scene.referring_expressions,
        "relations": scene.relations,
    }


def iter_samples(
    split: str = "train",
    config: SyntheticConfig | None = None,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield samples ``start, start + 1, ...`` up to ``stop`` (forever when ``stop`` is None)."""
    _check_split(split)
    config = config or SyntheticConfig()
    _check_int("start", start, minimum=0)
    indices = itertools.count(start) if stop is None else range(start, stop)
    return (generate_sample(index, split, config) for index in indices)


def training_captions(
    num_samples: int,
    config: SyntheticConfig | None = None,
    split: str = "train",
    include_referring_expressions: bool = True,
) -> Iterator[str]:
    """Caption text (and referring expressions) of the first ``num_samples`` samples.

    Skips pixel rendering, so it is cheap enough to feed a tokenizer trainer.
    """
    config = config or SyntheticConfig()
    for index in range(num_samples):
        scene = _build_scene(index, split, config)
        yield scene.caption
        if include_referring_expressions:
            yield from (expression["text"] for expression in scene.referring_expressions)


# --------------------------------------------------------------------------------------------
# Hugging Face datasets


def dataset_features() -> datasets.Features:
    """Features of :func:`build_dataset` rows (the same layout as :func:`generate_sample`)."""
    string, int32 = datasets.Value("string"), datasets.Value("int32")
    return datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": datasets.Value("int64"),
            "split": string,
            "width": int32,
            "height": int32,
            "caption": string,
            "background": string,
            # Sequence of a dict = dict of lists: the usual HF object-detection layout.
            "objects": datasets.Sequence(
                {
                    "bbox": datasets.List(datasets.Value("float32"), length=4),
                    "area": datasets.Value("float32"),
                    "category": string,
                    "colour": string,
                    "size": string,
                    "name": string,
                    "phrase": string,
                    "phrase_span": datasets.List(int32, length=2),
                }
            ),
            "referring_expressions": datasets.List({"text": string, "object_index": int32}),
            "relations": datasets.List({"subject": int32, "predicate": string, "object": int32}),
        }
    )


def _generate_rows(
    split: str, config: SyntheticConfig, ranges: list[tuple[int, int]]
) -> Iterator[dict[str, Any]]:
    for start, stop in ranges:
        for sample in iter_samples(split, config, start, stop):
            yield _with_png_image(sample)


def _with_png_image(sample: dict[str, Any]) -> dict[str, Any]:
    return {**sample, "image": _png_value(sample["image"])}


def _png_value(image: Image.Image) -> dict[str, Any]:
    """Encode as a ``datasets.Image`` value ourselves: compress_level=1 halves the encoding time
    of the default level (PNG is lossless either way) and the noisy images even get smaller."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return {"bytes": buffer.getvalue(), "path": None}


def _stream_rows(
    split: str,
    config: SyntheticConfig,
    shards: list[int],
    num_shards: int,
    start: int,
    stop: int | None,
) -> Iterator[dict[str, Any]]:
    # datasets calls this once per shard (a one-element list) and deals shards out to
    # DataLoader workers and processes; shard k holds blocks k, k + num_shards, ... of
    # `contrast_group` consecutive indices, so that a contrast group never straddles two shards.
    block = max(1, config.contrast_group)
    for shard in shards:
        blocks = (
            itertools.count(shard, num_shards)
            if stop is None
            else range(shard, -(-(stop - start) // block), num_shards)
        )
        for first in blocks:
            end = start + (first + 1) * block
            for index in range(start + first * block, end if stop is None else min(end, stop)):
                yield _with_png_image(generate_sample(index, split, config))


def _source_digest() -> str:
    """Digest of this package's generation code and background photos, so cached datasets go
    stale when either changes."""
    digest = hashlib.sha256()
    for module in ("shapes.py", "appearance.py", "synthetic.py"):
        digest.update((Path(__file__).parent / module).read_bytes())
    for photo in sorted(PHOTO_DIR.glob("*.png")):
        digest.update(photo.read_bytes())
    return digest.hexdigest()


def build_dataset(
    split: str,
    num_samples: int,
    config: SyntheticConfig | None = None,
    *,
    start: int = 0,
    num_proc: int | None = None,
    cache_dir: str | Path | None = None,
) -> datasets.Dataset:
    """Materialise samples ``start .. start + num_samples - 1`` of ``split`` as a ``Dataset``.

    Rows equal :func:`generate_sample` output (images stored as PNG). Results are cached by
    ``datasets`` under a fingerprint of the arguments and of the generator source code.

    Args:
        split: One of :data:`SPLITS`.
        num_samples: Number of rows (>= 1).
        config: Generation settings; defaults to ``SyntheticConfig()``.
        start: Index of the first sample.
        num_proc: Worker processes; each generates a contiguous block of indices.
        cache_dir: Where ``datasets`` writes the Arrow files (default: its own cache).
    """
    _check_split(split)
    _check_int("num_samples", num_samples, minimum=1)
    _check_int("start", start, minimum=0)
    config = config or SyntheticConfig()
    blocks = min(num_proc or 1, num_samples)
    bounds = np.linspace(start, start + num_samples, blocks + 1).round().astype(int)
    ranges = [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
    key = json.dumps([_source_digest(), repr(config), split, start, num_samples])
    return datasets.Dataset.from_generator(
        _generate_rows,
        features=dataset_features(),
        gen_kwargs={"split": split, "config": config, "ranges": ranges},
        num_proc=num_proc if blocks > 1 else None,
        cache_dir=str(cache_dir) if cache_dir is not None else None,
        fingerprint=hashlib.sha256(key.encode()).hexdigest()[:32],
        split=datasets.NamedSplit(split),
    )


def build_iterable_dataset(
    split: str = "train",
    config: SyntheticConfig | None = None,
    *,
    start: int = 0,
    stop: int | None = None,
    num_shards: int = 1,
) -> datasets.IterableDataset:
    """Stream samples ``start, start + 1, ...`` (forever when ``stop`` is None).

    ``num_shards > 1`` splits the indices into ``num_shards`` interleaved shards (shard ``k``
    holds ``start + k, start + k + num_shards, ...``; with contrast groups, whole groups) so that
    ``DataLoader`` workers and processes (accelerate shards a stream by process) each generate
    different samples; set it to the number of consumers. Read in a single process, shards come one after another, so
    an infinite stream (``stop=None``) with several shards only ever yields shard 0.
    """
    _check_split(split)
    _check_int("start", start, minimum=0)
    _check_int("num_shards", num_shards, minimum=1)
    config = config or SyntheticConfig()
    return datasets.IterableDataset.from_generator(
        _stream_rows,
        features=dataset_features(),
        gen_kwargs={
            "split": split,
            "config": config,
            "shards": list(range(num_shards)),
            "num_shards": num_shards,
            "start": start,
            "stop": stop,
        },
        split=datasets.NamedSplit(split),
    )


# --------------------------------------------------------------------------------------------
# COCO export


def _file_name(sample: Mapping[str, Any]) -> str:
    return f"{sample.get('split', 'synthetic')}_{int(sample['image_id']):08d}.png"


def _write_image(image: Any, path: Path) -> None:
    if isinstance(image, Image.Image):
        image.save(path, format="PNG")
    elif isinstance(image, Mapping) and image.get("bytes"):
        path.write_bytes(image["bytes"])  # undecoded datasets.Image value (already PNG)
    else:
        raise TypeError(f"cannot write image of type {type(image).__name__} to {path}")


def to_coco(
    samples: Iterable[Mapping[str, Any]], image_dir: str | Path | None = None
) -> dict[str, Any]:
    """COCO detection annotations for samples (from :func:`generate_sample` or a ``Dataset``).

    Category ids are :data:`SHAPE_CATEGORY_IDS`; annotation ids count from 1; ``area`` is the
    rendered shape's pixel coverage. Extra per-annotation keys (``colour``, ``size``, ``name``)
    are ignored by ``pycocotools``.

    Args:
        samples: Samples or dataset rows.
        image_dir: If given, each image is written there as PNG under its ``file_name``.
    """
    if isinstance(samples, datasets.Dataset) and image_dir is None:
        samples = samples.remove_columns("image")  # skip decoding pixels nobody needs
    directory = Path(image_dir) if image_dir is not None else None
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for sample in samples:
        file_name = _file_name(sample)
        image_id = int(sample["image_id"])
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": int(sample["width"]),
                "height": int(sample["height"]),
            }
        )
        if directory is not None:
            _write_image(sample["image"], directory / file_name)
        objects = sample["objects"]
        for k, category in enumerate(objects["category"]):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": SHAPE_CATEGORY_IDS[category],
                    "bbox": [float(v) for v in objects["bbox"][k]],
                    "area": float(objects["area"][k]),
                    "iscrowd": 0,
                    "colour": objects["colour"][k],
                    "size": objects["size"][k],
                    "name": objects["name"][k],
                }
            )
    categories = [
        {"id": category_id, "name": shape, "supercategory": "shape"}
        for shape, category_id in SHAPE_CATEGORY_IDS.items()
    ]
    return {
        "info": {"description": "loupe-hf synthetic shapes benchmark"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def save_coco_json(coco: Mapping[str, Any], path: str | Path) -> Path:
    """Write a COCO dict (see :func:`to_coco`) as JSON, creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco))
    return path
