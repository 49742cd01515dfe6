"""Tests of the synthetic shapes benchmark: determinism, exact ground truth, splits, exports."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from loupe_hf.data import (
    COLOUR_RGB,
    COLOURS,
    SHAPE_CATEGORY_IDS,
    SHAPES,
    SIZES,
    SyntheticConfig,
    build_dataset,
    build_iterable_dataset,
    dataset_features,
    generate_sample,
    held_out_combinations,
    iter_samples,
    save_coco_json,
    split_combinations,
    to_coco,
    training_captions,
)
from loupe_hf.data.shapes import BACKGROUNDS, rasterize_shape, render_background

SMALL = SyntheticConfig(image_size=64)
# Few distinct combinations and many objects: look-alikes that need long or spatial expressions.
CROWDED = SyntheticConfig(image_size=96, min_objects=3, max_objects=6, holdout_fraction=0.06)
PLAIN = SyntheticConfig(image_size=96, background="plain", relation_probability=0.5)


def _samples(count: int, split: str = "train", config: SyntheticConfig = SMALL) -> list[dict]:
    return [generate_sample(i, split, config) for i in range(count)]


def _records(sample: dict) -> dict:
    return {key: value for key, value in sample.items() if key != "image"}


def _boxes(sample: dict) -> list[tuple[float, float, float, float]]:
    return [tuple(box) for box in sample["objects"]["bbox"]]


# ---------------------------------------------------------------------------------------------
# Determinism


def test_same_index_is_identical_in_any_generation_order() -> None:
    forward = {i: generate_sample(i, "train", SMALL) for i in range(6)}
    backward = {i: generate_sample(i, "train", SMALL) for i in reversed(range(6))}
    for i in range(6):
        assert np.array_equal(np.asarray(forward[i]["image"]), np.asarray(backward[i]["image"]))
        assert _records(forward[i]) == _records(backward[i])


_DIGEST_SCRIPT = """
import hashlib, json
from loupe_hf.data import SyntheticConfig, generate_sample
config = SyntheticConfig(image_size=64)
out = {}
for split, index in reversed(%r):
    sample = generate_sample(index, split, config)
    record = {k: v for k, v in sample.items() if k != "image"}
    out[f"{split}/{index}"] = [hashlib.sha256(sample["image"].tobytes()).hexdigest(), record]
