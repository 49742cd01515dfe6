"""Zero-shot visual grounding: RefCOCO/RefCOCO+ loader, box IoU and accuracy@IoU.

LOUPE feeds each referring expression as text, takes the top-1 region as the prediction, and
counts it correct when its IoU with the referred object's box is ≥ 0.5 (METHOD §5).

RefCOCO data (``refer`` layout, e.g. ``refcoco/``): ``refs(unc).p`` is a pickled list of refs
``{"ref_id", "ann_id", "image_id", "split", "sentences": [{"sent", "raw", ...}], ...}`` and
``instances.json`` holds the COCO ``images`` (``file_name``) and ``annotations`` (``bbox``
``[x, y, w, h]``) they point to; images come from COCO ``train2014``.
"""

from __future__ import annotations

import pickle
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torchvision.ops import box_convert
from torchvision.ops import box_iou as ops_box_iou
from tqdm.auto import tqdm

from loupe_hf.evaluation._arrays import read_json_file, to_numpy

__all__ = [
    "GroundingItem",
    "box_iou",
    "grounding_accuracy",
    "group_by_image",
    "load_refcoco",
    "synthetic_grounding_items",
]

BOX_FORMATS = ("xywh", "xyxy")
# Rows per block of the aligned IoU (a block is a [rows, rows] pairwise matrix).
ALIGNED_BLOCK = 512


