"""LoupeForPreTraining: every loss term, the ablation switches, UNSIL gating and gradient routing."""

from __future__ import annotations

import pytest
import torch

from loupe_hf import LoupeConfig, LoupeModel
from loupe_hf.data import generate_sample
from loupe_hf.losses import cmc_loss
from loupe_hf.pretraining import LoupeForPreTraining

# Both UNSIL levels, so that the gating tests cover the semantic predictor too (the tiny preset
# predicts token-level labels only).
FAST = {
    "shapley_num_samples": 8,
    "num_regions": 4,
    "unsil_hidden_dim": 32,
    "unsil_levels": ["token", "semantic"],
}


@pytest.fixture(scope="module")
def batch(processor):
    samples = [generate_sample(index) for index in range(4)]
    return processor(
        images=[sample["image"] for sample in samples],
        text=[sample["caption"] for sample in samples],
        phrase_spans=[sample["objects"]["phrase_span"] for sample in samples],
    )


def _model(tiny_config, **overrides) -> LoupeForPreTraining:
    torch.manual_seed(0)
    config = LoupeConfig.from_dict({**tiny_config.to_dict(), **FAST, **overrides})
    return LoupeForPreTraining(config).train()


def test_backbone_ablation_is_the_cmc_loss_alone(tiny_config, batch):
    model = _model(tiny_config, use_tsa=False, use_fsa=False, use_unsil=False).eval()  # no dropout
    out = model(**batch)
    with torch.no_grad():
        base = model.loupe(**batch)
    assert out.tsa_loss == 0 and out.fsa_loss == 0 and out.unsil_loss == 0
    torch.testing.assert_close(
        out.loss, cmc_loss(base.image_embeds, base.text_embeds, model.loupe.logit_scale)
    )
    assert model.token_unsil is None and model.semantic_unsil is None


@pytest.mark.parametrize(
    ("flags", "active"),
    [
        ({"use_tsa": True, "use_fsa": False, "use_unsil": False}, {"tsa_loss"}),
        ({"use_tsa": True, "use_fsa": True, "use_unsil": False}, {"tsa_loss", "fsa_loss"}),
        (
            {"use_tsa": True, "use_fsa": True, "use_unsil": True},
            {"tsa_loss", "fsa_loss", "unsil_loss"},
        ),
    ],
    ids=["tsa", "tsa_fsa", "loupe"],
)
def test_each_ablation_row_switches_on_its_terms(tiny_config, batch, flags, active):
    out = _model(tiny_config, **flags)(**batch)
    for name in ("tsa_loss", "fsa_loss", "unsil_loss"):
        assert (out[name] > 0) == (name in active), name
    expected = out.cmc_loss + out.tsa_loss + out.fsa_loss + out.unsil_loss
    torch.testing.assert_close(out.loss.detach(), expected)


def test_loss_weights_scale_the_terms(tiny_config, batch):
    plain = _model(tiny_config, use_unsil=False)(**batch)
    weighted = _model(tiny_config, use_unsil=False, tsa_loss_weight=2.0, fsa_loss_weight=0.5)(
        **batch
    )
    torch.testing.assert_close(
        weighted.loss.detach(),
        plain.cmc_loss + 2.0 * plain.tsa_loss + 0.5 * plain.fsa_loss,
        rtol=1e-4,
        atol=1e-5,
    )


