"""Zero-shot evaluation of a LOUPE checkpoint.

    python examples/run_evaluation.py --checkpoint outputs/pretrain --task synthetic --split validation
    python examples/run_evaluation.py --checkpoint CKPT --task retrieval --karpathy_json dataset_flickr30k.json --image_root flickr30k-images
    python examples/run_evaluation.py --checkpoint CKPT --task detection --coco_json instances_val2017.json --image_root val2017 --classes coco65
    python examples/run_evaluation.py --checkpoint CKPT --task grounding --refs "refcoco/refs(unc).p" --instances refcoco/instances.json --image_root train2014 --split val
    python examples/run_evaluation.py --checkpoint CKPT --task classification --image_folder path/to/imagefolder

Prints one JSON document (and writes it to `--output_json` when given).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import PIL.Image
import torch

from loupe_hf import LoupeForZeroShotDetection, LoupeModel, LoupeProcessor
from loupe_hf.data import SyntheticConfig, generate_sample
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


def parse_args() -> argparse.Namespace:
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
        "--baseline",
        action="store_true",
        help="synthetic: add the dense-similarity detection baseline",
    )
    parser.add_argument("--karpathy_json")
    parser.add_argument("--coco_json")
    parser.add_argument("--classes", default="all", help="detection: all | coco65 | voc")
    parser.add_argument("--refs")
    parser.add_argument("--instances")
    parser.add_argument("--image_root")
    parser.add_argument("--image_folder")
    parser.add_argument("--output_json")
    return parser.parse_args()


def load(checkpoint: str) -> tuple[LoupeForZeroShotDetection, LoupeProcessor]:
    detector = LoupeForZeroShotDetection.from_pretrained(checkpoint).eval()
    return detector, LoupeProcessor.from_pretrained(checkpoint)


def synthetic(args, detector, processor) -> dict:
    config = SyntheticConfig(image_size=args.synthetic_image_size)
    samples = [generate_sample(index, args.split, config) for index in range(args.num_samples)]
    model: LoupeModel = detector.loupe
    detection = evaluate_synthetic_detection(detector, processor, samples)
    report = {
        "split": args.split,
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


def retrieval(args, detector, processor) -> dict:
    data = load_karpathy_split(args.karpathy_json, args.image_root, split="test")
    images = [PIL.Image.open(path).convert("RGB") for path in data.image_paths]
    return evaluate_retrieval(detector.loupe, processor, images, data.captions, data.text_to_image)


def detection(args, detector, processor) -> dict:
    coco = load_coco_json(args.coco_json)
    if args.classes == "coco65":
        coco = restrict_categories(
            coco, [c["name"] for c in coco["categories"] if c["id"] in COCO_65_CATEGORY_IDS]
        )
    elif args.classes == "voc":
        coco = restrict_categories(coco, list(VOC_CATEGORY_IDS))
    categories = coco["categories"]
    names = [
        VOC_PROMPT_NAMES.get(c["name"], c["name"]) if args.classes == "voc" else c["name"]
        for c in categories
    ]
    images = [
        PIL.Image.open(Path(args.image_root) / image["file_name"]).convert("RGB")
        for image in coco["images"]
    ]
    detections = detect_batches(
        detector,
        processor,
        images,
        [image["id"] for image in coco["images"]],
        names,
        [c["id"] for c in categories],
    )
    result = coco_map(coco, detections)
    return {key: result[key] for key in ("mAP@0.3", "mAP@0.5", "num_images", "num_ground_truth")}


def grounding(args, detector, processor) -> dict:
    items = load_refcoco(args.refs, args.instances, args.image_root, split=args.split)
    predictions = []
    for item in items:
        image = PIL.Image.open(item.image).convert("RGB")
        x0, y0, x1, y1 = detector.ground([image], [item.expression], processor)[0]["box"]
        predictions.append([x0, y0, x1 - x0, y1 - y0])
    return compute_metric(
        "grounding_accuracy", predictions=predictions, references=[list(item.box) for item in items]
    )


def classification(args, detector, processor) -> dict:
    dataset, class_names = load_image_folder(args.image_folder)
    images = [row["image"].convert("RGB") for row in dataset]
    return evaluate_classification(
        detector.loupe, processor, images, [row["label"] for row in dataset], class_names
    )


def main() -> None:
    args = parse_args()
    torch.set_grad_enabled(False)
    detector, processor = load(args.checkpoint)
    report = {
        "checkpoint": args.checkpoint,
        "task": args.task,
        **globals()[args.task](args, detector, processor),
    }
    text = json.dumps(report, indent=2, default=float)
    print(text)
    if args.output_json:
        Path(args.output_json).write_text(text)


if __name__ == "__main__":
    main()
