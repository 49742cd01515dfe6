"""Zero-shot detection metric: COCO-style mAP at chosen IoU thresholds, computed by pycocotools.

Ground truth is a COCO detection JSON (a dict or a path): ``images`` (``id``), ``categories``
(``id``, ``name``) and ``annotations`` (``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]``
in pixels, optional ``iscrowd`` and ``area``). Detections use the COCO results format: a list
of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``.

LOUPE reports mAP at IoU 0.3 and 0.5 (COCO on 65 classes, VOC on 20); see
:func:`coco_map` and :func:`restrict_categories`.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from loupe_hf.evaluation._arrays import read_json_file

__all__ = [
    "COCO_KEYS",
    "coco_map",
    "keep_top_detections",
    "load_coco_json",
    "restrict_categories",
]

CocoLike = Mapping[str, Any] | str | Path


COCO_KEYS = ("images", "annotations", "categories")


def load_coco_json(coco: CocoLike) -> dict[str, Any]:
    """A COCO dict from a dict (returned as is) or a JSON file path; a `ValueError` naming the file
    when it is not JSON or lacks one of `COCO_KEYS`."""
    if not isinstance(coco, str | Path):
        return dict(coco)
    data = read_json_file(coco)
    missing = [key for key in COCO_KEYS if key not in data] if isinstance(data, dict) else COCO_KEYS
    if missing:
        raise ValueError(
            f"{coco} is not a COCO detection file: it lacks {', '.join(missing)} "
            f"(expected a JSON object with {', '.join(COCO_KEYS)})"
        )
    return data


def restrict_categories(
    coco_gt: CocoLike, names: Iterable[str], drop_empty_images: bool = True
) -> dict[str, Any]:
    """The ground truth restricted to the categories called ``names`` (ids are kept).

    Args:
        coco_gt: COCO detection dict or JSON path.
        names: Category names as in ``coco_gt["categories"]``, e.g.
            ``COCO_65_CATEGORY_IDS`` for LOUPE's 65-class COCO benchmark.
        drop_empty_images: Also drop images with no annotation of the kept categories. The
            zero-shot COCO/VOC protocols count only images containing a target class (LOUPE's
            "4,836 val2017 images" for the 65 classes); dropping them also removes the false
            positives a detector would make on them, so it changes the score.

    Returns:
        A new COCO dict (the input is not modified).
    """
    data = load_coco_json(coco_gt)
    wanted = set(names)
    by_name = {category["name"]: category for category in data["categories"]}
    missing = sorted(wanted - set(by_name))
    if missing:
        raise ValueError(f"categories not in the ground truth: {missing}")
    keep_ids = {by_name[name]["id"] for name in wanted}
    annotations = [ann for ann in data["annotations"] if ann["category_id"] in keep_ids]
    images = data["images"]
    if drop_empty_images:
        used = {ann["image_id"] for ann in annotations}
        images = [image for image in images if image["id"] in used]
    restricted = {key: value for key, value in data.items() if key not in ("images", "annotations")}
    restricted["images"] = list(images)
    restricted["annotations"] = annotations
    restricted["categories"] = [c for c in data["categories"] if c["id"] in keep_ids]
    return restricted


def keep_top_detections(
    detections: Iterable[Mapping[str, Any]], max_per_image: int = 100
) -> list[dict[str, Any]]:
    """The ``max_per_image`` highest-scoring detections of each image, over all categories.

    COCOeval's ``maxDets`` caps detections per image *and category*; the usual "100 detections
    per image" budget of a detector must be applied before evaluation, e.g. with this.
    """
    per_image: dict[Any, list[Mapping[str, Any]]] = defaultdict(list)
    for detection in detections:
        per_image[detection["image_id"]].append(detection)
    kept: list[dict[str, Any]] = []
    for image_detections in per_image.values():
        ranked = sorted(image_detections, key=lambda d: -float(d["score"]))
        kept.extend(dict(d) for d in ranked[:max_per_image])
    return kept


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Silence pycocotools' progress prints unless ``verbose``."""
    if verbose:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _coco_api(dataset: dict[str, Any], verbose: bool) -> COCO:
    api = COCO()
    api.dataset = dataset
    with _quiet(verbose):
        api.createIndex()
    return api


