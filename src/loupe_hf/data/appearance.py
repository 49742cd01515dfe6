"""The ``"varied"`` look of the synthetic benchmark (issue 14): backgrounds, colours and poses.

The ``"classic"`` look (dark grey textures from ``shapes.py``, the exact palette colours, upright
shapes) taught a model those pixels rather than the words: it broke on other drawing code. With
``SyntheticConfig(appearance="varied")`` the scenes and words stay, and the pixels change:

* backgrounds (:data:`VARIED_BACKGROUNDS`): the classic textures plus a linear gradient and crops
  of photos shipped in ``backgrounds/`` (:data:`PHOTOS`), each mapped into a luminance band
  ``[level, level + amplitude]`` anywhere from dark to light, with a mild tint;
* visibility: the band keeps :data:`MIN_LUMINANCE_GAP` levels away from every object's luminance
  (a white star forces a darker background, a blue one a darker or a lighter one);
* colours: each object's palette colour is jittered in HSV within bounds per name
  (:data:`COLOUR_JITTER`) that keep it nearest, in CIELAB, to its own palette colour;
* poses: a mild turn and stretch per object (:func:`object_pose`), limited per shape so that no
  shape looks like another category.

An object's draws are kept as unit numbers (:class:`ObjectStyle`) that mean something only once
combined with its shape and colour, so a contrast-group member that edits one attribute keeps the
rest of the object's look. Sizes stay with the layout, in ``synthetic.py``.
"""

from __future__ import annotations

import colorsys
import itertools
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from loupe_hf.data.shapes import BACKGROUNDS

__all__ = [
    "APPEARANCES",
    "COLOUR_JITTER",
    "MIN_LUMINANCE_GAP",
    "PHOTOS",
    "UPRIGHT",
    "VARIED_BACKGROUNDS",
    "BackgroundSpec",
    "ColourJitter",
    "ObjectStyle",
    "choose_background",
    "jitter_colour",
    "luminance",
    "object_pose",
    "render_varied_background",
]

APPEARANCES: tuple[str, ...] = ("classic", "varied")

VARIED_BACKGROUNDS: tuple[str, ...] = (*BACKGROUNDS, "gradient", "photo")
PHOTOS: tuple[str, ...] = ("camera", "cell", "hubble_deep_field", "retina", "text")
"""Photos in ``backgrounds/`` (CC0 or public domain, see its README). The second renderer's
photos and textures are left out, so that its backgrounds stay unseen in training."""
PHOTO_DIR = Path(__file__).parent / "backgrounds"

MIN_LUMINANCE_GAP = 50.0
"""Least distance in luma levels (0-255) between an object's colour and any background pixel."""

_LUMA = np.array([0.299, 0.587, 0.114])  # Rec. 601 luma of 8-bit sRGB values
# The band normally lies inside _LEVELS; only when the objects leave no room there may it reach
# black or white.
_LEVELS = (20.0, 235.0)
_EXTREME_LEVELS = (0.0, 255.0)
_AMPLITUDES = {
    "plain": (0.0, 0.0),
    "noise": (20.0, 45.0),
    "stripes": (15.0, 45.0),
    "checker": (15.0, 45.0),
    "gradient": (30.0, 90.0),
    "photo": (40.0, 90.0),
}
_MIN_AMPLITUDE = 12.0  # a texture fainter than this hardly shows: it becomes a plain background
_TINT = 12.0
_DARK_UP_TO = 90.0  # a band wholly at or below this is "dark"
_LIGHT_FROM = 165.0  # a band wholly at or above this is "light"
_NOISE_GRAINS = (1, 2, 3)
_PHOTO_CROP = (0.4, 1.0)  # crop side as a fraction of the photo's shorter side
_PHOTO_PERCENTILES = (2.0, 98.0)  # luminance stretch of a crop, robust to a few extreme pixels
_PHOTO_CHROMA = (0.3, 0.8)  # share of a colour photo's chroma kept, on top of its contrast cut

_MAX_TURN = 15.0
_MAX_STRETCH = 1.25
# A square turned 45° is a diamond (and the reverse): at 8° each stays clearly its own
# category (10° already made some diamonds look like tilted squares in the example picture).
_SHAPE_MAX_TURN = {"square": 8.0, "diamond": 8.0}
# A square stretched by 1.25 reads as a rectangle, which no caption names.
_SHAPE_MAX_STRETCH = {"square": 1.08}


