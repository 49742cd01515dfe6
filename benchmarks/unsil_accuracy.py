"""How good UNSIL's labels are next to sampled ones, on a trained full-LOUPE checkpoint; prints JSON.

    python benchmarks/unsil_accuracy.py --checkpoint outputs/ablation/loupe --batches 2

For held-out `validation` batches, at both levels (token: one interaction per region, the TSA
label; semantic: one per region-phrase pair, the FSA label), it compares against a reference
estimate with `--reference-samples` coalition samples:

- the sampled label training uses (`config.shapley_num_samples` samples, another seed);
- UNSIL's prediction Î (in the level's running interaction scale, as trained);
- the hybrid label of the rule "sample iff u <= sigma", in expectation over u.

Errors are mean absolute errors in units of the reference's root mean square; `rank` is the mean
within-image Spearman correlation with the reference (the losses normalise labels per image, so
the order within an image is what supervises). The reference is itself an estimate: its noise is
about sqrt(reference / training samples) times smaller than the sampled label's.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

# Run as a file (`python benchmarks/NAME.py`): make the repository root importable for `benchmarks.common`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import frozen_token_game, spearman_per_row


def compare(
    reference: torch.Tensor,
    sampled: torch.Tensor,
    predicted: torch.Tensor,
    sigma: torch.Tensor,
    valid: torch.Tensor,
    min_sample_rate: float,
) -> dict:
    """Errors of the sampled, predicted and (expected) hybrid labels against the reference."""
    rms = reference[valid].square().mean().sqrt().clamp_min(1e-12)
    sample_rate = sigma.clamp_min(min_sample_rate)

    def mae(values: torch.Tensor) -> float:
        return round(float((values - reference).abs()[valid].mean() / rms), 4)

    hybrid_error = (
        sample_rate * (sampled - reference).abs()
        + (1 - sample_rate) * (predicted - reference).abs()
    )
    return {
        "targets": int(valid.sum()),
        "mae_sampled": mae(sampled),
        "mae_unsil": mae(predicted),
        "mae_hybrid_expected": round(float(hybrid_error[valid].mean() / rms), 4),
        "rank_sampled": round(spearman_per_row(sampled, reference, valid), 4),
        "rank_unsil": round(spearman_per_row(predicted, reference, valid), 4),
        "sigma_mean": round(float(sigma[valid].mean()), 4),
        "unsil_share_expected": round(float(1 - sample_rate[valid].mean()), 4),
    }


def level_labels(model, batch, reference_samples: int, seed: int) -> dict:
    """Reference, sampled and predicted interactions of one batch, for each level with a UNSIL."""
    from loupe_hf.shapley import (
        region_phrase_interactions,
        semantic_game,
        token_region_interactions,
    )

    config, loupe = model.config, model.loupe
    out, region_masks, game = frozen_token_game(model, batch)
    attention_mask = batch["attention_mask"]

    def token(num_samples: int, offset: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed + offset)
        return token_region_interactions(
            game, region_masks, num_samples=num_samples, generator=generator
        ).values

    labels = {}
    if model.token_unsil is not None:
        prediction = model.token_unsil(
            patch_tokens=out.patch_tokens,
            word_tokens=out.word_tokens,
            word_mask=attention_mask,
            region_masks=region_masks.float(),
        )
        labels["token"] = {
            "reference": token(reference_samples, 0),
            "sampled": token(config.shapley_token_num_samples or config.shapley_num_samples, 1),
            "predicted": prediction.interaction * model.token_interaction_scale,
            "sigma": prediction.sigma,
            "valid": torch.ones_like(prediction.sigma, dtype=torch.bool),
        }
    if model.semantic_unsil is None:
        return labels
    phrase_valid = batch["phrase_masks"].sum(-1) > 0
    sgame = semantic_game(
        out.region_embeds,
        out.phrase_embeds,
        phrase_valid,
        temperature=1 / float(loupe.logit_scale.exp()),
    )
    shape = (phrase_valid.shape[0], out.region_embeds.shape[1], phrase_valid.shape[1])

    def semantic(num_samples: int, offset: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed + offset)
        values = region_phrase_interactions(
            sgame, num_samples=num_samples, generator=generator
        ).values
        return values.reshape(shape)

    prediction = model.semantic_unsil(
        region_embeds=out.region_embeds, phrase_embeds=out.phrase_embeds, phrase_mask=phrase_valid
    )
    labels["semantic"] = {
        "reference": semantic(reference_samples, 2),
        "sampled": semantic(config.shapley_num_samples, 3),
        "predicted": prediction.interaction * model.semantic_interaction_scale,
        "sigma": prediction.sigma,
        "valid": phrase_valid[:, None, :].expand(shape),
    }
    return labels


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True, help="a full-LOUPE pre-training checkpoint")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--reference-samples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from loupe_hf import LoupeProcessor
    from loupe_hf.data import generate_sample
    from loupe_hf.pretraining import LoupeForPreTraining

    torch.set_grad_enabled(False)
    model = LoupeForPreTraining.from_pretrained(args.checkpoint).eval()
    if model.token_unsil is None and model.semantic_unsil is None:
        raise SystemExit(f"{args.checkpoint} has no UNSIL predictors (train with --ablation loupe)")
    processor = LoupeProcessor.from_pretrained(args.checkpoint)
    collected: dict[str, dict[str, list[torch.Tensor]]] = {}
    for index in range(args.batches):
        start = index * args.batch_size
        samples = [generate_sample(i, "validation") for i in range(start, start + args.batch_size)]
        batch = processor(
            images=[s["image"] for s in samples],
            text=[s["caption"] for s in samples],
            phrase_spans=[s["objects"]["phrase_span"] for s in samples],
        )
        labels = level_labels(model, batch, args.reference_samples, args.seed + 10 * index)
        for level, tensors in labels.items():
            for name, tensor in tensors.items():
                collected.setdefault(level, {}).setdefault(name, []).append(tensor.flatten(1))
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "checkpoint": args.checkpoint,
        "unsil_architecture": model.config.unsil_architecture,
        "image_pooling": model.config.image_pooling,
        "training_samples": model.config.shapley_num_samples,
        "training_token_samples": model.config.shapley_token_num_samples,
        "reference_samples": args.reference_samples,
        "levels": {
            level: compare(
                **{name: torch.cat(parts) for name, parts in tensors.items()},
                min_sample_rate=model.config.unsil_min_sample_rate,
            )
            for level, tensors in collected.items()
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
