"""Run by `accelerate launch` (tests/test_distributed.py): each process builds the streamed synthetic
training set the way examples/pretrain.py does (one shard per process and worker, contrast groups
of 2), lets accelerate prepare its DataLoader without dispatching, and writes the image ids of each
batch it reads to `<out>/rank<r>.json`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration

from loupe_hf.data import SyntheticConfig
from loupe_hf.data.sources import ImageCaptionSource, load_image_caption_dataset


def main(out: str, source_name: str, workers: int, batches: int) -> None:
    accelerator = Accelerator(
        cpu=True, dataloader_config=DataLoaderConfiguration(dispatch_batches=False)
    )
    source = ImageCaptionSource(
        name=source_name,
        streaming=True,
        num_samples=None,
        synthetic=SyntheticConfig(image_size=32, contrast_group=2),
        num_shards=accelerator.num_processes * max(1, workers),
    )
    dataset = load_image_caption_dataset(source).select_columns(["image_id"])
    loader = accelerator.prepare(
        torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=workers, collate_fn=list)
    )
    seen = []
    for index, batch in enumerate(loader):
        if index == batches:
            break
        seen.append([int(row["image_id"]) for row in batch])
    path = Path(out) / f"rank{accelerator.process_index}.json"
    path.write_text(json.dumps({"batches": seen, "world": accelerator.num_processes}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
