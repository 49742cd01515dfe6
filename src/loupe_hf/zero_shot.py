"""Zero-shot detection and visual grounding (METHOD §5): the one path from images and text to boxes,
used by `LoupeForZeroShotDetection.detect/ground`, the Space and the evaluation runners.

Each step takes a detector (a [`LoupeForZeroShotDetection`]) and its processor:
`encode_images` → region proposals and embeddings (reusable for any text), `encode_queries` →
text embeddings, then `detect_in_regions` (class scores, NMS, boxes in pixels) or
`ground_in_regions` (the single best region per expression). `detect` and `ground` chain them.

The transformers pipelines `zero-shot-object-detection` and `zero-shot-image-classification` are
built as [`LoupeZeroShotObjectDetectionPipeline`] and [`LoupeZeroShotImageClassificationPipeline`]
once this module is imported: for a LOUPE model they check their arguments the way `detect` does
(and take NumPy and torch images); for any other model they are transformers' own pipelines.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers.pipelines.zero_shot_image_classification import (
    ZeroShotImageClassificationPipeline,
)
from transformers.pipelines.zero_shot_object_detection import ZeroShotObjectDetectionPipeline

from .image_processing_loupe import (
    LoupeImageError,
    check_fraction,
    check_top_k,
    to_rgb_array,
)


def checked_queries(
    queries: Sequence[str] | str, what: str, argument: str | None = None
) -> list[str]:
    """Non-empty, stripped query strings; otherwise an error naming the argument (`argument`,
    default `what` + "s"), the offending entry and what was expected."""
    argument = argument or f"{what}s"
    if isinstance(queries, str):
        queries = [queries]
    elif not isinstance(queries, (list, tuple)):
        # A dict or a set would be iterated in an order the results could not be matched to.
        raise TypeError(
            f"{argument} must be a string or a list of strings, got {type(queries).__name__}"
        )
    if not queries:
        raise ValueError(f"no {what}s given: {argument} is empty; pass at least one string")
    for index, query in enumerate(queries):
        if not isinstance(query, str):
            raise TypeError(
                f"{what} {index} in {argument} must be a string, got {query!r} "
                f"({type(query).__name__})"
            )
        if not query.strip():
            # An empty query still scores (as "[CLS] [SEP]") and would label boxes with "".
            raise ValueError(
                f"{what} {index} is empty: every entry of {argument} must be a non-empty string"
            )
    return [query.strip() for query in queries]


def checked_processor(processor: Any) -> Any:
    """`processor` when it can prepare both images and text (a [`LoupeProcessor`]); a `TypeError`
    naming the argument otherwise (`None`, a tokenizer alone, or the labels passed in its place)."""
    if not all(hasattr(processor, name) for name in ("tokenizer", "image_processor")):
        raise TypeError(
            f"processor must be a LoupeProcessor (LoupeProcessor.from_pretrained(checkpoint)), "
            f"got {type(processor).__name__}"
        )
    return processor


def image_size(image: Any) -> tuple[int, int]:
    """(height, width) of an image the processor accepts (PIL, array, tensor, path)."""
    if hasattr(image, "height") and hasattr(image, "width"):
        return image.height, image.width
    array = to_rgb_array(image)
    return array.shape[0], array.shape[1]


def encode_images(detector: Any, processor: Any, images: Sequence[Any]) -> Any:
    """The detector's `LoupeImageRegions` of `images` (each encoded once)."""
    pixel_values = processor(images=list(images))["pixel_values"].to(detector.device)
    return detector.encode_images(pixel_values)


def encode_queries(
    detector: Any, processor: Any, texts: Sequence[str], apply_prompt_template: bool
) -> torch.Tensor:
    """L2-normalised text embeddings `[Q, P]`; class names take the checkpoint's prompt template
    (`apply_prompt_template=True`), referring expressions are scored as written."""
    tokens = processor.tokenizer(
        list(texts), padding=True, truncation=True, return_tensors="pt"
    ).to(detector.device)
    return detector.encode_queries(
        tokens["input_ids"], tokens["attention_mask"], apply_prompt_template=apply_prompt_template
    )


