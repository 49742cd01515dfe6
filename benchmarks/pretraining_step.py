"""Training-step time of the paper's ablation rows; prints one JSON document.

    python benchmarks/pretraining_step.py --batch-size 64 --steps 10 \
        --image-pooling max mean --unsil-variants tiny paper
    python benchmarks/pretraining_step.py --device cuda --dtype bf16 --preset paper \
        --batch-size 32 128 --image-pooling mean --unsil-variants paper --malloc default

`--device cuda` times on the GPU (synchronised), `--dtype bf16` under autocast, `--preset paper`
the paper's towers; several `--batch-size` values give one set of rows each. Every row reports
pairs/s, peak memory and, on CUDA, the model FLOPs utilisation (FLOPs of one step counted by
`torch.utils.flop_counter`, over `--peak-tflops`, by default the dense bf16 peak of an H100/H200).

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


PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


def device_name(device: str) -> str:
    import platform

    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def peak_tflops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    name = device_name(args.device) if args.device == "cuda" else ""
    return next((value for key, value in PEAK_TFLOPS.items() if key in name), None)


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
        overrides["unsil_warmup_steps"] = args.unsil_warmup_steps
        config = LoupeConfig.from_preset(
            args.preset, text_config={"vocab_size": len(tokenizer)}, **overrides
        )
        size = config.vision_config.image_size
        image_processor = LoupeImageProcessor(size={"height": size, "width": size})
        processor = LoupeProcessor(image_processor, tokenizer)
        model = LoupeForPreTraining(config).train()
    device = torch.device(args.device)
    model.to(device)
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
            ).to(device)

    stream = batches()
    prepared = [next(stream) for _ in range(4)]  # data preparation is not what is measured

    def step(batch) -> dict:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
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

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    times, faults, last = [], [], None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for index in range(args.steps + 2):
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        synchronize()
        start = time.perf_counter()
        last = step(prepared[index % len(prepared)])
        synchronize()
        if index >= 2:  # the first steps warm up allocators and caches
            times.append(time.perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
    step_s = statistics.median(times)
    flops = None
    if device.type == "cuda":
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step(prepared[0])
        flops = counter.get_total_flops()
    peak = peak_tflops(args)
    return {
        "row": name,
        "device": device_name(args.device),
        "preset": args.preset,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "step_s": step_s,
        "pairs_per_s": round(args.batch_size / step_s, 1),
        "peak_cuda_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if device.type == "cuda"
        else None,
        "model_tflop_per_step": round(flops / 1e12, 3) if flops else None,
        "mfu": round(flops / step_s / (peak * 1e12), 4) if flops and peak else None,
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
    parser.add_argument("--batch-size", type=int, nargs="+", default=[64])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--preset", choices=["tiny", "paper"], default="tiny")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, for the MFU")
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
    for name in ("steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.batch_size) < 1:
        parser.error("--batch-size must be >= 1")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device here")
    if args.init_from and args.unsil_variants != ["tiny"]:
        parser.error("--init-from keeps the checkpoint's own UNSIL: use --unsil-variants tiny")
    if args.row:
        args.batch_size = args.batch_size[0]  # a row runs at one batch size
        print(json.dumps(run_row(args.row, args)))
        return
    sizes = args.batch_size
    reports = [run_batch_size(args, size) for size in sizes]
    print(json.dumps(reports[0] if len(reports) == 1 else {"batch_sizes": reports}, indent=2))


def run_batch_size(args: argparse.Namespace, batch_size: int) -> dict:
    """Every row at one batch size, `--rounds` times; the report of that batch size."""
    # Rows run in turn, `--rounds` times over: a slow spell of the machine then hits every row
    # of a round instead of one row, and each round gives its own (paired) ratios.
    rounds: list[dict] = []
    for round_index in range(args.rounds):
        results = {}
        for name in row_names(args):
            command = [sys.executable, __file__, "--row", name, *row_arguments(batch_size)]
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
        "device": device_name(args.device),
        "batch_size": batch_size,
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
    return report


def row_arguments(batch_size: int) -> list[str]:
    """This command's arguments with `--batch-size` narrowed to one value, for a row's process."""
    arguments, skipping = [], False
    for argument in sys.argv[1:]:
        if argument == "--batch-size":
            skipping = True
            continue
        if skipping and not argument.startswith("--"):
            continue
        skipping = False
        arguments.append(argument)
    return [*arguments, "--batch-size", str(batch_size)]


if __name__ == "__main__":
    main()
