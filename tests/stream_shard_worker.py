"""Run by `accelerate launch` (tests/test_distributed.py): each process builds a streamed training
set the way examples/pretrain.py does (the synthetic data with one shard per process and worker and
contrast groups of 2, webdataset shards, or a folder laid out like a Hub dataset), lets accelerate
prepare its DataLoader without dispatching, and writes the sample ids of each batch it reads (or
the error that makes pretrain.py refuse the source) to `<out>/<case>/rank<r>.json`.

Usage: `stream_shard_worker.py OUT CASES`, CASES a JSON list of objects with `case` (a folder
name), `source` (`ImageCaptionSource.name`), `workers` (DataLoader workers), `batches` (how many
to read; null: until the loader ends, one epoch) and optionally `num_samples`. Several cases run in
one launch, since starting two processes costs more than reading a few hundred samples."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration

from loupe_hf.data import SyntheticConfig
from loupe_hf.data.sources import (
    ImageCaptionSource,
    check_stream_shards,
    load_image_caption_dataset,
)


def sample_id(row: dict) -> int:
    """The synthetic data's image id; for files, the number the test data ends each caption with
    ("caption 17")."""
    if "image_id" in row:
        return int(row["image_id"])
    return int(row["caption"].rsplit(" ", 1)[-1])


def read(
    accelerator: Accelerator,
    source_name: str,
    workers: int,
    batches: int | None,
    num_samples: int | None = None,
) -> list[list[int]]:
    """The ids of each batch this process reads, at most `batches` of them."""
    source = ImageCaptionSource(
        name=source_name,
        streaming=True,
        num_samples=num_samples,
        synthetic=SyntheticConfig(image_size=32, contrast_group=2),
        num_shards=accelerator.num_processes * max(1, workers),
    )
    dataset = load_image_caption_dataset(source)
    dataset = dataset.select_columns(["image_id" if source_name == "synthetic" else "caption"])
    check_stream_shards(dataset, accelerator.num_processes)  # as examples/pretrain.py does
    loader = accelerator.prepare(
        torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=workers, collate_fn=list)
    )
    seen = []
    for index, batch in enumerate(loader):
        if index == batches:
            break
        seen.append([sample_id(row) for row in batch])
    return seen


def main(out: str, cases: list[dict]) -> None:
    accelerator = Accelerator(
        cpu=True, dataloader_config=DataLoaderConfiguration(dispatch_batches=False)
    )
    for case in cases:
        result = {"world": accelerator.num_processes}
        try:
            result["batches"] = read(
                accelerator,
                case["source"],
                case["workers"],
                case["batches"],
                case.get("num_samples"),
            )
        except ValueError as error:  # a source pretrain.py refuses
            result["error"] = str(error)
        folder = Path(out) / case["case"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{accelerator.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
