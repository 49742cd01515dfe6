"""Forward (and forward+backward) time of a LOUPE preset on synthetic images; prints one JSON document.

    python benchmarks/model_forward.py --preset tiny --batch-size 32 --image-size 128

Variants run side by side in one process: fp32 vs CPU bf16 autocast, inference vs a training step,
so the ratios are meaningful even when absolute seconds move with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from loupe_hf import LoupeConfig, LoupeImageProcessor, LoupeModel, train_wordpiece_tokenizer
from loupe_hf.data import SyntheticConfig, generate_sample, training_captions


def timed(function, repeats: int) -> float:
    function()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--image-size", type=int, default=128, help="size of the synthetic source images"
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)

    synthetic = SyntheticConfig(image_size=args.image_size)
    samples = [generate_sample(i, "validation", synthetic) for i in range(args.batch_size)]
    config = LoupeConfig.from_preset(args.preset)
    tokenizer = train_wordpiece_tokenizer(
        training_captions(500, synthetic), vocab_size=config.text_config.vocab_size
    )
    size = config.vision_config.image_size
    image_processor = LoupeImageProcessor(size={"height": size, "width": size})
    text = tokenizer([s["caption"] for s in samples], padding=True, return_tensors="pt")
    model = LoupeModel(config)
    images = [s["image"] for s in samples]

    def preprocess():
        return image_processor(images, return_tensors="pt")["pixel_values"]

    pixels = preprocess()
    inputs = {"pixel_values": pixels, **text}

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

    results = {
        "preprocess_s": timed(preprocess, args.repeats),
        "forward_fp32_s": timed(forward(False), args.repeats),
        "forward_bf16_s": timed(forward(True), args.repeats),
        "train_step_fp32_s": timed(train_step(False), args.repeats),
        "train_step_bf16_s": timed(train_step(True), args.repeats),
    }
    report = {
        "preset": args.preset,
        "batch_size": args.batch_size,
        "source_image_size": args.image_size,
        "model_image_size": size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        **{key: round(value, 4) for key, value in results.items()},
        "pairs_per_s_train_fp32": round(args.batch_size / results["train_step_fp32_s"], 1),
        "ratio_bf16_over_fp32_forward": round(
            results["forward_bf16_s"] / results["forward_fp32_s"], 3
        ),
        "ratio_bf16_over_fp32_train": round(
            results["train_step_bf16_s"] / results["train_step_fp32_s"], 3
        ),
        "ratio_preprocess_over_forward": round(
            results["preprocess_s"] / results["forward_fp32_s"], 3
        ),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
