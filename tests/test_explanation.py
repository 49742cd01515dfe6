"""`loupe_hf.explanation`: the interaction labels of one image-caption pair, checked against exact
values computed here from the definitions (METHOD §3.2-3.4), and UNSIL read back from checkpoints."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from loupe_hf import LoupeConfig, LoupeImageProcessor, LoupeModel, LoupeProcessor
from loupe_hf.boxes import hard_box_masks
from loupe_hf.explanation import (
    UnsilPredictors,
    explain_pair,
    load_unsil,
    region_phrase_alignment,
)
from loupe_hf.modeling_loupe import LoupeForZeroShotDetection
from loupe_hf.pretraining import LoupeForPreTraining

# 16 patches (a 4x4 grid) and [CLS] star circle [SEP]: 20 players, the most the engine enumerates.
SMALL_CAPTION, SMALL_SPANS = "star circle", [(0, 4), (5, 11)]
CAPTION = "a small red star to the left of a large blue circle"
SPANS = [(0, 16), (32, 51)]


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model(tokenizer) -> LoupeModel:
    """A LOUPE model whose token game is small enough to enumerate: 32 px images on a 4x4 grid,
    3x3 and whole-image boxes, 4 regions; mean pooling (its game has a closed form, so 2^20
    coalitions take a second)."""
    config = LoupeConfig.from_preset(
        "tiny",
        text_config={"vocab_size": len(tokenizer)},
        vision_config={"image_size": 32},
        region_anchor_sizes=[0.55, 1.0],
        num_regions=4,
        image_pooling="mean",
    )
    torch.manual_seed(0)
    return LoupeModel(config).eval()


@pytest.fixture(scope="module")
def small_inputs(tokenizer):
    processor = LoupeProcessor(
        image_processor=LoupeImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    image = (torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(1)) * 255).byte()
    inputs = processor(images=[image.numpy()], text=[SMALL_CAPTION], phrase_spans=[SMALL_SPANS])
    assert inputs["input_ids"].shape[1] == 4  # 16 + 4 = 20 players
    return inputs


@pytest.fixture(scope="module")
def small_exact(small_model, small_inputs):
    return explain(small_model, small_inputs, exact=True)


@pytest.fixture(scope="module")
def small_table(small_model, small_inputs) -> torch.Tensor:
    return token_game_table(small_model, small_inputs)


@pytest.fixture(scope="module")
def tiny_inputs(processor):
    image = (torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(2)) * 255).byte()
    return processor(images=[image.numpy()], text=[CAPTION], phrase_spans=[SPANS])


@pytest.fixture(scope="module")
def two_level_config(tiny_config) -> LoupeConfig:
    config = copy.deepcopy(tiny_config)
    config.unsil_levels = ["token", "semantic"]
    return config


@pytest.fixture(scope="module")
def pretraining_checkpoint(tmp_path_factory, two_level_config):
    """A pre-training checkpoint with UNSIL at both levels and non-trivial running scales."""
    torch.manual_seed(0)
    model = LoupeForPreTraining(two_level_config).eval()
    model.token_interaction_scale.fill_(0.25)
    model.semantic_interaction_scale.fill_(4.0)
    model.training_steps.fill_(7)
    path = tmp_path_factory.mktemp("pretraining-checkpoint")
    model.save_pretrained(path)
    return path


def explain(model, inputs, **kwargs):
    return explain_pair(
        model,
        inputs["pixel_values"],
        inputs["input_ids"],
        inputs["attention_mask"],
        inputs["phrase_masks"],
        **kwargs,
    )


# --- exact values from the definitions ------------------------------------------------------------


@torch.no_grad()
def token_game_table(model, inputs) -> torch.Tensor:
    """v1 on every coalition of the 20 players (index = bit code), from METHOD §3.3 directly: the
    cosine of the model's pooled embeddings of the kept patches and kept words, 0 if a side is empty."""
    patch_tokens = model.encode_image(inputs["pixel_values"])
    word_tokens = model.encode_text(inputs["input_ids"], inputs["attention_mask"])
    num_patches, n = patch_tokens.shape[1], patch_tokens.shape[1] + word_tokens.shape[1]
    values = []
    for start in range(0, 2**n, 2**16):
        codes = torch.arange(start, start + 2**16)
        keep = ((codes[:, None] >> torch.arange(n)) & 1).bool()
        image = model.pool_image_tokens(patch_tokens, keep[None, :, :num_patches].float())
        text = model.pool_text_tokens(word_tokens, keep[None, :, num_patches:].float())
        cosine = F.cosine_similarity(image[0], text[0], dim=-1)
        empty = ~keep[:, :num_patches].any(-1) | ~keep[:, num_patches:].any(-1)
        values.append(cosine.masked_fill(empty, 0.0).double())
    return torch.cat(values)


