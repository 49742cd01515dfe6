"""Training-step time of the paper's ablation rows on the tiny config; prints one JSON document.

    python benchmarks/pretraining_step.py --batch-size 64 --steps 20 --unsil-train-steps 150

Rows (METHOD §5, Table 4): backbone (CMC only), +TSA, +TSA+FSA with sampled labels, and full LOUPE
with UNSIL. Each row runs in its own subprocess, so its peak memory (max RSS) is its own. The UNSIL
row first trains for `--unsil-train-steps` steps past its warm-up (UNSIL only saves time once it is
confident), then is timed like the others. Ratios are to the backbone measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
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


def run_row(name: str, args: argparse.Namespace) -> dict:
    import torch

    from loupe_hf import LoupeConfig, LoupeImageProcessor, LoupeProcessor, train_wordpiece_tokenizer
    from loupe_hf.data import generate_sample, training_captions
    from loupe_hf.pretraining_loupe import LoupeForPreTraining

    torch.manual_seed(0)
    tokenizer = train_wordpiece_tokenizer(training_captions(1000), vocab_size=2048)
    processor = LoupeProcessor(LoupeImageProcessor(size={"height": 64, "width": 64}), tokenizer)
    overrides = {**ROWS[name], "unsil_warmup_steps": args.unsil_warmup_steps}
    config = LoupeConfig.from_preset(
        "tiny", text_config={"vocab_size": len(tokenizer)}, **overrides
    )
    model = LoupeForPreTraining(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

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
    if config.use_unsil:
        for trained in range(1, args.unsil_warmup_steps + args.unsil_train_steps + 1):
            step(prepared[trained % len(prepared)])
    times, last = [], None
    for index in range(args.steps + 2):
        start = time.perf_counter()
        last = step(prepared[index % len(prepared)])
        if index >= 2:  # the first steps warm up allocators and caches
            times.append(time.perf_counter() - start)
    return {
        "row": name,
        "step_s": statistics.median(times),
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
    parser.add_argument("--row", choices=sorted(ROWS), help="internal: run one row in this process")
    args = parser.parse_args()
    if args.row:
        print(json.dumps(run_row(args.row, args)))
        return
    results = {}
    for name in ROWS:
        command = [sys.executable, __file__, "--row", name, *sys.argv[1:]]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(output.strip().splitlines()[-1])
    backbone = results["backbone"]["step_s"]
    report = {
        "batch_size": args.batch_size,
        "rows": results,
        "ratio_to_backbone": {
            name: round(row["step_s"] / backbone, 2) for name, row in results.items()
        },
        "paper_ratio_to_backbone": {"tsa": 7.16, "tsa_fsa_sampling": 8.46, "loupe_unsil": 1.65},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
