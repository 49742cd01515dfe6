"""Batching image–caption examples for LOUPE pre-training: the collator, which skips (and counts)
corrupt examples, and the sampler that keeps contrast groups together."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import PIL.Image
import torch

from ..image_processing_loupe import LoupeImageError, to_rgb_array
from ..processing_loupe import LoupeProcessor
from .negatives import swap_head_nouns

logger = logging.getLogger(__name__)

# The batch key of `LoupeDataCollator(count_in_batch=True)`: examples the collator dropped.
SKIPPED_SAMPLES_KEY = "skipped_samples"


class CorruptSampleError(ValueError):
    """An example whose image or caption cannot be used."""


def decode_image(value: Any) -> PIL.Image.Image:
    """An image from what datasets hands over: a PIL image, a path, raw bytes, or an undecoded
    `datasets.Image(decode=False)` dict (`{"bytes": ..., "path": ...}`). Raises `CorruptSampleError`."""
    try:
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray)):
            with PIL.Image.open(io.BytesIO(value)) as opened:
                opened.load()
                value = opened.copy()
        rgb = to_rgb_array(value)
    except (LoupeImageError, OSError, SyntaxError, ValueError) as error:
        raise CorruptSampleError(f"unreadable image: {error}") from error
    return PIL.Image.fromarray(rgb)


@dataclass
class LoupeDataCollator:
    """Turns a list of examples into model inputs with [`LoupeProcessor`].

    Examples need an image column and a caption column, and optionally a column of phrase character
    spans (`[[start, end], ...]`, e.g. from `loupe_hf.phrases.add_phrase_spans`), of which the first
    `max_phrases` become `phrase_masks`. An example whose image does not decode or whose caption is
    empty is dropped and counted in `skipped` (per process; with DataLoader workers, per worker),
    so one bad file never stops a run. With `count_in_batch` (which [`LoupeTrainer`] turns on) the
    batch also carries how many of its examples were dropped (`skipped_samples`, shape `[1]`), so
    the count reaches the training process from DataLoader workers too.

    With `hard_negatives`, the batch also holds one hard negative caption per example
    (`negative_input_ids`, `negative_attention_mask`, and `negative_mask`, False where no swap
    exists; see `loupe_hf.pretraining.negatives`): it needs the phrase spans column.
    """

    processor: LoupeProcessor
    image_column: str = "image"
    caption_column: str = "caption"
    spans_column: str | None = "phrase_spans"
    max_phrases: int = 8
    hard_negatives: bool = False
    count_in_batch: bool = False
    skipped: int = field(default=0, init=False)

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        images, captions, spans = [], [], []
        dropped = 0
        for example in examples:
            try:
                image, caption = self._image_and_caption(example)
            except CorruptSampleError as error:
                dropped += 1
                self.skipped += 1
                logger.warning("skipping a corrupt sample (%d so far): %s", self.skipped, error)
                continue
            images.append(image)
            captions.append(caption)
            if self.spans_column is not None and self.spans_column in example:
                spans.append(
                    [tuple(span) for span in (example[self.spans_column] or [])][: self.max_phrases]
                )
        if not images:
            raise CorruptSampleError(f"all {len(examples)} samples of a batch were unreadable")
        phrase_spans = spans if len(spans) == len(images) else None
        batch = dict(self.processor(images=images, text=captions, phrase_spans=phrase_spans))
        if self.hard_negatives:
            batch.update(self._negative_captions(captions, phrase_spans))
        if self.count_in_batch:
            # Shape [1], not a scalar: a batch dispatched across processes is sliced along dim 0,
            # which leaves the count with one process and an empty tensor with the others.
            batch[SKIPPED_SAMPLES_KEY] = torch.tensor([dropped])
        return batch

    def _negative_captions(
        self, captions: list[str], phrase_spans: list[list[tuple[int, int]]] | None
    ) -> dict[str, torch.Tensor]:
        if phrase_spans is None:
            raise ValueError(
                f"hard negative captions need the phrase spans column {self.spans_column!r} "
                "(e.g. from loupe_hf.phrases.add_phrase_spans)"
            )
        negatives = swap_head_nouns(captions, phrase_spans)
        # A caption without a swap keeps its place (the batch stays rectangular) but is masked out.
        texts = [n if n is not None else c for n, c in zip(negatives, captions, strict=True)]
        encoding = self.processor(text=texts)
        return {
            "negative_input_ids": encoding["input_ids"],
            "negative_attention_mask": encoding["attention_mask"],
            "negative_mask": torch.tensor([n is not None for n in negatives]),
        }

    def _image_and_caption(self, example: dict[str, Any]) -> tuple[PIL.Image.Image, str]:
        caption = example.get(self.caption_column)
        if not isinstance(caption, str) or not caption.strip():
            raise CorruptSampleError(f"empty or missing caption in column {self.caption_column!r}")
        if self.image_column not in example:
            raise CorruptSampleError(f"missing image column {self.image_column!r}")
        return decode_image(example[self.image_column]), caption


class ContrastGroupSampler(torch.utils.data.Sampler[int]):
    """Shuffles whole groups of `group_size` consecutive indices (a synthetic contrast group: one
    scene and its one-attribute edits), keeping each group's members together and in order, so a
    batch whose size is a multiple of `group_size` holds whole groups. A last, incomplete group
    comes last. The order depends on `seed` and the epoch only (`set_epoch`), so a resumed run
    sees the batches it would have seen."""

    def __init__(self, num_samples: int, group_size: int, seed: int = 0):
        if group_size < 1 or num_samples < 0:
            raise ValueError(
                f"need group_size >= 1 and num_samples >= 0, got {group_size} and {num_samples}"
            )
        self.num_samples, self.group_size, self.seed, self.epoch = num_samples, group_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        complete = self.num_samples // self.group_size
        for group in torch.randperm(complete, generator=generator).tolist():
            yield from range(group * self.group_size, (group + 1) * self.group_size)
        yield from range(complete * self.group_size, self.num_samples)


__all__ = [
    "SKIPPED_SAMPLES_KEY",
    "ContrastGroupSampler",
    "CorruptSampleError",
    "LoupeDataCollator",
    "decode_image",
]
