"""The LOUPE Space: the logic in `spaces/loupe_space.py`, then `spaces/app.py` run for real (gradio_client,
and a headless Chromium driven by Playwright)."""

from __future__ import annotations

import copy
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from loupe_hf import LoupeForZeroShotDetection
from loupe_hf.data import generate_sample
from loupe_hf.pretraining import LoupeForPreTraining
from loupe_hf.visualization import draw_boxes

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "spaces"))  # the Space's own module, as the app imports it

from loupe_space import (  # noqa: E402
    HEATMAP_DPI,
    LEGEND_HEIGHT,
    MAX_LABELS,
    UNSIL_HEADERS,
    BackgroundLoader,
    DemoInputError,
    LoupeDemo,
    RegionCache,
    boxes_to_draw,
    caption_phrases,
    display_scale,
    highlight_phrases,
    matrices_figsize,
    parse_labels,
    prepare_image,
    resolve_checkpoint,
    train_fallback_checkpoint,
)

APP = REPO_ROOT / "spaces" / "app.py"
EXAMPLES = REPO_ROOT / "spaces" / "examples"
CHROMIUM = Path(os.environ.get("LOUPE_CHROMIUM", "/usr/bin/chromium"))
# Where the browser tests also keep their screenshots (e.g. `docs/` to refresh docs/space_explain.png);
# by default they stay in the test's temporary folder, so a test run leaves the checkout unchanged.
SCREENSHOT_DIR = os.environ.get("LOUPE_SCREENSHOT_DIR")
LABELS = "circle, star, heart, triangle, square"
CAPTION = "a small red star to the left of a large blue circle"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_config, processor) -> Path:
    """A tiny untrained pre-training model saved like `examples/pretrain.py` saves one (weights with
    UNSIL at both levels, config, processor)."""
    config = copy.deepcopy(tiny_config)
    config.set_prompt_template(processor.tokenizer)
    config.unsil_levels = ["token", "semantic"]
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("space-checkpoint")
    LoupeForPreTraining(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def detector_checkpoint(tmp_path_factory, tiny_config, processor) -> Path:
    """A tiny detector saved for inference only: no UNSIL weights."""
    config = copy.deepcopy(tiny_config)
    config.set_prompt_template(processor.tokenizer)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("detector-checkpoint")
    LoupeForZeroShotDetection(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture()
def demo(checkpoint) -> LoupeDemo:
    return LoupeDemo.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def shapes() -> PIL.Image.Image:
    return generate_sample(6, "validation")["image"]


def assert_boxes_inside(detections: list[dict], size: list[int]) -> None:
    width, height = size
    for detection in detections:
        x0, y0, x1, y1 = detection["box"]
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height, detection


# --- detect ---------------------------------------------------------------------------------------


def test_detect_boxes_lie_inside_the_image_with_labels_from_the_query(demo, shapes):
    result = demo.detect(shapes, LABELS, threshold=0.0, top_k=20)
    detections = result.detections["detections"]
    assert detections and result.detections["image_size"] == [128, 128]
    assert_boxes_inside(detections, [128, 128])
    assert {d["label"] for d in detections} <= set(parse_labels(LABELS))
    assert result.image.mode == "RGB" and result.image.width >= 128
    assert [row[0] for row in result.table] == [d["label"] for d in detections]


def test_detect_scores_are_sorted_and_respect_threshold_and_top_k(demo, shapes):
    everything = demo.detect(shapes, LABELS, threshold=0.0, top_k=50).detections["detections"]
    scores = [d["score"] for d in everything]
    assert scores == sorted(scores, reverse=True)
    assert len(demo.detect(shapes, LABELS, 0.0, 3).detections["detections"]) == min(3, len(scores))
    cut = scores[len(scores) // 2]
    kept = demo.detect(shapes, LABELS, cut, 50).detections["detections"]
    assert kept and all(d["score"] >= cut for d in kept)


def test_nothing_above_the_threshold_says_so(demo, shapes):
    result = demo.detect(shapes, "circle", threshold=1.0, top_k=5)
    assert result.detections["detections"] == [] and result.table == []
    assert any("lowering" in note for note in result.notes)


def test_boxes_to_draw_keeps_each_box_once_with_its_best_label():
    box, other = [1.0, 2.0, 30.0, 40.0], [5.0, 5.0, 20.0, 20.0]
    detections = [
        {"label": "star", "score": 0.9, "box": box},
        {"label": "heart", "score": 0.8, "box": other},
        {"label": "circle", "score": 0.5, "box": list(box)},
        {"label": "square", "score": 0.95, "box": [v + 0.001 for v in box]},  # rounding noise
    ]
    drawn = boxes_to_draw(detections)
    assert [(d["label"], d["score"]) for d in drawn] == [("heart", 0.8), ("square", 0.95)]


def test_detect_draws_each_region_once_with_its_best_label_and_tables_every_hit(demo, shapes):
    result = demo.detect(shapes, LABELS, threshold=0.0, top_k=50)
    detections = result.detections["detections"]
    boxes = {tuple(d["box"]) for d in detections}
    # 16 regions and 5 labels: with 50 hits, some regions carry several labels.
    assert len(boxes) < len(detections) == len(result.table)
    best = {}
    for d in detections:
        if tuple(d["box"]) not in best or d["score"] > best[tuple(d["box"])]["score"]:
            best[tuple(d["box"])] = d
    kept = boxes_to_draw(detections)
    assert {(tuple(d["box"]), d["label"]) for d in kept} == {
        (box, d["label"]) for box, d in best.items()
    }

    def picture(chosen):
        return np.asarray(
            draw_boxes(
                shapes,
                [d["box"] for d in chosen],
                [d["label"] for d in chosen],
                [d["score"] for d in chosen],
                scale=display_scale(shapes),
            )
        )

    assert np.array_equal(np.asarray(result.image), picture(kept))
    assert not np.array_equal(np.asarray(result.image), picture(detections))


def test_detect_agrees_with_the_model_api(demo, shapes):
    ours = demo.detect(shapes, LABELS, threshold=0.0, top_k=10).detections["detections"]
    theirs = demo.detector.detect(
        [shapes], parse_labels(LABELS), demo.processor, threshold=0.0, top_k=10
    )[0]
    assert [d["label"] for d in ours] == theirs["text_labels"]
    assert np.allclose([d["score"] for d in ours], theirs["scores"].numpy(), atol=1e-5)
    assert np.allclose([d["box"] for d in ours], theirs["boxes"].numpy(), atol=1e-3)


# --- ground and explain -------------------------------------------------------------------------


def test_ground_agrees_with_the_model_api(demo, shapes):
    result = demo.ground(shapes, "  the small   circle ")
    expected = demo.detector.ground([shapes], ["the small circle"], demo.processor)[0]
    assert result.grounding["expression"] == "the small circle"
    assert result.grounding["region_index"] == expected["region_index"]
    assert result.score == pytest.approx(expected["score"], abs=1e-5)
    assert np.allclose(result.grounding["box"], expected["box"], atol=1e-3)
    assert_boxes_inside([result.grounding], [128, 128])


def test_explain_matrices_have_a_row_per_region_and_a_column_per_phrase(demo, shapes):
    result = demo.explain(shapes, CAPTION, num_regions=3)
    raw = result.explanation
    alignment, interactions = np.array(raw["alignment"]), np.array(raw["semantic_interactions"])
    phrases = [p["text"] for p in raw["phrases"]]
    assert phrases == ["a small red star", "a large blue circle"]
    assert alignment.shape == interactions.shape == np.array(raw["semantic_stderr"]).shape == (3, 2)
    assert np.allclose(alignment.sum(axis=1), 1.0, atol=1e-5)  # softmax over phrases
    assert np.abs(interactions).max() > 0
    confidences = [r["confidence"] for r in raw["regions"]]
    assert confidences == sorted(confidences, reverse=True)
    assert [r["name"] for r in raw["regions"]] == ["R1", "R2", "R3"]
    width, height = matrices_figsize(3, 2)
    assert result.matrices.size == (round(width * HEATMAP_DPI), round(height * HEATMAP_DPI))
    assert result.matrices.mode == "RGB" and np.asarray(result.matrices).std() > 0


def test_explain_shows_the_token_level_interactions_over_the_photo(demo, shapes):
    result = demo.explain(shapes, CAPTION, num_regions=4)
    raw = result.explanation
    grid = demo.detector.loupe.grid_size
    patch_map = np.array(raw["patch_map"])
    assert patch_map.shape == (grid, grid) and np.abs(patch_map).max() > 0
    interactions = [r["interaction"] for r in raw["regions"]]
    assert len(interactions) == 4 and all(r["stderr"] >= 0 for r in raw["regions"])
    assert raw["sampling"]["seed"] == 0 and raw["sampling"]["token_samples"] >= 1
    # The photo enlarged like the regions picture, with a colour scale below it.
    assert result.interaction_image.size == (
        result.regions_image.width,
        result.regions_image.height + LEGEND_HEIGHT,
    )
    photo = np.asarray(result.regions_image, dtype=float)
    overlay = np.asarray(result.interaction_image, dtype=float)[: photo.shape[0]]
    assert np.abs(overlay - photo).mean() > 10  # the heat map is there


def test_explain_is_reproducible(demo, checkpoint, shapes):
    first = demo.explain(shapes, CAPTION, num_regions=3).explanation
    fresh = LoupeDemo.from_pretrained(checkpoint).explain(shapes, CAPTION, num_regions=3)
    second = fresh.explanation
    for key in ("regions", "patch_map", "semantic_interactions", "unsil"):
        assert first[key] == second[key], key


def test_explain_sets_unsil_predictions_against_the_sampled_values(demo, shapes):
    result = demo.explain(shapes, CAPTION, num_regions=3)
    raw = result.explanation
    assert raw["unsil"]["levels"] == ["token", "semantic"]
    rows = result.unsil_table
    assert [row[:2] for row in rows[:3]] == [["token", f"R{k}"] for k in (1, 2, 3)]
    assert [row[1] for row in rows[3:]] == [f"R{k} × P{j}" for k in (1, 2, 3) for j in (1, 2)]
    assert all(len(row) == len(UNSIL_HEADERS) for row in rows)
    # The sampled column is the same estimate that the regions and the matrix show.
    regions = raw["regions"]
    assert [row[2] for row in rows[:3]] == pytest.approx([r["interaction"] for r in regions], 1e-3)
    semantic = np.array(raw["semantic_interactions"]).ravel()
    assert [row[2] for row in rows[3:]] == pytest.approx(semantic.tolist(), rel=1e-3)
    for _, _, sampled, stderr, predicted, sigma, error in rows:
        assert stderr >= 0 and 0 < sigma < 1
        assert error == pytest.approx(abs(predicted - sampled), rel=1e-3, abs=1e-6)
    assert "UNSIL" in result.unsil_message and "σ" in result.unsil_message
    assert raw["unsil"]["predictions"][0]["target"] == "R1"


def test_explain_says_plainly_when_the_checkpoint_has_no_unsil(detector_checkpoint, shapes):
    result = LoupeDemo.from_pretrained(detector_checkpoint).explain(shapes, CAPTION, 2)
    assert result.unsil_table == [] and result.explanation["unsil"] is None
    assert result.unsil_message.startswith("**No UNSIL in this checkpoint**")
    assert result.explanation["unsil_message"] == result.unsil_message
    assert np.array(result.explanation["semantic_interactions"]).shape == (2, 2)


def test_caption_without_noun_phrases_falls_back_to_the_whole_caption(demo, shapes):
    result = demo.explain(shapes, "running fast!", num_regions=2)
    assert [p["text"] for p in result.explanation["phrases"]] == ["running fast!"]
    assert np.allclose(result.explanation["alignment"], 1.0)
    assert any("whole caption" in note for note in result.notes)


def test_many_phrases_are_capped_and_the_user_told():
    caption = "a red star, a blue circle and a green square"
    spans, notes = caption_phrases(caption, max_phrases=2)
    assert [caption[start:end] for start, end in spans] == ["a red star", "a blue circle"]
    assert notes == ["The caption has 3 noun phrases; the first 2 are shown."]


def test_highlighted_pieces_rebuild_the_caption():
    caption = "there is a red star, and a blue circle."
    spans = [(9, 19), (25, 38)]
    pieces = highlight_phrases(caption, spans)
    assert "".join(text for text, _ in pieces) == caption
    assert [text for text, label in pieces if label] == ["a red star", "a blue circle"]
    assert [label for _, label in pieces if label] == ["P1", "P2"]


# --- validation -----------------------------------------------------------------------------------


def test_labels_are_trimmed_and_deduplicated():
    assert parse_labels(" cat ,dog,, Cat,red   circle\nDOG , cup ") == [
        "cat",
        "dog",
        "red circle",
        "cup",
    ]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda d, im: d.detect(None, "cat"), "upload an image"),
        (lambda d, im: d.detect(im, " , ,"), "at least one label"),
        (lambda d, im: d.detect(im, ",".join(f"l{i}" for i in range(MAX_LABELS + 1))), "at most"),
        (lambda d, im: d.detect(im, "cat", threshold=1.5), "between 0 and 1"),
        (lambda d, im: d.detect(im, "cat", top_k=0), "at least 1"),
        (lambda d, im: d.ground(im, "   "), "referring expression"),
        (lambda d, im: d.explain(im, ""), "caption"),
        (lambda d, im: d.ground(None, "the cat"), "upload an image"),
    ],
    ids=[
        "no-image",
        "empty-labels",
        "too-many-labels",
        "bad-threshold",
        "bad-top-k",
        "empty-expression",
        "empty-caption",
        "ground-no-image",
    ],
)
def test_unusable_inputs_get_a_friendly_message(demo, shapes, call, message):
    with pytest.raises(DemoInputError, match=message):
        call(demo, shapes)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "1", "I;16"])