# --------------------------------------------------------------------------------------------
# Objects


@dataclass(frozen=True)
class ObjectStyle:
    """One object's look as unit draws in ``[-1, 1]``; 0 everywhere is the classic look.

    ``turn`` and ``stretch`` become a pose (:func:`object_pose`) and ``hue``, ``saturation`` and
    ``value`` a colour (:func:`jitter_colour`) only together with the object's shape and colour.
    """

    turn: float = 0.0
    stretch: float = 0.0
    hue: float = 0.0
    saturation: float = 0.0
    value: float = 0.0

    @classmethod
    def draw(cls, rng: np.random.Generator) -> ObjectStyle:
        return cls(*(float(unit) for unit in rng.uniform(-1.0, 1.0, size=5)))


UPRIGHT = ObjectStyle()


def object_pose(shape: str, style: ObjectStyle) -> tuple[float, float]:
    """``(turn in degrees, aspect)`` of a shape, for :func:`loupe_hf.data.shapes.rasterize_shape`."""
    turn = style.turn * _SHAPE_MAX_TURN.get(shape, _MAX_TURN)
    aspect = _SHAPE_MAX_STRETCH.get(shape, _MAX_STRETCH) ** style.stretch
    return turn, aspect


@dataclass(frozen=True)
class ColourJitter:
    """Ranges added to a palette colour's HSV coordinates: hue in degrees, saturation and value
    in ``[0, 1]`` units (results clipped to ``[0, 1]``)."""

    hue: tuple[float, float]
    saturation: tuple[float, float]
    value: tuple[float, float]


# Bounds per name, tuned so that every colour inside them is at least 10 CIELAB ΔE nearer to its
# own palette colour than to any other (see the tests). They are lopsided where a neighbour lies
# on one side: red darkens little (brown), orange shifts little in hue (red, yellow), blue turns
# little towards purple. White has no hue of its own: it gets a faint tint of any hue.
COLOUR_JITTER: dict[str, ColourJitter] = {
    "red": ColourJitter((-8, 6), (-0.12, 0.12), (-0.05, 0.12)),
    "green": ColourJitter((-12, 12), (-0.15, 0.15), (-0.15, 0.15)),
    "blue": ColourJitter((-8, 5), (-0.08, 0.10), (-0.06, 0.08)),
    "yellow": ColourJitter((-4, 6), (-0.15, 0.12), (-0.08, 0.04)),
    "purple": ColourJitter((-4, 8), (-0.10, 0.10), (-0.06, 0.15)),
    "orange": ColourJitter((-4, 4), (-0.10, 0.10), (-0.06, 0.02)),
    "pink": ColourJitter((-8, 8), (-0.12, 0.12), (-0.12, 0.02)),
    "cyan": ColourJitter((-10, 8), (-0.15, 0.12), (-0.15, 0.10)),
    "brown": ColourJitter((-5, 5), (-0.12, 0.12), (-0.05, 0.10)),
    "white": ColourJitter((-180, 180), (0.0, 0.10), (-0.10, 0.02)),
}


def _lerp(bounds: tuple[float, float], unit: float) -> float:
    low, high = bounds
    return low + (unit + 1.0) / 2.0 * (high - low)


def jitter_colour(
    rgb: tuple[int, int, int], jitter: ColourJitter, style: ObjectStyle
) -> tuple[float, float, float]:
    """``rgb`` moved inside ``jitter``'s bounds as far as the style's unit draws say."""
    hue, saturation, value = colorsys.rgb_to_hsv(*(channel / 255.0 for channel in rgb))
    hue = (hue + _lerp(jitter.hue, style.hue) / 360.0) % 1.0
    saturation = min(max(saturation + _lerp(jitter.saturation, style.saturation), 0.0), 1.0)
    value = min(max(value + _lerp(jitter.value, style.value), 0.0), 1.0)
    return tuple(255.0 * channel for channel in colorsys.hsv_to_rgb(hue, saturation, value))


