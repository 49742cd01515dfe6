"""Zero-shot detection and visual grounding (METHOD §5): the one path from images and text to boxes,
used by `LoupeForZeroShotDetection.detect/ground`, the Space and the evaluation runners.

Each step takes a detector (a [`LoupeForZeroShotDetection`]) and its processor:
`encode_images` → region proposals and embeddings (reusable for any text), `encode_queries` →
text embeddings, then `detect_in_regions` (class scores, NMS, boxes in pixels) or
`ground_in_regions` (the single best region per expression). `detect` and `ground` chain them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .image_processing_loupe import to_rgb_array


def checked_queries(queries: Sequence[str] | str, what: str) -> list[str]:
    """Non-empty, stripped query strings; a clear error naming `what` otherwise."""
    queries = [queries] if isinstance(queries, str) else list(queries)
    if not queries:
        raise ValueError(f"no {what}s given")
    for index, query in enumerate(queries):
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"{what} {index} is empty or not a string: {query!r}")
    return [query.strip() for query in queries]


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
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    labels = checked_queries(labels, "label")
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


__all__ = [
    "checked_queries",
    "detect",
    "detect_in_regions",
    "encode_images",
    "encode_queries",
    "ground",
    "ground_in_regions",
    "image_size",
]
