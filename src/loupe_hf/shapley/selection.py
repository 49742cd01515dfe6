"""Estimating interactions for a chosen subset of targets only (the targets UNSIL is unsure of).

Each chosen (game, target) pair becomes its own one-target game, built by the caller for the
chosen rows of the batch, so only those pairs pay for coalition samples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .estimators import sampled_interactions


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


__all__ = ["selected_images_interactions", "selected_interactions"]
