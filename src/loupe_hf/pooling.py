"""Masked pooling of token features shared by the model and the token-level game."""

from __future__ import annotations

import torch

# Elements of the `[B, rows, D, N]` intermediate per step of `masked_max`: about 4 MB of float32,
# which stays in cache; on the token game's coalitions, 16 MB steps were about 1.1x and 64 MB
# steps about 4x slower on this CPU.
MAX_POOL_CHUNK = 1 << 20
# Up to this many elements, the no-autograd `masked_max` is one dense max over `[B, R, N, D]`.
ONE_SHOT_MAX = 1 << 22


def masked_max(
    tokens: torch.Tensor, weights: torch.Tensor, chunk: int = MAX_POOL_CHUNK
) -> torch.Tensor:
    """Element-wise max of the kept token features (any positive weight counts as kept).

    Args:
        tokens: `[B, N, D]`.
        weights: `[B, *extra, N]` weights or bool mask; the `extra` dims index several poolings.
        chunk: rough cap on the elements of the `[B, rows, D, N]` intermediate per step.

    Returns:
        `[B, *extra, D]`; an empty row gives a zero vector, as `masked_mean` does. With autograd,
        the gradient of each output element flows to the one token it came from (the first one
        on a tie).
    """
    keep = weights if weights.dtype == torch.bool else weights > 0
    batch, num_tokens, width = tokens.shape
    if keep.dim() < 2 or keep.shape[0] != batch or keep.shape[-1] != num_tokens:
        raise ValueError(
            f"weights of shape {tuple(weights.shape)} do not index the tokens of shape {tuple(tokens.shape)}"
        )
    flat = keep.reshape(batch, -1, num_tokens)
    if torch.is_grad_enabled() and tokens.requires_grad:
        with torch.no_grad():
            index = _reduce_kept(tokens.detach(), flat, chunk, argmax=True)
        # values[b, r, d] = tokens[b, index[b, r, d], d]; its backward is one scatter into
        # [B, N, D]. Autograd through the dense max instead ran over the whole intermediate
        # (about 30 ms of a 64-image tiny training step, for the region embeddings).
        values = tokens.gather(1, index)
        pooled = torch.where(flat.any(-1, keepdim=True), values, 0.0)
    elif flat.shape[1] * num_tokens * width * batch <= ONE_SHOT_MAX:
        # Small inputs (one image's regions at inference, a batch's 16 regions): one dense max
        # over the `[B, R, N, D]` layout. Switching these to `_reduce_kept` slowed the tiny
        # model's inference forward from about 40 to 45-60 ms at batch 32 on this CPU.
        masked = torch.where(flat[..., None], tokens[:, None], float("-inf")).amax(-2)
        pooled = torch.where(flat.any(-1, keepdim=True), masked, 0.0)
    else:
        pooled = _reduce_kept(tokens, flat, chunk, argmax=False)
    return pooled.reshape(*keep.shape[:-1], width)


def _reduce_kept(
    tokens: torch.Tensor, keep: torch.Tensor, chunk: int, argmax: bool
) -> torch.Tensor:
    """Max over the kept tokens (0 for empty rows), or the index of the first maximal one (0 for
    empty rows): `[B, N, D]`, bool `[B, R, N]` → `[B, R, D]`.

    The tokens axis is made the innermost one of the intermediate (`[B, r, D, N]`): reducing over a
    contiguous axis was about 3x faster on this CPU than over the `N` axis of `[B, r, N, D]`, and
    than a running max over the tokens.
    """
    batch, num_tokens, width = tokens.shape
    columns = tokens.transpose(1, 2)[:, None]  # [B, 1, D, N]
    dtype = torch.long if argmax else tokens.dtype
    out = torch.zeros(batch, keep.shape[1], width, dtype=dtype, device=tokens.device)
    pairs = max(1, chunk // max(1, num_tokens * width))  # (image, row) pairs per step
    rows = min(keep.shape[1], pairs)
    images = max(1, pairs // max(1, rows))
    for first in range(0, batch, images):
        block = slice(first, first + images)
        for start in range(0, keep.shape[1], rows):
            part = keep[block, start : start + rows, None, :]  # [b, r, 1, N]
            masked = torch.where(part, columns[block], float("-inf"))
            if argmax:
                out[block, start : start + rows] = masked.max(-1).indices
            else:
                out[block, start : start + rows] = torch.where(part.any(-1), masked.amax(-1), 0.0)
    return out


__all__ = ["MAX_POOL_CHUNK", "masked_max"]
