"""Pre-training data from local files, webdataset shards and dataset folders, with corrupt samples."""

from __future__ import annotations

import io
import json
import tarfile

import datasets
import PIL.Image
import pytest

from loupe_hf.data.sources import ImageCaptionSource, load_image_caption_dataset
from loupe_hf.pretraining import LoupeDataCollator

CAPTIONS = ["a red star", "a blue circle", "a green square", "a yellow heart"]


def _png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (16, 12), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(3):
        (folder / f"{index}.png").write_bytes(_png((index * 80, 0, 0)))
    (folder / "3.png").write_bytes(b"\x89PNG truncated garbage")  # a corrupt file
    return folder


def _rows(column_image="file", column_caption="text"):
    return [{column_image: f"{index}.png", column_caption: CAPTIONS[index]} for index in range(4)]


def test_csv_with_an_image_folder(tmp_path, image_folder, processor):
    path = tmp_path / "pairs.csv"
    path.write_text("file,text\n" + "".join(f"{r['file']},{r['text']}\n" for r in _rows()))
    source = ImageCaptionSource(
        name=str(path), image_column="file", caption_column="text", image_dir=str(image_folder)
    )
    dataset = load_image_caption_dataset(source)
    assert set(dataset.column_names) == {"image", "caption"} and len(dataset) == 4
    collator = LoupeDataCollator(processor)
    batch = collator([dataset[index] for index in range(4)])
    assert batch["pixel_values"].shape[0] == 3 and collator.skipped == 1  # the corrupt file


def test_json_lines_resolve_images_next_to_the_file(tmp_path, image_folder):
    path = image_folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in _rows("image", "caption")))
    dataset = load_image_caption_dataset(ImageCaptionSource(name=str(path), num_samples=2))
    assert len(dataset) == 2 and dataset[0]["image"] == str(image_folder / "0.png")


def test_missing_columns_are_named(tmp_path, image_folder):
    path = tmp_path / "pairs.csv"
    path.write_text("file,text\n0.png,a red star\n")
    with pytest.raises(ValueError, match="no column 'image'"):
        load_image_caption_dataset(ImageCaptionSource(name=str(path)))


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_image_caption_dataset(ImageCaptionSource(name=str(tmp_path / "absent.csv")))


def test_webdataset_shards(tmp_path, processor):
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as archive:
        for index, caption in enumerate(CAPTIONS[:3]):
            for suffix, payload in ((".png", _png((0, index * 80, 0))), (".txt", caption.encode())):
                info = tarfile.TarInfo(f"sample{index:04d}{suffix}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    for streaming in (False, True):
        dataset = load_image_caption_dataset(
            ImageCaptionSource(name=str(tmp_path / "*.tar"), streaming=streaming)
        )
        rows = list(dataset)
        assert [row["caption"] for row in rows] == CAPTIONS[:3]
        batch = LoupeDataCollator(processor)(rows)
        assert batch["pixel_values"].shape[0] == 3


def test_a_folder_laid_out_like_a_hub_dataset(tmp_path, processor):
    rows = {"picture": [{"bytes": _png((0, 0, 200)), "path": None}] * 2, "sentence": CAPTIONS[:2]}
    features = datasets.Features(
        {"picture": datasets.Image(), "sentence": datasets.Value("string")}
    )
    (tmp_path / "repo" / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(
        tmp_path / "repo" / "data" / "train-0.parquet"
    )
    source = ImageCaptionSource(
        name=str(tmp_path / "repo"), image_column="picture", caption_column="sentence"
    )
    dataset = load_image_caption_dataset(source)
    assert (
        dataset.features["image"].decode is False
    )  # decoded by the collator, which skips corrupt ones
    assert LoupeDataCollator(processor)([dataset[0], dataset[1]])["pixel_values"].shape[0] == 2


def test_synthetic_source_needs_a_size_unless_streaming():
    with pytest.raises(ValueError, match="num_samples"):
        load_image_caption_dataset(ImageCaptionSource(name="synthetic"))
    stream = load_image_caption_dataset(
        ImageCaptionSource(name="synthetic", streaming=True, num_samples=3)
    )
    assert len(list(stream)) == 3
