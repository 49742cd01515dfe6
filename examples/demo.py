"""The main job on the built-in default: tiny LOUPE pre-training on synthetic image–caption pairs, then
zero-shot detection and grounding on held-out images, with metrics and pictures.

    python examples/demo.py --output_dir outputs/demo

1. Pre-training in two stages with `examples/pretrain.py`, on the `tiny-fine-grid` model (ResNet-10
   image tower, 64 px, tokens on a 16x16 grid), captions naming size and colour only sometimes so
   that shape is what tells them apart:
   a. `--backbone_steps` of the dual encoder alone (CMC) on images of one object each, in
      `OUTPUT_DIR/backbone`: it learns what shapes look like before it has to find them. A share
      of its captions (`--shape_caption_share`) names the shape alone ("an image of a star."), so
      that nothing but shape tells those apart;
   b. `--max_steps` of full LOUPE (CMC + TSA + FSA + UNSIL) on scenes of 1-4 objects, continued from
      (a), in `OUTPUT_DIR/training`.
   Each stage is the Trainer's folder (intermediate `checkpoint-*`, optimizer state; resumed if
   interrupted, skipped once finished); the final model alone (weights, config, processor, card)
   is copied to `OUTPUT_DIR/checkpoint`, the folder to load, serve or publish.
2. The checkpoint is evaluated on held-out synthetic `validation` images: retrieval R@1, zero-shot
   detection mAP@0.3/0.5 (prompt "an image of a {shape}."), grounding accuracy at IoU 0.5.
3. `OUTPUT_DIR/detections.png` shows the detected boxes and labels on held-out images, and
   `OUTPUT_DIR/grounding.png` the box found for each referring expression; `OUTPUT_DIR/metrics.json`
   holds the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from loupe_hf import LoupeForZeroShotDetection, LoupeProcessor
from loupe_hf.data import SHAPES, generate_sample
from loupe_hf.evaluation.runners import (
    evaluate_synthetic_detection,
    evaluate_synthetic_grounding,
    evaluate_synthetic_retrieval,
)
from loupe_hf.hub import export_model_folder
from loupe_hf.visualization import draw_boxes, picture_grid

SHAPE_LABELS = list(SHAPES)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--preset", default="tiny-fine-grid", help="LoupeConfig preset")
    parser.add_argument(
        "--backbone_steps", type=int, default=330, help="stage 1: CMC-only steps on single objects"
    )
    parser.add_argument(
        "--shape_caption_share",
        type=float,
        default=0.5,
        help="stage 1: the share of captions that name the shape alone",
    )
    parser.add_argument("--max_steps", type=int, default=160, help="stage 2: full LOUPE steps")
    parser.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=None,
        help="processes generating the next batches while a step runs (default: 2 on a CPU, "
        "pretrain.py's own default on a GPU)",
    )
    parser.add_argument("--eval_samples", type=int, default=128)
    parser.add_argument("--pictures", type=int, default=4, help="held-out images drawn")
    args = parser.parse_args()
    if args.dataloader_num_workers is not None and args.dataloader_num_workers < 0:
        parser.error(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}")
    if not 0 <= args.shape_caption_share <= 1:
        parser.error(f"--shape_caption_share must lie in [0, 1], got {args.shape_caption_share}")
    return args


def loader_arguments(args: argparse.Namespace) -> list[str]:
    """On a CPU, two DataLoader workers: drawing and tokenising the next batch then overlaps the
    step instead of adding to it."""
    workers = args.dataloader_num_workers
    if workers is None and not torch.cuda.is_available():
        workers = min(2, os.cpu_count() or 1)
    return [] if workers is None else ["--dataloader_num_workers", str(workers)]


def run_stage(name: str, folder: Path, arguments: list[str]) -> None:
    """One `examples/pretrain.py` run in `folder` (the Trainer's: resumable), skipped once finished."""
    if (folder / "train_results.json").is_file():
        print(f"[demo] {name}: {folder} is already trained", flush=True)
        return
    command = [
        sys.executable,
        str(Path(__file__).with_name("pretrain.py")),
        "--output_dir", str(folder),
        "--synthetic_omit_attributes", "true",
        "--save_steps", "100",
        "--num_eval_samples", "0",
        "--keep_freed_memory", "true",
        *arguments,
    ]  # fmt: skip
    print(f"[demo] {name}: {' '.join(command)}", flush=True)
    subprocess.run(command, check=True)


def pretrain(output_dir: Path, args: argparse.Namespace) -> Path:
    """The two stages, then the final model alone exported to `output_dir/checkpoint`."""
    checkpoint, training = output_dir / "checkpoint", output_dir / "training"
    if (checkpoint / "train_results.json").is_file():
        print(f"[demo] {checkpoint} is already trained; delete it to train again", flush=True)
        return checkpoint
    backbone = output_dir / "backbone"
    run_stage(
        "stage 1, the dual encoder on single objects",
        backbone,
        ["--preset", args.preset, "--ablation", "backbone", "--synthetic_max_objects", "1",
         "--synthetic_shape_caption_share", str(args.shape_caption_share),
         "--max_steps", str(args.backbone_steps), *loader_arguments(args)],
    )  # fmt: skip
    run_stage(
        "stage 2, full LOUPE on scenes",
        training,
        ["--model_name_or_path", str(backbone), "--ablation", "loupe",
         "--max_steps", str(args.max_steps), *loader_arguments(args)],
    )  # fmt: skip
    export_model_folder(training, checkpoint)
    print(f"[demo] the trained model is in {checkpoint} (training state in {training})", flush=True)
    return checkpoint


def draw_detections(detector, processor, samples, path: Path) -> list[dict]:
    tiles, found = [], []
    for sample in samples:
        result = detector.detect(
            sample["image"],
            SHAPE_LABELS,
            processor,
            threshold=0.0,
            top_k=len(sample["objects"]["category"]),
        )[0]
        tiles.append(
            draw_boxes(
                sample["image"],
                result["boxes"].tolist(),
                result["text_labels"],
                result["scores"].tolist(),
                scale=3,
            )
        )
        found.append(
            {
                "caption": sample["caption"],
                "detections": result["text_labels"],
                "truth": sample["objects"]["category"],
            }
        )
    picture_grid(tiles, columns=len(tiles)).save(path)
    return found


def draw_grounding(detector, processor, samples, path: Path) -> list[dict]:
    tiles, found = [], []
    for sample in samples:
        expression = sample["referring_expressions"][0]["text"]
        result = detector.ground([sample["image"]], [expression], processor)[0]
        tiles.append(
            draw_boxes(sample["image"], [result["box"]], [expression], [result["score"]], scale=3)
        )
        found.append(
            {
                "expression": expression,
                "box": [round(v, 1) for v in result["box"]],
                "score": round(result["score"], 3),
            }
        )
    picture_grid(tiles, columns=len(tiles)).save(path)
    return found


def main() -> None:
    args = parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = pretrain(args.output_dir, args)

    torch.set_grad_enabled(False)
    detector = LoupeForZeroShotDetection.from_pretrained(checkpoint).eval()
    processor = LoupeProcessor.from_pretrained(checkpoint)
    samples = [generate_sample(index, "validation") for index in range(args.eval_samples)]
    print(f"[demo] evaluating on {len(samples)} held-out validation images", flush=True)
    retrieval = evaluate_synthetic_retrieval(detector.loupe, processor, samples)
    detection = evaluate_synthetic_detection(detector, processor, samples)
    grounding = evaluate_synthetic_grounding(detector, processor, samples)
    shown = samples[: args.pictures]
    metrics = {
        "checkpoint": str(checkpoint),
        "held_out_images": len(samples),
        "retrieval_R@1": {
            "image_to_text": retrieval["i2t_R@1"],
            "text_to_image": retrieval["t2i_R@1"],
        },
        "detection": {"mAP@0.3": detection["mAP@0.3"], "mAP@0.5": detection["mAP@0.5"]},
        "grounding": {"accuracy@0.5": grounding["accuracy"], "mean_iou": grounding["mean_iou"]},
        "examples": {
            "detections": draw_detections(
                detector, processor, shown, args.output_dir / "detections.png"
            ),
            "grounding": draw_grounding(
                detector, processor, shown, args.output_dir / "grounding.png"
            ),
        },
        "pictures": [
            str(args.output_dir / "detections.png"),
            str(args.output_dir / "grounding.png"),
        ],
    }
    (args.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps({key: value for key, value in metrics.items() if key != "examples"}, indent=2))
    print(
        f"[demo] wrote {args.output_dir / 'detections.png'} and {args.output_dir / 'grounding.png'}"
    )


if __name__ == "__main__":
    main()
