"""Shapley interaction estimators side by side on the two LOUPE games; prints one JSON document.

    python benchmarks/shapley_estimators.py              # full run (a few minutes, 1 thread)
    python benchmarks/shapley_estimators.py --quick      # smoke run
    python benchmarks/shapley_estimators.py --threads 2  # timings with both cores

Everything runs in one process on a randomly initialised `tiny` LOUPE model and synthetic
images (`loupe_hf.data.synthetic`), so the ratios between variants are meaningful even when the
absolute seconds move with the machine's load. Sections:

- `instability`: Zhang et al.'s instability (METHOD §5) vs samples per target, on v2 (K=16
  regions x M=8 phrases, all 128 pairs per image) and v1 in feature mode (K=16 regions).
  Variants: plain (`uniform`), `antithetic`, `stratified` (equal allocation over |S|), and
  `stratified_neyman` (allocation proportional to the per-stratum spread measured on *other*
  images: what a trainer gets from the previous step's `stratum_std`, fixed before sampling,
  so still unbiased). For v1 also strata by the number of patches in S (`by_patches`).
- `error_vs_exact_v2_K6_M4`: a v2 game small enough to enumerate (10 players): mean absolute
  error, RMSE and ±2 SE coverage against exact interactions.
- `shapiq_reference_v2_K6_M4`: shapiq's pairwise-SII approximators on the same games at the
  same budget of distinct game evaluations.
- `throughput`: game evaluations per second (v2, v1 feature mode, v1 input mode).
- `timing`: v2 labels for 64 images (K=16, M=8, 500 samples per pair) and v1 feature-mode labels
  for 32 images (K=16 regions, 100 samples) against one forward+backward training step of the
  same model on the same 32 pairs. v1 `fast_*` include a forward pass for the tokens and the
  game's construction; `labels_only_*` start from a built game (a training step has the tokens);
  `mask_protocol_100` disables the game's fast path.
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
    size, length = model.config.vision_config.image_size, 14
    phrases = torch.zeros(num_images, NUM_PHRASES, length)
    for j in range(NUM_PHRASES):
        phrases[:, j, 1 + j : 1 + j + WINDOW] = 1.0
    return {
        "pixel_values": torch.randn(num_images, 3, size, size),
        "input_ids": torch.randint(5, model.config.text_config.vocab_size, (num_images, length)),
        "attention_mask": torch.ones(num_images, length, dtype=torch.long),
        "phrase_masks": phrases,
    }


@torch.no_grad()
def encode(model: LoupeModel, batch: dict):
    return model.eval()(**batch)


def subset(batch: dict, start: int, stop: int) -> dict:
    return {key: value[start:stop] for key, value in batch.items()}


# --- estimators under test ---------------------------------------------------------------------

Labeller = Callable[..., object]  # (num_samples, generator) -> InteractionEstimate


def v2_variants(game, pilot_game) -> dict[str, Labeller]:
    """The estimators compared on v2; Neyman weights come from other images (a 'previous step')."""
    pilot = region_phrase_interactions(
        pilot_game, num_samples=100, generator=torch.Generator().manual_seed(12345)
    )

    def labeller(**fixed) -> Labeller:
        return lambda count, generator: region_phrase_interactions(
            game, num_samples=count, generator=generator, **fixed
        )

    return {
        "uniform": labeller(method="uniform"),
        "antithetic": labeller(method="antithetic"),
        "stratified": labeller(method="stratified"),
        "stratified_neyman": labeller(method="stratified", allocation=pilot.stratum_std),
    }


def v1_variants(game, region_masks, pilot_game, pilot_masks) -> dict[str, Labeller]:
    pilot = token_region_interactions(
        pilot_game, pilot_masks, num_samples=100, generator=torch.Generator().manual_seed(12345)
    )

    def labeller(**fixed) -> Labeller:
        return lambda count, generator: token_region_interactions(
            game, region_masks, num_samples=count, generator=generator, **fixed
        )

    return {
        "uniform": labeller(method="uniform"),
        "antithetic": labeller(method="antithetic"),
        "stratified": labeller(method="stratified"),
        "stratified_neyman": labeller(method="stratified", allocation=pilot.stratum_std),
        "stratified_by_patches": labeller(method="stratified", stratify_by_patches=True),
    }


# --- measurements ------------------------------------------------------------------------------


def timed(function: Callable[[], object], repeats: int) -> dict:
    """Median and minimum wall seconds over `repeats` runs after a warm-up."""
    function()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return {"median_s": round(statistics.median(samples), 4), "min_s": round(min(samples), 4)}


def repeated(labeller: Labeller, count: int, repeats: int, seed: int) -> list:
    return [labeller(count, torch.Generator().manual_seed(seed + r)) for r in range(repeats)]


def summarise_instability(estimates: torch.Tensor) -> dict:
    """Per-target instability over dim 0, averaged as the paper does, plus robust summaries."""
    per_target = instability(estimates.double())
    finite = per_target[torch.isfinite(per_target)]
    repeats = estimates.shape[0]
    flat = estimates.double().reshape(repeats, -1)
    differences = (flat[:, None] - flat[None]).abs().sum((0, 1)) / (repeats * (repeats - 1))
    return {
        "mean": round(float(finite.mean()), 4),
        "median": round(float(finite.median()), 4),
        "pooled": round(float(differences.mean() / flat.abs().mean()), 4),
    }


def instability_table(variants: dict[str, Labeller], counts, repeats, seed) -> dict:
    table = {}
    for name, labeller in variants.items():
        table[name] = {}
        for count in counts:
            runs = repeated(labeller, count, repeats, seed)
            table[name][str(count)] = summarise_instability(torch.stack([r.values for r in runs]))
    return table


def error_table(variants: dict[str, Labeller], exact, counts, repeats, seed) -> tuple[dict, dict]:
    """Errors against exact interactions, and the distinct evaluations per game used."""
    table, budgets = {}, {}
    for name, labeller in variants.items():
        table[name] = {}
        for count in counts:
            runs = repeated(labeller, count, repeats, seed)
            values = torch.stack([run.values.double() for run in runs])
            stderr = torch.stack([run.stderr.double() for run in runs])
            error = values - exact
            table[name][str(count)] = {
                "mean_abs_error": round(float(error.abs().mean()), 5),
                "rmse": round(float(error.square().mean().sqrt()), 5),
                "coverage_2se": round(float((error.abs() <= 2 * stderr).double().mean()), 3),
                "instability": summarise_instability(values)["mean"],
            }
            budgets.setdefault(str(count), runs[0].num_evaluations)
    return table, budgets


def shapiq_reference(game, exact, budgets, repeats, seed) -> dict:
    """shapiq's pairwise-SII approximators at our budget of distinct evaluations per game."""
    try:
        import shapiq
    except ImportError:
        return {"available": False}
    num_regions, n = game.num_regions, game.n_players
    pairs = [(k, j) for k in range(num_regions) for j in range(num_regions, n)]
    approximators = {
        "PermutationSamplingSII": shapiq.PermutationSamplingSII,
        "SVARMIQ": shapiq.SVARMIQ,
        "KernelSHAPIQ": shapiq.KernelSHAPIQ,
        "SHAPIQ": shapiq.SHAPIQ,
    }
    table = {"version": shapiq.__version__ if hasattr(shapiq, "__version__") else None}
    for name, approximator in approximators.items():
        table[name] = {}
        for count, budget in budgets.items():
            runs, start = [], time.perf_counter()
            for b in range(exact.shape[0]):

                def single_game(coalitions: np.ndarray, b: int = b) -> np.ndarray:
                    masks = torch.from_numpy(coalitions.astype(bool))
                    return game(masks.expand(game.batch_shape[0], *masks.shape))[b].double().numpy()

                values = []
                for r in range(repeats):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        result = approximator(n, 2, index="SII", random_state=seed + r).approximate(
                            budget, single_game
                        )
                    values.append([result[pair] for pair in pairs])
                runs.append(torch.tensor(values, dtype=torch.float64))  # [R, pairs]
            estimates = torch.stack(runs, dim=1)  # [R, images, pairs]
            error = estimates - exact.reshape(1, exact.shape[0], -1)
            table[name][count] = {
                "budget": budget,
                "mean_abs_error": round(float(error.abs().mean()), 5),
                "rmse": round(float(error.square().mean().sqrt()), 5),
                "instability": summarise_instability(estimates)["mean"],
                "seconds": round(time.perf_counter() - start, 3),
            }
    return table


