"""The second, independent renderer (issue 14): same schema and words, other pixels."""

from __future__ import annotations

import ast
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("skimage")
from skimage.color import rgb2lab

from loupe_hf import LoupeConfig, LoupeForZeroShotDetection
from loupe_hf.data import (
    COLOUR_RGB,
    COLOURS,
    SHAPE_CATEGORY_IDS,
    SIZES,
    SyntheticConfig,
    dataset_features,
    generate_sample,
    held_out_combinations,
)
from loupe_hf.data import second_renderer as second
from loupe_hf.data.second_renderer import (
    COLOUR_JITTER,
    SECOND_COLOUR_RGB,
    SecondRendererConfig,
    build_second_renderer_dataset,
    contact_sheet,
    second_renderer_layers,
    second_renderer_sample,
    size_word,
)
from loupe_hf.data.shapes import rasterize_shape
from loupe_hf.evaluation.decomposition import decompose
from loupe_hf.evaluation.runners import (
    evaluate_synthetic_detection,
    evaluate_synthetic_grounding,
    evaluate_synthetic_retrieval,
)

TRAINING_LAB = rgb2lab(np.array([[COLOUR_RGB[c] for c in COLOURS]], dtype=float) / 255.0)[0]
# The training renderer's size buckets leave these extents out.
CLASSIC_SIZE_GAPS = ((0.20, 0.25), (0.31, 0.36))


@pytest.fixture(scope="module")
def layers():
    return [second_renderer_layers(index) for index in range(120)]


@pytest.fixture(scope="module")
def samples(layers):
    return [sample for sample, _, _ in layers]


def _structure(value):
    """The type skeleton of a sample: dict keys, the set of element skeletons of lists, leaf types."""
    if isinstance(value, dict):
        return {key: _structure(item) for key, item in value.items()}
    if isinstance(value, list):
        return ("list", frozenset(map(repr, map(_structure, value))))
    return type(value).__name__


def _rich(sample) -> bool:
    return len(sample["objects"]["bbox"]) >= 2 and bool(sample["relations"])


def _nearest_training_colour(rgb) -> str:
    lab = rgb2lab(np.asarray(rgb, dtype=float)[None, None] / 255.0)[0, 0]
    return COLOURS[int(np.linalg.norm(TRAINING_LAB - lab, axis=-1).argmin())]


def _background_level(sample) -> float:
    """Mean grey level of the pixels outside every object box."""
    pixels = np.asarray(sample["image"], dtype=float)
    outside = np.ones(pixels.shape[:2], dtype=bool)
    for x, y, w, h in sample["objects"]["bbox"]:
        outside[math.floor(y) : math.ceil(y + h), math.floor(x) : math.ceil(x + w)] = False
    return float(pixels[outside].mean())


# --- schema -----------------------------------------------------------------------------------


def test_schema_is_that_of_generate_sample(samples):
    reference = next(s for s in (generate_sample(i, "validation") for i in range(100)) if _rich(s))
    rich = next(s for s in samples if _rich(s))
    assert _structure(rich) == _structure(reference)
    assert rich["image"].mode == reference["image"].mode == "RGB"
    assert rich["image"].size == reference["image"].size == (128, 128)
    for sample in samples[:20]:
        assert set(sample) == set(reference)
        assert set(sample["objects"]) == set(reference["objects"])
        dataset_features().encode_example(sample)  # raises on a field of the wrong type


def test_dataset_has_the_training_features_and_decodes(tmp_path):
    dataset = build_second_renderer_dataset(3, cache_dir=tmp_path)
    assert dataset.features == dataset_features()
    row = dataset[2]
    expected = second_renderer_sample(2)
    assert row["caption"] == expected["caption"] and row["image"].size == (128, 128)
    assert np.array_equal(np.asarray(row["image"]), np.asarray(expected["image"]))
    np.testing.assert_allclose(row["objects"]["bbox"], expected["objects"]["bbox"])


def test_words_are_the_training_vocabulary_and_spans_hold(samples):
    for sample in samples:
        objects = sample["objects"]
        for k, (_, _, w, h) in enumerate(objects["bbox"]):
            assert objects["category"][k] in SHAPE_CATEGORY_IDS
            assert objects["colour"][k] in COLOURS and objects["size"][k] in SIZES
            assert objects["size"][k] == size_word(max(w, h) / sample["width"])
            phrase = f"a {objects['size'][k]} {objects['colour'][k]} {objects['category'][k]}"
            start, end = objects["phrase_span"][k]
            assert objects["phrase"][k] == phrase == sample["caption"][start:end]
        indices = [e["object_index"] for e in sample["referring_expressions"]]
        assert indices == list(range(len(objects["bbox"])))
        for expression in sample["referring_expressions"]:
            assert objects["category"][expression["object_index"]] in expression["text"]


