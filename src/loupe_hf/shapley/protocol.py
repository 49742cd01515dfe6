"""The batched game protocol: how every estimator talks to a cooperative game.

A *game* is any callable that maps a boolean coalition tensor `[*batch, G, n]` (G coalitions over
n players, True = present) to values `[*batch, G]`. The optional leading `batch` dims hold
independent games, e.g. one per image-text pair; every game in the batch is asked about the same
number G of coalitions (not necessarily the same coalitions). Games must accept broadcast
(`expand`-ed, stride-0) masks and must not write into them.

`evaluate_coalitions` is the one place that calls a game: it removes duplicate coalitions (an
estimator asks for the same coalition many times, e.g. `S | {k}` for one target is `S' | {k, j}`
for another) and splits the rest into chunks to bound memory.

Optional fast path: a game may also offer
`interaction_summands(coalitions [*b, N, T, n], targets [*b, T, n]) -> [*batch, N, T] | None`,
the summand of METHOD eq. 7 for each sampled S and target A, when it can compute it more cheaply
than from the |A| + 2 coalition values (the feature-mode token game can: every coalition of a
summand is S plus a few players, and its value follows from a few products with S). Returning
None, or not having the method, means the estimator evaluates coalitions as usual; tests check
that both routes agree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

import torch

Game: TypeAlias = Callable[[torch.Tensor], torch.Tensor]
"""`game(masks: bool [*batch, G, n]) -> values [*batch, G]`."""


class PlayerMaskGame:
    """Mixin for games that carry `players` (bool `[*batch, n]`, False for padding players, which
    are never present): the player count and batch shape the estimators ask for."""

    players: torch.Tensor

    @property
    def n_players(self) -> int:
        return self.players.shape[-1]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.players.shape[:-1])


def pack_coalitions(masks: torch.Tensor) -> torch.Tensor:
    """Integer keys of boolean coalitions: `[..., n]` → int64 `[..., ceil(n / 64)]`.

    Two coalitions are equal iff their keys are equal. Players are packed 8 to a byte and 8 bytes
    to a word, so for n < 64 the single key is the bit code `Σ_i 2^i [i ∈ S]` (little-endian hosts).
    """
    n = masks.shape[-1]
    num_bytes = -(-n // 8)
    words = max(1, -(-num_bytes // 8))
    padded = torch.nn.functional.pad(masks, (0, words * 64 - n)).to(torch.uint8)
    bit_values = 1 << torch.arange(8, device=masks.device, dtype=torch.uint8)
    packed = (padded.unflatten(-1, (words * 8, 8)) * bit_values).sum(-1, dtype=torch.uint8)
    return packed.contiguous().view(torch.int64)


def unique_coalitions(
    masks: torch.Tensor, groups: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct rows of `masks` `[R, n]`, optionally within groups.

    Args:
        masks: bool `[R, n]`.
        groups: optional int64 `[R]`; rows of different groups are never merged.

    Returns:
        `(first [U], inverse [R])`: `first` indexes one representative row of each distinct
        (group, coalition), and `masks[first][inverse] == masks`. Distinct rows are numbered in
        increasing group order, so `groups[first]` is sorted.
    """
    columns = list(pack_coalitions(masks).unbind(-1))
    if groups is not None:
        columns.insert(0, groups)
    inverse = _rank_rows(columns)
    num_unique = int(inverse.max()) + 1 if inverse.numel() else 0
    # First occurrence of each distinct row: avoids decoding the integer keys back into masks.
    first = torch.full((num_unique,), masks.shape[0], dtype=torch.long, device=masks.device)
    first.scatter_reduce_(0, inverse, torch.arange(masks.shape[0], device=masks.device), "amin")
    return first, inverse


def _rank_rows(columns: list[torch.Tensor]) -> torch.Tensor:
    """Dense lexicographic rank of the rows of a multi-column integer key (first column first).

    Column by column, the rank so far and the column's own rank are fused into one integer
    (< R^2, so no overflow) and re-ranked: 1-D sorts only, much faster than `unique(dim=0)`.
    """
    _, rank = torch.unique(columns[0], return_inverse=True)
    for column in columns[1:]:
        _, column_rank = torch.unique(column, return_inverse=True)
        fused = rank * (int(column_rank.max()) + 1) + column_rank
        _, rank = torch.unique(fused, return_inverse=True)
    return rank


@dataclass(frozen=True)
class IndexedValues:
    """Game values on distinct coalitions, with the map back to the requested ones.

    Attributes:
        values: `[*batch, U]`, each distinct coalition evaluated once (per game).
        index: int64 `[G]` (coalitions shared by the batch) or `[*batch, G]` (per game): the
            requested coalition g has value `values[..., index[..., g]]`.
        num_evaluations: coalitions each game was asked about (U, or the largest U per game).
    """

    values: torch.Tensor
    index: torch.Tensor
    num_evaluations: int

    @property
    def shared(self) -> bool:
        """Whether one index serves every game of the batch."""
        return self.index.dim() == 1

    def gather(self) -> torch.Tensor:
        """The values of the requested coalitions: `[*batch, G]`."""
        if self.shared:
            return self.values[..., self.index]
        return self.values.gather(-1, self.index)


