"""Shapley interaction estimators side by side on the two LOUPE games; prints one JSON document.

    python benchmarks/shapley_estimators.py            # full run (a few minutes on 2 CPU cores)
    python benchmarks/shapley_estimators.py --quick    # smoke run

Everything runs in one process on a randomly initialised `tiny` LOUPE model and synthetic
images (`loupe_hf.data.synthetic`), so the ratios between variants are meaningful even when the
absolute seconds move with the machine's load. Sections:

- `instability`: Zhang et al.'s instability (METHOD §5) vs samples per target for the plain,
  antithetic and stratified estimators, on v2 (K=16 regions x M=8 phrases, all 128 pairs) and v1
  in feature mode (K=16 regions per image).
- `error_vs_exact`: a v2 game small enough to enumerate (K=6, M=4: 10 players): mean absolute
  error, RMSE and ±2 SE coverage against exact interactions; the same games give the
  `shapiq_reference` (its approximators at the same budget of distinct game evaluations).
- `throughput`: game evaluations per second for v2, v1 feature mode and v1 input mode.
- `timing`: v2 labels for a batch of 64 images (K=16, M=8, 500 samples per pair) and v1
  feature-mode labels for a batch of 32 (K=16 regions, 100 samples) against one forward+backward
  training step of the same model on the same batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

from loupe_hf import LoupeConfig, LoupeImageProcessor, LoupeModel, train_wordpiece_tokenizer
from loupe_hf.processing_loupe import phrase_token_masks
from loupe_hf.shapley import (
    SAMPLING_METHODS,
    instability,
    region_phrase_interactions,
    semantic_game,
    token_game,
    token_region_interactions,
)

NUM_PHRASES = 8
WINDOW = 2


# --- data --------------------------------------------------------------------------------------


def synthetic_batch(num_images: int, model: LoupeModel) -> tuple[dict, str]:
    """Pixel values, tokens and M=8 phrase masks for `num_images` synthetic image-caption pairs."""
    try:
        from loupe_hf.data import SyntheticConfig, generate_sample, training_captions
    except ImportError:  # the synthetic data module is optional for this benchmark
        return random_batch(num_images, model), "random tensors"
    synthetic = SyntheticConfig(image_size=model.config.vision_config.image_size)
    samples = [generate_sample(i, "validation", synthetic) for i in range(num_images)]
    tokenizer = train_wordpiece_tokenizer(
        training_captions(500, synthetic), vocab_size=model.config.text_config.vocab_size
    )
    size = model.config.vision_config.image_size
    processor = LoupeImageProcessor(size={"height": size, "width": size})
    pixel_values = processor([s["image"] for s in samples], return_tensors="pt")["pixel_values"]
    text = tokenizer(
        [s["caption"] for s in samples],
        padding=True,
        return_offsets_mapping=True,
        return_tensors="pt",
    )
    spans = [[tuple(span) for span in s["objects"]["phrase_span"]] for s in samples]
    phrases = phrase_token_masks(text["offset_mapping"], text["attention_mask"], spans)
    return {
        "pixel_values": pixel_values,
        "input_ids": text["input_ids"],
        "attention_mask": text["attention_mask"],
        "phrase_masks": fill_phrases(phrases, text["attention_mask"]),
    }, "loupe_hf.data.synthetic (validation split)"


def fill_phrases(phrases: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The caption's noun phrases, then sliding windows of 2 word tokens up to M=8 phrases."""
    batch, length = attention_mask.shape
    out = torch.zeros(batch, NUM_PHRASES, length)
    for b in range(batch):
        real = phrases[b][phrases[b].sum(-1) > 0][:NUM_PHRASES]
        out[b, : len(real)] = real
        words = int(attention_mask[b].sum()) - 2  # without [CLS] and [SEP]
        for extra in range(NUM_PHRASES - len(real)):
            start = 1 + extra % max(1, words - WINDOW + 1)
            out[b, len(real) + extra, start : start + WINDOW] = 1.0
    return out


def random_batch(num_images: int, model: LoupeModel) -> dict:
    size = model.config.vision_config.image_size
    length = 14
    input_ids = torch.randint(5, model.config.text_config.vocab_size, (num_images, length))
    attention_mask = torch.ones(num_images, length, dtype=torch.long)
    phrases = torch.zeros(num_images, NUM_PHRASES, length)
    for j in range(NUM_PHRASES):
        phrases[:, j, 1 + j : 1 + j + WINDOW] = 1.0
    return {
        "pixel_values": torch.randn(num_images, 3, size, size),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "phrase_masks": phrases,
    }


@torch.no_grad()
def encode(model: LoupeModel, batch: dict):
    return model.eval()(**batch)


# --- measurements ------------------------------------------------------------------------------