def luminance(rgb: tuple[float, float, float] | np.ndarray) -> float | np.ndarray:
    """Rec. 601 luma of 8-bit RGB values (last axis), in levels 0-255."""
    return np.asarray(rgb, dtype=np.float64) @ _LUMA


# --------------------------------------------------------------------------------------------
# Backgrounds: the band


@dataclass(frozen=True)
class BackgroundSpec:
    """A varied background before its pixels: chosen with the scene, so captions can name its
    tone without rendering, and drawn by :func:`render_varied_background`.

    Every pixel's luminance lies in ``[level, level + amplitude]``; the tint and a colour
    photo's chroma add colour without changing luminance (up to clipping at 0 and 255).
    """

    kind: str
    level: float
    amplitude: float
    tint: tuple[float, float, float]
    pattern_seed: int

    @property
    def tone(self) -> str | None:
        """``"dark"`` or ``"light"`` when the whole band is; ``None`` in between."""
        if self.level + self.amplitude <= _DARK_UP_TO:
            return "dark"
        if self.level >= _LIGHT_FROM:
            return "light"
        return None


def _free_zones(luminances: list[float], low: float, high: float) -> list[tuple[float, float]]:
    """Parts of ``[low, high]`` at least :data:`MIN_LUMINANCE_GAP` from every luminance."""
    zones = [(low, high)]
    for y in luminances:
        blocked = (y - MIN_LUMINANCE_GAP, y + MIN_LUMINANCE_GAP)
        zones = [
            part
            for a, b in zones
            for part in ((a, min(b, blocked[0])), (max(a, blocked[1]), b))
            if part[0] <= part[1]
        ]
    return zones


def _farthest_level(luminances: list[float]) -> float:
    """The level in [0, 255] farthest from every luminance (when no level is far enough)."""
    ordered = sorted(luminances)
    candidates = [0.0, 255.0, *((a + b) / 2 for a, b in itertools.pairwise(ordered))]
    return max(candidates, key=lambda level: min(abs(level - y) for y in luminances))


def _neutral_tint(rng: np.random.Generator) -> tuple[float, float, float]:
    tint = rng.uniform(-_TINT, _TINT, size=3)
    return tuple(float(v) for v in tint - luminance(tint))  # zero luma: the band stays put


def choose_background(
    kind: str, object_colours: list[tuple[float, float, float]], rng: np.random.Generator
) -> BackgroundSpec:
    """A background of ``kind`` (one of :data:`VARIED_BACKGROUNDS`) whose band keeps clear of
    every object colour's luminance.

    The band lies in levels 20-235 when the objects leave room, else anywhere in 0-255; its
    amplitude shrinks to the room there is, and a texture with too little room becomes plain.
    The number of draws from ``rng`` does not depend on the colours.
    """
    if kind not in _AMPLITUDES:
        raise ValueError(f"unknown background {kind!r}; expected one of {VARIED_BACKGROUNDS}")
    amplitude = float(rng.uniform(*_AMPLITUDES[kind]))
    tint = _neutral_tint(rng)
    pattern_seed = int(rng.integers(2**63))
    pick, offset = rng.random(2)
    luminances = [float(luminance(colour)) for colour in object_colours]
    needed = min(amplitude, _MIN_AMPLITUDE)
    zones = [z for z in _free_zones(luminances, *_LEVELS) if z[1] - z[0] >= needed]
    zones = zones or _free_zones(luminances, *_EXTREME_LEVELS)
    if not zones:
        return BackgroundSpec("plain", _farthest_level(luminances), 0.0, tint, pattern_seed)
    room = max(b - a for a, b in zones)
    if room < needed:
        kind, amplitude = "plain", 0.0
    amplitude = min(amplitude, room)
    # Among the zones that fit the band, pick one by its slack (plus one level, so a zone that
    # fits exactly is possible too), then a level uniformly within it.
    fitting = [(a, b - amplitude) for a, b in zones if b - a >= amplitude]
    weights = np.array([b - a + 1.0 for a, b in fitting])
    chosen = int(np.searchsorted(np.cumsum(weights) / weights.sum(), pick, side="right"))
    a, b = fitting[min(chosen, len(fitting) - 1)]
    return BackgroundSpec(kind, a + offset * (b - a), amplitude, tint, pattern_seed)


