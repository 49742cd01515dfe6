"""Helpers shared by the benchmark scripts (import as `benchmarks.common`; each script makes the
repository root importable when it is run as a file)."""

from __future__ import annotations

import platform

import torch


def device_name(device: str | torch.device) -> str:
    """The device a benchmark ran on, in words: the GPU's name, or the CPU and its threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def spearman_per_row(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> float:
    """Mean Spearman correlation over the rows of `[R, T]` values (valid entries only)."""
    scores = []
    for row_a, row_b, keep in zip(a, b, valid, strict=True):
        if keep.sum() < 3:
            continue
        ranks = [x[keep].argsort().argsort().double() for x in (row_a, row_b)]
        ranks = [r - r.mean() for r in ranks]
        denominator = (ranks[0].norm() * ranks[1].norm()).clamp_min(1e-12)
        scores.append(float((ranks[0] * ranks[1]).sum() / denominator))
    return sum(scores) / max(1, len(scores))


def frozen_token_game(model, batch: dict):
    """Forward pass of a pre-training model's encoders on `batch` (no autograd), its selected
    regions' hard masks `[B, K, N1]` and the batch's token-level game: `(outputs, masks, game)`."""
    with torch.no_grad():
        out = model.loupe(**batch)
        masks, game = model.token_level_game(
            out, batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
        )
    return out, masks, game


__all__ = ["frozen_token_game", "spearman_per_row"]
