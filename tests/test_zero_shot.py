"""Zero-shot detection, grounding and classification through the direct API and the pipelines."""

from __future__ import annotations

import pytest
import torch
from transformers import pipeline

from loupe_hf import LoupeConfig, LoupeForZeroShotDetection, LoupeProcessor
from loupe_hf.data import generate_sample

LABELS = ["star", "circle", "red square", "heart", "cross"]


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory, tiny_config, processor):
    config = LoupeConfig.from_dict(tiny_config.to_dict())
    config.set_prompt_template(processor.tokenizer)
    torch.manual_seed(0)
    model = LoupeForZeroShotDetection(config).eval()
    with torch.no_grad():
        model.loupe.similarity_offset.fill_(0.05)  # as if calibrated by pre-training
    path = tmp_path_factory.mktemp("detector")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def detector(detector_dir):
    return LoupeForZeroShotDetection.from_pretrained(detector_dir).eval()


@pytest.fixture(scope="module")
def image():
    return generate_sample(3, "validation")["image"]


def test_prompt_template_tokens_wrap_bare_labels(detector, processor):
    bare = processor.tokenizer(["star"], return_tensors="pt")
    templated = processor.tokenizer(["an image of a star."], return_tensors="pt")
    wrapped, mask = detector._wrap_in_prompt(bare["input_ids"], bare["attention_mask"])
    assert wrapped.tolist() == templated["input_ids"].tolist() and mask.all()
    with torch.no_grad():
        torch.testing.assert_close(
            detector.encode_queries(bare["input_ids"], bare["attention_mask"]),
            detector.encode_queries(
                templated["input_ids"], templated["attention_mask"], apply_prompt_template=False
            ),
        )


def test_prompt_template_needs_one_placeholder(tiny_config, processor):
    with pytest.raises(ValueError, match="exactly one"):
        LoupeConfig.from_dict(tiny_config.to_dict()).set_prompt_template(
            processor.tokenizer, "no placeholder"
        )


def test_detect_returns_pixel_boxes_sorted_by_score(detector, processor, image):
    result = detector.detect(image, LABELS, processor, threshold=0.0, top_k=5)[0]
    assert len(result["scores"]) == 5
    assert torch.all(result["scores"][:-1] >= result["scores"][1:])
    assert set(result["text_labels"]) <= set(LABELS)
    boxes = result["boxes"]
    assert (
        boxes.min() >= 0
        and boxes[:, [0, 2]].max() <= image.width
        and boxes[:, [1, 3]].max() <= image.height
    )
    assert torch.all(boxes[:, 2] > boxes[:, 0]) and torch.all(boxes[:, 3] > boxes[:, 1])


def test_detection_threshold_and_top_k(detector, processor, image):
    everything = detector.detect(image, LABELS, processor, threshold=0.0, nms_threshold=1.0)[0]
    config = detector.config
    assert len(everything["scores"]) == (config.detection_num_regions or config.num_regions) * len(
        LABELS
    )
    cut = float(everything["scores"].median())
    above = detector.detect(image, LABELS, processor, threshold=cut, nms_threshold=1.0)[0]
    assert len(above["scores"]) < len(everything["scores"]) and above["scores"].min() >= cut


def test_class_aware_nms_removes_overlapping_boxes_of_one_label(processor):
    outputs = {
        "logits": torch.tensor([[[3.0, 0.0], [2.0, 0.0], [1.0, 0.0]]]),
        "pred_boxes": torch.tensor(
            [[[0.5, 0.5, 0.4, 0.4], [0.51, 0.5, 0.4, 0.4], [0.1, 0.1, 0.1, 0.1]]]
        ),
    }
    result = processor.image_processor.post_process_object_detection(
        outputs, threshold=0.6, nms_threshold=0.5
    )[0]
    assert result["labels"].tolist() == [0, 0] and result["scores"].tolist() == pytest.approx(
        torch.sigmoid(torch.tensor([3.0, 1.0])).tolist()
    )
    sized = processor.image_processor.post_process_object_detection(
        outputs, threshold=0.9, target_sizes=[(100, 200)]
    )
    torch.testing.assert_close(sized[0]["boxes"], torch.tensor([[60.0, 30.0, 140.0, 70.0]]))


def test_pipeline_matches_the_direct_api(detector_dir, detector, processor, image):
    detect = pipeline("zero-shot-object-detection", model=str(detector_dir))
    assert isinstance(detect.model, LoupeForZeroShotDetection)
    piped = detect(image, candidate_labels=LABELS, threshold=0.0, top_k=3)
    direct = detector.detect(image, LABELS, processor, threshold=0.0, top_k=3)[0]
    assert [item["label"] for item in piped] == direct["text_labels"]
    assert [item["score"] for item in piped] == pytest.approx(direct["scores"].tolist(), abs=1e-5)
    box = piped[0]["box"]
    assert (
        0 <= box["xmin"] < box["xmax"] <= image.width
        and 0 <= box["ymin"] < box["ymax"] <= image.height
    )


def test_pipeline_batches_images(detector_dir, image):
    detect = pipeline("zero-shot-object-detection", model=str(detector_dir))
    other = generate_sample(4, "validation")["image"]
    queries = [
        {"image": image, "candidate_labels": ["star", "ring"]},
        {"image": other, "candidate_labels": ["heart"]},
    ]
    results = detect(queries, batch_size=2, threshold=0.0, top_k=2)
    assert len(results) == 2 and all(len(result) == 2 for result in results)
    assert {item["label"] for item in results[1]} == {"heart"}