def detect_in_regions(
    detector: Any,
    processor: Any,
    regions: Any,
    text_embeds: torch.Tensor,
    labels: Sequence[str],
    sizes: Sequence[tuple[int, int]],
    threshold: float = 0.1,
    top_k: int | None = None,
    nms_threshold: float | None = None,
) -> list[dict[str, Any]]:
    """Per image, the detections of `labels` (`scores`, `labels`, `text_labels`, `boxes` as pixel
    x0, y0, x1, y1 in an image of `sizes[i]` = (height, width)), best first."""
    nms = detector.config.detection_nms_iou if nms_threshold is None else nms_threshold
    return processor.post_process_grounded_object_detection(
        {"logits": detector.score(regions, text_embeds), "pred_boxes": regions.boxes},
        text_labels=list(labels),
        threshold=threshold,
        target_sizes=list(sizes),
        nms_threshold=nms,
        top_k=top_k,
    )


def ground_in_regions(
    detector: Any,
    processor: Any,
    regions: Any,
    text_embeds: torch.Tensor,
    sizes: Sequence[tuple[int, int]],
) -> list[dict[str, Any]]:
    """Per image, the region that best matches its expression (`text_embeds[i]`, `[B, P]`): `box`
    (pixel x0, y0, x1, y1), `score` (sigmoid of the logit) and `region_index`."""
    logits = detector.score(regions, text_embeds.unsqueeze(1))[..., 0]  # [B, K]
    best = logits.argmax(dim=1)
    rows = torch.arange(logits.shape[0], device=logits.device)
    found = processor.image_processor.post_process_object_detection(
        {
            "logits": logits[rows, best][:, None, None],
            "pred_boxes": regions.boxes[rows, best][:, None],
        },
        threshold=0.0,
        target_sizes=list(sizes),
        nms_threshold=None,
    )
    return [
        {
            "box": result["boxes"][0].tolist(),
            "score": float(result["scores"][0]),
            "region_index": int(k),
        }
        for result, k in zip(found, best.tolist(), strict=True)
    ]


def detect(
    detector: Any,
    processor: Any,
    images: Any,
    labels: Sequence[str] | str,
    threshold: float = 0.1,
    top_k: int | None = None,
    nms_threshold: float | None = None,
) -> list[dict[str, Any]]:
    """Zero-shot detection of `labels` (class names, wrapped in the checkpoint's prompt) in `images`:
    each image is encoded once and all labels are scored in one text batch."""
    processor = checked_processor(processor)
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    labels = checked_queries(labels, "label")
    # Checked before the images are encoded, so that a wrong option fails at once.
    threshold = check_fraction("threshold", threshold)
    top_k = check_top_k(top_k)
    if nms_threshold is not None:
        nms_threshold = check_fraction("nms_threshold", nms_threshold)
    regions = encode_images(detector, processor, images)
    text_embeds = encode_queries(detector, processor, labels, apply_prompt_template=True)
    sizes = [image_size(image) for image in images]
    return detect_in_regions(
        detector, processor, regions, text_embeds, labels, sizes, threshold, top_k, nms_threshold
    )


def ground(
    detector: Any, processor: Any, images: Any, expressions: Sequence[str] | str
) -> list[dict[str, Any]]:
    """Visual grounding: the best region of each image for its referring expression (one per image,
    scored as written). Each result also carries its `expression`."""
    processor = checked_processor(processor)
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    expressions = checked_queries(expressions, "expression")
    if len(expressions) != len(images):
        raise ValueError(
            f"got {len(expressions)} expressions for {len(images)} images; pass one per image"
        )
    regions = encode_images(detector, processor, images)
    text_embeds = encode_queries(detector, processor, expressions, apply_prompt_template=False)
    results = ground_in_regions(
        detector, processor, regions, text_embeds, [image_size(image) for image in images]
    )
    for result, expression in zip(results, expressions, strict=True):
        result["expression"] = expression
    return results


# --- the transformers pipelines -------------------------------------------------------------------


IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp"})


def is_loupe_model(model: Any) -> bool:
    """Whether `model` is a LOUPE model (of this package or loaded with `trust_remote_code`)."""
    return getattr(getattr(model, "config", None), "model_type", None) == "loupe"