# --------------------------------------------------------------------------------------------
# Backgrounds: patterns in [0, 1]


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:size, 0:size].astype(np.float32)


def _along(size: int, angle: float) -> np.ndarray:
    rows, cols = _grid(size)
    return cols * math.cos(angle) + rows * math.sin(angle)


def _plain(size: int, rng: np.random.Generator) -> np.ndarray:
    return np.zeros((size, size), dtype=np.float32)


def _noise(size: int, rng: np.random.Generator) -> np.ndarray:
    grain = int(rng.choice(_NOISE_GRAINS))
    cells = -(-size // grain)
    noise = rng.normal(0.5, 0.25, size=(cells, cells)).astype(np.float32)
    return np.clip(noise.repeat(grain, 0).repeat(grain, 1)[:size, :size], 0.0, 1.0)


def _stripes(size: int, rng: np.random.Generator) -> np.ndarray:
    half_period = rng.uniform(3.0, 8.0)  # finer turned stripes alias into moiré
    coordinate = _along(size, rng.uniform(0.0, math.pi)) + rng.uniform(0.0, 2 * half_period)
    return (np.floor(coordinate / half_period) % 2).astype(np.float32)


def _checker(size: int, rng: np.random.Generator) -> np.ndarray:
    cell = rng.uniform(4.0, 12.0)
    angle = rng.uniform(0.0, math.pi / 2)
    u = _along(size, angle) + rng.uniform(0.0, 2 * cell)
    v = _along(size, angle + math.pi / 2) + rng.uniform(0.0, 2 * cell)
    return ((np.floor(u / cell) + np.floor(v / cell)) % 2).astype(np.float32)


def _gradient(size: int, rng: np.random.Generator) -> np.ndarray:
    coordinate = _along(size, rng.uniform(0.0, 2 * math.pi))
    return (coordinate - coordinate.min()) / max(float(np.ptp(coordinate)), 1e-6)


@cache
def _photo(name: str) -> Image.Image:
    # PNG, not JPEG: lossless decoding is the same with every libjpeg, so samples stay a pure
    # function of their index on every machine.
    with Image.open(PHOTO_DIR / f"{name}.png") as image:
        image.load()
        return image.copy()


def _photo_crop(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Luminance pattern and (for colour photos) chroma of a random crop of a random photo,
    both in units of the crop's luminance stretch."""
    photo = _photo(PHOTOS[int(rng.integers(len(PHOTOS)))])
    side = rng.uniform(*_PHOTO_CROP) * min(photo.size)
    left = rng.uniform(0.0, photo.width - side)
    top = rng.uniform(0.0, photo.height - side)
    box = (left, top, left + side, top + side)
    pixels = np.asarray(photo.resize((size, size), Image.Resampling.BILINEAR, box=box))
    pixels = pixels.astype(np.float32)
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    grey = pixels if pixels.ndim == 2 else pixels @ _LUMA.astype(np.float32)
    low, high = np.percentile(grey, _PHOTO_PERCENTILES)
    stretch = max(float(high - low), 1.0)
    pattern = np.clip((grey - low) / stretch, 0.0, 1.0)
    chroma_share = rng.uniform(*_PHOTO_CHROMA)
    if pixels.ndim == 2:
        return pattern, None
    return pattern, (pixels - grey[..., None]) * (chroma_share / stretch)


_PATTERNS = {
    "plain": _plain,
    "noise": _noise,
    "stripes": _stripes,
    "checker": _checker,
    "gradient": _gradient,
}


def render_varied_background(spec: BackgroundSpec, size: int) -> np.ndarray:
    """Render ``spec`` as a ``size`` x ``size`` ``float32`` RGB array in ``[0, 255]``."""
    rng = np.random.default_rng(spec.pattern_seed)
    chroma = None
    if spec.kind == "photo":
        pattern, chroma = _photo_crop(size, rng)
    else:
        pattern = _PATTERNS[spec.kind](size, rng)
    grey = np.float32(spec.level) + np.float32(spec.amplitude) * pattern
    image = grey[..., None] + np.asarray(spec.tint, dtype=np.float32)
    if chroma is not None:
        image += np.float32(spec.amplitude) * chroma  # chroma has zero luma: the band holds
    return np.clip(image, 0.0, 255.0, out=image)