def throughput(games: dict, repeats: int) -> dict:
    """Coalition evaluations (coalitions x games) per second through the mask protocol."""
    out = {}
    generator = torch.Generator().manual_seed(0)
    for name, (game, count) in games.items():
        batch = game.batch_shape[0]
        masks = torch.rand(batch, count, game.n_players, generator=generator) < 0.5
        seconds = timed(lambda g=game, m=masks: g(m), repeats)["min_s"]
        out[name] = {
            "games": batch,
            "coalitions_per_game": count,
            "evaluations_per_s": round(batch * count / seconds),
        }
    return out


def training_step(model: LoupeModel, batch: dict) -> Callable[[], None]:
    inputs = {key: batch[key] for key in ("pixel_values", "input_ids", "attention_mask")}

    def run() -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        model(**inputs, return_loss=True).loss.backward()
        model.eval()

    return run


def timing(model, batch64, outputs64, repeats, seed) -> dict:
    """Label wall time against a training step, measured interleaved in one process."""

    def v2_labels(samples: int, method: str = "stratified") -> Callable[[], object]:
        def run():
            game = semantic_game(outputs64.region_embeds, outputs64.phrase_embeds)
            return region_phrase_interactions(
                game,
                num_samples=samples,
                method=method,
                generator=torch.Generator().manual_seed(seed),
            )

        return run

    batch32 = subset(batch64, 0, 32)
    inputs32 = {key: batch32[key] for key in ("pixel_values", "input_ids", "attention_mask")}
    region_masks = model.region_masks(encode(model, inputs32).region_boxes, soft=False)

    def v1_labels(samples: int, fast: bool = True) -> Callable[[], object]:
        def run():
            outputs = encode(model, inputs32)  # a training step has these tokens already
            game = token_game(
                model,
                inputs32["pixel_values"],
                inputs32["input_ids"],
                inputs32["attention_mask"],
                image_pooling=model.config.image_pooling,
                patch_tokens=outputs.patch_tokens,
                word_tokens=outputs.word_tokens,
            )
            if not fast:  # the plain mask protocol, for the ratio
                game = MaskProtocolOnly(game)
            return token_region_interactions(
                game,
                region_masks,
                num_samples=samples,
                generator=torch.Generator().manual_seed(seed),
            )

        return run

    prebuilt = encode(model, inputs32)
    game32 = token_game(
        model,
        inputs32["pixel_values"],
        inputs32["input_ids"],
        inputs32["attention_mask"],
        image_pooling=model.config.image_pooling,
        patch_tokens=prebuilt.patch_tokens,
        word_tokens=prebuilt.word_tokens,
    )

    def v1_labels_only(samples: int) -> Callable[[], object]:
        return lambda: token_region_interactions(
            game32, region_masks, num_samples=samples, generator=torch.Generator().manual_seed(seed)
        )

    step = timed(training_step(model, batch32), repeats)
    v2 = {f"{m}_500": timed(v2_labels(500, m), repeats) for m in ("uniform", "stratified")}
    v2["stratified_100"] = timed(v2_labels(100), repeats)
    v1 = {
        "fast_100": timed(v1_labels(100), repeats),
        "fast_30": timed(v1_labels(30), repeats),
        "mask_protocol_100": timed(v1_labels(100, fast=False), repeats),
        "labels_only_100": timed(v1_labels_only(100), repeats),
        "labels_only_30": timed(v1_labels_only(30), repeats),
        "forward_only_for_tokens": timed(lambda: encode(model, inputs32), repeats),
    }
    step_again = timed(training_step(model, batch32), repeats)
    train = (step["min_s"] + step_again["min_s"]) / 2
    return {
        "v2_labels_64_images_K16_M8": v2,
        "v1_feature_labels_32_pairs_K16": {
            **v1,
            "region_size_mean": round(float(region_masks.sum(-1).float().mean()), 2),
            "players": int(region_masks.shape[-1] + inputs32["input_ids"].shape[-1]),
        },
        "train_step_32_pairs": step,
        "train_step_32_pairs_again": step_again,
        "ratios_by_min_time": {
            "v2_stratified_500_over_train_step": round(v2["stratified_500"]["min_s"] / train, 3),
            "v1_fast_100_over_train_step": round(v1["fast_100"]["min_s"] / train, 3),
            "v1_fast_30_over_train_step": round(v1["fast_30"]["min_s"] / train, 3),
            "v1_labels_only_100_over_train_step": round(v1["labels_only_100"]["min_s"] / train, 3),
            "v1_labels_only_30_over_train_step": round(v1["labels_only_30"]["min_s"] / train, 3),
            "v1_mask_protocol_100_over_fast_100": round(
                v1["mask_protocol_100"]["min_s"] / v1["fast_100"]["min_s"], 2
            ),
        },
    }


