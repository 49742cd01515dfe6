"""Instability of a stochastic estimator (Zhang et al. 2020; METHOD §5)."""

from __future__ import annotations

import torch


def instability(estimates: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """E_{u≠v} |I_u - I_v| / E_w |I_w| over R repeated estimates of the same quantity.

    The numerator is the mean absolute difference over ordered pairs of distinct repeats,
    computed from the sorted repeats in O(R log R): Σ_{u<v} |x_u - x_v| = Σ_k (2k - R + 1) x_(k).

    Args:
        estimates: repeated estimates, repeats along `dim` (R ≥ 2), e.g. `[R, B, T]`.
        dim: the repeat dimension.

    Returns:
        The instability of every other entry, e.g. `[B, T]`; infinite or NaN where every repeat is 0.
        The paper reports its mean over targets and images.
    """
    repeats = estimates.shape[dim]
    if repeats < 2:
        raise ValueError(f"instability needs at least 2 repeated estimates, got {repeats}")
    ordered = estimates.double().sort(dim=dim).values.movedim(dim, -1)
    rank_weight = (
        2 * torch.arange(repeats, device=estimates.device, dtype=torch.float64) - repeats + 1
    )
    mean_abs_difference = 2 * (ordered * rank_weight).sum(-1) / (repeats * (repeats - 1))
    return (mean_abs_difference / ordered.abs().mean(-1)).to(estimates.dtype)
