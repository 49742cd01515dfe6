"""LOUPE processor: the image processor and a BERT WordPiece tokenizer behind one call."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import BatchFeature, ProcessorMixin

# The files a saved BERT tokenizer is loaded from (either one suffices).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


class LoupeProcessor(ProcessorMixin):
    r"""
    Wraps a [`LoupeImageProcessor`] and a BERT tokenizer (any `BertTokenizerFast`: a Hub name such as
    `"bert-base-uncased"` for online users, or one trained offline with
    [`~loupe_hf.train_wordpiece_tokenizer`]).

    `processor(images=..., text=..., phrase_spans=...)` returns `pixel_values`, `input_ids`,
    `attention_mask`, `token_type_ids` and, when `phrase_spans` is given, `phrase_masks` `[B, M, L]`:
    for each caption, the word tokens that overlap each phrase's character span (M = the most
    phrases of any caption; missing phrases and phrases truncated away are all-zero rows).

    `text` takes the forms OWL-ViT's processor takes: a string, a list of strings, or one list of
    queries per image (`[["cat", "cup"], ["dog"]]`), which is padded with `" "` to the longest list
    and flattened image by image into `[B * Q, L]` rows, the layout
    [`LoupeForZeroShotDetection`] reads.
    """

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Loads like any processor, but refuses a local folder without tokenizer files: the BERT
        tokenizer would otherwise load with only its special tokens and map every word to `[UNK]`."""
        folder = Path(str(pretrained_model_name_or_path))
        subfolder = kwargs.get("subfolder") or ""
        if folder.is_dir() and not any(
            (folder / subfolder / name).is_file() for name in TOKENIZER_FILES
        ):
            raise OSError(
                f"{folder / subfolder} has no tokenizer file ({' or '.join(TOKENIZER_FILES)}): "
                "a LOUPE processor cannot tokenise without it"
            )
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        phrase_spans: Sequence[Sequence[tuple[int, int]]] | None = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        if images is None and text is None:
            raise ValueError("LoupeProcessor needs images, text, or both")
        data: dict[str, Any] = {}
        if text is not None:
            texts = _as_text_list(text)
            nested = any(isinstance(item, (list, tuple)) for item in _as_flat_or_nested(text))
            if phrase_spans is not None and nested:
                raise ValueError("phrase_spans need one caption per text, not nested query lists")
            encoding = self.tokenizer(
                texts,
                padding=kwargs.pop("padding", True),
                truncation=kwargs.pop("truncation", True),
                max_length=kwargs.pop("max_length", None),
                return_offsets_mapping=phrase_spans is not None,
                return_tensors="pt",
            )
            if phrase_spans is not None:
                offsets = encoding.pop("offset_mapping")
                data["phrase_masks"] = phrase_token_masks(
                    offsets, encoding["attention_mask"], phrase_spans
                )
            data.update(encoding)
        elif phrase_spans is not None:
            raise ValueError(
                "phrase_spans refer to character spans of `text`, but no text was given"
            )
        if images is not None:
            data.update(self.image_processor(images, return_tensors="pt", **kwargs))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def post_process_object_detection(
        self,
        outputs: Any,
        threshold: float = 0.1,
        target_sizes: Any = None,
        *,
        nms_threshold: float | None = 0.5,
        top_k: int | None = None,
    ) -> list[dict[str, Any]]:
        """The image processor's `post_process_object_detection` (boxes in pixels, per image)."""
        return self.image_processor.post_process_object_detection(
            outputs,
            threshold=threshold,
            target_sizes=target_sizes,
            nms_threshold=nms_threshold,
            top_k=top_k,
        )

    def post_process_grounded_object_detection(
        self,
        outputs: Any,
        threshold: float = 0.1,
        target_sizes: Any = None,
        text_labels: Sequence[Sequence[str]] | Sequence[str] | None = None,
        *,
        nms_threshold: float | None = 0.5,
        top_k: int | None = None,
    ) -> list[dict[str, Any]]:
        """`post_process_object_detection` plus `text_labels`: the query string of each detection
        (`text_labels` is one list of queries per image, or one list for all). The arguments come
        in OWL-ViT's order; LOUPE's extras are keywords."""
        if isinstance(threshold, (list, tuple)):
            raise TypeError(
                "post_process_grounded_object_detection takes (outputs, threshold, target_sizes, "
                "text_labels), as OWL-ViT does: pass the labels as text_labels=..."
            )
        results = self.post_process_object_detection(
            outputs,
            threshold=threshold,
            target_sizes=target_sizes,
            nms_threshold=nms_threshold,
            top_k=top_k,
        )
        if text_labels is not None:
            per_image = (
                [text_labels] * len(results) if isinstance(text_labels[0], str) else text_labels
            )
            for result, names in zip(results, per_image, strict=True):
                result["text_labels"] = [names[int(label)] for label in result["labels"]]
        return results

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_ids", "attention_mask", "token_type_ids"]


