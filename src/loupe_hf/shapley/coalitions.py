"""Coalitions: exhaustive enumeration, and the samplers behind the estimator of METHOD eq. 7.

Eq. 7 writes an interaction as an expectation over S ⊆ N \\ A drawn in two steps: a size m
uniform over {0, ..., |N \\ A|}, then a uniform subset of N \\ A of that size. Every sampler here
draws exactly that distribution for each target (marginally); they differ in how the draws are
coupled, which changes the variance but never the mean:

- `"uniform"`: independent draws.
- `"antithetic"`: draws come in pairs S ↔ (N \\ A) \\ S. The complement of a uniform m-subset is a
  uniform (|N \\ A| - m)-subset and |N \\ A| - m is again uniform, so both halves are exact draws.
- `"stratified"`: the size m is not drawn but allocated equally: every size (stratum) gets
  `num_samples // (|N \\ A| + 1)` samples and the remainder goes to a uniformly random set of sizes.
  The estimator then averages stratum means with the exact weights 1 / (|N \\ A| + 1).

Randomness is shared across targets (and across the games of a batch) wherever that keeps each
target's draw exact: one priority per player and sample orders the players, and a target's subset
of size m is its first m non-members in that order — a uniform m-subset of N \\ A whatever A is.
Targets of equal size then get identical sizes, so many of their coalitions coincide and the game
evaluates them once (see `protocol.evaluate_coalitions`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_EXACT_PLAYERS = 20
"""Largest game enumerated exhaustively (2^20 ≈ 10^6 coalitions)."""

SAMPLING_METHODS = ("uniform", "antithetic", "stratified")


def all_coalitions(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Every coalition of n players: bool `[2^n, n]`, row c holds player i iff bit i of c is set.

    Raises:
        ValueError: if n exceeds `MAX_EXACT_PLAYERS`.
    """
    check_enumerable(n)
    codes = torch.arange(2**n, device=device)
    return ((codes[:, None] >> torch.arange(n, device=device)) & 1).bool()


def check_enumerable(n: int) -> None:
    """Raises a ValueError unless a game of n players can be enumerated exhaustively."""
    if not 0 < n <= MAX_EXACT_PLAYERS:
        raise ValueError(
            f"exact enumeration needs 1 <= n <= {MAX_EXACT_PLAYERS} players (2^n coalitions), "
            f"got n={n}; use sampled_interactions for larger games"
        )


@dataclass(frozen=True)
class CoalitionSample:
    """Coalitions S ⊆ P \\ A drawn for eq. 7, one per (sample, target).

    Attributes:
        coalitions: bool `[*batch, N, T, n]`, disjoint from the target of the same column.
        sizes: int64 `[*batch, N, T]`, |S| (the stratum of the sample).
        num_nonmembers: int64 `[*batch, T]`, r = |P \\ A|, so sizes range over {0..r}.
        method: the sampler that drew them (one of `SAMPLING_METHODS`).
    """

    coalitions: torch.Tensor
    sizes: torch.Tensor
    num_nonmembers: torch.Tensor
    method: str