def test_hard_negative_captions_reach_the_cmc_loss_and_train_the_text_tower(tiny_config, processor):
    from loupe_hf.pretraining import LoupeDataCollator

    examples = [generate_sample(index) for index in range(4)]
    for example in examples:
        example["phrase_spans"] = example["objects"]["phrase_span"]
    collator = LoupeDataCollator(processor, hard_negatives=True)
    batch = collator(examples)
    assert batch["negative_mask"].all() and batch["negative_input_ids"].shape[0] == 4
    model = _model(tiny_config, use_tsa=False, use_fsa=False, use_unsil=False).eval()
    with_negatives = model(**batch)
    plain = {k: v for k, v in batch.items() if not k.startswith("negative_")}
    base = model.loupe(**plain)
    negatives = model.negative_text_embeds(
        batch["negative_input_ids"], batch["negative_attention_mask"]
    )
    expected = cmc_loss(
        base.image_embeds, base.text_embeds, model.loupe.logit_scale, negative_text_embeds=negatives
    )
    torch.testing.assert_close(with_negatives.loss, expected)
    assert with_negatives.loss > model(**plain).loss  # more negatives, a larger loss
    with_negatives.loss.backward()
    assert model.loupe.text_model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="hard negative captions need the phrase spans column"):
        LoupeDataCollator(processor, hard_negatives=True, spans_column=None)(examples)


def test_fsa_needs_phrases(tiny_config, batch):
    no_phrases = {key: value for key, value in batch.items() if key != "phrase_masks"}
    out = _model(tiny_config, use_unsil=False)(**no_phrases)
    assert out.fsa_loss == 0 and out.tsa_loss > 0


def test_tsa_gradient_reaches_the_region_confidences_and_the_image_encoder(tiny_config, batch):
    model = _model(tiny_config, use_fsa=False, use_unsil=False, cmc_loss_weight=0.0)
    # The head's output layer starts at zero (boxes of the configured size): after one update the
    # TSA gradient also flows through it into the encoder.
    model(**batch).loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad()
    model(**batch).loss.backward()
    head = model.loupe.region_head
    # Each anchor's confidence is trained towards its interaction label: the scale of the box is
    # chosen by TSA (the rows of the anchors that were selected get a gradient).
    selected_anchors = model.loupe(**batch).region_indices % head.candidates_per_patch
    rows = head.out.weight.grad.abs().sum(dim=1) > 0
    assert rows[selected_anchors.unique()].all()
    assert model.loupe.vision_model.swin.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(
        p.grad is None or p.grad.abs().sum() == 0 for p in model.loupe.text_model.parameters()
    )


def test_fsa_gradient_reaches_learned_box_sizes_and_both_towers(tiny_config, batch):
    model = _model(
        tiny_config,
        use_tsa=False,
        use_unsil=False,
        cmc_loss_weight=0.0,
        region_box_mode="learned",
        image_pooling="mean",
        fsa_image_gradient=True,  # the paper's FSA (the tiny presets leave the image tower out)
    )
    model(**batch).loss.backward()
    head = model.loupe.region_head
    assert head.out.bias.grad[:2].abs().min() > 0
    assert model.loupe.text_model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert model.loupe.vision_model.swin.patch_embed.proj.weight.grad.abs().sum() > 0


def test_fsa_without_image_gradient_trains_the_text_tower_only(tiny_config, batch):
    assert not tiny_config.fsa_image_gradient  # the tiny presets' choice
    model = _model(tiny_config, use_tsa=False, use_unsil=False, cmc_loss_weight=0.0)
    out = model(**batch)
    assert out.fsa_loss > 0
    out.loss.backward()
    assert model.loupe.text_model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert all(
        p.grad is None or p.grad.abs().sum() == 0 for p in model.loupe.vision_model.parameters()
    )


@pytest.mark.parametrize(
    "overrides",
    [{"fsa_direction": "both"}, {"fsa_region_weighting": "confidence"}],
    ids=["both_directions", "confidence_weights"],
)
def test_fsa_variants_change_the_loss_and_keep_both_gradients(tiny_config, batch, overrides):
    flags = {
        "use_tsa": False,
        "use_unsil": False,
        "cmc_loss_weight": 0.0,
        "fsa_image_gradient": True,
    }
    paper = _model(tiny_config, **flags)(**batch).fsa_loss
    model = _model(tiny_config, **flags, **overrides)
    out = model(**batch)
    assert torch.isfinite(out.fsa_loss) and not torch.isclose(out.fsa_loss, paper)
    out.loss.backward()
    assert model.loupe.text_model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert model.loupe.vision_model.swin.patch_embed.proj.weight.grad.abs().sum() > 0