class GroundingItem(NamedTuple):
    """One grounding query: an image, a referring expression and the referred object's box.

    Attributes:
        image: Image file path (RefCOCO) or the in-memory image (synthetic: a ``PIL.Image``).
        expression: The referring expression.
        box: Ground-truth box ``(x, y, w, h)`` in pixels.
    """

    image: Any
    expression: str
    box: tuple[float, float, float, float]


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles plain containers only (lists, dicts, tuples, strings, numbers, sets): a pickle
    that names any other class or function is refused, so a crafted file cannot run code."""

    ALLOWED = {("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return {"set": set, "frozenset": frozenset}[name]
        raise pickle.UnpicklingError(
            f"refuses to load {module}.{name}: only plain lists, dicts, strings and numbers are read"
        )


def _load_refs(refs_file: Path) -> list[dict[str, Any]]:
    """The refs of a ``refs(*).p`` file (written by Python 2), read with `_PlainDataUnpickler`."""
    with refs_file.open("rb") as handle:
        try:
            try:
                return _PlainDataUnpickler(handle).load()
            except UnicodeDecodeError:  # a Python 2 str with non-ASCII bytes
                handle.seek(0)
                return _PlainDataUnpickler(handle, encoding="latin1").load()
        except Exception as error:
            # Damaged bytes fail in many ways inside the unpickler (UnpicklingError, EOFError,
            # OverflowError on a huge length, KeyError on a bad memo...); the restricted unpickler
            # runs no user code, so every one of them means the file is not a refs file.
            raise ValueError(f"{refs_file} is not a plain RefCOCO refs file: {error}") from error


def load_refcoco(
    refs_file: str | Path,
    instances_file: str | Path,
    image_root: str | Path,
    split: str = "val",
    progress: bool = True,
) -> list[GroundingItem]:
    """One evaluation item per referring expression of ``split``.

    Args:
        refs_file: ``refs(unc).p`` (RefCOCO, RefCOCO+) or another ``refs(*).p``.
        instances_file: The matching ``instances.json``.
        image_root: Directory holding the images' ``file_name`` (COCO ``train2014``).
        split: ``"val"``, ``"testA"``, ``"testB"`` (RefCOCO/RefCOCO+ unc), ``"test"`` (RefCOCOg
            umd), ``"train"``.
        progress: Show a progress bar over the refs.

    Returns:
        Items in file order; every sentence of a ref is its own item (the standard protocol
        counts expressions, not objects). The text is the sentence's ``sent`` field
        (lower-cased, tokenised), falling back to ``raw``.
    """
    refs = _load_refs(Path(refs_file))
    if not isinstance(refs, list) or not all(isinstance(ref, dict) for ref in refs):
        raise ValueError(f"{refs_file} is not a RefCOCO refs file: expected a list of refs (dicts)")
    instances = read_json_file(instances_file)
    if not isinstance(instances, dict) or not all(
        k in instances for k in ("images", "annotations")
    ):
        raise ValueError(
            f"{instances_file} is not a RefCOCO instances file: expected a JSON object with "
            "images and annotations"
        )
    boxes = {ann["id"]: ann["bbox"] for ann in instances["annotations"]}
    file_names = {image["id"]: image["file_name"] for image in instances["images"]}
    root = Path(image_root)
    selected = [ref for ref in refs if ref.get("split") == split]
    if not selected:
        available = sorted({str(ref.get("split")) for ref in refs})
        raise ValueError(f"no refs in split {split!r} of {refs_file}; have {available}")
    items: list[GroundingItem] = []
    for ref in tqdm(selected, desc=f"refs {split}", disable=not progress):
        path = str(root / file_names[ref["image_id"]])
        box = tuple(float(v) for v in boxes[ref["ann_id"]])
        for sentence in ref["sentences"]:
            text = sentence.get("sent") or sentence["raw"]
            items.append(GroundingItem(path, text, box))
    return items


def synthetic_grounding_items(samples: Iterable[Mapping[str, Any]]) -> list[GroundingItem]:
    """Grounding items from the synthetic benchmark's referring expressions.

    Args:
        samples: Outputs of ``loupe_hf.data.generate_sample`` or rows of ``build_dataset``.

    Returns:
        One item per referring expression; ``image`` is the sample's image object (shared by
        the items of one sample, see :func:`group_by_image`).
    """
    items: list[GroundingItem] = []
    for sample in samples:
        bboxes = sample["objects"]["bbox"]
        for expression in sample["referring_expressions"]:
            box = tuple(float(v) for v in bboxes[expression["object_index"]])
            items.append(GroundingItem(sample["image"], expression["text"], box))
    return items


def group_by_image(items: Sequence[GroundingItem]) -> list[list[int]]:
    """Indices of ``items`` grouped by image, in first-appearance order.

    Lets a model encode each image once for all its expressions (RefCOCO val: ~1.5K images,
    ~10.8K expressions). Paths group by value, in-memory images by identity.
    """
    groups: dict[Any, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        key = item.image if isinstance(item.image, str | Path) else id(item.image)
        groups[key].append(index)
    return list(groups.values())


def _as_xyxy(boxes: Any, box_format: str) -> torch.Tensor:
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")
    boxes = torch.from_numpy(to_numpy(boxes, dtype=np.float64))
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4], got {tuple(boxes.shape)}")
    return boxes if box_format == "xyxy" else box_convert(boxes, "xywh", "xyxy")


def box_iou(
    boxes1: Any, boxes2: Any, box_format: str = "xywh", aligned: bool = False
) -> np.ndarray:
    """Intersection over union of axis-aligned boxes (continuous coordinates, as COCO), through
    `torchvision.ops.box_iou` in float64.

    Args:
        boxes1: ``[N, 4]`` boxes (NumPy, torch or lists).
        boxes2: ``[M, 4]`` boxes; ``M == N`` when ``aligned``.
        box_format: ``"xywh"`` (``[x, y, w, h]``, COCO) or ``"xyxy"`` (``[x1, y1, x2, y2]``).
        aligned: Compare ``boxes1[i]`` with ``boxes2[i]`` only.

    Returns:
        ``[N, M]`` IoUs, or ``[N]`` when ``aligned``; 0 where the union is empty.
    """
    a, b = _as_xyxy(boxes1, box_format), _as_xyxy(boxes2, box_format)
    if not aligned:
        return torch.nan_to_num(ops_box_iou(a, b), nan=0.0).numpy()
    if len(a) != len(b):
        raise ValueError(f"aligned boxes need equal counts, got {len(a)} and {len(b)}")
    # The diagonal of pairwise IoUs, a block of rows at a time, so memory stays bounded.
    blocks = [
        ops_box_iou(a[start : start + ALIGNED_BLOCK], b[start : start + ALIGNED_BLOCK]).diagonal()
        for start in range(0, len(a), ALIGNED_BLOCK)
    ]
    ious = torch.cat(blocks) if blocks else torch.zeros(0, dtype=torch.float64)
    return torch.nan_to_num(ious, nan=0.0).numpy()


def grounding_accuracy(
    pred_boxes: Any, gt_boxes: Any, iou_threshold: float = 0.5, box_format: str = "xywh"
) -> dict[str, float]:
    """Share of predicted boxes with IoU ≥ ``iou_threshold`` against their ground truth.

    Args:
        pred_boxes: ``[N, 4]`` one predicted (top-1) box per expression.
        gt_boxes: ``[N, 4]`` the referred objects' boxes, same format.
        iou_threshold: Minimum IoU of a hit (inclusive, as in the RefCOCO protocol).
        box_format: ``"xywh"`` or ``"xyxy"``.

    Returns:
        ``{"accuracy": fraction of hits (the paper: percent), "mean_iou": ...,
        "num_items": N}``.
    """
    ious = box_iou(pred_boxes, gt_boxes, box_format, aligned=True)
    if ious.size == 0:
        raise ValueError("grounding_accuracy needs at least one box pair")
    return {
        "accuracy": float(np.mean(ious >= iou_threshold)),
        "mean_iou": float(np.mean(ious)),
        "num_items": int(ious.size),
    }