def pipeline_image(image: Any, index: int = 0) -> Any:
    """A pipeline input image: a NumPy array or torch tensor becomes an RGB PIL image (the pipelines
    of transformers only take paths, URLs and PIL images, and fail with an `IndexError` on an
    array); paths, URLs and PIL images pass unchanged; anything else is a [`LoupeImageError`]."""
    if isinstance(image, str) and _missing_image_file(image):
        raise LoupeImageError(f"image {index}: no such file {image!r}")
    if isinstance(image, (str, PIL.Image.Image)):
        return image
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return PIL.Image.fromarray(to_rgb_array(image, index))
    raise LoupeImageError(
        f"image {index} has unsupported type {type(image).__name__}; expected a PIL image, a path "
        "or URL, a NumPy array or a torch tensor"
    )


def _missing_image_file(image: str) -> bool:
    """Whether `image` names an image file that does not exist (transformers would report it as an
    "incorrect image source" after trying to read the path as base64)."""
    named_like_a_file = os.path.splitext(image)[1].lower() in IMAGE_SUFFIXES
    return named_like_a_file and "://" not in image and not os.path.isfile(image)


def pipeline_labels(labels: Any, argument: str = "candidate_labels") -> list[str]:
    """Checked candidate labels; a string is split at commas (as transformers does) and each piece
    stripped, so that "cat, dog" gives "dog", not " dog"."""
    if labels is None:
        raise TypeError(f"{argument} is missing; pass a string or a list of strings")
    if isinstance(labels, str):
        labels = labels.split(",")
    return checked_queries(labels, "candidate label", argument)


def _checked_options(kwargs: dict[str, Any]) -> None:
    """The pipeline's `threshold` and `top_k`, checked where given (transformers reads `top_k=0`
    as "all" and a negative one as "all but the last")."""
    if "threshold" in kwargs:
        kwargs["threshold"] = check_fraction("threshold", kwargs["threshold"])
    if "top_k" in kwargs:
        kwargs["top_k"] = check_top_k(kwargs["top_k"])


def _checked_query(query: dict[str, Any], index: int) -> dict[str, Any]:
    """One `{"image": ..., "candidate_labels": ...}` pipeline input, checked."""
    if "image" not in query:
        raise ValueError(f"input {index} has no 'image' key; expected image and candidate_labels")
    labels = pipeline_labels(query.get("candidate_labels"), f"input {index}'s candidate_labels")
    return {**query, "image": pipeline_image(query["image"], index), "candidate_labels": labels}


def _per_image_labels(labels: Any, count: int) -> list[str] | list[list[str]]:
    """One label list for all `count` images, or one per image (the two forms transformers takes)."""
    if (
        isinstance(labels, (list, tuple))
        and labels
        and all(isinstance(item, (list, tuple)) for item in labels)
    ):
        if len(labels) != count:
            raise ValueError(f"got {count} images but {len(labels)} candidate_labels lists")
        return [
            pipeline_labels(item, f"candidate_labels[{index}]") for index, item in enumerate(labels)
        ]
    return pipeline_labels(labels)


def checked_detection_inputs(image: Any, candidate_labels: Any) -> tuple[Any, Any]:
    """The zero-shot detection pipeline's inputs, checked: images converted by [`pipeline_image`],
    labels by [`pipeline_labels`]. Generators and datasets pass unchecked (they cannot be read
    ahead without being consumed)."""
    if isinstance(image, dict):
        return _checked_query(image, 0), None
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError("image is an empty list; pass at least one image")
        if all(isinstance(item, dict) for item in image):
            return [_checked_query(item, index) for index, item in enumerate(image)], None
        images = [pipeline_image(item, index) for index, item in enumerate(image)]
        return images, _per_image_labels(candidate_labels, len(images))
    if isinstance(image, (Iterator, torch.utils.data.Dataset)):
        return image, candidate_labels
    if image is None:
        raise LoupeImageError("no image given (image=None)")
    return pipeline_image(image), pipeline_labels(candidate_labels)