def sample_coalitions(
    targets: torch.Tensor,
    num_samples: int,
    method: str = "uniform",
    generator: torch.Generator | None = None,
    players: torch.Tensor | None = None,
) -> CoalitionSample:
    """Draws `num_samples` coalitions S ⊆ P \\ A for every target A (module docstring).

    Args:
        targets: bool `[*batch, T, n]`, one coalition A per row.
        num_samples: N ≥ 1.
        method: `"uniform"`, `"antithetic"` or `"stratified"`.
        generator: source of randomness (CPU generator; draws are moved to the targets' device).
        players: optional bool `[*batch, n]`, the players P that may join S (default: all n).
            Leaving out null players (e.g. padding tokens) changes no interaction — Shapley
            values ignore null players — but makes the size strata finer.

    Returns:
        A `CoalitionSample`. For `"antithetic"`, sample `i` and sample `ceil(N/2) + i` are
        complements of each other (for i < N // 2); an odd N leaves sample `ceil(N/2) - 1` unpaired.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if method not in SAMPLING_METHODS:
        raise ValueError(f"unknown sampling method {method!r}; choose one of {SAMPLING_METHODS}")
    n = targets.shape[-1]
    # Non-players are treated like members of the target: never drawn.
    blocked = targets if players is None else targets | ~players.bool().unsqueeze(-2)
    num_nonmembers = n - blocked.sum(-1)  # [*batch, T]
    if method == "antithetic":
        num_base = -(-num_samples // 2)
        sizes = _uniform_sizes(num_base, num_nonmembers, generator)
        base = _first_nonmembers(blocked, _priorities(num_base, n, generator, targets), sizes)
        num_mirrored = num_samples - num_base
        mirrored = ~base[..., :num_mirrored, :, :] & ~blocked.unsqueeze(-3)
        mirrored_sizes = num_nonmembers.unsqueeze(-2) - sizes[..., :num_mirrored, :]
        coalitions = torch.cat([base, mirrored], dim=-3)
        return CoalitionSample(
            coalitions, torch.cat([sizes, mirrored_sizes], dim=-2), num_nonmembers, method
        )
    if method == "uniform":
        sizes = _uniform_sizes(num_samples, num_nonmembers, generator)
    else:
        sizes = stratified_sizes(num_samples, num_nonmembers, n, generator)
    coalitions = _first_nonmembers(blocked, _priorities(num_samples, n, generator, targets), sizes)
    return CoalitionSample(coalitions, sizes, num_nonmembers, method)


def stratified_sizes(
    num_samples: int,
    num_nonmembers: torch.Tensor,
    num_players: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Equal allocation of N samples over the sizes {0, ..., r} of each target (r = |N \\ A|).

    Sample i < (N // (r+1)) (r+1) gets size i mod (r+1); the N mod (r+1) remaining samples get
    distinct sizes forming a uniformly random subset (shared by targets with the same r).

    Args:
        num_samples: N.
        num_nonmembers: int64 `[*tb, T]`, r per target.
        num_players: n (bounds r).

    Returns:
        int64 `[*tb, N, T]`.
    """
    device = num_nonmembers.device
    num_strata = (num_nonmembers + 1).unsqueeze(-2)  # [*tb, 1, T]
    index = torch.arange(num_samples, device=device)[:, None]  # [N, 1]
    full_rounds = num_samples // num_strata
    # A random ranking of all possible sizes; a target keeps the sizes that exist for it, and its
    # leftover samples take the best-ranked ones.
    # Drawn at a fixed length (n + 1 sizes at most) so that a target's draw does not depend on
    # the other targets: a batch gives the same coalitions as its games one by one.
    max_strata = int(num_strata.max())
    ranking = torch.rand(num_players + 1, generator=generator)
    ranking = ranking[:max_strata].to(device)
    ranking = torch.where(
        torch.arange(max_strata, device=device) < num_strata.unsqueeze(-1), ranking, 2.0
    )  # [*tb, 1, T, max_strata]
    leftover_sizes = ranking.argsort(-1)  # best-ranked existing sizes first
    leftover_index = (index - full_rounds * num_strata).clamp(0, max_strata - 1)
    leftover = leftover_sizes.expand(*leftover_index.shape, max_strata).gather(
        -1, leftover_index.unsqueeze(-1)
    )[..., 0]
    return torch.where(index < full_rounds * num_strata, index % num_strata, leftover)


def _uniform_sizes(
    num_samples: int, num_nonmembers: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """m uniform on {0..r} per target from one shared uniform per sample: `[*tb, N, T]`."""
    u = torch.rand(num_samples, generator=generator, dtype=torch.float64)
    u = u.to(num_nonmembers.device)[:, None]
    num_strata = (num_nonmembers + 1).unsqueeze(-2)
    return (u * num_strata).floor().long().clamp_max(num_strata - 1)


def _priorities(
    num_samples: int, n: int, generator: torch.Generator | None, like: torch.Tensor
) -> torch.Tensor:
    """One random order of the players per sample, shared by all targets: `[N, n]`."""
    return torch.rand(num_samples, n, generator=generator).to(like.device)


def _first_nonmembers(
    targets: torch.Tensor, priorities: torch.Tensor, sizes: torch.Tensor
) -> torch.Tensor:
    """For each (sample, target), the `size` non-members of the target with lowest priority.

    Args:
        targets: bool `[*tb, T, n]`, the players each column must avoid.
        priorities: `[N, n]`.
        sizes: int64 `[*tb, N, T]`.

    Returns:
        bool `[*tb, N, T, n]`.
    """
    order = priorities.argsort(-1)  # [N, n]: players by increasing priority
    rank = order.argsort(-1)  # [N, n]: position of each player in that order
    tb = targets.shape[:-2]
    t, n = targets.shape[-2:]
    members_sorted = targets.unsqueeze(-3).expand(*tb, order.shape[0], t, n)
    members_sorted = members_sorted.gather(-1, order[:, None, :].expand(*tb, -1, t, n))
    # Non-members that come before position k in the order = k - members up to k (inclusive is
    # fine: the comparison is only used at non-member positions).
    position = torch.arange(n, device=targets.device)
    nonmember_rank = position - members_sorted.long().cumsum(-1)
    chosen_sorted = ~members_sorted & (nonmember_rank < sizes.unsqueeze(-1))
    return chosen_sorted.gather(-1, rank[:, None, :].expand(*tb, -1, t, n))
