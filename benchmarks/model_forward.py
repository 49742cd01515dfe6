"""Forward (and forward+backward) time of LOUPE presets on synthetic images; prints one JSON document.

    python benchmarks/model_forward.py --preset tiny --batch-size 32 --image-size 128
    python benchmarks/model_forward.py --preset tiny tiny-swin --batch-size 64   # towers compared

Variants run side by side in one process, in turn, repeat after repeat: fp32 vs CPU bf16 autocast,
inference vs a training step, and each preset, so the ratios are meaningful even when absolute
seconds move with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import device_name
from loupe_hf import LoupeConfig, LoupeImageProcessor, LoupeModel, train_wordpiece_tokenizer
from loupe_hf.data import SyntheticConfig, generate_sample, training_captions


def timed_in_turn(functions: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, all run once per repeat in turn (after one warm-up each)."""
    for function in functions.values():
        function()
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def variants(preset: str, samples: list[dict], tokenizer) -> tuple[dict, dict]:
    """The preset's timed functions (preprocessing; forward and training step, fp32 and bf16), and facts."""
    config = LoupeConfig.from_preset(preset, text_config={"vocab_size": len(tokenizer)})
    size = config.vision_config.image_size
    image_processor = LoupeImageProcessor(size={"height": size, "width": size})
    text = tokenizer([s["caption"] for s in samples], padding=True, return_tensors="pt")
    model = LoupeModel(config)
    images = [s["image"] for s in samples]

    def preprocess():
        return image_processor(images, return_tensors="pt")["pixel_values"]

    inputs = {"pixel_values": preprocess(), **text}

    def forward(bf16: bool):
        def run():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model.eval()(**inputs)

        return run

    def train_step(bf16: bool):
        def run():
            model.train()
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(**inputs, return_loss=True).loss
            loss.backward()

        return run

    functions = {
        "preprocess_s": preprocess,
        "forward_fp32_s": forward(False),
        "forward_bf16_s": forward(True),
        "train_step_fp32_s": train_step(False),
        "train_step_bf16_s": train_step(True),
    }
    tower = config.vision_config.convolutional_backbone or "swin"
    facts = {"model_image_size": size, "image_tower": tower}
    facts["parameters"] = sum(p.numel() for p in model.parameters())
    return functions, facts


def report(preset: str, times: dict[str, float], facts: dict, batch_size: int) -> dict:
    return {
        "preset": preset,
        **facts,
        **{key: round(value, 4) for key, value in times.items()},
        "pairs_per_s_train_fp32": round(batch_size / times["train_step_fp32_s"], 1),
        "ratio_bf16_over_fp32_forward": round(times["forward_bf16_s"] / times["forward_fp32_s"], 3),
        "ratio_bf16_over_fp32_train": round(
            times["train_step_bf16_s"] / times["train_step_fp32_s"], 3
        ),
        "ratio_preprocess_over_forward": round(times["preprocess_s"] / times["forward_fp32_s"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", nargs="+", default=["tiny"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--image-size", type=int, default=128, help="size of the synthetic source images"
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)

    synthetic = SyntheticConfig(image_size=args.image_size)
    samples = [generate_sample(i, "validation", synthetic) for i in range(args.batch_size)]
    tokenizer = train_wordpiece_tokenizer(training_captions(500, synthetic), vocab_size=1024)
    functions, facts = {}, {}
    for preset in args.preset:
        timed, facts[preset] = variants(preset, samples, tokenizer)
        functions.update({(preset, name): function for name, function in timed.items()})
    medians = timed_in_turn(functions, args.repeats)
    rows = [
        report(
            preset,
            {name: value for (row, name), value in medians.items() if row == preset},
            facts[preset],
            args.batch_size,
        )
        for preset in args.preset
    ]
    first = rows[0]
    for row in rows[1:]:  # each preset against the first, in one run
        row["ratio_train_step_fp32_over_first"] = round(
            row["train_step_fp32_s"] / first["train_step_fp32_s"], 3
        )
        row["ratio_forward_fp32_over_first"] = round(
            row["forward_fp32_s"] / first["forward_fp32_s"], 3
        )
    print(json.dumps({
        "benchmark": "model_forward",
        "device": device_name("cpu"),
        "batch_size": args.batch_size,
        "source_image_size": args.image_size,
        "repeats": args.repeats,
        "presets": rows,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
