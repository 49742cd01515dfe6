"""Zero-shot image classification: image-folder loader, prompt ensembles and top-k accuracy.

The CLIP protocol (METHOD §5) scores each image against one text embedding per class, the
average of the class's prompt embeddings. Embedding and averaging are model-specific and live
with the model; this module provides the prompts (:func:`prompt_ensemble`) and the metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from loupe_hf.evaluation._arrays import rank_of_target, to_numpy
from loupe_hf.evaluation.class_names import prompt_for

__all__ = [
    "CLIP_ENSEMBLE_TEMPLATES",
    "CLIP_TEMPLATE",
    "load_image_folder",
    "prompt_ensemble",
    "zero_shot_accuracy",
]

CLIP_TEMPLATE = "a photo of a {}."
"""CLIP's single default prompt."""

CLIP_ENSEMBLE_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
"""The 7 ImageNet prompts CLIP selected from its 80 (OpenAI CLIP repository, notebook
"Prompt_Engineering_for_ImageNet"); the full per-dataset template lists are in CLIP's
``data/prompts.md``. Spelling ("a origami") is CLIP's."""


def load_image_folder(
    data_dir: str | Path,
    split: str | None = None,
    cache_dir: str | Path | None = None,
    humanize: bool = True,
    decode: bool = True,
) -> tuple[datasets.Dataset, list[str]]:
    """An ``imagefolder`` dataset (``data_dir/<class name>/<image>``) and its class names.

    Uses the packaged ``imagefolder`` builder, so it works offline.

    Args:
        data_dir: Root folder; it may also hold split folders (``train/``, ``test/``, ...).
        split: Split to return; ``None`` requires exactly one split.
        cache_dir: Where ``datasets`` writes its Arrow cache.
        humanize: Turn folder names into prompt text (``golden_retriever`` →
            ``golden retriever``).
        decode: Decode the images on access (PIL images in ``image``); ``False`` gives
            ``{"path", "bytes"}`` instead, so that the caller can read each file itself and skip a
            truncated one by name (a decoding error inside ``datasets`` does not name the file).

    Returns:
        ``(dataset, class_names)``: rows have ``image`` (PIL) and ``label`` (int index into
        ``class_names``, the sorted folder names).
    """
    splits = datasets.load_dataset(
        "imagefolder",
        data_dir=str(data_dir),
        cache_dir=str(cache_dir) if cache_dir is not None else None,
    )
    if split is None:
        if len(splits) != 1:
            raise ValueError(f"{data_dir} has splits {sorted(splits)}; choose one with split=")
        split = next(iter(splits))
    dataset = splits[split]
    if "label" not in dataset.features:
        raise ValueError(
            f"{data_dir} has no class folders; expected {data_dir}/<class name>/<image>"
        )
    if not decode:
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
    names = list(dataset.features["label"].names)
    if humanize:
        names = [name.replace("_", " ") for name in names]
    return dataset, names


def prompt_ensemble(
    class_names: Sequence[str], templates: Sequence[str] = CLIP_ENSEMBLE_TEMPLATES
) -> list[list[str]]:
    """``[num_classes][num_templates]`` prompts: every template filled with every class name.

    Embed each inner list and average (then re-normalise) to get one classifier row per class.
    """
    return [[prompt_for(name, template) for template in templates] for name in class_names]


def zero_shot_accuracy(
    logits: Any, labels: Sequence[int] | Any, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracy of class scores, as fractions in ``[0, 1]``.

    Args:
        logits: ``[N, C]`` class scores (any monotone scale: logits, similarities,
            probabilities).
        labels: ``[N]`` true class indices in ``[0, C)``.
        ks: Cut-offs; ``k >= C`` always scores 1.

    Returns:
        ``{"top{k}": ...}`` per ``k`` and ``"mean_per_class_top1"``, the top-1 accuracy averaged
        over the classes present in ``labels`` (CLIP's metric for Pets, Flowers102, Caltech101
        and FGVC Aircraft). Tied scores rank the lower class index first.
    """
    scores = to_numpy(logits)
    targets = to_numpy(labels).astype(np.int64, copy=False)
    if scores.ndim != 2 or targets.shape != (scores.shape[0],) or targets.size == 0:
        raise ValueError(
            f"need logits [N, C] and labels [N] with N >= 1, got {scores.shape}, {targets.shape}"
        )
    if targets.min() < 0 or targets.max() >= scores.shape[1]:
        raise ValueError(f"labels must lie in [0, {scores.shape[1]})")
    if np.isnan(scores).any():
        raise ValueError("logits contain NaN")
    ranks = rank_of_target(scores, targets)
    result = {f"top{k}": float(np.mean(ranks < k)) for k in ks}
    correct = ranks == 0
    per_class = [correct[targets == c].mean() for c in np.unique(targets)]
    result["mean_per_class_top1"] = float(np.mean(per_class))
    return result
