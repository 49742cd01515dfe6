"""Interactions of a game's target coalitions: all targets, exactly or by sampling
(`game_interactions`), or only a chosen subset of them (`selected_interactions`, the targets UNSIL
is unsure of; each chosen (game, target) pair becomes its own one-target game, built by the caller
for the chosen rows of the batch, so only those pairs pay for coalition samples).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .coalitions import MAX_EXACT_PLAYERS
from .estimators import InteractionEstimate, exact_interactions, sampled_interactions


def game_interactions(
    game: Any,
    targets: torch.Tensor,
    num_samples: int | None,
    method: str,
    generator: torch.Generator | None,
    chunk_size: int | None,
    allocation: torch.Tensor | None = None,
    strata_players: torch.Tensor | None = None,
) -> InteractionEstimate:
    """Exact enumeration when `num_samples` is None, sampling otherwise."""
    n, batch_shape = game.n_players, game.batch_shape
    if num_samples is None:
        if n > MAX_EXACT_PLAYERS:
            raise ValueError(f"exact interactions need n <= {MAX_EXACT_PLAYERS}, the game has {n}")
        values = exact_interactions(
            game, n, targets, batch_shape=batch_shape, chunk_size=chunk_size
        )
        return InteractionEstimate(values, torch.zeros_like(values), 0, 2**n)
    # Padding players are null players: leaving them out of the samples keeps the estimate
    # unbiased and lowers its variance (when there is none, coalitions stay shared by the batch).
    players = None if bool(game.players.all()) else game.players
    return sampled_interactions(
        game,
        n,
        targets,
        num_samples,
        method=method,
        generator=generator,
        batch_shape=batch_shape,
        chunk_size=chunk_size,
        players=players,
        strata_players=strata_players,
        allocation=allocation,
    )


def selected_interactions(
    make_game: Callable[[torch.Tensor], Any],
    targets: torch.Tensor,
    selected: torch.Tensor,
    num_samples: int,
    *,
    method: str = "stratified",
    generator: torch.Generator | None = None,
    chunk_size: int | None = 4096,
) -> torch.Tensor:
    """Sampled interactions of the selected targets, NaN elsewhere.

    Args:
        make_game: builds the batched game of the given rows of the batch (`index`: long `[B']`,
            rows may repeat), e.g. `lambda index: semantic_game(regions[index], phrases[index])`.
        targets: bool `[B, T, n]`, or `[T, n]` shared by every game: the target coalitions.
        selected: bool `[B, T]`, the targets to estimate.
        num_samples, method, generator, chunk_size: see `sampled_interactions`.

    Returns:
        `[B, T]` estimates where `selected`, NaN elsewhere.
    """
    batch, num_targets = selected.shape
    out = torch.full((batch, num_targets), float("nan"), device=selected.device)
    game_index, target_index = selected.nonzero(as_tuple=True)
    if game_index.numel() == 0:
        return out
    rows = targets[target_index] if targets.dim() == 2 else targets[game_index, target_index]
    game = make_game(game_index)
    estimate = sampled_interactions(
        game,
        game.n_players,
        rows.unsqueeze(1),
        num_samples,
        method=method,
        generator=generator,
        chunk_size=chunk_size,
        # Padding positions are never players: sampling only real players cuts the variance.
        players=getattr(game, "players", None),
    )
    out[game_index, target_index] = estimate.values[:, 0].to(out.dtype)
    return out


def selected_images_interactions(
    estimate_images: Callable[[torch.Tensor], torch.Tensor],
    selected: torch.Tensor,
) -> torch.Tensor:
    """Interactions of the selected targets, estimated image by image: every image with at least
    one selected target gets all its targets estimated (`estimate_images(index) -> [B', T]`), which
    is cheaper than one game per target when a game's targets share its evaluations (the
    semantics-level game). Values outside `selected` are NaN, as in `selected_interactions`.
    """
    out = torch.full(selected.shape, float("nan"), device=selected.device)
    images = selected.any(dim=1).nonzero(as_tuple=True)[0]
    if images.numel() == 0:
        return out
    values = estimate_images(images).to(out.dtype)
    out[images] = torch.where(selected[images], values, out[images])
    return out


__all__ = ["game_interactions", "selected_images_interactions", "selected_interactions"]
