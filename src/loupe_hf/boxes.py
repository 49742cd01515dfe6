"""Box geometry of LOUPE's regions: the dense grid, box masks over its cells, candidate selection
and conversion to pixels. Boxes are normalised (cx, cy, w, h) unless a name says otherwise;
format conversions and NMS go through `torchvision.ops`."""

from __future__ import annotations

from typing import Any

import torch
from torchvision.ops import box_convert, nms


def grid_centres(grid_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Normalised (x, y) centres of the cells of a square grid, row-major: `[grid_size**2, 2]`."""
    coords = (torch.arange(grid_size, device=device, dtype=torch.float32) + 0.5) / grid_size
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)


def clip_boxes_to_image(boxes: torch.Tensor) -> torch.Tensor:
    """(cx, cy, w, h) boxes cut to the image `[0, 1]^2`. A box centred near the border covers only the
    in-image cells, so its drawn extent should too (unclipped, an edge box's IoU with the object it
    covers is understated, and post-processing would clip it anyway)."""
    corners = box_convert(boxes, "cxcywh", "xyxy").clamp(0.0, 1.0)
    return box_convert(corners, "xyxy", "cxcywh")


def pixel_boxes(boxes: torch.Tensor, size: Any = None) -> torch.Tensor:
    """Normalised (cx, cy, w, h) → (x0, y0, x1, y1) clipped to the image, in pixels of an image of
    `size` (height, width; a sequence or a tensor), or normalised when `size` is None."""
    corners = box_convert(boxes, "cxcywh", "xyxy").clamp(0, 1)
    if size is None:
        return corners
    height, width = (float(value) for value in (size.tolist() if hasattr(size, "tolist") else size))
    return corners * torch.tensor([width, height, width, height], device=boxes.device)


def soft_box_masks(boxes: torch.Tensor, grid_size: int, sharpness: float) -> torch.Tensor:
    """Differentiable membership of each grid cell in each box.

    Args:
        boxes: `[..., K, 4]` normalised (cx, cy, w, h).
        grid_size: side of the cell grid.
        sharpness: softness in cells; the mask is 0.5 on a box edge.

    Returns:
        `[..., K, grid_size**2]` in (0, 1): the product of two sigmoids of the signed distance of the cell
        centre to the box edges, so the loss on a pooled region embedding moves the box width and height.
    """
    centres = grid_centres(grid_size, boxes.device).to(boxes.dtype)
    scale = sharpness / grid_size
    dx = (boxes[..., None, 0] - centres[:, 0]).abs()
    dy = (boxes[..., None, 1] - centres[:, 1]).abs()
    inside_x = torch.sigmoid((boxes[..., None, 2] / 2 - dx) / scale)
    inside_y = torch.sigmoid((boxes[..., None, 3] / 2 - dy) / scale)
    return inside_x * inside_y


def hard_box_masks(boxes: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Cells whose centres fall inside each box (METHOD §3.3): bool `[..., K, grid_size**2]`."""
    centres = grid_centres(grid_size, boxes.device).to(boxes.dtype)
    dx = (boxes[..., None, 0] - centres[:, 0]).abs()
    dy = (boxes[..., None, 1] - centres[:, 1]).abs()
    # Boxes are centred on a cell, so that cell is always inside: a region is never empty.
    return (dx <= boxes[..., None, 2] / 2 + 1e-6) & (dy <= boxes[..., None, 3] / 2 + 1e-6)


def select_regions(
    boxes: torch.Tensor, logits: torch.Tensor, num_regions: int, nms_iou: float
) -> torch.Tensor:
    """Indices `[B, K]` of the top-K candidates by confidence after greedy NMS at `nms_iou`.

    When NMS leaves fewer than K boxes, the best suppressed ones fill up the rest, so K is fixed.
    """
    num_candidates = boxes.shape[1]
    k = min(num_regions, num_candidates)
    if nms_iou >= 1.0:
        return logits.topk(k, dim=1).indices
    with torch.no_grad():
        scores = logits.detach().float()
        corners = box_convert(boxes.detach().float(), "cxcywh", "xyxy")
        if scores.shape[0] == 1:  # one image (a pipeline call): torchvision's kernel is cheaper
            kept = torch.zeros_like(scores, dtype=torch.bool)
            kept[0, nms(corners[0], scores[0], nms_iou)[:k]] = True
        else:
            kept = greedy_nms_first_k(corners, scores, k, nms_iou)
        # Rank kept boxes first (by score), then suppressed ones (by score).
        priority = kept * (scores.max() - scores.min() + 1) + scores
        return priority.topk(k, dim=1).indices


def batched_box_iou(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """IoU of every box of `first` `[..., K, 4]` with every box of `second` `[..., C, 4]`, both (x0, y0,
    x1, y1) with the same leading dims: `[..., K, C]` (`torchvision.ops.box_iou` takes one image)."""
    top_left = torch.maximum(first[..., :, None, :2], second[..., None, :, :2])
    bottom_right = torch.minimum(first[..., :, None, 2:], second[..., None, :, 2:])
    inter = (bottom_right - top_left).clamp_min(0).prod(-1)
    area_first = (first[..., 2] - first[..., 0]) * (first[..., 3] - first[..., 1])
    area_second = (second[..., 2] - second[..., 0]) * (second[..., 3] - second[..., 1])
    union = area_first[..., :, None] + area_second[..., None, :] - inter
    return inter / union.clamp_min(torch.finfo(inter.dtype).tiny)


def logits_near(
    boxes: torch.Tensor,
    candidate_boxes: torch.Tensor,
    candidate_logits: torch.Tensor,
    min_iou: float,
) -> torch.Tensor:
    """The candidates' confidence logits seen from each kept box, `[B, K, C]`: -inf for the
    candidates that overlap it by IoU below `min_iou` (boxes (cx, cy, w, h), as the region module's)."""
    corners = box_convert(boxes.detach().float(), "cxcywh", "xyxy")
    candidates = box_convert(candidate_boxes.detach().float(), "cxcywh", "xyxy")
    near = batched_box_iou(corners, candidates) >= min_iou - 1e-6
    logits = candidate_logits.detach().float()[:, None, :].nan_to_num(float("-inf"))
    return torch.where(near, logits, float("-inf"))


def refine_by_confidence(
    boxes: torch.Tensor,
    candidate_boxes: torch.Tensor,
    candidate_logits: torch.Tensor,
    min_iou: float,
) -> torch.Tensor:
    """Indices `[B, K]` of the most confident candidate among those overlapping each box by IoU ≥
    `min_iou` (the box itself always qualifies when it is a candidate; `min_iou=1` keeps it).

    Detection asks two questions of a region: which object (its embedding against the query) and
    where its extent is. The similarity of a pooled box does not reward fit (a loose box pools the
    same object features), while the confidence, trained by TSA on the patches' interaction, does
    (docs/design_choices.md, "Which object, then which box").

    Args:
        boxes: `[B, K, 4]` (cx, cy, w, h), the kept regions.
        candidate_boxes: `[B, C, 4]` (cx, cy, w, h), every candidate of the region module.
        candidate_logits: `[B, C]` their confidence logits.
        min_iou: overlap with a kept box at or above which a candidate may replace it.
    """
    return logits_near(boxes, candidate_boxes, candidate_logits, min_iou).argmax(-1)


def fuse_confident_candidates(
    boxes: torch.Tensor,
    candidate_boxes: torch.Tensor,
    candidate_logits: torch.Tensor,
    min_iou: float,
    num_fused: int,
    near: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each kept box replaced by the mean of the `num_fused` most confident candidates overlapping
    it by IoU ≥ `min_iou`, weighted by the softmax of their confidence logits: `[B, K, 4]` (cx, cy,
    w, h). The candidates sit on a grid of anchors, so one of them rarely fits an object exactly,
    while the confident ones around it err on different sides. A kept box with no such candidate
    stays as it is. Arguments as `refine_by_confidence`'s; `near`, when given, is their
    `logits_near` (the detector computes it once for refinement and fusion)."""
    if isinstance(num_fused, bool) or not isinstance(num_fused, int) or num_fused < 1:
        raise ValueError(f"num_fused must be an integer >= 1, got {num_fused!r}")
    if near is None:
        near = logits_near(boxes, candidate_boxes, candidate_logits, min_iou)
    top = near.topk(min(num_fused, near.shape[-1]), dim=-1)
    # An all -inf row (nothing near) gives NaN weights: zeros, and the kept box below.
    weights = torch.softmax(top.values, dim=-1).nan_to_num(0.0)
    candidates = box_convert(candidate_boxes.detach().float(), "cxcywh", "xyxy")
    picked = candidates.gather(1, top.indices.flatten(1)[..., None].expand(-1, -1, 4))
    fused = (weights[..., None] * picked.view(*top.indices.shape, 4)).sum(-2)
    fused = box_convert(fused, "xyxy", "cxcywh")
    found = top.values[..., :1].isfinite()
    return torch.where(found, fused, boxes.detach().float()).to(candidate_boxes.dtype)


def greedy_nms_first_k(
    corners: torch.Tensor, scores: torch.Tensor, k: int, iou_threshold: float
) -> torch.Tensor:
    """The first `k` boxes greedy NMS keeps in each image, as a bool mask `[B, C]`.

    The same boxes as `torchvision.ops.nms` per image (a box is dropped when its IoU with a kept,
    higher-scored box exceeds `iou_threshold`) cut to the first `k` kept, but for every image at
    once in `k` rounds: a loop of one NMS call per image cost more than the rest of region
    selection (docs/design_choices.md, "Kernels").

    Args:
        corners: `[B, C, 4]` (x0, y0, x1, y1).
        scores: `[B, C]`.
        k: kept boxes wanted per image (fewer when NMS keeps fewer).
        iou_threshold: IoU above which a lower-scored box is suppressed.
    """
    batch, num_boxes = scores.shape
    rows = torch.arange(batch, device=scores.device)
    candidates = scores.masked_fill(scores.isnan(), float("-inf"))
    open_ = torch.ones(batch, num_boxes, dtype=torch.bool, device=scores.device)
    kept = torch.zeros_like(open_)
    for _ in range(min(k, num_boxes)):
        best = candidates.masked_fill(~open_, float("-inf")).argmax(1)
        has_open = open_[rows, best]  # an image with nothing left open keeps what it has
        overlap = batched_box_iou(corners[rows, best][:, None], corners)[:, 0]
        picked = torch.zeros_like(open_)
        picked[rows, best] = has_open
        kept |= picked
        open_ &= ~((overlap > iou_threshold) & has_open[:, None]) & ~picked
    return kept


__all__ = [
    "batched_box_iou",
    "clip_boxes_to_image",
    "fuse_confident_candidates",
    "greedy_nms_first_k",
    "grid_centres",
    "hard_box_masks",
    "logits_near",
    "pixel_boxes",
    "refine_by_confidence",
    "select_regions",
    "soft_box_masks",
]
