"""The error decomposition: each outcome of the loss budget, recall per size, attribute accuracy,
and a whole run on a tiny detector whose numbers must be mutually consistent."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from loupe_hf import LoupeForZeroShotDetection, zero_shot
from loupe_hf.data import generate_sample
from loupe_hf.evaluation.decomposition import (
    OUTCOMES,
    decompose,
    ensemble_prompt_embeds,
    linear_probe_accuracy,
    localisation_outcome,
    object_cells,
    per_100,
    per_100_by_size,
    prompt_accuracy,
    recall_by_size,
)

# Two objects side by side, in normalised xyxy.
OBJECTS = torch.tensor([[0.0, 0.0, 0.4, 0.4], [0.6, 0.6, 1.0, 1.0]])
FITTING = torch.tensor([[0.0, 0.0, 0.4, 0.4], [0.6, 0.6, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])


@pytest.mark.parametrize(
    ("chosen", "proposals", "expected"),
    [
        ([0.0, 0.0, 0.38, 0.4], FITTING, "correct"),
        ([0.0, 0.0, 0.1, 0.1], FITTING, "bad_fit"),  # on object 0, far too small
        ([0.6, 0.6, 1.0, 1.0], FITTING, "wrong_object"),  # exactly the other object
        ([0.2, 0.2, 1.0, 1.0], FITTING, "wrong_object"),  # lies more on the other object
        ([0.0, 0.0, 0.1, 0.1], FITTING[1:], "no_proposal"),  # nothing selected fits object 0
    ],
)
def test_each_outcome_of_the_loss_budget(chosen, proposals, expected):
    assert localisation_outcome(torch.tensor(chosen), 0, OBJECTS, proposals) == expected


def test_a_correct_choice_counts_as_correct_even_when_no_proposal_fits():
    # The chosen box need not be a selected region (detection boxes go through NMS).
    assert localisation_outcome(OBJECTS[0], 0, OBJECTS, FITTING[1:2]) == "correct"


def test_budget_is_per_100_cases_and_sums_to_100():
    budget = per_100(["correct", "no_proposal", "no_proposal", "wrong_object"])
    assert budget == {
        "correct": 25.0,
        "no_proposal": 50.0,
        "bad_fit": 0.0,
        "wrong_object": 25.0,
        "num_cases": 4,
    }


def test_budget_by_size_groups_the_cases_of_each_size():
    outcomes = ["correct", "no_proposal", "correct", "bad_fit"]
    budgets = per_100_by_size(outcomes, ["small", "small", "large", "large"])
    assert budgets["small"] == per_100(["correct", "no_proposal"])
    assert budgets["large"]["bad_fit"] == 50.0 and budgets["large"]["num_cases"] == 2
    with pytest.raises(ValueError, match="4 outcomes but 3 sizes"):
        per_100_by_size(outcomes, ["small"] * 3)


def test_recall_by_size_counts_each_object_once_at_each_threshold():
    boxes = [torch.tensor([[0.0, 0.0, 0.4, 0.3]]), torch.tensor([[0.5, 0.5, 0.6, 0.6]])]
    objects = [OBJECTS, torch.tensor([[0.5, 0.5, 0.7, 0.7]])]
    recall = recall_by_size(boxes, objects, [["small", "large"], ["small"]])
    # IoUs: object 0 of image 0 is 0.75, object 1 is 0; image 1's object is 0.25.
    assert recall["small"] == {"0.3": 0.5, "0.5": 0.5, "num_objects": 2}
    assert recall["large"] == {"0.3": 0.0, "0.5": 0.0, "num_objects": 1}
    assert recall["all"]["0.5"] == pytest.approx(1 / 3) and recall["all"]["num_objects"] == 3


def test_prompt_accuracy_by_hand():
    prompts = torch.eye(3)
    embeds = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8], [0.7, 0.6, 0.0]])
    assert prompt_accuracy(embeds, prompts, [0, 2, 1]) == pytest.approx(2 / 3)


def test_an_object_smaller_than_a_cell_still_has_its_centre_cell():
    cells = object_cells(torch.tensor([[0.30, 0.30, 0.32, 0.32], [0.0, 0.0, 0.5, 0.5]]), 4)
    assert cells[0].nonzero()[:, 0].tolist() == [5]  # row 1, column 1 of the 4x4 grid
    assert cells[1].sum() == 4  # the four cells of the top-left quarter


def test_decomposition_of_a_tiny_detector_is_consistent(tiny_config, processor):
    config = copy.deepcopy(tiny_config)
    config.set_prompt_template(processor.tokenizer)
    torch.manual_seed(0)
    detector = LoupeForZeroShotDetection(config).eval()
    samples = [generate_sample(index, split="validation") for index in range(10)]
    report = decompose(detector, processor, samples, batch_size=4)
    num_objects = sum(len(s["objects"]["category"]) for s in samples)
    num_expressions = sum(len(s["referring_expressions"]) for s in samples)
    budgets = report["loss_budget"]
    assert budgets["detection_per_100_objects"]["num_cases"] == num_objects
    assert budgets["grounding_per_100_expressions"]["num_cases"] == num_expressions
    for name in ("grounding_per_100_expressions", "detection_per_100_objects"):
        budget = budgets[name]
        assert sum(budget[outcome] for outcome in OUTCOMES) == pytest.approx(100.0)
        by_size = budgets[f"{name}_by_size"]
        assert sum(group["num_cases"] for group in by_size.values()) == budget["num_cases"]
        for outcome in OUTCOMES:  # the sizes' budgets, weighted by their cases, give the whole
            whole = sum(group[outcome] * group["num_cases"] for group in by_size.values())
            assert whole / budget["num_cases"] == pytest.approx(budget[outcome])
    recall = report["proposal_recall"]
    assert recall["selected"]["all"]["num_objects"] == num_objects
    for size, selected in recall["selected"].items():
        every = recall["all_candidates"][size]
        assert selected["0.5"] <= selected["0.3"]
        assert selected["0.5"] <= every["0.5"] and selected["0.3"] <= every["0.3"]
        # the proposed boxes are candidates, so no more of them can fit than of all candidates
        kept = recall["proposed"][size]
        assert kept["0.5"] <= every["0.5"] and kept["0.3"] <= every["0.3"]
    # An object no selected region fits is a "no proposal" case for detection too.
    missed = (1 - recall["selected"]["all"]["0.5"]) * 100
    assert budgets["detection_per_100_objects"]["no_proposal"] <= missed + 1e-6
    accuracy = report["attribute_accuracy"]
    on_boxes, single = accuracy["ground_truth_boxes"], accuracy["global_single_object"]
    assert on_boxes["num_objects"] == num_objects
    assert single["num_images"] == sum(len(s["objects"]["category"]) == 1 for s in samples) > 0
    attributes = on_boxes["shape_given_size_and_colour"]
    for value in (
        on_boxes["shape"],
        on_boxes["colour"],
        on_boxes["colour_over_shapes"],
        attributes,
        single["shape"],
        single["colour"],
        *accuracy["linear_probe"].values(),
    ):
        assert 0 <= value <= 1


def test_an_ensemble_prompt_is_the_normalised_mean_of_its_prompts(tiny_config, processor):
    config = copy.deepcopy(tiny_config)
    config.set_prompt_template(processor.tokenizer)
    torch.manual_seed(0)
    detector = LoupeForZeroShotDetection(config).eval()
    classes = [["a red circle.", "a red star."], ["a blue star."]]
    ensembles = ensemble_prompt_embeds(detector, processor, classes)
    singles = zero_shot.encode_queries(
        detector, processor, [p for group in classes for p in group], apply_prompt_template=False
    )
    expected = torch.stack([singles[:2].mean(0), singles[2]])
    torch.testing.assert_close(ensembles, expected / expected.norm(dim=-1, keepdim=True))
    assert not torch.allclose(ensembles[0], singles[0])  # the mean, not its first prompt
    with pytest.raises(ValueError, match="at least one prompt for every class"):
        ensemble_prompt_embeds(detector, processor, [["a red circle."], []])


def test_linear_probe_reads_held_out_classes_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=generator) * 3
    labels = torch.randint(0, 5, (400,), generator=generator)
    separable = centres[labels] + torch.randn(400, 16, generator=generator)
    assert linear_probe_accuracy(separable, labels.tolist(), 5) > 0.95
    noise = torch.randn(400, 16, generator=generator)
    assert linear_probe_accuracy(noise, labels.tolist(), 5) < 0.4  # chance is 0.2
    assert math.isnan(linear_probe_accuracy(noise[:1], labels[:1].tolist(), 5))  # nothing to fit


def test_decomposing_no_samples_is_refused(tiny_config, processor):
    with pytest.raises(ValueError, match="at least one sample"):
        decompose(LoupeForZeroShotDetection(tiny_config), processor, [])


def test_the_ablation_table_shows_colour_over_shapes_where_it_was_measured():
    import importlib.util
    import json
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("ablation", repo / "examples" / "ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    results = json.loads((repo / "docs" / "ablation_curriculum" / "ablation.json").read_text())
    results = {"loupe": results["results"]["loupe"]}
    boxes = [
        split["decomposition"]["attribute_accuracy"]["ground_truth_boxes"]
        for split in results["loupe"]["splits"].values()
    ]
    for on_boxes in boxes:  # as results written before the ensemble was measured
        on_boxes.pop("colour_over_shapes", None)
    before = ablation.decomposition_table(results).splitlines()[2]
    assert "(–)" in before
    for on_boxes in boxes:
        on_boxes["colour_over_shapes"] = 0.5
    after = ablation.decomposition_table(results).splitlines()[2]
    assert "(0.50)" in after and after.replace("(0.50)", "(–)") == before
