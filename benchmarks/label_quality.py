"""Quality and cost of sampled TSA and FSA labels against the number of samples; prints JSON.

    python benchmarks/label_quality.py --checkpoint outputs/ablation/loupe

On the frozen encoders of `--checkpoint` and `--images` `validation` images, the labels of both
levels are estimated with each `--samples` count (`--repeats` seeds each) and scored against a
`--reference-samples` estimate:

- `token` (TSA, one label per selected region): `rank_tsa`, the mean within-image Spearman
  correlation of |I| / |R| (what TSA trains on) with the reference's; `rank`, the same for I;
- `semantic` (FSA, one label per region–phrase pair): `rank`, the mean within-image Spearman
  correlation of I over the image's valid pairs;
- `rmse`: root mean square error, in units of the reference's root mean square;
- `seconds` and `cost_ratio`: time to label the whole batch (fastest repeat), and its ratio to
  the time at the checkpoint's own sample count for that level.

Together with `benchmarks/unsil_offline_fit.py` (the token-level UNSIL's own rank) this says what a
label costs at a given quality, whether it comes from sampling or from UNSIL.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Run as a file (`python benchmarks/NAME.py`): make the repository root importable for `benchmarks.common`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import frozen_token_game, spearman_per_row


def score_counts(
    estimate: Callable[[int, int], torch.Tensor],
    score: Callable[[torch.Tensor, torch.Tensor], dict],
    counts: list[int],
    reference_samples: int,
    repeats: int,
    preset: int,
) -> dict:
    """Scores `estimate(num_samples, seed)` at every count against a reference estimate."""
    reference = estimate(reference_samples, 10_000)
    rows = {}
    for num_samples in counts:
        scores, times = [], []
        for seed in range(repeats):
            start = time.perf_counter()
            values = estimate(num_samples, seed)
            times.append(time.perf_counter() - start)
            scores.append(score(values, reference))
        row = {key: round(sum(s[key] for s in scores) / len(scores), 4) for key in scores[0]}
        # the fastest repeat: the others only add the machine's noise (allocation, scheduling)
        row["seconds"] = round(min(times), 4)
        rows[str(num_samples)] = row
    for row in rows.values():
        base = rows.get(str(preset))
        row["cost_ratio"] = round(row["seconds"] / base["seconds"], 3) if base else None
    return {"preset_samples": preset, "by_samples": rows}


def relative_rmse(values: torch.Tensor, reference: torch.Tensor, valid: torch.Tensor) -> float:
    error = (values - reference)[valid]
    return float(error.square().mean().sqrt() / reference[valid].square().mean().sqrt())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--samples", type=int, nargs="+", default=[5, 10, 15, 20, 30, 60])
    parser.add_argument("--reference-samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for name in ("images", "reference_samples", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.samples) < 1:
        parser.error("--samples must all be >= 1")

    from loupe_hf import LoupeProcessor
    from loupe_hf.data import generate_sample
    from loupe_hf.pretraining import LoupeForPreTraining
    from loupe_hf.shapley import (
        region_phrase_interactions,
        semantic_game,
        token_region_interactions,
    )

    model = LoupeForPreTraining.from_pretrained(args.checkpoint).eval()
    config = model.config
    processor = LoupeProcessor.from_pretrained(args.checkpoint)
    samples = [generate_sample(index, "validation") for index in range(args.images)]
    batch = processor(
        images=[s["image"] for s in samples],
        text=[s["caption"] for s in samples],
        phrase_spans=[s["objects"]["phrase_span"] for s in samples],
    )
    out, masks, tokens = frozen_token_game(model, batch)
    phrase_valid = batch["phrase_masks"].sum(-1) > 0
    semantics = semantic_game(
        out.region_embeds,
        out.phrase_embeds,
        phrase_valid,
        temperature=1 / model.loupe.logit_scale.exp().item(),
    )
    size = masks.sum(-1).float()
    regions = torch.ones_like(size, dtype=torch.bool)
    pairs = phrase_valid[:, None, :].expand(-1, masks.shape[1], -1).reshape(len(samples), -1)

    def token_labels(num_samples: int, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return token_region_interactions(
            tokens, masks, num_samples=num_samples, generator=generator
        ).values

    def semantic_labels(num_samples: int, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        values = region_phrase_interactions(
            semantics, num_samples=num_samples, generator=generator
        ).values
        return values.reshape(len(samples), -1)

    def token_score(values: torch.Tensor, reference: torch.Tensor) -> dict:
        return {
            "rank_tsa": spearman_per_row(values.abs() / size, reference.abs() / size, regions),
            "rank": spearman_per_row(values, reference, regions),
            "rmse": relative_rmse(values, reference, regions),
        }

    def semantic_score(values: torch.Tensor, reference: torch.Tensor) -> dict:
        return {
            "rank": spearman_per_row(values, reference, pairs),
            "rmse": relative_rmse(values, reference, pairs),
        }

    common = (args.samples, args.reference_samples, args.repeats)
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "checkpoint": args.checkpoint,
        "images": args.images,
        "reference_samples": args.reference_samples,
        "token": {
            "labels": int(masks.shape[0] * masks.shape[1]),
            **score_counts(
                token_labels,
                token_score,
                *common,
                config.shapley_token_num_samples or config.shapley_num_samples,
            ),
        },
        "semantic": {
            "labels": int(pairs.sum()),
            **score_counts(semantic_labels, semantic_score, *common, config.shapley_num_samples),
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