class MaskProtocolOnly:
    """Hides `interaction_summands`, so estimators evaluate coalitions through the protocol."""

    def __init__(self, game):
        self.game = game
        self.n_players, self.num_patches = game.n_players, game.num_patches
        self.players, self.batch_shape = game.players, game.batch_shape

    def __call__(self, masks: torch.Tensor) -> torch.Tensor:
        return self.game(masks)


# --- main --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="few images and repeats")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 keeps timings stable on a shared machine (2 cores here)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    quick = args.quick
    repeats = 4 if quick else 10
    v2_images, v1_images = (8, 4) if quick else (32, 8)
    v2_counts = [10, 30, 100] if quick else [10, 30, 100, 300, 1000]
    v1_counts = [30, 100] if quick else [10, 30, 100, 300]
    load_at_start = os.getloadavg()[0]

    model = LoupeModel(LoupeConfig.from_preset("tiny")).eval()
    batch64, data_source = synthetic_batch(64, model)
    outputs64 = encode(model, batch64)
    clip_temperature = float(1 / model.logit_scale.detach().exp())
    start = time.perf_counter()

    def v2_game(lo, hi, regions=16, phrases=NUM_PHRASES, temperature=1.0):
        return semantic_game(
            outputs64.region_embeds[lo:hi, :regions],
            outputs64.phrase_embeds[lo:hi, :phrases],
            temperature=temperature,
        )

    # v2, K = 16 regions of the region module x M = 8 phrases; Neyman weights from images 32-63.
    results = {}
    for label, temperature in (("temperature_1", 1.0), ("temperature_clip", clip_temperature)):
        variants = v2_variants(v2_game(0, v2_images, temperature=temperature), v2_game(32, 64))
        results[f"v2_K16_M8_{label}"] = instability_table(variants, v2_counts, repeats, args.seed)

    # v1 feature mode: K = 16 regions, players = 64 patches + the caption's tokens.
    def v1_game(lo, hi):
        part = subset(batch64, lo, hi)
        inputs = {key: part[key] for key in ("pixel_values", "input_ids", "attention_mask")}
        outputs = encode(model, inputs)
        game = token_game(
            model,
            inputs["pixel_values"],
            inputs["input_ids"],
            inputs["attention_mask"],
            image_pooling=model.config.image_pooling,
            patch_tokens=outputs.patch_tokens,
            word_tokens=outputs.word_tokens,
        )
        return game, model.region_masks(outputs.region_boxes, soft=False)

    v1_repeats = max(3, repeats // 2)
    variants = v1_variants(*v1_game(0, v1_images), *v1_game(32, 32 + v1_images))
    results["v1_feature_K16"] = instability_table(variants, v1_counts, v1_repeats, args.seed)

    # A v2 game small enough for exact enumeration: K = 6, M = 4 (10 players).
    small, small_pilot = (
        v2_game(0, v2_images, 6, 4, clip_temperature),
        v2_game(32, 64, 6, 4, clip_temperature),
    )
    exact = region_phrase_interactions(small, num_samples=None).values.double()
    error_counts = [10, 30, 100] if quick else [10, 30, 100, 300]
    errors, budgets = error_table(
        v2_variants(small, small_pilot), exact, error_counts, repeats, args.seed
    )

    # shapiq at our budget (distinct evaluations per game) on the first images of the same games.
    shapiq_images = 2 if quick else 4
    shapiq_budgets = {key: value for key, value in budgets.items() if key in ("10", "30")}
    reference = shapiq_reference(
        v2_game(0, shapiq_images, 6, 4, clip_temperature),
        exact[:shapiq_images],
        shapiq_budgets,
        max(3, repeats // 2),
        args.seed,
    )

    v1_small, _ = v1_game(0, v1_images)
    v1_input = token_game(
        model,
        batch64["pixel_values"][:v1_images],
        batch64["input_ids"][:v1_images],
        batch64["attention_mask"][:v1_images],
        mode="input",
    )
    throughput_table = throughput(
        {
            "v2_64_images": (v2_game(0, 64), 16384),
            "v1_feature": (v1_small, 4096),
            "v1_input": (v1_input, 8),
        },
        3,
    )

    report = {
        "command": "python benchmarks/shapley_estimators.py"
        + (" --quick" if quick else "")
        + (f" --threads {args.threads}" if args.threads != 1 else ""),
        "data": data_source,
        "model": "LoupeModel(LoupeConfig.from_preset('tiny')), random init, eval mode",
        "threads": torch.get_num_threads(),
        "load_average_at_start": round(load_at_start, 2),
        "v2_phrases": "caption noun phrases (ground-truth spans), then 2-token windows up to M=8",
        "v2_embeddings": "model region_embeds / phrase_embeds (L2-normalised)",
        "clip_temperature": round(clip_temperature, 4),
        "instability": results,
        "instability_notes": {
            "definition": "E_{u!=v}|I_u-I_v| / E_w|I_w| over repeats, per target; 'mean' averages "
            "it over targets and images (the paper's protocol), 'median' is robust to near-zero "
            "interactions, 'pooled' divides the mean difference by the mean |I| over all targets",
            "v2_images": v2_images,
            "v2_repeats": repeats,
            "v1_images": v1_images,
            "v1_repeats": v1_repeats,
            "neyman_weights_from": "stratum_std of a 100-sample run on 32 other images",
        },
        "error_vs_exact_v2_K6_M4": {
            "images": v2_images,
            "temperature": "clip",
            "distinct_evaluations_per_game": budgets,
            **errors,
        },
        "shapiq_reference_v2_K6_M4": {"images": shapiq_images, "pairs": 24, **reference},
        "throughput": throughput_table,
        "timing": timing(model, batch64, outputs64, 3, args.seed),
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