def test_non_rgb_images_are_converted_and_the_user_told(demo, shapes, mode):
    image = shapes.convert("L").convert(mode) if mode == "I;16" else shapes.convert(mode)
    result = demo.detect(image, "circle, star", threshold=0.0, top_k=5)
    assert any("to RGB" in note and mode in note for note in result.notes)
    assert result.image.mode == "RGB"
    assert_boxes_inside(result.detections["detections"], [128, 128])


def test_huge_images_are_downscaled_and_the_user_told(demo):
    image = PIL.Image.new("RGB", (2048, 1536), (40, 40, 40))
    result = demo.detect(image, "circle", threshold=0.0, top_k=5)
    assert result.detections["image_size"] == [1024, 768]
    assert any("Downscaled the 2048×1536 image to 1024×768" in note for note in result.notes)
    assert_boxes_inside(result.detections["detections"], [1024, 768])


def test_small_rgb_images_pass_unchanged(shapes):
    prepared, notes = prepare_image(shapes)
    assert notes == [] and prepared.size == shapes.size
    assert np.array_equal(np.asarray(prepared), np.asarray(shapes))


def test_images_are_accepted_as_arrays_and_paths(shapes, tmp_path):
    path = tmp_path / "shapes.png"
    shapes.save(path)
    assert np.array_equal(np.asarray(prepare_image(path)[0]), np.asarray(shapes))
    assert np.array_equal(np.asarray(prepare_image(np.asarray(shapes))[0]), np.asarray(shapes))
    with pytest.raises(DemoInputError, match="Could not read"):
        prepare_image(tmp_path / "missing.png")


