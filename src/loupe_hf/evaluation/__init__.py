"""Model-agnostic evaluation for LOUPE's zero-shot benchmarks (METHOD §5).

Each metric consumes plain predictions (lists, NumPy arrays or torch tensors) and ground truth:

* detection: :func:`coco_map` (pycocotools mAP at IoU 0.3/0.5), :func:`restrict_categories`;
* retrieval: :func:`load_karpathy_split`, :func:`recall_at_k`;
* grounding: :func:`load_refcoco`, :func:`synthetic_grounding_items`, :func:`box_iou`,
  :func:`grounding_accuracy`;
* classification: :func:`load_image_folder`, :func:`prompt_ensemble`, :func:`zero_shot_accuracy`.

All scores are fractions in ``[0, 1]``; the paper reports percentages. The ``evaluate`` metric
scripts in ``metrics/`` wrap the same functions; :func:`load_metric` loads them by path, which
works offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loupe_hf.evaluation.class_names import (
    COCO_65_CATEGORY_IDS,
    COCO_CATEGORY_IDS,
    COCO_SEEN_48,
    COCO_UNSEEN_17,
    DETECTION_TEMPLATE,
    SHAPE_CATEGORY_IDS,
    SHAPES,
    VOC_CATEGORY_IDS,
    VOC_CLASSES,
    VOC_PROMPT_NAMES,
    VOC_TO_COCO,
    prompt_for,
)
from loupe_hf.evaluation.classification import (
    CLIP_ENSEMBLE_TEMPLATES,
    CLIP_TEMPLATE,
    load_image_folder,
    prompt_ensemble,
    zero_shot_accuracy,
)
from loupe_hf.evaluation.detection import (
    coco_map,
    keep_top_detections,
    load_coco_json,
    restrict_categories,
)
from loupe_hf.evaluation.grounding import (
    GroundingItem,
    box_iou,
    grounding_accuracy,
    group_by_image,
    load_refcoco,
    synthetic_grounding_items,
)
from loupe_hf.evaluation.retrieval import (
    RetrievalSplit,
    load_karpathy_split,
    recall_at_k,
    retrieval_ranks,
)

METRICS_DIR = Path(__file__).parent / "metrics"
METRIC_NAMES: tuple[str, ...] = ("retrieval_recall", "grounding_accuracy", "zero_shot_accuracy")


def metric_path(name: str) -> str:
    """Folder of the shipped ``evaluate`` metric ``name`` (one of :data:`METRIC_NAMES`)."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; expected one of {METRIC_NAMES}")
    return str(METRICS_DIR / name)


def load_metric(name: str, **kwargs: Any) -> Any:
    """``evaluate.load`` of a shipped metric by path (no Hub access); kwargs go to it."""
    import evaluate  # optional dependency (extra "eval"); only needed here

    return evaluate.load(metric_path(name), **kwargs)


__all__ = [
    "CLIP_ENSEMBLE_TEMPLATES",
    "CLIP_TEMPLATE",
    "COCO_65_CATEGORY_IDS",
    "COCO_CATEGORY_IDS",
    "COCO_SEEN_48",
    "COCO_UNSEEN_17",
    "DETECTION_TEMPLATE",
    "METRICS_DIR",
    "METRIC_NAMES",
    "SHAPES",
    "SHAPE_CATEGORY_IDS",
    "VOC_CATEGORY_IDS",
    "VOC_CLASSES",
    "VOC_PROMPT_NAMES",
    "VOC_TO_COCO",
    "GroundingItem",
    "RetrievalSplit",
    "box_iou",
    "coco_map",
    "grounding_accuracy",
    "group_by_image",
    "keep_top_detections",
    "load_coco_json",
    "load_image_folder",
    "load_karpathy_split",
    "load_metric",
    "load_refcoco",
    "metric_path",
    "prompt_ensemble",
    "prompt_for",
    "recall_at_k",
    "restrict_categories",
    "retrieval_ranks",
    "synthetic_grounding_items",
    "zero_shot_accuracy",
]
