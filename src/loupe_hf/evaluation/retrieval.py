"""Zero-shot image-text retrieval: Karpathy-split loader and recall@K in both directions.

The Karpathy split files (``dataset_coco.json``, ``dataset_flickr30k.json``) look like::

    {"images": [{"filename": "COCO_val2014_000000391895.jpg", "filepath": "val2014",
                 "split": "test", "sentences": [{"raw": "A man ...", ...}, ...], ...}, ...]}

(``filepath`` exists only for COCO.) LOUPE evaluates on Flickr30K 1K test and MSCOCO 5K test,
retrieving with the global embeddings (METHOD §5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from loupe_hf.evaluation._arrays import rank_of_target, read_json_file, to_numpy

__all__ = ["RetrievalSplit", "load_karpathy_split", "recall_at_k", "retrieval_ranks"]


@dataclass(frozen=True)
class RetrievalSplit:
    """Images and captions of one split.

    Attributes:
        image_paths: ``[num_images]`` image file paths.
        captions: ``[num_texts]`` raw captions, grouped by image in file order.
        text_to_image: ``[num_texts]`` index into ``image_paths`` of each caption's image.
    """

    image_paths: list[str]
    captions: list[str]
    text_to_image: list[int]

    def image_to_texts(self) -> list[list[int]]:
        """``[num_images]`` lists of the caption indices of each image."""
        groups: list[list[int]] = [[] for _ in self.image_paths]
        for text, image in enumerate(self.text_to_image):
            groups[image].append(text)
        return groups


def load_karpathy_split(
    annotation_file: str | Path,
    image_root: str | Path,
    split: str = "test",
    max_captions_per_image: int | None = 5,
    progress: bool = True,
) -> RetrievalSplit:
    """Load one split of a Karpathy-format JSON file.

    Args:
        annotation_file: ``dataset_coco.json`` / ``dataset_flickr30k.json``.
        image_root: Directory the image paths are relative to; an image's path is
            ``image_root / filepath / filename`` (``filepath`` omitted when absent).
        split: ``"test"``, ``"val"``, ``"train"`` (COCO also has ``"restval"``).
        max_captions_per_image: Keep the first this many captions of each image. The standard
            5K/1K protocols use 5 (a few COCO images have 6 or 7); ``None`` keeps all.
        progress: Show a progress bar over the images.

    Returns:
        The split's images in file order and their captions (``raw`` text, stripped; any
        further normalisation is the model's processor's job).
    """
    data = read_json_file(annotation_file)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not all(isinstance(entry, dict) and "split" in entry for entry in data["images"])
    ):
        raise ValueError(
            f"{annotation_file} is not a Karpathy split file: expected a JSON object whose "
            '"images" each have a "split", "filename" and "sentences"'
        )
    root = Path(image_root)
    entries = [entry for entry in data["images"] if entry["split"] == split]
    if not entries:
        available = sorted({str(entry["split"]) for entry in data["images"]})
        raise ValueError(f"no images in split {split!r} of {annotation_file}; have {available}")
    image_paths: list[str] = []
    captions: list[str] = []
    text_to_image: list[int] = []
    for entry in tqdm(entries, desc=f"karpathy {split}", disable=not progress):
        sentences = entry["sentences"][:max_captions_per_image]
        if not sentences:
            raise ValueError(f"image {entry['filename']} has no captions")
        image_index = len(image_paths)
        image_paths.append(str(root / entry.get("filepath", "") / entry["filename"]))
        captions.extend(sentence["raw"].strip() for sentence in sentences)
        text_to_image.extend([image_index] * len(sentences))
    return RetrievalSplit(image_paths, captions, text_to_image)


def _check_inputs(similarity: Any, text_to_image: Any) -> tuple[np.ndarray, np.ndarray]:
    scores = to_numpy(similarity)
    targets = to_numpy(text_to_image).astype(np.int64, copy=False)
    if scores.ndim != 2:
        raise ValueError(f"similarity must be [num_images, num_texts], got shape {scores.shape}")
    num_images, num_texts = scores.shape
    if targets.shape != (num_texts,):
        raise ValueError(f"text_to_image must have shape ({num_texts},), got {targets.shape}")
    if np.isnan(scores).any():
        raise ValueError("similarity contains NaN")
    if targets.size and (targets.min() < 0 or targets.max() >= num_images):
        raise ValueError(f"text_to_image values must lie in [0, {num_images})")
    if np.bincount(targets, minlength=num_images).min(initial=1) == 0:
        raise ValueError("every image needs at least one caption in text_to_image")
    return scores, targets


def retrieval_ranks(
    similarity: Any, text_to_image: Sequence[int] | Any, chunk_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """0-based rank of the best correct item for every query, in both directions.

    Args:
        similarity: ``[num_images, num_texts]`` scores (higher = more similar); NumPy, torch or
            nested lists.
        text_to_image: ``[num_texts]`` index of the image each text describes.
        chunk_size: Queries per step; bounds memory at ``chunk_size × num_candidates``.

    Returns:
        ``(image_to_text, text_to_image)`` ranks of shapes ``[num_images]`` and ``[num_texts]``.
        An image query's rank is that of its highest-ranked caption (any caption counts as a
        hit, as in the CLIP/ALBEF evaluation). Tied scores are ordered by candidate index
        (lower first) — deterministic, unlike ``argsort`` of reversed scores.
    """
    scores, targets = _check_inputs(similarity, text_to_image)
    best_caption = np.empty(scores.shape[0], dtype=np.int64)
    for start in range(0, scores.shape[0], chunk_size):
        block = scores[start : start + chunk_size]  # [b, num_texts]
        is_caption = targets[None, :] == np.arange(start, start + len(block))[:, None]
        # An image's best-ranked caption: its highest score, the lowest index among ties.
        best = np.where(is_caption, block, -np.inf).max(axis=1, keepdims=True)
        best_caption[start : start + len(block)] = np.argmax(is_caption & (block == best), axis=1)
    i2t = rank_of_target(scores, best_caption, chunk_size)
    t2i = rank_of_target(scores.T, targets, chunk_size)
    return i2t, t2i


def recall_at_k(
    similarity: Any,
    text_to_image: Sequence[int] | Any,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 256,
) -> dict[str, float]:
    """Image→text and text→image recall@K, as fractions in ``[0, 1]`` (the paper: percent).

    Args:
        similarity: ``[num_images, num_texts]`` scores, e.g. image × caption cosine similarity.
        text_to_image: ``[num_texts]`` image index of each caption.
        ks: Cut-offs K.
        chunk_size: See :func:`retrieval_ranks`.

    Returns:
        ``{"i2t_R@K": ..., "t2i_R@K": ..., "mean_recall": ...}``: an image query is correct at K
        if any of its captions is among its top K texts; a text query if its image is among
        its top K images. ``mean_recall`` averages all the R@K values (ALBEF's ``r_mean``).
        Ties: see :func:`retrieval_ranks`.
    """
    i2t, t2i = retrieval_ranks(similarity, text_to_image, chunk_size)
    result: dict[str, float] = {}
    for direction, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            result[f"{direction}_R@{k}"] = float(np.mean(ranks < k))
    result["mean_recall"] = float(np.mean(list(result.values())))
    return result