def test_unsil_learns_from_detached_features_only(tiny_config, batch):
    model = _model(tiny_config, cmc_loss_weight=0.0, tsa_loss_weight=0.0, fsa_loss_weight=0.0)
    out = model(**batch)
    assert out.unsil_loss > 0
    out.loss.backward()
    assert all(p.grad is not None for p in model.unsil_parameters())
    encoder_grads = [p.grad for p in model.loupe.parameters() if p.grad is not None]
    assert all(grad.abs().sum() == 0 for grad in encoder_grads)


def test_warmup_samples_every_label_then_unsil_takes_over_when_confident(tiny_config, batch):
    model = _model(tiny_config, unsil_warmup_steps=1, unsil_min_sample_rate=0.0)
    first = model(**batch)
    assert first.tsa_unsil_share == 0 and first.fsa_unsil_share == 0
    for predictor in (model.token_unsil, model.semantic_unsil):
        predictor.eps = 1e-4
    # Make UNSIL certain: sigma at its floor, so the hybrid rule trusts nearly every prediction.
    with torch.no_grad():
        for predictor in (model.token_unsil, model.semantic_unsil):
            last = [m for m in predictor.modules() if isinstance(m, torch.nn.Linear)][-1]
            last.weight.zero_()
            last.bias.fill_(-20.0)
    second = model(**batch)
    assert model.training_steps.item() == 2
    assert second.tsa_unsil_sigma < 0.01
    assert second.tsa_unsil_share > 0.9 and second.fsa_unsil_share > 0.9