def eq7_interaction(table: torch.Tensor, n: int, members: list[int]) -> float:
    """I([A]) by eq. 7, summing over every S ⊆ N \\ A with P(S) = 1 / ((r + 1) C(r, |S|))."""
    others = [player for player in range(n) if player not in members]
    r = len(others)
    subsets = torch.arange(2**r)
    bits = (subsets[:, None] >> torch.arange(r)) & 1
    codes = (bits * torch.tensor([1 << player for player in others])).sum(-1)
    sizes = bits.sum(-1)
    target = sum(1 << member for member in members)
    terms = table[codes | target] + (len(members) - 1) * table[codes]
    for member in members:
        terms = terms - table[codes | (1 << member)]
    weights = torch.tensor([1 / ((r + 1) * math.comb(r, int(size))) for size in sizes])
    return float((weights.double() * terms).sum())


def eq4_interaction(value, players: list, members: list) -> float:
    """I([A]) by eq. 4: the merged player's Shapley value minus each member's, each in its own
    reduced game. `value(frozenset of players)`."""

    def shapley(player, game_players) -> float:
        rest = [p for p in game_players if p != player]
        n = len(game_players)
        total = 0.0
        for size in range(len(rest) + 1):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for subset in itertools.combinations(rest, size):
                total += weight * (value(expand((*subset, player))) - value(expand(subset)))
        return total

    merged = ("merged",)

    def expand(coalition) -> frozenset:
        out = set()
        for player in coalition:
            out |= set(members) if player == merged else {player}
        return frozenset(out)

    outside = [p for p in players if p not in members]
    result = shapley(merged, [*outside, merged])
    for member in members:
        result -= shapley(member, [*outside, member])
    return result


def semantic_value(logits: torch.Tensor, coalition: frozenset) -> float:
    """v2 of METHOD §3.4 on a coalition of ("r", k) and ("p", j) players."""
    regions = sorted(k for side, k in coalition if side == "r")
    phrases = sorted(j for side, j in coalition if side == "p")
    if not regions or not phrases:
        return 0.0
    a = logits[regions][:, phrases].double()
    s1 = a.softmax(dim=1).amax(dim=1).mean()  # each region: softmax over the coalition's phrases
    s2 = a.softmax(dim=0).amax(dim=0).mean()  # each phrase: softmax over the coalition's regions
    return float((s1 + s2) / 2)


def grid_players(mask: torch.Tensor) -> list[int]:
    return mask.nonzero()[:, 0].tolist()


# --- token level ----------------------------------------------------------------------------------


def test_token_interactions_are_the_exact_eq7_values(small_model, small_exact, small_table):
    grid = small_model.grid_size
    assert small_exact.token_samples is None  # enumerated, not sampled
    masks = hard_box_masks(small_exact.boxes, grid)
    assert torch.equal(small_exact.region_masks, masks)
    assert any(len(grid_players(mask)) > 1 for mask in masks)  # not only trivial regions
    for mask, value in zip(masks, small_exact.token_interactions.tolist(), strict=True):
        assert value == pytest.approx(
            eq7_interaction(small_table, 20, grid_players(mask)), abs=1e-5
        )


def test_patch_map_holds_the_exact_interaction_of_each_patchs_best_box(
    small_model, small_inputs, small_exact, small_table
):
    grid = small_model.grid_size
    assert small_exact.patch_map.shape == (grid, grid)
    masks = hard_box_masks(small_exact.patch_map_boxes, grid)
    # Cell p's box is p's most confident candidate (the candidates are patch-major).
    with torch.no_grad():
        patch_tokens = small_model.encode_image(small_inputs["pixel_values"])
        proposals = small_model.propose_regions(patch_tokens)
    anchors = len(small_model.config.region_anchor_sizes)
    logits = proposals.candidate_logits[0].reshape(grid * grid, anchors)
    candidates = proposals.candidate_boxes[0].reshape(grid * grid, anchors, 4)
    for patch in range(grid * grid):
        assert torch.equal(
            small_exact.patch_map_boxes[patch], candidates[patch, logits[patch].argmax()]
        )
        assert masks[patch, patch]  # a box always holds the patch it is centred on
    expected = [eq7_interaction(small_table, 20, grid_players(mask)) for mask in masks]
    assert torch.allclose(
        small_exact.patch_map.flatten().double(),
        torch.tensor(expected, dtype=torch.float64),
        atol=1e-5,
    )
    assert small_exact.patch_map.abs().max() > 1e-3


