"""Zero-shot evaluation of a LOUPE checkpoint.

    python examples/run_evaluation.py --checkpoint outputs/pretrain --task synthetic --split validation
    python examples/run_evaluation.py --checkpoint outputs/pretrain --task synthetic --renderer second
    python examples/run_evaluation.py --checkpoint CKPT --task retrieval --karpathy_json dataset_flickr30k.json --image_root flickr30k-images
    python examples/run_evaluation.py --checkpoint CKPT --task detection --coco_json instances_val2017.json --image_root val2017 --classes coco65
    python examples/run_evaluation.py --checkpoint CKPT --task grounding --refs "refcoco/refs(unc).p" --instances refcoco/instances.json --image_root train2014 --split val
    python examples/run_evaluation.py --checkpoint CKPT --task classification --image_folder path/to/imagefolder

Prints one JSON document (and writes it to `--output_json` when given). A missing or wrong argument
or data file stops the run before the model is loaded, with a message naming the argument; an
image file that cannot be read is skipped, named on stderr, and counted in `skipped_images`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from loupe_hf import LoupeForZeroShotDetection, LoupeModel, LoupeProcessor
from loupe_hf.data import (
    APPEARANCES,
    SecondRendererConfig,
    SyntheticConfig,
    generate_sample,
    second_renderer_sample,
)
from loupe_hf.data.synthetic import MIN_IMAGE_SIZE, SPLITS
from loupe_hf.evaluation import (
    COCO_65_CATEGORY_IDS,
    VOC_CATEGORY_IDS,
    VOC_PROMPT_NAMES,
    coco_map,
    load_coco_json,
    load_image_folder,
    load_karpathy_split,
    load_refcoco,
    restrict_categories,
)
from loupe_hf.evaluation.decomposition import decompose
from loupe_hf.evaluation.images import SkippedImage, open_rgb_images, skipped_report
from loupe_hf.evaluation.runners import (
    compute_metric,
    detect_batches,
    evaluate_classification,
    evaluate_retrieval,
    evaluate_synthetic_detection,
    evaluate_synthetic_grounding,
    evaluate_synthetic_retrieval,
    pointing_game,
)

TASKS = ("synthetic", "retrieval", "detection", "grounding", "classification")
CLASSES = ("all", "coco65", "voc")
# synthetic: the training renderer, or the independent one drawn for evaluation only (issue 14).
RENDERERS = ("training", "second")
# The arguments each task cannot run without (the others ignore them).
REQUIRED = {
    "retrieval": ("karpathy_json", "image_root"),
    "detection": ("coco_json", "image_root"),
    "grounding": ("refs", "instances", "image_root"),
    "classification": ("image_folder",),
}
FILE_ARGUMENTS = ("karpathy_json", "coco_json", "refs", "instances")
FOLDER_ARGUMENTS = ("image_root", "image_folder")


class UsageError(Exception):
    """A wrong command-line argument or data file; `main` reports it as argparse reports its own
    errors (usage, the message, exit status 2), so the message must name the argument."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a LOUPE checkpoint directory or Hub id"
    )
    parser.add_argument("--task", choices=TASKS, default="synthetic")
    parser.add_argument(
        "--split",
        default="validation",
        help="synthetic: validation | compositional; RefCOCO: val | testA | testB",
    )
    parser.add_argument(
        "--num_samples", type=int, default=256, help="synthetic: images to evaluate"
    )
    parser.add_argument("--synthetic_image_size", type=int, default=128)
    parser.add_argument(
        "--synthetic_appearance",
        choices=APPEARANCES,
        default="varied",
        help="synthetic, training renderer: varied (the default training data) | classic",
    )
    parser.add_argument(
        "--renderer",
        choices=RENDERERS,
        default="training",
        help="synthetic: draw the images with the training renderer or with the independent "
        "second renderer (other code, colours, sizes, backgrounds; loupe_hf.data.second_renderer)",
    )
    parser.add_argument(
        "--detection_objectness_weight",
        type=float,
        help="score regions with this weight of their confidence (TSA's fit) added to the "
        "similarity, instead of the checkpoint's own (LoupeConfig.detection_objectness_weight)",
    )
    parser.add_argument(
        "--detection_num_regions",
        type=int,
        help="regions kept per image in detection and grounding, instead of the checkpoint's own "
        "(LoupeConfig.detection_num_regions, or num_regions when unset)",
    )
    parser.add_argument(
        "--box_refinement_iou",
        type=float,
        help="refine each proposed box to the most confident candidate overlapping it by this IoU "
        "(1 keeps the proposals), instead of the checkpoint's own (LoupeConfig.box_refinement_iou)",
    )
    parser.add_argument(
        "--box_refinement_candidates",
        type=int,
        help="make each refined box the confidence-weighted mean of this many of the most confident "
        "candidates around it (1: the most confident alone), instead of the checkpoint's own "
        "(LoupeConfig.box_refinement_candidates)",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="synthetic: add the dense-similarity detection baseline",
    )
    parser.add_argument("--karpathy_json")
    parser.add_argument("--coco_json")
    parser.add_argument("--classes", choices=CLASSES, default="all", help="detection classes")
    parser.add_argument("--refs")
    parser.add_argument("--instances")
    parser.add_argument("--image_root")
    parser.add_argument("--image_folder")
    parser.add_argument("--output_json")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Raises `UsageError` for arguments the task needs but lacks, paths that do not exist, and
    values out of range: found here, before minutes of model loading and evaluation."""
    missing = [f"--{name}" for name in REQUIRED.get(args.task, ()) if getattr(args, name) is None]
    if missing:
        raise UsageError(f"--task {args.task} needs {' and '.join(missing)}")
    for name in FILE_ARGUMENTS:
        value = getattr(args, name)
        if value is not None and not Path(value).is_file():
            raise UsageError(f"--{name} {value}: no such file")
    for name in FOLDER_ARGUMENTS:
        value = getattr(args, name)
        if value is not None and not Path(value).is_dir():
            raise UsageError(f"--{name} {value}: no such folder")
    if args.task == "synthetic":
        _check_synthetic_args(args)


def _check_synthetic_args(args: argparse.Namespace) -> None:
    # An empty evaluation would otherwise end in "torch.cat(): expected a non-empty list".
    if args.num_samples < 1:
        raise UsageError(f"--num_samples must be at least 1, got {args.num_samples}")
    if args.synthetic_image_size < MIN_IMAGE_SIZE:
        raise UsageError(
            f"--synthetic_image_size must be at least {MIN_IMAGE_SIZE}, got {args.synthetic_image_size}"
        )
    if args.split not in SPLITS:
        raise UsageError(
            f"--split must be one of {SPLITS} for --task synthetic, got {args.split!r}"
        )
    if args.renderer == "second" and args.split == "train":
        raise UsageError(
            "--renderer second is for evaluation: use --split validation or compositional"
        )


def looks_local(checkpoint: str) -> bool:
    """Whether `checkpoint` can only be a local path (a Hub id is `name` or `owner/name`)."""
    return checkpoint.startswith((".", "~", "/")) or checkpoint.count("/") > 1


def load(
    checkpoint: str, **config_overrides: Any
) -> tuple[LoupeForZeroShotDetection, LoupeProcessor]:
    """The checkpoint's detector (with `config_overrides` of its config) and processor."""
    if looks_local(checkpoint) and not Path(checkpoint).expanduser().exists():
        raise UsageError(f"--checkpoint {checkpoint}: no such folder")
    try:
        detector = LoupeForZeroShotDetection.from_pretrained(checkpoint, **config_overrides).eval()
        return detector, LoupeProcessor.from_pretrained(checkpoint)
    except (OSError, ValueError) as error:
        raise UsageError(f"--checkpoint {checkpoint} could not be loaded: {error}") from error


