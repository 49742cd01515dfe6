"""UNSIL (METHOD §3.5): the three predictors at both levels, the hybrid labelling rule, the loss."""

from __future__ import annotations

import math

import pytest
import torch

from loupe_hf.losses import unsil_loss
from loupe_hf.pretraining.labels import combine_labels, hybrid_label_mask, unsil_statistics
from loupe_hf.pretraining.unsil import (
    UNSIL_ARCHITECTURES,
    UNSIL_LEVELS,
    AttentionPooling,
    DotProductAttentionPooling,
    UnsilConv1d,
    UnsilMlpAttention,
    UnsilTransformer,
    build_unsil,
)

IMAGE_DIM, TEXT_DIM, HIDDEN = 12, 10, 16
BATCH, NUM_PATCHES, NUM_WORDS, NUM_REGIONS, NUM_PHRASES = 2, 9, 5, 3, 4
VARIANTS = [(arch, level) for arch in UNSIL_ARCHITECTURES for level in UNSIL_LEVELS]


@pytest.fixture(autouse=True)
def one_thread():
    """Every tensor here is tiny: on a shared CPU, intra-op thread hand-offs cost more than they
    save (the training test runs ~5x faster on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_unsil(architecture: str, level: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_unsil(architecture, level, IMAGE_DIM, TEXT_DIM, HIDDEN).eval()


def token_inputs(seed: int = 0, num_patches: int = NUM_PATCHES, num_words: int = NUM_WORDS):
    """Soft region masks; the first caption has two padded word positions."""
    g = torch.Generator().manual_seed(seed)
    word_mask = torch.ones(BATCH, num_words, dtype=torch.long)
    word_mask[0, max(num_words - 2, 1) :] = 0
    return {
        "patch_tokens": torch.randn(BATCH, num_patches, IMAGE_DIM, generator=g),
        "word_tokens": torch.randn(BATCH, num_words, TEXT_DIM, generator=g),
        "word_mask": word_mask,
        "region_masks": torch.rand(BATCH, NUM_REGIONS, num_patches, generator=g),
    }


def semantic_inputs(seed: int = 0, num_regions: int = NUM_REGIONS, num_phrases: int = NUM_PHRASES):
    """The first caption has its last phrase padded."""
    g = torch.Generator().manual_seed(seed)
    phrase_mask = torch.ones(BATCH, num_phrases, dtype=torch.long)
    phrase_mask[0, -1] = 0
    return {
        "region_embeds": torch.randn(BATCH, num_regions, IMAGE_DIM, generator=g),
        "phrase_embeds": torch.randn(BATCH, num_phrases, TEXT_DIM, generator=g),
        "phrase_mask": phrase_mask,
    }


def level_inputs(level: str, seed: int = 0) -> dict[str, torch.Tensor]:
    return token_inputs(seed) if level == "token" else semantic_inputs(seed)


def text_side(level: str) -> tuple[str, str]:
    return ("word_tokens", "word_mask") if level == "token" else ("phrase_embeds", "phrase_mask")


def assert_same_outputs(a, b) -> None:
    torch.testing.assert_close(a.interaction, b.interaction, rtol=0, atol=0)
    torch.testing.assert_close(a.sigma, b.sigma, rtol=0, atol=0)


# --- predictors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("architecture", "level"), VARIANTS)
def test_every_variant_gives_target_shapes_and_sigma_in_open_unit_interval(architecture, level):
    out = make_unsil(architecture, level)(**level_inputs(level))
    expected = (BATCH, NUM_REGIONS) if level == "token" else (BATCH, NUM_REGIONS, NUM_PHRASES)
    assert out.interaction.shape == out.sigma.shape == expected
    assert torch.isfinite(out.interaction).all()
    assert ((out.sigma > 0) & (out.sigma < 1)).all()


@pytest.mark.parametrize(("architecture", "level"), VARIANTS)
def test_padded_text_values_do_not_change_the_outputs(architecture, level):
    model = make_unsil(architecture, level)
    inputs = level_inputs(level)
    tokens, mask = text_side(level)
    poisoned = dict(inputs, **{tokens: inputs[tokens].clone()})
    poisoned[tokens][~inputs[mask].bool()] = float("nan")
    with torch.no_grad():
        assert_same_outputs(model(**inputs), model(**poisoned))


@pytest.mark.parametrize(("architecture", "level"), VARIANTS)
def test_appending_padding_does_not_change_the_outputs(architecture, level):
    model = make_unsil(architecture, level)
    inputs = level_inputs(level)
    tokens, mask = text_side(level)
    padded = dict(inputs)
    padded[tokens] = torch.cat([inputs[tokens], torch.randn(BATCH, 3, TEXT_DIM)], dim=1)
    padded[mask] = torch.cat([inputs[mask], torch.zeros(BATCH, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        reference, longer = model(**inputs), model(**padded)
    real = (...,) if level == "token" else (..., slice(0, NUM_PHRASES))  # the original pairs
    torch.testing.assert_close(longer.interaction[real], reference.interaction)
    torch.testing.assert_close(longer.sigma[real], reference.sigma)


@pytest.mark.parametrize(("architecture", "level"), VARIANTS)
def test_real_text_values_change_the_outputs(architecture, level):
    """The counterpart of the padding tests: the text side is not ignored altogether."""
    model = make_unsil(architecture, level)
    inputs = level_inputs(level)
    tokens, _ = text_side(level)
    changed = dict(inputs, **{tokens: inputs[tokens].clone()})
    changed[tokens][:, 0] += 1.0
    with torch.no_grad():
        before, after = model(**inputs), model(**changed)
    assert not torch.allclose(before.interaction, after.interaction)
    assert not torch.allclose(before.sigma, after.sigma)


@pytest.mark.parametrize(("architecture", "level"), VARIANTS)
def test_predictions_differ_between_targets(architecture, level):
    """Each target is told apart from the others (by h, or by the transformer's token types)."""
    with torch.no_grad():
        out = make_unsil(architecture, level)(**level_inputs(level))
    interaction = out.interaction[1].flatten()  # the second caption has no padding
    assert ((interaction[1:] - interaction[0]).abs() > 1e-5).all()


@pytest.mark.parametrize("architecture", UNSIL_ARCHITECTURES)
def test_a_caption_without_real_words_gives_ordinary_outputs(architecture):
    """No NaN from an empty softmax, no -inf (or float min) from an empty max-pool."""
    inputs = token_inputs()
    inputs["word_mask"][:] = 0
    with torch.no_grad():
        out = make_unsil(architecture, "token")(**inputs)
    assert out.interaction.abs().max() < 10 and ((out.sigma > 0.01) & (out.sigma < 0.99)).all()


def test_semantic_pairs_with_a_padded_phrase_are_zero_and_confident():
    model = make_unsil("mlp_attention", "semantic")
    with torch.no_grad():
        out = model(**semantic_inputs())
    assert (out.interaction[0, :, -1] == 0).all()
    assert (out.sigma[0, :, -1] == model.eps).all()
    assert (out.sigma[1, :, -1] > model.eps).all()


def test_mlp_attention_token_level_is_invariant_to_permuting_context_tokens():
    model = make_unsil("mlp_attention", "token")
    inputs = token_inputs()
    patches, words = torch.randperm(NUM_PATCHES), torch.randperm(NUM_WORDS)
    permuted = {
        "patch_tokens": inputs["patch_tokens"][:, patches],
        "region_masks": inputs["region_masks"][:, :, patches],
        "word_tokens": inputs["word_tokens"][:, words],
        "word_mask": inputs["word_mask"][:, words],
    }
    with torch.no_grad():
        reference, out = model(**inputs), model(**permuted)
    torch.testing.assert_close(out.interaction, reference.interaction)
    torch.testing.assert_close(out.sigma, reference.sigma)


def test_mlp_attention_semantic_predictions_permute_with_regions_and_phrases():
    model = make_unsil("mlp_attention", "semantic")
    inputs = semantic_inputs()
    regions, phrases = torch.tensor([2, 0, 1]), torch.tensor([3, 1, 0, 2])
    permuted = {
        "region_embeds": inputs["region_embeds"][:, regions],
        "phrase_embeds": inputs["phrase_embeds"][:, phrases],
        "phrase_mask": inputs["phrase_mask"][:, phrases],
    }
    with torch.no_grad():
        reference, out = model(**inputs), model(**permuted)
    torch.testing.assert_close(out.interaction, reference.interaction[:, regions][:, :, phrases])
    torch.testing.assert_close(out.sigma, reference.sigma[:, regions][:, :, phrases])


@pytest.mark.parametrize(("architecture", "level"), VARIANTS)
def test_gradients_reach_every_parameter(architecture, level):
    model = make_unsil(architecture, level).train()
    out = model(**level_inputs(level))
    target = torch.rand(out.interaction.shape, generator=torch.Generator().manual_seed(1))
    unsil_loss(out.interaction, out.sigma, target, out.sigma > model.eps).backward()
    silent = [
        name
        for name, parameter in model.named_parameters()
        if parameter.grad is None or not parameter.grad.abs().sum() > 0
    ]
    assert not silent


def test_conv1d_sees_the_last_token_of_an_odd_length_sequence():
    """A kernel-4 stride-2 conv over 9 positions would drop position 8 without padding."""
    model = make_unsil("conv1d", "token")
    inputs = token_inputs(num_patches=9)
    inputs["region_masks"][..., -1] = 0.0  # the last patch only reaches the conv, not h
    changed = dict(inputs, patch_tokens=inputs["patch_tokens"].clone())
    changed["patch_tokens"][:, -1] += 1.0
    with torch.no_grad():
        before, after = model(**inputs), model(**changed)
    assert not torch.allclose(before.interaction, after.interaction)


@pytest.mark.parametrize("level", UNSIL_LEVELS)
def test_conv1d_handles_sequences_shorter_than_the_kernel(level):
    model = make_unsil("conv1d", level)
    if level == "token":
        inputs = token_inputs(num_patches=2, num_words=1)
        inputs["word_mask"][:] = 1
    else:
        inputs = semantic_inputs(num_regions=1, num_phrases=2)
    with torch.no_grad():
        out = model(**inputs)
    assert torch.isfinite(out.interaction).all() and torch.isfinite(out.sigma).all()


def test_transformer_rejects_more_tokens_than_position_embeddings():
    torch.manual_seed(0)
    model = UnsilTransformer("token", IMAGE_DIM, TEXT_DIM, HIDDEN, max_image_tokens=4)
    with pytest.raises(ValueError, match="max_image_tokens"):
        model(**token_inputs(num_patches=5))


def test_forward_rejects_inputs_of_the_other_level():
    model = make_unsil("mlp_attention", "token")
    with pytest.raises(ValueError, match="region_embeds"):
        model(**semantic_inputs())


@pytest.mark.parametrize(
    ("architecture", "cls"),
    [
        ("mlp_attention", UnsilMlpAttention),
        ("mlp_dot_attention", UnsilMlpAttention),
        ("conv1d", UnsilConv1d),
        ("transformer", UnsilTransformer),
    ],
)
def test_build_unsil_builds_the_named_architecture(architecture, cls):
    model = build_unsil(architecture, "semantic", IMAGE_DIM, TEXT_DIM, HIDDEN)
    assert type(model) is cls and model.level == "semantic" and model.hidden_dim == HIDDEN


def test_build_unsil_rejects_an_unknown_architecture():
    with pytest.raises(ValueError, match=r"UNSIL architecture must be one of.*got 'lstm'"):
        build_unsil("lstm", "token", IMAGE_DIM, TEXT_DIM)


def test_build_unsil_rejects_an_unknown_level():
    with pytest.raises(ValueError, match=r"UNSIL level must be one of.*got 'pixel'"):
        build_unsil("conv1d", "pixel", IMAGE_DIM, TEXT_DIM)


# --- hybrid labelling rule ----------------------------------------------------------------------


def test_sigma_one_samples_every_target():
    mask = hybrid_label_mask(torch.ones(10_000), torch.Generator().manual_seed(0), warmup=False)
    assert mask.dtype == torch.bool and mask.all()


def test_sigma_zero_samples_no_target():
    g = torch.Generator().manual_seed(0)
    assert not hybrid_label_mask(torch.zeros(10_000), g, warmup=False).any()
    assert not hybrid_label_mask(torch.full((10_000,), 1e-7), g, warmup=False).any()


def test_sampled_share_matches_sigma():
    n, p = 20_000, 0.3
    mask = hybrid_label_mask(torch.full((n,), p), torch.Generator().manual_seed(0), warmup=False)
    assert abs(mask.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_warmup_samples_every_target():
    mask = hybrid_label_mask(torch.zeros(4, 5), torch.Generator().manual_seed(0), warmup=True)
    assert mask.shape == (4, 5) and mask.all()


def test_warmup_consumes_the_generator_like_a_normal_step():
    sigma = torch.full((100,), 0.5)
    warm, cold = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    hybrid_label_mask(sigma, warm, warmup=True)
    hybrid_label_mask(sigma, cold, warmup=False)
    assert torch.equal(hybrid_label_mask(sigma, warm), hybrid_label_mask(sigma, cold))


def test_label_mask_is_reproducible_with_a_seeded_generator():
    sigma = torch.rand(1_000, generator=torch.Generator().manual_seed(0))

    def draw(seed: int) -> torch.Tensor:
        return hybrid_label_mask(sigma, torch.Generator().manual_seed(seed), warmup=False)

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_label_mask_accepts_any_float_sigma_and_stays_on_its_device(dtype):
    sigma = torch.full((3, 4), 0.5, dtype=dtype, requires_grad=dtype != torch.float16)
    mask = hybrid_label_mask(sigma, torch.Generator().manual_seed(0), warmup=False)
    assert mask.dtype == torch.bool and mask.shape == (3, 4) and mask.device == sigma.device


def test_nan_sigma_is_sampled():
    sigma = torch.tensor([float("nan"), 0.0])
    assert hybrid_label_mask(sigma, torch.Generator().manual_seed(0)).tolist() == [True, False]


# --- combining labels ---------------------------------------------------------------------------


def test_combine_labels_takes_sampled_where_needed_and_prediction_elsewhere():
    predicted = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
    sampled = torch.tensor([0.9, float("nan"), 0.7])
    labels = combine_labels(predicted, sampled, torch.tensor([True, False, True]))
    torch.testing.assert_close(labels, torch.tensor([0.9, 0.2, 0.7]))
    assert not labels.requires_grad


def test_combine_labels_rejects_nan_in_a_used_sampled_entry():
    sampled = torch.tensor([0.9, float("nan")])
    with pytest.raises(ValueError, match="finite"):
        combine_labels(torch.zeros(2), sampled, torch.tensor([True, True]))


# --- loss ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("weight", "expected"), [(1.0, (2.5 + 0.25) / 2), (2.0, (3.0 + 0.5) / 2)])
def test_unsil_loss_matches_a_hand_computation(weight, expected):
    # sampled targets: (1 - 0)² / 0.5 + λ·0.5 and (2 - 2)² / 0.25 + λ·0.25; the third is unused.
    loss = unsil_loss(
        torch.tensor([1.0, 2.0, 3.0]),
        torch.tensor([0.5, 0.25, 0.5]),
        torch.tensor([0.0, 2.0, float("nan")]),
        torch.tensor([True, True, False]),
        uncertainty_weight=weight,
    )
    assert loss.item() == pytest.approx(expected)


def test_unsil_loss_is_zero_with_a_graph_when_nothing_was_sampled():
    predicted = torch.randn(3, requires_grad=True)
    sigma = torch.rand(3, requires_grad=True)
    loss = unsil_loss(predicted, sigma, torch.full((3,), float("nan")), torch.zeros(3, dtype=bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(predicted.grad, torch.zeros(3)) and torch.equal(sigma.grad, torch.zeros(3))


def test_unsil_loss_gradients_stay_finite_with_nan_in_unsampled_targets():
    predicted = torch.randn(4, requires_grad=True)
    sigma = torch.full((4,), 0.5, requires_grad=True)
    target = torch.tensor([0.1, float("nan"), 0.3, float("nan")])
    unsil_loss(predicted, sigma, target, torch.isfinite(target)).backward()
    assert torch.isfinite(predicted.grad).all() and torch.isfinite(sigma.grad).all()
    assert predicted.grad[1] == 0 and sigma.grad[3] == 0


def test_unsil_loss_is_minimised_by_sigma_equal_to_error_over_sqrt_lambda():
    error, weight = 0.3, 4.0
    sigma = torch.tensor([error / math.sqrt(weight)], requires_grad=True)
    loss = unsil_loss(
        torch.tensor([error]), sigma, torch.zeros(1), torch.ones(1, dtype=bool), weight
    )
    loss.backward()
    assert abs(sigma.grad.item()) < 1e-5


def test_adam_on_unsil_loss_learns_a_synthetic_interaction_function():
    """Target = sigmoid(4 (r_0 - r_1)) of the region's mean patch features r: after a few hundred
    Adam steps UNSIL beats the constant (mean) predictor clearly and its sigma shrinks."""

    def dataset(seed: int, size: int):
        g = torch.Generator().manual_seed(seed)
        patches = torch.randn(size, 16, 8, generator=g)
        regions = (torch.rand(size, 4, 16, generator=g) < 0.3).float()
        regions[:, torch.arange(4), torch.arange(4)] = 1.0  # no empty region
        means = regions @ patches / regions.sum(-1, keepdim=True)
        inputs = {
            "patch_tokens": patches,
            "word_tokens": torch.randn(size, 4, 6, generator=g),
            "region_masks": regions,
        }
        return inputs, torch.sigmoid(4 * (means[..., 0] - means[..., 1]))

    train_inputs, train_target = dataset(0, 128)
    test_inputs, test_target = dataset(1, 128)
    torch.manual_seed(0)
    model = UnsilMlpAttention("token", image_dim=8, text_dim=6, hidden_dim=32)
    with torch.no_grad():
        initial_sigma = model(**test_inputs).sigma.mean()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    everything = torch.ones_like(train_target, dtype=torch.bool)
    for _ in range(300):
        out = model(**train_inputs)
        loss = unsil_loss(out.interaction, out.sigma, train_target, everything)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        out = model(**test_inputs)
    mae = (out.interaction - test_target).abs().mean()
    baseline = (train_target.mean() - test_target).abs().mean()
    assert mae < 0.4 * baseline
    assert out.sigma.mean() < 0.4 * initial_sigma


# --- statistics ---------------------------------------------------------------------------------


def test_unsil_statistics_on_a_hand_case():
    stats = unsil_statistics(
        predicted=torch.tensor([0.5, 0.2, 0.9, 0.4]),
        sigma=torch.tensor([0.1, 0.3, 0.5, 0.7]),
        target=torch.tensor([0.3, float("nan"), 0.6, float("nan")]),
        needs_sampling=torch.tensor([True, False, True, False]),
    )
    assert stats["unsil_label_share"] == pytest.approx(0.5)
    assert stats["unsil_mae"] == pytest.approx((0.2 + 0.3) / 2)
    assert stats["unsil_sigma_mean"] == pytest.approx(0.4)
    assert stats["unsil_num_sampled"] == 2


def test_unsil_statistics_leave_out_invalid_targets():
    stats = unsil_statistics(
        predicted=torch.tensor([0.5, 0.2, 0.0]),
        sigma=torch.tensor([0.2, 0.4, 1e-4]),
        target=torch.tensor([0.3, float("nan"), 9.0]),
        needs_sampling=torch.tensor([True, False, True]),
        valid=torch.tensor([True, True, False]),
    )
    assert stats["unsil_label_share"] == pytest.approx(0.5)
    assert stats["unsil_mae"] == pytest.approx(0.2)
    assert stats["unsil_sigma_mean"] == pytest.approx(0.3)


def test_unsil_statistics_report_no_mae_when_nothing_was_sampled():
    stats = unsil_statistics(
        torch.zeros(3),
        torch.full((3,), 0.2),
        torch.full((3,), float("nan")),
        torch.zeros(3, dtype=bool),
    )
    assert stats["unsil_label_share"] == 1.0 and stats["unsil_mae"] is None
    assert stats["unsil_num_sampled"] == 0


@pytest.mark.parametrize(
    ("architecture", "attention"),
    [("mlp_attention", AttentionPooling), ("mlp_dot_attention", DotProductAttentionPooling)],
)
def test_mlp_architectures_differ_only_in_their_attention(architecture, attention):
    model = build_unsil(architecture, "token", IMAGE_DIM, TEXT_DIM, HIDDEN)
    assert type(model.image_attention) is attention and type(model.text_attention) is attention


def test_dot_product_attention_pooling_matches_a_hand_computation():
    pooling = DotProductAttentionPooling(2)
    with torch.no_grad():
        pooling.target_proj.weight.copy_(torch.eye(2))
        pooling.token_proj.weight.copy_(torch.eye(2))
        pooling.token_proj.bias.zero_()
    targets = torch.tensor([[[1.0, 0.0]]])
    tokens = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    mask = torch.tensor([[True, True, False]])  # the third token is padding
    scores = torch.tensor([2.0, 0.0]) / 2**0.5
    weights = torch.softmax(scores, 0)
    expected = weights[0] * tokens[0, 0] + weights[1] * tokens[0, 1]
    torch.testing.assert_close(pooling(targets, tokens, mask)[0, 0], expected)


@pytest.mark.parametrize("num_targets", [2, 5, 9])  # fewer, as many and more targets than tokens
def test_dot_product_attention_pooling_equals_the_definition_for_any_target_count(num_targets):
    torch.manual_seed(0)
    pooling = DotProductAttentionPooling(4)
    with torch.no_grad():
        pooling.token_proj.bias.normal_()
    targets, tokens = torch.randn(2, num_targets, 4), torch.randn(2, 5, 4)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    scores = pooling.target_proj(targets) @ pooling.token_proj(tokens).transpose(1, 2) / 2
    weights = torch.softmax(scores.masked_fill(~mask[:, None], float("-inf")), -1)
    torch.testing.assert_close(pooling(targets, tokens, mask), weights @ tokens)


@pytest.mark.parametrize("architecture", ["mlp_attention", "mlp_dot_attention", "conv1d"])
def test_max_region_pooling_uses_the_projected_max_of_the_region_tokens(architecture):
    torch.manual_seed(0)
    model = build_unsil(architecture, "token", IMAGE_DIM, TEXT_DIM, HIDDEN, region_pooling="max")
    inputs = token_inputs()
    inputs["region_masks"] = inputs["region_masks"] > 0.5
    context = model.token_context(
        inputs["patch_tokens"], inputs["word_tokens"], inputs["word_mask"], inputs["region_masks"]
    )
    tokens, masks = inputs["patch_tokens"], inputs["region_masks"]
    expected = torch.stack(
        [
            torch.stack(
                [
                    tokens[b][masks[b, k]].amax(0)
                    if masks[b, k].any()
                    else tokens.new_zeros(IMAGE_DIM)
                    for k in range(NUM_REGIONS)
                ]
            )
            for b in range(BATCH)
        ]
    )
    torch.testing.assert_close(model.target_vectors(context), model.image_projection(expected))
    # it changes the prediction, and the gradient still reaches every parameter
    mean_model = build_unsil(architecture, "token", IMAGE_DIM, TEXT_DIM, HIDDEN)
    mean_model.load_state_dict(model.state_dict())
    assert not torch.equal(model(**inputs).interaction, mean_model(**inputs).interaction)
    out = model.train()(**inputs)
    unsil_loss(out.interaction, out.sigma, torch.rand_like(out.sigma), out.sigma > 0).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_unknown_region_pooling_is_refused():
    with pytest.raises(ValueError, match=r"UNSIL region_pooling must be one of.*got 'sum'"):
        build_unsil("mlp_attention", "token", IMAGE_DIM, TEXT_DIM, HIDDEN, region_pooling="sum")


def test_unknown_attention_is_refused():
    with pytest.raises(ValueError, match=r"UNSIL attention must be one of.*got 'cosine'"):
        UnsilMlpAttention("token", IMAGE_DIM, TEXT_DIM, HIDDEN, attention="cosine")
