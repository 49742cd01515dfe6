"""Model cards and publishing to a (loopback) Hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from loupe_hf import LoupeConfig, LoupeForZeroShotDetection
from loupe_hf.model_card import (
    MeasuredResult,
    preset_name,
    render_model_card,
    results_from_ablation,
    results_from_synthetic_report,
)

from .loopback_hub import LoopbackHub

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Imports the uploaded Space's module as the app does (its folder first on the path).
SPACE_IMPORT_SCRIPT = (
    "import sys; sys.path.insert(0, sys.argv[1]); import loupe_space, loupe_hf; "
    "print(loupe_hf.__file__)"
)
REPORT = {
    "split": "validation",
    "detection": {"mAP@0.3": 0.25, "mAP@0.5": 0.125},
    "grounding": {"accuracy": 0.5},
    "retrieval": {"i2t_R@1": 0.75, "t2i_R@1": 0.625},
}


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_card_front_matter_has_the_hub_fields_and_a_model_index():
    card = render_model_card(
        LoupeConfig.from_preset("tiny"), results_from_synthetic_report(REPORT), repo_id="me/x"
    )
    meta = _front_matter(card)
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "zero-shot-object-detection" and "loupe" in meta["tags"]
    index = meta["model-index"][0]["results"]
    values = {(r["task"]["type"], m["type"]): m["value"] for r in index for m in r["metrics"]}
    assert values[("zero-shot-object-detection", "mAP@0.5")] == 0.125
    assert values[("visual-grounding", "accuracy@IoU0.5")] == 0.5
    assert values[("image-text-retrieval", "text-to-image R@1")] == 0.625
    assert 'pipeline("zero-shot-object-detection", model="me/x")' in card


def test_card_describes_the_checkpoint_it_was_rendered_from():
    config = LoupeConfig.from_preset("tiny", use_unsil=False)
    card = render_model_card(
        config, num_parameters=2_000_000, training={"steps": 7}, ablation_table="| a |\n|---|"
    )
    assert "Preset: tiny; 2.00M parameters" in card and "CMC + TSA + FSA." in card
    assert "- steps: 7" in card and "## Small-scale ablation" in card
    assert "No evaluation results" in card and "model-index" not in card


@pytest.mark.parametrize(
    ("overrides", "objectives"),
    [
        ({}, "CMC + TSA + FSA + UNSIL for the token-level (TSA) labels."),
        (
            {"unsil_levels": ["token", "semantic"]},
            "CMC + TSA + FSA + UNSIL for the token-level (TSA) and semantics-level (FSA) labels.",
        ),
        ({"use_tsa": False, "unsil_levels": ["token"]}, "CMC + FSA."),
        ({"use_tsa": False, "use_fsa": False, "use_unsil": False}, "CMC."),
    ],
)
def test_card_names_the_objectives_and_the_labels_unsil_supplied(overrides, objectives):
    card = render_model_card(LoupeConfig.from_preset("tiny", **overrides))
    assert f"- Objectives: {objectives}\n" in card


@pytest.mark.parametrize(
    ("pooling", "phrase"),
    [("max", "pools image tokens by max"), ("mean", "pools image tokens by mean")],
)
def test_card_limitations_follow_the_checkpoints_image_pooling(pooling, phrase):
    card = render_model_card(LoupeConfig.from_preset("tiny", image_pooling=pooling))
    limitations = card.split("## Limitations")[1].split("## Citation")[0]
    assert phrase in limitations and "inverted" in limitations


def test_preset_detection():
    assert preset_name(LoupeConfig.from_preset("paper")) == "paper"
    assert preset_name(LoupeConfig.from_preset("tiny", text_config={"vocab_size": 123})) == "tiny"
    assert preset_name(LoupeConfig.from_preset("tiny", vision_config={"embed_dim": 24})) is None


def test_results_from_an_ablation_row():
    ablation = {"results": {"loupe": {"splits": {"validation": {
        "mAP@0.3": 0.3, "mAP@0.5": 0.2, "grounding_acc": 0.1, "i2t_R@1": 0.4, "t2i_R@1": 0.5}}}}}  # fmt: skip
    results = results_from_ablation(ablation)
    assert (
        MeasuredResult(
            "visual-grounding", "loupe-hf/synthetic-shapes", "validation", "accuracy@IoU0.5", 0.1
        )
        in results
    )
    assert len(results) == 5


DOWNLOAD_SCRIPT = """
import sys, torch, loupe_hf
from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor
model = AutoModelForZeroShotObjectDetection.from_pretrained("tester/loupe-card").eval()
processor = AutoProcessor.from_pretrained("tester/loupe-card")
reference = torch.load(sys.argv[1])
with torch.no_grad():
    logits = model(**reference["inputs"]).logits
