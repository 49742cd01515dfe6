"""Token-level UNSIL variants fitted side by side on one frozen checkpoint; prints JSON.

    python benchmarks/unsil_offline_fit.py --checkpoint outputs/ablation/loupe

The encoders of `--checkpoint` are frozen. Its token-level game gives, for `--train-batches` batches
of the synthetic train split, the sampled labels training would use (`config.shapley_num_samples`
samples) and, for `--eval-batches` `validation` batches, reference labels (`--reference-samples`).
Every variant (architecture × region pooling of h × width `--hidden-dims`) starts from the same seed, is fitted with the
UNSIL loss for `--epochs` passes over the same labels, and is scored on the held-out images against
the reference:

- `mae`: mean absolute error in units of the reference's root mean square;
- `rank`: mean within-image Spearman correlation (TSA normalises labels per image);
- `sigma_mean` / `unsil_share`: how much the hybrid rule would trust it;
- `step_ms`: forward + backward of one batch, the cost UNSIL adds to a training step.

The sampled labels themselves are scored the same way, as the bar to clear. This is an upper bound
for UNSIL (in training the encoders move under it), but it compares variants on equal terms.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

# Run as a file (`python benchmarks/NAME.py`): make the repository root importable for `benchmarks.common`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import frozen_token_game, spearman_per_row


def game_labels(model, processor, split: str, start: int, size: int, estimates):
    """Frozen features of one batch and its sampled token-level labels, one `[B, K]` tensor per
    `(num_samples, seed)` in `estimates` (one forward pass serves them all)."""
    from loupe_hf.data import generate_sample
    from loupe_hf.shapley import token_region_interactions

    batch_samples = [generate_sample(i, split) for i in range(start, start + size)]
    batch = processor(
        images=[s["image"] for s in batch_samples], text=[s["caption"] for s in batch_samples]
    )
    out, masks, game = frozen_token_game(model, batch)
    labels = [
        token_region_interactions(
            game, masks, num_samples=samples, generator=torch.Generator().manual_seed(seed)
        ).values
        for samples, seed in estimates
    ]
    inputs = {
        "patch_tokens": out.patch_tokens,
        "word_tokens": out.word_tokens,
        "word_mask": batch["attention_mask"],
        "region_masks": masks.float(),
    }
    return inputs, labels


def fit(variant: dict, train, evaluation, scale: float, args, config) -> dict:
    from loupe_hf.pretraining.labels import unsil_loss
    from loupe_hf.pretraining.unsil import build_unsil

    torch.manual_seed(args.seed)
    predictor = build_unsil(
        variant["architecture"],
        "token",
        config.vision_config.hidden_size,
        config.text_config.hidden_size,
        variant["hidden_dim"],
        region_pooling=variant["region_pooling"],
    )
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=args.lr)
    times = []
    with torch.enable_grad():
        for _ in range(args.epochs):
            for inputs, labels in train:
                start = time.perf_counter()
                out = predictor(**inputs)
                mask = torch.ones_like(labels, dtype=torch.bool)
                loss = unsil_loss(
                    out.interaction,
                    out.sigma,
                    labels / scale,
                    mask,
                    config.unsil_uncertainty_weight,
                )
                loss.backward()
                times.append(time.perf_counter() - start)
                torch.nn.utils.clip_grad_norm_(predictor.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    predicted, sigma, reference = [], [], []
    for inputs, labels in evaluation:
        out = predictor(**inputs)
        predicted.append(out.interaction * scale)
        sigma.append(out.sigma)
        reference.append(labels)
    return score(torch.cat(predicted), torch.cat(reference)) | {
        "sigma_mean": round(float(torch.cat(sigma).mean()), 4),
        "unsil_share": round(
            float(1 - torch.cat(sigma).clamp_min(config.unsil_min_sample_rate).mean()), 4
        ),
        "step_ms": round(1000 * sorted(times)[len(times) // 2], 1),
    }


def score(values: torch.Tensor, reference: torch.Tensor) -> dict:
    rms = reference.square().mean().sqrt().clamp_min(1e-12)
    valid = torch.ones_like(reference, dtype=torch.bool)
    return {
        "mae": round(float((values - reference).abs().mean() / rms), 4),
        "rank": round(spearman_per_row(values, reference, valid), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--train-batches", type=int, default=12)
    parser.add_argument("--eval-batches", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--reference-samples", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--architectures", nargs="+", default=["mlp_attention", "mlp_dot_attention"]
    )
    parser.add_argument("--region-pooling", nargs="+", default=["mean", "max"])
    parser.add_argument(
        "--hidden-dims", nargs="+", type=int, help="UNSIL widths (default: the checkpoint's)"
    )
    args = parser.parse_args()
    if args.hidden_dims and min(args.hidden_dims) < 1:
        parser.error("--hidden-dims must be >= 1")

    from loupe_hf import LoupeProcessor
    from loupe_hf.pretraining import LoupeForPreTraining

    torch.set_grad_enabled(False)
    model = LoupeForPreTraining.from_pretrained(args.checkpoint).eval()
    processor = LoupeProcessor.from_pretrained(args.checkpoint)
    config, size = model.config, args.batch_size
    # The token-level labels training uses: their own sample count when the config sets one.
    samples = config.shapley_token_num_samples or config.shapley_num_samples
    hidden_dims = args.hidden_dims or [config.unsil_hidden_dim]
    train = []
    for i in range(args.train_batches):
        inputs, (labels,) = game_labels(
            model, processor, "train", i * size, size, [(samples, args.seed + i)]
        )
        train.append((inputs, labels))
    evaluation, sampled = [], []
    for i in range(args.eval_batches):
        estimates = [(args.reference_samples, 1000 + i), (samples, 2000 + i)]
        inputs, (reference_labels, sampled_labels) = game_labels(
            model, processor, "validation", i * size, size, estimates
        )
        evaluation.append((inputs, reference_labels))
        sampled.append(sampled_labels)
    sampled_eval = torch.cat(sampled)
    reference = torch.cat([labels for _, labels in evaluation])
    scale = float(torch.cat([labels for _, labels in train]).square().mean().sqrt())
    variants = [
        {"architecture": arch, "region_pooling": pooling, "hidden_dim": hidden}
        for arch in args.architectures
        for pooling in args.region_pooling
        for hidden in hidden_dims
    ]
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "checkpoint": args.checkpoint,
        "image_pooling": config.image_pooling,
        "training_samples": samples,
        "train_images": args.train_batches * size,
        "sampled_labels": score(sampled_eval, reference),
        "variants": {
            f"{v['architecture']}/h={v['region_pooling']}/width={v['hidden_dim']}": fit(
                v, train, evaluation, scale, args, config
            )
            for v in variants
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
