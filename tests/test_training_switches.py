"""The usual transformers training switches on LOUPE: activation checkpointing for both towers and a
`torch.compile`-able forward (on the CPU; the CUDA cases live in tests/test_devices.py)."""

from __future__ import annotations

import pytest
import torch

from loupe_hf import LoupeModel

INPUTS = ("pixel_values", "input_ids", "attention_mask")


def _inputs(batch) -> dict[str, torch.Tensor]:
    return {key: batch[key] for key in INPUTS}


def _loss_grads_and_saved_bytes(model: LoupeModel, inputs) -> tuple[torch.Tensor, dict, int]:
    """The CMC loss, every parameter's gradient and the bytes autograd kept for the backward pass
    outside checkpointed regions (what activation checkpointing is meant to cut)."""
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    model.zero_grad()
    torch.manual_seed(0)  # the same dropout masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**inputs, return_loss=True).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, saved


def test_gradient_checkpointing_keeps_loss_and_gradients_and_saves_less(tiny_config, tiny_batch):
    torch.manual_seed(0)
    model = LoupeModel(tiny_config).train()
    inputs = _inputs(tiny_batch)
    loss, grads, saved = _loss_grads_and_saved_bytes(model, inputs)

    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    assert all(stage.grad_checkpointing for stage in model.vision_model.swin.layers)
    assert model.text_model.encoder.layer[0].gradient_checkpointing
    checkpointed_loss, checkpointed_grads, checkpointed_saved = _loss_grads_and_saved_bytes(
        model, inputs
    )
    torch.testing.assert_close(checkpointed_loss, loss)
    assert checkpointed_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert checkpointed_saved < 0.5 * saved

    model.gradient_checkpointing_disable()
    assert not any(stage.grad_checkpointing for stage in model.vision_model.swin.layers)
    assert not model.is_gradient_checkpointing


def test_the_pretraining_model_takes_the_trainers_switch(tiny_config):
    from loupe_hf.pretraining import LoupeForPreTraining

    model = LoupeForPreTraining(tiny_config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(stage.grad_checkpointing for stage in model.loupe.vision_model.swin.layers)


def _compiled_matches_eager(model: LoupeModel, inputs, backend: str) -> None:
    with torch.no_grad():
        eager = model(**inputs)
        compiled = torch.compile(model, backend=backend)(**inputs)
    torch.testing.assert_close(compiled.logits_per_image, eager.logits_per_image)
    torch.testing.assert_close(compiled.region_embeds, eager.region_embeds)
    assert torch.equal(compiled.region_indices, eager.region_indices)


def test_forward_compiles_and_matches_eager(tiny_model, tiny_batch):
    """Graph capture and AOT autograd (TorchDynamo + `aot_eager`), without a C compiler."""
    torch._dynamo.reset()
    _compiled_matches_eager(tiny_model, _inputs(tiny_batch), "aot_eager")


@pytest.mark.slow
def test_forward_compiles_with_inductor_and_matches_eager(tiny_model, tiny_batch):
    """The default backend: generated C++ kernels (about 40 s to compile on 2 CPU cores)."""
    torch._dynamo.reset()
    _compiled_matches_eager(tiny_model, _inputs(tiny_batch), "inductor")


# --- mixed precision: interaction labels stay float32 ------------------------------------------------


@pytest.fixture(scope="module")
def pretraining_batch(processor):
    from loupe_hf.data import generate_sample

    samples = [generate_sample(index) for index in range(4)]
    return processor(
        images=[sample["image"] for sample in samples],
        text=[sample["caption"] for sample in samples],
        phrase_spans=[sample["objects"]["phrase_span"] for sample in samples],
    )


def _sampling_model(tiny_config):
    from loupe_hf import LoupeConfig
    from loupe_hf.pretraining import LoupeForPreTraining

    torch.manual_seed(0)
    overrides = {"use_unsil": False, "num_regions": 6, "shapley_num_samples": 64}
    return LoupeForPreTraining(LoupeConfig.from_dict({**tiny_config.to_dict(), **overrides})).eval()


def _labels(model, batch, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw TSA and FSA labels of one batch, the whole forward run under bf16 autocast or not."""
    inputs = {key: batch[key] for key in (*INPUTS, "phrase_masks")}
    with (
        torch.no_grad(),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
    ):
        out = model.loupe(**inputs)
        placement = model.batch_placement(
            len(inputs["input_ids"]), len(inputs["input_ids"]), out.image_embeds.device
        )
        _, token = model.token_level(
            out, inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], placement
        )
        _, semantic = model.semantic_level(out, inputs["phrase_masks"], placement)
    return token.raw, semantic.raw


def test_labels_are_computed_in_float32_under_bf16_autocast(tiny_config, pretraining_batch):
    """Given the same tokens, the games ignore the caller's autocast: labels are bit-identical."""
    model = _sampling_model(tiny_config)
    inputs = {key: pretraining_batch[key] for key in (*INPUTS, "phrase_masks")}
    with torch.no_grad():
        out = model.loupe(**inputs)
    placement = model.batch_placement(4, 4, out.image_embeds.device)
    results = []
    for autocast in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, token = model.token_level(
                out,
                inputs["pixel_values"],
                inputs["input_ids"],
                inputs["attention_mask"],
                placement,
            )
            _, semantic = model.semantic_level(out, inputs["phrase_masks"], placement)
        results.append((token.raw, semantic.raw))
    for fp32, bf16 in zip(*results, strict=True):
        assert bf16.dtype == torch.float32
        assert torch.equal(bf16, fp32)


def test_bf16_training_labels_follow_the_fp32_ones(tiny_config, pretraining_batch):
    """A whole bf16 forward changes the tokens by bf16 rounding; the labels computed from them stay
    close to the float32 ones (same coalitions, same step).

    A token-level (TSA) label is a difference of near-equal coalition values, so the tokens' three
    significant digits show in it: with the packages PyPI gave on 2026-12-08 (torch 2.14.1, timm
    1.0.31, transformers 5.25.0) their correlation with the float32 labels was 0.83-0.96 and their
    mean error 0.14-0.30 of the labels' mean size over seeds 0-2 and 6 or 16 regions (0.83 / 0.24
    for this test's seed); the FSA labels agree to 0.999. The bounds sit below that spread; labels
    computed in bf16 instead of float32 would be caught by the test above, which is exact."""
    model = _sampling_model(tiny_config)
    for fp32, bf16 in zip(
        _labels(model, pretraining_batch, autocast=False),
        _labels(model, pretraining_batch, autocast=True),
        strict=True,
    ):
        valid = fp32 != 0
        assert bf16.dtype == torch.float32 and valid.any()
        correlation = torch.corrcoef(torch.stack([fp32[valid], bf16[valid]]))[0, 1]
        assert correlation > 0.75, float(correlation)
        scale = fp32[valid].abs().mean()
        assert (bf16 - fp32)[valid].abs().mean() < 0.35 * scale
