"""The Shapley interaction engine (METHOD §3.2): exact values, sampled estimators, instability."""

from __future__ import annotations

import math
from itertools import combinations

import pytest
import torch

from loupe_hf.shapley import (
    MAX_EXACT_PLAYERS,
    SAMPLING_METHODS,
    all_coalitions,
    evaluate_coalitions,
    exact_interactions,
    exact_shapley_values,
    instability,
    sample_coalitions,
    sampled_interactions,
    semantic_game,
)

# --- games with known answers ------------------------------------------------------------------


def codes_of(masks: torch.Tensor) -> torch.Tensor:
    return (masks.long() << torch.arange(masks.shape[-1])).sum(-1)


def table_game(table: torch.Tensor):
    """A game given by its value table: `[2^n]` (one game) or `[B, 2^n]` (a batch)."""

    def game(masks: torch.Tensor) -> torch.Tensor:
        codes = codes_of(masks)
        if table.dim() == 1:
            return table[codes]
        return table.gather(-1, codes.expand(table.shape[0], codes.shape[-1]))

    return game


def random_table(n: int, seed: int, batch: int | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (2**n,) if batch is None else (batch, 2**n)
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def unanimity_game(carrier: list[int]):
    """u_T(S) = 1 if T ⊆ S else 0."""

    def game(masks: torch.Tensor) -> torch.Tensor:
        return masks[..., carrier].all(-1).double()

    return game


def additive_game(weights: torch.Tensor):
    def game(masks: torch.Tensor) -> torch.Tensor:
        return masks.double() @ weights

    return game


def masks_of(n: int, *coalitions: list[int]) -> torch.Tensor:
    out = torch.zeros(len(coalitions), n, dtype=torch.bool)
    for row, players in enumerate(coalitions):
        out[row, players] = True
    return out


def random_targets(n: int, count: int, seed: int, max_size: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    targets = torch.zeros(count, n, dtype=torch.bool)
    for row in range(count):
        size = int(torch.randint(1, max_size + 1, (1,), generator=generator))
        targets[row, torch.randperm(n, generator=generator)[:size]] = True
    return targets


# --- exact Shapley values: the axioms ----------------------------------------------------------


def test_exact_shapley_values_are_efficient():
    n = 7
    table = random_table(n, seed=0)
    phi = exact_shapley_values(table_game(table), n)
    assert phi.sum() == pytest.approx(float(table[-1] - table[0]), abs=1e-12)


def test_exact_shapley_values_are_symmetric():
    n = 6

    # v depends on players 0 and 1 only through whether each is present, symmetrically.
    def game(masks: torch.Tensor) -> torch.Tensor:
        both = masks[..., 0].double() + masks[..., 1].double()
        return both**2 + masks[..., 2:].double() @ torch.arange(1.0, n - 1, dtype=torch.float64)

    phi = exact_shapley_values(game, n)
    assert phi[0] == pytest.approx(float(phi[1]), abs=1e-12)


def test_exact_shapley_value_of_a_dummy_player_is_its_own_contribution():
    n = 6
    base = random_table(n - 1, seed=1)

    def game(masks: torch.Tensor) -> torch.Tensor:  # player n-1 always adds 0.7
        return base[codes_of(masks[..., : n - 1])] + 0.7 * masks[..., n - 1].double()

    phi = exact_shapley_values(game, n)
    assert phi[n - 1] == pytest.approx(0.7, abs=1e-12)


def test_exact_shapley_values_are_linear():
    n = 6
    a, b = random_table(n, seed=2), random_table(n, seed=3)
    combined = exact_shapley_values(table_game(2.0 * a - 3.0 * b), n)
    separate = 2.0 * exact_shapley_values(table_game(a), n) - 3.0 * exact_shapley_values(
        table_game(b), n
    )
    torch.testing.assert_close(combined, separate, rtol=0, atol=1e-12)


def test_null_players_do_not_change_shapley_values():
    # The eq. 4 route of exact_interactions relies on this: reduced games are embedded in the
    # n-player game by turning the dropped players into null players.
    n = 6
    small = random_table(n - 2, seed=4)

    def padded(masks: torch.Tensor) -> torch.Tensor:
        return small[codes_of(masks[..., : n - 2])]

    phi_small = exact_shapley_values(table_game(small), n - 2)
    phi_padded = exact_shapley_values(padded, n)
    torch.testing.assert_close(phi_padded[: n - 2], phi_small, rtol=0, atol=1e-12)
    torch.testing.assert_close(phi_padded[n - 2 :], torch.zeros(2, dtype=torch.float64))


def test_unanimity_game_gives_each_carrier_member_one_over_its_size():
    n, carrier = 7, [1, 3, 4]
    phi = exact_shapley_values(unanimity_game(carrier), n)
    expected = torch.zeros(n, dtype=torch.float64)
    expected[carrier] = 1 / len(carrier)
    torch.testing.assert_close(phi, expected, rtol=0, atol=1e-12)


# --- exact interactions --------------------------------------------------------------------------


def unanimity_interaction(target: list[int], carrier: list[int]) -> float:
    """I([A]) in u_T: v(S|A) = [T\\A ⊆ S], v(S|{a}) = [T\\A ⊆ S][T∩A ⊆ {a}], v(S) = [T ⊆ S].
    The bracket is 0 unless |A ∩ T| ≥ 2, where it is 1; and P(D ⊆ S) = 1 / (|D| + 1) when |S| is
    uniform and S uniform given its size (a uniform rank argument), with D = T \\ A."""
    inside = len(set(target) & set(carrier))
    outside = len(set(carrier) - set(target))
    return (1.0 if inside >= 2 else 0.0) / (outside + 1)


@pytest.mark.parametrize("method", ["closed_form", "definition"])
def test_unanimity_game_interactions_match_the_derived_formula(method):
    n, carrier = 7, [0, 2, 5]
    targets_as_lists = [
        [0, 2, 5],
        [0, 2],
        [0, 2, 5, 6],
        [0, 1],
        [1, 6],
        [2, 5, 3],
        [4],
        [0, 1, 2, 3],
    ]
    targets = masks_of(n, *targets_as_lists)
    values = exact_interactions(unanimity_game(carrier), n, targets, method=method)
    expected = torch.tensor(
        [unanimity_interaction(t, carrier) for t in targets_as_lists], dtype=torch.float64
    )
    torch.testing.assert_close(values, expected, rtol=0, atol=1e-12)
    assert values[0] == pytest.approx(1.0)  # A = T: the carrier fully cooperates


@pytest.mark.parametrize("method", ["closed_form", "definition"])
def test_additive_game_has_no_interaction(method):
    n = 7
    weights = torch.linspace(-1.0, 2.0, n, dtype=torch.float64)
    targets = random_targets(n, 10, seed=5, max_size=4)
    values = exact_interactions(additive_game(weights), n, targets, method=method)
    torch.testing.assert_close(values, torch.zeros(10, dtype=torch.float64), rtol=0, atol=1e-12)


def test_interaction_of_a_single_player_is_zero():
    n = 6
    values = exact_interactions(table_game(random_table(n, seed=6)), n, masks_of(n, [2], [5]))
    torch.testing.assert_close(values, torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)


def test_definition_equals_closed_form():
    n = 8
    game = table_game(random_table(n, seed=7))
    targets = random_targets(n, 12, seed=8, max_size=5)
    by_definition = exact_interactions(game, n, targets, method="definition")
    closed_form = exact_interactions(game, n, targets, method="closed_form")
    torch.testing.assert_close(by_definition, closed_form, rtol=0, atol=1e-12)


def test_pairwise_interaction_equals_shapiq_shapley_interaction_index():
    shapiq = pytest.importorskip("shapiq", reason="shapiq is the independent SII reference")
    import numpy as np

    n = 7
    table = random_table(n, seed=9)

    def numpy_game(coalitions: np.ndarray) -> np.ndarray:
        return table.numpy()[(coalitions.astype(np.int64) << np.arange(n)).sum(-1)]

    # shapiq's "SII" at order 2: Grabisch-Roubens weights 1 / ((n-1) C(n-2, |S|)) on the
    # discrete derivative v(S|ij) - v(S|i) - v(S|j) + v(S), i.e. eq. 7 with |A| = 2. It also
    # returns orders 0 and 1 (plain Shapley values); only the pairs are compared.
    reference = shapiq.ExactComputer(numpy_game, n_players=n)("SII", order=2)
    pairs = list(combinations(range(n), 2))
    ours = exact_interactions(table_game(table), n, masks_of(n, *[list(p) for p in pairs]))
    theirs = torch.tensor([reference[pair] for pair in pairs], dtype=torch.float64)
    # shapiq's sum is ~1e-8 off a brute-force float64 sum; ours matches brute force to 1e-15.
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_exact_interactions_of_a_batch_equal_the_games_one_by_one():
    n, batch = 6, 3
    tables = random_table(n, seed=10, batch=batch)
    targets = torch.stack([random_targets(n, 5, seed=11 + b) for b in range(batch)])
    for method in ("closed_form", "definition"):
        batched = exact_interactions(table_game(tables), n, targets, method=method)
        looped = torch.stack(
            [
                exact_interactions(table_game(tables[b]), n, targets[b], method=method)
                for b in range(batch)
            ]
        )
        torch.testing.assert_close(batched, looped, rtol=0, atol=1e-12)


def test_targets_shared_by_a_batch_broadcast():
    n, batch = 6, 2
    tables = random_table(n, seed=12, batch=batch)
    targets = random_targets(n, 4, seed=13)
    shared = exact_interactions(table_game(tables), n, targets, batch_shape=(batch,))
    expanded = exact_interactions(table_game(tables), n, targets.expand(batch, -1, -1))
    torch.testing.assert_close(shared, expanded, rtol=0, atol=1e-12)


# --- samplers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", SAMPLING_METHODS)
def test_sampled_coalition_sizes_are_uniform_and_avoid_the_target(method):
    n, num_samples = 9, 6000
    targets = masks_of(n, [0, 4], [1, 2, 3, 8])
    sample = sample_coalitions(targets, num_samples, method, torch.Generator().manual_seed(0))
    assert not (sample.coalitions & targets.unsqueeze(0)).any()
    sizes = sample.coalitions.sum(-1)
    torch.testing.assert_close(sample.strata, sizes)
    for column in range(2):
        rest = n - int(targets[column].sum())
        counts = torch.bincount(sizes[:, column], minlength=rest + 1).double()
        expected = num_samples / (rest + 1)
        assert counts.shape[0] == rest + 1
        # multinomial counts: 5 standard deviations (exact equality for stratified allocation)
        assert (counts - expected).abs().max() < 5 * math.sqrt(expected)
        # given its size, S is a uniform subset: every non-member is equally often included
        nonmembers = (~targets[column]).nonzero()[:, 0]
        inclusion = sample.coalitions[:, column, nonmembers].double().mean(0)
        assert (inclusion - 0.5).abs().max() < 0.05


def test_group_stratified_samples_follow_eq_7_and_cover_the_group_counts():
    # Strata by the count of players 0-3 in S; |S| must still be uniform and S uniform given
    # its size, which the Beta-binomial draw of the rest guarantees.
    n, num_samples = 9, 8000
    group = torch.zeros(n, dtype=torch.bool)
    group[:4] = True
    targets = masks_of(n, [0, 5])
    sample = sample_coalitions(
        targets, num_samples, "stratified", torch.Generator().manual_seed(5), strata_players=group
    )
    coalitions = sample.coalitions[:, 0]
    assert not (coalitions & targets[0]).any()
    torch.testing.assert_close(sample.strata[:, 0], coalitions[:, :4].sum(-1))
    assert sample.num_strata.tolist() == [4]  # |H \ A| = 3, so p in {0..3}
    assert torch.bincount(sample.strata[:, 0]).tolist() == [2000] * 4
    sizes = torch.bincount(coalitions.sum(-1), minlength=8).double()
    expected = num_samples / 8
    assert (sizes - expected).abs().max() < 5 * math.sqrt(expected)
    inclusion = coalitions[:, ~targets[0]].double().mean(0)
    assert (inclusion - 0.5).abs().max() < 0.03


def test_stratified_allocation_is_equal_with_random_leftovers():
    num_nonmembers = torch.tensor([[4, 2]])
    sizes = stratified_sizes_for(num_samples=13, num_nonmembers=num_nonmembers)
    counts_first = torch.bincount(sizes[0, :, 0], minlength=5)
    counts_second = torch.bincount(sizes[0, :, 1], minlength=3)
    assert sorted(counts_first.tolist()) == [2, 2, 3, 3, 3]
    assert sorted(counts_second.tolist()) == [4, 4, 5]


def stratified_sizes_for(num_samples: int, num_nonmembers: torch.Tensor) -> torch.Tensor:
    from loupe_hf.shapley.coalitions import stratified_sizes

    return stratified_sizes(num_samples, num_nonmembers, 8, torch.Generator().manual_seed(1))


def test_weighted_allocation_gives_every_stratum_two_samples_then_follows_the_weights():
    from loupe_hf.shapley.coalitions import stratified_sizes

    weights = torch.tensor([0.0, 10.0, 5.0, 1.0, 0.0, 0.0])
    sizes = stratified_sizes(
        40, torch.tensor([[3, 5]]), 8, torch.Generator().manual_seed(6), allocation=weights
    )
    first = torch.bincount(sizes[0, :, 0], minlength=4).tolist()  # strata 0..3
    second = torch.bincount(sizes[0, :, 1], minlength=6).tolist()  # strata 0..5
    assert sum(first) == sum(second) == 40
    assert min(first) >= 2 and min(second) >= 2
    assert first[1] > first[2] > first[3] and first[1] >= 2 + 32 * 10 // 16
    assert second[1] > second[2] > second[3]


def test_allocations_that_are_not_weights_per_stratum_are_refused():
    game, targets = unanimity_game([0, 1]), masks_of(6, [0, 1])
    for allocation in (torch.ones(3), -torch.ones(6), torch.tensor([1.0, math.nan] * 3)):
        with pytest.raises(ValueError, match="allocation"):
            sampled_interactions(game, 6, targets, 20, allocation=allocation)


def test_antithetic_samples_come_in_complementary_pairs():
    n = 8
    targets = masks_of(n, [0, 3])
    sample = sample_coalitions(targets, 10, "antithetic", torch.Generator().manual_seed(2))
    first, second = sample.coalitions[:5, 0], sample.coalitions[5:, 0]
    torch.testing.assert_close(first ^ second, ~targets[0].expand(5, n))


# --- sampled estimators against exact enumeration ----------------------------------------------


FIRST_HALF = torch.tensor([True] * 4 + [False] * 4)
VARIANTS = [(method, None) for method in SAMPLING_METHODS] + [("stratified", FIRST_HALF)]


@pytest.mark.parametrize(("method", "strata_players"), VARIANTS)
def test_sampled_interactions_agree_with_exact_within_their_standard_error(method, strata_players):
    n = 8
    game = table_game(random_table(n, seed=14))
    targets = random_targets(n, 8, seed=15)
    exact = exact_interactions(game, n, targets)
    estimate = sampled_interactions(
        game,
        n,
        targets,
        400,
        method=method,
        generator=torch.Generator().manual_seed(16),
        strata_players=strata_players,
    )
    assert estimate.values.shape == estimate.stderr.shape == (8,)
    assert torch.isfinite(estimate.stderr).all()
    assert ((estimate.values - exact).abs() <= 5 * estimate.stderr + 1e-9).all()


@pytest.mark.parametrize(("method", "strata_players"), VARIANTS)
def test_sampled_interactions_are_unbiased(method, strata_players):
    n, repeats = 8, 300
    game = table_game(random_table(n, seed=17))
    targets = masks_of(n, [0, 1], [2, 3, 4], [1, 6])
    exact = exact_interactions(game, n, targets)
    generator = torch.Generator().manual_seed(18)
    estimates = torch.stack(
        [
            sampled_interactions(
                game,
                n,
                targets,
                12,
                method=method,
                generator=generator,
                strata_players=strata_players,
            ).values
            for _ in range(repeats)
        ]
    )
    standard_error_of_mean = estimates.std(0) / math.sqrt(repeats)
    assert ((estimates.mean(0) - exact).abs() < 4 * standard_error_of_mean).all()


def test_a_fixed_unequal_allocation_keeps_estimates_unbiased():
    n, repeats = 8, 300
    game = table_game(random_table(n, seed=33))
    targets = masks_of(n, [0, 1], [2, 3, 4], [1, 6])
    exact = exact_interactions(game, n, targets)
    allocation = torch.tensor([5.0, 0.1, 3.0, 0.0, 1.0, 2.0, 0.5, 4.0, 1.0])
    generator = torch.Generator().manual_seed(34)
    estimates = torch.stack(
        [
            sampled_interactions(
                game, n, targets, 20, generator=generator, allocation=allocation
            ).values
            for _ in range(repeats)
        ]
    )
    standard_error_of_mean = estimates.std(0) / math.sqrt(repeats)
    assert ((estimates.mean(0) - exact).abs() < 4 * standard_error_of_mean).all()


def test_neyman_allocation_from_a_previous_batch_cuts_variance_further():
    # The spread per stratum measured on another batch (here: other embeddings) steers more
    # samples to the strata with small coalitions, where the v2 summand varies most.
    generator = torch.Generator().manual_seed(35)
    regions, phrases = (
        torch.randn(2, 10, 8, generator=generator),
        torch.randn(2, 6, 8, generator=generator),
    )
    game = semantic_game(regions[:1], phrases[:1], temperature=0.3)
    previous = semantic_game(regions[1:], phrases[1:], temperature=0.3)
    targets = masks_of(16, [0, 10], [1, 11], [9, 15])
    pilot = sampled_interactions(
        previous, 16, targets, 150, batch_shape=(1,), generator=torch.Generator().manual_seed(36)
    )
    assert pilot.stratum_std.shape == (15,) and pilot.stratum_std[0] == 0  # S = {} is exact

    def spread(**kwargs) -> torch.Tensor:
        g = torch.Generator().manual_seed(37)
        runs = [
            sampled_interactions(
                game, 16, targets, 60, generator=g, batch_shape=(1,), **kwargs
            ).values
            for _ in range(80)
        ]
        return torch.stack(runs).var(0).sum()

    assert spread(allocation=pilot.stratum_std) < 0.7 * spread()


def test_stratified_sampling_cuts_variance_on_the_semantic_game():
    generator = torch.Generator().manual_seed(19)
    game = semantic_game(
        torch.randn(1, 6, 8, generator=generator), torch.randn(1, 4, 8, generator=generator)
    )
    targets = masks_of(10, [0, 6], [1, 7], [5, 9])
    repeats = 60

    def spread(method: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(20)
        runs = [
            sampled_interactions(
                game, 10, targets, 40, method=method, generator=g, batch_shape=(1,)
            ).values
            for _ in range(repeats)
        ]
        return torch.stack(runs).var(0)

    plain, stratified = spread("uniform"), spread("stratified")
    assert (stratified < plain / 4).all()


def test_antithetic_sampling_cuts_variance_when_the_summand_is_monotone_in_size():
    # v(S) = |S|^3 (plus a little non-symmetric part): the pair summand grows with |S|, so a
    # sample and its complement (sizes m and r - m) err in opposite directions.
    n = 10

    def game(masks: torch.Tensor) -> torch.Tensor:
        size = masks.double().sum(-1)
        return size**3 + 0.5 * (masks[..., 0] & masks[..., 5]).double() * size

    targets = masks_of(n, [0, 1], [2, 3])
    repeats = 80

    def spread(method: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(21)
        runs = [
            sampled_interactions(game, n, targets, 20, method=method, generator=g).values
            for _ in range(repeats)
        ]
        return torch.stack(runs).var(0)

    assert (spread("antithetic") < spread("uniform") / 2).all()


def test_sampling_only_real_players_keeps_estimates_unbiased():
    # Players 6 and 7 are null (padding); sampling without them targets the same interaction.
    n, batch = 8, 2
    small = random_table(6, seed=31, batch=batch)

    def game(masks: torch.Tensor) -> torch.Tensor:
        return small.gather(-1, codes_of(masks[..., :6]))

    players = torch.ones(batch, n, dtype=torch.bool)
    players[:, 6:] = False
    targets = masks_of(n, [0, 1], [2, 4, 5])
    exact = exact_interactions(game, n, targets, batch_shape=(batch,))
    for method in SAMPLING_METHODS:
        estimate = sampled_interactions(
            game,
            n,
            targets,
            300,
            method=method,
            batch_shape=(batch,),
            players=players,
            generator=torch.Generator().manual_seed(32),
        )
        assert ((estimate.values - exact).abs() <= 5 * estimate.stderr + 1e-9).all()
    sample = sample_coalitions(targets.expand(batch, -1, -1), 50, "stratified", players=players)
    assert not sample.coalitions[..., 6:].any()
    assert sample.coalitions.sum(-1).max() <= 4


def test_additive_game_has_no_sampled_interaction():
    n = 12
    weights = torch.randn(n, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    targets = random_targets(n, 5, seed=23, max_size=4)
    for method in SAMPLING_METHODS:
        estimate = sampled_interactions(additive_game(weights), n, targets, 30, method=method)
        torch.testing.assert_close(
            estimate.values, torch.zeros(5, dtype=torch.float64), atol=1e-12, rtol=0
        )


def test_sampled_interactions_of_a_batch_equal_the_games_one_by_one():
    n, batch = 8, 3
    tables = random_table(n, seed=24, batch=batch)
    targets = torch.stack([random_targets(n, 4, seed=25 + b) for b in range(batch)])
    for method in SAMPLING_METHODS:
        batched = sampled_interactions(
            table_game(tables),
            n,
            targets,
            50,
            method=method,
            generator=torch.Generator().manual_seed(3),
        )
        for b in range(batch):
            single = sampled_interactions(
                table_game(tables[b]),
                n,
                targets[b],
                50,
                method=method,
                generator=torch.Generator().manual_seed(3),
            )
            torch.testing.assert_close(batched.values[b], single.values, rtol=0, atol=1e-12)
            torch.testing.assert_close(batched.stderr[b], single.stderr, rtol=0, atol=1e-12)


def test_deduplication_and_chunking_do_not_change_estimates():
    n, batch = 9, 2
    tables = random_table(n, seed=26, batch=batch)
    targets = random_targets(n, 6, seed=27)

    def run(**kwargs) -> torch.Tensor:
        return sampled_interactions(
            table_game(tables),
            n,
            targets,
            64,
            generator=torch.Generator().manual_seed(4),
            batch_shape=(batch,),
            **kwargs,
        )

    reference = run(deduplicate=False)
    for kwargs in ({}, {"chunk_size": 7}, {"chunk_size": 100, "deduplicate": True}):
        estimate = run(**kwargs)
        torch.testing.assert_close(estimate.values, reference.values, rtol=0, atol=1e-12)
    assert run().num_evaluations < reference.num_evaluations


def test_per_game_deduplication_keeps_games_apart():
    n = 5
    tables = random_table(n, seed=28, batch=2)
    masks = torch.stack([masks_of(n, [0, 1], [0, 1], [2]), masks_of(n, [2], [0, 1], [3])])
    values, count = evaluate_coalitions(
        table_game(tables), masks, (2,), chunk_size=1, return_num_evaluations=True
    )
    expected = torch.stack([tables[b][codes_of(masks[b])] for b in range(2)])
    torch.testing.assert_close(values, expected)
    assert count == 3


def test_stratified_estimate_is_exact_for_a_game_that_depends_only_on_size():
    # Within a stratum every summand is equal, so the stratified estimate has no variance.
    n = 9

    def game(masks: torch.Tensor) -> torch.Tensor:
        return torch.sin(masks.double().sum(-1))

    targets = masks_of(n, [0, 1], [3, 4, 5])
    exact = exact_interactions(game, n, targets)
    estimate = sampled_interactions(game, n, targets, 2 * n, method="stratified")
    torch.testing.assert_close(estimate.values, exact, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        estimate.stderr, torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12
    )


def test_single_sample_has_an_undefined_standard_error():
    estimate = sampled_interactions(
        unanimity_game([0, 1]), 4, masks_of(4, [0, 1]), 1, method="uniform"
    )
    assert torch.isnan(estimate.stderr).all()


# --- instability -------------------------------------------------------------------------------


def test_instability_matches_its_definition():
    estimates = torch.randn(7, 3, generator=torch.Generator().manual_seed(29), dtype=torch.float64)
    expected = []
    for column in range(3):
        x = estimates[:, column]
        pairs = [(u, v) for u in range(7) for v in range(7) if u != v]
        numerator = sum(abs(float(x[u] - x[v])) for u, v in pairs) / len(pairs)
        expected.append(numerator / float(x.abs().mean()))
    torch.testing.assert_close(instability(estimates), torch.tensor(expected, dtype=torch.float64))


def test_instability_of_identical_estimates_is_zero_and_of_two_values_is_known():
    assert float(instability(torch.full((5,), 0.3))) == 0.0
    # |1 - 3| / mean(|1|, |3|) = 2 / 2
    assert float(instability(torch.tensor([1.0, 3.0]))) == pytest.approx(1.0)
    assert instability(torch.ones(4, 2, 3), dim=1).shape == (4, 3)


# --- errors --------------------------------------------------------------------------------------


def test_exact_enumeration_refuses_too_many_players():
    n = MAX_EXACT_PLAYERS + 1
    with pytest.raises(ValueError, match="exact enumeration"):
        exact_interactions(
            additive_game(torch.ones(n, dtype=torch.float64)), n, masks_of(n, [0, 1])
        )
    with pytest.raises(ValueError, match="exact enumeration"):
        exact_shapley_values(additive_game(torch.ones(n, dtype=torch.float64)), n)
    with pytest.raises(ValueError, match="exact enumeration"):
        all_coalitions(n)


def test_targets_with_the_wrong_number_of_players_are_refused():
    game = unanimity_game([0])
    with pytest.raises(ValueError, match="n=5"):
        exact_interactions(game, 5, masks_of(4, [0, 1]))
    with pytest.raises(ValueError, match="n=5"):
        sampled_interactions(game, 5, masks_of(6, [0, 1]), 10)


def test_empty_targets_are_refused():
    game = unanimity_game([0])
    with pytest.raises(ValueError, match="at least one target"):
        sampled_interactions(game, 4, torch.zeros(0, 4, dtype=torch.bool), 10)
    with pytest.raises(ValueError, match="at least one player"):
        exact_interactions(game, 4, masks_of(4, [0, 1], []))


def test_sample_count_below_one_is_refused():
    with pytest.raises(ValueError, match="num_samples"):
        sampled_interactions(unanimity_game([0]), 4, masks_of(4, [0, 1]), 0)


def test_unknown_methods_are_refused():
    game = unanimity_game([0])
    with pytest.raises(ValueError, match="sampling method"):
        sampled_interactions(game, 4, masks_of(4, [0, 1]), 10, method="sobol")
    with pytest.raises(ValueError, match="exact method"):
        exact_interactions(game, 4, masks_of(4, [0, 1]), method="guess")


def test_games_returning_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match="must return values of shape"):
        exact_interactions(lambda masks: masks.double().sum(), 4, masks_of(4, [0, 1]))


def test_targets_not_matching_the_batch_are_refused():
    tables = random_table(4, seed=30, batch=2)
    with pytest.raises(ValueError, match="do not match batch"):
        exact_interactions(
            table_game(tables), 4, masks_of(4, [0, 1]).expand(3, -1, -1), batch_shape=(2,)
        )