def _ground_truth_dataset(data: Mapping[str, Any]) -> dict[str, Any]:
    """A copy safe to hand to pycocotools, which writes into annotation dicts.

    Annotation ids are renumbered from 1 because COCOeval stores matches as annotation ids and
    treats id 0 as "unmatched"; missing ``iscrowd``/``area`` get the COCO defaults.
    """
    annotations = []
    for new_id, ann in enumerate(data["annotations"], start=1):
        x, y, w, h = (float(v) for v in ann["bbox"])
        annotations.append(
            {
                **ann,
                "id": new_id,
                "bbox": [x, y, w, h],
                "iscrowd": int(ann.get("iscrowd", 0)),
                "area": float(ann.get("area", w * h)),
            }
        )
    return {
        "images": list(data["images"]),
        "categories": list(data["categories"]),
        "annotations": annotations,
    }


def _detection_dataset(
    detections: Iterable[Mapping[str, Any]], ground_truth: dict[str, Any]
) -> dict[str, Any]:
    """Detections as a COCO dataset, validated against the ground truth.

    Built directly rather than with ``COCO.loadRes``, which fails on an empty list and mutates
    the caller's dicts.
    """
    image_ids = {image["id"] for image in ground_truth["images"]}
    category_ids = {category["id"] for category in ground_truth["categories"]}
    annotations = []
    for new_id, det in enumerate(detections, start=1):
        x, y, w, h = (float(v) for v in det["bbox"])
        score = float(det["score"])
        if w < 0 or h < 0 or not math.isfinite(score):
            raise ValueError(f"invalid detection (negative size or non-finite score): {det}")
        if det["image_id"] not in image_ids:
            raise ValueError(f"detection on an image not in the ground truth: {det}")
        if det["category_id"] not in category_ids:
            # Most often contiguous 0..79 labels passed instead of COCO ids.
            raise ValueError(f"detection with a category not in the ground truth: {det}")
        annotations.append(
            {
                "id": new_id,
                "image_id": det["image_id"],
                "category_id": det["category_id"],
                "bbox": [x, y, w, h],
                "score": score,
                "area": w * h,
                "iscrowd": 0,
            }
        )
    return {
        "images": ground_truth["images"],
        "categories": ground_truth["categories"],
        "annotations": annotations,
    }


def _category_labels(categories: Sequence[Mapping[str, Any]], ids: Sequence[int]) -> list[str]:
    """Category names for result keys; ids disambiguate names that occur twice."""
    names = {category["id"]: str(category.get("name", category["id"])) for category in categories}
    counts: dict[str, int] = defaultdict(int)
    for category_id in ids:
        counts[names[category_id]] += 1
    return [names[i] if counts[names[i]] == 1 else f"{names[i]} (id {i})" for i in ids]