def timed(function: Callable[[], object], repeats: int) -> float:
    function()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def repeated_estimates(
    estimate: Callable[[torch.Generator], torch.Tensor], repeats: int, seed: int
):
    """`[R, ...]` estimates from R independent generators."""
    return torch.stack([estimate(torch.Generator().manual_seed(seed + r)) for r in range(repeats)])


def summarise_instability(estimates: torch.Tensor) -> dict:
    """Per-target instability (over dim 0), averaged as the paper does, plus robust summaries."""
    per_target = instability(estimates.double())
    finite = per_target[torch.isfinite(per_target)]
    pooled = instability_pooled(estimates.double())
    return {
        "mean": round(float(finite.mean()), 4),
        "median": round(float(finite.median()), 4),
        "pooled": round(pooled, 4),
    }


def instability_pooled(estimates: torch.Tensor) -> float:
    """E|I_u - I_v| over repeats and targets / E|I| over repeats and targets."""
    repeats = estimates.shape[0]
    flat = estimates.reshape(repeats, -1)
    diffs = (flat[:, None] - flat[None]).abs().sum((0, 1)) / (repeats * (repeats - 1))
    return float(diffs.mean() / flat.abs().mean())


def v2_instability(game, sample_counts, repeats, seed) -> dict:
    table = {}
    for method in SAMPLING_METHODS:
        table[method] = {}
        for count in sample_counts:
            estimates = repeated_estimates(
                lambda g, m=method, c=count: (
                    region_phrase_interactions(
                        game, num_samples=c, method=m, generator=g, chunk_size=4096
                    ).values
                ),
                repeats,
                seed,
            )
            table[method][str(count)] = summarise_instability(estimates)
    return table


def v1_instability(game, region_masks, sample_counts, repeats, seed) -> dict:
    table = {}
    for method in SAMPLING_METHODS:
        table[method] = {}
        for count in sample_counts:
            estimates = repeated_estimates(
                lambda g, m=method, c=count: (
                    token_region_interactions(
                        game, region_masks, num_samples=c, method=m, generator=g
                    ).values
                ),
                repeats,
                seed,
            )
            table[method][str(count)] = summarise_instability(estimates)
    return table


def error_vs_exact(game, sample_counts, repeats, seed) -> tuple[dict, torch.Tensor, dict]:
    """Errors of each estimator on a game small enough to enumerate; also the budgets used."""
    exact = region_phrase_interactions(game, num_samples=None).values.double()
    table, budgets = {}, {}
    for method in SAMPLING_METHODS:
        table[method] = {}
        for count in sample_counts:
            runs = [
                region_phrase_interactions(
                    game,
                    num_samples=count,
                    method=method,
                    generator=torch.Generator().manual_seed(seed + r),
                )
                for r in range(repeats)
            ]
            values = torch.stack([run.values.double() for run in runs])
            stderr = torch.stack([run.stderr.double() for run in runs])
            error = values - exact
            table[method][str(count)] = {
                "mean_abs_error": round(float(error.abs().mean()), 5),
                "rmse": round(float(error.square().mean().sqrt()), 5),
                "coverage_2se": round(float((error.abs() <= 2 * stderr).double().mean()), 3),
                "instability": summarise_instability(values)["mean"],
            }
            budgets.setdefault(str(count), runs[0].num_evaluations)
    return table, exact, budgets


def shapiq_reference(game, exact, budgets, repeats, seed) -> dict:
    """shapiq's pairwise-SII approximators at our budget of distinct evaluations per game."""
    try:
        import shapiq
    except ImportError:
        return {"available": False}
    num_regions = game.num_regions
    n = game.n_players
    num_phrases = n - num_regions
    pairs = [(k, num_regions + j) for k in range(num_regions) for j in range(num_phrases)]
    approximators = {
        "PermutationSamplingSII": lambda s: shapiq.PermutationSamplingSII(
            n, 2, index="SII", random_state=s
        ),
        "SVARMIQ": lambda s: shapiq.SVARMIQ(n, 2, index="SII", random_state=s),
        "KernelSHAPIQ": lambda s: shapiq.KernelSHAPIQ(n, 2, index="SII", random_state=s),
        "SHAPIQ": lambda s: shapiq.SHAPIQ(n, 2, index="SII", random_state=s),
    }
    table = {"players": n, "pairs_compared": len(pairs), "images": exact.shape[0]}
    for name, build in approximators.items():
        table[name] = {}
        for count, budget in budgets.items():
            errors, runs = [], []
            start = time.perf_counter()
            for b in range(exact.shape[0]):

                def single_game(coalitions: np.ndarray, b: int = b) -> np.ndarray:
                    masks = torch.from_numpy(coalitions.astype(bool))
                    values = game(masks.expand(game.batch_shape[0], *masks.shape))[b]
                    return values.double().numpy()

                values = []
                for r in range(repeats):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        result = build(seed + r).approximate(budget, single_game)
                    values.append([result[pair] for pair in pairs])
                estimate = torch.tensor(values, dtype=torch.float64)  # [R, pairs]
                errors.append(estimate - exact[b].reshape(1, -1))
                runs.append(estimate)
            error = torch.stack(errors)
            table[name][count] = {
                "budget": budget,
                "mean_abs_error": round(float(error.abs().mean()), 5),
                "rmse": round(float(error.square().mean().sqrt()), 5),
                "instability": summarise_instability(torch.stack(runs, dim=1))["mean"],
                "seconds": round(time.perf_counter() - start, 3),
            }
    return table


