"""The model → predictions → metrics runners, and the example scripts end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from loupe_hf import LoupeConfig, LoupeForZeroShotDetection
from loupe_hf.data import generate_sample
from loupe_hf.evaluation.class_names import SHAPE_CATEGORY_IDS
from loupe_hf.evaluation.runners import (
    _component_box,
    as_detector,
    dense_similarity_detections,
    detect_batches,
    evaluate_classification,
    evaluate_synthetic_detection,
    evaluate_synthetic_grounding,
    evaluate_synthetic_retrieval,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def detector(tiny_config, processor):
    config = LoupeConfig.from_dict(tiny_config.to_dict())
    config.set_prompt_template(processor.tokenizer)
    torch.manual_seed(0)
    return LoupeForZeroShotDetection(config).eval()


@pytest.fixture(scope="module")
def samples():
    return [generate_sample(index, "validation") for index in range(6)]


def test_detections_are_coco_results_for_known_images_and_categories(detector, processor, samples):
    names = list(SHAPE_CATEGORY_IDS)
    ids = [SHAPE_CATEGORY_IDS[name] for name in names]
    detections = detect_batches(
        detector,
        processor,
        [s["image"] for s in samples],
        [s["image_id"] for s in samples],
        names,
        ids,
        batch_size=4,
    )
    assert detections and {d["image_id"] for d in detections} <= {s["image_id"] for s in samples}
    assert {d["category_id"] for d in detections} <= set(ids)
    for detection in detections:
        x, y, w, h = detection["bbox"]
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 128.01 and y + h <= 128.01
        assert 0 <= detection["score"] <= 1


def test_synthetic_metrics_are_in_range(detector, processor, samples):
    retrieval = evaluate_synthetic_retrieval(detector.loupe, processor, samples)
    assert 0 <= retrieval["i2t_R@1"] <= retrieval["i2t_R@5"] <= 1
    for method in ("regions", "dense"):
        detection = evaluate_synthetic_detection(detector, processor, samples, method=method)
        assert 0 <= detection["mAP@0.5"] <= detection["mAP@0.3"] <= 1
    grounding = evaluate_synthetic_grounding(detector, processor, samples)
    assert grounding["num_items"] == sum(len(s["referring_expressions"]) for s in samples)
    with pytest.raises(ValueError, match="unknown detection method"):
        evaluate_synthetic_detection(detector, processor, samples, method="magic")


def test_dense_baseline_box_is_the_component_around_the_peak():
    cells = torch.zeros(4, 4)
    cells[1, 1], cells[1, 2], cells[2, 1] = 1.0, 0.9, 0.8
    cells[3, 3] = 0.95  # above threshold but not connected to the peak
    assert _component_box(cells, 0.5) == (1, 1, 3, 3)


def test_dense_baseline_gives_one_box_per_class_and_image(detector, processor, samples):
    detections = dense_similarity_detections(
        detector.loupe,
        processor,
        [s["image"] for s in samples[:2]],
        [0, 1],
        ["star", "ring"],
        [4, 10],
    )
    assert len(detections) == 4 and {d["category_id"] for d in detections} == {4, 10}


def test_classification_accuracy_by_prompt_ensemble(detector, processor, samples):
    labels = [0, 1, 0, 1, 0, 1]
    result = evaluate_classification(
        detector.loupe,
        processor,
        [s["image"] for s in samples],
        labels,
        ["star", "circle"],
        templates=("an image of a {}.", "a {}."),
    )
    assert set(result) >= {"top1"} and 0 <= result["top1"] <= 1


def test_as_detector_shares_the_base_model_weights(detector):
    wrapped = as_detector(detector.loupe)
    assert wrapped.loupe is detector.loupe and as_detector(detector) is detector


@pytest.mark.slow
def test_main_job_trains_evaluates_and_draws(tmp_path):
    command = [
        sys.executable,
        os.path.join(REPO, "examples", "demo.py"),
        "--output_dir",
        str(tmp_path),
        "--backbone_steps",
        "3",
        "--max_steps",
        "3",
        "--eval_samples",
        "8",
        "--pictures",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200
    )
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (
        0 <= metrics["detection"]["mAP@0.5"] <= 1 and 0 <= metrics["grounding"]["accuracy@0.5"] <= 1
    )
    assert (tmp_path / "detections.png").stat().st_size > 0 and (
        tmp_path / "grounding.png"
    ).stat().st_size > 0
    # The final model alone at the top of `checkpoint`; the Trainer's folder kept apart.
    checkpoint = tmp_path / "checkpoint"
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {
        path.name for path in checkpoint.iterdir()
    }
    assert all(path.is_file() for path in checkpoint.iterdir())
    assert not (checkpoint / "training_args.bin").exists()
    assert not (checkpoint / "optimizer.pt").exists()
    assert (tmp_path / "training" / "trainer_state.json").is_file()
    assert (tmp_path / "backbone" / "train_results.json").is_file()  # stage 1, continued from
    # Learning curves go to TensorBoard too (the `tensorboard` extra is installed with `dev`).
    assert list((tmp_path / "training" / "runs").rglob("events.out.tfevents.*"))
    evaluate = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "run_evaluation.py"), "--checkpoint", str(tmp_path / "checkpoint"), "--num_samples", "8", "--baseline"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert evaluate.returncode == 0, evaluate.stderr[-4000:]
    report = json.loads(evaluate.stdout[evaluate.stdout.index("{") :])
    assert set(report) >= {
        "retrieval",
        "detection",
        "grounding",
        "dense_baseline_detection",
        "decomposition",
    }
    budget = report["decomposition"]["loss_budget"]["grounding_per_100_expressions"]
    assert budget["num_cases"] > 0 and report["proposal_recall@0.5"] >= 0


def test_pointing_game_hits_when_each_object_carries_its_phrase(
    detector, processor, samples, monkeypatch
):
    """Patches inside object k embed as e_k, background as −Σe, phrase k as e_k: the best cell of
    every phrase's map lies in its object and the least similar one never does."""
    from loupe_hf.evaluation.runners import pointing_game

    model = detector.loupe
    grid = model.grid_size
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    rows, columns = torch.meshgrid(centres, centres, indexing="ij")
    num_objects = sum(len(s["objects"]["bbox"]) for s in samples)
    features, inside_share, k = [], [], 0
    for sample in samples:
        cells = -torch.ones(grid * grid, num_objects)
        for x, y, w, h in sample["objects"]["bbox"]:
            x, y, w, h = (v / 128 for v in (x, y, w, h))
            inside = ((columns >= x) & (columns <= x + w) & (rows >= y) & (rows <= y + h)).flatten()
            cells[inside] = torch.nn.functional.one_hot(torch.tensor(k), num_objects).float()
            inside_share.append(float(inside.float().mean()))
            k += 1
        features.append(cells)
    monkeypatch.setattr(model, "encode_image", lambda pixel_values: torch.stack(features))
    monkeypatch.setattr(model, "visual_projection", torch.nn.Identity())
    monkeypatch.setattr(
        model, "get_text_features", lambda input_ids, attention_mask: torch.eye(num_objects)
    )
    result = pointing_game(model, processor, samples, batch_size=len(samples))
    assert result["pointing_accuracy"] == 1.0
    assert result["pointing_accuracy_least_similar"] == 0.0
    assert result["pointing_chance"] == pytest.approx(sum(inside_share) / num_objects)
    assert result["object_cosine"] == pytest.approx(1.0)
    assert result["outside_cosine"] < 0