def test_grounding_returns_one_box_per_image(detector, processor, image):
    other = generate_sample(4, "validation")["image"]
    results = detector.ground([image, other], ["the star", "the large heart"], processor)
    assert [result["expression"] for result in results] == ["the star", "the large heart"]
    for result in results:
        x0, y0, x1, y1 = result["box"]
        assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
        regions = detector.config.detection_num_regions or detector.config.num_regions
        assert 0 < result["score"] < 1 and 0 <= result["region_index"] < regions
    with pytest.raises(ValueError, match="one per image"):
        detector.ground([image, other], ["the star"], processor)
    with pytest.raises(ValueError, match="empty"):
        detector.ground([image], [" "], processor)


def test_detect_rejects_empty_labels(detector, processor, image):
    with pytest.raises(ValueError, match="no labels"):
        detector.detect(image, [], processor)
    with pytest.raises(ValueError, match="label 1 is empty"):
        detector.detect(image, ["star", ""], processor)


def test_classification_pipeline_applies_the_checkpoints_prompt_by_default(detector_dir, image):
    classify = pipeline("zero-shot-image-classification", model=str(detector_dir))
    labels = ["star", "circle", "heart"]

    def scores(**kwargs) -> dict[str, float]:
        return {item["label"]: item["score"] for item in classify(image, labels, **kwargs)}

    by_default, in_template = scores(), scores(hypothesis_template="an image of a {}.")
    assert by_default == pytest.approx(in_template, abs=1e-6)
    bare = scores(hypothesis_template="{}")  # any other wording is scored as written
    assert max(abs(bare[label] - by_default[label]) for label in labels) > 1e-4


def test_zero_shot_image_classification_pipeline(detector_dir, image):
    classify = pipeline("zero-shot-image-classification", model=str(detector_dir))
    result = classify(
        image, candidate_labels=["star", "circle", "heart"], hypothesis_template="an image of a {}."
    )
    assert sorted(item["label"] for item in result) == ["circle", "heart", "star"]
    assert sum(item["score"] for item in result) == pytest.approx(1.0)


def test_processor_adds_text_labels(processor):
    outputs = {
        "logits": torch.tensor([[[2.0, 3.0]]]),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]]]),
    }
    result = LoupeProcessor.post_process_grounded_object_detection(
        processor, outputs, text_labels=["cat", "dog"], threshold=0.5, nms_threshold=None
    )[0]
    assert result["text_labels"] == ["dog", "cat"]


def test_objectness_weight_adds_the_confidence_log_odds(detector, monkeypatch):
    from loupe_hf.modeling_loupe import LoupeImageRegions

    regions = LoupeImageRegions(
        region_embeds=torch.nn.functional.normalize(torch.randn(1, 3, 8), dim=-1),
        boxes=torch.rand(1, 3, 4),
        objectness=torch.tensor([[0.5, 0.9, 0.1]]),
    )
    queries = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    monkeypatch.setattr(detector.config, "detection_objectness_weight", 0.0)  # the paper's score
    plain = detector.score(regions, queries)
    monkeypatch.setattr(detector.config, "detection_objectness_weight", 2.0)
    weighted = detector.score(regions, queries)
    log_odds = torch.logit(regions.objectness)[..., None].expand_as(plain)
    torch.testing.assert_close(weighted - plain, 2.0 * log_odds)


def test_processor_takes_one_query_list_per_image_as_owlvit_does(detector, processor):
    images = [torch.randint(0, 255, (3, 40, 50), dtype=torch.uint8) for _ in range(2)]
    inputs = processor(images=images, text=[["circle", "star", "heart"], ["circle"]])
    assert inputs["input_ids"].shape[0] == 6  # padded to three queries per image
    rows = processor.tokenizer.batch_decode(inputs["input_ids"], skip_special_tokens=True)
    assert rows[:4] == ["circle", "star", "heart", "circle"] and rows[4:] == ["", ""]
    with torch.no_grad():
        outputs = detector(**inputs)
    assert outputs.logits.shape[0] == 2 and outputs.logits.shape[-1] == 3
    results = processor.post_process_grounded_object_detection(
        outputs, 0.0, [(40, 50), (40, 50)], [["circle", "star", "heart"], ["circle", "", ""]]
    )
    assert len(results) == 2 and set(results[1]["text_labels"]) <= {"circle", ""}
    plain = processor.post_process_object_detection(outputs, 0.0, [(40, 50), (40, 50)])
    torch.testing.assert_close(plain[0]["scores"], results[0]["scores"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ([["circle"], "star"], "mixes strings and lists"),
        ([["circle"], []], "image 1 has an empty list"),
        ([["circle", " "]], "text 0, query 1 is empty"),
    ],
)
def test_nested_queries_are_checked(processor, text, message):
    with pytest.raises(ValueError, match=message):
        processor(text=text)


def test_labels_passed_where_owlvit_takes_the_threshold_are_refused_clearly(processor):
    outputs = {"logits": torch.zeros(1, 2, 2), "pred_boxes": torch.rand(1, 2, 4)}
    with pytest.raises(TypeError, match="as OWL-ViT does"):
        processor.post_process_grounded_object_detection(outputs, ["cat", "dog"])
