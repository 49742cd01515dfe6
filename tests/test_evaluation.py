"""Tests for loupe_hf.evaluation: metrics checked by hand, loaders on tiny real-format files."""

from __future__ import annotations

import copy
import json
import pickle
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from loupe_hf.data import generate_sample, to_coco
from loupe_hf.evaluation import (
    COCO_65_CATEGORY_IDS,
    COCO_CATEGORY_IDS,
    COCO_SEEN_48,
    COCO_UNSEEN_17,
    VOC_CATEGORY_IDS,
    VOC_CLASSES,
    VOC_TO_COCO,
    GroundingItem,
    box_iou,
    coco_map,
    grounding_accuracy,
    group_by_image,
    keep_top_detections,
    load_image_folder,
    load_karpathy_split,
    load_metric,
    load_refcoco,
    prompt_ensemble,
    prompt_for,
    recall_at_k,
    restrict_categories,
    retrieval_ranks,
    synthetic_grounding_items,
    zero_shot_accuracy,
)

# --------------------------------------------------------------------------------------------
# Detection


def _coco_gt(boxes: dict[int, list[tuple[int, list[float]]]], num_categories: int = 2) -> dict:
    """COCO ground truth from ``{image_id: [(category_id, [x, y, w, h]), ...]}``."""
    annotations = [
        {"image_id": image_id, "category_id": category_id, "bbox": bbox}
        for image_id, objects in boxes.items()
        for category_id, bbox in objects
    ]
    for annotation_id, annotation in enumerate(annotations, start=1):
        annotation["id"] = annotation_id
    return {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in boxes],
        "annotations": annotations,
        "categories": [{"id": c, "name": f"class{c}"} for c in range(1, num_categories + 1)],
    }


def _det(image_id: int, category_id: int, bbox: list[float], score: float = 1.0) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


def test_coco_map_perfect_detections_score_one():
    gt = _coco_gt({1: [(1, [0, 0, 10, 10]), (2, [20, 20, 30, 30])], 2: [(1, [5, 5, 40, 20])]})
    detections = [_det(a["image_id"], a["category_id"], a["bbox"]) for a in gt["annotations"]]
    result = coco_map(gt, detections)
    assert result["mAP@0.3"] == pytest.approx(1.0)
    assert result["mAP@0.5"] == pytest.approx(1.0)
    assert result["AP_per_category@0.5"] == pytest.approx({"class1": 1.0, "class2": 1.0})
    assert (result["num_images"], result["num_ground_truth"], result["num_detections"]) == (2, 3, 3)


def test_coco_map_iou_04_detection_counts_at_03_but_not_05():
    # class1: the detection covers the top 4 rows of a 10x10 box: IoU = 40 / 100 = 0.4.
    # class2: exact. mAP@0.3 = (1 + 1) / 2, mAP@0.5 = (0 + 1) / 2.
    gt = _coco_gt({1: [(1, [0, 0, 10, 10]), (2, [50, 50, 20, 20])]})
    detections = [_det(1, 1, [0, 0, 10, 4]), _det(1, 2, [50, 50, 20, 20])]
    result = coco_map(gt, detections, iou_thresholds=(0.3, 0.5))
    assert result["mAP@0.3"] == pytest.approx(1.0)
    assert result["mAP@0.5"] == pytest.approx(0.5)
    assert result["AP_per_category@0.5"] == pytest.approx({"class1": 0.0, "class2": 1.0})


def test_coco_map_wrong_category_scores_zero():
    gt = _coco_gt({1: [(1, [0, 0, 10, 10])]})
    result = coco_map(gt, [_det(1, 2, [0, 0, 10, 10])])
    assert result["mAP@0.5"] == 0.0
    assert result["AP_per_category@0.5"] == {"class1": 0.0}


def test_coco_map_excludes_categories_without_ground_truth_from_the_mean():
    # A false positive in class2, which has no ground truth, must not lower the mean.
    gt = _coco_gt({1: [(1, [0, 0, 10, 10])]})
    result = coco_map(gt, [_det(1, 1, [0, 0, 10, 10]), _det(1, 2, [30, 30, 10, 10])])
    assert result["mAP@0.5"] == pytest.approx(1.0)
    assert result["categories_without_gt"] == ["class2"]
    assert "class2" not in result["AP_per_category@0.5"]


