"""A checkpoint saved by older code (commit 489bd57, before the package re-layout) still loads and
gives the outputs that code gave: `tests/fixtures/legacy_checkpoint/`, written by
`tests/fixtures/make_legacy_checkpoint.py`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loupe_hf import LoupeForPreTraining, LoupeForZeroShotDetection, LoupeModel, LoupeProcessor

LEGACY = Path(__file__).parent / "fixtures" / "legacy_checkpoint"
CAPTIONS = [
    "a small red star to the left of a large blue circle",
    "a green hexagon above a yellow triangle",
    "there is a purple square and an orange diamond",
    "a large pink heart",
]
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(LEGACY / "expected_outputs.safetensors")


def _inputs(expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = ("pixel_values", "input_ids", "attention_mask", "token_type_ids", "phrase_masks")
    return {name: expected[f"input.{name}"] for name in names}


def test_legacy_model_gives_the_old_outputs(expected):
    model = LoupeModel.from_pretrained(LEGACY).eval()
    with torch.no_grad():
        out = model(**_inputs(expected))
    compared = [name.split(".", 1)[1] for name in expected if name.startswith("model.")]
    assert len(compared) == 8
    for name in compared:
        torch.testing.assert_close(out[name], expected[f"model.{name}"], **TOLERANCE, msg=name)


def test_legacy_detector_gives_the_old_logits_and_boxes(expected):
    # Since 2026-12-07 the reported boxes are refined by confidence (`box_refinement_iou`, 0.3 when
    # the config does not say); 1.0 keeps the proposed boxes, what the old code reported.
    detector = LoupeForZeroShotDetection.from_pretrained(LEGACY, box_refinement_iou=1.0).eval()
    with torch.no_grad():
        out = detector(
            pixel_values=expected["input.pixel_values"][:1],
            input_ids=expected["input.query_ids"],
            attention_mask=expected["input.query_mask"],
        )
    torch.testing.assert_close(out.logits, expected["detection.logits"], **TOLERANCE)
    torch.testing.assert_close(out.pred_boxes, expected["detection.pred_boxes"], **TOLERANCE)


def test_legacy_pretraining_checkpoint_gives_the_old_losses(expected):
    """The CMC loss is deterministic and still the value the old code wrote. TSA, FSA and UNSIL
    depend on the sampled interaction labels, whose draws changed on 2026-11-28 (keyed by the
    global sample index, so that several processes draw what one does): their values (and the
    total) were re-recorded then, from this same checkpoint."""
    model = LoupeForPreTraining.from_pretrained(LEGACY).eval()
    with torch.no_grad():
        out = model(**_inputs(expected))
    for name in ("loss", "cmc_loss", "tsa_loss", "fsa_loss", "unsil_loss"):
        old = expected[f"pretraining.{name}"][0]
        assert old > 0, name  # every objective was on when the fixture was written
        torch.testing.assert_close(out[name], old, **TOLERANCE, msg=name)


def test_legacy_processor_tokenises_as_before(expected):
    processor = LoupeProcessor.from_pretrained(LEGACY)
    batch = processor(text=CAPTIONS)
    assert torch.equal(batch["input_ids"], expected["input.input_ids"])


def test_legacy_checkpoint_loads_with_its_own_code_without_loupe_hf(tmp_path, expected):
    script = textwrap.dedent(
        f"""
        import sys, torch
        from safetensors.torch import load_file
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(LEGACY)!r}, trust_remote_code=True).eval()
        assert "loupe_hf" not in sys.modules, "the package was imported"
        expected = load_file({str(LEGACY / "expected_outputs.safetensors")!r})
        names = ("pixel_values", "input_ids", "attention_mask", "token_type_ids", "phrase_masks")
        with torch.no_grad():
            out = model(**{{name: expected["input." + name] for name in names}})
        torch.testing.assert_close(out.region_embeds, expected["model.region_embeds"])
        print("legacy-remote-code-ok")
        """
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "legacy-remote-code-ok" in result.stdout


def _copy(tmp_path):
    import shutil

    target = tmp_path / "checkpoint"
    shutil.copytree(LEGACY, target)
    return target


def test_a_checkpoint_without_its_tokenizer_files_is_refused_by_name(tmp_path):
    from transformers import AutoProcessor

    checkpoint = _copy(tmp_path)
    (checkpoint / "tokenizer.json").unlink()
    for load in (LoupeProcessor.from_pretrained, AutoProcessor.from_pretrained):
        with pytest.raises(OSError, match=r"no tokenizer file \(tokenizer\.json or vocab\.txt\)"):
            load(checkpoint)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_with_non_finite_values_are_refused_unless_allowed(tmp_path, bad):
    from safetensors.torch import save_file

    checkpoint = _copy(tmp_path)
    weights = load_file(checkpoint / "model.safetensors")
    name = next(key for key in weights if key.endswith("visual_projection.weight"))
    weights[name][0, 0] = bad
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        OSError, match=r"NaN or infinite values in 1 weight\(s\): .*visual_projection"
    ):
        LoupeModel.from_pretrained(checkpoint)
    with pytest.raises(OSError, match="NaN or infinite"):
        LoupeForZeroShotDetection.from_pretrained(checkpoint)
    model = LoupeModel.from_pretrained(checkpoint, allow_non_finite_weights=True)
    assert not torch.isfinite(model.visual_projection.weight).all()
