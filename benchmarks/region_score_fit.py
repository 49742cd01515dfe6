"""Does the region score reward a box that fits its object? Grounding of a checkpoint's referring
expressions, taken apart: which signal ranks the candidate boxes on the named object by fit, and
what each way of choosing the box gets. Prints JSON.

    python benchmarks/region_score_fit.py --checkpoint outputs/shape_recipe/stage2 --num-samples 256 --offset 256

On validation images `offset .. offset + num-samples` (the training or the second renderer):
- `rank_with_iou`: over the candidate boxes that overlap the named object (IoU > 0.1), the mean
  Spearman correlation of their IoU with the object and (a) the similarity of their pooled embedding
  to the expression, (b) their confidence c(R) (what TSA trains);
- `reachable`: share of expressions with a box at IoU >= 0.5 among the kept regions / all candidates;
- `accuracy`: grounding accuracy at IoU 0.5 when the box is (a) the kept region with the highest
  similarity plus `weight` x logit c(R), as proposed, or (b) with every kept box first refined to
  the most confident candidate around it (`refine_by_confidence`, c(R) then that box's), as
  `LoupeForZeroShotDetection` does, for each weight and number of kept regions, and (c) with
  `--fused N`, that box replaced by the confidence-weighted mean of the N most confident candidates
  around the kept box (`fuse_confident_candidates`, `LoupeConfig.box_refinement_candidates`);
- with `--interaction-labels`, the same ranking for the sampled token-level interaction |I(R)|/|R|
  of every candidate (TSA's label before normalisation; costly: one label per candidate box).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, box_iou

# Run as a file (`python benchmarks/NAME.py`): make the repository root importable for `benchmarks.common`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import device_name, frozen_token_game


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--renderer", choices=["training", "second"], default="training")
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--offset", type=int, default=0, help="first validation image index")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 3.0, 10.0])
    parser.add_argument("--num-regions", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--refinement-iou", type=float, default=0.3)
    parser.add_argument(
        "--fused",
        type=int,
        nargs="*",
        default=[],
        help="also score boxes fused from this many confident candidates (box_refinement_candidates)",
    )
    parser.add_argument("--interaction-labels", action="store_true")
    parser.add_argument("--label-samples", type=int, default=10)
    args = parser.parse_args()
    if args.num_samples < 1 or args.offset < 0:
        parser.error("--num-samples must be >= 1 and --offset >= 0")
    return args


def load_samples(renderer: str, offset: int, count: int) -> list[dict]:
    from loupe_hf.data.second_renderer import SecondRendererConfig, second_renderer_sample
    from loupe_hf.data.synthetic import SyntheticConfig, generate_sample

    indices = range(offset, offset + count)
    if renderer == "second":
        config = SecondRendererConfig(image_size=128)
        return [second_renderer_sample(i, config, "validation") for i in indices]
    return [generate_sample(i, "validation", SyntheticConfig(image_size=128)) for i in indices]


def object_boxes(sample: dict) -> torch.Tensor:
    scale = torch.tensor([sample["width"], sample["height"]] * 2, dtype=torch.float32)
    xywh = torch.tensor(sample["objects"]["bbox"], dtype=torch.float32).reshape(-1, 4) / scale
    return box_convert(xywh, "xywh", "xyxy")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [x.argsort().argsort().double() for x in (a, b)]
    ranks = [r - r.mean() for r in ranks]
    return float((ranks[0] * ranks[1]).sum() / (ranks[0].norm() * ranks[1].norm()).clamp_min(1e-12))


@torch.inference_mode()
def expression_rows(detector, processor, samples: list[dict], num_regions: list[int]) -> list[dict]:
    """Per referring expression: every candidate's IoU with the named object, similarity to the
    expression and confidence logit, and the kept regions for each K."""
    from loupe_hf import zero_shot
    from loupe_hf.boxes import select_regions

    model, rows = detector.loupe, []
    for start in range(0, len(samples), 32):
        chunk = samples[start : start + 32]
        pixels = processor(images=[s["image"] for s in chunk])["pixel_values"]
        patches = model.encode_image(pixels)
        boxes, logits = model.region_head(patches)
        embeds = F.normalize(model.pool_regions(patches, boxes), dim=-1)
        kept = {
            k: select_regions(boxes, logits, k, model.config.region_nms_iou) for k in num_regions
        }
        for index, sample in enumerate(chunk):
            expressions = sample["referring_expressions"]
            if not expressions:
                continue
            texts = zero_shot.encode_queries(
                detector, processor, [e["text"] for e in expressions], apply_prompt_template=False
            )
            overlap = box_iou(box_convert(boxes[index], "cxcywh", "xyxy"), object_boxes(sample))
            for column, expression in enumerate(expressions):
                rows.append(
                    {
                        "image": start + index,
                        "iou": overlap[:, expression["object_index"]],
                        "object": object_boxes(sample)[expression["object_index"]],
                        "similarity": embeds[index] @ texts[column],
                        "logit": logits[index],
                        "boxes": boxes[index],
                        "kept": {k: v[index] for k, v in kept.items()},
                    }
                )
    return rows


def accuracy(
    rows: list[dict],
    scale: float,
    weight: float,
    k: int,
    refine_iou: float | None,
    num_fused: int = 1,
) -> float:
    from loupe_hf.boxes import fuse_confident_candidates, refine_by_confidence

    hits = 0
    for row in rows:
        kept = row["kept"][k]
        boxes = kept
        if refine_iou is not None:  # as the detector does: every kept box refined, then scored
            around = (row["boxes"][kept][None], row["boxes"][None], row["logit"][None], refine_iou)
            boxes = refine_by_confidence(*around)[0]
        score = scale * row["similarity"][kept] + weight * row["logit"][boxes]
        best = score.argmax()
        if num_fused > 1:
            fused = fuse_confident_candidates(*around, num_fused)[0, best]
            fit = box_iou(box_convert(fused[None], "cxcywh", "xyxy"), row["object"][None])[0, 0]
        else:
            fit = row["iou"][boxes[best]]
        hits += bool(fit >= 0.5)
    return round(hits / len(rows), 4)


def reachable(rows: list[dict], pick) -> float:
    """Share of expressions with a box at IoU >= 0.5 among `pick(row)`'s candidates."""
    return round(sum(bool((row["iou"][pick(row)] >= 0.5).any()) for row in rows) / len(rows), 4)