def test_coco_map_duplicate_detection_lowers_precision():
    # Two objects; the duplicate of A outscores B: TP, FP, TP. Recall 0.5 at precision 1, then
    # recall 1 at precision 2/3: of the 101 recall points, 0..0.5 (51) get 1 and the 50 above
    # get 2/3.
    gt = _coco_gt({1: [(1, [0, 0, 10, 10]), (1, [50, 50, 10, 10])]}, num_categories=1)
    clean = [_det(1, 1, [0, 0, 10, 10], 0.9), _det(1, 1, [50, 50, 10, 10], 0.7)]
    duplicated = [*clean, _det(1, 1, [0, 0, 10, 10], 0.8)]
    assert coco_map(gt, clean)["mAP@0.5"] == pytest.approx(1.0)
    expected = (51 * 1.0 + 50 * 2 / 3) / 101
    assert coco_map(gt, duplicated)["mAP@0.5"] == pytest.approx(expected, abs=1e-9)


def test_coco_map_no_detections_scores_zero():
    gt = _coco_gt({1: [(1, [0, 0, 10, 10])], 2: [(2, [5, 5, 10, 10])]})
    result = coco_map(gt, [])
    assert result["mAP@0.3"] == 0.0
    assert result["mAP@0.5"] == 0.0
    assert result["num_detections"] == 0


def test_coco_map_leaves_inputs_unchanged():
    gt = _coco_gt({1: [(1, [0, 0, 10, 10])]})
    detections = [_det(1, 1, [0, 0, 10, 10])]
    gt_before, detections_before = copy.deepcopy(gt), copy.deepcopy(detections)
    coco_map(gt, detections)
    assert gt == gt_before
    assert detections == detections_before


def test_coco_map_rejects_detections_of_unknown_category():
    gt = _coco_gt({1: [(1, [0, 0, 10, 10])]})
    with pytest.raises(ValueError, match="category"):
        coco_map(gt, [_det(1, 7, [0, 0, 10, 10])])


