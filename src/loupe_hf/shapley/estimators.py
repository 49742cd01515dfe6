"""Shapley values and coalition interactions (METHOD §3.2): exact by enumeration, or sampled.

Everything talks to the game through the batched protocol of `protocol.py`
(`game(masks [*batch, G, n]) -> [*batch, G]`), and every function takes many targets at once: a
target is a coalition A, given as a bool row of `targets [*batch, T, n]` (or `[T, n]`, shared by
the games of the batch). `exact_interactions` and `sampled_interactions` take the same arguments
and return the same shapes, so one can stand in for the other.

Definitions (n players, r = |N \\ A|; set union is written `|`, as in Python):

- Shapley value (eq. 3): φ(i) = Σ_{S ⊆ N\\{i}} |S|! (n-|S|-1)! / n! · [v(S | {i}) - v(S)].
- Interaction (eq. 4): I([A]) = φ([A]; players N\\A | {[A]}) - Σ_{a∈A} φ(a; players N\\A | {a}).
- Closed form (eq. 7): I([A]) = E_S [ v(S | A) - Σ_{a∈A} v(S | {a}) + (|A| - 1) v(S) ], with
  |S| uniform on {0..r} and S uniform given its size, i.e. P(S) = 1 / ((r + 1) C(r, |S|)).
  The two are equal term by term: the merged player's Shapley value and each member's, computed
  in games of r + 1 players, use exactly these weights.

Interactions are labels (METHOD §3.3-3.4), not differentiable quantities: all estimators run
without autograd. Results have the game's dtype; sums are accumulated in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .coalitions import CoalitionSample, all_coalitions, check_enumerable, sample_coalitions
from .protocol import Game, IndexedValues, evaluate_coalitions, evaluate_distinct_coalitions

EXACT_METHODS = ("closed_form", "definition")


@dataclass(frozen=True)
class InteractionEstimate:
    """Sampled interactions with their standard errors.

    Attributes:
        values: `[*batch, T]` estimates of I([A]) (unbiased).
        stderr: `[*batch, T]` estimated standard error of `values` (NaN when it cannot be
            estimated, e.g. from a single sample).
        num_samples: coalition samples per target.
        num_evaluations: distinct game evaluations per game of the batch (after de-duplication).
        stratum_std: stratified sampling only: `[S]` within-stratum standard deviation of the
            eq. 7 summand per stratum, pooled over targets and games. Its values make a Neyman
            allocation (`allocation=` of `sampled_interactions`) for the next batch.
    """

    values: torch.Tensor
    stderr: torch.Tensor
    num_samples: int
    num_evaluations: int
    stratum_std: torch.Tensor | None = None


# --- exact -------------------------------------------------------------------------------------


@torch.no_grad()
def all_coalition_values(
    game: Game, n: int, batch_shape: tuple[int, ...] = (), *, chunk_size: int | None = None
) -> torch.Tensor:
    """The game on every coalition: `[*batch, 2^n]`, indexed by the bit code of `all_coalitions`."""
    masks = all_coalitions(n)
    return evaluate_coalitions(game, masks, batch_shape, chunk_size=chunk_size, deduplicate=False)


@torch.no_grad()
def exact_shapley_values(
    game: Game, n: int, batch_shape: tuple[int, ...] = (), *, chunk_size: int | None = None
) -> torch.Tensor:
    """Exact Shapley values (eq. 3) of every player by enumerating all 2^n coalitions.

    Args:
        game: batched game over n players.
        n: number of players (≤ `MAX_EXACT_PLAYERS`).
        batch_shape: the game's batch dims.
        chunk_size: at most this many coalitions per game call.

    Returns:
        `[*batch, n]`.
    """
    check_enumerable(n)
    values = all_coalition_values(game, n, batch_shape, chunk_size=chunk_size)
    return shapley_values_from_table(values, n).to(values.dtype)


def shapley_values_from_table(values: torch.Tensor, n: int) -> torch.Tensor:
    """Shapley values from the full value table `[*batch, 2^n]` → float64 `[*batch, n]`.

    φ_i = Σ_U v(U) c_i(U) with c_i(U) = w(|U| - 1) if i ∈ U else -w(|U|), w(s) = 1 / (n C(n-1, s)).
    """
    members = all_coalitions(n, values.device)
    size = members.sum(-1)
    w_in = _uniform_size_weight(n - 1, (size - 1).clamp_min(0))  # weight of U = S | {i}
    w_out = _uniform_size_weight(n - 1, size.clamp_max(n - 1))  # weight of U = S ∌ i
    v = values.double()
    # Σ_U v(U) [x_i w_in(U) - (1 - x_i) w_out(U)] as two matmuls over the coalition axis.
    gain = (v * (w_in + w_out)) @ members.double()
    return gain - (v * w_out).sum(-1, keepdim=True)


@torch.no_grad()
def exact_interactions(
    game: Game,
    n: int,
    targets: torch.Tensor,
    *,
    method: str = "closed_form",
    batch_shape: tuple[int, ...] | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Exact coalition interactions I([A]) of every target by enumerating all 2^n coalitions.

    Args:
        game: batched game over n players (≤ `MAX_EXACT_PLAYERS`).
        n: number of players.
        targets: bool `[*batch, T, n]` or `[T, n]`, one non-empty coalition A per row.
        method: `"closed_form"` (eq. 7: one weight per coalition) or `"definition"` (eq. 4: the
            merged player's Shapley value minus the members' Shapley values in their own reduced
            games). They agree to rounding; the second exists to check the first.
        batch_shape: the game's batch dims; defaults to the leading dims of `targets`.
        chunk_size: at most this many coalitions per game call (and per weight block).

    Returns:
        `[*batch, T]`.
    """
    check_enumerable(n)
    if method not in EXACT_METHODS:
        raise ValueError(f"unknown exact method {method!r}; choose one of {EXACT_METHODS}")
    targets, batch_shape = check_targets(targets, n, batch_shape)
    values = all_coalition_values(game, n, batch_shape, chunk_size=chunk_size)
    if method == "closed_form":
        result = _closed_form_from_table(values, targets, chunk_size or 2**16)
    else:
        result = _definition_from_table(values, targets)
    return result.to(values.dtype)