torch.testing.assert_close(logits, reference["logits"], rtol=1e-5, atol=1e-5)
print("downloaded-ok", type(model).__name__, type(processor).__name__)
"""


def _hub_env(hub: LoopbackHub, home) -> dict:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    env.update(
        {
            "HF_ENDPOINT": hub.url,
            "HF_TOKEN": "dummy-token",
            "HF_HOME": str(home),
            "PYTHONPATH": REPO,
        }
    )
    return env


@pytest.mark.slow
def test_push_script_uploads_checkpoint_card_and_space_that_load_back(
    tmp_path, tiny_config, processor
):
    config = LoupeConfig.from_dict(tiny_config.to_dict())
    config.set_prompt_template(processor.tokenizer)
    model = LoupeForZeroShotDetection(config).eval()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    (tmp_path / "metrics.json").write_text(json.dumps(REPORT))
    inputs = processor(
        images=[torch.zeros(3, 32, 32, dtype=torch.uint8).numpy()], text=["star", "circle"]
    )
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.save({"inputs": dict(inputs), "logits": logits}, tmp_path / "reference.pt")
    with LoopbackHub(tmp_path / "hub") as hub:
        env = _hub_env(hub, tmp_path / "home")
        command = [sys.executable, os.path.join(REPO, "examples", "push_to_hub.py"), "--checkpoint", str(checkpoint),
                   "--repo_id", "tester/loupe-card", "--evaluation", str(tmp_path / "metrics.json"),
                   "--space_repo_id", "tester/loupe-space"]  # fmt: skip
        pushed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert pushed.returncode == 0, pushed.stderr[-4000:]
        repo = hub.repo_dir("tester/loupe-card")
        assert {"config.json", "model.safetensors", "README.md", "modeling_loupe.py"} <= {
            p.name for p in repo.iterdir()
        }
        meta = _front_matter((repo / "README.md").read_text())
        assert meta["model-index"][0]["results"]
        space = hub.repo_dir("tester/loupe-space", "space")
        assert (space / "app.py").is_file() and (space / "README.md").is_file()
        # The uploaded Space imports its own copy of the package, not an installed one.
        started = subprocess.run(
            [sys.executable, "-c", SPACE_IMPORT_SCRIPT, str(space)],
            env={k: v for k, v in env.items() if k != "PYTHONPATH"},
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr[-4000:]
        assert started.stdout.strip().endswith(str(space / "loupe_hf" / "__init__.py"))
        downloaded = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(DOWNLOAD_SCRIPT), str(tmp_path / "reference.pt")],
            env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )  # fmt: skip
        assert downloaded.returncode == 0, downloaded.stderr[-4000:]
        assert "downloaded-ok LoupeForZeroShotDetection LoupeProcessor" in downloaded.stdout
        assert any(method == "GET" and "/resolve/" in path for method, path in hub.requests)


def _decoyed_folder(root, names):
    """A folder with the given files plus the secrets a user might keep beside them."""
    root.mkdir(parents=True)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"content of {name}")
    for decoy in (
        ".env",
        "id_rsa",
        "training_args.bin",
        "notes/plan.txt",
        "checkpoint-2/model.safetensors",
    ):
        (root / decoy).parent.mkdir(parents=True, exist_ok=True)
        (root / decoy).write_text("SECRET hf_decoy_token")
    return root


def test_model_and_space_uploads_take_only_their_allow_lists(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import HfApi

    from loupe_hf.hub import upload_model_folder, upload_space_folder

    # The suite runs offline; this test talks to its own loopback Hub only.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    model_files = [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "README.md",
        "modeling_loupe.py",
    ]
    space_files = [
        "app.py",
        "loupe_space.py",
        "requirements.txt",
        "README.md",
        "examples/shapes.png",
    ]
    model_folder = _decoyed_folder(tmp_path / "model", model_files)
    space_folder = _decoyed_folder(tmp_path / "space", space_files)
    with LoopbackHub(tmp_path / "hub") as hub:
        api = HfApi(endpoint=hub.url, token="hf_test")
        api.create_repo("tester/model", exist_ok=True)
        upload_model_folder(api, "tester/model", model_folder, commit_message="model")
        api.create_repo("tester/space", repo_type="space", space_sdk="gradio", private=True)
        upload_space_folder(api, "tester/space", space_folder, commit_message="space")
        uploaded = {commit["repo_type"]: sorted(commit["files"]) for commit in hub.commits}
        visibility = [r.get("visibility") for r in hub.created if r.get("type") == "space"]
    assert uploaded["model"] == sorted(model_files)
    import loupe_hf

    package = sorted(
        f"loupe_hf/{path.relative_to(Path(loupe_hf.__file__).parent).as_posix()}"
        for path in Path(loupe_hf.__file__).parent.rglob("*.py")
    )
    assert uploaded["space"] == sorted(space_files + package)  # the app imports this copy
    assert visibility == ["private"]
