"""Region selection (top-K candidates after greedy NMS) for a batch of images; prints JSON.

    python benchmarks/region_selection.py
    python benchmarks/region_selection.py --device cuda

Variants, on the same random candidates in one run:
- `per_image_nms`: torchvision's `batched_nms` over the batch (boxes keyed by image), which on the
  CPU runs one NMS per image for large batches, then the kept boxes ranked first;
- `loupe`: `loupe_hf.boxes.select_regions` (one image: torchvision's NMS; a batch: the first K
  boxes greedy NMS keeps, found for every image at once in K rounds).

Shapes: the `tiny` preset's training batch (64 images, 8x8 grid, 2 anchors: 128 candidates), the
`tiny-128` one (16x16, 4 anchors: 1,024) and a single image. Each row checks that both variants
select the same regions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torchvision.ops import batched_nms, box_convert

from loupe_hf.boxes import select_regions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import device_name


def per_image_nms(boxes: torch.Tensor, logits: torch.Tensor, k: int, iou: float) -> torch.Tensor:
    """The selection as it was before `greedy_nms_first_k`: NMS by image, kept boxes first."""
    batch, count = logits.shape
    corners = box_convert(boxes.float(), "cxcywh", "xyxy").reshape(-1, 4)
    scores = logits.float().reshape(-1)
    images = torch.arange(batch, device=logits.device).repeat_interleave(count)
    kept = batched_nms(corners, scores, images, iou)
    bonus = torch.zeros_like(scores)
    bonus[kept] = 1.0
    priority = bonus * (scores.max() - scores.min() + 1) + scores
    return priority.reshape(batch, count).topk(k, dim=1).indices


def milliseconds(function, repeats: int, device: torch.device) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--num-regions", type=int, default=16)
    parser.add_argument("--nms-iou", type=float, default=0.7)
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    rows = {}
    for name, batch, count in (
        ("tiny: 64 images x 128 candidates", 64, 128),
        ("tiny-128: 64 images x 1024 candidates", 64, 1024),
        ("one image x 128 candidates", 1, 128),
    ):
        centres = torch.rand(batch, count, 2, generator=generator)
        sizes = 0.1 + 0.45 * torch.rand(batch, count, 2, generator=generator)
        boxes = torch.cat([centres, sizes], -1).to(device)
        logits = torch.randn(batch, count, generator=generator).to(device)
        reference = per_image_nms(boxes, logits, args.num_regions, args.nms_iou)
        selected = select_regions(boxes, logits, args.num_regions, args.nms_iou)
        times = {
            variant: milliseconds(
                lambda function=function, boxes=boxes, logits=logits: function(
                    boxes, logits, args.num_regions, args.nms_iou
                ),
                args.repeats,
                device,
            )
            for variant, function in (("per_image_nms", per_image_nms), ("loupe", select_regions))
        }
        rows[name] = {
            "per_image_nms_ms": round(times["per_image_nms"], 2),
            "loupe_ms": round(times["loupe"], 2),
            "speed_up": round(times["per_image_nms"] / times["loupe"], 2),
            "same_selection": bool(torch.equal(reference, selected)),
        }
    report = {
        "device": device_name(device),
        "num_regions": args.num_regions,
        "nms_iou": args.nms_iou,
    }
    print(json.dumps({**report, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