def _pairwise_iou_xywh(a: list[float], b: list[float]) -> float:
    """Scalar IoU, written independently of the code under test."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _brute_force_ap(gt_boxes: dict, detections: list[dict], threshold: float) -> float:
    """101-point interpolated AP of one category: greedy matching in score order per image."""
    matched = {image: [False] * len(boxes) for image, boxes in gt_boxes.items()}
    hits = []
    for det in sorted(detections, key=lambda d: -d["score"]):
        boxes = gt_boxes.get(det["image_id"], [])
        best, best_iou = None, threshold
        for k, box in enumerate(boxes):
            iou = _pairwise_iou_xywh(det["bbox"], box)
            if not matched[det["image_id"]][k] and iou >= best_iou:
                best, best_iou = k, iou
        if best is not None:
            matched[det["image_id"]][best] = True
        hits.append(best is not None)
    num_gt = sum(len(boxes) for boxes in gt_boxes.values())
    tp = np.cumsum(hits)
    recall = tp / num_gt
    precision = tp / np.arange(1, len(hits) + 1)
    points = [
        max((p for p, r in zip(precision, recall, strict=True) if r >= level), default=0.0)
        for level in np.linspace(0, 1, 101)
    ]
    return float(np.mean(points))


def test_coco_map_matches_brute_force_ap_on_one_category():
    rng = np.random.default_rng(3)
    gt_boxes: dict[int, list[list[float]]] = {}
    detections = []
    for image_id in range(1, 9):
        boxes = [
            [*rng.uniform(0, 60, 2).round(1), *rng.uniform(8, 40, 2).round(1)]
            for _ in range(rng.integers(0, 4))
        ]
        gt_boxes[image_id] = boxes
        for box in boxes:  # jittered hits, some poor, plus random false positives
            for _ in range(rng.integers(0, 3)):
                jitter = rng.normal(0, 4, 4)
                detections.append({"bbox": list(np.maximum(np.add(box, jitter), 1.0))})
        for _ in range(rng.integers(0, 3)):
            detections.append({"bbox": [*rng.uniform(0, 60, 2), *rng.uniform(8, 40, 2)]})
        for det in detections:
            det.setdefault("image_id", image_id)
    scores = rng.permutation(len(detections)) / len(detections) + 0.01  # distinct
    for det, score in zip(detections, scores, strict=True):
        det.update(category_id=1, score=float(score), bbox=[float(v) for v in det["bbox"]])
    gt = _coco_gt({i: [(1, b) for b in boxes] for i, boxes in gt_boxes.items()}, 1)

    thresholds = (0.3, 0.5, 0.75)
    result = coco_map(gt, detections, iou_thresholds=thresholds)
    for t in thresholds:
        expected = _brute_force_ap(gt_boxes, detections, t)
        assert result[f"mAP@{t:g}"] == pytest.approx(expected, abs=1e-6)
    assert 0.0 < result["mAP@0.75"] < result["mAP@0.3"] < 1.0  # a non-trivial case


def test_coco_map_synthetic_ground_truth_against_itself_scores_one():
    coco = to_coco(generate_sample(i, "validation") for i in range(12))
    detections = [
        _det(a["image_id"], a["category_id"], a["bbox"], 1.0) for a in coco["annotations"]
    ]
    result = coco_map(coco, detections)
    assert result["mAP@0.3"] == pytest.approx(1.0)
    assert result["mAP@0.5"] == pytest.approx(1.0)


def test_restrict_categories_keeps_named_categories_and_their_images():
    gt = _coco_gt({1: [(1, [0, 0, 5, 5])], 2: [(2, [0, 0, 5, 5])], 3: [(1, [1, 1, 5, 5])]})
    restricted = restrict_categories(gt, ["class2"])
    assert [c["name"] for c in restricted["categories"]] == ["class2"]
    assert [a["image_id"] for a in restricted["annotations"]] == [2]
    assert [i["id"] for i in restricted["images"]] == [2]
    kept_all = restrict_categories(gt, ["class2"], drop_empty_images=False)
    assert len(kept_all["images"]) == 3
    with pytest.raises(ValueError, match="class9"):
        restrict_categories(gt, ["class9"])


def test_keep_top_detections_caps_each_image_over_categories():
    detections = [_det(1, c, [0, 0, 1, 1], s) for c, s in ((1, 0.2), (2, 0.9), (1, 0.5))]
    detections.append(_det(2, 1, [0, 0, 1, 1], 0.1))
    kept = keep_top_detections(detections, max_per_image=2)
    assert sorted((d["image_id"], d["score"]) for d in kept) == [(1, 0.5), (1, 0.9), (2, 0.1)]


def test_class_name_constants_are_consistent():
    assert len(COCO_SEEN_48) == 48 and len(COCO_UNSEEN_17) == 17
    assert not set(COCO_SEEN_48) & set(COCO_UNSEEN_17)
    assert len(COCO_65_CATEGORY_IDS) == 65
    assert COCO_65_CATEGORY_IDS["airplane"] == 5 and COCO_65_CATEGORY_IDS["toothbrush"] == 90
    assert len(COCO_CATEGORY_IDS) == 80 and len(set(COCO_CATEGORY_IDS.values())) == 80
    assert len(VOC_CLASSES) == 20 and sorted(VOC_CATEGORY_IDS.values()) == list(range(1, 21))
    assert set(VOC_TO_COCO.values()) <= set(COCO_CATEGORY_IDS)


def test_prompt_for_fills_the_detection_template():
    assert prompt_for("dog") == "an image of a dog."
    assert prompt_for("dog", "a photo of the {}.") == "a photo of the dog."
    with pytest.raises(ValueError):
        prompt_for("dog", "no slot")


# --------------------------------------------------------------------------------------------
# Retrieval

# 3 images x 6 texts; texts 2k and 2k+1 describe image k.
SIMILARITY = np.array(
    [
        [0.9, 0.1, 0.8, 0.3, 0.2, 0.0],
        [0.5, 0.4, 0.3, 0.6, 0.7, 0.1],
        [0.2, 0.7, 0.1, 0.25, 0.15, 0.05],
    ]
)
TEXT_TO_IMAGE = [0, 0, 1, 1, 2, 2]


def test_retrieval_ranks_by_hand():
    i2t, t2i = retrieval_ranks(SIMILARITY, TEXT_TO_IMAGE)
    # image 0: its text 0 is first. image 1: text 4 (0.7) beats its best, text 3 (0.6).
    # image 2: texts 1, 3, 0 beat its best, text 4 (0.15).
    assert i2t.tolist() == [0, 1, 3]
    # Columns: text 1 -> (0.7, 0.4) beat image 0's 0.1; text 2 -> 0.8 beats image 1's 0.3; ...
    assert t2i.tolist() == [0, 2, 1, 0, 2, 1]


def test_recall_at_k_by_hand_both_directions():
    result = recall_at_k(SIMILARITY, TEXT_TO_IMAGE, ks=(1, 2, 5))
    expected = {
        "i2t_R@1": 1 / 3,
        "i2t_R@2": 2 / 3,
        "i2t_R@5": 1.0,
        "t2i_R@1": 2 / 6,
        "t2i_R@2": 4 / 6,
        "t2i_R@5": 1.0,
    }
    expected["mean_recall"] = float(np.mean(list(expected.values())))
    assert result == pytest.approx(expected)


def test_recall_at_k_accepts_torch_and_small_chunks():
    reference = recall_at_k(SIMILARITY, TEXT_TO_IMAGE)
    assert recall_at_k(torch.tensor(SIMILARITY), torch.tensor(TEXT_TO_IMAGE)) == reference
    assert recall_at_k(SIMILARITY, TEXT_TO_IMAGE, chunk_size=1) == reference


def test_retrieval_ties_rank_lower_index_first():
    i2t, t2i = retrieval_ranks(np.zeros((3, 6)), TEXT_TO_IMAGE)
    assert i2t.tolist() == [0, 2, 4]  # the first caption of image k is text 2k
    assert t2i.tolist() == [0, 0, 1, 1, 2, 2]


def test_load_karpathy_split_reads_test_images_and_five_captions(tmp_path):
    sentences = [{"raw": f" caption {k} ", "tokens": ["caption", str(k)]} for k in range(6)]
    data = {
        "dataset": "coco",
        "images": [
            {"filepath": "val2014", "filename": "a.jpg", "split": "test", "sentences": sentences},
            {"filepath": "val2014", "filename": "b.jpg", "split": "train", "sentences": []},
            {"filename": "c.jpg", "split": "test", "sentences": sentences[:2]},
        ],
    }
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(data))
    split = load_karpathy_split(path, tmp_path / "images", "test", progress=False)
    assert split.image_paths == [
        str(tmp_path / "images" / "val2014" / "a.jpg"),
        str(tmp_path / "images" / "c.jpg"),
    ]
    assert split.captions == [f"caption {k}" for k in (0, 1, 2, 3, 4, 0, 1)]
    assert split.text_to_image == [0, 0, 0, 0, 0, 1, 1]
    assert split.image_to_texts() == [[0, 1, 2, 3, 4], [5, 6]]
    everything = load_karpathy_split(path, tmp_path, "test", None, progress=False)
    assert len(everything.captions) == 8
    with pytest.raises(ValueError, match="restval"):
        load_karpathy_split(path, tmp_path, "restval", progress=False)


# --------------------------------------------------------------------------------------------
# Grounding


def test_box_iou_by_hand_pairwise_and_aligned():
    boxes1 = [[0, 0, 10, 10], [5, 0, 10, 10]]  # xywh
    boxes2 = [[0, 0, 10, 10], [0, 0, 10, 5], [20, 20, 5, 5]]
    # [5, 0, 10, 10] vs [0, 0, 10, 5]: overlap 5 x 5 = 25, union 100 + 50 - 25 = 125.
    expected = [[1.0, 0.5, 0.0], [1 / 3, 25 / 125, 0.0]]
    np.testing.assert_allclose(box_iou(boxes1, boxes2), expected)
    xyxy1 = [[0, 0, 10, 10], [5, 0, 15, 10]]
    xyxy2 = [[0, 0, 10, 10], [0, 0, 10, 5], [20, 20, 25, 25]]
    np.testing.assert_allclose(box_iou(xyxy1, xyxy2, box_format="xyxy"), expected)
    np.testing.assert_allclose(box_iou(boxes1, boxes2[:2], aligned=True), [1.0, 0.2])
    assert box_iou([[0, 0, 0, 0]], [[0, 0, 0, 0]]).tolist() == [[0.0]]  # empty union


def test_aligned_box_iou_is_the_diagonal_of_the_pairwise_one_across_blocks():
    generator = np.random.default_rng(0)
    corners = generator.uniform(0, 50, size=(1100, 2))
    boxes1 = np.concatenate([corners, generator.uniform(1, 20, size=(1100, 2))], axis=1)
    boxes2 = boxes1 + generator.normal(0, 3, size=boxes1.shape).clip(-0.9, None)
    aligned = box_iou(boxes1, boxes2, aligned=True)
    assert aligned.shape == (1100,)
    np.testing.assert_allclose(aligned, np.diagonal(box_iou(boxes1, boxes2)))
    with pytest.raises(ValueError, match="equal counts"):
        box_iou(boxes1, boxes2[:3], aligned=True)


def test_grounding_accuracy_by_hand():
    gt = [[0, 0, 10, 10]] * 4
    # IoUs: 1, 1/3 (half shifted), 0.5 exactly (top half: counts, the threshold is inclusive), 0.
    pred = [[0, 0, 10, 10], [5, 0, 10, 10], [0, 0, 10, 5], [20, 20, 5, 5]]
    result = grounding_accuracy(pred, gt)
    assert result["accuracy"] == 0.5
    assert result["mean_iou"] == pytest.approx((1 + 1 / 3 + 0.5 + 0) / 4)
    assert grounding_accuracy(pred, gt, iou_threshold=0.3)["accuracy"] == 0.75
    xyxy_pred = torch.tensor([[0, 0, 10, 10], [5, 0, 15, 10], [0, 0, 10, 5], [20, 20, 25, 25]])
    xyxy_gt = torch.tensor([[0, 0, 10, 10]] * 4)
    assert grounding_accuracy(xyxy_pred, xyxy_gt, box_format="xyxy")["accuracy"] == 0.5


def _write_refcoco(tmp_path):
    """A tiny refcoco/ directory in the real formats: refs(unc).p and instances.json."""
    refs = [
        {
            "sent_ids": [0, 1],
            "file_name": "COCO_train2014_000000000042_7.jpg",
            "ann_id": 7,
            "ref_id": 0,
            "image_id": 42,
            "split": "val",
            "sentences": [
                {"tokens": ["man", "left"], "raw": "Man LEFT", "sent_id": 0, "sent": "man left"},
                {"tokens": ["guy"], "raw": "guy", "sent_id": 1, "sent": "guy"},
            ],
            "category_id": 1,
        },
        {
            "sent_ids": [2],
            "file_name": "COCO_train2014_000000000043_8.jpg",
            "ann_id": 8,
            "ref_id": 1,
            "image_id": 43,
            "split": "testA",
            "sentences": [{"tokens": ["woman"], "raw": "woman", "sent_id": 2, "sent": "woman"}],
            "category_id": 1,
        },
    ]
    instances = {
        "images": [
            {"id": 42, "file_name": "COCO_train2014_000000000042.jpg", "height": 480, "width": 640},
            {"id": 43, "file_name": "COCO_train2014_000000000043.jpg", "height": 480, "width": 640},
        ],
        "annotations": [
            {"id": 7, "image_id": 42, "category_id": 1, "bbox": [10.5, 20.0, 30.0, 40.0]},
            {"id": 8, "image_id": 43, "category_id": 1, "bbox": [1.0, 2.0, 3.0, 4.0]},
        ],
        "categories": [{"id": 1, "name": "person", "supercategory": "person"}],
    }
    directory = tmp_path / "refcoco"
    directory.mkdir()
    with (directory / "refs(unc).p").open("wb") as handle:
        pickle.dump(refs, handle, protocol=2)  # the released files are Python 2 pickles
    (directory / "instances.json").write_text(json.dumps(instances))
    return directory


def test_load_refcoco_yields_one_item_per_expression(tmp_path):
    directory = _write_refcoco(tmp_path)
    root = tmp_path / "train2014"
    items = load_refcoco(
        directory / "refs(unc).p", directory / "instances.json", root, "val", progress=False
    )
    image = str(root / "COCO_train2014_000000000042.jpg")
    assert items == [
        (image, "man left", (10.5, 20.0, 30.0, 40.0)),
        (image, "guy", (10.5, 20.0, 30.0, 40.0)),
    ]
    test_a = load_refcoco(
        directory / "refs(unc).p", directory / "instances.json", root, "testA", progress=False
    )
    assert [(item.expression, item.box) for item in test_a] == [("woman", (1.0, 2.0, 3.0, 4.0))]


class _RunsCode:
    """A pickle payload that would call `os.system` when unpickled by plain `pickle.load`."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_refs_files_that_name_any_class_are_refused_without_running_it(tmp_path):
    directory = _write_refcoco(tmp_path)
    crafted = directory / "refs(crafted).p"
    crafted.write_bytes(pickle.dumps([{"split": "val", "payload": _RunsCode()}], protocol=2))
    with pytest.raises(
        ValueError,
        match=r"refs\(crafted\)\.p is not a plain RefCOCO refs file: refuses to load (posix|os)\.system",
    ):
        load_refcoco(crafted, directory / "instances.json", tmp_path, "val", progress=False)


