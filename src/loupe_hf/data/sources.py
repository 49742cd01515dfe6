"""Image–caption data for pre-training: the built-in synthetic set, a Hub dataset, local CSV / JSON
lines files with an image folder, or webdataset shards — all as `datasets` objects with an image
column and a caption column.

Images are kept *undecoded* (`datasets.Image(decode=False)`, or plain paths) so that a corrupt file
is found by the collator, which skips and counts it, instead of crashing the data iterator.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import datasets

from .synthetic import SyntheticConfig, build_dataset, build_iterable_dataset

TABULAR_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json"}
WEBDATASET_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "image")
WEBDATASET_CAPTION_KEYS = ("txt", "caption", "text")

Dataset = datasets.Dataset | datasets.IterableDataset


@dataclass
class ImageCaptionSource:
    """Where pre-training pairs come from.

    Args:
        name: `"synthetic"`; a `.csv`/`.json`/`.jsonl` file (image paths relative to `image_dir`, by
            default the file's folder); a `.tar` shard, a folder of shards or a glob (webdataset); a
            Hub dataset id, or a local folder laid out like one (e.g. parquet files).
        split: split to load (Hub datasets).
        image_column / caption_column: column names in the source (renamed to `image` / `caption`).
        image_dir: base folder of relative image paths (CSV / JSON lines).
        streaming: iterate without materialising (Hub, files); the synthetic set is generated lazily.
        num_samples: how many pairs to use (required for materialised synthetic data).
        synthetic: generator settings for `"synthetic"`.
        num_shards: shards of the streamed synthetic set, one per consumer (processes × DataLoader
            workers), so that no two consumers generate the same sample. Streamed files have one
            shard per file (webdataset `.tar`, parquet, ...) whatever this says: accelerate deals
            them out to processes, `datasets` to each process's DataLoader workers (see
            `check_stream_shards`).
    """

    name: str = "synthetic"
    split: str = "train"
    image_column: str = "image"
    caption_column: str = "caption"
    image_dir: str | None = None
    streaming: bool = False
    num_samples: int | None = None
    synthetic: SyntheticConfig | None = None
    num_shards: int = 1


def load_image_caption_dataset(source: ImageCaptionSource) -> Dataset:
    """Loads `source` as a dataset with columns `image` (undecoded) and `caption`."""
    name = source.name
    if name == "synthetic":
        return _synthetic(source)
    extension = os.path.splitext(name)[1].lower()
    if extension in TABULAR_FORMATS:
        return _tabular(source, TABULAR_FORMATS[extension])
    shards = _webdataset_shards(name)
    if shards:
        return _webdataset(source, shards)
    if os.path.isfile(name):
        raise ValueError(f"{name!r} is neither a CSV / JSON lines file nor a webdataset .tar shard")
    # A Hub dataset id, or a local folder laid out like a Hub dataset repository (e.g. parquet files).
    dataset = datasets.load_dataset(name, split=source.split, streaming=source.streaming)
    return _standardise(dataset, source.image_column, source.caption_column, source.num_samples)


def check_stream_shards(dataset: Dataset, num_processes: int) -> None:
    """Raises a `ValueError` when `dataset` is a stream with fewer shards than `num_processes`.

    Accelerate (batches not dispatched) gives each process whole shards of a stream that has at
    least one per process, and `datasets` gives each DataLoader worker whole shards of those (a
    worker left without one stops): every sample of a pass is read once. A stream with fewer
    shards, e.g. one parquet file on two processes, is instead read whole by every process, each
    keeping its share of every `batch_size × num_processes` samples; the last, incomplete share of
    a pass is completed with samples from the start of the pass, which are read a second time
    (`dataloader_drop_last` would avoid that, but the Trainer does not pass it to a stream's
    DataLoader).
    """
    if not isinstance(dataset, datasets.IterableDataset) or dataset.n_shards >= num_processes:
        return
    raise ValueError(
        f"the streamed dataset has {dataset.n_shards} shard(s) (files) for {num_processes} "
        "processes: every process would read all of it and read samples twice at the end of each "
        f"pass; give it at least {num_processes} files (webdataset shards, parquet files, ...) or "
        "load it without streaming"
    )


def _synthetic(source: ImageCaptionSource) -> Dataset:
    config = source.synthetic or SyntheticConfig()
    if source.streaming:
        dataset = build_iterable_dataset(
            source.split, config, stop=source.num_samples, num_shards=source.num_shards
        )
    else:
        if source.num_samples is None:
            raise ValueError("materialised synthetic data needs num_samples (or use streaming)")
        dataset = build_dataset(source.split, source.num_samples, config)
    return _undecoded(dataset, "image")


def _tabular(source: ImageCaptionSource, builder: str) -> Dataset:
    path = source.name
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file {path!r}")
    image_dir = source.image_dir or os.path.dirname(os.path.abspath(path))
    dataset = datasets.load_dataset(
        builder, data_files=path, split="train", streaming=source.streaming
    )
    for column in (source.image_column, source.caption_column):
        if column not in (dataset.column_names or []):
            raise ValueError(f"{path!r} has no column {column!r}; columns: {dataset.column_names}")

    def resolve(batch: dict) -> dict:
        batch[source.image_column] = [
            value if os.path.isabs(str(value)) else os.path.join(image_dir, str(value))
            for value in batch[source.image_column]
        ]
        return batch

    dataset = dataset.map(resolve, batched=True)
    return _standardise(dataset, source.image_column, source.caption_column, source.num_samples)


def _webdataset_shards(name: str) -> list[str]:
    if os.path.isdir(name):
        return sorted(glob.glob(os.path.join(name, "*.tar")))
    if name.endswith(".tar") or any(char in name for char in "*?["):
        return sorted(path for path in glob.glob(name) if path.endswith(".tar"))
    return []


def _webdataset(source: ImageCaptionSource, shards: list[str]) -> Dataset:
    dataset = datasets.load_dataset(
        "webdataset", data_files={"train": shards}, split="train", streaming=source.streaming
    )
    columns = dataset.column_names or list(dataset.features or [])
    image_column = next(
        (key for key in WEBDATASET_IMAGE_KEYS if key in columns), source.image_column
    )
    caption_column = next(
        (key for key in WEBDATASET_CAPTION_KEYS if key in columns), source.caption_column
    )
    return _standardise(dataset, image_column, caption_column, source.num_samples)


def _standardise(
    dataset: Dataset, image_column: str, caption_column: str, num_samples: int | None
) -> Dataset:
    columns = dataset.column_names or list(dataset.features or [])
    for column in (image_column, caption_column):
        if columns and column not in columns:
            raise ValueError(f"the dataset has no column {column!r}; columns: {columns}")
    if image_column != "image":
        dataset = dataset.rename_column(image_column, "image")
    if caption_column != "caption":
        dataset = dataset.rename_column(caption_column, "caption")
    if num_samples is not None:
        dataset = (
            dataset.take(num_samples)
            if isinstance(dataset, datasets.IterableDataset)
            else dataset.select(range(min(num_samples, len(dataset))))
        )
    return _undecoded(dataset, "image")


def _undecoded(dataset: Dataset, column: str) -> Dataset:
    features = dataset.features
    if features is not None and isinstance(features.get(column), datasets.Image):
        return dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


__all__ = ["ImageCaptionSource", "check_stream_shards", "load_image_caption_dataset"]
