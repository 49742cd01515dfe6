"""Training-step time of the paper's ablation rows on the tiny config; prints one JSON document.

    python benchmarks/pretraining_step.py --batch-size 64 --steps 10 \
        --image-pooling max mean --unsil-variants tiny paper

Rows (METHOD §5, Table 4): backbone (CMC only), +TSA, +TSA+FSA with sampled labels, and full LOUPE
with UNSIL (one row per `--unsil-variants`: `tiny`, the preset's predictor, dot-product attention
with a max region vector, token-level labels only; `paper`, additive attention with a mean region
vector, both levels), for every
`--image-pooling`. Each row runs in its
own subprocess, so its peak memory (max RSS) is its own. Ratios are to the backbone of the same
pooling, measured in the same run.

UNSIL only saves time once it is confident. By default a UNSIL row first trains for
`--unsil-train-steps` steps past its warm-up on the few benchmark batches; `--init-from` instead
starts every row from a pre-training checkpoint (e.g. the ablation's full-LOUPE row after 600 steps),
so the gate is timed as it is at the end of a real run.

`--malloc tuned` (the default, as `LoupeTrainer` trains) runs each row with
`loupe_hf.cpu_allocator.keep_freed_memory()`; `--malloc default tuned` times every row both ways.
Rows are named `<row>@<pooling>/<malloc>`; ratios are to the backbone of the same pooling and
setting. Each row also reports its minor page faults per timed step.

The machine's speed drifts by 10-15% between minutes, which moves one row's ratio by as much; with
`--rounds R` every row runs R times in turn, and the report gives the median ratio of the R paired
rounds and their range.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import statistics
import subprocess
import sys
import time

ROWS = {
    "backbone": {"use_tsa": False, "use_fsa": False, "use_unsil": False},
    "tsa": {"use_tsa": True, "use_fsa": False, "use_unsil": False},
    "tsa_fsa_sampling": {"use_tsa": True, "use_fsa": True, "use_unsil": False},
    "loupe_unsil": {"use_tsa": True, "use_fsa": True, "use_unsil": True},
}

UNSIL_VARIANTS = {
    "tiny": {},  # the preset's own predictor
    "paper": {
        "unsil_architecture": "mlp_attention",
        "unsil_region_pooling": "mean",
        "unsil_levels": ["token", "semantic"],
    },
}


def parse_row(name: str) -> tuple[str, str, str]:
    """`"loupe_unsil:<variant>@<pooling>/<malloc>"` → (row with variant, pooling, malloc)."""
    row, _, setting = name.partition("@")
    pooling, _, malloc = setting.partition("/")
    return row, pooling, malloc


def row_overrides(name: str) -> dict:
    """Config overrides of a row (see `parse_row`)."""
    row, pooling, _ = parse_row(name)
    row, _, variant = row.partition(":")
    return {**ROWS[row], "image_pooling": pooling, **UNSIL_VARIANTS.get(variant, {})}


def backbone_of(name: str) -> str:
    """The backbone row a row's ratio is taken to: same pooling, same allocator setting."""
    return "backbone@" + name.partition("@")[2]


def row_names(args: argparse.Namespace) -> list[str]:
    names = []
    for malloc in args.malloc:
        suffix = f"/{malloc}"
        for pooling in args.image_pooling:
            names += [f"{row}@{pooling}{suffix}" for row in ROWS if row != "loupe_unsil"]
            names += [f"loupe_unsil:{variant}@{pooling}{suffix}" for variant in args.unsil_variants]
    return names