def test_size_words_cut_halfway_between_the_training_buckets():
    assert [size_word(f) for f in (0.125, 0.224, 0.226, 0.334, 0.336, 0.5)] == [
        "small",
        "small",
        "medium",
        "medium",
        "large",
        "large",
    ]


def test_compositional_split_draws_only_held_out_combinations():
    held_out = held_out_combinations()
    for index in range(30):
        objects = second_renderer_sample(index, split="compositional")["objects"]
        assert set(zip(objects["category"], objects["colour"], strict=True)) <= held_out


# --- pixels and boxes ---------------------------------------------------------------------------


def test_boxes_are_tight_around_the_drawn_pixels(layers):
    for sample, background, alphas in layers:
        image = np.asarray(sample["image"], dtype=float)
        drawn = np.zeros(image.shape[:2], dtype=bool)
        for (x, y, w, h), alpha, area in zip(
            sample["objects"]["bbox"], alphas, sample["objects"]["area"], strict=True
        ):
            rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
            # Covered pixels lie inside the box and reach each of its four edges.
            assert (cols[0], cols[-1]) == (math.floor(x), math.ceil(x + w) - 1)
            assert (rows[0], rows[-1]) == (math.floor(y), math.ceil(y + h) - 1)
            assert min(x, y) >= 0 and x + w <= sample["width"] and y + h <= sample["height"]
            assert area == pytest.approx(float(alpha.sum()), rel=1e-5)
            drawn |= alpha > 0
        # Nothing but the background outside the objects' pixels.
        assert np.abs(image - np.rint(background))[~drawn].max(initial=0) == 0


def test_samples_are_deterministic_per_index():
    def fingerprint(sample):
        return np.asarray(sample["image"]).tobytes(), repr({**sample, "image": None})

    later_first = [fingerprint(second_renderer_sample(i)) for i in (7, 3)]
    assert [fingerprint(second_renderer_sample(i)) for i in (3, 7)] == later_first[::-1]
    assert fingerprint(second_renderer_sample(3)) != fingerprint(second_renderer_sample(4))
    other_seed = second_renderer_sample(3, SecondRendererConfig(seed=1))
    assert fingerprint(other_seed) != fingerprint(second_renderer_sample(3))