def test_sampled_interactions_agree_with_the_exact_ones_within_their_error(
    small_model, small_inputs, small_exact
):
    sampled = explain(small_model, small_inputs, token_samples=256, semantic_samples=256)
    assert sampled.token_samples == 256 and sampled.semantic_samples == 256
    for name in ("token_interactions", "patch_map", "semantic_interactions"):
        error = name.replace("interactions", "stderr") if "map" not in name else "patch_map_stderr"
        gap = (getattr(sampled, name) - getattr(small_exact, name)).abs()
        assert bool((gap <= 4 * getattr(sampled, error) + 1e-4).all()), name


def test_a_region_and_its_patch_map_cell_show_the_same_estimate(tiny_model, tiny_inputs):
    result = explain(tiny_model, tiny_inputs, num_regions=3)
    grid = tiny_model.grid_size
    top = result.boxes[0]  # the most confident box is also its centre patch's best box
    cell = (top[:2] * grid).floor().long()
    assert result.patch_map[cell[1], cell[0]] == result.token_interactions[0]


# --- semantics level ------------------------------------------------------------------------------


def test_semantic_matrix_is_the_exact_eq4_interaction_of_each_region_phrase_pair(
    small_model, small_inputs, small_exact
):
    with torch.no_grad():
        patch_tokens = small_model.encode_image(small_inputs["pixel_values"])
        proposals = small_model.propose_regions(patch_tokens)
        boxes = proposals.boxes[:, proposals.scores[0].argsort(descending=True)]
        regions = F.normalize(small_model.pool_regions(patch_tokens, boxes), dim=-1)[0]
        words = small_model.encode_text(small_inputs["input_ids"], small_inputs["attention_mask"])
        phrases = small_model.pool_phrases(words, small_inputs["phrase_masks"])
        logits = small_model.logit_scale.exp() * regions @ F.normalize(phrases, dim=-1)[0].T
    assert torch.equal(small_exact.boxes, boxes[0])
    num_regions, num_phrases = logits.shape
    players = [("r", k) for k in range(num_regions)] + [("p", j) for j in range(num_phrases)]

    def value(coalition):
        return semantic_value(logits, coalition)

    assert small_exact.semantic_interactions.shape == (num_regions, num_phrases) == (4, 2)
    for k, j in itertools.product(range(num_regions), range(num_phrases)):
        expected = eq4_interaction(value, players, [("r", k), ("p", j)])
        assert float(small_exact.semantic_interactions[k, j]) == pytest.approx(expected, abs=1e-5)
    assert small_exact.semantic_interactions.abs().max() > 1e-4


def test_alignment_is_a_softmax_over_the_real_phrases(tiny_model, tiny_inputs):
    result = explain(tiny_model, tiny_inputs, num_regions=5)
    assert result.alignment.shape == result.semantic_interactions.shape == (5, 2)
    assert torch.allclose(result.alignment.sum(-1), torch.ones(5), atol=1e-5)
    # A phrase the tokenizer cut away is padding: no alignment and no interaction.
    masks = tiny_inputs["phrase_masks"]
    padded = torch.cat([masks, masks.new_zeros(1, 1, masks.shape[-1])], dim=1)
    inputs = {**tiny_inputs, "phrase_masks": padded}
    with_padding = explain(tiny_model, inputs, num_regions=5)
    assert torch.isnan(with_padding.alignment[:, 2]).all()
    assert torch.equal(with_padding.alignment[:, :2], result.alignment)
    assert (with_padding.semantic_interactions[:, 2] == 0).all()
    real = region_phrase_alignment(
        tiny_model, torch.randn(1, 3, 8), torch.randn(1, 2, 8), torch.tensor([[True, False]])
    )
    assert torch.allclose(real[0, :, 0], torch.ones(3)) and torch.isnan(real[0, :, 1]).all()


# --- reproducibility and shapes -------------------------------------------------------------------


