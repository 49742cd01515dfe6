"""Every part of LOUPE on every available device: the Shapley estimators, the pre-training step
(all four ablation rows, both image poolings), detection and grounding. `cpu` always runs; `cuda`
runs where a GPU is present (CI has none: those cases skip, naming why) and must agree with the
CPU where the computation is deterministic."""

from __future__ import annotations

import copy

import pytest
import torch

from loupe_hf import LoupeForPreTraining, LoupeForZeroShotDetection
from loupe_hf.shapley import region_phrase_interactions, semantic_game

CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not CUDA, reason="no CUDA device here; run on a GPU machine"),
    ),
]
ROWS = {
    "backbone": {"use_tsa": False, "use_fsa": False, "use_unsil": False},
    "tsa": {"use_tsa": True, "use_fsa": False, "use_unsil": False},
    "tsa_fsa": {"use_tsa": True, "use_fsa": True, "use_unsil": False},
    "loupe": {"use_tsa": True, "use_fsa": True, "use_unsil": True, "unsil_warmup_steps": 0},
}


def _semantic_game(device: str):
    generator = torch.Generator().manual_seed(0)
    regions = torch.nn.functional.normalize(torch.randn(2, 3, 8, generator=generator), dim=-1)
    phrases = torch.nn.functional.normalize(torch.randn(2, 2, 8, generator=generator), dim=-1)
    mask = torch.tensor([[True, True], [True, False]])
    return semantic_game(regions.to(device), phrases.to(device), mask.to(device), temperature=0.1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["uniform", "antithetic", "stratified"])
def test_sampled_estimators_run_on_the_device_with_a_generator_there(device, method):
    generator = torch.Generator(device=device).manual_seed(1)
    estimate = region_phrase_interactions(
        _semantic_game(device), num_samples=40, method=method, generator=generator
    )
    assert estimate.values.device.type == device and torch.isfinite(estimate.values).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["uniform", "antithetic", "stratified"])
def test_sampled_estimators_agree_with_the_cpu_given_the_same_draws(device, method):
    # A CPU generator gives the same coalitions on every device: the values must then agree.
    results = []
    for where in ("cpu", device):
        estimate = region_phrase_interactions(
            _semantic_game(where),
            num_samples=40,
            method=method,
            generator=torch.Generator().manual_seed(1),
        )
        results.append(estimate.values.cpu())
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_exact_interactions_agree_with_the_cpu(device):
    values = [
        region_phrase_interactions(_semantic_game(where), num_samples=None).values.cpu()
        for where in ("cpu", device)
    ]
    torch.testing.assert_close(values[1], values[0], rtol=1e-5, atol=1e-6)


def _batch(processor, device: str) -> dict[str, torch.Tensor]:
    from loupe_hf.data import generate_sample

    samples = [generate_sample(index, split="train") for index in range(4)]
    batch = processor(
        images=[s["image"] for s in samples],
        text=[s["caption"] for s in samples],
        phrase_spans=[[tuple(span) for span in s["objects"]["phrase_span"]] for s in samples],
    )
    return {name: value.to(device) for name, value in batch.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pooling", ["mean", "max"])
@pytest.mark.parametrize("row", list(ROWS))
def test_pretraining_step_runs_on_the_device(device, pooling, row, tiny_config, processor):
    config = copy.deepcopy(tiny_config)
    for name, value in {**ROWS[row], "image_pooling": pooling, "shapley_num_samples": 6}.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    model = LoupeForPreTraining(config).to(device).train()
    out = model(**_batch(processor, device))
    out.loss.backward()
    assert out.loss.device.type == device and torch.isfinite(out.loss)
    for name in ("cmc_loss", "tsa_loss", "fsa_loss", "unsil_loss"):
        assert torch.isfinite(out[name]), name
    assert (out.tsa_loss > 0) == config.use_tsa
    grads = [p.grad for p in model.loupe.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("device", DEVICES)
def test_backbone_loss_agrees_with_the_cpu(device, tiny_config, processor):
    config = copy.deepcopy(tiny_config)
    for name, value in ROWS["backbone"].items():
        setattr(config, name, value)
    torch.manual_seed(0)
    model = LoupeForPreTraining(config).eval()
    losses = []
    for where in ("cpu", device):
        with torch.no_grad():
            losses.append(model.to(where)(**_batch(processor, where)).loss.cpu())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_detection_and_grounding_agree_with_the_cpu(device, tiny_config, processor):
    from loupe_hf.data import generate_sample

    config = copy.deepcopy(tiny_config)
    config.set_prompt_template(processor.tokenizer)
    torch.manual_seed(0)
    detector = LoupeForZeroShotDetection(config).eval()
    image = generate_sample(0, split="validation")["image"]
    found, grounded = [], []
    for where in ("cpu", device):
        detector.to(where)
        found.append(detector.detect([image], ["circle", "star"], processor, threshold=0.0)[0])
        grounded.append(detector.ground([image], ["the circle"], processor)[0])
    assert found[1]["boxes"].device.type == device
    torch.testing.assert_close(found[1]["scores"].cpu(), found[0]["scores"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(found[1]["boxes"].cpu(), found[0]["boxes"], rtol=1e-4, atol=1e-3)
    assert grounded[1]["region_index"] == grounded[0]["region_index"]


@pytest.mark.parametrize("device", DEVICES)
def test_synthetic_evaluation_runs_on_the_device_and_agrees_with_the_cpu(
    device, tiny_config, processor
):
    from loupe_hf.data import generate_sample
    from loupe_hf.evaluation.runners import (
        evaluate_synthetic_detection,
        evaluate_synthetic_grounding,
        evaluate_synthetic_retrieval,
        pointing_game,
    )

    samples = [generate_sample(index, split="validation") for index in range(6)]
    torch.manual_seed(0)
    model = LoupeForPreTraining(copy.deepcopy(tiny_config)).loupe.eval()
    reports = []
    for where in ("cpu", device):
        model.to(where)
        reports.append(
            {
                **evaluate_synthetic_retrieval(model, processor, samples),
                **evaluate_synthetic_detection(model, processor, samples),
                **evaluate_synthetic_grounding(model, processor, samples),
                **pointing_game(model, processor, samples),
            }
        )
    for name, value in reports[0].items():
        if isinstance(value, float):
            assert reports[1][name] == pytest.approx(value, abs=1e-4), name
