"""Where a pre-training step's time goes, for UNSIL switched on or off per level; prints JSON.

    python benchmarks/step_sections.py --checkpoint outputs/ablation/loupe

Starts from a pre-training checkpoint (its UNSIL past its warm-up) and times, for each variant,
`--steps` training steps of batch `--batch-size` on synthetic pairs (a small learning rate, so the
checkpoint's state, and with it UNSIL's gate, stays what training left):

- `checkpoint`: the checkpoint's own UNSIL levels;
- `no_semantic_unsil` / `no_token_unsil` / `no_unsil`: that predictor removed, so its labels are
  all sampled (what the predictor costs against what it saves).

Per variant: the median over steps of the whole step and of its sections (the encoders' forward,
the token and semantic levels and their sampling, the UNSIL forwards, backward, optimiser), and the
share of labels UNSIL supplied. `--malloc tuned` (the default) keeps freed memory in the process,
as `LoupeTrainer` does (`loupe_hf.cpu_allocator`). Variants run in turn `--rounds` times, so the
machine's drift hits all of them; the report keeps the median over rounds.
"""

from __future__ import annotations

import argparse
import collections
import json
import shlex
import statistics
import sys
import time

import torch

VARIANTS = {
    "checkpoint": (),
    "no_semantic_unsil": ("semantic_unsil",),
    "no_token_unsil": ("token_unsil",),
    "no_unsil": ("token_unsil", "semantic_unsil"),
}


class SectionTimer:
    """Accumulates wall time of wrapped callables per section name, for the current step."""

    def __init__(self):
        self.current: dict[str, float] = collections.defaultdict(float)

    def wrap(self, owner, name: str, section: str) -> None:
        function = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            self.current[section] += time.perf_counter() - start
            return result

        setattr(owner, name, timed)


def run_variant(model, removed: tuple[str, ...], batches: list, steps: int) -> dict:
    import loupe_hf.pretraining.modeling_pretraining as pretraining

    kept = {name: getattr(model, name) for name in removed}
    for name in removed:
        setattr(model, name, None)
    timer = SectionTimer()
    originals = {
        name: getattr(pretraining, name)
        for name in ("selected_interactions", "selected_images_interactions")
    }
    timer.wrap(pretraining, "selected_interactions", "token_sampling")
    timer.wrap(pretraining, "selected_images_interactions", "semantic_sampling")
    for target, section in (
        (model.loupe, "encoders_forward"),
        (model.token_unsil, "token_unsil_forward"),
        (model.semantic_unsil, "semantic_unsil_forward"),
    ):
        if target is not None:
            timer.wrap(target, "forward", section)
    timer.wrap(model, "token_level", "token_level")
    timer.wrap(model, "semantic_level", "semantic_level")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    records, shares = [], []
    try:
        for index in range(steps + 2):
            timer.current.clear()
            start = time.perf_counter()
            out = model(**batches[index % len(batches)])
            middle = time.perf_counter()
            out.loss.backward()
            after_backward = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            end = time.perf_counter()
            if index < 2:  # allocator and cache warm-up
                continue
            records.append(
                {
                    **timer.current,
                    "forward": middle - start,
                    "backward": after_backward - middle,
                    "optimizer": end - after_backward,
                    "step": end - start,
                }
            )
            shares.append((float(out.tsa_unsil_share), float(out.fsa_unsil_share)))
    finally:
        for name, value in kept.items():
            setattr(model, name, value)
        for name, function in originals.items():
            setattr(pretraining, name, function)
        for target in (model, model.loupe, model.token_unsil, model.semantic_unsil):
            if target is not None:
                target.__dict__.pop("forward", None)
        for name in ("token_level", "semantic_level"):
            model.__dict__.pop(name, None)
    sections = sorted({key for record in records for key in record})
    return {
        "seconds": {
            key: statistics.median(record.get(key, 0.0) for record in records) for key in sections
        },
        "tsa_unsil_share": statistics.mean(share[0] for share in shares),
        "fsa_unsil_share": statistics.mean(share[1] for share in shares),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True, help="a full-LOUPE pre-training checkpoint")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument(
        "--malloc",
        choices=["tuned", "default"],
        default="tuned",
        help="glibc allocator setting (loupe_hf.cpu_allocator), tuned as LoupeTrainer trains",
    )
    args = parser.parse_args()
    for name in ("batch_size", "steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    from loupe_hf import LoupeProcessor
    from loupe_hf.cpu_allocator import keep_freed_memory
    from loupe_hf.data import generate_sample
    from loupe_hf.pretraining import LoupeForPreTraining

    malloc_tuned = args.malloc == "tuned" and keep_freed_memory()
    torch.manual_seed(0)
    model = LoupeForPreTraining.from_pretrained(args.checkpoint).train()
    if model.token_unsil is None and model.semantic_unsil is None:
        parser.error(f"{args.checkpoint} has no UNSIL predictor (train with --ablation loupe)")
    processor = LoupeProcessor.from_pretrained(args.checkpoint)
    batches = []
    for offset in range(3):
        start = 10_000 + offset * args.batch_size
        samples = [generate_sample(i) for i in range(start, start + args.batch_size)]
        batches.append(
            processor(
                images=[s["image"] for s in samples],
                text=[s["caption"] for s in samples],
                phrase_spans=[s["objects"]["phrase_span"] for s in samples],
            )
        )
    rounds = []
    for round_index in range(args.rounds):
        results = {}
        for name in args.variants:
            print(f"[sections] round {round_index + 1}: {name}", file=sys.stderr, flush=True)
            results[name] = run_variant(model, VARIANTS[name], batches, args.steps)
        rounds.append(results)
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "checkpoint": args.checkpoint,
        "batch_size": args.batch_size,
        "malloc_tuned": malloc_tuned,
        "variants": {
            name: {
                "seconds": {
                    key: round(
                        statistics.median(r[name]["seconds"].get(key, 0.0) for r in rounds), 4
                    )
                    for key in rounds[0][name]["seconds"]
                },
                "tsa_unsil_share": round(rounds[0][name]["tsa_unsil_share"], 3),
                "fsa_unsil_share": round(rounds[0][name]["fsa_unsil_share"], 3),
            }
            for name in args.variants
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