def _closed_form_from_table(
    values: torch.Tensor, targets: torch.Tensor, block: int
) -> torch.Tensor:
    """Eq. 7 as Σ_U c_A(U) v(U), with c_A(U) = P(S = U \\ A) times +1 if A ⊆ U, -1 if |U ∩ A| = 1,
    |A| - 1 if U ∩ A = ∅ and 0 otherwise (those U are never asked for)."""
    n = targets.shape[-1]
    size_a = targets.sum(-1, keepdim=True).double()  # [*tb, T, 1]
    rest = n - size_a
    a = targets.double()
    result = values.new_zeros((), dtype=torch.float64)
    for start in range(0, 2**n, block):
        codes = torch.arange(start, min(start + block, 2**n), device=values.device)
        coalitions = ((codes[:, None] >> torch.arange(n, device=values.device)) & 1).double()
        inside = a @ coalitions.T  # [*tb, T, C]: |U ∩ A|
        outside = coalitions.sum(-1) - inside  # |U \ A| = |S|
        sign = (
            (inside == size_a).double()
            - (inside == 1).double()
            + (size_a - 1) * (inside == 0).double()
        )
        weight = _uniform_size_weight(rest, outside.clamp(max=rest))
        chunk_values = values[..., start : start + codes.numel()].double()
        result = result + torch.einsum("...tc,...c->...t", sign * weight, chunk_values)
    return result


