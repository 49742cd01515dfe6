"""Array conversion shared by the metrics: they accept lists, NumPy arrays and torch tensors."""

from __future__ import annotations

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
