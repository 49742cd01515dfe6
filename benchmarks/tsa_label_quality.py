"""Quality and cost of sampled TSA labels against the number of samples; prints one JSON document.

    python benchmarks/tsa_label_quality.py --checkpoint outputs/ablation/loupe

On the frozen encoders of `--checkpoint` and `--images` `validation` images, the token-level labels
of every selected region are estimated with each `--samples` count (`--repeats` seeds each) and
scored against a `--reference-samples` estimate:

- `rank_tsa`: mean within-image Spearman correlation of |I| / |R| (what TSA trains on) with the
  reference's; `rank`: the same for the signed I;
- `rmse`: root mean square error, in units of the reference's root mean square;
- `seconds` and `cost_ratio`: time to label every region, and its ratio to the preset's sample count.

Together with `benchmarks/unsil_offline_fit.py` (the token-level UNSIL's own rank) this says what a
label costs at a given quality, whether it comes from sampling or from UNSIL.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import torch
from unsil_accuracy import spearman_per_row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--samples", type=int, nargs="+", default=[5, 10, 15, 20, 30, 60])
    parser.add_argument("--reference-samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from loupe_hf import LoupeProcessor
    from loupe_hf.data import generate_sample
    from loupe_hf.pretraining_loupe import LoupeForPreTraining
    from loupe_hf.shapley import token_game, token_region_interactions

    model = LoupeForPreTraining.from_pretrained(args.checkpoint).eval()
    processor = LoupeProcessor.from_pretrained(args.checkpoint)
    samples = [generate_sample(index, "validation") for index in range(args.images)]
    batch = processor(images=[s["image"] for s in samples], text=[s["caption"] for s in samples])
    with torch.no_grad():
        out = model.loupe(**batch)
    masks = model.loupe.region_masks(out.region_boxes, soft=False)
    game = token_game(
        model.loupe,
        batch["pixel_values"],
        batch["input_ids"],
        batch["attention_mask"],
        mode=model.config.token_game_mode,
        patch_tokens=out.patch_tokens,
        word_tokens=out.word_tokens,
    )
    size = masks.sum(-1).float()

    def labels(num_samples: int, seed: int) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        values = token_region_interactions(
            game, masks, num_samples=num_samples, generator=torch.Generator().manual_seed(seed)
        ).values
        return values, time.perf_counter() - start

    reference, _ = labels(args.reference_samples, 10_000)
    valid = torch.ones_like(reference, dtype=torch.bool)
    rms = reference.square().mean().sqrt()
    rows = {}
    for num_samples in args.samples:
        scores = []
        for seed in range(args.repeats):
            values, seconds = labels(num_samples, seed)
            scores.append(
                {
                    "rank_tsa": spearman_per_row(
                        values.abs() / size, reference.abs() / size, valid
                    ),
                    "rank": spearman_per_row(values, reference, valid),
                    "rmse": float((values - reference).square().mean().sqrt() / rms),
                    "seconds": seconds,
                }
            )
        rows[str(num_samples)] = {
            key: round(sum(score[key] for score in scores) / len(scores), 4) for key in scores[0]
        }
    preset = rows.get(str(model.config.shapley_num_samples))
    for row in rows.values():
        row["cost_ratio"] = round(row["seconds"] / preset["seconds"], 3) if preset else None
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "checkpoint": args.checkpoint,
        "images": args.images,
        "regions": int(masks.shape[0] * masks.shape[1]),
        "reference_samples": args.reference_samples,
        "preset_samples": model.config.shapley_num_samples,
        "by_samples": rows,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
