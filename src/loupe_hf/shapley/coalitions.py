"""Coalitions: exhaustive enumeration, and the samplers behind the estimator of METHOD eq. 7.

Eq. 7 writes an interaction as an expectation over S ⊆ N \\ A drawn in two steps: a size m
uniform over {0, ..., |N \\ A|}, then a uniform subset of N \\ A of that size. Every sampler here
draws exactly that distribution for each target (marginally); they differ in how the draws are
coupled, which changes the variance but never the mean:

- `"uniform"`: independent draws.
- `"antithetic"`: draws come in pairs S <-> (N \\ A) \\ S. The complement of a uniform m-subset is
  a uniform (|N \\ A| - m)-subset and |N \\ A| - m is again uniform, so both halves are exact.
- `"stratified"`: the size m is not drawn but allocated equally: every size (stratum) gets
  `num_samples // (|N \\ A| + 1)` samples and the remainder goes to a uniformly random set of
  sizes. The estimator averages stratum means with the exact weights 1 / (|N \\ A| + 1).

Stratifying by a group. The two-step draw is the same as keeping every player of N \\ A
independently with one probability t ~ U(0, 1) (the Beta integral gives P(S) = 1 / ((r + 1)
C(r, |S|)) either way). So for any group H of players, p = |S ∩ H| is uniform on
{0..|H \\ A|} (a Beta-binomial with unit parameters), t given p is Beta(p + 1, |H \\ A| - p + 1),
and q = |S \\ H| given p is Beta-binomial(|N \\ A \\ H|; p + 1, |H \\ A| - p + 1). The
`"stratified"` sampler with `strata_players=H` allocates p equally, draws q from that law and
takes uniform subsets of each part: still exactly eq. 7, with strata that separate, say,
"no patch in S" from the rest in the token game (H = all players gives plain size strata).

Randomness is shared across targets (and across the games of a batch) wherever that keeps each
target's draw exact: one priority per player and sample orders the players, and a target's subset
of size m is its first m non-members in that order — a uniform m-subset of N \\ A whatever A is.
Targets of equal size then get identical sizes, so many of their coalitions coincide and the game
evaluates them once (see `protocol.evaluate_coalitions`).

Independence from padding. With a plain generator, a target's draw depends on the number of
players of its game, padding included (the draws are laid out by it). Passing `DrawStreams`
instead (`DrawStreams.keyed`) takes each kind of draw (sizes, stratum ranking, priorities) from its
own generator and draws priorities player by player, so players appended to a game (a longer
padded caption) change neither the real players' priorities nor any other draw: a target's
coalitions depend on the streams' key and on its own players only. A batch split over processes,
each part padded to its own length, then gives every target the coalitions it gets in the whole
batch. (Plain generators keep their layout, so seeded results published so far reproduce.)

`keyed_uniforms` is the per-target counterpart: counter-based U(0, 1) draws that are a function of
a key and of each target's coordinates (e.g. a global sample index), for draws that must not be
shared across the batch, such as UNSIL's sampling gate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..choices import SAMPLING_METHODS

MAX_EXACT_PLAYERS = 20
"""Largest game enumerated exhaustively (2^20 ≈ 10^6 coalitions)."""


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
        strata: int64 `[*batch, N, T]`, the stratum of each sample: |S| (or |S ∩ H| when
            stratifying by a group H).
        num_strata: int64 `[*batch, T]`, strata per target (|P \\ A| + 1, or |H \\ A| + 1).
        method: the sampler that drew them (one of `SAMPLING_METHODS`).
    """

    coalitions: torch.Tensor
    strata: torch.Tensor
    num_strata: torch.Tensor
    method: str