def test_the_same_seed_gives_the_same_explanation_and_another_seed_other_draws(
    tiny_model, tiny_inputs
):
    first = explain(tiny_model, tiny_inputs, num_regions=4, seed=3)
    again = explain(tiny_model, tiny_inputs, num_regions=4, seed=3)
    other = explain(tiny_model, tiny_inputs, num_regions=4, seed=4)
    for name in ("token_interactions", "patch_map", "semantic_interactions"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
        assert not torch.equal(getattr(first, name), getattr(other, name)), name
    assert torch.equal(first.boxes, other.boxes)  # only the draws change, not the regions
    # The config's sample counts are the default, what pre-training labels use.
    config = tiny_model.config
    assert (first.token_samples, first.semantic_samples) == (
        config.shapley_token_num_samples,
        config.shapley_num_samples,
    )


def test_showing_fewer_regions_keeps_the_semantic_game_of_all_proposals(tiny_model, tiny_inputs):
    few = explain(tiny_model, tiny_inputs, num_regions=2)
    many = explain(tiny_model, tiny_inputs, num_regions=6)
    assert few.token_interactions.shape == (2,) and few.region_masks.shape == (2, 64)
    assert few.semantic_interactions.shape == (2, 2)
    # Every proposal is a player of v2 whatever is shown, so the shown rows do not change.
    assert torch.equal(few.semantic_interactions, many.semantic_interactions[:2])


def test_one_pair_at_a_time_and_at_least_one_phrase(tiny_model, tiny_inputs):
    doubled = {name: torch.cat([value, value]) for name, value in tiny_inputs.items()}
    with pytest.raises(ValueError, match="one image-caption pair"):
        explain(tiny_model, doubled)
    with pytest.raises(ValueError, match="no phrase"):
        explain(tiny_model, {**tiny_inputs, "phrase_masks": tiny_inputs["phrase_masks"] * 0})


# --- UNSIL ----------------------------------------------------------------------------------------


def test_a_detector_checkpoint_has_no_unsil_and_explanations_say_none(
    tmp_path, tiny_config, tiny_inputs
):
    torch.manual_seed(0)
    LoupeForZeroShotDetection(tiny_config).save_pretrained(tmp_path)
    assert load_unsil(tmp_path) is None
    detector = LoupeForZeroShotDetection.from_pretrained(tmp_path)
    result = explain(detector.loupe, tiny_inputs, num_regions=3)
    assert result.token_unsil is None and result.semantic_unsil is None


def test_unsil_is_read_back_from_a_pretraining_checkpoint_in_raw_units(
    pretraining_checkpoint, tiny_inputs
):
    unsil = load_unsil(pretraining_checkpoint)
    assert unsil is not None and unsil.levels == ["token", "semantic"]
    assert (unsil.token_scale, unsil.semantic_scale, unsil.training_steps) == (0.25, 4.0, 7)
    pretraining = LoupeForPreTraining.from_pretrained(pretraining_checkpoint).eval()
    assert UnsilPredictors.from_pretraining_model(pretraining).levels == unsil.levels
    result = explain(pretraining.loupe, tiny_inputs, num_regions=3, unsil=unsil)

    # What the checkpoint's own predictors say, fed as pre-training feeds them, times the scale.
    with torch.no_grad():
        out = pretraining.loupe(**tiny_inputs)
        order = out.region_scores[0].argsort(descending=True)
        assert torch.equal(out.region_boxes[0, order][:3], result.boxes)
        token = pretraining.token_unsil(
            patch_tokens=out.patch_tokens,
            word_tokens=out.word_tokens,
            word_mask=tiny_inputs["attention_mask"],
            region_masks=result.region_masks[None].float(),
        )
        semantic = pretraining.semantic_unsil(
            region_embeds=out.region_embeds[:, order],
            phrase_embeds=out.phrase_embeds,
            phrase_mask=tiny_inputs["phrase_masks"].any(-1),
        )
    assert result.token_unsil.interaction.shape == result.token_interactions.shape == (3,)
    assert torch.allclose(result.token_unsil.interaction, 0.25 * token.interaction[0], atol=1e-6)
    assert torch.allclose(result.token_unsil.sigma, token.sigma[0])
    assert result.semantic_unsil.interaction.shape == result.semantic_interactions.shape
    assert torch.allclose(
        result.semantic_unsil.interaction, 4.0 * semantic.interaction[0, :3], atol=1e-5
    )
    assert torch.allclose(result.semantic_unsil.sigma, semantic.sigma[0, :3], atol=1e-6)


def test_the_tiny_preset_has_token_level_unsil_only(tmp_path, tiny_config, tiny_inputs):
    torch.manual_seed(0)
    model = LoupeForPreTraining(tiny_config)
    model.save_pretrained(tmp_path)
    unsil = load_unsil(tmp_path)
    assert unsil.levels == ["token"] and unsil.token_scale == 0.0
    result = explain(model.loupe.eval(), tiny_inputs, num_regions=2, unsil=unsil)
    assert result.token_unsil.interaction.shape == (2,) and result.semantic_unsil is None


def test_unsil_weights_that_do_not_fit_the_config_are_refused(
    pretraining_checkpoint, two_level_config
):
    other = copy.deepcopy(two_level_config)
    other.unsil_hidden_dim = two_level_config.unsil_hidden_dim * 2
    with pytest.raises(ValueError, match=r"token_unsil weights .* do not fit"):
        load_unsil(pretraining_checkpoint, other)