# --- the feature cache ----------------------------------------------------------------------------


def test_changing_only_labels_threshold_or_top_k_reuses_the_image_encoding(demo, shapes):
    first = demo.detect(shapes, "circle", threshold=0.1, top_k=5)
    second = demo.detect(shapes, "star, heart", threshold=0.0, top_k=3)
    assert (first.detections["cache_hit"], second.detections["cache_hit"]) == (False, True)
    assert demo.ground(shapes, "the star").grounding["cache_hit"]
    assert demo.explain(shapes, "a red star").explanation["cache_hit"]
    assert (demo.cache.hits, demo.cache.misses) == (3, 1)
    demo.detect(generate_sample(4, "validation")["image"], "circle")
    assert (demo.cache.hits, demo.cache.misses) == (3, 2)


def test_cached_and_fresh_detections_agree(demo, checkpoint, shapes):
    demo.detect(shapes, "star")  # fills the cache
    cached = demo.detect(shapes, LABELS, threshold=0.0, top_k=10).detections
    fresh = LoupeDemo.from_pretrained(checkpoint).detect(shapes, LABELS, 0.0, 10).detections
    assert cached["cache_hit"] and not fresh["cache_hit"]
    assert cached["detections"] == fresh["detections"]


def test_region_cache_evicts_the_least_recently_used_entry():
    cache = RegionCache(max_size=2)
    computed = []

    def compute(key):
        return lambda: computed.append(key) or key

    for key in ["a", "b", "a", "c", "b"]:
        cache.get_or_compute(key, compute(key))
    # "b" was evicted when "c" came in ("a" had been used more recently), then recomputed.
    assert computed == ["a", "b", "c", "b"]
    assert (cache.hits, cache.misses, len(cache)) == (1, 4, 2)


