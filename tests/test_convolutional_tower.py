"""The convolutional image tower (`LoupeVisionConfig.convolutional_backbone`): geometry, input masking,
clear errors, saving and loading, gradient checkpointing, and LOUPE's losses on top of it."""

from __future__ import annotations

import copy

import pytest
import torch

from loupe_hf import LoupeConfig, LoupeModel
from loupe_hf.data import generate_sample
from loupe_hf.modeling_loupe import LoupeConvolutionalTower
from loupe_hf.pretraining import LoupeForPreTraining

from .test_training_switches import _inputs, _loss_grads_and_saved_bytes


def conv_config(tiny_config: LoupeConfig, **vision) -> LoupeConfig:
    config = copy.deepcopy(tiny_config)
    config.vision_config.convolutional_backbone = "resnet10t"
    for key, value in vision.items():
        setattr(config.vision_config, key, value)
    return config


@pytest.fixture()
def conv_model(tiny_config) -> LoupeModel:
    torch.manual_seed(0)
    return LoupeModel(conv_config(tiny_config)).eval()


@pytest.mark.parametrize("image_size", [64, 128])
def test_tokens_lie_on_the_dense_grid_of_the_swin_they_replace(tiny_config, image_size):
    config = conv_config(tiny_config, image_size=image_size)
    model = LoupeModel(config).eval()
    assert isinstance(model.vision_model, LoupeConvolutionalTower)
    tokens = model.encode_image(torch.randn(2, 3, image_size, image_size))
    grid = config.vision_config.dense_grid_size
    assert grid == image_size // 8  # tiny: patch 4, dense stage 1
    assert tokens.shape == (2, grid * grid, config.vision_config.hidden_size)
    assert torch.isfinite(tokens).all()


def test_each_token_sees_its_cell_and_the_whole_image(conv_model):
    """A change in one corner moves that corner's token most, and moves far tokens too (context)."""
    pixels = torch.randn(1, 3, 64, 64)
    changed = pixels.clone()
    changed[..., :8, :8] += 3.0
    with torch.no_grad():
        delta = (conv_model.encode_image(changed) - conv_model.encode_image(pixels)).norm(dim=-1)[0]
    assert delta.argmax() == 0
    assert delta[-1] > 0  # the opposite corner, 7 cells away, through the upsampled last stage


def test_input_mode_zeroes_the_pixels_of_dropped_cells(conv_model):
    pixels = torch.randn(2, 3, 64, 64)
    keep = torch.ones(2, 64)
    keep[0, 9] = 0  # row 1, column 1 of the 8x8 grid: pixels 8..15 x 8..15
    zeroed = pixels.clone()
    zeroed[0, :, 8:16, 8:16] = 0
    tower = conv_model.vision_model
    with torch.no_grad():
        masked = tower(pixels, patch_keep_mask=keep).last_hidden_state
        expected = tower(zeroed).last_hidden_state
        unmasked = tower(pixels, patch_keep_mask=torch.ones(2, 64)).last_hidden_state
    torch.testing.assert_close(masked, expected)
    torch.testing.assert_close(unmasked, tower(pixels).last_hidden_state)
    with pytest.raises(ValueError, match="patch_keep_mask must have shape"):
        conv_model.get_image_features(pixels, patch_keep_mask=torch.ones(2, 10))


def test_a_masked_image_in_training_is_valued_alone_and_leaves_the_statistics(conv_model):
    """In training, a coalition's value must not depend on the batch it is encoded in, nor may masked
    batches move BatchNorm's running statistics; an unmasked batch still uses and updates them."""
    model = conv_model.train()
    pixels, keep = torch.randn(4, 3, 64, 64), (torch.rand(4, 64) > 0.5).float()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    with torch.no_grad():
        together = model.get_image_features(pixels, patch_keep_mask=keep)
        alone = model.get_image_features(pixels[:1], patch_keep_mask=keep[:1])
    torch.testing.assert_close(together[:1], alone)
    after = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules())
    with torch.no_grad():
        model.encode_image(pixels)
    assert not torch.equal(before[next(iter(before))], model.state_dict()[next(iter(before))])


def test_hidden_states_are_the_used_feature_maps_and_there_are_no_attentions(conv_model):
    out = conv_model.vision_model(
        torch.randn(1, 3, 64, 64), output_hidden_states=True, output_attentions=True
    )
    assert [tuple(h.shape) for h in out.hidden_states] == [(1, 64, 128), (1, 16, 256)]
    assert out.attentions == ()


def test_a_network_without_the_stage_reductions_is_refused_by_name(tiny_config):
    # Invalid names are refused by the config (tests/test_configuration.py).
    config = conv_config(tiny_config, patch_size=3, image_size=48)
    with pytest.raises(
        ValueError, match=r"'resnet10t' has feature maps at reductions .* none at \[6, 12\]"
    ):
        LoupeModel(config)


def test_save_and_load_give_the_same_outputs_and_batch_statistics(conv_model, tmp_path):
    """transformers builds the loaded model on the meta device: every weight and BatchNorm statistic
    must come back from the checkpoint."""
    conv_model.train()
    with torch.no_grad():  # move the running statistics away from their initial values
        conv_model.encode_image(torch.randn(4, 3, 64, 64) * 2 + 1)
    conv_model.eval()
    conv_model.save_pretrained(tmp_path)
    loaded = LoupeModel.from_pretrained(tmp_path).eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels), conv_model.encode_image(pixels))
    for name, buffer in conv_model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], buffer, msg=name)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_config, tiny_batch):
    torch.manual_seed(0)
    model = LoupeModel(conv_config(tiny_config)).train()
    inputs = _inputs(tiny_batch)
    loss, grads, saved = _loss_grads_and_saved_bytes(model, inputs)
    model.gradient_checkpointing_enable()
    checkpointed_loss, checkpointed_grads, checkpointed_saved = _loss_grads_and_saved_bytes(
        model, inputs
    )
    torch.testing.assert_close(checkpointed_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert checkpointed_saved < 0.7 * saved


def test_full_loupe_trains_on_the_convolutional_tower(tiny_config, processor):
    config = conv_config(tiny_config)
    config.shapley_num_samples = config.shapley_token_num_samples = 4  # fast
    torch.manual_seed(0)
    model = LoupeForPreTraining(config).train()
    samples = [generate_sample(index) for index in range(4)]
    batch = processor(
        images=[sample["image"] for sample in samples],
        text=[sample["caption"] for sample in samples],
        phrase_spans=[sample["objects"]["phrase_span"] for sample in samples],
    )
    output = model(**batch)
    output.loss.backward()
    for name in ("cmc_loss", "tsa_loss", "fsa_loss"):
        value = getattr(output, name)
        assert torch.isfinite(value) and value > 0, name
    first_conv = next(p for p in model.loupe.vision_model.backbone.parameters())
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