print(json.dumps(out, sort_keys=True))
"""


def test_sample_is_identical_in_fresh_process_with_other_hash_seed() -> None:
    import hashlib

    keys = [("train", 0), ("train", 7), ("validation", 3), ("compositional", 5)]
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-c", _DIGEST_SCRIPT % (keys,)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    remote = json.loads(result.stdout)
    for split, index in keys:
        sample = generate_sample(index, split, SMALL)
        local = [hashlib.sha256(sample["image"].tobytes()).hexdigest(), _records(sample)]
        assert remote[f"{split}/{index}"] == json.loads(json.dumps(local))


def test_different_indices_and_splits_give_different_samples() -> None:
    images = [np.asarray(s["image"]) for s in _samples(8)]
    for a, b in itertools.combinations(images, 2):
        assert not np.array_equal(a, b)
    train, validation = generate_sample(0, "train", SMALL), generate_sample(0, "validation", SMALL)
    assert _records(train) != _records(validation)


def test_very_large_index_is_generated_directly() -> None:
    sample = generate_sample(10**12, "train", SMALL)
    assert sample["image_id"] == 10**12
    assert _records(sample) == _records(generate_sample(10**12, "train", SMALL))


def test_seed_changes_samples() -> None:
    other = SyntheticConfig(image_size=64, seed=1)
    assert _records(generate_sample(0, "train", SMALL)) != _records(
        generate_sample(0, "train", other)
    )


# ---------------------------------------------------------------------------------------------
# Boxes and pixels


def test_boxes_lie_inside_image() -> None:
    for sample in _samples(100):
        for x, y, w, h in _boxes(sample):
            assert x >= 0 and y >= 0 and w > 0 and h > 0
            assert x + w <= sample["width"] and y + h <= sample["height"]


def test_boxes_do_not_overlap() -> None:
    for sample in _samples(150, config=CROWDED):
        for (ax, ay, aw, ah), (bx, by, bw, bh) in itertools.combinations(_boxes(sample), 2):
            # Compare the whole pixels each box touches: even anti-aliased edges stay apart.
            apart_x = math.ceil(ax + aw) <= math.floor(bx) or math.ceil(bx + bw) <= math.floor(ax)
            apart_y = math.ceil(ay + ah) <= math.floor(by) or math.ceil(by + bh) <= math.floor(ay)
            assert apart_x or apart_y


def _outer_pixels(box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    x, y, w, h = box
    return math.floor(x), math.floor(y), math.ceil(x + w), math.ceil(y + h)


def test_boxes_tightly_contain_object_pixels_on_plain_background() -> None:
    for sample in _samples(40, config=PLAIN):
        pixels = np.asarray(sample["image"]).astype(int)
        colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
        background = colours[counts.argmax()]
        changed = (pixels != background).any(axis=2)
        covered = np.zeros_like(changed)
        for box in _boxes(sample):
            x0, y0, x1, y1 = _outer_pixels(box)
            covered[y0:y1, x0:x1] = True
            # One pixel of context: objects are further apart than that.
            top, left = max(y0 - 1, 0), max(x0 - 1, 0)
            window = changed[top : y1 + 1, left : x1 + 1]
            rows, cols = np.flatnonzero(window.any(axis=1)), np.flatnonzero(window.any(axis=0))
            assert (top + rows[0], top + rows[-1] + 1) == (y0, y1)
            assert (left + cols[0], left + cols[-1] + 1) == (x0, x1)
        assert not (changed & ~covered).any()


def test_object_pixels_have_the_named_colour() -> None:
    for sample in _samples(40, config=PLAIN):
        pixels = np.asarray(sample["image"]).astype(int)
        objects = sample["objects"]
        for box, colour, category in zip(
            objects["bbox"], objects["colour"], objects["category"], strict=True
        ):
            if category == "ring":
                continue  # the middle of a ring is background
            x, y, w, h = (round(v) for v in box)
            centre = pixels[y + h // 2 - 1 : y + h // 2 + 2, x + w // 2 - 1 : x + w // 2 + 2]
            distances = np.linalg.norm(centre - np.array(COLOUR_RGB[colour]), axis=-1)
            assert distances.min() < 2


@pytest.mark.parametrize("shape", ["square", "circle"])
def test_rasterized_box_is_exact_for_box_filling_shapes(shape: str) -> None:
    mask = rasterize_shape(shape, side=10, left=5, top=7, supersample=4, subpixel_offset=(1, 3))
    assert mask.bbox == (5.25, 7.75, 10.0, 10.0)
    rows = np.flatnonzero(mask.alpha.any(axis=1))
    cols = np.flatnonzero(mask.alpha.any(axis=0))
    assert (mask.top + rows[0], mask.top + rows[-1] + 1) == (7, 18)
    assert (mask.left + cols[0], mask.left + cols[-1] + 1) == (5, 16)


def test_rasterized_coverage_extent_matches_box_for_every_shape() -> None:
    for shape in SHAPES:
        mask = rasterize_shape(shape, side=13, left=2, top=3, supersample=4, subpixel_offset=(2, 1))
        rows = np.flatnonzero(mask.alpha.any(axis=1))
        cols = np.flatnonzero(mask.alpha.any(axis=0))
        x0, y0, x1, y1 = _outer_pixels(mask.bbox)
        assert (mask.left + cols[0], mask.left + cols[-1] + 1) == (x0, x1), shape
        assert (mask.top + rows[0], mask.top + rows[-1] + 1) == (y0, y1), shape
        assert max(mask.bbox[2], mask.bbox[3]) == 13, shape


def test_area_is_positive_and_within_box() -> None:
    for sample in _samples(50):
        for (_, _, w, h), area in zip(_boxes(sample), sample["objects"]["area"], strict=True):
            assert 0 < area <= w * h + 1e-6


# ---------------------------------------------------------------------------------------------
# Language


def test_phrase_spans_index_phrases_in_caption() -> None:
    for sample in _samples(200, config=PLAIN):
        caption, objects = sample["caption"], sample["objects"]
        for phrase, name, (start, end) in zip(
            objects["phrase"], objects["name"], objects["phrase_span"], strict=True
        ):
            assert caption[start:end] == phrase
            assert phrase == f"a {name}"
        starts = [start for start, _ in objects["phrase_span"]]
        assert starts == sorted(starts)


def test_name_lists_size_colour_and_category() -> None:
    for sample in _samples(50):
        objects = sample["objects"]
        for name, size, colour, category in zip(
            objects["name"], objects["size"], objects["colour"], objects["category"], strict=True
        ):
            assert name == f"{size} {colour} {category}"
            assert size in SIZES and colour in COLOURS and category in SHAPES


_RELATION_WORDS = {
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
}


def _relation_holds(predicate: str, subject: tuple, other: tuple) -> bool:
    (x, y, w, h), (ox, oy, ow, oh) = subject, other
    return {
        "left": x + w <= ox,
        "right": ox + ow <= x,
        "above": y + h <= oy,
        "below": oy + oh <= y,
    }[predicate]


def test_caption_relations_hold_for_boxes_and_are_stated() -> None:
    stated = 0
    for sample in _samples(150, config=PLAIN):
        boxes, phrases = _boxes(sample), sample["objects"]["phrase"]
        for relation in sample["relations"]:
            subject, other = relation["subject"], relation["object"]
            assert _relation_holds(relation["predicate"], boxes[subject], boxes[other])
            words = _RELATION_WORDS[relation["predicate"]]
            assert f"{phrases[subject]} {words} {phrases[other]}" in sample["caption"]
            stated += 1
    assert stated > 10


_SUFFIXES = {"on the left": "left", "on the right": "right", "at the top": "top"}
_SUFFIXES["at the bottom"] = "bottom"
_SUPERLATIVES = {"leftmost": "left", "rightmost": "right", "topmost": "top"}
_SUPERLATIVES["bottommost"] = "bottom"


def _parse_expression(text: str) -> tuple[dict[str, str], str | None]:
    """Attributes and position of a referring expression, parsed from its words alone."""
    assert text.startswith("the ")
    rest, position = text[len("the ") :], None
    for suffix, name in _SUFFIXES.items():
        if rest.endswith(" " + suffix):
            rest, position = rest[: -len(suffix) - 1], name
    words = rest.split()
    if words[0] in _SUPERLATIVES:
        assert position is None
        position = _SUPERLATIVES[words.pop(0)]
    attributes = {"category": words.pop()}
    for word in words:
        key = "size" if word in SIZES else "colour"
        assert key not in attributes and word in (*SIZES, *COLOURS)
        attributes[key] = word
    return attributes, position


def _referents(attributes: dict[str, str], position: str | None, sample: dict) -> list[int]:
    objects, boxes = sample["objects"], _boxes(sample)
    matching = [
        k
        for k in range(len(boxes))
        if all(objects[key][k] == value for key, value in attributes.items())
    ]
    if position is None:
        return matching
    beyond = {"left": "left", "right": "right", "top": "above", "bottom": "below"}[position]
    return [
        k
        for k in matching
        if all(_relation_holds(beyond, boxes[k], boxes[j]) for j in matching if j != k)
    ]


def test_referring_expressions_single_out_their_object() -> None:
    kinds = Counter()
    for split in ("train", "compositional"):
        for sample in _samples(150, split, CROWDED):
            expressions = sample["referring_expressions"]
            assert sorted(e["object_index"] for e in expressions) == list(
                range(len(sample["objects"]["bbox"]))
            )
            for expression in expressions:
                attributes, position = _parse_expression(expression["text"])
                assert _referents(attributes, position, sample) == [expression["object_index"]]
                kinds[(len(attributes), position is not None)] += 1
    # The checks above must have covered every kind of expression.
    assert {(1, False), (2, False), (3, False), (1, True), (2, True)} <= set(kinds)


def test_referring_expressions_use_fewest_attributes() -> None:
    for sample in _samples(150, "compositional", CROWDED):
        objects = sample["objects"]
        for expression in sample["referring_expressions"]:
            attributes, position = _parse_expression(expression["text"])
            target = expression["object_index"]
            full = {key: objects[key][target] for key in ("category", "colour", "size")}
            for extra in itertools.chain.from_iterable(
                itertools.combinations(("colour", "size"), n) for n in range(3)
            ):
                shorter = {"category": full["category"], **{key: full[key] for key in extra}}
                # A position is only added when no attributes-only description suffices.
                if position is not None or len(shorter) < len(attributes):
                    assert _referents(shorter, None, sample) != [target]


def test_training_captions_match_sample_captions() -> None:
    texts = list(training_captions(5, SMALL))
    for sample in _samples(5):
        assert sample["caption"] in texts
        for expression in sample["referring_expressions"]:
            assert expression["text"] in texts
    assert list(training_captions(5, SMALL, include_referring_expressions=False)) == [
        s["caption"] for s in _samples(5)
    ]


# ---------------------------------------------------------------------------------------------
# Splits and counts


def test_held_out_combinations_are_a_fifth_and_depend_on_seed() -> None:
    held_out = held_out_combinations(SyntheticConfig())
    assert len(held_out) == round(0.2 * len(SHAPES) * len(COLOURS))
    assert held_out != held_out_combinations(SyntheticConfig(seed=3))
    assert held_out == held_out_combinations(SyntheticConfig(seed=0, image_size=64))


def test_every_shape_and_colour_appears_in_train() -> None:
    combinations = split_combinations("train")
    assert {shape for shape, _ in combinations} == set(SHAPES)
    assert {colour for _, colour in combinations} == set(COLOURS)
    seen = Counter()
    for sample in _samples(300):
        seen.update(sample["objects"]["category"])
        seen.update(sample["objects"]["colour"])
    assert set(SHAPES) | set(COLOURS) <= set(seen)


def test_train_and_validation_never_use_held_out_combinations() -> None:
    held_out = held_out_combinations(SMALL)
    for split in ("train", "validation"):
        for sample in _samples(300, split):
            objects = sample["objects"]
            pairs = zip(objects["category"], objects["colour"], strict=True)
            assert not held_out & set(pairs)


def test_compositional_split_uses_only_held_out_combinations() -> None:
    held_out = held_out_combinations(SMALL)
    seen = set()
    for sample in _samples(300, "compositional"):
        objects = sample["objects"]
        pairs = set(zip(objects["category"], objects["colour"], strict=True))
        assert pairs <= held_out
        seen |= pairs
    assert len(seen) > len(held_out) // 2


@pytest.mark.parametrize(("low", "high"), [(1, 4), (2, 3), (4, 4)])
def test_object_count_within_configured_bounds(low: int, high: int) -> None:
    config = SyntheticConfig(image_size=64, min_objects=low, max_objects=high)
    counts = Counter(len(s["objects"]["bbox"]) for s in _samples(100, config=config))
    assert set(counts) <= set(range(low, high + 1))
    assert max(counts) == high


# ---------------------------------------------------------------------------------------------
# Datasets and COCO


def test_build_dataset_has_declared_features_length_and_rows(tmp_path) -> None:
    dataset = build_dataset("validation", 6, SMALL, start=10, cache_dir=tmp_path)
    assert len(dataset) == 6
    assert dataset.features == dataset_features()
    for offset in (0, 5):
        row, sample = dataset[offset], generate_sample(10 + offset, "validation", SMALL)
        assert _records(row) == _records(sample)
        assert np.array_equal(np.asarray(row["image"]), np.asarray(sample["image"]))


def test_build_dataset_with_workers_keeps_index_order(tmp_path) -> None:
    dataset = build_dataset("train", 5, SMALL, start=2, num_proc=2, cache_dir=tmp_path)
    assert dataset["image_id"] == [2, 3, 4, 5, 6]
    assert dataset[4]["caption"] == generate_sample(6, "train", SMALL)["caption"]


def test_iter_samples_and_iterable_dataset_stream_the_same_samples() -> None:
    streamed = list(itertools.islice(iter_samples("train", SMALL, start=3), 3))
    iterable = list(itertools.islice(build_iterable_dataset("train", SMALL, start=3), 3))
    for k, sample in enumerate(_samples(6)[3:]):
        assert _records(streamed[k]) == _records(sample)
        assert _records(iterable[k]) == _records(sample)


def test_iterable_dataset_shards_partition_indices() -> None:
    dataset = build_iterable_dataset("train", SMALL, stop=6, num_shards=2)
    second = [row["image_id"] for row in dataset.shard(num_shards=2, index=1)]
    assert second == [1, 3, 5]
    assert sorted(row["image_id"] for row in dataset) == [0, 1, 2, 3, 4, 5]


def test_to_coco_round_trips_through_pycocotools(tmp_path) -> None:
    coco_module = pytest.importorskip(
        "pycocotools.coco", reason="pycocotools (eval extra) reads COCO files"
    )
    samples = _samples(5)
    path = save_coco_json(to_coco(samples, image_dir=tmp_path / "images"), tmp_path / "gt.json")
    coco = coco_module.COCO(str(path))
    assert {c["name"]: c["id"] for c in coco.loadCats(coco.getCatIds())} == SHAPE_CATEGORY_IDS
    for sample in samples:
        image = coco.loadImgs(sample["image_id"])[0]
        assert (tmp_path / "images" / image["file_name"]).is_file()
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=sample["image_id"]))
        assert [a["bbox"] for a in annotations] == sample["objects"]["bbox"]
        names = [coco.loadCats(a["category_id"])[0]["name"] for a in annotations]
        assert names == sample["objects"]["category"]


def test_to_coco_accepts_dataset_without_decoding_images(tmp_path) -> None:
    dataset = build_dataset("train", 3, SMALL, cache_dir=tmp_path)
    assert to_coco(dataset) == to_coco(_samples(3))


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 16}, "image_size"),
        ({"min_objects": 3, "max_objects": 2}, "min_objects"),
        ({"min_objects": 0}, "min_objects"),
        ({"holdout_fraction": 0.0}, "holdout_fraction"),
        ({"holdout_fraction": 0.75}, "holdout_fraction"),
        ({"background": "sky"}, "background"),
        ({"relation_probability": 1.5}, "relation_probability"),
        ({"image_size": 40, "max_objects": 16}, "too small"),
        ({"seed": -1}, "seed"),
        ({"contrast_group": 0}, "contrast_group"),
    ],
)
def test_bad_config_raises_value_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**kwargs)


def test_unknown_split_raises_value_error() -> None:
    with pytest.raises(ValueError, match="unknown split"):
        generate_sample(0, "test", SMALL)
    with pytest.raises(ValueError, match="unknown split"):
        build_dataset("dev", 2, SMALL)


def test_negative_index_raises_value_error() -> None:
    with pytest.raises(ValueError, match="index"):
        generate_sample(-1, "train", SMALL)


def test_colours_are_clearly_distinct() -> None:
    rgb = {name: np.array(value, dtype=float) for name, value in COLOUR_RGB.items()}
    for a, b in itertools.combinations(COLOURS, 2):
        assert np.linalg.norm(rgb[a] - rgb[b]) > 80, (a, b)


def test_object_colours_stand_out_from_every_background() -> None:
    tones = np.concatenate(
        [
            render_background(kind, 32, np.random.default_rng(seed)).reshape(-1, 3)
            for kind in BACKGROUNDS
            for seed in range(20)
        ]
    )
    for name, rgb in COLOUR_RGB.items():
        assert np.linalg.norm(tones - np.array(rgb), axis=1).min() > 60, name


# --------------------------------------------------------------------------------------------
# Contrast groups


def _differences(first: dict, second: dict) -> list[tuple[int, str]]:
    a, b = first["objects"], second["objects"]
    return [
        (k, attribute)
        for k in range(len(a["category"]))
        for attribute, column in (("shape", "category"), ("colour", "colour"), ("size", "size"))
        if a[column][k] != b[column][k]
    ]


@pytest.mark.parametrize("split", ["train", "compositional"])
def test_contrast_group_members_differ_from_their_scene_in_one_attribute_of_one_object(split):
    # The compositional split holds out few combinations: a one-object scene there has only two
    # edits, so members beyond them repeat one (only the training split is meant for groups).
    distinct = split == "train"
    config = SyntheticConfig(contrast_group=4)
    combinations = set(split_combinations(split, config))
    edits = Counter()
    for group in range(12):
        scene = generate_sample(4 * group, split, config)
        members = [generate_sample(4 * group + j, split, config) for j in range(1, 4)]
        seen = set()
        for member in members:
            changed = _differences(scene, member)
            assert len(changed) == 1, changed
            edits[changed[0][1]] += 1
            assert member["background"] == scene["background"]
            assert len(member["caption"].split()) == len(scene["caption"].split())
            key = (member["caption"], tuple(member["objects"]["name"]))
            assert key not in seen or not distinct  # every member is a different edit
            seen.add(key)
            objects = member["objects"]
            assert set(zip(objects["category"], objects["colour"], strict=True)) <= combinations
            assert np.asarray(member["image"]).tolist() != np.asarray(scene["image"]).tolist()
    assert edits["size"] == 0 and edits["shape"] > edits["colour"] > 0


def test_contrast_group_one_is_the_plain_benchmark():
    plain, grouped = SyntheticConfig(), SyntheticConfig(contrast_group=1)
    for index in range(5):
        assert (
            generate_sample(index, "train", plain)["caption"]
            == (generate_sample(index, "train", grouped)["caption"])
        )