def _definition_from_table(values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Eq. 4 literally, with every reduced game kept at n players by making the players it drops
    null players (they no longer change the coalition); Shapley values ignore null players, so the
    merged player's and each member's values are those of the reduced games of eq. 4."""
    n = targets.shape[-1]
    codes = torch.arange(2**n, device=values.device)
    bits = 1 << torch.arange(n, device=values.device)
    target_codes = (targets.long() * bits).sum(-1)  # [*tb, T]
    members = torch.sort(targets.long(), dim=-1, descending=True, stable=True).indices
    num_members = targets.sum(-1)
    # Targets may differ per game, so each (game, target) gets its own remapped value table.
    expanded_values = values.unsqueeze(-2).expand(*values.shape[:-1], targets.shape[-2], 2**n)

    def shapley_of(remapped_codes: torch.Tensor, player: torch.Tensor) -> torch.Tensor:
        table = expanded_values.gather(-1, remapped_codes.expand_as(expanded_values))
        phi = shapley_values_from_table(table, n)
        return phi.gather(-1, player.expand(*phi.shape[:-1]).unsqueeze(-1))[..., 0]

    a_code = target_codes.unsqueeze(-1)  # [*tb, T, 1]
    representative = members[..., 0]
    rep_bit = (1 << representative).unsqueeze(-1)
    # Merged game: [A] is present iff A's representative is; the other members are null players.
    merged_codes = (codes & ~a_code) | torch.where((codes & rep_bit) != 0, a_code, 0)
    result = shapley_of(merged_codes, representative)
    for slot in range(int(num_members.max())):
        member = members[..., slot]
        others = a_code & ~(1 << member).unsqueeze(-1)
        # Game of member a alone: the other members of A are always absent.
        phi = shapley_of(codes & ~others, member)
        result = result - torch.where(slot < num_members, phi, 0.0)
    return result


# --- sampled -----------------------------------------------------------------------------------


@torch.no_grad()
def sampled_interactions(
    game: Game,
    n: int,
    targets: torch.Tensor,
    num_samples: int,
    *,
    method: str = "stratified",
    generator: torch.Generator | None = None,
    batch_shape: tuple[int, ...] | None = None,
    chunk_size: int | None = None,
    deduplicate: bool = True,
    players: torch.Tensor | None = None,
    strata_players: torch.Tensor | None = None,
    allocation: torch.Tensor | None = None,
    use_game_summands: bool = True,
) -> InteractionEstimate:
    """Unbiased Monte-Carlo estimates of I([A]) from eq. 7 (eq. 10 for region-phrase pairs).

    Each sample costs |A| + 2 coalitions per target; coalitions repeated across samples and
    targets are evaluated once. See `coalitions` for the samplers.

    Args:
        game: batched game over n players.
        n: number of players.
        targets: bool `[*batch, T, n]` or `[T, n]`, one non-empty coalition A per row.
        num_samples: coalition samples S per target (≥ 1).
        method: `"uniform"` (plain eq. 7), `"antithetic"` (complementary pairs) or
            `"stratified"` (equal allocation over the sizes |S|; the default, since eq. 7's summand
            varies mostly with |S|).
        generator: source of randomness, for reproducibility.
        batch_shape: the game's batch dims; defaults to the leading dims of `targets`.
        chunk_size: at most this many coalitions per game call.
        deduplicate: evaluate repeated coalitions once. Worth it unless the game is about as
            cheap as finding the repeats (e.g. the feature-mode token game).
        players: optional bool `[*batch, n]`; only these players are sampled into S. Give it
            when some players are null by construction (padding): the estimate stays unbiased
            for the same interaction and its variance drops.
        strata_players: `"stratified"` only: optional bool `[*batch, n]`, a group H of players;
            strata are then |S ∩ H| instead of |S| (see `coalitions`), e.g. the patches of the
            token game.
        allocation: `"stratified"` only: optional weights per stratum, fixed before sampling
            (e.g. the `stratum_std` of a previous batch: Neyman allocation); default equal.
        use_game_summands: use the game's `interaction_summands` when it has one (the
            optional fast path of `protocol.py`); False forces plain coalition evaluations.

    Returns:
        An `InteractionEstimate` with `[*batch, T]` values and standard errors.
    """
    targets, batch_shape = check_targets(targets, n, batch_shape)
    if players is not None or strata_players is not None:
        targets = targets.expand(*batch_shape, *targets.shape[-2:])
    sample = sample_coalitions(
        targets, num_samples, method, generator, players, strata_players, allocation
    )
    terms, num_evaluations = interaction_terms(
        game, targets, sample.coalitions, batch_shape, chunk_size, deduplicate, use_game_summands
    )
    spread = None
    if method == "stratified":
        values, stderr, spread = _stratified_mean(terms.double(), sample)
    elif method == "antithetic":
        values, stderr = _antithetic_mean(terms.double())
    else:
        values, stderr = _plain_mean(terms.double())
    return InteractionEstimate(
        values.to(terms.dtype), stderr.to(terms.dtype), num_samples, num_evaluations, spread
    )


def interaction_terms(
    game: Game,
    targets: torch.Tensor,
    coalitions: torch.Tensor,
    batch_shape: tuple[int, ...],
    chunk_size: int | None = None,
    deduplicate: bool = True,
    use_game_summands: bool = True,
) -> tuple[torch.Tensor, int]:
    """The summand of eq. 7, v(S | A) - Σ_{a∈A} v(S | {a}) + (|A| - 1) v(S), per sample and target.

    Args:
        targets: bool `[*tb, T, n]`.
        coalitions: bool `[*tb, N, T, n]`, S disjoint from its column's target.
        use_game_summands: let a game that offers `interaction_summands` (the optional fast path
            of the protocol) compute the summands itself.

    Returns:
        `(terms [*batch, N, T], distinct game evaluations per game)`; with the fast path, the
        number of coalitions the summands stand for.
    """
    n = targets.shape[-1]
    num_members = targets.sum(-1)  # [*tb, T]
    summands = getattr(game, "interaction_summands", None) if use_game_summands else None
    if summands is not None:
        terms = summands(coalitions, targets)
        if terms is not None:  # the game computed every summand itself (protocol fast path)
            covered = coalitions.shape[-3] * int((num_members + 2).sum(-1).max())
            return terms.reshape(*batch_shape, *terms.shape[-2:]), covered
    max_members = int(num_members.max())
    member_index = torch.sort(targets.long(), dim=-1, descending=True, stable=True).indices
    member_index = member_index[..., :max_members]  # [*tb, T, max_members]
    slot_valid = torch.arange(max_members, device=targets.device) < num_members.unsqueeze(-1)
    member_onehot = torch.nn.functional.one_hot(member_index, n).bool() & slot_valid.unsqueeze(-1)
    coalition_with_member = coalitions.unsqueeze(-2) | member_onehot.unsqueeze(-4)
    masks = torch.cat(
        [
            (coalitions | targets.unsqueeze(-3)).unsqueeze(-2),  # S | A
            coalitions.unsqueeze(-2),  # S
            coalition_with_member,  # S | {a}; padding slots repeat S (free after de-duplication)
        ],
        dim=-2,
    )  # [*tb, N, T, 2 + max_members, n]
    coefficients = torch.cat(
        [
            torch.ones_like(num_members, dtype=torch.float64).unsqueeze(-1),
            (num_members - 1).double().unsqueeze(-1),
            -slot_valid.double(),
        ],
        dim=-1,
    )  # [*tb, T, 2 + max_members]
    indexed = evaluate_distinct_coalitions(
        game, masks.flatten(-4, -2), batch_shape, chunk_size=chunk_size, deduplicate=deduplicate
    )
    return _combine_slots(indexed, coefficients, masks.shape[-4:-1], batch_shape), (
        indexed.num_evaluations
    )


def _combine_slots(
    indexed: IndexedValues,
    coefficients: torch.Tensor,
    layout: tuple[int, int, int],
    batch_shape: tuple[int, ...],
) -> torch.Tensor:
    """Σ_slot coefficient x value of the slot's coalition, per (game, sample, target).

    Coalitions shared by the batch are read as whole rows of the transposed value table (one
    contiguous row per coalition, holding every game), which is much faster than gathering the
    same columns game by game.
    """
    num_samples, num_targets, num_slots = layout
    values = indexed.values
    dtype = values.dtype if values.is_floating_point() else torch.float64
    coefficients = coefficients.to(dtype)
    if indexed.shared:
        rows = values.reshape(-1, values.shape[-1]).T.to(dtype).contiguous()  # [U, games]
        index = indexed.index.view(num_samples, num_targets, num_slots)
        terms = None
        for slot in range(num_slots):
            picked = rows.index_select(0, index[..., slot].reshape(-1))
            picked = picked.view(num_samples, num_targets, -1) * coefficients[:, slot, None]
            terms = picked if terms is None else terms + picked
        return terms.permute(2, 0, 1).reshape(*batch_shape, num_samples, num_targets)
    index = indexed.index.view(*batch_shape, num_samples * num_targets, num_slots)
    terms = None
    for slot in range(num_slots):
        picked = values.gather(-1, index[..., slot]).to(dtype)
        picked = picked.view(*batch_shape, num_samples, num_targets)
        picked = picked * coefficients[..., slot].unsqueeze(-2)
        terms = picked if terms is None else terms + picked
    return terms


def _plain_mean(terms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample mean over dim -2 and its standard error std / sqrt(N)."""
    num_samples = terms.shape[-2]
    mean = terms.mean(-2)
    if num_samples < 2:
        return mean, torch.full_like(mean, math.nan)
    return mean, terms.std(-2) / math.sqrt(num_samples)


