"""The logic behind the LOUPE Space (`spaces/app.py`), as plain functions that tests can call.

Nothing here imports gradio: the app maps these results onto components, and turns
[`DemoInputError`] into `gr.Error` and each note into `gr.Warning`. Three views:

- **detect**: zero-shot detection of comma-separated labels;
- **ground**: the single best region for a referring expression;
- **explain**: what LOUPE learns from the pair (`loupe_hf.explanation`): the caption's noun phrases,
  the most confident regions with their token-level Shapley interaction (the TSA label) and a
  per-patch interaction map over the photo, the semantics-level region × phrase interaction matrix
  (the FSA label) next to the alignment matrix it trains (softmax over phrases of the scaled
  region–phrase similarities, the paper's Fig. 5 view), and, when the checkpoint has UNSIL, its
  predictions against the sampled interactions.

An image's region encoding is cached (LRU keyed by a hash of its pixels), so changing only the
labels, threshold or top-k scores the new text against the stored regions instead of re-running
the image tower.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import subprocess
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageOps
import torch

from loupe_hf import zero_shot
from loupe_hf.boxes import pixel_boxes
from loupe_hf.explanation import LoupeExplanation, UnsilPredictors, explain_pair, load_unsil
from loupe_hf.image_processing_loupe import LoupeImageError, to_rgb_array
from loupe_hf.modeling_loupe import LoupeForZeroShotDetection, LoupeImageRegions
from loupe_hf.phrases import extract_phrases, spans_or_whole_caption
from loupe_hf.processing_loupe import LoupeProcessor
from loupe_hf.visualization import draw_boxes

MAX_LABELS = 50
MAX_IMAGE_SIDE = 1024
MAX_PHRASES = 12
# Upload caps. Bytes: a 300 MiB upload was once accepted (`app.py` also passes this to gradio's
# `max_file_size`, which refuses it before it is stored). Pixels: a 420 KB PNG of 12000² pixels
# took 1.9 GB to decode, so a file's size is read from its header and checked before decoding.
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_UPLOAD_PIXELS = 40_000_000
# Text caps: labels are names, and a long caption or expression only costs time (the tagger and
# chunker of `extract_phrases` took 6–10 s on a 10,000-word caption) for words the text tower
# would truncate anyway.
MAX_LABEL_CHARS = 100
MAX_TEXT_CHARS = 1000
DEFAULT_CACHE_SIZE = 8
TABLE_HEADERS = ["label", "score", "x0", "y0", "x1", "y1"]
# Small images are drawn enlarged (nearest neighbour) so that box captions stay readable.
DISPLAY_MIN_SIDE = 512
HEATMAP_DPI = 100
# Explain's Shapley estimates: a fixed seed, so the same inputs always give the same picture, and
# enough samples that the tiny model answers in about a second on two CPU cores (README).
EXPLAIN_SEED = 0
EXPLAIN_TOKEN_SAMPLES = 128
EXPLAIN_SEMANTIC_SAMPLES = 128
UNSIL_HEADERS = ["level", "target", "sampled I*", "± stderr", "UNSIL Î", "UNSIL σ", "|Î − I*|"]
OVERLAY_ALPHA = 0.55
LEGEND_HEIGHT = 30

MODE_NAMES = {
    "1": "black-and-white",
    "L": "greyscale",
    "LA": "greyscale with transparency, shown on white",
    "P": "palette",
    "PA": "palette with transparency, shown on white",
    "RGBA": "with transparency, shown on white",
    "I": "32-bit, range stretched",
    "I;16": "16-bit, range stretched",
    "F": "floating-point, range stretched",
}


class DemoInputError(ValueError):
    """An input the demo cannot use; the message is meant for the person using the app."""


# --- inputs ---------------------------------------------------------------------------------------


def prepare_image(image: Any, max_side: int = MAX_IMAGE_SIDE) -> tuple[PIL.Image.Image, list[str]]:
    """An RGB PIL image no larger than `max_side` on its longest side, and notes on what changed.

    Accepts a PIL image of any mode, an `HxW[xC]` array or a path. Raises [`DemoInputError`] when
    there is no image or it cannot be read.
    """
    if image is None:
        raise DemoInputError("Please upload an image (or pick one of the examples) first.")
    if isinstance(image, (str, os.PathLike)):
        image = _open(image)
    notes = []
    mode = image.mode if isinstance(image, PIL.Image.Image) else None
    _check_pixels(*_size_of(image))
    try:
        # The image processor's converter composites transparency on white and stretches 16-bit
        # and float images instead of clipping them: reuse it so the app sees what the model sees.
        rgb = PIL.Image.fromarray(to_rgb_array(image))
    except LoupeImageError as error:
        raise DemoInputError(f"This image cannot be used: {error}.") from error
    if mode is not None and mode != "RGB":
        described = f"{mode}, {MODE_NAMES[mode]}" if mode in MODE_NAMES else mode
        notes.append(f"Converted the image ({described}) to RGB.")
    longest = max(rgb.size)
    if longest > max_side:
        original = rgb.size
        factor = max_side / longest
        rgb = rgb.resize(
            (max(1, round(rgb.width * factor)), max(1, round(rgb.height * factor))),
            PIL.Image.BICUBIC,
        )
        notes.append(
            f"Downscaled the {original[0]}×{original[1]} image to {rgb.width}×{rgb.height} "
            f"(longest side at most {max_side} px); boxes refer to the downscaled image."
        )
    return rgb, notes


def _open(path: str | os.PathLike) -> PIL.Image.Image:
    """The image file at `path`, upright (EXIF orientation applied), after checking its size in
    bytes and, from its header, in pixels, before anything is decoded."""
    if os.path.isdir(path):
        raise DemoInputError(f"{os.fspath(path)!r} is a folder, not an image file.")
    if not os.path.isfile(path):
        raise DemoInputError(f"Could not read the image file {os.fspath(path)!r}: no such file.")
    size = os.path.getsize(path)
    if size > MAX_UPLOAD_BYTES:
        raise DemoInputError(
            f"The image file is {size / 2**20:.1f} MiB; the demo takes files of at most "
            f"{MAX_UPLOAD_BYTES / 2**20:.0f} MiB."
        )
    try:
        with warnings.catch_warnings():
            # PIL warns from 89 megapixels on; the demo's own, lower cap is checked just below.
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as opened:
                _check_pixels(*opened.size)
                opened.load()
                return PIL.ImageOps.exif_transpose(opened)
    except PIL.Image.DecompressionBombError as error:  # PIL refuses from 179 megapixels on
        raise DemoInputError(
            f"The image is far too large ({error}); the demo takes at most "
            f"{MAX_UPLOAD_PIXELS / 1e6:.0f} megapixels. Please downscale it."
        ) from error
    except (OSError, PIL.UnidentifiedImageError) as error:
        raise DemoInputError(f"Could not read the image file {os.fspath(path)!r}.") from error


def _size_of(image: Any) -> tuple[int, int]:
    """(width, height) of a PIL image or an `HxW[xC]` array; (1, 1) for anything else, which the
    image converter then refuses with its own message."""
    if isinstance(image, PIL.Image.Image):
        return image.size
    shape = getattr(image, "shape", None)
    if shape is not None and len(shape) >= 2:
        return int(shape[1]), int(shape[0])
    return 1, 1


def _check_pixels(width: int, height: int) -> None:
    if width * height > MAX_UPLOAD_PIXELS:
        raise DemoInputError(
            f"The image has {width}×{height} pixels ({width * height / 1e6:.0f} megapixels); the "
            f"demo takes at most {MAX_UPLOAD_PIXELS / 1e6:.0f} megapixels. Please downscale it."
        )


def parse_labels(text: str | None, max_labels: int = MAX_LABELS) -> list[str]:
    """Comma- (or newline-) separated labels, trimmed, blanks dropped, duplicates (ignoring case and
    repeated spaces) removed keeping the first spelling. Raises [`DemoInputError`] if none or too many."""
    if text is not None and not isinstance(text, str):
        raise DemoInputError(f"The labels must be text, got {type(text).__name__}.")
    labels: list[str] = []
    seen: set[str] = set()
    for piece in re.split(r"[,\n]", text or ""):
        label = " ".join(piece.split())
        if len(label) > MAX_LABEL_CHARS:
            raise DemoInputError(
                f"The label {label[:30]!r}… is {len(label)} characters long; labels are short "
                f"names of at most {MAX_LABEL_CHARS} characters (separate labels by commas)."
            )
        if label and label.casefold() not in seen:
            seen.add(label.casefold())
            labels.append(label)
    if not labels:
        raise DemoInputError(
            "Please type at least one label, e.g. `cat, red circle, cup` (separate labels by commas)."
        )
    if len(labels) > max_labels:
        raise DemoInputError(
            f"{len(labels)} labels given; the demo scores at most {max_labels} at a time."
        )
    return labels


def require_text(text: str | None, what: str, example: str) -> str:
    """`text` with surrounding and repeated whitespace removed, or a [`DemoInputError`] if blank."""
    if text is not None and not isinstance(text, str):
        raise DemoInputError(f"The {what} must be text, got {type(text).__name__}.")
    cleaned = " ".join((text or "").split())
    if not cleaned:
        raise DemoInputError(f"Please type a {what}, e.g. `{example}`.")
    return cleaned


def shorten_text(text: str, what: str, notes: list[str], limit: int = MAX_TEXT_CHARS) -> str:
    """`text` cut at the last space within its first `limit` characters, and a note saying so, when
    it is longer; the text tower would truncate it anyway, after phrase extraction had spent
    seconds on words that are never used."""
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0] or text[:limit]
    notes.append(
        f"The {what} has {len(text)} characters; only its first {len(cut)} are used "
        f"(at most {limit})."
    )
    return cut


def _number(value: Any, what: str, expected: str) -> float:
    """`value` as a finite float, or a [`DemoInputError`] naming `what` and what was `expected`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise DemoInputError(f"{what} must be {expected}, got {value!r}.")
    return number