def test_runners_compute_through_the_shipped_evaluate_scripts(
    tiny_config, processor, samples, monkeypatch
):
    import loupe_hf.evaluation as evaluation

    detector = LoupeForZeroShotDetection(LoupeConfig.from_dict(tiny_config.to_dict())).eval()
    from loupe_hf.evaluation import grounding_accuracy, recall_at_k
    from loupe_hf.evaluation.runners import encode_images, encode_texts

    loaded = []
    real_load = evaluation.load_metric

    def spy(name, **kwargs):
        loaded.append(name)
        return real_load(name, **kwargs)

    monkeypatch.setattr(evaluation, "load_metric", spy)
    retrieval = evaluate_synthetic_retrieval(detector.loupe, processor, samples)
    grounding = evaluate_synthetic_grounding(detector, processor, samples)
    assert loaded == ["retrieval_recall", "grounding_accuracy"]
    # The scripts compute what the package's functions compute.
    with torch.no_grad():
        similarity = (
            encode_images(detector.loupe, processor, [s["image"] for s in samples])
            @ encode_texts(detector.loupe, processor, [s["caption"] for s in samples]).t()
        )
    assert retrieval == pytest.approx(recall_at_k(similarity, list(range(len(samples)))))
    assert 0 <= grounding["accuracy"] <= 1 and grounding_accuracy is not None