def _as_flat_or_nested(text: Any) -> list[Any]:
    return [text] if isinstance(text, str) else list(text)


def _as_text_list(text: str | Sequence[str] | Sequence[Sequence[str]]) -> list[str]:
    """The texts to tokenise, one per row: nested per-image query lists are padded with `" "` to
    the longest and flattened image by image (as OWL-ViT does)."""
    texts = _as_flat_or_nested(text)
    if not texts:
        raise ValueError("an empty list of texts was given")
    nested = [isinstance(item, (list, tuple)) for item in texts]
    if any(nested):
        if not all(nested):
            raise ValueError("text mixes strings and lists: give one list of queries per image")
        for row, queries in enumerate(texts):
            if not queries:
                raise ValueError(f"image {row} has an empty list of queries")
            _check_texts(queries, f"text {row}, query ")
        width = max(len(queries) for queries in texts)
        return [query for queries in texts for query in [*queries, *[" "] * (width - len(queries))]]
    _check_texts(texts, "text ")
    return texts


def _check_texts(texts: Sequence[Any], what: str) -> None:
    for index, item in enumerate(texts):
        if not isinstance(item, str):
            raise ValueError(f"{what}{index} is a {type(item).__name__}, not a string")
        if not item.strip():
            raise ValueError(f"{what}{index} is empty")


def phrase_token_masks(
    offsets: torch.Tensor,
    attention_mask: torch.Tensor,
    phrase_spans: Sequence[Sequence[tuple[int, int]]],
) -> torch.Tensor:
    """Maps character spans to word-token masks.

    Args:
        offsets: `[B, L, 2]` character offsets of each token (special tokens are `(0, 0)`).
        attention_mask: `[B, L]`.
        phrase_spans: per caption, `[start, end)` character spans of its phrases.

    Returns:
        `[B, M, L]` float mask, 1 where a real token overlaps the phrase span.
    """
    if len(phrase_spans) != offsets.shape[0]:
        raise ValueError(
            f"got phrase spans for {len(phrase_spans)} captions but {offsets.shape[0]} texts"
        )
    num_phrases = max((len(spans) for spans in phrase_spans), default=0)
    masks = torch.zeros(offsets.shape[0], num_phrases, offsets.shape[1])
    starts, ends = offsets[..., 0], offsets[..., 1]
    is_word = (ends > starts) & attention_mask.bool()
    for row, spans in enumerate(phrase_spans):
        for column, (start, end) in enumerate(spans):
            if not 0 <= start < end:
                raise ValueError(
                    f"caption {row}: phrase span ({start}, {end}) is empty or negative"
                )
            overlap = is_word[row] & (starts[row] < end) & (ends[row] > start)
            masks[row, column] = overlap.float()
    return masks


__all__ = ["LoupeProcessor", "phrase_token_masks"]