# --- checkpoint resolution and loading ------------------------------------------------------------


def test_checkpoint_is_argument_then_environment_then_main_job_then_fallback(tmp_path, checkpoint):
    fallback = tmp_path / "cache"
    main_job = tmp_path / "repo" / "outputs" / "demo" / "checkpoint"
    env = {"LOUPE_CHECKPOINT": "user/loupe"}
    pick = resolve_checkpoint
    assert pick("arg", env, tmp_path / "repo", fallback).checkpoint == "arg"
    assert pick(None, env, tmp_path / "repo", fallback).checkpoint == "user/loupe"
    choice = pick(None, {}, tmp_path / "repo", fallback)
    assert (choice.checkpoint, choice.needs_training) == (str(fallback), True)
    main_job.parent.mkdir(parents=True)
    main_job.symlink_to(checkpoint, target_is_directory=True)
    assert pick(None, {}, tmp_path / "repo", fallback).checkpoint == str(main_job)
    fallback.symlink_to(checkpoint, target_is_directory=True)
    assert not pick(None, {}, tmp_path / "elsewhere", fallback).needs_training


def test_fallback_training_reports_progress_and_checks_the_result(tmp_path, checkpoint):
    script = tmp_path / "pretrain.py"
    script.write_text(
        "import shutil, sys\n"
        "out = sys.argv[sys.argv.index('--output_dir') + 1]\n"
        "for step in range(1, 4):\n"
        "    print(f'\\r {step}/3 [00:01<00:00]', end='', file=sys.stderr, flush=True)\n"
        f"shutil.copytree({str(checkpoint)!r}, out, dirs_exist_ok=True)\n"
    )
    messages = []
    train_fallback_checkpoint(tmp_path / "out", script, messages.append, extra_args=())
    assert [m for m in messages if m.startswith("training step")] == [
        f"training step {i}/3" for i in (1, 2, 3)
    ]
    trained = LoupeDemo.from_pretrained(tmp_path / "out")
    assert trained.detect(generate_sample(0, "validation")["image"], "circle").detections[
        "labels"
    ] == ["circle"]
    script.write_text("import sys\nprint('boom')\nsys.exit(3)\n")
    with pytest.raises(RuntimeError, match="exit 3"):
        train_fallback_checkpoint(tmp_path / "broken", script, messages.append, extra_args=())


