"""UNSIL's hybrid labelling rule and loss (METHOD §3.5, eq. 12), as pure tensor functions.

A UNSIL predictor (`loupe_hf.unsil`) gives, for every target (a region, or a region-phrase
pair), a predicted interaction Î and an uncertainty sigma ∈ (0, 1). One training step then runs:

>>> needs_sampling = hybrid_label_mask(sigma.detach(), generator, warmup=step < warmup_steps)
>>> sampled = torch.full_like(predicted, float("nan"))
>>> sampled[needs_sampling] = ...  # Shapley sampling, only for these targets
>>> labels = combine_labels(predicted, sampled, needs_sampling)  # → TSA / FSA losses
>>> loss = unsil_loss(predicted, sigma, sampled, needs_sampling, uncertainty_weight=λ)
>>> logs = unsil_statistics(predicted, sigma, sampled, needs_sampling)

Everything that is a label here is detached: UNSIL's predictions supervise the TSA / FSA losses
but those losses must not train UNSIL (only `unsil_loss` does, and only on sampled targets).
"""

from __future__ import annotations

import torch


def hybrid_label_mask(
    sigma: torch.Tensor, generator: torch.Generator | None = None, warmup: bool = False
) -> torch.Tensor:
    """Which targets get a sampled Shapley label: per target u ~ U(0, 1), sample iff u ≤ sigma.

    Args:
        sigma: `[*targets]` uncertainties in [0, 1] (any float dtype, any device).
        generator: source of u; with a seeded generator the draw is reproducible. It may live on
            another device than `sigma` (u is drawn on the generator's device, then moved).
        warmup: during UNSIL's warm-up every target is sampled. u is drawn anyway, so the
            generator's stream does not depend on whether a step was a warm-up step.

    Returns:
        bool `[*targets]` on `sigma.device`, True = compute the label by sampling (and train UNSIL
        on it). An undefined sigma (NaN) counts as "unsure" and is sampled.
    """
    device = generator.device if generator is not None else sigma.device
    u = torch.rand(sigma.shape, generator=generator, device=device, dtype=torch.float32)
    # `~(u > sigma)`, not `u <= sigma`: comparisons with NaN are False, so NaN sigma → sample.
    needs_sampling = ~(u.to(sigma.device) > sigma.detach().float())
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
    _check_same_shape(predicted=predicted, sampled=sampled, needs_sampling=needs_sampling)
    needs_sampling = needs_sampling.bool()
    if not torch.isfinite(sampled[needs_sampling]).all():
        raise ValueError("sampled interactions must be finite wherever needs_sampling is True")
    return torch.where(needs_sampling, sampled.to(predicted.dtype), predicted).detach()


def unsil_loss(
    predicted: torch.Tensor,
    sigma: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    uncertainty_weight: float = 1.0,
) -> torch.Tensor:
    """Uncertainty-weighted regression of UNSIL on the sampled targets (METHOD eq. 12, our reading).

        L = mean over masked targets of  (Î - I*)² / sigma  +  λ · sigma

    The source garbles where the constants go; this form keeps the two properties that matter:
    a confident predictor (small sigma) pays more for its errors, and sigma cannot grow for free.
    For a fixed error e the loss is minimised at sigma = |e| / √λ, so sigma learns the expected
    absolute error in units of √λ; and since sigma is also the probability of sampling a label, λ
    decides how large an expected error is worth a sample. With interaction labels normalised to
    [0, 1] (`LoupeConfig.interaction_normalization`), λ = 1 gives sigma ≈ |Î - I*|. The predictor
    clamps sigma to [eps, 1 - eps], which keeps 1/sigma bounded.

    Args:
        predicted: `[*targets]` Î, with gradient.
        sigma: `[*targets]` sigma ∈ (0, 1), with gradient.
        target: `[*targets]` sampled interactions I* (treated as constants); entries outside `mask`
            are ignored and may be NaN.
        mask: bool `[*targets]`, the targets that were sampled (and are real, not padding).
        uncertainty_weight: λ ≥ 0.

    Returns:
        Scalar loss (float32). When nothing was sampled it is 0 but still attached to the graph of
        `predicted` and `sigma`, so a backward pass works (and gives zero gradients).
    """
    _check_same_shape(predicted=predicted, sigma=sigma, target=target, mask=mask)
    if uncertainty_weight < 0:
        raise ValueError(f"uncertainty_weight must be >= 0, got {uncertainty_weight}")
    mask = mask.bool()
    count = mask.sum()
    if count == 0:
        return (predicted.sum() + sigma.sum()).float() * 0.0
    if not torch.isfinite(target[mask]).all():
        raise ValueError("target must be finite wherever mask is True")
    # Replace unused targets *before* the arithmetic: a NaN that is only masked afterwards would
    # still poison the backward pass (0 · NaN = NaN).
    target = torch.where(mask, target.detach().float(), 0.0)
    predicted, sigma = predicted.float(), sigma.float()
    per_target = (predicted - target).square() / sigma + uncertainty_weight * sigma
    return torch.where(mask, per_target, 0.0).sum() / count


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
    _check_same_shape(
        predicted=predicted, sigma=sigma, target=target, needs_sampling=needs_sampling
    )
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


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"expected tensors of one shape, got {shapes}")


__all__ = ["combine_labels", "hybrid_label_mask", "unsil_loss", "unsil_statistics"]