def throughput(v2_game, v1_feature, v1_input, repeats) -> dict:
    """Coalition evaluations (coalition x game) per second."""
    out = {}
    generator = torch.Generator().manual_seed(0)
    for name, game, count in (
        ("v2", v2_game, 16384),
        ("v1_feature", v1_feature, 4096),
        ("v1_input", v1_input, 8),
    ):
        batch = game.batch_shape[0]
        masks = torch.rand(batch, count, game.n_players, generator=generator) < 0.5
        seconds = timed(lambda g=game, m=masks: g(m), repeats)
        out[name] = {
            "games": batch,
            "coalitions_per_game": count,
            "evaluations_per_s": round(batch * count / seconds),
        }
    out["ratio_v2_over_v1_feature"] = round(
        out["v2"]["evaluations_per_s"] / out["v1_feature"]["evaluations_per_s"], 2
    )
    out["ratio_v1_feature_over_v1_input"] = round(
        out["v1_feature"]["evaluations_per_s"] / out["v1_input"]["evaluations_per_s"], 1
    )
    return out


def training_step(model: LoupeModel, batch: dict) -> Callable[[], None]:
    inputs = {key: batch[key] for key in ("pixel_values", "input_ids", "attention_mask")}

    def run() -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        model(**inputs, return_loss=True).loss.backward()
        model.eval()

    return run


def timing(model, v2_batch, v2_outputs, v1_batch, repeats, seed) -> dict:
    def v2_labels(method: str, samples: int) -> Callable[[], object]:
        def run():
            game = semantic_game(v2_outputs.region_embeds, v2_outputs.phrase_embeds)
            return region_phrase_interactions(
                game,
                num_samples=samples,
                method=method,
                generator=torch.Generator().manual_seed(seed),
                chunk_size=4096,
            )

        return run

    with torch.no_grad():
        v1_outputs = model.eval()(**v1_batch)
    region_masks = model.region_masks(v1_outputs.region_boxes, soft=False)

    def v1_labels(method: str, samples: int) -> Callable[[], object]:
        def run():
            with torch.no_grad():
                outputs = model.eval()(**v1_batch)  # the training step has these already
            game = token_game(
                model,
                v1_batch["pixel_values"],
                v1_batch["input_ids"],
                v1_batch["attention_mask"],
                patch_tokens=outputs.patch_tokens,
                word_tokens=outputs.word_tokens,
            )
            return token_region_interactions(
                game,
                region_masks,
                num_samples=samples,
                method=method,
                generator=torch.Generator().manual_seed(seed),
            )

        return run

    step = timed(training_step(model, v1_batch), repeats)
    v2 = {f"{m}_500_s": round(timed(v2_labels(m, 500), repeats), 4) for m in SAMPLING_METHODS}
    v2["stratified_100_s"] = round(timed(v2_labels("stratified", 100), repeats), 4)
    v1 = {
        "stratified_100_s": round(timed(v1_labels("stratified", 100), repeats), 4),
        "stratified_30_s": round(timed(v1_labels("stratified", 30), repeats), 4),
    }
    step_again = timed(training_step(model, v1_batch), repeats)  # load drift check
    train = (step + step_again) / 2
    return {
        "v2_labels_batch64_K16_M8": {
            **v2,
            "pairs": int(v2_outputs.region_embeds.shape[1] * v2_outputs.phrase_embeds.shape[1]),
            "images": int(v2_outputs.region_embeds.shape[0]),
        },
        "v1_feature_labels_batch32_K16": {
            **v1,
            "region_size_mean": round(float(region_masks.sum(-1).float().mean()), 2),
            "players": int(region_masks.shape[-1] + v1_batch["input_ids"].shape[-1]),
        },
        "train_step_batch32_s": round(train, 4),
        "train_step_drift": round(step_again / step, 3),
        "ratio_v1_labels_100_over_train_step": round(v1["stratified_100_s"] / train, 3),
        "ratio_v1_labels_30_over_train_step": round(v1["stratified_30_s"] / train, 3),
        "ratio_v2_labels_500_over_train_step": round(v2["stratified_500_s"] / train, 3),
    }


