"""Interaction labels (METHOD §3.3-3.5): from game values, sampled or predicted by UNSIL, to the
[0, 1] labels the TSA and FSA losses take.

One level's labels are made in one call, `interaction_labels`:

1. with a UNSIL predictor, each target gets Î and an uncertainty sigma; `hybrid_label_mask` draws
   which targets are sampled (u ~ U(0, 1) ≤ sigma, or all of them during UNSIL's warm-up);
2. `estimate(selected)` samples the Shapley interactions of those targets only;
3. `combine_labels` takes the sampled value where there is one and Î elsewhere, in units of the
   level's running interaction scale (`update_interaction_scale`), and `unsil_loss` trains UNSIL
   on the sampled targets.

Then `tsa_label_values` picks what the region confidences rank and `normalize_interactions` maps
each image's labels to [0, 1]. Everything that is a label is detached: UNSIL's predictions
supervise the TSA / FSA losses but those losses must not train UNSIL.

Several processes: a label depends on its own sample only, except through the running scale and
the UNSIL loss's mean over the sampled targets. Both use totals summed over processes
(`sum_over_processes`), so that a split batch gets the labels, the loss and the statistics of the
whole batch; `join_interaction_labels` takes part in those sums for a process that has no target of
the level this step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..choices import INTERACTION_NORMALIZATIONS, TSA_LABELS, check_choice
from ..losses import check_same_shape, share_of_global_mean, unsil_loss
from ..shapley.coalitions import DrawStreams, uniform_draws

# Momentum of the running scale of sampled interactions that UNSIL regresses against: slow enough
# to be stable, fast enough to follow the encoders as they train.
SCALE_MOMENTUM = 0.9


@dataclass
class InteractionLabels:
    """Raw interaction labels `[B, T]` of one level (0 for invalid targets), with what UNSIL
    contributed: its loss, the share of labels it supplied, its mean absolute error against the
    sampled labels (in units of the running scale) and its mean sigma."""

    raw: torch.Tensor
    unsil_loss: torch.Tensor
    share: float = 0.0
    error: float = 0.0
    sigma: float = 0.0

    def statistics(self, prefix: str, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """The logged UNSIL statistics as `{prefix}_unsil_{share,error,sigma}` tensors like `like`."""
        values = {"share": self.share, "error": self.error, "sigma": self.sigma}
        return {f"{prefix}_unsil_{name}": like.new_tensor(value) for name, value in values.items()}


def sampling_arguments(
    config: Any, level: str, generator: torch.Generator | DrawStreams
) -> dict[str, Any]:
    """Estimator arguments for the labels of a level (`"token"` or `"semantic"`) under `config`."""
    samples = config.shapley_num_samples
    if level == "token" and config.shapley_token_num_samples is not None:
        samples = config.shapley_token_num_samples
    return {"num_samples": samples, "method": config.shapley_estimator, "generator": generator}


def update_interaction_scale(
    scale: torch.Tensor, sampled: torch.Tensor, training: bool
) -> torch.Tensor:
    """Updates (in training) and returns the running root mean square of a level's sampled
    interactions. UNSIL regresses interactions in these units, so its sigma means "error relative
    to a typical interaction", whatever the game's raw magnitude.

    Args:
        scale: the level's scalar buffer (0 until the first update).
        sampled: this step's sampled interactions (any shape; may be empty).
        training: update the buffer only when training.
    """
    squares = sampled.float().square().sum()
    return _update_scale(scale, squares, float(sampled.numel()), training)


def _update_scale(
    scale: torch.Tensor, sum_of_squares: torch.Tensor, count: float, training: bool
) -> torch.Tensor:
    """`update_interaction_scale` from the step's totals (possibly summed over processes)."""
    if training and count > 0:
        observed = (sum_of_squares / count).sqrt().clamp_min(1e-6)
        fresh = scale.item() == 0
        scale.copy_(observed if fresh else SCALE_MOMENTUM * scale + (1 - SCALE_MOMENTUM) * observed)
    return scale.clamp_min(1e-6) if scale.item() > 0 else scale.new_ones(())


