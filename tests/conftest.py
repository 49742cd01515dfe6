"""Shared fixtures: tiny models, an offline tokenizer and processor, built once per session."""

from __future__ import annotations

import pytest
import torch

from loupe_hf import (
    LoupeConfig,
    LoupeImageProcessor,
    LoupeModel,
    LoupeProcessor,
    train_wordpiece_tokenizer,
)

CAPTIONS = [
    "a small red star to the left of a large blue circle",
    "a photo of a green hexagon and a yellow triangle",
    "there is a purple square above an orange diamond",
    "a large pink heart on a striped background",
    "a cyan cross, a brown pentagon and a white ring",
    "an image of a red circle.",
]


@pytest.fixture(scope="session")
def tokenizer():
    return train_wordpiece_tokenizer(CAPTIONS * 4, vocab_size=256, model_max_length=64)


@pytest.fixture(scope="session")
def tiny_config(tokenizer) -> LoupeConfig:
    # The Swin: the paper's tower family; the convolutional tower of `tiny` has its own tests.
    return LoupeConfig.from_preset("tiny-swin", text_config={"vocab_size": len(tokenizer)})


@pytest.fixture(scope="session")
def processor(tokenizer, tiny_config) -> LoupeProcessor:
    size = tiny_config.vision_config.image_size
    image_processor = LoupeImageProcessor(size={"height": size, "width": size})
    return LoupeProcessor(image_processor=image_processor, tokenizer=tokenizer)


@pytest.fixture()
def tiny_model(tiny_config) -> LoupeModel:
    torch.manual_seed(0)
    return LoupeModel(tiny_config).eval()


@pytest.fixture()
def tiny_batch(processor):
    """Two random RGB images and two captions, processed."""
    generator = torch.Generator().manual_seed(0)
    images = [
        (torch.rand(3, 96, 80, generator=generator) * 255).to(torch.uint8).numpy() for _ in range(2)
    ]
    return processor(images=images, text=CAPTIONS[:2])


@pytest.fixture(autouse=True)
def _autograd_left_on():
    """Fails the test that leaves autograd switched off (e.g. a script's `main` run in-process),
    instead of the unrelated tests that would then fail after it."""
    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("the test left autograd disabled (torch.set_grad_enabled(False))")
