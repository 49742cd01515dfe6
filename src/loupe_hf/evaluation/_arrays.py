"""Helpers shared by the metrics: array conversion (lists, NumPy, torch), tie-safe ranks, and
reading the JSON annotation files with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def to_numpy(values: Any, dtype: Any = None) -> np.ndarray:
    """``values`` as a NumPy array; torch tensors are detached and moved to the CPU first."""
    if hasattr(values, "detach"):  # torch.Tensor, without importing torch here
        tensor = values.detach().cpu()
        try:
            values = tensor.numpy()
        except TypeError:  # bfloat16 and other dtypes NumPy lacks
            values = tensor.float().numpy()
    return np.asarray(values, dtype=dtype)


def rank_of_target(scores: np.ndarray, target: np.ndarray, chunk_size: int = 1024) -> np.ndarray:
    """0-based rank of column ``target[i]`` in each row ``scores[i]`` (descending scores).

    Args:
        scores: ``[N, C]`` scores.
        target: ``[N]`` column index per row.
        chunk_size: Rows per step; bounds the temporaries at ``chunk_size × C``.

    Ties go to the lower index: the rank counts strictly higher scores plus equal scores at
    lower indices, which is the position in a stable descending sort.
    """
    ranks = np.empty(scores.shape[0], dtype=np.int64)
    columns = np.arange(scores.shape[1])[None, :]
    for start in range(0, scores.shape[0], chunk_size):
        block = scores[start : start + chunk_size]
        block_target = target[start : start + chunk_size]
        target_score = block[np.arange(len(block)), block_target][:, None]
        higher = block > target_score
        tied_before = (block == target_score) & (columns < block_target[:, None])
        ranks[start : start + len(block)] = (higher | tied_before).sum(axis=1)
    return ranks


def read_json_file(path: str | Path) -> Any:
    """The JSON document in `path`; a `ValueError` naming the file (and where it breaks) when it is
    not JSON, rather than a bare "Expecting value: line 1 column 1"."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a valid JSON file: {error}") from error
