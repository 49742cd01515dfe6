"""Publish a LOUPE checkpoint (weights, processor, rendered model card) and optionally the Space.

    python examples/push_to_hub.py --checkpoint outputs/demo/checkpoint --repo_id you/loupe-tiny \\
        --evaluation outputs/demo/metrics.json [--ablation docs/ablation.json] [--space_repo_id you/loupe-demo]
    python examples/push_to_hub.py --checkpoint CKPT --render_only MODEL_CARD.md   # just write the card

The card (`loupe_hf.model_card.render_model_card`) is built from the checkpoint's config and the
measured results in `--evaluation` (from `examples/run_evaluation.py --task synthetic` or
`examples/demo.py`) and/or `--ablation` (`examples/ablation.py`); the ablation table is included
when `--ablation_table` points at it. Authentication is the usual `HF_TOKEN` / `hf auth login`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from huggingface_hub import HfApi

from loupe_hf import LoupeForZeroShotDetection, LoupeProcessor
from loupe_hf.hub import upload_model_folder, upload_space_folder
from loupe_hf.model_card import (
    TrainingFacts,
    published_parameters,
    render_model_card,
    results_from_ablation,
    results_from_synthetic_report,
)

SPACE_DIR = Path(__file__).resolve().parent.parent / "spaces"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--repo_id", help="model repository, e.g. you/loupe-tiny")
    parser.add_argument(
        "--evaluation",
        help="JSON from examples/run_evaluation.py --task synthetic or examples/demo.py",
    )
    parser.add_argument(
        "--training_data",
        help="what the checkpoint was trained on (synthetic | Hub dataset id | local files), when "
        "its folder has no training_facts.json",
    )
    parser.add_argument(
        "--ablation", help="ablation.json from examples/ablation.py (its 'loupe' row)"
    )
    parser.add_argument("--ablation_table", help="ablation_table.md to include in the card")
    parser.add_argument("--model_name", default="LOUPE (loupe-hf)")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--space_repo_id", help="also upload the Space's files as a Gradio Space")
    parser.add_argument(
        "--public_space", action="store_true", help="create the Space public (default: private)"
    )
    parser.add_argument("--render_only", help="write the card to this path and upload nothing")
    return parser.parse_args()


def card_for(args: argparse.Namespace, model: LoupeForZeroShotDetection) -> str:
    """The checkpoint's card: the Trainer's card function (`render_model_card`) of its config, the
    given evaluations and the run's facts recorded in the checkpoint folder."""
    results = []
    if args.evaluation:
        results += results_from_synthetic_report(json.loads(Path(args.evaluation).read_text()))
    if args.ablation:
        results += results_from_ablation(json.loads(Path(args.ablation).read_text()))
    # --training_data names the data when the folder does not record it (no training_facts.json).
    training = TrainingFacts.from_folder(args.checkpoint, getattr(args, "training_data", None))
    table = Path(args.ablation_table).read_text() if args.ablation_table else None
    return render_model_card(
        model.config,
        results,
        model_name=args.model_name,
        repo_id=args.repo_id,
        training=training,
        ablation_table=table,
        num_parameters=published_parameters(model),
    )


def main() -> None:
    args = parse_args()
    model = LoupeForZeroShotDetection.from_pretrained(args.checkpoint)
    processor = LoupeProcessor.from_pretrained(args.checkpoint)
    card = card_for(args, model)
    if args.render_only:
        Path(args.render_only).write_text(card)
        print(f"wrote {args.render_only}")
        return
    if not args.repo_id:
        raise SystemExit("--repo_id is required unless --render_only is given")
    api = HfApi()
    api.create_repo(args.repo_id, private=args.private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        # The base LoupeModel weights plus both heads' code: AutoModel, the detection pipeline and
        # trust_remote_code all load this folder.
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        (Path(folder) / "README.md").write_text(card)
        commit = upload_model_folder(
            api, args.repo_id, folder, commit_message="Upload LOUPE checkpoint"
        )
    print(f"pushed the checkpoint to {args.repo_id}: {commit}")
    if args.space_repo_id:
        api.create_repo(
            args.space_repo_id,
            repo_type="space",
            space_sdk="gradio",
            private=not args.public_space,
            exist_ok=True,
        )
        commit = upload_space_folder(
            api, args.space_repo_id, SPACE_DIR, commit_message="Upload the LOUPE Space"
        )
        print(f"pushed the Space to {args.space_repo_id}: {commit}")


if __name__ == "__main__":
    main()