def sample_coalitions(
    targets: torch.Tensor,
    num_samples: int,
    method: str = "uniform",
    generator: torch.Generator | None = None,
    players: torch.Tensor | None = None,
    strata_players: torch.Tensor | None = None,
    allocation: torch.Tensor | None = None,
) -> CoalitionSample:
    """Draws `num_samples` coalitions S ⊆ P \\ A for every target A (module docstring).

    Args:
        targets: bool `[*batch, T, n]`, one coalition A per row.
        num_samples: N ≥ 1.
        method: `"uniform"`, `"antithetic"` or `"stratified"`.
        generator: source of randomness (draws are made on its device, then moved to the targets'),
            or `DrawStreams` for draws independent of padding players (module docstring).
        players: optional bool `[*batch, n]`, the players P that may join S (default: all n).
            Leaving out null players (e.g. padding tokens) changes no interaction — Shapley
            values ignore null players — but makes the size strata finer.
        strata_players: `"stratified"` only: optional bool `[*batch, n]`, the group H whose
            count in S defines the strata (default: all players, i.e. strata by |S|).
        allocation: `"stratified"` only: optional weights per stratum (see `stratified_sizes`).

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
    streams, by_player = _draw_streams(generator)
    if method == "antithetic":
        num_base = -(-num_samples // 2)
        sizes = _uniform_sizes(num_base, num_nonmembers, streams.sizes)
        base = _first_nonmembers(
            blocked, _priorities(num_base, n, streams.priorities, targets, by_player), sizes
        )
        num_mirrored = num_samples - num_base
        mirrored = ~base[..., :num_mirrored, :, :] & ~blocked.unsqueeze(-3)
        mirrored_sizes = num_nonmembers.unsqueeze(-2) - sizes[..., :num_mirrored, :]
        coalitions = torch.cat([base, mirrored], dim=-3)
        strata = torch.cat([sizes, mirrored_sizes], dim=-2)
        return CoalitionSample(coalitions, strata, num_nonmembers + 1, method)
    if method == "uniform":
        sizes = _uniform_sizes(num_samples, num_nonmembers, streams.sizes)
        coalitions = _first_nonmembers(
            blocked, _priorities(num_samples, n, streams.priorities, targets, by_player), sizes
        )
        return CoalitionSample(coalitions, sizes, num_nonmembers + 1, method)
    if strata_players is None:
        sizes = stratified_sizes(num_samples, num_nonmembers, n, streams.ranking, allocation)
        coalitions = _first_nonmembers(
            blocked, _priorities(num_samples, n, streams.priorities, targets, by_player), sizes
        )
        return CoalitionSample(coalitions, sizes, num_nonmembers + 1, method)
    return _group_stratified(
        blocked, num_samples, strata_players.bool(), streams, by_player, allocation
    )


def _group_stratified(
    blocked: torch.Tensor,
    num_samples: int,
    group: torch.Tensor,
    streams: DrawStreams,
    by_player: bool,
    allocation: torch.Tensor | None,
) -> CoalitionSample:
    """Stratified by p = |S ∩ H| (equal allocation), q = |S \\ H| from its law given p."""
    n = blocked.shape[-1]
    outside_group = blocked | ~group.unsqueeze(-2)  # players S may not take from H
    inside_group = blocked | group.unsqueeze(-2)  # players S may not take outside H
    in_group = n - outside_group.sum(-1)  # |H \ A|
    rest = n - inside_group.sum(-1)  # |N \ A \ H|
    strata = stratified_sizes(
        num_samples, in_group, n, streams.ranking, allocation
    )  # p: [*b, N, T]
    u = uniform_draws((num_samples,), streams.sizes, blocked.device, torch.float64)
    others = _beta_binomial_quantile(u[:, None], rest.unsqueeze(-2), strata, in_group.unsqueeze(-2))
    priorities = _priorities(num_samples, n, streams.priorities, blocked, by_player)
    coalitions = _first_nonmembers(outside_group, priorities, strata) | _first_nonmembers(
        inside_group, priorities, others
    )
    return CoalitionSample(coalitions, strata, in_group + 1, "stratified")


def _beta_binomial_quantile(
    u: torch.Tensor, trials: torch.Tensor, successes: torch.Tensor, group_size: torch.Tensor
) -> torch.Tensor:
    """Smallest q with CDF(q) ≥ u for q ~ Beta-binomial(trials; p + 1, r1 - p + 1).

    That is the count drawn from `trials` players kept with probability t ~ Beta(p + 1,
    r1 - p + 1). All arguments broadcast to `[*b, N, T]`. The CDF depends on (trials, p, r1)
    only, so it is computed once per distinct triple (few) rather than per sample.
    """
    shape = torch.broadcast_shapes(u.shape, trials.shape, successes.shape, group_size.shape)
    trials, successes, group_size = (
        x.expand(shape).reshape(-1) for x in (trials, successes, group_size)
    )
    base = int(torch.stack([trials.max(), successes.max(), group_size.max()]).max()) + 1
    keys, which = torch.unique((trials * base + successes) * base + group_size, return_inverse=True)
    n_, p_, r_ = (keys // base**2)[:, None], (keys // base % base)[:, None], (keys % base)[:, None]
    n_, p_, r_ = n_.double(), p_.double(), r_.double()  # [U, 1] each
    q = torch.arange(int(trials.max()) + 1, device=u.device, dtype=torch.float64)
    log_choose = (
        torch.lgamma(n_ + 1) - torch.lgamma(q + 1) - torch.lgamma((n_ - q).clamp_min(0) + 1)
    )
    log_pmf = (
        log_choose + _log_beta(q + p_ + 1, n_ - q + r_ - p_ + 1) - _log_beta(p_ + 1, r_ - p_ + 1)
    )
    cdf = torch.where(q <= n_, log_pmf.exp(), 0.0).cumsum(-1)  # [U, top + 1]
    below = (cdf[which] < u.expand(shape).reshape(-1, 1)).sum(-1)
    return torch.minimum(below, trials).reshape(shape)


def _log_beta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)


def stratified_sizes(
    num_samples: int,
    num_nonmembers: torch.Tensor,
    num_players: int,
    generator: torch.Generator | None = None,
    allocation: torch.Tensor | None = None,
) -> torch.Tensor:
    """Allocates N samples over the strata {0, ..., r} of each target.

    Equal allocation (default): every stratum gets N // (r+1) samples and the N mod (r+1)
    leftovers go to a uniformly random set of strata (shared by targets with the same r).
    With `allocation` (weights per stratum, e.g. proportional to each stratum's spread: Neyman
    allocation) and N ≥ r + 1, every stratum first gets 2 samples (1 if N < 2 (r+1)) and the rest
    is shared in proportion to the weights; leftovers from rounding go to random strata. Any
    allocation fixed before sampling keeps the stratified estimate unbiased.

    Args:
        num_samples: N.
        num_nonmembers: int64 `[*tb, T]`, r per target.
        num_players: n (bounds r).
        allocation: optional `[>= max r + 1]` non-negative weights, indexed by stratum.

    Returns:
        int64 `[*tb, N, T]`, the stratum of each sample.
    """
    device = num_nonmembers.device
    num_strata = num_nonmembers + 1  # [*tb, T]
    max_strata = int(num_strata.max())
    exists = torch.arange(max_strata, device=device) < num_strata.unsqueeze(-1)  # [*tb, T, S]
    # A random ranking of the possible strata decides who gets the leftovers. Drawn at a fixed
    # length (n + 1 strata at most) so that a target's draw does not depend on the other targets:
    # a batch gives the same coalitions as its games one by one.
    ranking = uniform_draws((num_players + 1,), generator, device)[:max_strata]
    ranking = torch.where(exists, ranking, 2.0)
    position = ranking.argsort(-1).argsort(-1)  # rank of each stratum in the random order
    strata = num_strata.unsqueeze(-1)
    if allocation is None:
        counts = num_samples // strata + (position < num_samples % strata).long()
    else:
        counts = _weighted_counts(num_samples, strata, exists, position, allocation)
    counts = counts * exists
    boundaries = counts.cumsum(-1)  # [*tb, T, S]
    index = torch.arange(num_samples, device=device).expand(*boundaries.shape[:-1], num_samples)
    sizes = torch.searchsorted(boundaries, index.contiguous(), right=True)  # [*tb, T, N]
    return sizes.clamp_max(max_strata - 1).transpose(-1, -2)


def _weighted_counts(
    num_samples: int,
    strata: torch.Tensor,
    exists: torch.Tensor,
    position: torch.Tensor,
    allocation: torch.Tensor,
) -> torch.Tensor:
    """Samples per stratum `[*tb, T, S]` for a weighted allocation (see `stratified_sizes`)."""
    max_strata = exists.shape[-1]
    if allocation.dim() != 1 or allocation.numel() < max_strata:
        raise ValueError(
            f"allocation needs one weight per stratum (>= {max_strata}), got shape "
            f"{tuple(allocation.shape)}"
        )
    if not bool(torch.isfinite(allocation).all()) or bool((allocation < 0).any()):
        raise ValueError("allocation weights must be finite and non-negative")
    weights = allocation[:max_strata].double().to(exists.device) * exists
    total = weights.sum(-1, keepdim=True)
    weights = torch.where(total > 0, weights / total.clamp_min(1e-300), exists / strata)
    minimum = torch.where(num_samples >= 2 * strata, 2, 1)
    spare = (num_samples - minimum * strata).clamp_min(0)
    counts = minimum + (spare * weights).floor().long()
    leftover = num_samples - (counts * exists).sum(-1, keepdim=True)
    counts = counts + (position < leftover).long()
    # Fewer samples than strata: fall back to equal allocation (a random subset of strata).
    equal = num_samples // strata + (position < num_samples % strata).long()
    return torch.where(num_samples >= strata, counts, equal)


@dataclass(frozen=True)
class DrawStreams:
    """One generator per kind of draw of `sample_coalitions`, passed where a generator is taken:
    separate streams keep one kind of draw from shifting when another kind's length changes with
    the number of players, and priorities are then drawn player by player (module docstring).
    Several calls with one `DrawStreams` continue its streams, like a generator."""

    sizes: torch.Generator | None
    ranking: torch.Generator | None
    priorities: torch.Generator | None

    @classmethod
    def keyed(cls, key: int, device: torch.device | str = "cpu") -> DrawStreams:
        """Three generators on `device` seeded by `stream_key(key, kind)`."""
        return cls(
            *(
                torch.Generator(device=device).manual_seed(stream_key(key, kind))
                for kind in range(3)
            )
        )


def _draw_streams(generator: torch.Generator | DrawStreams | None) -> tuple[DrawStreams, bool]:
    """The streams of each kind of draw, and whether priorities are drawn player by player: a plain
    generator (or None) serves every kind in turn, with the original sample-by-sample layout."""
    if isinstance(generator, DrawStreams):
        return generator, True
    return DrawStreams(generator, generator, generator), False


MASK32, MASK64 = 2**32 - 1, 2**64 - 1


def stream_key(*words: int) -> int:
    """A 63-bit seed from a tuple of integers (a seed, a step, a stream id, ...): a splitmix64
    chain, so neighbouring tuples give unrelated seeds. (Python's `hash` of a string is salted per
    process, so it cannot name a stream that several processes must agree on.)"""
    state = 0
    for word in words:
        state = (state ^ (word & MASK64)) + 0x9E3779B97F4A7C15 & MASK64
        state = (state ^ (state >> 30)) * 0xBF58476D1CE4E5B9 & MASK64
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & MASK64
        state ^= state >> 31
    return state >> 1


def keyed_uniforms(key: int, rows: torch.Tensor, shape: tuple[int, ...] = ()) -> torch.Tensor:
    """Counter-based U(0, 1) draws: entry `[i, *c]` is a hash of (`key`, `rows[i]`, c), so it does
    not depend on which other rows are drawn, on their order, or on how far `shape` is padded.

    Args:
        key: the stream (e.g. `stream_key(seed, step, level)`).
        rows: int64 `[B]` row identities, e.g. global sample indices (< 2^32).
        shape: the coordinates drawn per row (e.g. `(K,)` regions or `(K, M)` pairs).

    Returns:
        float32 `[B, *shape]` on `rows.device`, multiples of 2^-24 in [0, 1).
    """
    base = _mix32(key & MASK32 ^ _mix32(key >> 32 & MASK32))
    hashed = _mix32(rows.long() & MASK32 ^ base).reshape(-1, *[1] * len(shape))
    for dim, size in enumerate(shape):
        coordinate = torch.arange(size, device=rows.device).reshape(
            size, *[1] * (len(shape) - dim - 1)
        )
        hashed = _mix32(hashed ^ coordinate)
    return (hashed >> 8).float() * 2**-24


def _mix32(x):
    """A 32-bit avalanche hash (lowbias32) of an int or an int64 tensor holding values < 2^32."""
    x = x ^ (x >> 16)
    x = _times32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _times32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _times32(x, factor: int):
    """x · factor mod 2^32 in two 16-bit halves: no intermediate reaches 2^63, so int64 tensor
    arithmetic never overflows."""
    return ((x & 0xFFFF) * factor + ((((x >> 16) * factor) & 0xFFFF) << 16)) & MASK32


def uniform_draws(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """U(0, 1) draws of `shape` on `device`. A `torch.Generator` lives on one device, so the draws
    are made where the generator is (or on `device` without one) and then moved: the same seeded
    generator gives the same coalitions whatever device the game runs on."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source, dtype=dtype).to(device)