def evaluate_coalitions(
    game: Game,
    masks: torch.Tensor,
    batch_shape: tuple[int, ...] = (),
    *,
    chunk_size: int | None = None,
    deduplicate: bool = True,
    return_num_evaluations: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, int]:
    """Values of `game` on the coalitions `masks`.

    Args:
        game: a batched game (see module docstring).
        masks: bool `[G, n]` (the same coalitions for every game in the batch) or
            `[*batch_shape, G, n]` (coalitions per game).
        batch_shape: the game's batch dims, `()` for a single game.
        chunk_size: at most this many coalitions per game (per batch element) in one call;
            `None` evaluates everything in one call.
        deduplicate: evaluate each distinct coalition once (per game).
        return_num_evaluations: also return how many coalitions each game was asked about.

    Returns:
        `[*batch_shape, G]` values (in the game's dtype), and with `return_num_evaluations` the
        number of coalitions per game actually evaluated.
    """
    indexed = evaluate_distinct_coalitions(
        game, masks, batch_shape, chunk_size=chunk_size, deduplicate=deduplicate
    )
    values = indexed.gather()
    return (values, indexed.num_evaluations) if return_num_evaluations else values


def evaluate_distinct_coalitions(
    game: Game,
    masks: torch.Tensor,
    batch_shape: tuple[int, ...] = (),
    *,
    chunk_size: int | None = None,
    deduplicate: bool = True,
) -> IndexedValues:
    """Like `evaluate_coalitions`, but returns the distinct values and the index into them, so
    that callers combining many coalitions (estimators) can gather rows instead of columns."""
    if masks.dim() == 2:
        if not deduplicate:
            values = _call_chunked(game, masks.expand(*batch_shape, *masks.shape), chunk_size)
            index = torch.arange(masks.shape[0], device=masks.device)
            return IndexedValues(values, index, masks.shape[0])
        first, inverse = unique_coalitions(masks)
        unique = masks[first]
        values = _call_chunked(game, unique.expand(*batch_shape, *unique.shape), chunk_size)
        return IndexedValues(values, inverse, unique.shape[0])
    if tuple(masks.shape[:-2]) != tuple(batch_shape):
        raise ValueError(
            f"coalition masks of shape {tuple(masks.shape)} do not match the game batch {batch_shape}"
        )
    if not deduplicate:
        values = _call_chunked(game, masks, chunk_size)
        index = torch.arange(masks.shape[-2], device=masks.device).expand(masks.shape[:-1])
        return IndexedValues(values, index, masks.shape[-2])
    return _evaluate_unique_per_game(game, masks, batch_shape, chunk_size)


def _evaluate_unique_per_game(
    game: Game, masks: torch.Tensor, batch_shape: tuple[int, ...], chunk_size: int | None
) -> IndexedValues:
    """Deduplicates within each game of the batch and pads to a common count."""
    g, n = masks.shape[-2:]
    flat = masks.reshape(-1, g, n)
    num_games = flat.shape[0]
    owner_of_row = torch.arange(num_games, device=masks.device).repeat_interleave(g)
    first, inverse = unique_coalitions(flat.reshape(-1, n), groups=owner_of_row)
    owner = owner_of_row[first]  # sorted: distinct coalitions are numbered game by game
    counts = torch.bincount(owner, minlength=num_games)
    # Distinct coalitions of game b go to slots 0..counts[b]-1; the padding slots stay empty
    # coalitions, which every game can evaluate.
    slot = torch.arange(owner.numel(), device=masks.device) - (
        torch.cumsum(counts, 0) - counts
    ).repeat_interleave(counts)
    padded = torch.zeros(num_games, int(counts.max()), n, dtype=torch.bool, device=masks.device)
    padded[owner, slot] = flat.reshape(-1, n)[first]
    values = _call_chunked(game, padded.reshape(*batch_shape, *padded.shape[1:]), chunk_size)
    index = slot[inverse].reshape(*batch_shape, g)
    return IndexedValues(values, index, int(counts.max()))


def _call_chunked(game: Game, masks: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    g = masks.shape[-2]
    if chunk_size is None or g <= chunk_size:
        return _checked_call(game, masks)
    parts = [
        _checked_call(game, masks[..., start : start + chunk_size, :])
        for start in range(0, g, chunk_size)
    ]
    return torch.cat(parts, dim=-1)


def _checked_call(game: Game, masks: torch.Tensor) -> torch.Tensor:
    values = game(masks)
    if tuple(values.shape) != tuple(masks.shape[:-1]):
        raise ValueError(
            f"a game given masks of shape {tuple(masks.shape)} must return values of shape "
            f"{tuple(masks.shape[:-1])}, got {tuple(values.shape)}"
        )
    return values