# --- main --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="few images and repeats")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    quick = args.quick
    repeats = 4 if quick else 10
    v2_images = 8 if quick else 32
    v1_images = 4 if quick else 8
    v2_counts = [10, 30, 100] if quick else [10, 30, 100, 300, 1000]
    v1_counts = [10, 30] if quick else [10, 30, 100, 300]
    load_at_start = os.getloadavg()[0]

    model = LoupeModel(LoupeConfig.from_preset("tiny")).eval()
    batch64, data_source = synthetic_batch(64, model)
    outputs64 = encode(model, batch64)
    start = time.perf_counter()

    # v2 on the real geometry: K = 16 regions of the region module, M = 8 phrases.
    v2_game = semantic_game(
        outputs64.region_embeds[:v2_images], outputs64.phrase_embeds[:v2_images]
    )
    sharp_v2_game = semantic_game(
        outputs64.region_embeds[:v2_images],
        outputs64.phrase_embeds[:v2_images],
        temperature=float(1 / model.logit_scale.exp()),
    )
    instability_table = {
        "v2_K16_M8_temperature_1": v2_instability(v2_game, v2_counts, repeats, args.seed),
        "v2_K16_M8_temperature_clip": v2_instability(sharp_v2_game, v2_counts, repeats, args.seed),
    }

    # v1 feature mode: K = 16 regions per image, players = 64 patches + caption tokens.
    small = {key: value[:v1_images] for key, value in batch64.items()}
    small_outputs = encode(model, small)
    region_masks = model.region_masks(small_outputs.region_boxes, soft=False)
    v1_game = token_game(
        model,
        small["pixel_values"],
        small["input_ids"],
        small["attention_mask"],
        patch_tokens=small_outputs.patch_tokens,
        word_tokens=small_outputs.word_tokens,
    )
    instability_table["v1_feature_K16"] = v1_instability(
        v1_game, region_masks, v1_counts, max(3, repeats // 2), args.seed
    )

    # A v2 game small enough for exact enumeration: K = 6, M = 4 (10 players).
    small_v2 = semantic_game(
        outputs64.region_embeds[:v2_images, :6],
        outputs64.phrase_embeds[:v2_images, :4],
        temperature=float(1 / model.logit_scale.exp()),
    )
    error_counts = [10, 30, 100] if quick else [10, 30, 100, 300]
    errors, _, budgets = error_vs_exact(small_v2, error_counts, repeats, args.seed)
    # shapiq's approximators at our budget (distinct evaluations per game) on the same games.
    shapiq_images = 2 if quick else 4
    shapiq_repeats = max(3, repeats // 2)
    shapiq_game = semantic_game(
        outputs64.region_embeds[:shapiq_images, :6],
        outputs64.phrase_embeds[:shapiq_images, :4],
        temperature=float(1 / model.logit_scale.exp()),
    )
    ours_at_budget, shapiq_exact, shapiq_budgets = error_vs_exact(
        shapiq_game, [10, 30], shapiq_repeats, args.seed
    )
    reference = shapiq_reference(
        shapiq_game,
        shapiq_exact.reshape(shapiq_images, -1),
        shapiq_budgets,
        shapiq_repeats,
        args.seed,
    )

    v1_input = token_game(
        model, small["pixel_values"], small["input_ids"], small["attention_mask"], mode="input"
    )
    v2_full = semantic_game(outputs64.region_embeds, outputs64.phrase_embeds)
    throughput_table = throughput(v2_full, v1_game, v1_input, 3)

    batch32 = {key: value[:32] for key, value in batch64.items()}
    timing_table = timing(model, batch64, outputs64, batch32, 3, args.seed)

    report = {
        "command": "python benchmarks/shapley_estimators.py" + (" --quick" if quick else ""),
        "data": data_source,
        "model": "LoupeModel(LoupeConfig.from_preset('tiny')), random init, eval mode",
        "threads": torch.get_num_threads(),
        "load_average_at_start": round(load_at_start, 2),
        "repeats_per_estimate": repeats,
        "v2_phrases": "caption noun phrases (ground truth spans), then 2-token windows up to M=8",
        "instability": instability_table,
        "instability_notes": {
            "definition": "E_{u!=v}|I_u-I_v| / E_w|I_w| over repeats, per target; 'mean' "
            "averages it over targets and images (the paper's protocol), 'median' is robust "
            "to near-zero interactions, 'pooled' divides mean differences by mean |I| over all "
            "targets",
            "v2_images": v2_images,
            "v1_images": v1_images,
            "v1_repeats": max(3, repeats // 2),
            "temperature_clip": round(float(1 / model.logit_scale.exp()), 4),
        },
        "error_vs_exact_v2_K6_M4": {"images": v2_images, "budget_per_game": budgets, **errors},
        "shapiq_reference_v2_K6_M4": {"ours_at_same_budget": ours_at_budget, **reference},
        "throughput": throughput_table,
        "timing": timing_table,
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