def test_python2_refs_with_sets_and_latin1_bytes_still_load(tmp_path):
    directory = _write_refcoco(tmp_path)
    refs = pickle.loads((directory / "refs(unc).p").read_bytes())
    refs[0]["tags"] = {"left", "man"}  # a set is a plain container too
    (directory / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    items = load_refcoco(
        directory / "refs(unc).p", directory / "instances.json", tmp_path, "val", progress=False
    )
    assert len(items) == 2


def test_synthetic_grounding_items_match_the_referred_objects():
    samples = [generate_sample(i, "validation") for i in range(4, 8)]  # 1 to 4 objects each
    items = synthetic_grounding_items(samples)
    expected = [
        (sample["image"], e["text"], tuple(sample["objects"]["bbox"][e["object_index"]]))
        for sample in samples
        for e in sample["referring_expressions"]
    ]
    assert len(items) == len(expected) == 10
    for item, (image, text, box) in zip(items, expected, strict=True):
        assert item.image is image and item.expression == text and item.box == box
    gt = np.array([item.box for item in items])
    assert grounding_accuracy(gt, gt)["accuracy"] == 1.0


def test_group_by_image_groups_expressions_of_the_same_image():
    samples = [generate_sample(i, "validation") for i in range(4, 8)]  # 2, 1, 4, 3 expressions
    groups = group_by_image(synthetic_grounding_items(samples))
    assert groups == [[0, 1], [2], [3, 4, 5, 6], [7, 8, 9]]
    paths = [
        ("a.jpg", "x", (0, 0, 1, 1)),
        ("b.jpg", "y", (0, 0, 1, 1)),
        ("a.jpg", "z", (0, 0, 1, 1)),
    ]
    assert group_by_image([GroundingItem(*item) for item in paths]) == [[0, 2], [1]]


# --------------------------------------------------------------------------------------------
# Classification


def test_load_image_folder_returns_images_and_class_names(tmp_path):
    for k, name in enumerate(("golden_retriever", "cat")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (8, 8), (100 * k, 50 * j, 0)).save(
                tmp_path / "data" / name / f"{j}.png"
            )
    dataset, names = load_image_folder(tmp_path / "data", cache_dir=tmp_path / "cache")
    assert names == ["cat", "golden retriever"]
    assert len(dataset) == 4
    assert sorted(dataset["label"]) == [0, 0, 1, 1]
    # Each image's red channel tells its folder: 0 = golden_retriever, 100 = cat.
    folder_of_red = {0: "golden retriever", 100: "cat"}
    for row in dataset:
        assert row["image"].size == (8, 8)
        assert names[row["label"]] == folder_of_red[row["image"].getpixel((0, 0))[0]]


def test_zero_shot_accuracy_by_hand():
    logits = np.array(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: rank 0
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 1: rank 1
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 5: rank 5
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 3: ties, rank 3 (lower index first)
        ]
    )
    labels = [0, 1, 5, 3]
    result = zero_shot_accuracy(logits, labels)
    assert result == pytest.approx({"top1": 0.25, "top5": 0.75, "mean_per_class_top1": 0.25})
    two_of_class_0 = zero_shot_accuracy(logits[[0, 0, 1]], [0, 0, 1], ks=(1,))
    # Class 0: 2/2 correct, class 1: 0/1 -> per-class mean 0.5 vs overall 2/3.
    assert two_of_class_0 == pytest.approx({"top1": 2 / 3, "mean_per_class_top1": 0.5})