def _reading(argument: str, path: str, read: Any, *args: Any, **kwargs: Any) -> Any:
    """`read(*args, **kwargs)`, with a data file's error turned into a `UsageError` naming
    `argument` (the loaders' own errors name the file, not the option that chose it)."""
    try:
        return read(*args, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(f"--{argument} {path}: {error}") from error


def _readable(paths: Sequence[str], argument: str, skipped: list[SkippedImage]) -> list[Any]:
    """The images of `paths` (`None` where unreadable), each skipped file named on stderr and added
    to `skipped`; a `UsageError` naming `argument` when none can be read."""
    images, unreadable = open_rgb_images(paths)
    for item in unreadable:
        print(f"warning: skipping unreadable image {item.path}: {item.reason}", file=sys.stderr)
    skipped += unreadable
    if paths and all(image is None for image in images):
        raise UsageError(f"--{argument}: none of the {len(paths)} images could be read")
    return images


# --- data: read and checked before the model is loaded ---------------------------------------


def synthetic_data(args: argparse.Namespace) -> dict[str, Any]:
    if args.renderer == "second":
        second = SecondRendererConfig(image_size=args.synthetic_image_size)
        indices = range(args.num_samples)
        return {"samples": [second_renderer_sample(i, second, args.split) for i in indices]}
    config = SyntheticConfig(
        image_size=args.synthetic_image_size, appearance=args.synthetic_appearance
    )
    return {"samples": [generate_sample(i, args.split, config) for i in range(args.num_samples)]}


def retrieval_data(args: argparse.Namespace) -> dict[str, Any]:
    split = _reading(
        "karpathy_json",
        args.karpathy_json,
        load_karpathy_split,
        args.karpathy_json,
        args.image_root,
    )
    skipped: list[SkippedImage] = []
    images = _readable(split.image_paths, "image_root", skipped)
    kept = [index for index, image in enumerate(images) if image is not None]
    new_index = {old: new for new, old in enumerate(kept)}
    # An unreadable image takes its captions with it, so every caption still has its image.
    texts = [t for t, owner in enumerate(split.text_to_image) if owner in new_index]
    return {
        "images": [images[index] for index in kept],
        "captions": [split.captions[t] for t in texts],
        "text_to_image": [new_index[split.text_to_image[t]] for t in texts],
        "skipped": skipped_report(skipped, len(images)),
    }


def detection_data(args: argparse.Namespace) -> dict[str, Any]:
    coco = _reading("coco_json", args.coco_json, load_coco_json, args.coco_json)
    if args.classes == "coco65":
        names = [c["name"] for c in coco["categories"] if c["id"] in COCO_65_CATEGORY_IDS]
        coco = _reading("classes", args.classes, restrict_categories, coco, names)
    elif args.classes == "voc":
        coco = _reading("classes", args.classes, restrict_categories, coco, list(VOC_CATEGORY_IDS))
    paths = [str(Path(args.image_root) / image["file_name"]) for image in coco["images"]]
    skipped: list[SkippedImage] = []
    images = _readable(paths, "image_root", skipped)
    # Unreadable images leave the ground truth too: their objects would count as missed.
    kept_ids = {
        image["id"]
        for image, pixels in zip(coco["images"], images, strict=True)
        if pixels is not None
    }
    coco = {
        **coco,
        "images": [image for image in coco["images"] if image["id"] in kept_ids],
        "annotations": [ann for ann in coco["annotations"] if ann["image_id"] in kept_ids],
    }
    return {
        "coco": coco,
        "images": [image for image in images if image is not None],
        "skipped": skipped_report(skipped, len(images)),
    }


def grounding_data(args: argparse.Namespace) -> dict[str, Any]:
    items = _reading(
        "refs", args.refs, load_refcoco, args.refs, args.instances, args.image_root, args.split
    )
    skipped: list[SkippedImage] = []
    images = _readable([item.image for item in items], "image_root", skipped)
    kept = [(item, image) for item, image in zip(items, images, strict=True) if image is not None]
    return {"items": kept, "skipped": skipped_report(skipped, len({i.image for i in items}))}


def classification_data(args: argparse.Namespace) -> dict[str, Any]:
    dataset, class_names = _reading(
        "image_folder", args.image_folder, load_image_folder, args.image_folder, decode=False
    )
    skipped: list[SkippedImage] = []
    images = _readable([row["image"]["path"] for row in dataset], "image_folder", skipped)
    labels = [row["label"] for row in dataset]
    kept = [index for index, image in enumerate(images) if image is not None]
    return {
        "images": [images[index] for index in kept],
        "labels": [labels[index] for index in kept],
        "class_names": class_names,
        "skipped": skipped_report(skipped, len(images)),
    }


# --- evaluation ------------------------------------------------------------------------------


def synthetic(args, data, detector, processor) -> dict:
    samples = data["samples"]
    model: LoupeModel = detector.loupe
    detection = evaluate_synthetic_detection(detector, processor, samples)
    report = {
        "split": args.split,
        "renderer": args.renderer,
        "num_images": len(samples),
        "retrieval": evaluate_synthetic_retrieval(model, processor, samples),
        "detection": {key: detection[key] for key in ("mAP@0.3", "mAP@0.5")},
        "grounding": evaluate_synthetic_grounding(detector, processor, samples),
        "pointing_game": pointing_game(model, processor, samples),
        "decomposition": decompose(detector, processor, samples),
    }
    report["proposal_recall@0.5"] = report["decomposition"]["proposal_recall"]["selected"]["all"][
        "0.5"
    ]
    if args.baseline:
        dense = evaluate_synthetic_detection(model, processor, samples, method="dense")
        report["dense_baseline_detection"] = {key: dense[key] for key in ("mAP@0.3", "mAP@0.5")}
    return report


def retrieval(args, data, detector, processor) -> dict:
    return evaluate_retrieval(
        detector.loupe, processor, data["images"], data["captions"], data["text_to_image"]
    )


def detection(args, data, detector, processor) -> dict:
    coco = data["coco"]
    categories = coco["categories"]
    names = [
        VOC_PROMPT_NAMES.get(c["name"], c["name"]) if args.classes == "voc" else c["name"]
        for c in categories
    ]
    detections = detect_batches(
        detector,
        processor,
        data["images"],
        [image["id"] for image in coco["images"]],
        names,
        [c["id"] for c in categories],
    )
    result = coco_map(coco, detections)
    return {key: result[key] for key in ("mAP@0.3", "mAP@0.5", "num_images", "num_ground_truth")}


def grounding(args, data, detector, processor) -> dict:
    predictions = []
    for item, image in data["items"]:
        x0, y0, x1, y1 = detector.ground([image], [item.expression], processor)[0]["box"]
        predictions.append([x0, y0, x1 - x0, y1 - y0])
    return compute_metric(
        "grounding_accuracy",
        predictions=predictions,
        references=[list(item.box) for item, _ in data["items"]],
    )


def classification(args, data, detector, processor) -> dict:
    return evaluate_classification(
        detector.loupe, processor, data["images"], data["labels"], data["class_names"]
    )


DATA = {
    "synthetic": synthetic_data,
    "retrieval": retrieval_data,
    "detection": detection_data,
    "grounding": grounding_data,
    "classification": classification_data,
}
EVALUATE = {
    "synthetic": synthetic,
    "retrieval": retrieval,
    "detection": detection,
    "grounding": grounding,
    "classification": classification,
}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
        data = DATA[args.task](args)
        overrides = {
            name: getattr(args, name)
            for name in (
                "detection_objectness_weight",
                "detection_num_regions",
                "box_refinement_iou",
                "box_refinement_candidates",
            )
            if getattr(args, name) is not None
        }
        detector, processor = load(args.checkpoint, **overrides)
    except UsageError as error:
        parser.error(str(error))  # exits with status 2, as argparse does for its own checks
    with torch.no_grad():  # scoped: `main` is also called in-process (tests), not only as a script
        results = EVALUATE[args.task](args, data, detector, processor)
    report = {"checkpoint": args.checkpoint, "task": args.task, **results}
    if "skipped" in data:
        report["skipped_images"] = data["skipped"]
    text = json.dumps(report, indent=2, default=float)
    print(text)
    if args.output_json:
        Path(args.output_json).write_text(text)
    return report


if __name__ == "__main__":
    main()