def check_pipeline_tokenizer(pipeline: Any) -> None:
    """Refuses a LOUPE pipeline whose tokenizer holds only its special tokens: that is what
    `AutoTokenizer` loads from a checkpoint without `tokenizer.json` (or `vocab.txt`), and every
    word would then be `[UNK]`, giving the same scores for all labels without any error."""
    tokenizer = pipeline.tokenizer
    if tokenizer is not None and len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        raise OSError(
            f"{pipeline.model.name_or_path}: the tokenizer holds only its {len(tokenizer)} special "
            "tokens, so every word would be [UNK]; the checkpoint lacks its tokenizer file "
            "(tokenizer.json or vocab.txt)"
        )


class LoupeZeroShotObjectDetectionPipeline(ZeroShotObjectDetectionPipeline):
    """transformers' `zero-shot-object-detection` pipeline; for a LOUPE model its arguments are
    checked first (no labels, an empty label, a bad `threshold` or `top_k` are refused by name)
    and NumPy or torch images are accepted. Other models see transformers' behaviour unchanged."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if is_loupe_model(self.model):
            check_pipeline_tokenizer(self)

    def __call__(self, image: Any, candidate_labels: Any = None, **kwargs: Any) -> Any:
        if is_loupe_model(self.model):
            candidate_labels = kwargs.pop("text_queries", candidate_labels)
            image, candidate_labels = checked_detection_inputs(image, candidate_labels)
            _checked_options(kwargs)
        return super().__call__(image, candidate_labels, **kwargs)


def checked_hypothesis_template(template: Any) -> str:
    """A classification prompt with exactly one `{}`, where each label goes: without it every label
    gives the same text and every score the same value."""
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(
            f"hypothesis_template must be a string with exactly one {{}} for the label, "
            f"got {template!r}"
        )
    return template


class LoupeZeroShotImageClassificationPipeline(ZeroShotImageClassificationPipeline):
    """transformers' `zero-shot-image-classification` pipeline, with LOUPE's argument checks for a
    LOUPE model (see [`LoupeZeroShotObjectDetectionPipeline`]); unchanged for other models."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if is_loupe_model(self.model):
            check_pipeline_tokenizer(self)

    def __call__(self, image: Any = None, candidate_labels: Any = None, **kwargs: Any) -> Any:
        if is_loupe_model(self.model):
            image = kwargs.pop("images", image)
            if image is None:
                raise LoupeImageError("no image given (image=None)")
            if isinstance(image, (list, tuple)):
                image = [pipeline_image(item, index) for index, item in enumerate(image)]
            else:
                image = pipeline_image(image)
            candidate_labels = pipeline_labels(candidate_labels)
            if "hypothesis_template" in kwargs:
                checked_hypothesis_template(kwargs["hypothesis_template"])
        return super().__call__(image, candidate_labels=candidate_labels, **kwargs)


PIPELINE_CLASSES = {
    "zero-shot-object-detection": LoupeZeroShotObjectDetectionPipeline,
    "zero-shot-image-classification": LoupeZeroShotImageClassificationPipeline,
}


def register_loupe_pipelines() -> None:
    """Points the two zero-shot tasks of transformers' pipeline registry at the LOUPE subclasses
    (idempotent). Only the implementation is replaced: the task's default model and model classes
    stay, and the subclasses behave as transformers' own for any model that is not LOUPE."""
    from transformers.pipelines import PIPELINE_REGISTRY

    for task, pipeline_class in PIPELINE_CLASSES.items():
        entry = PIPELINE_REGISTRY.supported_tasks[task]
        if entry["impl"] is not pipeline_class:
            PIPELINE_REGISTRY.supported_tasks[task] = {**entry, "impl": pipeline_class}


# On import, as the package registers its Auto classes: `pipeline(task, model=checkpoint)` picks
# its class before it loads the model, so there is no later moment at which LOUPE could step in.
register_loupe_pipelines()


__all__ = [
    "PIPELINE_CLASSES",
    "LoupeZeroShotImageClassificationPipeline",
    "LoupeZeroShotObjectDetectionPipeline",
    "check_pipeline_tokenizer",
    "checked_detection_inputs",
    "checked_hypothesis_template",
    "checked_processor",
    "checked_queries",
    "detect",
    "detect_in_regions",
    "encode_images",
    "encode_queries",
    "ground",
    "ground_in_regions",
    "image_size",
    "is_loupe_model",
    "pipeline_image",
    "pipeline_labels",
    "register_loupe_pipelines",
]