def test_prompt_ensemble_fills_every_template_for_every_class():
    prompts = prompt_ensemble(["cat", "dog"], ["a {}.", "art of the {}."])
    assert prompts == [["a cat.", "art of the cat."], ["a dog.", "art of the dog."]]


# --------------------------------------------------------------------------------------------
# evaluate metric scripts


@pytest.fixture()
def offline(monkeypatch):
    """No network: HF offline flags, and any socket connection fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise OSError("network access during an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


_BOXES_PRED = [[0, 0, 10, 10], [5, 0, 10, 10], [0, 0, 10, 5]]
_BOXES_GT = [[0, 0, 10, 10]] * 3
_LOGITS = [[0.9, 0.1, 0.0], [0.2, 0.1, 0.7], [0.1, 0.5, 0.4]]
METRIC_CASES = {
    "retrieval_recall": (
        {
            "predictions": SIMILARITY.tolist(),
            "references": [[0, 1], [2, 3], [4, 5]],
            "ks": [1, 2, 5],
        },
        lambda: recall_at_k(SIMILARITY, TEXT_TO_IMAGE, ks=(1, 2, 5)),
    ),
    "grounding_accuracy": (
        {"predictions": _BOXES_PRED, "references": _BOXES_GT, "iou_threshold": 0.5},
        lambda: grounding_accuracy(_BOXES_PRED, _BOXES_GT, 0.5),
    ),
    "zero_shot_accuracy": (
        {"predictions": _LOGITS, "references": [0, 1, 2], "ks": [1, 2]},
        lambda: zero_shot_accuracy(_LOGITS, [0, 1, 2], ks=(1, 2)),
    ),
}


@pytest.mark.parametrize("name", sorted(METRIC_CASES))
def test_metric_script_loads_offline_and_matches_the_function(name, offline, tmp_path):
    inputs, plain = METRIC_CASES[name]
    metric = load_metric(name, cache_dir=str(tmp_path), keep_in_memory=True)
    assert metric.compute(**inputs) == plain()


def test_load_metric_rejects_unknown_names():
    with pytest.raises(ValueError, match="accuracy"):
        load_metric("accuracy")


def test_retrieval_metric_script_accumulates_batches(offline, tmp_path):
    metric = load_metric("retrieval_recall", cache_dir=str(tmp_path), keep_in_memory=True)
    metric.add_batch(predictions=SIMILARITY[:2].tolist(), references=[[0, 1], [2, 3]])
    metric.add_batch(predictions=SIMILARITY[2:].tolist(), references=[[4, 5]])
    assert metric.compute(ks=[1, 5, 10]) == recall_at_k(SIMILARITY, TEXT_TO_IMAGE)
