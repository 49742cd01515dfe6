"""The small-scale ablation (METHOD §5, Table 4 in miniature): same budget, four rows.

    python examples/ablation.py --output_dir outputs/ablation --max_steps 600 --docs_dir docs

Trains the backbone (CMC only), +TSA, +TSA+FSA (sampled labels) and full LOUPE (+UNSIL) with
`examples/pretrain.py` on the synthetic data, then evaluates each on the synthetic `validation` and
`compositional` splits: retrieval R@1, detection mAP@0.3/0.5 (plus the dense-similarity baseline on
the backbone), grounding accuracy, proposal recall, and step time. Writes `ablation.md`,
`ablation.json`, `ablation_curves.png` and `ablation_examples.png` into `--docs_dir`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from loupe_hf import LoupeForZeroShotDetection, LoupeProcessor
from loupe_hf.data import generate_sample
from loupe_hf.evaluation.decomposition import OUTCOMES, decompose
from loupe_hf.evaluation.runners import (
    evaluate_synthetic_detection,
    evaluate_synthetic_grounding,
    evaluate_synthetic_retrieval,
    pointing_game,
)
from loupe_hf.visualization import draw_boxes, picture_grid

ROWS = ("backbone", "tsa", "tsa_fsa", "loupe")
TITLES = {
    "backbone": "backbone (CMC only)",
    "tsa": "+ TSA",
    "tsa_fsa": "+ TSA + FSA (sampling)",
    "loupe": "+ UNSIL (full LOUPE)",
}
SPLITS = ("validation", "compositional")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/ablation"))
    parser.add_argument("--docs_dir", type=Path, default=Path("docs"))
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--max_steps", type=int, default=600)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_train_samples", type=int, default=40000)
    parser.add_argument("--eval_samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra", default="", help="extra arguments for examples/pretrain.py")
    parser.add_argument(
        "--skip_training", action="store_true", help="evaluate existing checkpoints only"
    )
    parser.add_argument(
        "--reuse_trained", action="store_true", help="train only rows without a finished checkpoint"
    )
    return parser.parse_args()


def train(row: str, args: argparse.Namespace) -> None:
    command = [
        sys.executable,
        str(Path(__file__).with_name("pretrain.py")),
        "--output_dir", str(args.output_dir / row),
        "--ablation", row,
        "--max_steps", str(args.max_steps),
        "--per_device_train_batch_size", str(args.batch_size),
        "--num_train_samples", str(args.num_train_samples),
        "--num_eval_samples", "0",
        "--save_steps", str(args.max_steps),
        "--logging_steps", "10",
        "--seed", str(args.seed),
        "--keep_freed_memory", "true",
        *shlex.split(args.extra),
    ]  # fmt: skip
    print(f"[ablation] training {row}: {' '.join(command)}", flush=True)
    subprocess.run(command, check=True)


def evaluate(row: str, args: argparse.Namespace) -> dict:
    checkpoint = args.output_dir / row
    detector = LoupeForZeroShotDetection.from_pretrained(checkpoint).eval()
    processor = LoupeProcessor.from_pretrained(checkpoint)
    train_results = json.loads((checkpoint / "train_results.json").read_text())
    result = {"step_s": train_results["train_runtime"] / args.max_steps, "splits": {}}
    for split in SPLITS:
        samples = [generate_sample(index, split) for index in range(args.eval_samples)]
        retrieval = evaluate_synthetic_retrieval(detector.loupe, processor, samples)
        detection = evaluate_synthetic_detection(detector, processor, samples)
        scores = {
            "retrieval_R@1": (retrieval["i2t_R@1"] + retrieval["t2i_R@1"]) / 2,
            "i2t_R@1": retrieval["i2t_R@1"],
            "t2i_R@1": retrieval["t2i_R@1"],
            "mAP@0.3": detection["mAP@0.3"],
            "mAP@0.5": detection["mAP@0.5"],
            "grounding_acc": evaluate_synthetic_grounding(detector, processor, samples)["accuracy"],
            **pointing_game(detector.loupe, processor, samples),
            "decomposition": decompose(detector, processor, samples),
        }
        recall = scores["decomposition"]["proposal_recall"]["selected"]["all"]
        scores["proposal_recall@0.5"] = recall["0.5"]
        if row == "backbone":
            dense = evaluate_synthetic_detection(detector.loupe, processor, samples, method="dense")
            scores["dense_baseline_mAP@0.3"] = dense["mAP@0.3"]
            scores["dense_baseline_mAP@0.5"] = dense["mAP@0.5"]
        result["splits"][split] = scores
    return result


def table(results: dict, args: argparse.Namespace) -> str:
    lines = [
        "| model | split | R@1 (i2t / t2i) | mAP@0.3 | mAP@0.5 | grounding acc | proposal recall@0.5 | pointing: most / least similar cell in object (chance) | s/step | × backbone |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = results.get("backbone", {}).get("step_s")
    for row, result in results.items():
        for split, s in result["splits"].items():
            ratio = f"{result['step_s'] / base:.2f}" if base else "–"
            lines.append(
                f"| {TITLES[row]} | {split} | {s['i2t_R@1']:.3f} / {s['t2i_R@1']:.3f} | {s['mAP@0.3']:.3f} | "
                f"{s['mAP@0.5']:.3f} | {s['grounding_acc']:.3f} | {s['proposal_recall@0.5']:.3f} | "
                f"{s['pointing_accuracy']:.3f} / {s['pointing_accuracy_least_similar']:.3f} "
                f"({s['pointing_chance']:.3f}) | {result['step_s']:.2f} | {ratio} |"
            )
    for split, s in results.get("backbone", {}).get("splits", {}).items():
        lines.append(
            f"| dense-similarity baseline (backbone) | {split} | – | {s['dense_baseline_mAP@0.3']:.3f} | "
            f"{s['dense_baseline_mAP@0.5']:.3f} | – | – | – | – | – |"
        )
    return "\n".join(lines)


def decomposition_table(results: dict) -> str:
    """Where each row loses (`loupe_hf.evaluation.decomposition`): proposal recall@0.5 of the selected
    regions per object size (and of their boxes before refinement, and of every candidate), shape and colour accuracy on ground-truth
    boxes, and the grounding and detection loss budgets per 100."""
    lines = [
        "| model | split | recall@0.5 selected: small / medium / large (all: refined; proposed; all candidates) | shape / colour on GT boxes (colour over shapes) | grounding per 100: correct / no proposal / bad fit / wrong object | detection per 100: correct / no proposal / bad fit / wrong object |",
        "|---|---|---|---|---|---|",
    ]
    for row, result in results.items():
        for split, s in result["splits"].items():
            d = s["decomposition"]
            selected, every = (
                d["proposal_recall"]["selected"],
                d["proposal_recall"]["all_candidates"],
            )
            # results written before the proposed boxes were measured lack them
            proposed = d["proposal_recall"].get("proposed", {}).get("all", {}).get("0.5")
            proposed = "–" if proposed is None else f"{proposed:.2f}"
            recall = " / ".join(
                f"{selected[size]['0.5']:.2f}" if size in selected else "–"
                for size in ("small", "medium", "large")
            )
            boxes = d["attribute_accuracy"]["ground_truth_boxes"]
            over_shapes = boxes.get("colour_over_shapes")  # absent from earlier results
            over_shapes = "–" if over_shapes is None else f"{over_shapes:.2f}"
            budgets = [
                " / ".join(f"{budget[name]:.0f}" for name in OUTCOMES)
                for budget in (
                    d["loss_budget"]["grounding_per_100_expressions"],
                    d["loss_budget"]["detection_per_100_objects"],
                )
            ]
            lines.append(
                f"| {TITLES[row]} | {split} | {recall} ({selected['all']['0.5']:.2f}; {proposed}; "
                f"{every['all']['0.5']:.2f}) | "
                f"{boxes['shape']:.2f} / {boxes['colour']:.2f} ({over_shapes}) | {budgets[0]} | {budgets[1]} |"
            )
    return "\n".join(lines)


def plot_curves(rows: list[str], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for row in rows:
        history = json.loads((args.output_dir / row / "trainer_state.json").read_text())[
            "log_history"
        ]
        points = [(entry["step"], entry) for entry in history if "cmc_loss" in entry]
        steps = [step for step, _ in points]
        axes[0].plot(steps, [entry["cmc_loss"] for _, entry in points], label=TITLES[row])
        if row != "backbone":
            axes[1].plot(
                steps,
                [entry["region_confidence"] for _, entry in points],
                label=f"{TITLES[row]}: confidence",
            )
            axes[1].plot(
                steps,
                [entry["region_size"] for _, entry in points],
                "--",
                label=f"{TITLES[row]}: box side",
            )
    axes[0].set(title="CMC loss", xlabel="step", yscale="log")
    axes[1].set(title="region module", xlabel="step")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def example_picture(rows: list[str], args: argparse.Namespace, path: Path) -> None:
    samples = [generate_sample(index, "validation") for index in range(3)]
    tiles = []
    for row in rows:
        checkpoint = args.output_dir / row
        detector = LoupeForZeroShotDetection.from_pretrained(checkpoint).eval()
        processor = LoupeProcessor.from_pretrained(checkpoint)
        for sample in samples:
            names = sorted(set(sample["objects"]["category"]))
            result = detector.detect(
                sample["image"], names, processor, threshold=0.0, top_k=len(names)
            )[0]
            boxes = result["boxes"].tolist()
            tiles.append(
                draw_boxes(
                    sample["image"],
                    boxes,
                    result["text_labels"],
                    result["scores"].tolist(),
                    scale=2,
                )
            )
    canvas = picture_grid(tiles, columns=len(samples))
    canvas.save(path)


def main() -> None:
    args = parse_args()
    rows = [row for row in args.rows.split(",") if row]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    args.docs_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if not args.skip_training:
        for row in rows:
            if args.reuse_trained and (args.output_dir / row / "train_results.json").is_file():
                print(f"[ablation] reusing the trained {row} checkpoint", flush=True)
                continue
            train(row, args)
    torch.set_grad_enabled(False)
    results = {row: evaluate(row, args) for row in rows}
    report = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "arguments": {k: str(v) for k, v in vars(args).items()},
        "results": results,
    }
    (args.docs_dir / "ablation.json").write_text(json.dumps(report, indent=2))
    plot_curves(rows, args, args.docs_dir / "ablation_curves.png")
    example_picture(rows, args, args.docs_dir / "ablation_examples.png")
    markdown = table(results, args) + "\n\n" + decomposition_table(results)
    (args.docs_dir / "ablation_table.md").write_text(markdown + "\n")
    print(markdown)
    print(
        f"[ablation] done in {time.time() - start:.0f} s; wrote {args.docs_dir}/ablation.json, ablation_table.md, ablation_curves.png, ablation_examples.png"
    )


if __name__ == "__main__":
    main()
