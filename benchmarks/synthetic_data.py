"""Generation speed of the synthetic benchmark data at 64 and 128 px; prints JSON (samples/s).

python benchmarks/synthetic_data.py --num-samples 500
"""

from __future__ import annotations

import argparse
import json
import time

from loupe_hf.data import SyntheticConfig, generate_sample, training_captions


def rate(function, count: int) -> float:
    start = time.perf_counter()
    for index in range(count):
        function(index)
    return round(count / (time.perf_counter() - start), 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-samples", type=int, default=500)
    args = parser.parse_args()
    report = {}
    for size in (64, 128):
        config = SyntheticConfig(image_size=size)
        report[f"generate_sample_{size}px_per_s"] = rate(
            lambda i, c=config: generate_sample(i, "train", c), args.num_samples
        )
    start = time.perf_counter()
    count = sum(1 for _ in training_captions(args.num_samples))
    report["training_captions_samples_per_s"] = round(
        args.num_samples / (time.perf_counter() - start), 1
    )
    report["captions_and_expressions"] = count
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