def coco_map(
    coco_gt: CocoLike,
    detections: Iterable[Mapping[str, Any]],
    iou_thresholds: Sequence[float] = (0.3, 0.5),
    category_ids: Iterable[int] | None = None,
    image_ids: Iterable[int] | None = None,
    max_detections: int = 100,
    verbose: bool = False,
) -> dict[str, Any]:
    """Box mAP at each IoU threshold, by pycocotools ``COCOeval`` (101-point interpolated AP).

    A detection matches a ground-truth box of its category at threshold ``t`` when IoU ≥ ``t``
    (greedy by score, as COCOeval does; crowd boxes are ignored). Area range is "all".

    Args:
        coco_gt: Ground-truth COCO dict or JSON path (not modified).
        detections: COCO results: ``image_id``, ``category_id`` (COCO ids of ``coco_gt``),
            ``bbox`` ``[x, y, w, h]`` in pixels, ``score``. May be empty.
        iou_thresholds: IoU thresholds in ``(0, 1]``.
        category_ids: Categories to evaluate (default: all of ``coco_gt``).
        image_ids: Images to evaluate (default: all of ``coco_gt``).
        max_detections: COCOeval ``maxDets``: the top-scoring detections kept per image *and
            category* (see :func:`keep_top_detections` for a per-image budget).
        verbose: Let pycocotools print its progress.

    Returns:
        ``{"mAP@{t}": float}`` per threshold (``t`` formatted with ``:g``, e.g. ``"mAP@0.5"``),
        the mean AP over evaluated categories that have ground truth, as a fraction (the paper
        reports percentages), NaN if no category has ground truth; ``"AP_per_category@{t}"``:
        ``{category name: AP}`` for those categories; ``"categories_without_gt"``: names of
        evaluated categories without ground truth (excluded from the mean, as in COCOeval);
        ``"num_images"``, ``"num_ground_truth"``, ``"num_detections"``.
    """
    thresholds = np.asarray(list(iou_thresholds), dtype=float)
    if thresholds.size == 0 or np.any((thresholds <= 0) | (thresholds > 1)):
        raise ValueError(f"iou_thresholds must be non-empty and lie in (0, 1], got {thresholds}")
    if max_detections < 1:
        raise ValueError(f"max_detections must be >= 1, got {max_detections}")
    ground_truth = _ground_truth_dataset(load_coco_json(coco_gt))
    gt_api = _coco_api(ground_truth, verbose)
    dt_api = _coco_api(_detection_dataset(detections, ground_truth), verbose)

    evaluator = COCOeval(gt_api, dt_api, iouType="bbox")
    params = evaluator.params
    # COCOeval's matching reads any iouThrs; only summarize() assumes the defaults, and we
    # read eval["precision"] directly instead of calling it.
    params.iouThrs = thresholds
    params.maxDets = [int(max_detections)]
    params.areaRng = [[0.0, 1e10]]  # "all" only: the small/medium/large ranges are unused
    params.areaRngLbl = ["all"]
    if category_ids is not None:
        params.catIds = sorted({int(i) for i in category_ids})
        unknown = set(params.catIds) - set(gt_api.getCatIds())
        if unknown:
            raise ValueError(f"category_ids not in the ground truth: {sorted(unknown)}")
    if image_ids is not None:
        params.imgIds = sorted({int(i) for i in image_ids})
    with _quiet(verbose):
        evaluator.evaluate()
        evaluator.accumulate()

    # precision: [T, R, K, A, M]; -1 marks categories without ground truth.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    has_gt = precision[0, 0, :] > -1
    labels = _category_labels(ground_truth["categories"], params.catIds)
    result: dict[str, Any] = {}
    for t, threshold in enumerate(thresholds):
        ap = precision[t].mean(axis=0)  # [K]: mean over the 101 recall thresholds
        key = f"{threshold:g}"
        result[f"mAP@{key}"] = float(ap[has_gt].mean()) if has_gt.any() else math.nan
        result[f"AP_per_category@{key}"] = {
            label: float(value)
            for label, value, keep in zip(labels, ap, has_gt, strict=True)
            if keep
        }
    evaluated = set(params.imgIds)
    categories = set(params.catIds)
    result["categories_without_gt"] = [
        label for label, keep in zip(labels, has_gt, strict=True) if not keep
    ]
    result["num_images"] = len(evaluated)
    result["num_ground_truth"] = sum(
        1
        for ann in ground_truth["annotations"]
        if ann["image_id"] in evaluated and ann["category_id"] in categories and not ann["iscrowd"]
    )
    result["num_detections"] = sum(
        1
        for ann in dt_api.dataset["annotations"]
        if ann["image_id"] in evaluated and ann["category_id"] in categories
    )
    return result
