"""Is one checkpoint's retrieval worse than another's? Paired R@1 over several synthetic galleries.

    python examples/compare_retrieval.py --checkpoints outputs/ablation/backbone outputs/ablation/loupe

R@1 on one 256-image gallery has a standard error of about 0.025, as large as the differences the
ablation asks about. This scores both checkpoints on the same `--chunks` disjoint galleries of
`--gallery` images per split (the ablation's protocol: image→text and text→image R@1 within the
gallery) and prints, as JSON, each gallery's R@1 and the mean paired difference (second − first)
with its standard error across galleries.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys

import torch

from loupe_hf import LoupeModel, LoupeProcessor
from loupe_hf.data import generate_sample
from loupe_hf.evaluation.runners import evaluate_synthetic_retrieval


def gallery_scores(checkpoint: str, split: str, chunks: int, gallery: int) -> list[float]:
    model = LoupeModel.from_pretrained(checkpoint).eval()
    processor = LoupeProcessor.from_pretrained(checkpoint)
    scores = []
    for chunk in range(chunks):
        indices = range(chunk * gallery, (chunk + 1) * gallery)
        retrieval = evaluate_synthetic_retrieval(
            model, processor, [generate_sample(index, split) for index in indices]
        )
        scores.append((retrieval["i2t_R@1"] + retrieval["t2i_R@1"]) / 2)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoints", nargs=2, required=True, metavar=("FIRST", "SECOND"))
    parser.add_argument("--splits", nargs="+", default=["validation", "compositional"])
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--gallery", type=int, default=256)
    args = parser.parse_args()
    if args.chunks < 2:
        parser.error("--chunks must be >= 2 to estimate a standard error")
    torch.set_grad_enabled(False)
    report = {"command": shlex.join(["python", *sys.argv]), "splits": {}}
    for split in args.splits:
        first, second = (
            gallery_scores(checkpoint, split, args.chunks, args.gallery)
            for checkpoint in args.checkpoints
        )
        differences = [b - a for a, b in zip(first, second, strict=True)]
        report["splits"][split] = {
            "first_R@1": [round(x, 4) for x in first],
            "second_R@1": [round(x, 4) for x in second],
            "mean_difference": round(statistics.mean(differences), 4),
            "difference_standard_error": round(
                statistics.stdev(differences) / len(differences) ** 0.5, 4
            ),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
