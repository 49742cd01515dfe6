"""Model → predictions → metrics: the zero-shot evaluations of a LOUPE checkpoint (METHOD §5).

Each runner encodes images in batches (each image once), scores all text queries in one batch,
and hands plain predictions to the model-agnostic metrics of this package. A "CLIP + pixels"-style
baseline (dense patch–text similarity turned into boxes) is here too, so every detection number
can be reported next to its reference.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import zero_shot
from ..configuration_loupe import DEFAULT_PROMPT_TEMPLATE
from ..modeling_loupe import LoupeForZeroShotDetection, LoupeModel
from .class_names import SHAPE_CATEGORY_IDS
from .detection import coco_map
from .grounding import group_by_image, synthetic_grounding_items


def _pixel_values(processor: Any, images: Sequence[Any], device: torch.device) -> torch.Tensor:
    """The processor's `pixel_values` of `images`, on the model's device."""
    return processor(images=list(images))["pixel_values"].to(device)


def _batches(items: Sequence[Any], size: int, desc: str) -> Iterator[tuple[int, Sequence[Any]]]:
    """`(start, items[start : start + size])` chunks, with a progress bar."""
    for start in tqdm(range(0, len(items), size), desc=desc, leave=False):
        yield start, items[start : start + size]


def compute_metric(name: str, **inputs: Any) -> dict[str, float]:
    """One of the `evaluate` metric scripts shipped in `loupe_hf/evaluation/metrics/`, loaded by path
    (offline) and computed on plain lists."""
    from . import load_metric  # the package's __init__ owns the metric paths

    return load_metric(name).compute(**inputs)


def as_detector(model: LoupeModel | LoupeForZeroShotDetection) -> LoupeForZeroShotDetection:
    """`model` itself, or a detector around a dual encoder's weights (shared, not copied)."""
    if isinstance(model, LoupeForZeroShotDetection):
        return model
    return LoupeForZeroShotDetection.from_model(model)


@torch.inference_mode()
def _embed_in_batches(
    items: Sequence[Any], batch_size: int, desc: str, embed: Callable[[list[Any]], torch.Tensor]
) -> torch.Tensor:
    """L2-normalised `embed(chunk)` of every chunk of `items`, concatenated: `[len(items), P]`."""
    chunks = [
        F.normalize(embed(list(chunk)), dim=-1) for _, chunk in _batches(items, batch_size, desc)
    ]
    return torch.cat(chunks)


def encode_texts(
    model: LoupeModel, processor: Any, texts: Sequence[str], batch_size: int = 256
) -> torch.Tensor:
    """L2-normalised global text embeddings `[T, P]`."""

    def embed(chunk: list[str]) -> torch.Tensor:
        tokens = processor.tokenizer(chunk, padding=True, truncation=True, return_tensors="pt")
        tokens = tokens.to(model.device)
        return model.get_text_features(tokens["input_ids"], tokens["attention_mask"])

    return _embed_in_batches(list(texts), batch_size, "texts", embed)


def encode_images(
    model: LoupeModel, processor: Any, images: Sequence[Any], batch_size: int = 64
) -> torch.Tensor:
    """L2-normalised global image embeddings `[I, P]`."""

    def embed(chunk: list[Any]) -> torch.Tensor:
        return model.get_image_features(_pixel_values(processor, chunk, model.device))

    return _embed_in_batches(list(images), batch_size, "images", embed)


def evaluate_retrieval(
    model: LoupeModel,
    processor: Any,
    images: Sequence[Any],
    captions: Sequence[str],
    text_to_image: Sequence[int],
) -> dict[str, float]:
    """Image↔text retrieval R@1/5/10 from global embeddings."""
    similarity = (
        encode_images(model, processor, images) @ encode_texts(model, processor, captions).t()
    )
    owners = list(text_to_image)
    captions_of = [
        [text for text, owner in enumerate(owners) if owner == image]
        for image in range(len(similarity))
    ]
    return compute_metric(
        "retrieval_recall", predictions=similarity.tolist(), references=captions_of
    )


def evaluate_synthetic_retrieval(
    model: LoupeModel, processor: Any, samples: Sequence[Mapping]
) -> dict[str, float]:
    return evaluate_retrieval(
        model,
        processor,
        [s["image"] for s in samples],
        [s["caption"] for s in samples],
        list(range(len(samples))),
    )


@torch.inference_mode()
def detect_batches(
    detector: LoupeForZeroShotDetection,
    processor: Any,
    images: Sequence[Any],
    image_ids: Sequence[int],
    class_names: Sequence[str],
    category_ids: Sequence[int],
    template: str | None = None,
    batch_size: int = 32,
    max_detections: int = 100,
) -> list[dict[str, Any]]:
    """COCO-format detections of `class_names` in `images`, through the zero-shot path
    (`loupe_hf.zero_shot`), each name in `template` (default: the checkpoint's `prompt_template`)."""
    template = detector.config.prompt_template if template is None else template
    prompts = [template.format(name) for name in class_names]
    text_embeds = zero_shot.encode_queries(
        detector, processor, prompts, apply_prompt_template=False
    )
    detections = []
    for start, chunk in _batches(list(images), batch_size, "detection"):
        regions = zero_shot.encode_images(detector, processor, chunk)
        results = zero_shot.detect_in_regions(
            detector,
            processor,
            regions,
            text_embeds,
            class_names,
            [zero_shot.image_size(image) for image in chunk],
            threshold=0.0,
            top_k=max_detections,
        )
        for offset, result in enumerate(results):
            detections += _coco_results(result, image_ids[start + offset], category_ids)
    return detections


