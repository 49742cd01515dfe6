"""LoupeConfig: presets, validation and serialisation."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from transformers import AutoConfig, BertConfig

from loupe_hf import LOUPE_PRESETS, LoupeConfig, LoupeModel, LoupeVisionConfig


def test_tiny_preset_declares_vision_and_text_subconfigs():
    config = LoupeConfig.from_preset("tiny")
    assert isinstance(config.vision_config, LoupeVisionConfig)
    assert isinstance(config.text_config, BertConfig)
    assert config.vision_config.dense_grid_size == 8
    assert config.num_candidate_regions == 64 * len(config.region_anchor_sizes)


def test_default_text_tower_is_the_papers_bert_small():
    text = LoupeConfig().text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads) == (4, 512, 8)
    assert (text.intermediate_size, text.max_position_embeddings, text.vocab_size) == (
        2048,
        60,
        30522,
    )
    assert (text.hidden_dropout_prob, text.attention_probs_dropout_prob) == (0.1, 0.1)
    assert text.layer_norm_eps == 1e-12 and text.hidden_act == "gelu"


def test_paper_preset_is_swin_large_224():
    vision = LoupeConfig.from_preset("paper").vision_config
    assert (vision.image_size, vision.patch_size, vision.window_size) == (224, 4, 7)
    assert list(vision.depths) == [2, 2, 18, 2]
    assert list(vision.num_heads) == [6, 12, 24, 48]
    assert vision.embed_dim == 192 and vision.hidden_size == 1536
    assert vision.dense_grid_size == 7


def test_paper_preset_has_about_the_papers_226m_parameters():
    with torch.device("meta"):
        model = LoupeModel(LoupeConfig.from_preset("paper"))
    count = sum(parameter.numel() for parameter in model.parameters())
    assert abs(count - 226e6) / 226e6 < 0.01, count


def _comparable(config: LoupeConfig) -> dict:
    return {
        key: value
        for key, value in config.to_dict().items()
        if key not in {"_name_or_path", "auto_map"}
    }


def test_config_round_trips_through_save_pretrained(tmp_path):
    config = LoupeConfig.from_preset("tiny", num_regions=9, text_pooling="cls")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LoupeConfig)
    assert _comparable(loaded) == _comparable(config)
    assert loaded.vision_config.dense_grid_size == config.vision_config.dense_grid_size


def test_preset_overrides_merge_into_subconfigs():
    config = LoupeConfig.from_preset("tiny", vision_config={"image_size": 128}, projection_dim=64)
    assert config.vision_config.image_size == 128
    assert config.vision_config.embed_dim == LOUPE_PRESETS["tiny"]["vision_config"]["embed_dim"]
    assert config.projection_dim == 64
    assert (
        LOUPE_PRESETS["tiny"]["vision_config"]["image_size"] == 64
    )  # the preset itself is untouched


@pytest.mark.parametrize("preset", ["tiny-128", "tiny-fine-grid"])
def test_the_fine_presets_have_a_16x16_grid_whose_anchors_fit_the_synthetic_objects(preset):
    from torchvision.ops import box_convert, box_iou

    from loupe_hf.data import generate_sample

    config = LoupeConfig.from_preset(preset)
    assert config.vision_config.dense_grid_size == 16
    assert LOUPE_PRESETS["tiny"]["vision_config"]["image_size"] == 64  # tiny is untouched
    # Every anchor spans two cells or more: a one-cell region has no interaction.
    assert min(config.region_anchor_sizes) * 16 >= 2
    head = LoupeModel(config).region_head
    candidates, _ = head(torch.zeros(1, 16 * 16, config.vision_config.hidden_size))
    candidates = box_convert(candidates[0], "cxcywh", "xyxy")
    objects = []
    for index in range(128):
        sample = generate_sample(index, "validation")
        xywh = torch.tensor(sample["objects"]["bbox"]) / sample["width"]
        objects.append(box_convert(xywh, "xywh", "xyxy"))
    best = box_iou(torch.cat(objects), candidates).max(dim=1).values
    assert (best >= 0.5).float().mean() >= 0.97


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown LOUPE preset 'huge'.*paper.*tiny"):
        LoupeConfig.from_preset("huge")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"text_pooling": "max"}, "text_pooling"),
        ({"token_game_mode": "output"}, "token_game_mode"),
        ({"num_regions": 0}, "num_regions"),
        ({"region_box_mode": "free"}, "region_box_mode"),
        ({"region_anchor_sizes": [0.2, 1.5]}, "region_anchor_sizes"),
        ({"region_min_size": 0.5, "region_init_size": 0.3}, "region_min_size"),
        ({"shapley_num_samples": 0}, "shapley_num_samples"),
        ({"shapley_token_num_samples": 0}, "shapley_token_num_samples"),
        ({"unsil_architecture": "lstm"}, "unsil_architecture"),
        ({"image_pooling": "median"}, "image_pooling"),
        ({"unsil_region_pooling": "sum"}, "unsil_region_pooling"),
        ({"unsil_levels": []}, "unsil_levels"),
        ({"unsil_levels": ["token", "pixel"]}, "unsil_levels"),
        ({"tsa_label": "size"}, "tsa_label"),
        ({"region_box_mode": "learned", "image_pooling": "max"}, "image_pooling"),
        ({"detection_objectness_weight": -1.0}, "detection_objectness_weight"),
        ({"box_refinement_iou": 0.0}, "box_refinement_iou"),
        ({"detection_num_regions": 0}, "detection_num_regions"),
        ({"box_refinement_iou": 1.5}, "box_refinement_iou"),
        ({"vision_config": {"dense_stage": 3}}, "dense_stage"),
        ({"vision_config": {"image_size": 66}}, "patch_size"),
        ({"vision_config": {"depths": [2, 2]}}, "num_heads"),
        ({"vision_config": {"timm_pretrained": True}}, "timm_model_name"),
        (
            {"vision_config": {"convolutional_backbone": "resnet_does_not_exist"}},
            "convolutional_backbone 'resnet_does_not_exist' is not a timm model name",
        ),
        (
            {
                "vision_config": {
                    "convolutional_backbone": "resnet10t",
                    "timm_model_name": "swin_tiny_patch4_window7_224",
                }
            },
            "either convolutional_backbone or timm_model_name",
        ),
    ],
)
def test_invalid_config_raises_naming_the_field(overrides, message):
    with pytest.raises(Exception, match=message) as error:
        LoupeConfig.from_preset("tiny", **overrides)
    assert isinstance(error.value, ValueError) or isinstance(error.value.__cause__, ValueError)


@pytest.mark.parametrize("mode", ["feature", "input"])
def test_max_image_pooling_works_with_both_token_game_modes(mode):
    config = LoupeConfig.from_preset("tiny", image_pooling="max", token_game_mode=mode)
    assert config.image_pooling == "max"


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"projection_dim": 0}, ValueError, "projection_dim must be an integer >= 1, got 0"),
        ({"num_regions": "8"}, TypeError, "num_regions must be an integer, got '8' \\(str\\)"),
        ({"num_regions": 10**6}, ValueError, "num_regions \\(1000000\\) exceeds the 128 candidate"),
        ({"vision_config": {"window_size": 0}}, ValueError, "window_size must be an integer >= 1"),
        ({"text_config": {"vocab_size": 0}}, ValueError, "text_config.vocab_size must be"),
        (
            {"text_config": {"hidden_size": 130}},
            ValueError,
            "multiple of text_config.num_attention",
        ),
        (
            {"logit_scale_init_value": float("nan")},
            ValueError,
            "logit_scale_init_value must be a fin",
        ),
        ({"region_nms_iou": 2.0}, ValueError, "region_nms_iou must be a number <= 1 and > 0"),
        ({"tsa_loss_weight": -1.0}, ValueError, "tsa_loss_weight must be a number >= 0"),
        ({"unsil_hidden_dim": 0}, ValueError, "unsil_hidden_dim must be an integer >= 1"),
        ({"vision_config": {"drop_path_rate": 1.0}}, ValueError, "drop_path_rate must be a number"),
        (
            {"shapley_token_num_samples": 1.5},
            TypeError,
            "shapley_token_num_samples must be an integ",
        ),
        (
            {"shapley_estimator": "nope"},
            ValueError,
            r"shapley_estimator must be one of \('uniform'",
        ),
        (
            {"box_refinement_candidates": 0},
            ValueError,
            "box_refinement_candidates must be an integer >= 1, got 0",
        ),
        (
            {"fsa_direction": "phrase"},
            ValueError,
            r"fsa_direction must be one of \('region_to_phrase', 'both'\)",
        ),
        (
            {"fsa_region_weighting": "size"},
            ValueError,
            r"fsa_region_weighting must be one of \('uniform', 'confidence'\)",
        ),
        (
            {"prompt_template": "an image"},
            ValueError,
            "prompt_template must be a string with exactly",
        ),
    ],
)
def test_bad_config_values_are_named_when_the_config_is_built(overrides, error, message):
    with pytest.raises(Exception) as caught:
        LoupeConfig.from_preset("tiny", **overrides)
    # huggingface_hub's strict dataclasses wrap the validator's error; the cause is ours.
    assert isinstance(caught.value, error) or isinstance(caught.value.__cause__, error)
    assert re.search(message, str(caught.value))


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("num_regions", "8", TypeError),
        ("projection_dim", -1, ValueError),
        ("fsa_loss_weight", "x", TypeError),
    ],
)
def test_bad_config_values_are_refused_where_they_are_set(name, value, error):
    config = LoupeConfig.from_preset("tiny")
    with pytest.raises(error, match=name):
        setattr(config, name, value)
    config.num_regions = 8  # a good value is taken
    assert config.num_regions == 8


def test_an_unknown_config_key_is_warned_about_by_name(caplog):
    with caplog.at_level(logging.WARNING, logger="loupe_hf.configuration_loupe"):
        LoupeConfig.from_preset("tiny", projecton_dim=3)
    assert "'projecton_dim'" in caplog.text and "did you mean 'projection_dim'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="loupe_hf.configuration_loupe"):
        LoupeConfig.from_dict(LoupeConfig.from_preset("tiny").to_dict())
    assert "unknown key" not in caplog.text  # what a saved config carries is known