def _uniform_sizes(
    num_samples: int, num_nonmembers: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """m uniform on {0..r} per target from one shared uniform per sample: `[*tb, N, T]`."""
    u = uniform_draws((num_samples,), generator, num_nonmembers.device, torch.float64)[:, None]
    num_strata = (num_nonmembers + 1).unsqueeze(-2)
    return (u * num_strata).floor().long().clamp_max(num_strata - 1)


def _priorities(
    num_samples: int,
    n: int,
    generator: torch.Generator | None,
    like: torch.Tensor,
    by_player: bool = False,
) -> torch.Tensor:
    """One random order of the players per sample, shared by all targets: `[N, n]`. `by_player`
    draws `[n, N]` and transposes, so that player j's priorities do not depend on how many players
    follow it (padding)."""
    if by_player:
        return uniform_draws((n, num_samples), generator, like.device).T
    return uniform_draws((num_samples, n), generator, like.device)


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
    nonmembers = ~targets.unsqueeze(-3).expand(*tb, order.shape[0], t, n)
    nonmembers = nonmembers.gather(-1, order[:, None, :].expand(*tb, -1, t, n))
    # The k-th non-member in priority order is chosen iff k <= size (int16 counts: n < 32768).
    count = nonmembers.to(torch.int16).cumsum(-1, dtype=torch.int16)
    chosen_sorted = nonmembers & (count <= sizes.to(torch.int16).unsqueeze(-1))
    return chosen_sorted.gather(-1, rank[:, None, :].expand(*tb, -1, t, n))