def rank_with_iou(rows: list[dict], values: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    result = {}
    for name, per_row in values.items():
        scores = []
        for row, value in zip(rows, per_row, strict=True):
            near = row["iou"] > 0.1
            if near.sum() >= 5:
                scores.append(spearman(value[near], row["iou"][near]))
        result[name] = round(sum(scores) / max(1, len(scores)), 4)
    return result


def interaction_labels(
    checkpoint: str, samples: list[dict], label_samples: int
) -> list[torch.Tensor]:
    """|I(R)| / |R| of every candidate box of every image, in the image–caption game (TSA's label)."""
    from loupe_hf import LoupeProcessor
    from loupe_hf.pretraining import LoupeForPreTraining
    from loupe_hf.pretraining.labels import tsa_label_values
    from loupe_hf.shapley import token_region_interactions

    model = LoupeForPreTraining.from_pretrained(checkpoint).eval()
    processor = LoupeProcessor.from_pretrained(checkpoint)
    labels = []
    for start in range(0, len(samples), 16):
        chunk = samples[start : start + 16]
        batch = processor(
            images=[s["image"] for s in chunk],
            text=[s["caption"] for s in chunk],
            phrase_spans=[s["objects"]["phrase_span"] for s in chunk],
        )
        out, _, game = frozen_token_game(model, batch)
        masks = model.loupe.region_masks(out.candidate_boxes, soft=False)
        with torch.no_grad():
            raw = token_region_interactions(
                game,
                masks,
                num_samples=label_samples,
                generator=torch.Generator().manual_seed(start),
            ).values
        labels += list(tsa_label_values(raw, masks, "magnitude_per_patch"))
    return labels


def main() -> None:
    args = parse_args()
    from loupe_hf import LoupeForZeroShotDetection, LoupeProcessor

    detector = LoupeForZeroShotDetection.from_pretrained(args.checkpoint).eval()
    processor = LoupeProcessor.from_pretrained(args.checkpoint)
    samples = load_samples(args.renderer, args.offset, args.num_samples)
    rows = expression_rows(detector, processor, samples, args.num_regions)
    scale = detector.loupe.logit_scale.exp().item()
    signals = {
        "similarity": [row["similarity"] for row in rows],
        "confidence": [row["logit"] for row in rows],
    }
    if args.interaction_labels:
        labels = interaction_labels(args.checkpoint, samples, args.label_samples)
        signals["interaction_label"] = [labels[row["image"]] for row in rows]
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "device": device_name("cpu"),
        "checkpoint": args.checkpoint,
        "renderer": args.renderer,
        "images": f"validation {args.offset}..{args.offset + args.num_samples - 1}",
        "expressions": len(rows),
        "rank_with_iou": rank_with_iou(rows, signals),
        "reachable": {
            **{
                f"kept_{k}": reachable(rows, lambda row, k=k: row["kept"][k])
                for k in args.num_regions
            },
            "all_candidates": reachable(rows, lambda row: slice(None)),
        },
        "accuracy": {
            f"{how}_k{k}_w{weight:g}": accuracy(rows, scale, weight, k, refine)
            for how, refine in (("proposed", None), ("refined", args.refinement_iou))
            for k in args.num_regions
            for weight in args.weights
        },
    }
    for n in args.fused:
        report["accuracy"].update(
            {
                f"fused{n}_k{k}_w{weight:g}": accuracy(
                    rows, scale, weight, k, args.refinement_iou, n
                )
                for k in args.num_regions
                for weight in args.weights
            }
        )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
