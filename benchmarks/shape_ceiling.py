"""How much shape can the image tower hold at all? The `tiny` vision tower trained *with labels*
(cross-entropy on the shape of each ground-truth box, region embeddings pooled as LOUPE pools them)
then read on held-out validation objects: the ceiling that zero-shot shape accuracy on
ground-truth boxes (issue 14's target: 0.9) can approach at each input resolution. Prints JSON.

    python benchmarks/shape_ceiling.py --image-sizes 64 96 --steps 300 --batch-size 64

Each variant trains from scratch on the same training images; accuracy is reported overall and
per object size, next to the same head's colour accuracy (a sanity check: colour is easy).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import device_name
from loupe_hf import LoupeConfig, LoupeImageProcessor, LoupeModel
from loupe_hf.configuration_loupe import LOUPE_PRESETS
from loupe_hf.data import COLOURS, SHAPES, SIZES, generate_sample
from loupe_hf.evaluation.decomposition import object_cells


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[64, 96])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def object_labels(
    samples: list[dict],
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, list[str]]:
    """Normalised xyxy boxes per image, and shape / colour / size of every object in order."""
    boxes, shapes, colours, sizes = [], [], [], []
    for sample in samples:
        side = sample["width"]
        xywh = torch.tensor(sample["objects"]["bbox"], dtype=torch.float32) / side
        boxes.append(torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=-1))
        shapes += [SHAPES.index(s) for s in sample["objects"]["category"]]
        colours += [COLOURS.index(c) for c in sample["objects"]["colour"]]
        sizes += sample["objects"]["size"]
    return boxes, torch.tensor(shapes), torch.tensor(colours), sizes


def box_embeddings(
    model: LoupeModel, pixel_values: torch.Tensor, boxes: list[torch.Tensor]
) -> torch.Tensor:
    """Every object's region embedding `[O, P]`, pooled over its own cells as the evaluation does."""
    tokens = model.encode_image(pixel_values)
    pooled = [
        model.pool_image_tokens(tokens[k : k + 1], object_cells(b, model.grid_size)[None])[0]
        for k, b in enumerate(boxes)
    ]
    return F.normalize(torch.cat(pooled), dim=-1)


def run_variant(image_size: int, train: list[dict], valid: list[dict], args) -> dict:
    torch.manual_seed(args.seed)
    preset = copy.deepcopy(LOUPE_PRESETS["tiny"])
    preset["vision_config"]["image_size"] = image_size
    model = LoupeModel(LoupeConfig(**preset))
    heads = nn.ModuleDict(
        {"shape": nn.Linear(model.config.projection_dim, len(SHAPES)),
         "colour": nn.Linear(model.config.projection_dim, len(COLOURS))}
    )  # fmt: skip
    processor = LoupeImageProcessor(size={"height": image_size, "width": image_size})
    parameters = [
        *model.vision_model.parameters(),
        *model.visual_projection.parameters(),
        *heads.parameters(),
    ]
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate)
    start = time.perf_counter()
    losses = []
    for step in range(args.steps):
        first = (step * args.batch_size) % len(train)
        batch = train[first : first + args.batch_size]
        pixels = processor([s["image"] for s in batch], return_tensors="pt")["pixel_values"]
        boxes, shapes, colours, _ = object_labels(batch)
        embeds = box_embeddings(model, pixels, boxes) * 10.0
        loss = F.cross_entropy(heads["shape"](embeds), shapes) + F.cross_entropy(
            heads["colour"](embeds), colours
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    seconds = time.perf_counter() - start
    with torch.inference_mode():
        pixels = processor([s["image"] for s in valid], return_tensors="pt")["pixel_values"]
        boxes, shapes, colours, sizes = object_labels(valid)
        embeds = box_embeddings(model, pixels, boxes) * 10.0
        shape_hits = heads["shape"](embeds).argmax(-1) == shapes
        colour_hits = heads["colour"](embeds).argmax(-1) == colours
    by_size = {
        size: float(shape_hits[[k for k, s in enumerate(sizes) if s == size]].float().mean())
        for size in SIZES
    }
    return {
        "image_size": image_size,
        "grid_size": model.grid_size,
        "train_seconds": round(seconds, 1),
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "shape_accuracy": round(float(shape_hits.float().mean()), 4),
        "shape_accuracy_by_size": {k: round(v, 4) for k, v in by_size.items()},
        "colour_accuracy": round(float(colour_hits.float().mean()), 4),
        "num_objects": len(shapes),
    }


def main() -> None:
    args = parse_args()
    num_train = min(args.steps * args.batch_size, 8192)
    train = [generate_sample(k, "train") for k in range(num_train)]
    valid = [generate_sample(k, "validation") for k in range(args.eval_samples)]
    results = [run_variant(size, train, valid, args) for size in args.image_sizes]
    print(json.dumps({
        "benchmark": "shape_ceiling",
        "device": device_name(torch.device("cpu")),
        "steps": args.steps, "batch_size": args.batch_size, "train_images": num_train,
        "chance": 1 / len(SHAPES),
        "variants": results,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
