"""Model cards and publishing to a (loopback) Hub."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results
from huggingface_hub.utils import validate_repo_id

from loupe_hf import LoupeConfig, LoupeForZeroShotDetection
from loupe_hf.model_card import (
    SYNTHETIC_DATASET,
    MeasuredResult,
    TrainingFacts,
    preset_name,
    render_model_card,
    results_from_ablation,
    results_from_synthetic_report,
)

from .loopback_hub import LoopbackHub

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Imports the uploaded Space's module as the app does (its folder first on the path).
# Starts the uploaded Space as a fresh environment would: the installed loupe_hf (an editable
# install's source path) is taken off sys.path, so only the Space's own copy can be imported; then
# builds the app and runs Detect and Explain on the uploaded model with the Space's own example.
SPACE_START_SCRIPT = """
import os, sys
space, model_repo, installed_source = sys.argv[1:4]
sys.path = [p for p in sys.path if os.path.realpath(p) != os.path.realpath(installed_source)]
sys.path.insert(0, space)
import app, loupe_hf, loupe_space
app.build_demo()
demo = loupe_space.LoupeDemo.from_pretrained(model_repo)
image = os.path.join(space, "examples", "shapes_13.png")
found = demo.detect(image, "star, circle, heart", threshold=0.0, top_k=3)
explained = demo.explain(image, "a white star and a brown heart", 3)
print(len(found.detections["detections"]), explained.interaction_image.size, loupe_hf.__file__)
"""
REPORT = {
    "split": "validation",
    "detection": {"mAP@0.3": 0.25, "mAP@0.5": 0.125},
    "grounding": {"accuracy": 0.5},
    "retrieval": {"i2t_R@1": 0.75, "t2i_R@1": 0.625},
}

FSA_TEXT_ONLY = "FSA (no gradient into the image tower)"  # the tiny presets' FSA


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_card_front_matter_has_the_hub_fields_and_a_model_index():
    card = render_model_card(
        LoupeConfig.from_preset("tiny"), results_from_synthetic_report(REPORT), repo_id="me/x"
    )
    meta = _front_matter(card)
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert meta["language"] == "en"
    assert meta["pipeline_tag"] == "zero-shot-object-detection" and "loupe" in meta["tags"]
    index = meta["model-index"][0]["results"]
    values = {
        (r["task"]["type"], r["task"]["name"], m["type"], m.get("config")): m["value"]
        for r in index
        for m in r["metrics"]
    }
    detection, grounding = "Zero-shot object detection", "Visual grounding"
    assert values[("zero-shot-object-detection", detection, "map_50", None)] == 0.125
    assert values[("zero-shot-object-detection", grounding, "accuracy", None)] == 0.5
    retrieval = ("zero-shot-image-classification", "Image-text retrieval", "recall_at_1")
    assert values[(*retrieval, "text-to-image")] == 0.625
    assert values[(*retrieval, "image-to-text")] == 0.75
    assert 'pipeline("zero-shot-object-detection", model="me/x")' in card


def test_card_describes_the_checkpoint_it_was_rendered_from():
    config = LoupeConfig.from_preset("tiny", use_unsil=False)
    card = render_model_card(
        config,
        num_parameters=2_000_000,
        training=TrainingFacts(steps=7),
        ablation_table="| a |\n|---|",
    )
    assert "Preset: tiny; 2.00M parameters" in card and f"CMC + TSA + {FSA_TEXT_ONLY}." in card
    assert "- Steps: 7.\n" in card and "## Small-scale ablation" in card
    assert "No evaluation results" in card and "model-index" not in card


# Task ids the Hub knows: the keys of PIPELINE_DATA in huggingface.js,
# packages/tasks/src/pipelines.ts (commit 0057f4042b57b833d296ed4cf1c76cfd6619d00d), the list
# behind https://huggingface.co/tasks and the `pipeline_tag` / `model-index` task types.
HUB_TASK_IDS = {
    "biology", "text-classification", "token-classification", "table-question-answering",
    "question-answering", "zero-shot-classification", "translation", "summarization",
    "feature-extraction", "text-generation", "text2text-generation", "fill-mask",
    "sentence-similarity", "text-to-speech", "text-to-audio", "automatic-speech-recognition",
    "audio-to-audio", "audio-classification", "audio-text-to-text", "voice-activity-detection",
    "depth-estimation", "image-classification", "object-detection", "image-segmentation",
    "text-to-image", "image-to-text", "image-to-image", "image-to-video",
    "unconditional-image-generation", "video-classification", "reinforcement-learning",
    "robotics", "tabular-classification", "tabular-regression", "tabular-to-text",
    "table-to-text", "multiple-choice", "text-ranking", "text-retrieval",
    "time-series-forecasting", "text-to-video", "image-text-to-text",
    "visual-question-answering", "document-question-answering", "zero-shot-image-classification",
    "graph-ml", "mask-generation", "zero-shot-object-detection", "text-to-3d", "image-to-3d",
    "image-feature-extraction", "video-text-to-text", "keypoint-detection",
    "visual-document-retrieval", "any-to-any", "other",
}  # fmt: skip
SLUG = re.compile(r"^[a-z0-9]+(_[a-z0-9]+)*$")
ABLATION = {"results": {"loupe": {"splits": {split: {
    "mAP@0.3": 0.3, "mAP@0.5": 0.2, "grounding_acc": 0.1, "i2t_R@1": 0.4, "t2i_R@1": 0.5}
    for split in ("validation", "compositional")}}}}  # fmt: skip


@pytest.mark.parametrize("data", ["synthetic", "someone/pairs", "pairs.csv", None])
def test_card_front_matter_is_hub_conformant(data):
    results = results_from_synthetic_report(REPORT) + results_from_ablation(ABLATION)
    card = render_model_card(
        LoupeConfig.from_preset("tiny"), results, training=TrainingFacts(data=data, steps=3)
    )
    meta = _front_matter(card)
    # huggingface_hub reads back exactly what the card holds.
    assert ModelCard(card).data.to_dict() == meta
    name, evaluations = model_index_to_eval_results(meta["model-index"])
    assert name == "LOUPE" and len(evaluations) == len(results)
    assert eval_results_to_model_index(name, evaluations) == meta["model-index"]
    assert {e.task_type for e in evaluations} <= HUB_TASK_IDS
    assert meta["pipeline_tag"] in HUB_TASK_IDS
    for evaluation in evaluations:
        assert SLUG.match(evaluation.metric_type), evaluation.metric_type
        assert evaluation.task_name and evaluation.metric_name and evaluation.dataset_name
    # Each task of each split stays its own model-index entry (grounding apart from detection).
    entries = {
        (r["task"]["name"], r["dataset"]["split"]) for r in meta["model-index"][0]["results"]
    }
    assert len(entries) == len(meta["model-index"][0]["results"]) == 6
    assert sorted(meta["metrics"]) == sorted({e.metric_type for e in evaluations})
    for dataset in meta.get("datasets", []):
        validate_repo_id(dataset)


@pytest.mark.parametrize(
    ("data", "datasets", "phrase"),
    [
        ("synthetic", None, "pairs generated by loupe-hf's built-in synthetic generator"),
        ("someone/pairs", ["someone/pairs"], "(https://huggingface.co/datasets/someone/pairs)"),
        ("pairs.csv", None, "`pairs.csv` (local files, not published on the Hub)"),
        ("shards/*.tar", None, "(local files, not published on the Hub)"),
        (None, None, "- Data: not recorded for this checkpoint."),
    ],
)
def test_card_lists_training_datasets_only_when_they_are_hub_datasets(data, datasets, phrase):
    card = render_model_card(
        LoupeConfig.from_preset("tiny"),
        results_from_synthetic_report(REPORT),
        training=TrainingFacts(data=data),
    )
    assert _front_matter(card).get("datasets") == datasets
    assert phrase in card.split("## Training data and procedure")[1].split("## Evaluation")[0]
    assert SYNTHETIC_DATASET not in card  # results name the generator, not a Hub-like id


@pytest.mark.parametrize("data", ["synthetic", "someone/pairs", None])
def test_card_synthetic_data_limitation_only_when_trained_on_it(data):
    card = render_model_card(LoupeConfig.from_preset("tiny"), training=TrainingFacts(data=data))
    limitations = card.split("## Limitations")[1].split("## Citation")[0]
    assert ("do not transfer to real photos" in limitations) == (data == "synthetic")
    assert "paper's scale" in limitations


def test_card_training_section_reads_as_sentences():
    facts = TrainingFacts(
        data="someone/pairs", steps=1200, global_batch_size=256, runtime_seconds=7500.4,
        hardware="8 × NVIDIA H200", final_loss=1.23456, final_loss_step=1190,
        learning_rate=2e-4, lr_schedule="OneCycle",
    )  # fmt: skip
    card = render_model_card(LoupeConfig.from_preset("tiny"), training=facts)
    section = card.split("## Training data and procedure\n")[1].split("\n\n## Evaluation")[0]
    assert section.splitlines()[1:] == [
        "- Steps: 1,200 at a global batch size of 256 (307,200 image–caption pairs seen).",
        "- Learning rate: 0.0002 peak, OneCycle schedule.",
        "- Training time: 2 h 05 min.",
        "- Hardware: 8 × NVIDIA H200.",
        "- Final training loss: 1.2346 (step 1,190).",
    ]
    short = render_model_card(
        LoupeConfig.from_preset("tiny"), training=TrainingFacts(steps=5, runtime_seconds=199.4)
    )
    assert "- Steps: 5.\n" in short and "- Training time: 3 min 19 s.\n" in short


def test_card_training_facts_from_a_trainer_and_back_from_its_folder(tmp_path):
    from transformers import TrainerState, TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=3,
        learning_rate=5e-4, lr_scheduler_type="cosine", use_cpu=True, report_to="none",
    )  # fmt: skip
    state = TrainerState(global_step=10, log_history=[
        {"loss": 3.0, "step": 5}, {"loss": 2.5, "step": 10},
        {"train_runtime": 75.5, "train_loss": 2.7, "step": 10}])  # fmt: skip
    facts = TrainingFacts.from_trainer(SimpleNamespace(args=args, state=state), data="synthetic")
    assert (facts.steps, facts.global_batch_size, facts.pairs_seen) == (10, 12, 120)
    assert (facts.final_loss, facts.final_loss_step, facts.runtime_seconds) == (2.5, 10, 75.5)
    assert facts.hardware.startswith("CPU (1 process,") and facts.lr_schedule == "cosine"
    assert facts.synthetic and facts.hub_dataset is None
    facts.save(tmp_path)
    assert TrainingFacts.from_folder(tmp_path) == facts
    assert TrainingFacts.from_folder(tmp_path, data="a/b").hub_dataset == "a/b"
    # Without the facts file, what trainer_state.json holds (no batch size, no hardware).
    (tmp_path / "state").mkdir()
    state.save_to_json(str(tmp_path / "state" / "trainer_state.json"))
    from_state = TrainingFacts.from_folder(tmp_path / "state", data="synthetic")
    assert from_state == TrainingFacts(
        data="synthetic", steps=10, runtime_seconds=75.5, final_loss=2.5, final_loss_step=10
    )
    assert TrainingFacts.from_folder(tmp_path / "missing") == TrainingFacts()


def test_card_of_the_trainer_is_the_card_of_the_push_script(tmp_path, tiny_config):
    from loupe_hf.pretraining import LoupeForPreTraining, LoupeTrainer, LoupeTrainingArguments

    args = LoupeTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = LoupeTrainer(model=LoupeForPreTraining(tiny_config), args=args)
    trainer.state.global_step = 3
    trainer.state.log_history = [{"loss": 4.5, "step": 3}, {"train_runtime": 9.0, "step": 3}]
    trainer.save_model()
    (tmp_path / "evaluation.json").write_text(json.dumps(REPORT))
    trainer.create_model_card(model_name="LOUPE test", training_data="synthetic")
    trainer_card = (tmp_path / "README.md").read_text()

    push = _push_script()
    options = argparse.Namespace(
        checkpoint=str(tmp_path), evaluation=str(tmp_path / "evaluation.json"), ablation=None,
        ablation_table=None, model_name="LOUPE test", repo_id=None,
    )  # fmt: skip
    model = LoupeForZeroShotDetection.from_pretrained(tmp_path)
    assert push.card_for(options, model) == trainer_card
    meta = _front_matter(trainer_card)
    assert meta["model-index"][0]["name"] == "LOUPE test" and "datasets" not in meta
    assert "do not transfer to real photos" in trainer_card and "- Steps: 3 at" in trainer_card
    parameters = sum(p.numel() for p in model.loupe.parameters())
    assert f"{parameters / 1e6:.2f}M parameters" in trainer_card


def _push_script():
    spec = importlib.util.spec_from_file_location(
        "push_to_hub", os.path.join(REPO, "examples", "push_to_hub.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("overrides", "objectives"),
    [
        ({}, f"CMC + TSA + {FSA_TEXT_ONLY} + UNSIL for the token-level (TSA) labels."),
        (
            {"unsil_levels": ["token", "semantic"], "fsa_image_gradient": True},
            "CMC + TSA + FSA + UNSIL for the token-level (TSA) and semantics-level (FSA) labels.",
        ),
        ({"use_tsa": False, "unsil_levels": ["token"]}, f"CMC + {FSA_TEXT_ONLY}."),
        ({"use_tsa": False, "use_fsa": False, "use_unsil": False}, "CMC."),
    ],
)
def test_card_names_the_objectives_and_the_labels_unsil_supplied(overrides, objectives):
    card = render_model_card(LoupeConfig.from_preset("tiny", **overrides))
    assert f"- Objectives: {objectives}\n" in card


@pytest.mark.parametrize(
    ("preset", "line"),
    [
        ("tiny", "- Image tower: timm resnet10t (from scratch), 64 px, 8x8 patch tokens."),
        ("tiny-swin", "- Image tower: timm Swin, 64 px, patch 4, embed 48,"),
    ],
)
def test_card_names_the_image_tower(preset, line):
    assert line in render_model_card(LoupeConfig.from_preset(preset))


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
    assert preset_name(LoupeConfig.from_preset("tiny-swin")) == "tiny-swin"
    assert preset_name(LoupeConfig.from_preset("tiny-128")) == "tiny-128"
    assert preset_name(LoupeConfig.from_preset("tiny-fine-grid")) == "tiny-fine-grid"


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
        # The uploaded Space starts on its own copy of the package and serves the uploaded model.
        started = subprocess.run(
            [sys.executable, "-c", SPACE_START_SCRIPT, str(space), str(repo), os.path.join(REPO, "src")],
            env={k: v for k, v in env.items() if k != "PYTHONPATH"},
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr[-4000:]
        last = started.stdout.strip().splitlines()[-1]
        assert last.startswith("3 ") and last.endswith(str(space / "loupe_hf" / "__init__.py"))
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


def test_card_lists_the_stages_a_continued_run_started_from(tmp_path):
    first = TrainingFacts(data="synthetic", steps=600, global_batch_size=64, final_loss=1.0)
    (tmp_path / "stage1").mkdir()
    first.save(tmp_path / "stage1")
    second = TrainingFacts(data="synthetic", steps=300, global_batch_size=64).continuing(
        tmp_path / "stage1"
    )
    assert second.earlier_stages == [dataclasses.asdict(first)]
    (tmp_path / "stage2").mkdir()
    second.save(tmp_path / "stage2")
    assert TrainingFacts.from_folder(tmp_path / "stage2") == second
    third = TrainingFacts(data="someone/pairs", steps=10).continuing(tmp_path / "stage2")
    assert [stage["steps"] for stage in third.earlier_stages] == [600, 300]
    assert third.earlier_stages[1]["earlier_stages"] is None  # each stage listed once
    card = render_model_card(LoupeConfig.from_preset("tiny"), training=third)
    section = card.split("## Training data and procedure\n")[1].split("\n\n## Evaluation")[0]
    assert section.splitlines()[2:4] == [
        "- Continued from stage 1: 600 steps at a global batch size of 64 (38,400 pairs), the "
        "synthetic generator.",
        "- Continued from stage 2: 300 steps at a global batch size of 64 (19,200 pairs), the "
        "synthetic generator.",
    ]
    # Nothing recorded to continue from: a Hub id, no folder, a folder without training records.
    (tmp_path / "empty").mkdir()
    for start in (None, "someone/model", tmp_path / "missing", tmp_path / "empty"):
        assert TrainingFacts(steps=3).continuing(start) == TrainingFacts(steps=3)