def test_background_loader_loads_or_explains_why_not(checkpoint, tmp_path):
    loader = BackgroundLoader(log=lambda message: None)
    loader.start(str(checkpoint))
    assert isinstance(loader.wait(timeout=60), LoupeDemo)
    assert "Ready" in loader.status
    broken = BackgroundLoader(log=lambda message: None)
    broken.start(str(tmp_path / "no-such-checkpoint"))
    with pytest.raises(DemoInputError, match="could not load the model"):
        broken.wait(timeout=60)


def test_background_loader_trains_the_fallback_checkpoint_first(checkpoint, tmp_path):
    script = tmp_path / "repo" / "examples" / "pretrain.py"
    script.parent.mkdir(parents=True)
    script.write_text(
        "import shutil, sys\n"
        "print(' 1/1 [00:00<00:00]', file=sys.stderr)\n"
        f"shutil.copytree({str(checkpoint)!r}, sys.argv[2], dirs_exist_ok=True)\n"
    )
    messages = []
    loader = BackgroundLoader(tmp_path / "repo", messages.append, fallback=tmp_path / "cache")
    loader.start()
    assert loader.training  # so handlers answer with the progress instead of blocking
    deadline = time.monotonic() + 60
    while not loader.done and time.monotonic() < deadline:
        time.sleep(0.1)
    assert isinstance(loader.wait(timeout=0), LoupeDemo)
    assert any("Preparing the model" in m and "training step 1/1" in m for m in messages)
    assert not loader.training and "Ready" in loader.status