def _check_threshold(threshold: float | None) -> float:
    if threshold is None:
        return 0.0
    threshold = _number(threshold, "The score threshold", "a number between 0 and 1")
    if not 0.0 <= threshold <= 1.0:
        raise DemoInputError(f"The score threshold must be between 0 and 1, got {threshold}.")
    return threshold


def _check_count(value: float | None, what: str) -> int:
    number = None if value is None else _number(value, what, "a whole number, at least 1")
    if number is None or number < 1:
        raise DemoInputError(f"{what} must be at least 1, got {value}.")
    return int(number)


# --- the feature cache ------------------------------------------------------------------------------


def image_key(image: PIL.Image.Image) -> str:
    """Cache key of an image: a hash of its mode, size and pixel bytes."""
    digest = hashlib.blake2b(image.tobytes(), digest_size=16)
    digest.update(f"{image.mode}:{image.width}x{image.height}".encode())
    return digest.hexdigest()


class RegionCache:
    """A small thread-safe LRU cache of image region encodings, counting hits and misses.

    Gradio runs handlers in worker threads, so the dictionary is guarded by a lock; the encoding
    itself runs outside the lock (two simultaneous misses on one image just compute it twice).
    """

    def __init__(self, max_size: int = DEFAULT_CACHE_SIZE):
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.max_size = max_size
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, LoupeImageRegions] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get_or_compute(
        self, key: str, compute: Callable[[], LoupeImageRegions]
    ) -> tuple[LoupeImageRegions, bool]:
        """The entry for `key` (computing and storing it on a miss), and whether it was a hit."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key], True
            self.misses += 1
        value = compute()
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_size:
                self._entries.popitem(last=False)
        return value, False

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "entries": len(self),
            "max_size": self.max_size,
        }

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0


# --- results ----------------------------------------------------------------------------------------


@dataclass
class DetectResult:
    """`image`: the input with labelled boxes; `table`: rows of `TABLE_HEADERS`; `detections`: the
    JSON-able raw result (boxes in pixels of the prepared image); `notes`: messages for the user."""

    image: PIL.Image.Image
    table: list[list[Any]]
    detections: dict[str, Any]
    notes: list[str] = field(default_factory=list)


@dataclass
class GroundResult:
    """`image`: the input with the best box; `score`: its sigmoid score; `grounding`: JSON-able result."""

    image: PIL.Image.Image
    score: float
    grounding: dict[str, Any]
    notes: list[str] = field(default_factory=list)


@dataclass
class ExplainResult:
    """`highlighted`: `(text, phrase label or None)` pieces covering the caption; `regions_image`: the
    top regions drawn with their confidences; `interaction_image`: the per-patch token-level
    interaction map over the photo with the regions' interactions; `matrices`: the alignment and
    semantic interaction matrices side by side; `unsil_table`: rows of `UNSIL_HEADERS` (empty
    without UNSIL) and `unsil_message` saying what they are or why there are none; `explanation`:
    all of it as JSON."""

    highlighted: list[tuple[str, str | None]]
    regions_image: PIL.Image.Image
    interaction_image: PIL.Image.Image
    matrices: PIL.Image.Image
    unsil_table: list[list[Any]]
    unsil_message: str
    explanation: dict[str, Any]
    notes: list[str] = field(default_factory=list)


# --- the demo -----------------------------------------------------------------------------------------


class LoupeDemo:
    """A detector and its processor, with a region cache, behind the three views of the Space;
    `unsil` holds the checkpoint's UNSIL predictors (None without), `unsil_problem` why they could
    not be read, if so."""

    def __init__(
        self,
        detector: LoupeForZeroShotDetection,
        processor: LoupeProcessor,
        cache_size: int = DEFAULT_CACHE_SIZE,
        unsil: UnsilPredictors | None = None,
        unsil_problem: str | None = None,
    ):
        self.detector = detector.eval()
        self.processor = processor
        self.cache = RegionCache(cache_size)
        self.unsil = unsil
        self.unsil_problem = unsil_problem

    @classmethod
    def from_pretrained(cls, checkpoint: str | os.PathLike, **kwargs: Any) -> LoupeDemo:
        """Loads the detector and processor from a local directory or a Hub id, and the UNSIL
        predictors when the checkpoint has them (the detector itself drops them by design)."""
        detector = LoupeForZeroShotDetection.from_pretrained(checkpoint)
        try:
            kwargs.setdefault("unsil", load_unsil(checkpoint, detector.config))
        except ValueError as error:  # damaged UNSIL weights: the rest of the demo still works
            kwargs.setdefault("unsil_problem", str(error))
        return cls(detector, LoupeProcessor.from_pretrained(checkpoint), **kwargs)

    # --- shared steps ---
    def encode(self, image: PIL.Image.Image) -> tuple[LoupeImageRegions, bool]:
        """Region encoding of a prepared image (from the cache when seen before), and whether it hit."""

        def compute() -> LoupeImageRegions:
            return zero_shot.encode_images(self.detector, self.processor, [image])

        return self.cache.get_or_compute(image_key(image), compute)

    # --- detect ---
    @torch.inference_mode()
    def detect(
        self,
        image: Any,
        labels: str | Sequence[str] | None,
        threshold: float | None = 0.1,
        top_k: float | None = 10,
    ) -> DetectResult:
        """Zero-shot detection of `labels` (a comma-separated string or a list) in `image`."""
        image, notes = prepare_image(image)
        if isinstance(labels, (list, tuple)):
            if not all(isinstance(label, str) for label in labels):
                raise DemoInputError("The labels must be text (a list of strings).")
            labels = ",".join(labels)
        names = parse_labels(labels)
        threshold, top_k = _check_threshold(threshold), _check_count(top_k, "Top-k")
        regions, hit = self.encode(image)
        text_embeds = zero_shot.encode_queries(
            self.detector, self.processor, names, apply_prompt_template=True
        )
        found = zero_shot.detect_in_regions(
            self.detector,
            self.processor,
            regions,
            text_embeds,
            names,
            [(image.height, image.width)],
            threshold=threshold,
            top_k=top_k,
        )[0]
        detections = [
            {"label": label, "score": float(score), "box": [float(v) for v in box]}
            for label, score, box in zip(
                found["text_labels"], found["scores"].tolist(), found["boxes"].tolist(), strict=True
            )
        ]
        if not detections:
            notes.append(f"Nothing scored above the threshold {threshold:g}; try lowering it.")
        drawn = _draw(image, boxes_to_draw(detections))
        table = [
            [d["label"], round(d["score"], 4), *(round(v, 1) for v in d["box"])] for d in detections
        ]
        raw = {
            "image_size": [image.width, image.height],
            "labels": names,
            "threshold": threshold,
            "top_k": top_k,
            "detections": detections,
            "cache_hit": hit,
            "notes": notes,
        }
        return DetectResult(drawn, table, raw, notes)

    # --- ground ---
    @torch.inference_mode()
    def ground(self, image: Any, expression: str | None) -> GroundResult:
        """The single region that best matches a referring expression (scored as written, no prompt)."""
        image, notes = prepare_image(image)
        expression = require_text(expression, "referring expression", "the red star")
        expression = shorten_text(expression, "referring expression", notes)
        regions, hit = self.encode(image)
        text_embeds = zero_shot.encode_queries(
            self.detector, self.processor, [expression], apply_prompt_template=False
        )
        found = zero_shot.ground_in_regions(
            self.detector, self.processor, regions, text_embeds, [(image.height, image.width)]
        )[0]
        box, score, best = [float(v) for v in found["box"]], found["score"], found["region_index"]
        drawn = _draw(image, [{"label": expression, "score": score, "box": box}])
        raw = {
            "image_size": [image.width, image.height],
            "expression": expression,
            "box": box,
            "score": score,
            "region_index": best,
            "cache_hit": hit,
            "notes": notes,
        }
        return GroundResult(drawn, score, raw, notes)

    # --- explain ---
    @torch.inference_mode()
    def explain(
        self, image: Any, caption: str | None, num_regions: float | None = 5
    ) -> ExplainResult:
        """What LOUPE learns from this image and caption: phrases, the `num_regions` most confident
        regions with their token-level interactions, the per-patch interaction map, the region ×
        phrase alignment and semantic interaction matrices, and UNSIL against the sampled values."""
        image, notes = prepare_image(image)
        caption = require_text(caption, "caption", "a small red star left of a large blue circle")
        caption = shorten_text(caption, "caption", notes)  # before phrase extraction
        num_regions = _check_count(num_regions, "The number of regions")
        spans, phrase_notes = caption_phrases(caption)
        notes += phrase_notes
        regions, hit = self.encode(image)
        inputs, spans = self._pair_inputs(image, caption, spans, notes)
        explanation = explain_pair(
            self.detector.loupe,
            inputs["pixel_values"],
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs["phrase_masks"],
            patch_tokens=regions.patch_tokens,  # the cached image encoding
            num_regions=num_regions,
            token_samples=EXPLAIN_TOKEN_SAMPLES,
            semantic_samples=EXPLAIN_SEMANTIC_SAMPLES,
            seed=EXPLAIN_SEED,
            unsil=self.unsil,
        )
        phrases = [caption[start:end] for start, end in spans]
        on_image = self.detector.loupe.grid_to_image(explanation.boxes)
        shown = _region_rows(explanation, on_image, (image.height, image.width))
        unsil_table = unsil_rows(explanation, [r["name"] for r in shown])
        unsil_message = self._unsil_message()
        raw = {
            "image_size": [image.width, image.height],
            "caption": caption,
            "phrases": [{"text": p, "span": list(s)} for p, s in zip(phrases, spans, strict=True)],
            "regions": shown,
            "alignment": explanation.alignment.tolist(),
            "best_phrase": [phrases[int(i)] for i in explanation.alignment.argmax(dim=-1)],
            "semantic_interactions": explanation.semantic_interactions.tolist(),
            "semantic_stderr": explanation.semantic_stderr.tolist(),
            "patch_map": explanation.patch_map.tolist(),
            "sampling": {
                "token_samples": explanation.token_samples,
                "semantic_samples": explanation.semantic_samples,
                "estimator": self.detector.config.shapley_estimator,
                "seed": explanation.seed,
            },
            "unsil": _unsil_json(self.unsil, unsil_table),
            "unsil_message": unsil_message,
            "cache_hit": hit,
            "notes": notes,
        }
        return ExplainResult(
            highlight_phrases(caption, spans),
            *_explain_pictures(image, explanation, shown, phrases),
            unsil_table,
            unsil_message,
            raw,
            notes,
        )

    def _pair_inputs(
        self, image: PIL.Image.Image, caption: str, spans: list[tuple[int, int]], notes: list[str]
    ) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
        """The processed pair, without the phrases the tokenizer truncated away (and their spans)."""
        inputs = self.processor(images=[image], text=[caption], phrase_spans=[spans])
        inputs = inputs.to(self.detector.device)
        masks = inputs["phrase_masks"][0]
        kept = [index for index in range(len(spans)) if masks[index].any()]
        if not kept:
            raise DemoInputError("The caption is too long for the model; please shorten it.")
        if len(kept) < len(spans):
            notes.append(
                f"{len(spans) - len(kept)} phrase(s) lie beyond the model's text length and were dropped."
            )
        inputs["phrase_masks"] = inputs["phrase_masks"][:, kept]
        return dict(inputs), [spans[index] for index in kept]

    def _unsil_message(self) -> str:
        """What the UNSIL table shows, or plainly why there is none."""
        if self.unsil is None:
            reason = self.unsil_problem or (
                "its weights hold no `token_unsil` / `semantic_unsil` tensors, as a checkpoint "
                "saved for detection only does"
            )
            return (
                f"**No UNSIL in this checkpoint**: {reason}. Every interaction shown is sampled "
                "(Monte-Carlo Shapley estimates), none predicted."
            )
        message = (
            f"**UNSIL** (trained {self.unsil.training_steps} pre-training steps) predicts each "
            "target's interaction Î and its uncertainty σ; pre-training samples a target's label "
            "when u ~ U(0, 1) ≤ σ and takes Î otherwise. Below, Î and σ next to the sampled I* of "
            "the same targets."
        )
        missing = [level for level in ("token", "semantic") if level not in self.unsil.levels]
        for level in missing:
            message += (
                f" The {level} level has no UNSIL predictor (the config's `unsil_levels`): its "
                "labels are always sampled."
            )
        return message


def caption_phrases(
    caption: str, max_phrases: int = MAX_PHRASES
) -> tuple[list[tuple[int, int]], list[str]]:
    """The caption's first `max_phrases` noun-phrase spans, or the whole caption as one phrase when
    it has none, and notes saying which of these happened."""
    spans = [(int(start), int(end)) for start, end in extract_phrases(caption)]
    if len(spans) > max_phrases:
        note = f"The caption has {len(spans)} noun phrases; the first {max_phrases} are shown."
        return spans[:max_phrases], [note]
    if spans:
        return spans, []
    whole = [(int(start), int(end)) for start, end in spans_or_whole_caption(caption, [])]
    return whole, ["No noun phrase found in the caption; the whole caption is used as one phrase."]


def highlight_phrases(
    caption: str, spans: Sequence[tuple[int, int]]
) -> list[tuple[str, str | None]]:
    """Pieces of `caption` in order, each labelled `P1`… if it is a phrase, else `None`."""
    pieces: list[tuple[str, str | None]] = []
    position = 0
    for index, (start, end) in enumerate(spans):
        if start > position:
            pieces.append((caption[position:start], None))
        pieces.append((caption[start:end], f"P{index + 1}"))
        position = end
    if position < len(caption):
        pieces.append((caption[position:], None))
    return pieces


# --- explain: rows and JSON ---------------------------------------------------------------------------


def _region_rows(
    explanation: LoupeExplanation, boxes: torch.Tensor, size: tuple[int, int]
) -> list[dict[str, Any]]:
    """The shown regions, `R1`… by confidence: box (`boxes`, the explanation's on the image) in
    pixels of the prepared image, confidence and token-level interaction with its standard error."""
    boxes = pixel_boxes(boxes, size).tolist()
    return [
        {
            "name": f"R{rank + 1}",
            "confidence": float(confidence),
            "box": box,
            "interaction": float(value),
            "stderr": float(stderr),
        }
        for rank, (confidence, box, value, stderr) in enumerate(
            zip(
                explanation.confidences.tolist(),
                boxes,
                explanation.token_interactions.tolist(),
                explanation.token_stderr.tolist(),
                strict=True,
            )
        )
    ]


def _explain_pictures(
    image: PIL.Image.Image,
    explanation: LoupeExplanation,
    shown: list[dict[str, Any]],
    phrases: list[str],
) -> tuple[PIL.Image.Image, PIL.Image.Image, PIL.Image.Image]:
    """The regions picture, the token-level interaction map over the photo, and the two matrices."""
    regions_image = _draw(
        image, [{"label": r["name"], "score": r["confidence"], "box": r["box"]} for r in shown]
    )
    interaction_image = interaction_overlay(
        image,
        explanation.patch_map.cpu().numpy(),
        [r["box"] for r in shown],
        [f"{r['name']} I={r['interaction']:+.3f}" for r in shown],
    )
    matrices = matrix_panels(
        explanation.alignment.cpu().numpy(),
        explanation.semantic_interactions.cpu().numpy(),
        [f"{r['name']} ({r['confidence']:.2f})" for r in shown],
        [f"P{index + 1}: {_shorten(p)}" for index, p in enumerate(phrases)],
    )
    return regions_image, interaction_image, matrices


def _significant(value: float) -> float:
    return float(f"{value:.4g}")


def unsil_rows(explanation: LoupeExplanation, region_names: Sequence[str]) -> list[list[Any]]:
    """Rows of `UNSIL_HEADERS`: every shown region (token level) and region × phrase pair (semantic
    level) that UNSIL predicts, with the sampled interaction of the same target. Empty without UNSIL."""
    rows = []
    if explanation.token_unsil is not None:
        targets = zip(
            region_names,
            explanation.token_interactions.tolist(),
            explanation.token_stderr.tolist(),
            explanation.token_unsil.interaction.tolist(),
            explanation.token_unsil.sigma.tolist(),
            strict=True,
        )
        rows += [_unsil_row("token", *target) for target in targets]
    if explanation.semantic_unsil is not None:
        prediction = explanation.semantic_unsil
        for (k, j), sampled in np.ndenumerate(explanation.semantic_interactions.cpu().numpy()):
            rows.append(
                _unsil_row(
                    "semantic",
                    f"{region_names[k]} × P{j + 1}",
                    float(sampled),
                    float(explanation.semantic_stderr[k, j]),
                    float(prediction.interaction[k, j]),
                    float(prediction.sigma[k, j]),
                )
            )
    return rows


def _unsil_row(
    level: str, target: str, sampled: float, stderr: float, predicted: float, sigma: float
) -> list[Any]:
    numbers = (sampled, stderr, predicted, sigma, abs(predicted - sampled))
    return [level, target, *(_significant(value) for value in numbers)]


def _unsil_json(unsil: UnsilPredictors | None, rows: list[list[Any]]) -> dict[str, Any] | None:
    if unsil is None:
        return None
    keys = ["level", "target", "sampled", "stderr", "predicted", "sigma", "error"]
    return {
        "levels": unsil.levels,
        "training_steps": unsil.training_steps,
        "predictions": [dict(zip(keys, row, strict=True)) for row in rows],
    }


# --- drawing ------------------------------------------------------------------------------------------


def display_scale(image: PIL.Image.Image, min_side: int = DISPLAY_MIN_SIDE) -> int:
    """Integer enlargement (at most 4) that brings a small image's longest side near `min_side`."""
    return int(min(4, max(1, min_side // max(image.size))))


def boxes_to_draw(detections: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each distinct box once, with the label of its highest score, lowest score first.

    Several labels can hit the same region; drawing each hit would put a lower-scoring label over a
    higher one, so the picture would contradict the table. Drawing the best box last keeps it on top
    where different boxes overlap."""
    best: dict[tuple[float, ...], dict[str, Any]] = {}
    for detection in detections:
        key = tuple(round(value, 2) for value in detection["box"])
        if key not in best or detection["score"] > best[key]["score"]:
            best[key] = detection
    return sorted(best.values(), key=lambda detection: detection["score"])


def _draw(image: PIL.Image.Image, detections: Sequence[dict[str, Any]]) -> PIL.Image.Image:
    return draw_boxes(
        image,
        [d["box"] for d in detections],
        [d["label"] for d in detections],
        [d["score"] for d in detections],
        scale=display_scale(image),
    )


def _shorten(text: str, limit: int = 24) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _diverging_colours(values: np.ndarray, limit: float) -> np.ndarray:
    """RGB uint8 colours of `values` on a red (positive) / blue (negative) scale of ±`limit`."""
    import matplotlib

    scaled = (np.clip(values / max(limit, 1e-12), -1.0, 1.0) + 1.0) / 2.0
    return (matplotlib.colormaps["RdBu_r"](scaled)[..., :3] * 255).astype(np.uint8)


def interaction_overlay(
    image: PIL.Image.Image,
    patch_map: np.ndarray,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[str],
) -> PIL.Image.Image:
    """The photo under its `[G, G]` per-patch interaction map (red: the patches of the box centred
    there cooperate, blue: they compete), the regions' boxes with `labels` on top, and a colour
    scale below: `display_scale(image)` times the image size, plus `LEGEND_HEIGHT` pixels."""
    limit = float(np.abs(patch_map).max())
    # The grid covers the whole image (the processor resizes it to a square), so stretching the map
    # to the image's own aspect puts every cell over the pixels it was computed from.
    heat = PIL.Image.fromarray(_diverging_colours(patch_map, limit)).resize(
        image.size, PIL.Image.BILINEAR
    )
    blended = PIL.Image.blend(image.convert("RGB"), heat, OVERLAY_ALPHA)
    scale = display_scale(image)
    drawn = draw_boxes(blended, boxes, labels, scale=scale)
    canvas = PIL.Image.new("RGB", (drawn.width, drawn.height + LEGEND_HEIGHT), "white")
    canvas.paste(drawn, (0, 0))
    canvas.paste(_legend(drawn.width, limit), (0, drawn.height))
    return canvas


def _legend(width: int, limit: float) -> PIL.Image.Image:
    """A `width` × `LEGEND_HEIGHT` colour bar from −limit to +limit, labelled."""
    legend = PIL.Image.new("RGB", (width, LEGEND_HEIGHT), "white")
    margin, bar_top, bar_height = 8, 16, 10
    ramp = np.linspace(-limit, limit, max(1, width - 2 * margin))
    bar = _diverging_colours(np.repeat(ramp[None, :], bar_height, axis=0), limit)
    legend.paste(PIL.Image.fromarray(bar), (margin, bar_top))
    draw = PIL.ImageDraw.Draw(legend)
    draw.text((margin, 2), f"{-limit:+.3g}", fill="black")
    caption = "token-level interaction of each patch's box"
    draw.text((width // 2, 2), caption, fill="black", anchor="mt")
    draw.text((width - margin, 2), f"{limit:+.3g}", fill="black", anchor="rt")
    return legend


def matrices_figsize(rows: int, columns: int) -> tuple[float, float]:
    """Figure size in inches of the two matrix panels for `rows` regions and `columns` phrases."""
    return 2 * (2.6 + 1.3 * columns), 1.9 + 0.5 * rows


def matrix_panels(
    alignment: np.ndarray,
    interactions: np.ndarray,
    row_labels: Sequence[str],
    column_labels: Sequence[str],
) -> PIL.Image.Image:
    """The `[rows, columns]` alignment matrix (left) and semantic interaction matrix (right) as
    annotated heat maps, one RGB image of `matrices_figsize(rows, columns) × HEATMAP_DPI` pixels.
    Needs matplotlib (the `demo` extra)."""
    # The object-oriented API, not pyplot: pyplot's global state is not safe in handler threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    alignment = np.asarray(alignment, dtype=float)
    interactions = np.asarray(interactions, dtype=float)
    figure = Figure(figsize=matrices_figsize(*alignment.shape), dpi=HEATMAP_DPI)
    canvas = FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    _matrix_panel(
        left,
        alignment,
        "alignment ã: softmax over phrases\nof the scaled cosines (what FSA trains)",
        "viridis",
        (0.0, 1.0),
    )
    limit = max(float(np.abs(interactions).max()), 1e-12)
    _matrix_panel(
        right,
        interactions,
        "semantic interaction I([H_kj])\nin game v2 (the FSA target)",
        "RdBu_r",
        (-limit, limit),
    )
    for axis in (left, right):
        axis.set_xticks(range(alignment.shape[1]), list(column_labels), rotation=25, ha="right")
        axis.set_yticks(range(alignment.shape[0]), list(row_labels))
        axis.set_xlabel("phrase")
    left.set_ylabel("region (confidence)")
    # A margin on top: the app's label badge sits over the image's top-left corner.
    figure.tight_layout(rect=(0, 0, 1, 0.92))
    canvas.draw()
    return PIL.Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")


def _matrix_panel(
    axis: Any, matrix: np.ndarray, title: str, colours: str, limits: tuple[float, float]
) -> None:
    shown = axis.imshow(matrix, cmap=colours, vmin=limits[0], vmax=limits[1], aspect="auto")
    low, high = limits
    for (row, column), value in np.ndenumerate(matrix):
        # Dark text on the light middle of each colour scale, white on its dark ends.
        middle = abs(value - (low + high) / 2) < 0.3 * (high - low)
        light = value > low + 0.6 * (high - low) if colours == "viridis" else middle
        text = f"{value:.2f}" if colours == "viridis" else f"{value:+.3f}"
        colour = "black" if light else "white"
        axis.text(column, row, text, ha="center", va="center", color=colour, fontsize=8)
    axis.set_title(title, fontsize=9)
    axis.figure.colorbar(shown, ax=axis, fraction=0.04)


# --- which checkpoint, and a tiny one when there is none ------------------------------------------------

REPO_DEMO_CHECKPOINT = Path("outputs/demo/checkpoint")
FALLBACK_CHECKPOINT = Path("~/.cache/loupe-hf/space-checkpoint").expanduser()
FALLBACK_TRAINING_ARGS = (
    "--max_steps", "40",
    "--per_device_train_batch_size", "32",
    "--num_train_samples", "2000",
    "--num_eval_samples", "0",
    "--save_steps", "20",
    "--logging_steps", "10",
    "--tokenizer_training_captions", "2000",
)  # fmt: skip


def is_trained_checkpoint(path: Path) -> bool:
    """Whether `path` holds a finished checkpoint: weights, config and processor files."""
    return all(
        (path / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json")
    )


@dataclass
class CheckpointChoice:
    """Where the model comes from: `checkpoint` (a directory or Hub id), `source` (why this one),
    and `needs_training` when it is the fallback that must be trained first."""

    checkpoint: str
    source: str
    needs_training: bool = False


def resolve_checkpoint(
    argument: str | None,
    environ: dict[str, str] | None = None,
    repo_root: Path | None = None,
    fallback: Path = FALLBACK_CHECKPOINT,
) -> CheckpointChoice:
    """`--checkpoint`, else `$LOUPE_CHECKPOINT`, else the main job's `outputs/demo/checkpoint`,
    else a tiny fallback checkpoint in the user cache (trained on first use)."""
    environ = os.environ if environ is None else environ
    if argument:
        return CheckpointChoice(argument, "--checkpoint")
    if environ.get("LOUPE_CHECKPOINT"):
        return CheckpointChoice(environ["LOUPE_CHECKPOINT"], "LOUPE_CHECKPOINT")
    if repo_root is not None and is_trained_checkpoint(repo_root / REPO_DEMO_CHECKPOINT):
        return CheckpointChoice(str(repo_root / REPO_DEMO_CHECKPOINT), "the main job's checkpoint")
    return CheckpointChoice(
        str(fallback), "a tiny checkpoint trained for this app", not is_trained_checkpoint(fallback)
    )


def _progress_pieces(stream: IO[bytes]) -> Iterator[str]:
    """Lines of a child's output, split on newlines and on the carriage returns of progress bars."""
    # read1 returns whatever is available, so progress shows while the child is still running.
    read = getattr(stream, "read1", stream.read)
    buffer = b""
    while chunk := read(4096):
        buffer += chunk
        *pieces, buffer = re.split(rb"[\r\n]", buffer)
        yield from (piece.decode(errors="replace").strip() for piece in pieces if piece.strip())
    if buffer.strip():
        yield buffer.decode(errors="replace").strip()


# A tqdm bar: "Map: 100%|████| 100/100 [00:01<00:00, ...]"; the Trainer's own bar has no description.
_TQDM_BAR = re.compile(
    r"^(?:(?P<desc>[^|]*?):\s*)?(?:\d+%\|[^|]*\|\s*)?(?P<done>\d+)/(?P<total>\d+) \["
)


def _progress_message(piece: str) -> str | None:
    """`training step i/n` for the Trainer's progress bar, `<description> i/n` for other bars."""
    bar = _TQDM_BAR.search(piece.strip())
    if bar is None:
        return None
    what = bar.group("desc") or "training step"
    return f"{what} {bar.group('done')}/{bar.group('total')}"


def train_fallback_checkpoint(
    target: Path,
    pretrain_script: Path,
    on_progress: Callable[[str], None] = print,
    extra_args: Sequence[str] = FALLBACK_TRAINING_ARGS,
) -> Path:
    """Trains a tiny checkpoint into `target` with `examples/pretrain.py` (resuming an interrupted
    run), reporting `step i/n` progress through `on_progress`. Raises `RuntimeError` on failure."""
    if not pretrain_script.is_file():
        raise RuntimeError(
            f"no checkpoint found and no {pretrain_script} to train one; set LOUPE_CHECKPOINT to a "
            "checkpoint directory or Hub id"
        )
    target.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(pretrain_script), "--output_dir", str(target), *extra_args]
    on_progress(f"training a tiny checkpoint into {target} (first start only): {' '.join(command)}")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    last, tail = None, []
    for piece in _progress_pieces(process.stdout):
        tail = [*tail[-19:], piece]
        message = _progress_message(piece)
        if message and message != last:
            last = message
            on_progress(message)
    if process.wait() != 0 or not is_trained_checkpoint(target):
        raise RuntimeError(
            f"training the fallback checkpoint failed (exit {process.returncode}):\n"
            + "\n".join(tail)
        )
    on_progress(f"trained the tiny checkpoint in {target}")
    return target


class BackgroundLoader:
    """Resolves, trains if needed, and loads the demo model in a thread, so the app starts at once
    and shows progress instead of a blank page. `status` is a one-line Markdown message."""

    def __init__(
        self,
        repo_root: Path | None = None,
        log: Callable[[str], None] = print,
        fallback: Path = FALLBACK_CHECKPOINT,
    ):
        self.repo_root = repo_root
        self.fallback = fallback
        self.log = log
        self.status = "**Loading…** the model has not been requested yet"
        self.error: str | None = None
        self.demo: LoupeDemo | None = None
        self.training = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()

    def start(self, checkpoint: str | None = None) -> None:
        """Chooses the checkpoint (see [`resolve_checkpoint`]) and starts loading it in a thread, once;
        later calls do nothing."""
        with self._lock:
            if self._thread is not None:
                return
            # Resolved here, not in the thread, so that `training` is known as soon as this returns.
            choice = resolve_checkpoint(checkpoint, None, self.repo_root, self.fallback)
            self.training = choice.needs_training
            self._set_status(f"**Starting…** checkpoint `{choice.checkpoint}` ({choice.source})")
            self._thread = threading.Thread(target=self._load, args=(choice,), daemon=True)
            self._thread.start()

    def _set_status(self, message: str) -> None:
        self.status = message
        self.log(f"[loupe-space] {message.replace('**', '')}")  # Markdown is for the page

    def _load(self, choice: CheckpointChoice) -> None:
        try:
            if choice.needs_training:
                script = (self.repo_root or Path(".")) / "examples" / "pretrain.py"
                train_fallback_checkpoint(
                    Path(choice.checkpoint),
                    script,
                    lambda line: self._set_status(f"**Preparing the model…** {line}"),
                )
            self.training = False
            self._set_status(f"**Loading…** `{choice.checkpoint}` ({choice.source})")
            self.demo = LoupeDemo.from_pretrained(choice.checkpoint)
            self._set_status(f"**Ready.** Model: `{choice.checkpoint}` ({choice.source}).")
        except Exception as error:  # shown in the app rather than killing the thread silently
            self.training = False
            self.error = f"**Error:** could not load the model: {error}"
            self._set_status(self.error)
        finally:
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> LoupeDemo:
        """The loaded demo; raises [`DemoInputError`] with the status if it failed or is not ready
        within `timeout` seconds. While the fallback checkpoint trains it does not wait: that takes
        minutes, and the message (with the training step) is more useful than a spinner."""
        self.start()
        if not self.training:
            self._done.wait(timeout)
        if self.demo is not None:
            return self.demo
        if self.error:
            raise DemoInputError(self.error)
        raise DemoInputError(
            f"The model is not ready yet ({self.status}). Please try again shortly."
        )


__all__ = [
    "MAX_IMAGE_SIDE",
    "MAX_LABELS",
    "MAX_LABEL_CHARS",
    "MAX_TEXT_CHARS",
    "MAX_UPLOAD_BYTES",
    "MAX_UPLOAD_PIXELS",
    "TABLE_HEADERS",
    "BackgroundLoader",
    "CheckpointChoice",
    "DemoInputError",
    "DetectResult",
    "ExplainResult",
    "GroundResult",
    "LoupeDemo",
    "RegionCache",
    "boxes_to_draw",
    "caption_phrases",
    "display_scale",
    "highlight_phrases",
    "image_key",
    "interaction_overlay",
    "is_trained_checkpoint",
    "matrices_figsize",
    "matrix_panels",
    "parse_labels",
    "prepare_image",
    "require_text",
    "resolve_checkpoint",
    "shorten_text",
    "train_fallback_checkpoint",
    "unsil_rows",
]
