"""Checkpoints: safetensors round trips with identical outputs, Auto classes and remote code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForZeroShotObjectDetection,
    AutoProcessor,
)

from loupe_hf import (
    LoupeConfig,
    LoupeForZeroShotDetection,
    LoupeImageProcessor,
    LoupeImageProcessorTorchvision,
    LoupeModel,
    LoupeProcessor,
)

COMPARED_OUTPUTS = (
    "logits_per_image",
    "patch_tokens",
    "word_tokens",
    "region_boxes",
    "region_embeds",
)


@pytest.fixture()
def checkpoint(tmp_path, tiny_model, processor):
    path = tmp_path / "checkpoint"
    tiny_model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _outputs(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return {name: out[name] for name in COMPARED_OUTPUTS}


def test_checkpoint_is_safetensors_with_code_and_auto_map(checkpoint):
    files = set(os.listdir(checkpoint))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    assert {"configuration_loupe.py", "modeling_loupe.py", "processing_loupe.py"} <= files
    auto_map = json.loads((checkpoint / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_loupe.LoupeModel"
    assert (
        auto_map["AutoModelForZeroShotObjectDetection"]
        == "modeling_loupe.LoupeForZeroShotDetection"
    )


def test_round_trip_gives_identical_outputs(checkpoint, tiny_model, tiny_batch):
    # Outputs, not state dicts: timm's non-persistent buffers are not in the checkpoint and must be
    # re-created when transformers materialises the model from the meta device.
    reloaded = LoupeModel.from_pretrained(checkpoint).eval()
    expected, actual = _outputs(tiny_model, tiny_batch), _outputs(reloaded, tiny_batch)
    for name in COMPARED_OUTPUTS:
        # Equal up to float rounding: a reloaded (memory-mapped) weight may take another SIMD path.
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_model_made_fsdp_shardable_computes_the_same_and_saves_its_scale_as_a_scalar(
    tmp_path, tiny_model, tiny_batch
):
    tiny_model.eval()
    with torch.no_grad():
        tiny_model.logit_scale.add_(0.5)  # a trained value, so that the reload shows it kept it
        expected = _outputs(tiny_model, tiny_batch)
    tiny_model.make_fsdp_shardable()
    assert tiny_model.logit_scale.shape == (1,)  # FSDP shards no 0-d parameter
    actual = _outputs(tiny_model, tiny_batch)
    for name in COMPARED_OUTPUTS:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)
    tiny_model.save_pretrained(tmp_path)
    reloaded = LoupeModel.from_pretrained(tmp_path)
    assert reloaded.logit_scale.shape == ()
    assert float(reloaded.logit_scale) == float(tiny_model.logit_scale)


def test_detection_model_loads_the_base_checkpoint(checkpoint, tiny_model, tiny_batch):
    # the pre-training regions as they are (no refinement, `num_regions` of them)
    proposals = {"box_refinement_iou": 1.0, "detection_num_regions": None}
    detector = LoupeForZeroShotDetection.from_pretrained(checkpoint, **proposals).eval()
    with torch.no_grad():
        detected = detector(**tiny_batch)
        base = tiny_model(**tiny_batch)
    torch.testing.assert_close(detected.pred_boxes, base.region_boxes, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(detected.region_embeds, base.region_embeds, rtol=1e-5, atol=1e-6)


def test_detection_checkpoint_round_trips(tmp_path, tiny_config, tiny_batch):
    detector = LoupeForZeroShotDetection(tiny_config).eval()
    detector.save_pretrained(tmp_path)
    reloaded = LoupeForZeroShotDetection.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**tiny_batch).logits, detector(**tiny_batch).logits, rtol=1e-5, atol=1e-5
        )


def test_auto_classes_resolve_model_type_loupe(checkpoint):
    assert isinstance(AutoConfig.from_pretrained(checkpoint), LoupeConfig)
    assert isinstance(AutoModel.from_pretrained(checkpoint), LoupeModel)
    assert isinstance(
        AutoModelForZeroShotObjectDetection.from_pretrained(checkpoint), LoupeForZeroShotDetection
    )
    # transformers prefers the torchvision backend when torchvision is installed (it is here).
    assert isinstance(
        AutoImageProcessor.from_pretrained(checkpoint), LoupeImageProcessorTorchvision
    )
    assert isinstance(
        AutoImageProcessor.from_pretrained(checkpoint, backend="pil"), LoupeImageProcessor
    )
    assert isinstance(AutoProcessor.from_pretrained(checkpoint), LoupeProcessor)
    assert isinstance(AutoModel.from_config(LoupeConfig.from_preset("tiny")), LoupeModel)


def test_trust_remote_code_loads_in_a_process_that_never_imported_loupe_hf(
    checkpoint, tiny_model, tiny_batch
):
    expected = _outputs(tiny_model, tiny_batch)
    torch.save(
        {"batch": dict(tiny_batch), "expected": expected}, checkpoint.parent / "reference.pt"
    )
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModel, AutoModelForZeroShotObjectDetection, AutoProcessor
        path = {str(checkpoint)!r}
        model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        detector = AutoModelForZeroShotObjectDetection.from_pretrained(path, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        assert "loupe_hf" not in sys.modules, "the package was imported"
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        reference = torch.load({str(checkpoint.parent / "reference.pt")!r})
        with torch.no_grad():
            out = model(**reference["batch"])
        for name, tensor in reference["expected"].items():
            torch.testing.assert_close(out[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
        print("remote-code-ok", type(detector).__name__, type(processor).__name__)
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(checkpoint.parent / "modules")
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=checkpoint.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote-code-ok LoupeForZeroShotDetection LoupeProcessor" in result.stdout


def test_missing_weights_file_is_reported(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(OSError, match=r"model\.safetensors"):
        LoupeModel.from_pretrained(checkpoint)


def test_mismatched_checkpoint_shapes_are_refused(checkpoint, tiny_config):
    narrower = LoupeConfig.from_dict({**tiny_config.to_dict(), "projection_dim": 64})
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        LoupeModel.from_pretrained(checkpoint, config=narrower)


def test_checkpoint_missing_some_weights_is_refused_by_name(checkpoint):
    import safetensors.torch

    weights = safetensors.torch.load_file(checkpoint / "model.safetensors")
    del weights["region_head.out.weight"]
    safetensors.torch.save_file(
        weights, checkpoint / "model.safetensors", metadata={"format": "pt"}
    )
    with pytest.raises(OSError, match=r"lacks 1 weight\(s\) of LoupeModel: region_head.out.weight"):
        LoupeModel.from_pretrained(checkpoint)
    _, info = LoupeModel.from_pretrained(
        checkpoint, allow_missing_weights=True, output_loading_info=True
    )
    assert set(info["missing_keys"]) == {"region_head.out.weight"}


def test_export_model_folder_copies_only_the_model_and_replaces_the_target(checkpoint, tmp_path):
    from loupe_hf.hub import export_model_folder

    training = tmp_path / "training"
    shutil.copytree(checkpoint, training)
    for decoy in ("training_args.bin", "optimizer.pt", ".env"):
        (training / decoy).write_text("secret")
    (training / "checkpoint-2").mkdir()
    (training / "checkpoint-2" / "model.safetensors").write_text("old")
    target = tmp_path / "final"
    target.mkdir()
    (target / "stale.txt").write_text("from an earlier export")

    export_model_folder(training, target)
    names = {path.name for path in target.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not names & {"training_args.bin", "optimizer.pt", ".env", "checkpoint-2", "stale.txt"}
    assert isinstance(LoupeModel.from_pretrained(target), LoupeModel)
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".final.")]
    with pytest.raises(FileNotFoundError, match="not a saved model"):
        export_model_folder(training / "checkpoint-2", tmp_path / "other")
