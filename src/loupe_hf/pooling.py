"""Masked pooling of token features: every pooling of the model, the token-level game and UNSIL."""

from __future__ import annotations

import bisect

import torch

# Elements of the gathered `[pairs, slots, D]` intermediate per step of `masked_max` (about 4 MB of
# float32, which stays in cache; docs/design_choices.md has the measurements behind both limits).
MAX_POOL_CHUNK = 1 << 20
# Up to this many elements of `[B, R, N, D]`, the no-autograd `masked_max` is one dense max: cheaper
# for inference-sized inputs, while the token game's coalitions gain from reading kept tokens only.
ONE_SHOT_MAX = 1 << 22


def masked_mean(tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of token features.

    Args:
        tokens: `[*lead, N, D]` token features.
        weights: `[*lead, *extra, N]` non-negative weights (bool masks allowed); the `extra` dims index
            several poolings of the same tokens (coalitions, regions, phrases).

    Returns:
        `[*lead, *extra, D]`; an all-zero weight row gives a zero vector (an empty coalition has no signal).
    """
    lead = tokens.dim() - 2
    extra = weights.dim() - 1 - lead
    if (
        extra < 0
        or weights.shape[:lead] != tokens.shape[:lead]
        or weights.shape[-1] != tokens.shape[-2]
    ):
        raise ValueError(
            f"weights of shape {tuple(weights.shape)} do not index the tokens of shape {tuple(tokens.shape)}"
        )
    weights = weights.to(tokens.dtype)
    # Fold the extra dims into one matrix dim: a batched matmul with matching batch dims, so the
    # tokens are never expanded (broadcast batch dims would copy them once per pooling).
    flat = weights.reshape(*weights.shape[:lead], -1, weights.shape[-1])
    summed = (flat @ tokens).reshape(*weights.shape[:-1], tokens.shape[-1])
    return summed / weights.sum(-1, keepdim=True).clamp_min(1e-6)


def masked_max(
    tokens: torch.Tensor,
    weights: torch.Tensor,
    chunk: int = MAX_POOL_CHUNK,
    token_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Element-wise max of the kept token features (any positive weight counts as kept).

    Args:
        tokens: `[B, N, D]`.
        weights: `[B, *extra, N]` weights or bool mask; the `extra` dims index several poolings.
        chunk: rough cap on the elements of the gathered `[pairs, slots, D]` intermediate per step
            (see `_reduce_kept`).
        token_rows: optional long `[B']`: `weights` is then `[B', *extra, N]` and its row i pools
            `tokens[token_rows[i]]`, without copying those rows (many games over one image).

    Returns:
        `[B, *extra, D]`; an empty row gives a zero vector, as `masked_mean` does. With autograd,
        the gradient of each output element flows to the one token it came from (the first one
        on a tie).
    """
    keep = weights if weights.dtype == torch.bool else weights > 0
    num_images, num_tokens, width = tokens.shape
    batch = num_images if token_rows is None else token_rows.shape[0]
    if keep.dim() < 2 or keep.shape[0] != batch or keep.shape[-1] != num_tokens:
        raise ValueError(
            f"weights of shape {tuple(weights.shape)} do not index the tokens of shape "
            f"{tuple(tokens.shape)}" + ("" if token_rows is None else f" by {batch} token rows")
        )
    flat = keep.reshape(batch, -1, num_tokens)
    with_autograd = torch.is_grad_enabled() and tokens.requires_grad
    one_shot = not with_autograd and flat.numel() * width <= ONE_SHOT_MAX
    if token_rows is not None and (with_autograd or one_shot):
        # These paths take one token row per row (index_select: advanced indexing is far slower).
        tokens, token_rows = tokens.index_select(0, token_rows), None
    if with_autograd:
        with torch.no_grad():
            index = _reduce_kept(tokens.detach(), flat, token_rows, chunk, argmax=True)
        # values[b, r, d] = tokens[b, index[b, r, d], d]; its backward is one scatter into
        # [B, N, D], where autograd through the dense max would run over the whole intermediate.
        values = tokens.gather(1, index)
        pooled = torch.where(flat.any(-1, keepdim=True), values, 0.0)
    elif one_shot:
        masked = torch.where(flat[..., None], tokens[:, None], float("-inf")).amax(-2)
        pooled = torch.where(flat.any(-1, keepdim=True), masked, 0.0)
    else:
        pooled = _reduce_kept(tokens, flat, token_rows, chunk, argmax=False)
    return pooled.reshape(*keep.shape[:-1], width)


def _reduce_kept(
    tokens: torch.Tensor,
    keep: torch.Tensor,
    token_rows: torch.Tensor | None,
    chunk: int,
    argmax: bool,
) -> torch.Tensor:
    """Max over the kept tokens (0 for empty rows), or the index of the first maximal one (0 for
    empty rows): `[B_img, N, D]`, bool `[B, R, N]`, long `[B]` or None (the token row of each
    keep row; None: row b is b) → `[B, R, D]`.

    Only kept tokens are read: each (image, row) pair gathers the rows of its kept tokens and takes
    their max. Pairs run in order of their kept count, so that a step pads its pairs only to the
    largest count among them, and never reads the dropped half of a typical coalition.
    """
    batch, num_rows, num_tokens = keep.shape
    width = tokens.shape[-1]
    flat = keep.reshape(batch * num_rows, num_tokens)
    count = flat.sum(-1)
    out = torch.zeros(
        batch * num_rows, width, dtype=torch.long if argmax else tokens.dtype, device=tokens.device
    )
    # Every pair's kept tokens, pair after pair, in index order: slot j of pair p holds
    # kept[first_kept[p] + j] (cheaper than a per-row sort putting kept tokens first).
    kept = flat.nonzero()[:, 1]
    first_kept = count.cumsum(0) - count
    by_count = torch.argsort(count, stable=True)
    counts = count[by_count].tolist()
    if token_rows is None:
        token_rows = torch.arange(batch, device=tokens.device)
    first_row = token_rows.repeat_interleave(num_rows) * num_tokens
    table = tokens.reshape(-1, width)
    budget = max(1, chunk // width)  # gathered token rows per step
    start, total = bisect.bisect_right(counts, 0), len(counts)  # pairs keeping nothing stay 0
    while start < total:
        end = min(total, start + max(1, budget // counts[start]))
        if (end - start) * counts[end - 1] > budget:
            end = start + max(1, budget // counts[end - 1])
        pairs, slots = by_count[start:end], counts[end - 1]
        # Pad with the pair's first kept token: a repeat changes neither the max nor, on a tie,
        # which slot comes first.
        slot = torch.arange(slots, device=tokens.device)
        slot = torch.where(slot < count[pairs, None], slot, 0)
        index = kept[first_kept[pairs, None] + slot]
        rows = (first_row[pairs, None] + index).reshape(-1)
        gathered = table.index_select(0, rows).view(-1, slots, width)
        pooled = index.gather(1, gathered.max(1).indices) if argmax else gathered.amax(1)
        out.index_copy_(0, pairs, pooled)
        start = end
    return out.view(batch, num_rows, width)


__all__ = ["MAX_POOL_CHUNK", "masked_max", "masked_mean"]
