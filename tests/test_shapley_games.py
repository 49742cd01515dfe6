"""The two LOUPE games (METHOD §3.3-3.4) and their interaction labels."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import loupe_hf
from loupe_hf.shapley import (
    InputTokenGame,
    MaxPooledTokenGame,
    MeanPooledTokenGame,
    all_coalitions,
    exact_interactions,
    region_phrase_interactions,
    region_phrase_targets,
    region_targets,
    sampled_interactions,
    semantic_game,
    token_game,
    token_region_interactions,
)

# --- v2: semantics-level game ------------------------------------------------------------------


def reference_v2(regions, phrases, coalition, temperature=1.0):
    """METHOD §3.4 with Python loops: coalition = (region indices, phrase indices)."""
    kept_regions, kept_phrases = coalition
    if not kept_regions or not kept_phrases:
        return 0.0
    logit = [
        [float(regions[k] @ phrases[j]) / temperature for j in range(len(phrases))]
        for k in range(len(regions))
    ]
    s1 = 0.0
    for k in kept_regions:
        weights = [math.exp(logit[k][j]) for j in kept_phrases]
        s1 += max(weights) / sum(weights)
    s2 = 0.0
    for j in kept_phrases:
        weights = [math.exp(logit[k][j]) for k in kept_regions]
        s2 += max(weights) / sum(weights)
    return (s1 / len(kept_regions) + s2 / len(kept_phrases)) / 2


def random_embeddings(batch, num_regions, num_phrases, dim=8, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    regions = torch.randn(batch, num_regions, dim, generator=generator, dtype=dtype)
    phrases = torch.randn(batch, num_phrases, dim, generator=generator, dtype=dtype)
    return regions, phrases


@pytest.mark.parametrize("table_bits", [2, 3, 12])
def test_semantic_game_matches_the_reference_loop(table_bits):
    num_regions, num_phrases = 5, 4
    regions, phrases = random_embeddings(3, num_regions, num_phrases, seed=1)
    phrase_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    game = semantic_game(regions, phrases, phrase_mask, temperature=0.7, table_bits=table_bits)
    masks = all_coalitions(num_regions + num_phrases)
    values = game(masks.expand(3, *masks.shape))
    for b in range(3):
        real_phrases = phrase_mask[b].nonzero()[:, 0].tolist()
        for code in range(0, masks.shape[0], 3):
            kept_regions = masks[code, :num_regions].nonzero()[:, 0].tolist()
            kept_phrases = [
                j for j in masks[code, num_regions:].nonzero()[:, 0].tolist() if j in real_phrases
            ]
            expected = reference_v2(regions[b], phrases[b], (kept_regions, kept_phrases), 0.7)
            assert float(values[b, code]) == pytest.approx(expected, abs=1e-12)


def feature_game(model, pixel_values, input_ids, attention_mask, out):
    """The feature-mode token game on the token features of a forward pass `out`."""
    return token_game(
        model,
        pixel_values,
        input_ids,
        attention_mask,
        image_pooling=getattr(getattr(model, "config", None), "image_pooling", "mean"),
        patch_tokens=out.patch_tokens,
        word_tokens=out.word_tokens,
    )


def test_semantic_game_empty_sides_and_padding_have_value_zero():
    regions, phrases = random_embeddings(1, 3, 2, seed=2)
    game = semantic_game(regions, phrases, torch.tensor([[True, False]]))
    coalitions = torch.tensor(
        [
            [0, 0, 0, 0, 0],  # empty
            [1, 1, 1, 0, 0],  # regions only
            [0, 0, 0, 1, 1],  # phrases only
            [1, 0, 0, 0, 1],  # one region + the padding phrase only
            [1, 0, 0, 1, 0],  # one region + one phrase: both softmaxes over one element
        ],
        dtype=torch.bool,
    )
    values = game(coalitions.unsqueeze(0))
    torch.testing.assert_close(
        values[0], torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    )


def test_semantic_game_per_image_coalitions_equal_shared_coalitions():
    regions, phrases = random_embeddings(4, 6, 3, seed=3, dtype=torch.float32)
    game = semantic_game(
        regions, phrases, torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]]).bool()
    )
    masks = torch.rand(4, 200, 9, generator=torch.Generator().manual_seed(4)) < 0.5
    per_image = game(masks)
    shared = torch.stack([game(masks[b].expand(4, -1, -1))[b] for b in range(4)])
    torch.testing.assert_close(per_image, shared)


def test_semantic_game_handles_sharp_softmaxes_exactly():
    # A temperature that makes a softmax row span > 80 nats switches the tables to float64.
    regions, phrases = random_embeddings(1, 4, 3, seed=5, dtype=torch.float32)
    regions, phrases = F.normalize(regions, dim=-1), F.normalize(phrases, dim=-1)
    game = semantic_game(regions, phrases, temperature=0.01)
    masks = all_coalitions(7)
    values = game(masks.unsqueeze(0))
    for code in range(masks.shape[0]):
        kept = (masks[code, :4].nonzero()[:, 0].tolist(), masks[code, 4:].nonzero()[:, 0].tolist())
        assert float(values[0, code]) == pytest.approx(
            reference_v2(regions[0].double(), phrases[0].double(), kept, 0.01), abs=1e-5
        )
    with pytest.raises(ValueError, match="temperature"):
        semantic_game(regions * 100, phrases, temperature=0.01)


def test_region_phrase_targets_are_all_pairs():
    targets = region_phrase_targets(3, 2)
    assert targets.shape == (6, 5)
    assert targets.sum(-1).eq(2).all()
    assert targets[1].nonzero()[:, 0].tolist() == [0, 4]  # row k * M + j = {k, K + j}
    assert targets[4].nonzero()[:, 0].tolist() == [2, 3]


def test_region_phrase_interactions_exact_and_sampled_agree():
    regions, phrases = random_embeddings(2, 4, 3, seed=6)
    phrase_mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    game = semantic_game(regions, phrases, phrase_mask)
    exact = region_phrase_interactions(game, num_samples=None)
    assert exact.values.shape == (2, 4, 3)
    generic = exact_interactions(game, 7, region_phrase_targets(4, 3), batch_shape=(2,))
    torch.testing.assert_close(exact.values.reshape(2, 12), generic)
    # a pair with a padding phrase never interacts
    torch.testing.assert_close(
        exact.values[1, :, 2], torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-12
    )
    sampled = region_phrase_interactions(
        game, num_samples=300, generator=torch.Generator().manual_seed(7)
    )
    assert ((sampled.values - exact.values).abs() <= 5 * sampled.stderr + 1e-9).all()


def test_semantic_game_exact_enumeration_refuses_large_games():
    regions, phrases = random_embeddings(1, 16, 8, seed=8)
    with pytest.raises(ValueError, match="exact"):
        region_phrase_interactions(semantic_game(regions, phrases), num_samples=None)


# --- v1: token-level game with a fake model ----------------------------------------------------


class FakeLoupeModel:
    """A tiny stand-in with the `LoupeGameModel` methods.

    "Images" are `[B, 3, 2, 2]` (4 patches of 3 channels) and the encoders mix tokens through a
    mean over the kept ones, so re-encoding (input mode) differs from masking features.
    """

    grid_size = 2

    def __init__(self, seed=0, vocab=20, width=6, projection=5):
        generator = torch.Generator().manual_seed(seed)
        self.patch_in = torch.randn(3, width, generator=generator, dtype=torch.float64)
        self.word_embeddings = torch.randn(vocab, width, generator=generator, dtype=torch.float64)
        self.mix = torch.randn(width, width, generator=generator, dtype=torch.float64) / 2
        self.visual_projection = torch.randn(
            width, projection, generator=generator, dtype=torch.float64
        )
        self.text_projection = torch.randn(
            width, projection, generator=generator, dtype=torch.float64
        )
        self.encoder_calls = 0

    def _encode(self, inputs, keep):
        keep = keep.to(inputs.dtype).unsqueeze(-1)
        inputs = inputs * keep
        context = inputs.sum(-2, keepdim=True) / keep.sum(-2, keepdim=True).clamp_min(1)
        return torch.tanh(inputs + context @ self.mix)

    def encode_image(self, pixel_values, keep=None):
        self.encoder_calls += 1
        patches = pixel_values.flatten(2).transpose(1, 2) @ self.patch_in
        if keep is None:
            keep = torch.ones(patches.shape[:-1], dtype=torch.bool)
        return self._encode(patches, keep)

    def encode_text(self, input_ids, attention_mask):
        self.encoder_calls += 1
        return self._encode(self.word_embeddings[input_ids], attention_mask.bool())

    def pool_image_tokens(self, patch_tokens, keep):
        return _masked_mean(patch_tokens, keep) @ self.visual_projection

    def pool_text_tokens(self, word_tokens, keep):
        return _masked_mean(word_tokens, keep) @ self.text_projection

    def get_image_features(self, pixel_values, patch_keep_mask=None):
        tokens = self.encode_image(pixel_values, patch_keep_mask)
        keep = (
            patch_keep_mask
            if patch_keep_mask is not None
            else torch.ones(tokens.shape[:-1], dtype=torch.bool)
        )
        return self.pool_image_tokens(tokens, keep)

    def get_text_features(self, input_ids, attention_mask):
        return self.pool_text_tokens(self.encode_text(input_ids, attention_mask), attention_mask)

    def __call__(self, pixel_values, input_ids, attention_mask):
        patch_tokens = self.encode_image(pixel_values)
        word_tokens = self.encode_text(input_ids, attention_mask)
        return SimpleNamespace(
            patch_tokens=patch_tokens,
            word_tokens=word_tokens,
            image_embeds=F.normalize(
                self.pool_image_tokens(patch_tokens, torch.ones(patch_tokens.shape[:-1])), dim=-1
            ),
            text_embeds=F.normalize(self.pool_text_tokens(word_tokens, attention_mask), dim=-1),
        )


def _masked_mean(tokens, keep):
    """`[B, N, D]`, `[B, *extra, N]` → `[B, *extra, D]`."""
    keep = keep.to(tokens.dtype)
    extra = keep.dim() - 2
    tokens = tokens.reshape(tokens.shape[0], *([1] * extra), *tokens.shape[1:])
    return (keep.unsqueeze(-2) @ tokens).squeeze(-2) / keep.sum(-1, keepdim=True).clamp_min(1e-6)


def fake_batch(seed=9):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(2, 3, 2, 2, generator=generator, dtype=torch.float64)
    input_ids = torch.randint(0, 20, (2, 4), generator=generator)
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    return pixel_values, input_ids, attention_mask


def direct_v1(model, pixel_values, input_ids, attention_mask, b, coalition, mode):
    """v1 of pair b by the definition: pool (feature) or re-encode (input) the kept tokens."""
    patches, words = coalition[:4], coalition[4:] & attention_mask[b].bool()
    if not patches.any() or not words.any():
        return 0.0
    if mode == "input":
        image = model.get_image_features(pixel_values[b : b + 1], patches[None])
        text = model.get_text_features(input_ids[b : b + 1], words[None].long())
    else:
        out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        image = model.pool_image_tokens(out.patch_tokens[b : b + 1], patches[None])
        text = model.pool_text_tokens(out.word_tokens[b : b + 1], words[None])
    return float(F.cosine_similarity(image, text, dim=-1))


@pytest.mark.parametrize("mode", ["feature", "input"])
def test_token_game_matches_masking_by_the_definition(mode):
    model = FakeLoupeModel()
    pixel_values, input_ids, attention_mask = fake_batch()
    game = token_game(model, pixel_values, input_ids, attention_mask, mode=mode)
    assert game.n_players == 8 and game.batch_shape == (2,)
    masks = torch.rand(2, 40, 8, generator=torch.Generator().manual_seed(10)) < 0.5
    masks[:, 0] = False  # empty coalition
    masks[:, 1] = torch.tensor([0, 0, 0, 0, 1, 1, 0, 0], dtype=torch.bool)  # no patch
    masks[:, 2] = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool)  # no word
    # only a padding word in pair 1
    masks[:, 3] = torch.tensor([1, 0, 1, 0, 0, 0, 0, 1], dtype=torch.bool)
    values = game(masks)
    for b in range(2):
        for g in range(40):
            expected = direct_v1(
                model, pixel_values, input_ids, attention_mask, b, masks[b, g], mode
            )
            assert float(values[b, g]) == pytest.approx(expected, abs=1e-10)
    assert values[:, :3].eq(0).all() and values[1, 3] == 0


def test_feature_mode_full_coalition_is_the_model_similarity():
    model = FakeLoupeModel()
    pixel_values, input_ids, attention_mask = fake_batch()
    out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    game = feature_game(model, pixel_values, input_ids, attention_mask, out)
    full = game(torch.ones(2, 1, 8, dtype=torch.bool))[:, 0]
    torch.testing.assert_close(full, (out.image_embeds * out.text_embeds).sum(-1))


def test_input_mode_encodes_each_distinct_side_once():
    model = FakeLoupeModel()
    pixel_values, input_ids, attention_mask = fake_batch()
    game = token_game(
        model, pixel_values, input_ids, attention_mask, mode="input", encoder_batch_size=1000
    )
    # 6 coalitions per pair sharing 2 distinct patch sets and 1 word set: 2 encoder calls in all
    masks = torch.zeros(2, 6, 8, dtype=torch.bool)
    masks[:, :3, 0] = True
    masks[:, 3:, 1] = True
    masks[:, :, 4] = True
    model.encoder_calls = 0
    game(masks)
    assert model.encoder_calls == 2


def test_token_region_interactions_agree_with_exact_enumeration():
    model = FakeLoupeModel()
    pixel_values, input_ids, attention_mask = fake_batch()
    region_masks = torch.tensor(
        [[[1, 1, 0, 0], [0, 1, 1, 1]], [[1, 0, 0, 1], [0, 0, 1, 0]]], dtype=torch.bool
    )
    for mode in ("feature", "input"):
        game = token_game(model, pixel_values, input_ids, attention_mask, mode=mode)
        exact = token_region_interactions(game, region_masks, num_samples=None)
        generic = exact_interactions(game, 8, region_targets(region_masks, 4))
        torch.testing.assert_close(exact.values, generic)
        sampled = token_region_interactions(
            game, region_masks, num_samples=200, generator=torch.Generator().manual_seed(11)
        )
        assert sampled.values.shape == (2, 2)
        assert ((sampled.values - exact.values).abs() <= 5 * sampled.stderr + 1e-9).all()


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_feature_mode_fast_summands_equal_coalition_evaluations(pooling):
    # Targets mix patches and words, include a padding word (position 7 in pair 1), and the
    # sampled coalitions include empty sides: every branch of the fast path is exercised.
    model = FakeLoupeModel()
    pixel_values, input_ids, attention_mask = fake_batch()
    game = token_game(model, pixel_values, input_ids, attention_mask, image_pooling=pooling)
    assert isinstance(game, MaxPooledTokenGame if pooling == "max" else MeanPooledTokenGame)
    shared = torch.zeros(2, 4, 8, dtype=torch.bool)
    shared[:, 0, [0, 1]] = True
    shared[:, 1, [2, 5]] = True
    shared[:, 2, [3, 4, 7]] = True
    shared[:, 3, [6]] = True
    # one target per game, of different sizes (the layout of `selected_interactions`): the fast
    # path groups games by member count
    per_game = torch.zeros(2, 1, 8, dtype=torch.bool)
    per_game[0, 0, [0, 1]] = True
    per_game[1, 0, [2, 3, 4]] = True
    for method, targets in [
        ("uniform", shared),
        ("stratified", shared),
        ("stratified", per_game),
    ]:
        runs = [
            sampled_interactions(
                game,
                8,
                targets,
                60,
                method=method,
                generator=torch.Generator().manual_seed(14),
                use_game_summands=fast,
            )
            for fast in (True, False)
        ]
        torch.testing.assert_close(runs[0].values, runs[1].values, rtol=0, atol=1e-12)
        torch.testing.assert_close(runs[0].stderr, runs[1].stderr, rtol=0, atol=1e-12)


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_games_of_selected_rows_equal_games_of_the_copied_rows(pooling):
    model = FakeLoupeModel()
    pixel_values, input_ids, attention_mask = fake_batch()
    index = torch.tensor([1, 0, 1, 1])  # rows repeat, as one game per selected target
    game = token_game(model, pixel_values, input_ids, attention_mask, image_pooling=pooling)
    selected = game.select_rows(index)
    copied = token_game(
        model, pixel_values[index], input_ids[index], attention_mask[index], image_pooling=pooling
    )
    if pooling == "max":  # the projections are shared, not copied
        assert selected.patch_projections.shape[0] == 2 and selected.image_rows.tolist() == [
            1,
            0,
            1,
            1,
        ]
        assert selected.select_rows(torch.tensor([3, 1])).image_rows.tolist() == [1, 0]
    masks = torch.rand(4, 9, 8, generator=torch.Generator().manual_seed(3)) < 0.5
    torch.testing.assert_close(selected(masks), copied(masks), rtol=0, atol=1e-12)
    targets = torch.zeros(4, 1, 8, dtype=torch.bool)
    targets[:, 0, [0, 2]] = True
    targets[1, 0, 5] = True
    estimates = [
        sampled_interactions(game, 8, targets, 40, generator=torch.Generator().manual_seed(4))
        for game in (selected, copied)
    ]
    torch.testing.assert_close(estimates[0].values, estimates[1].values, rtol=0, atol=1e-12)


def test_input_mode_has_no_fast_path():
    model = FakeLoupeModel()
    game = token_game(model, *fake_batch(), mode="input")
    assert isinstance(game, InputTokenGame) and game.mode == "input"
    assert not hasattr(game, "interaction_summands")


def test_padding_words_are_null_players():
    model = FakeLoupeModel()
    pixel_values, input_ids, attention_mask = fake_batch()
    game = token_game(model, pixel_values, input_ids, attention_mask)
    targets = torch.zeros(2, 1, 8, dtype=torch.bool)
    targets[:, 0, [0, 7]] = True  # a patch with the last word position (padding in pair 1)
    values = exact_interactions(game, 8, targets)
    assert values[1, 0] == pytest.approx(0.0, abs=1e-12)
    assert values[0, 0] != pytest.approx(0.0, abs=1e-6)


def test_unknown_token_game_mode_is_refused():
    model = FakeLoupeModel()
    with pytest.raises(ValueError, match="mode"):
        token_game(model, *fake_batch(), mode="pixels")


# --- v1 with the real model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_batch():
    torch.manual_seed(0)
    model = loupe_hf.LoupeModel(loupe_hf.LoupeConfig.from_preset("tiny")).eval()
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(2, 3, size, size)
    input_ids = torch.randint(5, 100, (2, 7))
    attention_mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    with torch.no_grad():
        out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    return model, pixel_values, input_ids, attention_mask, out


def test_real_model_feature_mode_full_coalition_is_the_model_similarity(tiny_model_batch):
    model, pixel_values, input_ids, attention_mask, out = tiny_model_batch
    game = feature_game(model, pixel_values, input_ids, attention_mask, out)
    full = game(torch.ones(2, 1, game.n_players, dtype=torch.bool))[:, 0]
    torch.testing.assert_close(
        full, (out.image_embeds * out.text_embeds).sum(-1), atol=1e-5, rtol=0
    )


def test_real_model_input_mode_re_encodes_the_kept_tokens(tiny_model_batch):
    model, pixel_values, input_ids, attention_mask, _ = tiny_model_batch
    game = token_game(model, pixel_values, input_ids, attention_mask, mode="input")
    masks = torch.rand(2, 3, game.n_players, generator=torch.Generator().manual_seed(12)) < 0.6
    values = game(masks)
    num_patches = game.num_patches
    with torch.no_grad():
        for b in range(2):
            for g in range(3):
                image = model.get_image_features(
                    pixel_values[b : b + 1], patch_keep_mask=masks[b, g, None, :num_patches]
                )
                words = masks[b, g, num_patches:] & attention_mask[b].bool()
                text = model.get_text_features(
                    input_ids[b : b + 1], attention_mask=words[None].long()
                )
                expected = F.cosine_similarity(image, text, dim=-1)
                assert float(values[b, g]) == pytest.approx(float(expected), abs=1e-5)


def test_real_model_token_region_labels_have_one_value_per_region(tiny_model_batch):
    model, pixel_values, input_ids, attention_mask, out = tiny_model_batch
    game = feature_game(model, pixel_values, input_ids, attention_mask, out)
    region_masks = model.region_masks(out.region_boxes, soft=False)
    labels = token_region_interactions(
        game, region_masks, num_samples=20, generator=torch.Generator().manual_seed(13)
    )
    assert labels.values.shape == region_masks.shape[:2]
    assert torch.isfinite(labels.values).all()


def test_max_pooling_games_match_the_models_own_pooling():
    """Both modes of v1 on a max-pooling model: a coalition's value is the cosine of the model's own
    max-pooled image embedding (kept patch features, or re-encoded kept inputs) and text embedding."""
    config = loupe_hf.LoupeConfig.from_preset("tiny", image_pooling="max")
    torch.manual_seed(0)
    model = loupe_hf.LoupeModel(config).eval()
    size = config.vision_config.image_size
    pixel_values = torch.randn(2, 3, size, size)
    input_ids = torch.randint(5, 100, (2, 6))
    attention_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    with torch.no_grad():
        out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    game = feature_game(model, pixel_values, input_ids, attention_mask, out)
    masks = torch.rand(2, 5, game.n_players, generator=torch.Generator().manual_seed(3)) < 0.5
    masks[:, 0] = True
    values = game(masks)
    torch.testing.assert_close(
        values[:, 0], (out.image_embeds * out.text_embeds).sum(-1), atol=1e-5, rtol=0
    )
    n1 = game.num_patches
    with torch.no_grad():
        image = model.pool_image_tokens(out.patch_tokens, masks[..., :n1])
        words = masks[..., n1:] & attention_mask[:, None].bool()
        text = model.pool_text_tokens(out.word_tokens, words)
    expected = F.cosine_similarity(image, text, dim=-1)
    expected = torch.where(masks[..., :n1].any(-1) & words.any(-1), expected, 0.0)
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=0)
    input_game = token_game(model, pixel_values, input_ids, attention_mask, mode="input")
    torch.testing.assert_close(input_game(masks[:, :1])[:, 0], values[:, 0], atol=1e-5, rtol=0)


def test_token_game_takes_the_image_pooling_it_is_given_and_refuses_unknown_ones():
    model = FakeLoupeModel()
    pixel_values, input_ids, attention_mask = fake_batch()
    assert isinstance(
        token_game(model, pixel_values, input_ids, attention_mask), MeanPooledTokenGame
    )
    with pytest.raises(ValueError, match=r"image_pooling must be one of .*got 'sum'"):
        token_game(model, pixel_values, input_ids, attention_mask, image_pooling="sum")
