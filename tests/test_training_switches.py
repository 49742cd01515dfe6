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