def test_drawing_code_is_not_the_training_renderer():
    tree = ast.parse(Path(second.__file__).read_text())
    imported = {
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    modules = {module for module, _ in imported}
    assert "loupe_hf.data.shapes" not in modules
    from_synthetic = {name for module, name in imported if module == "loupe_hf.data.synthetic"}
    assert not from_synthetic & {"rasterize_shape", "composite", "render_background", "ShapeMask"}
    assert "skimage.draw" in modules


# --- its own appearance -------------------------------------------------------------------------


def test_backgrounds_are_not_the_dark_classic_ones(samples):
    classic = SyntheticConfig(appearance="classic")
    training = [_background_level(generate_sample(i, "validation", classic)) for i in range(60)]
    levels = [_background_level(s) for s in samples]
    assert max(training) < 125  # the premise: classic backgrounds are all dark
    assert np.mean(np.array(levels) > 125) > 0.4
    assert np.std(levels) > 2 * np.std(training)
    assert {s["background"] for s in samples} == set(second.SECOND_BACKGROUNDS)


def test_colours_differ_from_training_but_keep_their_names(layers):
    drawn: dict[str, list[np.ndarray]] = {colour: [] for colour in COLOURS}
    for sample, _, alphas in layers:
        image = np.asarray(sample["image"], dtype=float)
        for colour, alpha in zip(sample["objects"]["colour"], alphas, strict=True):
            drawn[colour].append(np.median(image[alpha == 1.0], axis=0))
    assert all(drawn.values()), "every colour name should be drawn"
    for colour, values in drawn.items():
        assert {_nearest_training_colour(rgb) for rgb in values} == {colour}
        distance = np.linalg.norm(np.array(values) - COLOUR_RGB[colour], axis=-1)
        assert distance.mean() > 25, colour
        assert np.ptp(np.array(values), axis=0).max() > COLOUR_JITTER  # jittered, not fixed


def test_every_jittered_colour_is_nearest_its_own_training_name():
    for colour, anchor in SECOND_COLOUR_RGB.items():
        for signs in itertools.product((-1, 0, 1), repeat=3):
            rgb = np.clip(np.asarray(anchor) + COLOUR_JITTER * np.asarray(signs), 0, 255)
            assert _nearest_training_colour(rgb) == colour


def _fill_and_aspect(box, area) -> tuple[float, float]:
    _, _, w, h = box
    return area / (w * h), w / h


@pytest.mark.parametrize(
    "shape", ["star", "cross", "ring", "triangle", "diamond", "heart", "hexagon"]
)
def test_shape_proportions_differ_from_training(shape):
    slot = second._Slot(cx=50.0, cy=50.0, extent=80.0, angle=0.0)
    ours = second._rasterise(shape, slot, 100, 4)
    theirs = rasterize_shape(shape, 80, 10, 10, supersample=4)
    ours_fill, ours_aspect = _fill_and_aspect(ours.bbox, float(ours.alpha.sum()))
    theirs_fill, theirs_aspect = _fill_and_aspect(theirs.bbox, theirs.area)
    assert abs(ours_fill - theirs_fill) > 0.05 or abs(ours_aspect - theirs_aspect) > 0.1


def test_sizes_are_continuous_and_fill_the_classic_gaps(samples):
    extents = np.array(
        [max(w, h) / s["width"] for s in samples for _, _, w, h in s["objects"]["bbox"]]
    )
    assert extents.min() < 0.14 and extents.max() > 0.45
    in_gaps = sum(((extents > low) & (extents < high)).sum() for low, high in CLASSIC_SIZE_GAPS)
    assert in_gaps / len(extents) > 0.1
    assert len(np.unique(extents.round(2))) > 25


def test_objects_are_turned(samples):
    squares = [
        area / (w * h)
        for s in samples
        for (_, _, w, h), area, shape in zip(
            s["objects"]["bbox"], s["objects"]["area"], s["objects"]["category"], strict=True
        )
        if shape == "square"
    ]
    assert min(squares) < 0.9 and max(squares) > 0.97  # turned ones no longer fill their box


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="background"):
        SecondRendererConfig(background="plain")
    with pytest.raises(ValueError, match="max_rotation"):
        SecondRendererConfig(max_rotation=90)
    with pytest.raises(ValueError, match="cannot hold"):
        SecondRendererConfig(image_size=32, max_objects=100)


def test_contact_sheet_lays_out_the_samples():
    sheet = contact_sheet(range(3), columns=2, scale=1.0)
    assert sheet.size == (256, 256)


# --- the evaluations run on it unchanged --------------------------------------------------------


@pytest.fixture(scope="module")
def detector(tiny_config, processor):
    config = LoupeConfig.from_dict(tiny_config.to_dict())
    config.set_prompt_template(processor.tokenizer)
    torch.manual_seed(0)
    return LoupeForZeroShotDetection(config).eval()


def test_evaluation_runners_run_on_second_renderer_samples(detector, processor, samples):
    chosen = samples[:5]
    retrieval = evaluate_synthetic_retrieval(detector.loupe, processor, chosen)
    assert 0 <= retrieval["i2t_R@1"] <= retrieval["i2t_R@5"] <= 1
    detection = evaluate_synthetic_detection(detector, processor, chosen)
    assert 0 <= detection["mAP@0.5"] <= detection["mAP@0.3"] <= 1
    grounding = evaluate_synthetic_grounding(detector, processor, chosen)
    assert grounding["num_items"] == sum(len(s["referring_expressions"]) for s in chosen)
    assert 0 <= grounding["accuracy"] <= 1
    report = decompose(detector, processor, chosen)
    recall = report["proposal_recall"]["all_candidates"]["all"]
    assert recall["num_objects"] == sum(len(s["objects"]["bbox"]) for s in chosen)
    assert 0 <= recall["0.5"] <= recall["0.3"] <= 1
    budget = report["loss_budget"]["grounding_per_100_expressions"]
    assert sum(budget[k] for k in ("correct", "no_proposal", "bad_fit", "wrong_object")) == (
        pytest.approx(100.0)
    )