def run_row(name: str, args: argparse.Namespace) -> dict:
    import torch

    from loupe_hf import LoupeConfig, LoupeImageProcessor, LoupeProcessor, train_wordpiece_tokenizer
    from loupe_hf.cpu_allocator import keep_freed_memory
    from loupe_hf.data import generate_sample, training_captions
    from loupe_hf.pretraining import LoupeForPreTraining

    malloc_applied = parse_row(name)[2] == "tuned" and keep_freed_memory()
    torch.manual_seed(0)
    overrides = row_overrides(name)
    if args.init_from:
        # The checkpoint's own warm-up setting and step counter stand: it is past its warm-up.
        model = LoupeForPreTraining.from_pretrained(args.init_from, **overrides).train()
        config = model.config
        processor = LoupeProcessor.from_pretrained(args.init_from)
    else:
        tokenizer = train_wordpiece_tokenizer(training_captions(1000), vocab_size=2048)
        image_processor = LoupeImageProcessor(size={"height": 64, "width": 64})
        processor = LoupeProcessor(image_processor, tokenizer)
        overrides["unsil_warmup_steps"] = args.unsil_warmup_steps
        config = LoupeConfig.from_preset(
            "tiny", text_config={"vocab_size": len(tokenizer)}, **overrides
        )
        model = LoupeForPreTraining(config).train()
    # From a checkpoint, a small learning rate, as at the end of its schedule: fresh AdamW moments
    # make the first updates about `lr` per parameter, and at 1e-3 they moved a trained UNSIL's σ
    # from about 0.47 to 0.74 within the timed steps, so the gate was no longer the checkpoint's.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6 if args.init_from else 1e-3)

    def batches():
        index = 0
        while True:
            samples = [generate_sample(index + i) for i in range(args.batch_size)]
            index += args.batch_size
            yield processor(
                images=[s["image"] for s in samples],
                text=[s["caption"] for s in samples],
                phrase_spans=[s["objects"]["phrase_span"] for s in samples],
            )

    stream = batches()
    prepared = [next(stream) for _ in range(4)]  # data preparation is not what is measured

    def step(batch) -> dict:
        out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out

    trained = 0
    if config.use_unsil and not args.init_from:
        for trained in range(1, args.unsil_warmup_steps + args.unsil_train_steps + 1):
            step(prepared[trained % len(prepared)])
    times, faults, last = [], [], None
    for index in range(args.steps + 2):
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        last = step(prepared[index % len(prepared)])
        if index >= 2:  # the first steps warm up allocators and caches
            times.append(time.perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
    return {
        "row": name,
        "step_s": statistics.median(times),
        "malloc_tuned": malloc_applied,
        "minor_page_faults_per_step": statistics.median(faults),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "unsil_steps_trained_before_timing": trained,
        "losses": {
            key: round(float(last[key]), 4)
            for key in ("cmc_loss", "tsa_loss", "fsa_loss", "unsil_loss")
        },
        "tsa_unsil_share": round(float(last.tsa_unsil_share), 3),
        "fsa_unsil_share": round(float(last.fsa_unsil_share), 3),
        "tsa_unsil_sigma": round(float(last.tsa_unsil_sigma), 4),
        "fsa_unsil_sigma": round(float(last.fsa_unsil_sigma), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--unsil-warmup-steps", type=int, default=20)
    parser.add_argument("--unsil-train-steps", type=int, default=100)
    parser.add_argument("--image-pooling", nargs="+", default=["max", "mean"])
    parser.add_argument(
        "--unsil-variants", nargs="+", choices=sorted(UNSIL_VARIANTS), default=["tiny", "paper"]
    )
    parser.add_argument("--init-from", help="pre-training checkpoint every row starts from")
    parser.add_argument("--rounds", type=int, default=1, help="times every row is run, in turn")
    parser.add_argument(
        "--malloc",
        nargs="+",
        choices=["tuned", "default"],
        default=["tuned"],
        help="glibc allocator setting of the rows (loupe_hf.cpu_allocator), as LoupeTrainer trains",
    )
    parser.add_argument("--row", help="internal: run one row in this process")
    args = parser.parse_args()
    for name in ("batch_size", "steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.init_from and args.unsil_variants != ["tiny"]:
        parser.error("--init-from keeps the checkpoint's own UNSIL: use --unsil-variants tiny")
    if args.row:
        print(json.dumps(run_row(args.row, args)))
        return
    # Rows run in turn, `--rounds` times over: a slow spell of the machine then hits every row
    # of a round instead of one row, and each round gives its own (paired) ratios.
    rounds: list[dict] = []
    for round_index in range(args.rounds):
        results = {}
        for name in row_names(args):
            command = [sys.executable, __file__, "--row", name, *sys.argv[1:]]
            print(f"[benchmark] round {round_index + 1}: {name}", file=sys.stderr, flush=True)
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[name] = json.loads(output.strip().splitlines()[-1])
        rounds.append(results)

    def ratios(results: dict) -> dict:
        return {
            name: row["step_s"] / results[backbone_of(name)]["step_s"]
            for name, row in results.items()
        }

    per_round = [ratios(results) for results in rounds]
    report = {
        "command": shlex.join(["python", *sys.argv]),
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "rows": rounds[-1] if args.rounds == 1 else rounds,
        "ratio_to_backbone": {
            name: round(statistics.median(r[name] for r in per_round), 2) for name in per_round[0]
        },
        "ratio_to_backbone_range": {
            name: [
                round(min(r[name] for r in per_round), 2),
                round(max(r[name] for r in per_round), 2),
            ]
            for name in per_round[0]
        },
        "paper_ratio_to_backbone": {"tsa": 7.16, "tsa_fsa_sampling": 8.46, "loupe_unsil": 1.65},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