def _coco_results(
    result: Mapping[str, torch.Tensor], image_id: int, category_ids: Sequence[int]
) -> list[dict]:
    rows = []
    for score, label, (x0, y0, x1, y1) in zip(
        result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist(), strict=True
    ):
        rows.append(
            {
                "image_id": int(image_id),
                "category_id": int(category_ids[label]),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(score),
            }
        )
    return rows


def evaluate_synthetic_detection(
    model: LoupeModel | LoupeForZeroShotDetection,
    processor: Any,
    samples: Sequence[Mapping],
    template: str | None = None,
    method: str = "regions",
) -> dict[str, Any]:
    """Zero-shot detection mAP@0.3/0.5 of the synthetic shapes (classes = the shape names).

    `method="regions"` uses LOUPE's region proposals; `method="dense"` is the dense-similarity baseline.
    """
    from ..data import to_coco

    names = list(SHAPE_CATEGORY_IDS)
    ids = [SHAPE_CATEGORY_IDS[name] for name in names]
    images, image_ids = [s["image"] for s in samples], [int(s["image_id"]) for s in samples]
    if method == "regions":
        detections = detect_batches(
            as_detector(model), processor, images, image_ids, names, ids, template
        )
    elif method == "dense":
        base = model.loupe if isinstance(model, LoupeForZeroShotDetection) else model
        detections = dense_similarity_detections(
            base, processor, images, image_ids, names, ids, template
        )
    else:
        raise ValueError(f"unknown detection method {method!r}; choose regions or dense")
    return coco_map(to_coco(samples), detections)


