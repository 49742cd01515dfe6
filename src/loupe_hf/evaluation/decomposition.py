"""Where zero-shot localisation loses, on data with full ground truth (the synthetic benchmark):

* `proposal_recall`: the share of objects that some region box can fit (IoU ≥ 0.3 / 0.5), per
  object size, for the K selected regions (their boxes as the detector reports them, refined),
  for the same regions' proposed boxes (before refinement: what refining gains or loses) and for
  every candidate box;
* `attribute_accuracy`: shape and colour read from ground-truth boxes (region embeddings pooled
  over each object's own box) and from the global embedding of single-object images — whether
  the model *can* name an object once it is found; `linear_probe` fits a logistic regression on
  the ground-truth-box embeddings of the first half of the objects and reads the second half, so
  it says whether the image side holds shape at all, whatever the text side makes of it;
  `colour_over_shapes` reads colour with prompts that name a shape (an ensemble over the shapes)
  instead of the word "shape", which no training caption uses;
* `loss_budget`: every referring expression (grounding) and every object (detection) put in one
  of four outcomes, per 100: `correct` (IoU ≥ 0.5), `no_proposal` (no selected region fits the
  object, so no choice could be right), `bad_fit` (the chosen box lies on the right object but fits
  it poorly) and `wrong_object`; also per object size (`..._by_size`), since small objects lose in
  other ways than large ones.

`decompose` runs all three over one encoding of each image.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, box_iou

from .. import zero_shot
from ..boxes import hard_box_masks
from ..data import COLOURS, SHAPES

OUTCOMES = ("correct", "no_proposal", "bad_fit", "wrong_object")
IOU_THRESHOLDS = (0.3, 0.5)
FIT_IOU = 0.5


def localisation_outcome(
    chosen: torch.Tensor, target: int, objects: torch.Tensor, proposals: torch.Tensor
) -> str:
    """The outcome (one of `OUTCOMES`) of choosing box `chosen` (`[4]`, xyxy) for object `target`
    of an image whose objects are `objects` (`[O, 4]`) and whose selected regions are `proposals`
    (`[K, 4]`), all in one coordinate frame. The order of the tests is the budget's: a correct
    choice first; then an object no proposal fits; then a box that overlaps its object strictly more
    than any other (bad fit); anything else chose the wrong object."""
    overlaps = box_iou(chosen[None], objects)[0]
    if overlaps[target] >= FIT_IOU:
        return "correct"
    if not bool((box_iou(proposals, objects[target][None])[:, 0] >= FIT_IOU).any()):
        return "no_proposal"
    others = torch.cat([overlaps[:target], overlaps[target + 1 :]])
    if overlaps[target] > 0 and bool((overlaps[target] > others).all()):
        return "bad_fit"
    return "wrong_object"


def per_100(outcomes: Sequence[str]) -> dict[str, float]:
    """Counts of each outcome per 100 cases (all four keys, plus `num_cases`)."""
    counts = Counter(outcomes)
    total = max(len(outcomes), 1)
    return {**{name: 100.0 * counts[name] / total for name in OUTCOMES}, "num_cases": len(outcomes)}


def per_100_by_size(outcomes: Sequence[str], sizes: Sequence[str]) -> dict[str, dict[str, float]]:
    """`per_100` of the outcomes of each object size (`sizes[i]` is the size of case i)."""
    if len(outcomes) != len(sizes):
        raise ValueError(f"{len(outcomes)} outcomes but {len(sizes)} sizes")
    grouped: dict[str, list[str]] = defaultdict(list)
    for outcome, size in zip(outcomes, sizes, strict=True):
        grouped[size].append(outcome)
    return {size: per_100(group) for size, group in sorted(grouped.items())}


def recall_by_size(
    boxes: Sequence[torch.Tensor], objects: Sequence[torch.Tensor], sizes: Sequence[Sequence[str]]
) -> dict[str, dict[str, float]]:
    """Share of objects with some box at IoU ≥ each threshold, per size label and overall.

    Args:
        boxes: per image, `[R, 4]` xyxy boxes (proposals).
        objects: per image, `[O, 4]` xyxy object boxes (same frame).
        sizes: per image, the size label of each object.

    Returns:
        `{size: {"0.3": recall, "0.5": recall, "num_objects": n}}`, with `"all"` for every object.
    """
    best: dict[str, list[float]] = defaultdict(list)
    for image_boxes, image_objects, image_sizes in zip(boxes, objects, sizes, strict=True):
        fits = box_iou(image_objects, image_boxes).amax(dim=1).tolist()
        for fit, size in zip(fits, image_sizes, strict=True):
            best[size].append(fit)
            best["all"].append(fit)
    return {
        size: {
            **{f"{t}": sum(f >= t for f in fits) / len(fits) for t in IOU_THRESHOLDS},
            "num_objects": len(fits),
        }
        for size, fits in sorted(best.items())
    }


def object_cells(objects: torch.Tensor, grid_size: int) -> torch.Tensor:
    """The grid cells of each object, bool `[O, grid_size**2]`: those whose centres lie in its box
    (normalised xyxy `[O, 4]`), and always the cell holding the box centre, so that an object
    smaller than a cell still has one."""
    inside = hard_box_masks(box_convert(objects, "xyxy", "cxcywh"), grid_size)
    centre = box_convert(objects, "xyxy", "cxcywh")[:, :2]
    column, row = (centre * grid_size).long().clamp(0, grid_size - 1).unbind(-1)
    inside[torch.arange(len(objects), device=objects.device), row * grid_size + column] = True
    return inside


def prompt_accuracy(
    embeds: torch.Tensor, prompt_embeds: torch.Tensor, labels: Sequence[int]
) -> float:
    """Share of rows of `embeds` (`[N, P]`) whose most similar prompt (`[C, P]`) is their label."""
    if len(labels) == 0:
        return float("nan")
    predicted = (embeds @ prompt_embeds.T).argmax(dim=-1).cpu()
    return float((predicted == torch.as_tensor(list(labels))).float().mean())


@torch.inference_mode()
def decompose(
    detector: Any, processor: Any, samples: Sequence[Mapping[str, Any]], batch_size: int = 32
) -> dict[str, Any]:
    """Proposal recall, attribute accuracy and the loss budget of a detector on synthetic `samples`
    (records of `loupe_hf.data.generate_sample`)."""
    if not samples:
        raise ValueError("decompose needs at least one sample")
    template = detector.config.prompt_template
    shape_prompts = _prompt_embeds(detector, processor, [template.format(s) for s in SHAPES])
    colour_prompts = _prompt_embeds(
        detector, processor, [template.format(f"{c} shape") for c in COLOURS]
    )
    colour_over_shapes = ensemble_prompt_embeds(
        detector, processor, [[template.format(f"{c} {s}") for s in SHAPES] for c in COLOURS]
    )
    selected, proposed, candidates, objects, sizes = [], [], [], [], []
    box_embeds, shape_labels, colour_labels, described = [], [], [], []
    single_embeds, single_shapes, single_colours = [], [], []
    grounding, detection, grounding_sizes = [], [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        regions = zero_shot.encode_images(detector, processor, [s["image"] for s in chunk])
        truth = [_object_boxes(sample, regions.boxes.device) for sample in chunk]
        selected += [box_convert(b, "cxcywh", "xyxy").cpu() for b in regions.boxes]
        proposed += [box_convert(b, "cxcywh", "xyxy").cpu() for b in regions.proposed_boxes]
        candidates += [box_convert(b, "cxcywh", "xyxy").cpu() for b in regions.candidate_boxes]
        objects += [t.cpu() for t in truth]
        sizes += [sample["objects"]["size"] for sample in chunk]
        for index, sample in enumerate(chunk):
            shapes = [SHAPES.index(s) for s in sample["objects"]["category"]]
            colours = [COLOURS.index(c) for c in sample["objects"]["colour"]]
            keep = object_cells(_on_grid(detector.loupe, truth[index]), detector.loupe.grid_size)[
                None
            ]
            pooled = detector.loupe.pool_image_tokens(regions.patch_tokens[index : index + 1], keep)
            box_embeds.append(F.normalize(pooled[0], dim=-1))
            shape_labels += shapes
            colour_labels += colours
            described += zip(sample["objects"]["size"], sample["objects"]["colour"], strict=True)
            if len(shapes) == 1:
                single_embeds.append(regions.image_embeds[index])
                single_shapes += shapes
                single_colours += colours
        grounding += _grounding_outcomes(detector, processor, chunk, regions, truth)
        grounding_sizes += [
            sample["objects"]["size"][expression["object_index"]]
            for sample in chunk
            for expression in sample["referring_expressions"]
        ]
        detection += _detection_outcomes(detector, processor, chunk, regions, truth, shape_prompts)
    box_embeds_all = torch.cat(box_embeds)
    report = {
        "proposal_recall": {
            "selected": recall_by_size(selected, objects, sizes),
            "proposed": recall_by_size(proposed, objects, sizes),
            "all_candidates": recall_by_size(candidates, objects, sizes),
        },
        "attribute_accuracy": {
            "ground_truth_boxes": {
                "shape": prompt_accuracy(box_embeds_all, shape_prompts, shape_labels),
                "colour": prompt_accuracy(box_embeds_all, colour_prompts, colour_labels),
                "colour_over_shapes": prompt_accuracy(
                    box_embeds_all, colour_over_shapes, colour_labels
                ),
                "shape_given_size_and_colour": _shape_given_attributes(
                    detector, processor, box_embeds_all, shape_labels, described
                ),
                "num_objects": len(shape_labels),
            },
            "linear_probe": {
                "shape": linear_probe_accuracy(box_embeds_all, shape_labels, len(SHAPES)),
                "colour": linear_probe_accuracy(box_embeds_all, colour_labels, len(COLOURS)),
            },
            "global_single_object": {
                "shape": _single_accuracy(single_embeds, shape_prompts, single_shapes),
                "colour": _single_accuracy(single_embeds, colour_prompts, single_colours),
                "num_images": len(single_shapes),
            },
            "chance": {"shape": 1 / len(SHAPES), "colour": 1 / len(COLOURS)},
        },
        "loss_budget": {
            "grounding_per_100_expressions": per_100(grounding),
            "detection_per_100_objects": per_100(detection),
            "grounding_per_100_expressions_by_size": per_100_by_size(grounding, grounding_sizes),
            # detection has one outcome per object, in the order of `sizes`
            "detection_per_100_objects_by_size": per_100_by_size(
                detection, [size for image in sizes for size in image]
            ),
        },
    }
    return report


def linear_probe_accuracy(
    embeds: torch.Tensor, labels: Sequence[int], num_classes: int, steps: int = 200
) -> float:
    """Held-out accuracy of a logistic regression from `embeds` (`[N, P]`) to `labels`: fitted on
    the first half of the rows (L-BFGS, weight decay 1e-3), read on the second half."""
    half = len(labels) // 2
    if half == 0:
        return float("nan")
    with torch.inference_mode(False), torch.enable_grad():
        features = embeds.detach().float().cpu().clone()
        targets = torch.as_tensor(list(labels))
        mean, std = features[:half].mean(0), features[:half].std(0).clamp_min(1e-6)
        features = (features - mean) / std
        weight = torch.zeros(features.shape[1], num_classes, requires_grad=True)
        bias = torch.zeros(num_classes, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            logits = features[:half] @ weight + bias
            loss = F.cross_entropy(logits, targets[:half]) + 1e-3 * weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        predicted = (features[half:] @ weight + bias).argmax(-1)
    return float((predicted == targets[half:]).float().mean())


def _shape_given_attributes(
    detector: Any,
    processor: Any,
    embeds: torch.Tensor,
    labels: list[int],
    described: list[tuple[str, str]],
) -> float:
    """Shape accuracy when each object's prompts also name its true size and colour ("an image of a
    large red {shape}."): the image side can show shape information that bare class prompts miss
    when the text side only separates shapes in context."""
    template = detector.config.prompt_template
    hits = 0
    for size, colour in sorted(set(described)):
        rows = [k for k, attributes in enumerate(described) if attributes == (size, colour)]
        prompts = [template.format(f"{size} {colour} {shape}") for shape in SHAPES]
        scores = embeds[rows] @ _prompt_embeds(detector, processor, prompts).T
        predicted = scores.argmax(dim=-1).cpu().tolist()
        hits += sum(predicted[i] == labels[k] for i, k in enumerate(rows))
    return hits / len(labels) if labels else float("nan")


def ensemble_prompt_embeds(
    detector: Any, processor: Any, prompts_per_class: Sequence[Sequence[str]]
) -> torch.Tensor:
    """One L2-normalised embedding per class (`[C, P]`): the mean of its prompts' embeddings,
    renormalised (CLIP's prompt ensembling). `colour_over_shapes` reads colour with "an image of a
    red {shape}." over every shape: no training caption says "shape", so "a red shape." asks the
    text tower for a word it never learnt, while the ensemble asks only for words it did."""
    if not prompts_per_class or any(not prompts for prompts in prompts_per_class):
        raise ValueError("ensemble_prompt_embeds needs at least one prompt for every class")
    flat = [prompt for prompts in prompts_per_class for prompt in prompts]
    embeds = _prompt_embeds(detector, processor, flat).split(
        [len(prompts) for prompts in prompts_per_class]
    )
    return F.normalize(torch.stack([group.mean(0) for group in embeds]), dim=-1)


def _on_grid(model: Any, boxes: torch.Tensor) -> torch.Tensor:
    """xyxy boxes on the image moved to the token grid's frame (`LoupeModel.image_to_grid`)."""
    return box_convert(model.image_to_grid(box_convert(boxes, "xyxy", "cxcywh")), "cxcywh", "xyxy")


def _prompt_embeds(detector: Any, processor: Any, prompts: list[str]) -> torch.Tensor:
    return zero_shot.encode_queries(detector, processor, prompts, apply_prompt_template=False)


def _single_accuracy(embeds: list[torch.Tensor], prompts: torch.Tensor, labels: list[int]) -> float:
    return prompt_accuracy(torch.stack(embeds), prompts, labels) if embeds else float("nan")


def _object_boxes(sample: Mapping[str, Any], device: torch.device) -> torch.Tensor:
    """The sample's object boxes, normalised xyxy `[O, 4]`."""
    scale = torch.tensor([sample["width"], sample["height"]] * 2, dtype=torch.float32)
    xywh = torch.tensor(sample["objects"]["bbox"], dtype=torch.float32).reshape(-1, 4) / scale
    return box_convert(xywh, "xywh", "xyxy").to(device)


def _grounding_outcomes(detector, processor, chunk, regions, truth) -> list[str]:
    """One outcome per referring expression of every image of the chunk."""
    outcomes = []
    for index, sample in enumerate(chunk):
        expressions = sample["referring_expressions"]
        if not expressions:
            continue
        texts = [expression["text"] for expression in expressions]
        text_embeds = zero_shot.encode_queries(
            detector, processor, texts, apply_prompt_template=False
        )
        one = _image_regions(regions, index, len(texts))
        found = zero_shot.ground_in_regions(
            detector, processor, one, text_embeds, [(1, 1)] * len(texts)
        )
        proposals = box_convert(regions.boxes[index], "cxcywh", "xyxy")
        for expression, result in zip(expressions, found, strict=True):
            chosen = torch.tensor(result["box"], device=proposals.device)
            outcomes.append(
                localisation_outcome(chosen, expression["object_index"], truth[index], proposals)
            )
    return outcomes


def _detection_outcomes(detector, processor, chunk, regions, truth, shape_prompts) -> list[str]:
    """One outcome per object: among the detections of its class, ranked as many deep as the image
    has objects of that class, the one that fits it best."""
    results = zero_shot.detect_in_regions(
        detector,
        processor,
        regions,
        shape_prompts,
        list(SHAPES),
        [(1, 1)] * len(chunk),
        threshold=0.0,
    )
    outcomes = []
    for index, (sample, result) in enumerate(zip(chunk, results, strict=True)):
        proposals = box_convert(regions.boxes[index], "cxcywh", "xyxy")
        categories = [SHAPES.index(c) for c in sample["objects"]["category"]]
        for target, category in enumerate(categories):
            depth = categories.count(category)
            boxes = result["boxes"][result["labels"] == category][:depth]
            if boxes.numel() == 0:
                outcomes.append(
                    "no_proposal" if not _fits(proposals, truth[index][target]) else "wrong_object"
                )
                continue
            fit = box_iou(boxes, truth[index][target][None])[:, 0]
            chosen = boxes[int(fit.argmax())]
            outcomes.append(localisation_outcome(chosen, target, truth[index], proposals))
    return outcomes


def _fits(proposals: torch.Tensor, box: torch.Tensor) -> bool:
    return bool((box_iou(proposals, box[None])[:, 0] >= FIT_IOU).any())


def _image_regions(regions: Any, index: int, repeats: int) -> Any:
    """Image `index`'s regions repeated `repeats` times (one row per expression)."""
    return type(regions)(
        region_embeds=regions.region_embeds[index : index + 1].expand(repeats, -1, -1),
        boxes=regions.boxes[index : index + 1].expand(repeats, -1, -1),
        objectness=regions.objectness[index : index + 1].expand(repeats, -1),
    )


__all__ = [
    "IOU_THRESHOLDS",
    "OUTCOMES",
    "decompose",
    "localisation_outcome",
    "object_cells",
    "per_100",
    "per_100_by_size",
    "prompt_accuracy",
    "recall_by_size",
]
