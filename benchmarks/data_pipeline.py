"""Can the data pipeline feed the model? Pairs/s the pre-training input pipeline delivers, against
the pairs/s a training step consumes, in one run on one device; prints one JSON document.

    python benchmarks/data_pipeline.py --batch-size 64 --batches 48 --workers 0 1 2
    python benchmarks/data_pipeline.py --device cuda --dtype bf16 --batch-size 256 --workers 0 4 8

The pipeline is the one `examples/pretrain.py` uses for the built-in data: synthetic samples
generated on the fly (`build_iterable_dataset`, sharded over the DataLoader workers), noun-phrase
extraction (`add_phrase_spans`), then `LoupeDataCollator` (image processing, tokenisation, phrase
masks), through a `torch.utils.data.DataLoader` with `--workers` processes (`pin_memory` and
persistent workers on CUDA). Consumption is full LOUPE's training step (forward, backward, AdamW)
of `--preset` on pre-made batches. `ratio` = delivered / consumed: at 2 or more the model never
waits for data.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import device_name


def build_processor(preset: str):
    from loupe_hf import LoupeConfig, LoupeImageProcessor, LoupeProcessor, train_wordpiece_tokenizer
    from loupe_hf.data import training_captions

    tokenizer = train_wordpiece_tokenizer(training_captions(1000), vocab_size=2048)
    config = LoupeConfig.from_preset(preset, text_config={"vocab_size": len(tokenizer)})
    size = config.vision_config.image_size
    processor = LoupeProcessor(LoupeImageProcessor(size={"height": size, "width": size}), tokenizer)
    return config, processor


def data_loader(processor, batch_size: int, workers: int, device: torch.device):
    from loupe_hf.data import SyntheticConfig, build_iterable_dataset
    from loupe_hf.phrases import add_phrase_spans
    from loupe_hf.pretraining.collator import LoupeDataCollator

    size = processor.image_processor.size["height"]
    stream = build_iterable_dataset(
        "train", SyntheticConfig(image_size=size), num_shards=max(1, workers)
    )
    stream = stream.map(add_phrase_spans, batched=True)
    return torch.utils.data.DataLoader(
        stream,
        batch_size=batch_size,
        collate_fn=LoupeDataCollator(processor),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )


def delivered_pairs_per_s(loader, batches: int, warmup: int = 2) -> tuple[float, float]:
    """Pairs/s after `warmup` batches (workers started, caches warm) and the time to the first batch."""
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        next(iterator)
    pairs, start = 0, time.perf_counter()
    for _ in range(batches):
        pairs += len(next(iterator)["input_ids"])
    return pairs / (time.perf_counter() - start), first


def consumed_pairs_per_s(config, batch: dict, steps: int, device, dtype: str) -> float:
    from loupe_hf.pretraining import LoupeForPreTraining

    torch.manual_seed(0)
    model = LoupeForPreTraining(config).train().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = {key: value.to(device) for key, value in batch.items() if torch.is_tensor(value)}
    times = []
    for _ in range(steps + 1):  # the first step warms up and is not counted
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return len(batch["input_ids"]) / statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--batch-size", type=int, default=64)
    # Phrase extraction maps 1000 samples at a time: time several of those buffers, not one.
    parser.add_argument("--batches", type=int, default=48, help="timed batches per setting")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--model-steps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    config, processor = build_processor(args.preset)

    pipeline = {}
    for workers in args.workers:
        loader = data_loader(processor, args.batch_size, workers, device)
        rate, first = delivered_pairs_per_s(loader, args.batches)
        pipeline[f"workers={workers}"] = {
            "pairs_per_s": round(rate, 1),
            "first_batch_s": round(first, 2),
        }
    batch = next(iter(data_loader(processor, args.batch_size, 0, device)))
    consumed = consumed_pairs_per_s(config, batch, args.model_steps, device, args.dtype)
    for row in pipeline.values():
        row["ratio_to_model"] = round(row["pairs_per_s"] / consumed, 2)
    report = {
        "device": device_name(device),
        "preset": args.preset,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "model_full_loupe_pairs_per_s": round(consumed, 1),
        "pipeline": pipeline,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