def test_space_ships_small_examples():
    pngs, jpgs = sorted(EXAMPLES.glob("*.png")), sorted(EXAMPLES.glob("*.jpg"))
    assert len(pngs) == 3 and 2 <= len(jpgs) <= 3
    for path in pngs + jpgs:
        with PIL.Image.open(path) as image:
            assert max(image.size) <= 320 and image.mode == "RGB", path


# --- the app, run for real ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_answering(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the app did not answer within {timeout} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def app_url(checkpoint, tmp_path_factory) -> Iterator[str]:
    """`spaces/app.py` serving the tiny checkpoint on a free local port, stopped afterwards."""
    pytest.importorskip("gradio", reason="the app needs gradio (the `demo` extra)")
    port = free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    env = {
        **os.environ,
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    command = [sys.executable, str(APP), "--checkpoint", str(checkpoint), "--port", str(port)]
    command += ["--host", "127.0.0.1"]
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_answering(url, process, log, timeout=180)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def client(app_url):
    gradio_client = pytest.importorskip("gradio_client")
    return gradio_client.Client(app_url, verbose=False)


def test_app_detect_endpoint(client):
    from gradio_client import handle_file

    image, table, raw, _ = client.predict(
        handle_file(str(EXAMPLES / "shapes_6.png")), LABELS, 0.0, 5, api_name="/detect"
    )
    detections = raw["detections"]
    assert 1 <= len(detections) <= 5 and Path(image).is_file()
    assert_boxes_inside(detections, raw["image_size"])
    assert {d["label"] for d in detections} <= set(parse_labels(LABELS))
    scores = [d["score"] for d in detections]
    assert scores == sorted(scores, reverse=True)
    assert table["headers"] == ["label", "score", "x0", "y0", "x1", "y1"]
    assert [row[0] for row in table["data"]] == [d["label"] for d in detections]


def test_app_ground_and_explain_endpoints(client):
    from gradio_client import handle_file

    photo = handle_file(str(EXAMPLES / "chelsea.jpg"))
    image, score, raw, _ = client.predict(photo, "the cat", api_name="/ground")
    assert Path(image).is_file() and 0 <= score <= 1
    assert_boxes_inside([raw], raw["image_size"])
    caption = "a cat with green eyes on a wooden floor"
    phrases, regions, interaction, matrices, unsil, message, raw, _ = client.predict(
        photo, caption, 3, api_name="/explain"
    )
    assert [piece["token"] for piece in phrases if piece["class_or_confidence"]] == [
        p["text"] for p in raw["phrases"]
    ]
    shape = (3, len(raw["phrases"]))
    assert np.array(raw["alignment"]).shape == np.array(raw["semantic_interactions"]).shape == shape
    assert np.array(raw["patch_map"]).ndim == 2 and len(raw["regions"][0]) >= 5
    assert all(Path(path).is_file() for path in (regions, interaction, matrices))
    assert unsil["headers"] == UNSIL_HEADERS
    assert len(unsil["data"]) == len(raw["unsil"]["predictions"]) == 3 + 3 * shape[1]
    assert "UNSIL" in message and raw["unsil_message"] == message


def test_app_reports_input_problems(client):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="at least one label"):
        client.predict(handle_file(str(EXAMPLES / "coffee.jpg")), " , ", 0.1, 5, api_name="/detect")