def test_unsil_levels_choose_which_labels_unsil_may_supply(tiny_config, batch):
    assert list(tiny_config.unsil_levels) == ["token"]  # the preset: v2 is cheaper to sample
    model = _model(tiny_config, unsil_warmup_steps=0, unsil_levels=["token"])
    assert model.token_unsil is not None and model.semantic_unsil is None
    with torch.no_grad():  # a certain token-level predictor: most of its labels are trusted
        last = [m for m in model.token_unsil.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.zero_()
        last.bias.fill_(-20.0)
    out = model(**batch)
    assert out.tsa_unsil_share > 0.5
    assert out.fsa_unsil_share == 0 and out.fsa_loss > 0  # every FSA label sampled
    semantic_only = _model(tiny_config, unsil_levels=["semantic"])
    assert semantic_only.token_unsil is None and semantic_only.semantic_unsil is not None


def test_token_labels_take_their_own_sample_count(tiny_config, batch, monkeypatch):
    import loupe_hf.pretraining.modeling_pretraining as pretraining

    counts = {}
    for name in ("selected_interactions", "region_phrase_interactions"):
        original = getattr(pretraining, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            counts[_name] = kwargs["num_samples"]
            return _original(*args, **kwargs)

        monkeypatch.setattr(pretraining, name, spy)
    _model(tiny_config, use_unsil=False, shapley_token_num_samples=3)(**batch)
    assert counts == {"selected_interactions": 3, "region_phrase_interactions": 8}
    counts.clear()
    _model(tiny_config, use_unsil=False, shapley_token_num_samples=None)(**batch)
    assert counts == {"selected_interactions": 8, "region_phrase_interactions": 8}


def test_a_minimum_share_of_labels_is_always_sampled(tiny_config, batch):
    model = _model(tiny_config, unsil_warmup_steps=0, unsil_min_sample_rate=0.5)
    with torch.no_grad():
        for predictor in (model.token_unsil, model.semantic_unsil):
            last = [m for m in predictor.modules() if isinstance(m, torch.nn.Linear)][-1]
            last.weight.zero_()
            last.bias.fill_(
                -20.0
            )  # sigma at its floor: without the minimum rate nothing is sampled
    out = model(**batch)
    assert 0.3 < out.fsa_unsil_share < 0.7


def test_label_sampling_depends_on_the_step_counter_not_the_global_rng(tiny_config, batch):
    first, second = _model(tiny_config).eval(), _model(tiny_config).eval()  # eval: no dropout
    torch.manual_seed(1)
    one = first(**batch)
    torch.manual_seed(2)
    two = second(**batch)
    torch.testing.assert_close(one.loss, two.loss)
    second.training_steps += 1
    assert not torch.allclose(second(**batch).unsil_loss, two.unsil_loss)


def test_pretraining_checkpoint_loads_as_a_loupe_model(tiny_config, batch, tmp_path):
    model = _model(tiny_config).eval()
    model.save_pretrained(tmp_path)
    base = LoupeModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = model.loupe(**batch).logits_per_image
        actual = base(**batch).logits_per_image
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    reloaded = LoupeForPreTraining.from_pretrained(tmp_path)
    assert reloaded.training_steps.item() == model.training_steps.item()


def test_per_patch_tsa_label_removes_the_size_advantage_of_large_regions():
    from loupe_hf.pretraining.labels import tsa_label_values

    raw = torch.tensor([[-0.4, -0.3, 0.1]])  # a big redundant region, a small one, a small synergy
    masks = torch.zeros(1, 3, 16, dtype=torch.bool)
    masks[0, 0, :8] = True
    masks[0, 1, :3] = True
    masks[0, 2, 4:6] = True
    torch.testing.assert_close(
        tsa_label_values(raw, masks, "magnitude"), torch.tensor([[0.4, 0.3, 0.1]])
    )
    torch.testing.assert_close(
        tsa_label_values(raw, masks, "magnitude_per_patch"), torch.tensor([[0.05, 0.1, 0.05]])
    )
    torch.testing.assert_close(tsa_label_values(raw, masks, "signed"), raw)


@pytest.mark.parametrize(
    ("label", "expected"), [("magnitude", [1.0, 0.0, 0.5]), ("signed", [0.0, 1.0, 0.5])]
)
def test_tsa_labels_rank_regions_by_interaction_magnitude_or_sign(
    tiny_config, batch, monkeypatch, label, expected
):
    from loupe_hf.pretraining.labels import InteractionLabels

    model = _model(tiny_config, num_regions=3, use_fsa=False, use_unsil=False, tsa_label=label)
    raw = torch.tensor([-0.4, 0.0, -0.2]).expand(
        4, 3
    )  # a redundant region, a neutral one, in between
    monkeypatch.setattr(
        "loupe_hf.pretraining.modeling_pretraining.interaction_labels",
        lambda *args, **kwargs: InteractionLabels(raw=raw.clone(), unsil_loss=torch.zeros(())),
    )
    captured = {}
    monkeypatch.setattr(
        "loupe_hf.pretraining.modeling_pretraining.tsa_loss",
        lambda logits, labels: captured.setdefault("labels", labels).sum(),
    )
    model(**batch)
    torch.testing.assert_close(captured["labels"], torch.tensor(expected).expand(4, 3))


def test_inference_models_load_a_pretraining_checkpoint_without_unexpected_keys(
    tiny_config, batch, tmp_path
):
    from loupe_hf import LoupeForZeroShotDetection

    model = _model(tiny_config).eval()
    model.save_pretrained(tmp_path)
    inputs = {k: v for k, v in batch.items() if k != "phrase_masks"}
    for cls in (LoupeModel, LoupeForZeroShotDetection):
        _, info = cls.from_pretrained(tmp_path, output_loading_info=True)
        assert not info["unexpected_keys"] and not info["missing_keys"], (cls, info)
    with torch.no_grad():
        expected = model.loupe(**inputs).image_embeds
        actual = LoupeModel.from_pretrained(tmp_path).eval()(**inputs).image_embeds
    torch.testing.assert_close(actual, expected)