@torch.inference_mode()
def dense_similarity_detections(
    model: LoupeModel,
    processor: Any,
    images: Sequence[Any],
    image_ids: Sequence[int],
    class_names: Sequence[str],
    category_ids: Sequence[int],
    template: str | None = None,
    batch_size: int = 32,
    relative_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """The "CLIP + pixels" baseline: per class, the patch–text similarity map of the dense grid, minus
    the mean map over all classes (otherwise the best patch is background, as it is on a CMC-only
    model); the cells above `relative_threshold` of the way from the map's minimum to its maximum,
    connected to the best cell, give one box per class and image, scored by the best cell's logit."""
    template = model.config.prompt_template if template is None else template
    text_embeds = encode_texts(model, processor, [template.format(name) for name in class_names])
    grid = model.grid_size
    detections = []
    for start, chunk in _batches(list(images), batch_size, "dense baseline"):
        pixel_values = _pixel_values(processor, chunk, model.device)
        patches = F.normalize(model.visual_projection(model.encode_image(pixel_values)), dim=-1)
        maps = patches @ text_embeds.t()  # [B, N, C]
        relative = maps - maps.mean(dim=-1, keepdim=True)
        scale = model.logit_scale.exp()
        for offset, image in enumerate(chunk):
            for column, category in enumerate(category_ids):
                cells = relative[offset, :, column].reshape(grid, grid)
                box = _component_box(cells, relative_threshold)
                score = torch.sigmoid(
                    scale * (maps[offset, :, column].max() - model.similarity_offset)
                )
                x0, y0, x1, y1 = _cells_on_image(model, box, grid)
                detections.append(
                    {
                        "image_id": int(image_ids[start + offset]),
                        "category_id": int(category),
                        "bbox": [
                            x0 * image.width,
                            y0 * image.height,
                            (x1 - x0) * image.width,
                            (y1 - y0) * image.height,
                        ],
                        "score": float(score),
                    }
                )
    return detections


def _cells_on_image(
    model: LoupeModel, box: tuple[int, int, int, int], grid: int
) -> tuple[float, ...]:
    """A box in cells (x0, y0, x1, y1, ends exclusive) as normalised xyxy on the image."""
    x0, y0, x1, y1 = (v / grid for v in box)
    on_grid = torch.tensor([[(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]])
    cx, cy, w, h = model.grid_to_image(on_grid)[0].tolist()
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def _component_box(cells: torch.Tensor, relative_threshold: float) -> tuple[int, int, int, int]:
    """Bounding box, in cells, of the 4-connected component of above-threshold cells at the maximum."""
    low, high = cells.min(), cells.max()
    above = (cells >= low + relative_threshold * (high - low)).tolist()
    size = cells.shape[0]
    start = divmod(int(cells.argmax()), size)
    seen, stack = {start}, [start]
    while stack:
        row, column = stack.pop()
        for r, c in ((row + 1, column), (row - 1, column), (row, column + 1), (row, column - 1)):
            if 0 <= r < size and 0 <= c < size and above[r][c] and (r, c) not in seen:
                seen.add((r, c))
                stack.append((r, c))
    rows = [r for r, _ in seen]
    columns = [c for _, c in seen]
    return min(columns), min(rows), max(columns) + 1, max(rows) + 1


def evaluate_synthetic_grounding(
    model: LoupeModel | LoupeForZeroShotDetection, processor: Any, samples: Sequence[Mapping]
) -> dict[str, float]:
    """Accuracy at IoU ≥ 0.5 of the top-1 region for each referring expression."""
    detector = as_detector(model)
    items = synthetic_grounding_items(samples)
    predictions: list[Any] = [None] * len(items)
    for group in tqdm(group_by_image(items), desc="grounding", leave=False):
        image = items[group[0]].image
        results = detector.ground(
            [image] * len(group), [items[i].expression for i in group], processor
        )
        for index, result in zip(group, results, strict=True):
            x0, y0, x1, y1 = result["box"]
            predictions[index] = [x0, y0, x1 - x0, y1 - y0]
    return compute_metric(
        "grounding_accuracy", predictions=predictions, references=[list(item.box) for item in items]
    )


def evaluate_classification(
    model: LoupeModel,
    processor: Any,
    images: Sequence[Any],
    labels: Sequence[int],
    class_names: Sequence[str],
    templates: Sequence[str] = (DEFAULT_PROMPT_TEMPLATE,),
) -> dict[str, float]:
    """Zero-shot classification: class embeddings are the mean of the templates' text embeddings."""
    per_class = []
    for name in class_names:
        embeds = encode_texts(model, processor, [template.format(name) for template in templates])
        per_class.append(F.normalize(embeds.mean(0), dim=-1))
    logits = encode_images(model, processor, images) @ torch.stack(per_class).t()
    return compute_metric(
        "zero_shot_accuracy",
        predictions=logits.tolist(),
        references=list(labels),
        ks=(1, min(5, len(class_names))),
    )


@torch.inference_mode()
def pointing_game(
    model: LoupeModel, processor: Any, samples: Sequence[Mapping], batch_size: int = 32
) -> dict[str, float]:
    """Does the dense patch–text similarity point at the object a phrase names? (A localisation
    diagnostic, independent of the region module.)

    For every object of every sample, the map of cosines between its phrase's text embedding and the
    projected patch tokens is computed; a hit is a map whose best cell centre lies inside the object's
    box. Returns the hit rate (`pointing_accuracy`), the same for the *least* similar cell
    (`pointing_accuracy_least_similar`: well above chance means objects are anti-aligned with their
    own phrase), the chance rate (`pointing_chance`, the mean share of cells inside the box), and the
    mean cosine of the phrase with the cells inside its object (`object_cosine`) and outside it
    (`outside_cosine`).
    """
    grid = model.grid_size
    centres = (torch.arange(grid, dtype=torch.float32, device=model.device) + 0.5) / grid
    rows, columns = torch.meshgrid(centres, centres, indexing="ij")
    # where each cell's token looks, on the image (`LoupeModel.grid_to_image`)
    offset_x, offset_y = model.vision_model.token_centre_offset
    rows, columns = rows + offset_y, columns + offset_x
    best = least = chance = total = object_cosine = outside_cosine = 0.0
    for _, chunk in _batches(list(samples), batch_size, "pointing game"):
        pixel_values = _pixel_values(processor, [s["image"] for s in chunk], model.device)
        patches = F.normalize(model.visual_projection(model.encode_image(pixel_values)), dim=-1)
        phrases = [phrase for s in chunk for phrase in s["objects"]["phrase"]]
        texts = encode_texts(model, processor, phrases)
        owners = [i for i, s in enumerate(chunk) for _ in s["objects"]["phrase"]]
        maps = (patches[owners] @ texts.unsqueeze(-1)).squeeze(-1)  # [objects, N]
        boxes = [
            [v / size for v, size in zip(box, (s["width"], s["height"]) * 2, strict=True)]
            for s in chunk
            for box in s["objects"]["bbox"]
        ]
        for cells, (x, y, w, h) in zip(maps, boxes, strict=True):
            inside = ((columns >= x) & (columns <= x + w) & (rows >= y) & (rows <= y + h)).flatten()
            best += float(inside[cells.argmax()])
            least += float(inside[cells.argmin()])
            chance += float(inside.float().mean())
            object_cosine += float(cells[inside].mean()) if inside.any() else 0.0
            outside_cosine += float(cells[~inside].mean())
            total += 1
    total = max(total, 1.0)
    return {
        "pointing_accuracy": best / total,
        "pointing_accuracy_least_similar": least / total,
        "pointing_chance": chance / total,
        "object_cosine": object_cosine / total,
        "outside_cosine": outside_cosine / total,
    }


__all__ = [
    "as_detector",
    "dense_similarity_detections",
    "detect_batches",
    "encode_images",
    "encode_texts",
    "evaluate_classification",
    "evaluate_retrieval",
    "evaluate_synthetic_detection",
    "evaluate_synthetic_grounding",
    "evaluate_synthetic_retrieval",
    "pointing_game",
]