def browser_missing() -> str | None:
    """What is missing for the browser test, or None (scripts/install_browser.sh installs both)."""
    missing = []
    if not CHROMIUM.is_file():
        missing.append(f"Debian chromium ({CHROMIUM})")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright Python package")
    if not missing:
        return None
    return " and ".join(missing) + " not installed; run scripts/install_browser.sh"


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


@pytest.mark.slow
@pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")
def test_browser_detect_tab_renders_the_annotated_image(app_url, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(app_url, wait_until="networkidle")
            page.wait_for_selector("#detect-image input[type=file]", state="attached")
            page.set_input_files("#detect-image input[type=file]", str(EXAMPLES / "shapes_13.png"))
            page.fill("#detect-labels textarea", "star, triangle, heart, circle")
            page.click("#detect-button")
            page.wait_for_function(
                "() => { const img = document.querySelector('#detect-output img');"
                " return img && img.src && img.complete && img.naturalWidth > 0; }",
                timeout=60_000,
            )
            screenshot = tmp_path / "detect.png"
            page.screenshot(path=str(screenshot), full_page=True)
            print(f"screenshot: {screenshot}")
            source = page.get_attribute("#detect-output img", "src")
            assert source and "/file=" in source
            assert "Ready" in page.inner_text("#status")
            assert page.locator("#detect-table").inner_text().count("\n") >= 1
        finally:
            browser.close()


@pytest.mark.slow
@pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")
def test_browser_explain_tab_renders_interactions_matrices_and_unsil(app_url, tmp_path):
    from playwright.sync_api import sync_playwright

    loaded = (
        "(id) => { const img = document.querySelector(`#${id} img`);"
        " return img && img.src && img.complete && img.naturalWidth > 0; }"
    )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            page.goto(app_url, wait_until="networkidle")
            page.get_by_role("tab", name="Explain").click()
            page.wait_for_selector("#explain-image input[type=file]", state="attached")
            page.set_input_files("#explain-image input[type=file]", str(EXAMPLES / "shapes_13.png"))
            page.fill(
                "#explain-text textarea", "a white star, an orange triangle and a brown heart"
            )
            page.click("#explain-button")
            for element in ("explain-output", "explain-interaction", "explain-matrices"):
                page.wait_for_function(loaded, arg=element, timeout=60_000)
            page.wait_for_function(
                "() => document.querySelector('#explain-unsil')?.innerText.includes('semantic')",
                timeout=60_000,
            )
            screenshot = tmp_path / "explain.png"
            page.screenshot(path=str(screenshot), full_page=True)
            if SCREENSHOT_DIR:
                Path(SCREENSHOT_DIR).mkdir(parents=True, exist_ok=True)
                page.screenshot(
                    path=str(Path(SCREENSHOT_DIR) / "space_explain.png"), full_page=True
                )
            print(f"screenshot: {screenshot}")
            for element in ("explain-output", "explain-interaction", "explain-matrices"):
                source = page.get_attribute(f"#{element} img", "src")
                assert source and "/file=" in source, element
            assert "token" in page.inner_text("#explain-unsil")
            assert "UNSIL" in page.inner_text("#explain-unsil-message")
            assert "P1" in page.inner_text("#explain-phrases")
        finally:
            browser.close()
