"""LOUPE processor: the image processor and a BERT WordPiece tokenizer behind one call."""

from __future__ import annotations

import json
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import BatchFeature, ProcessorMixin

# The files a saved BERT tokenizer is loaded from (either one suffices).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
# The image processor's settings (transformers 5 writes the first, older versions the second).
PROCESSOR_CONFIG_FILES = ("processor_config.json", "preprocessor_config.json")
# The JSON files of a saved processor, checked before loading.
JSON_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    *PROCESSOR_CONFIG_FILES,
)


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
        folder = Path(str(pretrained_model_name_or_path)) / (kwargs.get("subfolder") or "")
        if _looks_local(str(pretrained_model_name_or_path)) and not folder.exists():
            # Otherwise the Hub client reports a malformed repository id.
            raise OSError(f"no such checkpoint folder: {folder}")
        if folder.is_dir():
            _check_local_files(folder)
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
            if phrase_spans is not None:
                phrase_spans = checked_phrase_spans(phrase_spans, texts)
            encoding = self.tokenizer(
                texts,
                padding=kwargs.pop("padding", True),
                truncation=kwargs.pop("truncation", True),
                max_length=_checked_max_length(kwargs.pop("max_length", None)),
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
            per_image = _labels_per_image(text_labels, len(results), outputs["logits"].shape[-1])
            for result, names in zip(results, per_image, strict=True):
                result["text_labels"] = [names[int(label)] for label in result["labels"]]
        return results

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_ids", "attention_mask", "token_type_ids"]


def _labels_per_image(text_labels: Any, images: int, queries: int) -> list[Sequence[str]]:
    """`text_labels` as one list of `queries` names per image (from one list for all, or one per
    image); a `ValueError` naming `text_labels` when the counts do not match the outputs."""
    if not isinstance(text_labels, (list, tuple)) or not text_labels:
        raise ValueError(
            f"text_labels must be a list of query names (or one per image), got {text_labels!r}"
        )
    shared = all(isinstance(name, str) for name in text_labels)
    per_image = [text_labels] * images if shared else list(text_labels)
    if len(per_image) != images:
        raise ValueError(f"text_labels has {len(per_image)} lists for {images} images")
    for index, names in enumerate(per_image):
        # Padded rows of nested queries may be shorter only if their names were padded too.
        if not isinstance(names, (list, tuple)) or len(names) != queries:
            count = len(names) if isinstance(names, (list, tuple)) else type(names).__name__
            raise ValueError(
                f"text_labels for image {index} has {count} names, but the outputs score "
                f"{queries} queries; give one name per query"
            )
    return per_image


def _checked_max_length(max_length: Any) -> int | None:
    """`max_length` as a positive int or `None`: the tokenizer ignores 0 and negative lengths."""
    if max_length is None:
        return None
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer or None, got {max_length!r}")
    return max_length


def checked_phrase_spans(phrase_spans: Any, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
    """`phrase_spans` as one list of `(start, end)` integer pairs per caption, each inside its
    caption; a `ValueError` naming the caption and the span otherwise. A span past the caption's
    end would give a phrase of no tokens (or of the wrong ones), silently."""
    if isinstance(phrase_spans, (str, bytes)) or not isinstance(phrase_spans, Sequence):
        raise ValueError(
            "phrase_spans must be one list of (start, end) character spans per caption, got "
            f"{type(phrase_spans).__name__}"
        )
    if len(phrase_spans) != len(texts):
        raise ValueError(
            f"got phrase spans for {len(phrase_spans)} captions but {len(texts)} texts"
        )
    return [
        _caption_spans(spans, text, row)
        for row, (spans, text) in enumerate(zip(phrase_spans, texts, strict=True))
    ]


def _caption_spans(spans: Any, text: str, row: int) -> list[tuple[int, int]]:
    if not isinstance(spans, (list, tuple)):
        raise ValueError(
            f"phrase_spans[{row}] must be a list of (start, end) spans, got {type(spans).__name__}"
        )
    checked = []
    for column, span in enumerate(spans):
        if not (
            isinstance(span, (list, tuple))
            and len(span) == 2
            and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in span)
        ):
            raise ValueError(
                f"caption {row}: phrase span {column} must be a pair of integers (start, end), "
                f"got {span!r}"
            )
        start, end = int(span[0]), int(span[1])
        if not 0 <= start < end:
            raise ValueError(f"caption {row}: phrase span ({start}, {end}) is empty or negative")
        if end > len(text):
            raise ValueError(
                f"caption {row}: phrase span ({start}, {end}) ends past the caption's "
                f"{len(text)} characters"
            )
        checked.append((start, end))
    return checked


def _looks_local(name: str) -> bool:
    """Whether `name` can only be a local path (a Hub id is `name` or `owner/name`)."""
    return name.startswith((".", "~", "/")) or name.count("/") > 1


def _check_local_files(folder: Path) -> None:
    """Refuses a local processor folder without a tokenizer file (the BERT tokenizer would load
    with only its special tokens and map every word to `[UNK]`) or without an image processor
    config, or with a file that is not JSON (whose own error names neither file nor folder)."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise OSError(
            f"{folder} has no tokenizer file ({' or '.join(TOKENIZER_FILES)}): "
            "a LOUPE processor cannot tokenise without it"
        )
    if not any((folder / name).is_file() for name in PROCESSOR_CONFIG_FILES):
        raise OSError(
            f"{folder} has no {' or '.join(PROCESSOR_CONFIG_FILES)}: save the processor with "
            "processor.save_pretrained(folder)"
        )
    for name in JSON_FILES:
        path = folder / name
        if path.is_file():
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise OSError(f"{path} is damaged (not valid JSON: {error})") from error


def _as_flat_or_nested(text: Any) -> list[Any]:
    if isinstance(text, str):
        return [text]
    if not isinstance(text, (list, tuple)):
        # bytes or a number would otherwise be iterated item by item.
        raise TypeError(
            "text must be a string, a list of strings or one list of strings per image, "
            f"got {type(text).__name__}"
        )
    return list(text)


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
            raise ValueError(f"{what}{index} is not a string but {type(item).__name__}")
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


__all__ = ["LoupeProcessor", "checked_phrase_spans", "phrase_token_masks"]