def interaction_labels(
    estimate: Callable[[torch.Tensor], torch.Tensor],
    valid: torch.Tensor,
    *,
    predictor: torch.nn.Module | None = None,
    predictor_inputs: dict[str, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    gate_draws: torch.Tensor | None = None,
    warmup: bool = False,
    min_sample_rate: float = 0.0,
    uncertainty_weight: float = 1.0,
    scale: torch.Tensor | None = None,
    training: bool = False,
    sum_over_processes: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> InteractionLabels:
    """Raw interaction labels `[B, T]` of the `valid` (bool `[B, T]`) targets; invalid ones get 0.

    Args:
        estimate: `estimate(selected)` returns sampled interactions `[B, T]` where `selected`
            (bool `[B, T]`) and NaN elsewhere, so only the targets that need a label pay for one.
        valid: the real targets (False for padding).
        predictor: a UNSIL predictor, called as `predictor(**predictor_inputs)`; without one every
            valid target is sampled.
        generator: the source of the hybrid rule's draws, unless `gate_draws` gives them.
        gate_draws: the hybrid rule's u ~ U(0, 1) per target, `[B, T]` (e.g. `keyed_uniforms` by
            global sample index, so that they do not depend on how the batch is split).
        warmup: sample every target (UNSIL's warm-up).
        min_sample_rate: a floor on sigma as the sampling probability.
        uncertainty_weight: λ of `unsil_loss`.
        scale: the level's running-scale buffer (`update_interaction_scale`); needed with a predictor.
        training: whether the running scale may move.
        sum_over_processes: sums a tensor over the processes of a split batch (default: this
            process only). With a predictor it is called twice, on every process alike; a process
            without targets of the level calls `join_interaction_labels` instead.
    """
    if predictor is None:
        sampled = estimate(valid)
        return InteractionLabels(
            raw=torch.nan_to_num(sampled), unsil_loss=valid.new_zeros((), dtype=torch.float)
        )
    if scale is None:
        raise ValueError("interaction labels with a UNSIL predictor need its running scale")
    total = sum_over_processes or _this_process
    batch = valid.shape[0]
    prediction = predictor(**(predictor_inputs or {}))
    predicted = prediction.interaction.reshape(batch, -1)
    sigma = prediction.sigma.reshape(batch, -1)
    gate = sigma.detach().clamp_min(min_sample_rate)
    needs = hybrid_label_mask(gate, generator=generator, warmup=warmup, draws=gate_draws) & valid
    sampled = estimate(needs)
    local = _label_totals(sampled[needs], needs, valid, sigma.detach())
    squares, num_sampled, num_valid, sigma_sum = total(local).tolist()
    unit = _update_scale(scale, local.new_tensor(squares), num_sampled, training)
    target = sampled / unit
    combined = combine_labels(predicted.detach(), target, needs)
    errors = (predicted.detach().float() - target.float()).abs()[needs]
    error_sum = total(errors.sum().reshape(1)).item()
    # The loss is a mean over the sampled targets of the whole (split) batch: see
    # `share_of_global_mean`.
    loss = unsil_loss(predicted, sigma, target, needs, uncertainty_weight)
    loss = share_of_global_mean(loss, local[1].item(), num_sampled)
    return InteractionLabels(
        raw=torch.where(valid, combined * unit, 0.0),
        unsil_loss=loss,
        **_statistics(num_sampled, num_valid, sigma_sum, error_sum),
    )


def join_interaction_labels(
    sum_over_processes: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    scale: torch.Tensor | None = None,
    training: bool = True,
) -> InteractionLabels:
    """Takes part, with nothing, in the sums over processes of `interaction_labels` (same calls,
    same shapes), for a process that has no target of a level this step while others have: without
    it, the others would wait for it forever. Updates the level's running `scale` from the global
    totals as the others do (no process may keep a stale one: FSDP, unlike DDP, does not copy
    rank 0's buffers to the others). Returns no label, no loss and the global statistics.
    """
    squares, num_sampled, num_valid, sigma_sum = sum_over_processes(
        torch.zeros(4, device=device)
    ).tolist()
    if scale is not None:
        _update_scale(scale, scale.new_tensor(squares), num_sampled, training)
    error_sum = sum_over_processes(torch.zeros(1, device=device)).item()
    return InteractionLabels(
        raw=torch.zeros(0, 0, device=device),
        unsil_loss=torch.zeros((), device=device),
        **_statistics(num_sampled, num_valid, sigma_sum, error_sum),
    )


def _statistics(
    num_sampled: float, num_valid: float, sigma_sum: float, error_sum: float
) -> dict[str, float]:
    """`InteractionLabels`' share, error and sigma from the (global) totals; 0 when undefined."""
    return {
        "share": 1.0 - num_sampled / num_valid if num_valid else 0.0,
        "error": error_sum / num_sampled if num_sampled else 0.0,
        "sigma": sigma_sum / num_valid if num_valid else 0.0,
    }


def _label_totals(
    sampled: torch.Tensor, needs: torch.Tensor, valid: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """This process's [Σ sampled², #sampled, #valid, Σ sigma over valid] (float32, one tensor, so
    that one collective sums them all)."""
    return torch.stack(
        [
            sampled.float().square().sum(),
            needs.sum().float(),
            valid.sum().float(),
            sigma.float()[valid].sum(),
        ]
    )


def _this_process(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def tsa_label_values(raw: torch.Tensor, region_masks: torch.Tensor, kind: str) -> torch.Tensor:
    """What the region confidences are trained to rank (`LoupeConfig.tsa_label`), from raw `[B, K]`
    interactions of regions with hard masks `[B, K, N1]`: the signed interaction, its magnitude, or
    its magnitude per patch of the region."""
    check_choice("tsa_label", kind, TSA_LABELS)
    if kind == "signed":
        return raw
    if kind == "magnitude":
        return raw.abs()
    return raw.abs() / region_masks.sum(-1).clamp_min(1).to(raw.dtype)


def normalize_interactions(
    values: torch.Tensor, valid: torch.Tensor | None = None, method: str = "minmax", dims: int = 1
) -> torch.Tensor:
    """Maps interactions to [0, 1] labels, separately for each image (the paper says "normalised"
    without detail; this is our documented choice).

    Args:
        values: `[B, *targets]` interactions (e.g. `[B, K]` regions or `[B, K, M]` pairs).
        valid: bool like `values`; invalid targets (padding phrases) are ignored and get 0.
        method: `"minmax"` — (I − min) / (max − min) over the image's valid targets, so the most
            cooperative target gets 1 and the least 0 (an image whose targets all tie gets 0.5);
            `"sigmoid"` — sigmoid of the interaction standardised by the image's mean and std,
            which keeps relative gaps and is less sensitive to one outlier.
        dims: how many trailing dims index the targets of one image.
    """
    check_choice("interaction normalization", method, INTERACTION_NORMALIZATIONS)
    if valid is None:
        valid = torch.ones_like(values, dtype=torch.bool)
    flat, flat_valid = values.flatten(-dims), valid.flatten(-dims)
    count = flat_valid.sum(-1, keepdim=True).clamp_min(1)
    if method == "minmax":
        low = torch.where(flat_valid, flat, torch.inf).amin(-1, keepdim=True)
        high = torch.where(flat_valid, flat, -torch.inf).amax(-1, keepdim=True)
        span = high - low
        scaled = torch.where(span > 1e-12, (flat - low) / span.clamp_min(1e-12), 0.5)
    else:
        mean = torch.where(flat_valid, flat, 0).sum(-1, keepdim=True) / count
        variance = torch.where(flat_valid, (flat - mean) ** 2, 0).sum(-1, keepdim=True) / count
        scaled = torch.sigmoid((flat - mean) / variance.sqrt().clamp_min(1e-12))
    return torch.where(flat_valid, scaled, 0.0).reshape(values.shape)


def hybrid_label_mask(
    sigma: torch.Tensor,
    generator: torch.Generator | None = None,
    warmup: bool = False,
    draws: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which targets get a sampled Shapley label: per target u ~ U(0, 1), sample iff u ≤ sigma.

    Args:
        sigma: `[*targets]` uncertainties in [0, 1] (any float dtype, any device).
        generator: source of u; with a seeded generator the draw is reproducible. It may live on
            another device than `sigma` (u is drawn on the generator's device, then moved).
        warmup: during UNSIL's warm-up every target is sampled. u is drawn anyway, so the
            generator's stream does not depend on whether a step was a warm-up step.
        draws: u itself, `[*targets]` (then `generator` is not used).

    Returns:
        bool `[*targets]` on `sigma.device`, True = compute the label by sampling (and train UNSIL
        on it). An undefined sigma (NaN) counts as "unsure" and is sampled.
    """
    if draws is not None:
        check_same_shape(sigma=sigma, draws=draws)
        u = draws.to(sigma.device)
    else:
        u = uniform_draws(tuple(sigma.shape), generator, sigma.device)
    # `~(u > sigma)`, not `u <= sigma`: comparisons with NaN are False, so NaN sigma → sample.
    needs_sampling = ~(u > sigma.detach().float())
    return needs_sampling | warmup


def combine_labels(
    predicted: torch.Tensor, sampled: torch.Tensor, needs_sampling: torch.Tensor
) -> torch.Tensor:
    """The hybrid labels: the sampled interaction where computed, UNSIL's prediction elsewhere.

    Args:
        predicted: `[*targets]` UNSIL predictions Î.
        sampled: `[*targets]` sampled interactions I*; entries not computed may hold anything
            (typically NaN), but every entry where `needs_sampling` is True must be finite.
        needs_sampling: bool `[*targets]` from `hybrid_label_mask`.

    Returns:
        `[*targets]` labels, detached (they supervise the TSA / FSA losses, never UNSIL itself).

    Raises:
        ValueError: on mismatched shapes, or a non-finite sampled entry that would be used.
    """
    check_same_shape(predicted=predicted, sampled=sampled, needs_sampling=needs_sampling)
    needs_sampling = needs_sampling.bool()
    if not torch.isfinite(sampled[needs_sampling]).all():
        raise ValueError("sampled interactions must be finite wherever needs_sampling is True")
    return torch.where(needs_sampling, sampled.to(predicted.dtype), predicted).detach()


def unsil_statistics(
    predicted: torch.Tensor,
    sigma: torch.Tensor,
    target: torch.Tensor,
    needs_sampling: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> dict[str, float | None]:
    """How much UNSIL is trusted and how good it is, for the per-step training log.

    Args:
        predicted / sigma / target: `[*targets]` as for `unsil_loss` (target may be NaN where
            it was not sampled).
        needs_sampling: bool `[*targets]` from `hybrid_label_mask`.
        valid: optional bool `[*targets]`, False for padding targets (e.g. pairs with a padded
            phrase); those are left out of every statistic.

    Returns:
        - `"unsil_label_share"`: share of (valid) labels that came from UNSIL, 1 - sampled share.
        - `"unsil_mae"`: mean |Î - I*| over the sampled targets, or None when nothing was sampled
          (None rather than 0, which would read as a perfect predictor).
        - `"unsil_sigma_mean"`: mean sigma.
        - `"unsil_num_sampled"`: number of sampled targets (to weight `unsil_mae` across steps).
        Shares and means of an empty target set are None as well.
    """
    check_same_shape(predicted=predicted, sigma=sigma, target=target, needs_sampling=needs_sampling)
    with torch.no_grad():
        valid = torch.ones_like(needs_sampling, dtype=torch.bool) if valid is None else valid.bool()
        sampled = needs_sampling.bool() & valid
        num_valid, num_sampled = int(valid.sum()), int(sampled.sum())
        errors = (predicted.float() - target.float()).abs()[sampled]
        return {
            "unsil_label_share": 1.0 - num_sampled / num_valid if num_valid else None,
            "unsil_mae": errors.mean().item() if num_sampled else None,
            "unsil_sigma_mean": sigma.float()[valid].mean().item() if num_valid else None,
            "unsil_num_sampled": float(num_sampled),
        }


__all__ = [
    "SCALE_MOMENTUM",
    "InteractionLabels",
    "combine_labels",
    "hybrid_label_mask",
    "interaction_labels",
    "join_interaction_labels",
    "normalize_interactions",
    "sampling_arguments",
    "tsa_label_values",
    "unsil_statistics",
    "update_interaction_scale",
]