def _antithetic_mean(terms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of antithetic samples; the standard error treats each complementary pair as one draw.

    With an odd N the unpaired sample counts with weight 1/N and its variance is estimated by the
    variance of all single samples.
    """
    num_samples = terms.shape[-2]
    num_pairs = num_samples // 2
    num_base = num_samples - num_pairs
    mean = terms.mean(-2)
    if num_pairs < 2:
        return mean, torch.full_like(mean, math.nan)
    pair_sums = terms[..., :num_pairs, :] + terms[..., num_base:, :]
    variance = num_pairs * pair_sums.var(-2)
    if num_samples % 2:
        variance = variance + terms.var(-2)
    return mean, variance.sqrt() / num_samples


def _stratified_mean(
    terms: torch.Tensor, sample: CoalitionSample
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stratified estimate Σ_m mean_m / (r + 1), its standard error and the pooled stratum spread.

    `[*b, N, T]` → `[*b, T]`, `[*b, T]`, `[S]`. When every stratum has a sample the stratum means
    are averaged with the exact weights; with fewer samples than strata each sample sits in a
    uniformly random stratum, so the plain mean is unbiased. The standard error uses
    within-stratum variances when every stratum has ≥ 2 samples, and otherwise the
    plain-sampling formula (conservative for equal allocation, which never has more variance than
    plain sampling).
    """
    # Work samples-first, games-last ([N, T, games]): the strata are then shared by all games
    # along the contiguous last axis when the targets are.
    lead = terms.dim() - 2
    batch = terms.shape[:lead]
    x = terms.permute(lead, lead + 1, *range(lead)).reshape(*terms.shape[-2:], -1)
    strata = sample.strata.permute(-2, -1, *range(sample.strata.dim() - 2))
    strata = strata.reshape(*strata.shape[:2], -1)  # [N, T, 1 or games]
    num_strata = sample.num_strata.movedim(-1, 0).reshape(strata.shape[1], -1)
    mean, stderr, fewest, spread = _stratified_mean_samples_first(x, strata, num_strata)
    if bool((fewest < 2).any()):
        plain, plain_stderr = (v.movedim(-1, 0).reshape(mean.shape) for v in _plain_mean(terms))
        mean = torch.where(fewest >= 1, mean, plain)
        stderr = torch.where(fewest >= 2, stderr, plain_stderr)
    return mean.T.reshape(*batch, -1), stderr.T.reshape(*batch, -1), spread


def _stratified_mean_samples_first(
    x: torch.Tensor, strata: torch.Tensor, num_strata: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """`x [N, T, G]`, `strata [N, T, G or 1]`, `num_strata [T, G or 1]` → mean, stderr `[T, G]`,
    fewest samples in a stratum `[T, G or 1]`, pooled within-stratum std `[S]`."""
    max_strata = int(num_strata.max())
    counts = x.new_zeros(max_strata, *strata.shape[1:]).scatter_add_(
        0, strata, torch.ones_like(strata, dtype=x.dtype)
    )
    exists = torch.arange(max_strata, device=x.device)[:, None, None] < num_strata
    fewest = torch.where(exists, counts, math.inf).amin(0)
    samples_in_stratum = counts.gather(0, strata)  # [N, T, G or 1]
    weight = 1 / (num_strata.to(x.dtype) * samples_in_stratum)  # 1 / ((r + 1) n_m)
    mean = (x * weight).sum(0)
    # Two passes (deviations from each sample's own stratum mean) avoid cancellation.
    full_strata = strata.expand_as(x)
    sums = x.new_zeros(max_strata, *x.shape[1:]).scatter_add_(0, full_strata, x)
    stratum_means = sums / counts.clamp_min(1)
    squared = (x - stratum_means.gather(0, full_strata)).square()
    # Σ_m s_m^2 / (n_m (r+1)^2) = Σ_i dev_i^2 / ((n_m - 1) n_m (r+1)^2)
    variance_weight = weight.square() * samples_in_stratum / (samples_in_stratum - 1).clamp_min(1)
    stderr = (squared * variance_weight).sum(0).sqrt()
    pooled = x.new_zeros(max_strata).scatter_add_(0, full_strata.reshape(-1), squared.reshape(-1))
    freedom = ((counts - 1).clamp_min(0) * x.shape[-1] / counts.shape[-1]).sum((1, 2))
    spread = (pooled / freedom.clamp_min(1)).sqrt()
    return mean, stderr, fewest, spread


# --- helpers -----------------------------------------------------------------------------------


def check_targets(
    targets: torch.Tensor, n: int, batch_shape: tuple[int, ...] | None
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Validates target masks and resolves the game's batch shape.

    Raises:
        ValueError: if targets are not `[..., T, n]` 0/1 masks with T ≥ 1 non-empty rows, or
            their leading dims are neither empty nor `batch_shape`.
    """
    if targets.dim() < 2 or targets.shape[-1] != n:
        raise ValueError(
            f"targets must be masks of shape [..., T, n={n}], got {tuple(targets.shape)}"
        )
    if targets.dtype != torch.bool:
        if ((targets != 0) & (targets != 1)).any():
            raise ValueError("targets must be boolean (or 0/1) masks")
        targets = targets.bool()
    if targets.shape[-2] == 0:
        raise ValueError("targets is empty: give at least one target coalition")
    if not targets.any(-1).all():
        raise ValueError("every target coalition needs at least one player")
    leading = tuple(targets.shape[:-2])
    if batch_shape is None:
        batch_shape = leading
    if leading not in ((), tuple(batch_shape)):
        raise ValueError(
            f"targets of shape {tuple(targets.shape)} do not match batch {batch_shape}"
        )
    return targets, tuple(batch_shape)


def _uniform_size_weight(rest: torch.Tensor | int, size: torch.Tensor) -> torch.Tensor:
    """P(S) = 1 / ((r + 1) C(r, |S|)) for S drawn from r players with a uniform size (float64)."""
    rest = torch.as_tensor(rest, dtype=torch.float64, device=size.device)
    size = size.double()
    log_binomial = torch.lgamma(rest + 1) - torch.lgamma(size + 1) - torch.lgamma(rest - size + 1)
    return torch.exp(-log_binomial) / (rest + 1)
