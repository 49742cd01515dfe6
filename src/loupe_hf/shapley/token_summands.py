"""Fast summands of eq. 7 for the token-level game in feature mode (the optional fast path of the
game protocol, `interaction_summands` of `MeanPooledTokenGame` and `MaxPooledTokenGame`).

Every coalition of a summand is S plus some members of the target A, so the |A| + 2 values of one
summand share S's work: with mean image pooling through the Gram-matrix forms of S, with max image
pooling through one max over S. Each kernel returns exactly the summand built from game values.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch
import torch.nn.functional as F

from ..pooling import masked_max


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) * torch.rsqrt((a.square().sum(-1) * b.square().sum(-1)).clamp_min(1e-30))


def max_pooled_summands(game: Any, coalitions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`MaxPooledTokenGame.interaction_summands`. Every coalition of a summand is S plus
    members of A, so one max over S serves them all: max(max_S, z_a) for a patch a, max(max_S, max_A)
    for S | A; the text side is linear in the kept words. The |A| one-player additions are evaluated
    for all members at once (`_sum_of_one_more`)."""
    num_patches, rows = game.num_patches, game.image_rows
    z, u = game.patch_projections, game.word_projections_per_game()
    batch = game.players.shape[0]
    num_samples, num_targets, n = coalitions.shape[-3:]
    words = game.players[:, None, None, num_patches:]  # [B, 1, 1, L]
    coalitions = coalitions.expand(batch, num_samples, num_targets, n)
    members = targets.expand(batch, num_targets, n).unsqueeze(1)  # [B, 1, T, n]
    x, y = coalitions[..., :num_patches], coalitions[..., num_patches:] & words
    x_a, y_a = members[..., :num_patches], members[..., num_patches:] & words
    has_image, has_text, a_image = x.any(-1), y.any(-1), x_a.any(-1)
    # -inf where a side has no patch, so that max(max_S, z) is z when S has none.
    image_s = _max_or_minus_inf(z, x, has_image, rows)  # [B, N, T, P]
    text_s = rows_times(y.to(u.dtype), u)

    def value(image, image_present, text, text_present):
        present = image_present & text_present
        return torch.where(present, cosine(image.masked_fill(~present[..., None], 0.0), text), 0.0)

    value_s = value(image_s, has_image, text_s, has_text)
    value_a = value(
        torch.maximum(image_s, _max_or_minus_inf(z, x_a, a_image, rows)),
        has_image | a_image,
        text_s + rows_times(y_a.to(u.dtype), u),
        has_text | y_a.any(-1),
    )
    # v(S | {patch a}) = cos(max(max_S, z_a), t_S); v(S | {word w}) = cos(max_S, t_S + u_w).
    patch_singles = _sum_of_one_more(
        image_s, F.normalize(text_s, dim=-1), z, x_a, torch.maximum, token_rows=rows
    )
    singles = torch.where(has_text, patch_singles, 0.0)
    if y_a.any():  # region targets (TSA) have no words: skip the text-side additions entirely
        image_unit = F.normalize(image_s.masked_fill(~has_image[..., None], 0.0), dim=-1)
        word_singles = _sum_of_one_more(text_s, image_unit, u, y_a, torch.add)
        singles = singles + torch.where(has_image, word_singles, 0.0)
    # Padding words of A are null players (v(S | {a}) = v(S)): only real members count.
    real_members = (x_a.sum(-1) + y_a.sum(-1)).to(value_s.dtype)  # [B, 1, T]
    return value_a - singles + (real_members - 1) * value_s


def _max_or_minus_inf(
    tokens: torch.Tensor,
    keep: torch.Tensor,
    any_kept: torch.Tensor,
    token_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """`masked_max` with -inf (not 0) for the rows that keep nothing."""
    pooled = masked_max(tokens, keep, token_rows=token_rows)
    return pooled.masked_fill(~any_kept[..., None], float("-inf"))


def _sum_of_one_more(
    base: torch.Tensor,
    fixed_unit: torch.Tensor,
    tokens: torch.Tensor,
    members: torch.Tensor,
    combine: Any,
    chunk: int = 1 << 20,
    token_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ over the members a of A of cos(combine(base, token_a), fixed) for every (sample, target).

    Args:
        base: `[B, N, T, P]`, the varying side of S (max of its patches, or sum of its words).
        fixed_unit: `[B, N, T, P]`, the unit vector of the other side of S.
        tokens: `[B, m, P]` (or `[B_img, m, P]` with `token_rows`), the rows the members index.
        members: bool `[B, 1, T, m]`, A's members among those rows.
        combine: `torch.maximum` (a patch joins the max) or `torch.add` (a word joins the sum).
        chunk: elements of the `[b, N, T, slots, P]` intermediate per step (4 MB of float32 stays
            in cache).
        token_rows: optional long `[B]`, the row of `tokens` of each game.

    Returns:
        `[B, N, T]`; 0 where A has no such member.
    """
    batch, num_samples, num_targets, width = base.shape
    count = members.sum(-1)  # [B, 1, T]
    order = torch.sort(members.to(torch.uint8), dim=-1, descending=True, stable=True).indices
    if token_rows is None:
        token_rows = torch.arange(batch, device=base.device)
    # Rows are grouped by their largest member count and each group is padded to its own count
    # only: otherwise every 3x3 region would pay for the slots of the 5x5 ones. The rows are put
    # in group order once (`index_select`), so that every step works on a slice.
    row_slots = count.flatten(1).amax(1)  # [B]
    by_slots = torch.argsort(row_slots, stable=True)
    slots_of = row_slots[by_slots].tolist()
    base, fixed_unit = base.index_select(0, by_slots), fixed_unit.index_select(0, by_slots)
    count, order = count.index_select(0, by_slots), order.index_select(0, by_slots)
    token_rows = token_rows.index_select(0, by_slots)
    sums = base.new_zeros(batch, num_samples, num_targets)
    start = bisect.bisect_right(slots_of, 0)  # rows with no member of this kind stay 0
    while start < batch:
        slots = slots_of[start]
        end = bisect.bisect_right(slots_of, slots)
        step = max(1, chunk // max(1, num_samples * num_targets * slots * width))
        for first in range(start, end, step):
            rows = slice(first, min(first + step, end))
            real = torch.arange(slots, device=base.device) < count[rows, ..., None]
            member_tokens = _gather_rows(tokens, order[rows, ..., :slots], token_rows[rows])
            joined = combine(base[rows, :, :, None, :], member_tokens)  # [b, N, T, slots, P]
            # Multiply-and-sum, not `joined @ unit[..., None]`: thousands of one-column batched
            # products cost more than one elementwise pass.
            dots = (joined * fixed_unit[rows, :, :, None, :]).sum(-1)
            cosines = dots / torch.linalg.vector_norm(joined, dim=-1).clamp_min(1e-15)
            sums[rows] = torch.where(real, cosines, 0.0).sum(-1)
        start = end
    return torch.empty_like(sums).index_copy_(0, by_slots, sums)


def _gather_rows(tokens: torch.Tensor, index: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
    """`tokens[owners[b], index[b, ...]]`: `[B_img, N, P]`, long `[b, *rows]`, long `[b]` →
    `[b, *rows, P]`, read straight from `tokens` (no per-game copy of its rows)."""
    num_tokens, width = tokens.shape[-2:]
    flat = owners.reshape(-1, *(1,) * (index.dim() - 1)) * num_tokens + index
    return tokens.reshape(-1, width).index_select(0, flat.reshape(-1)).view(*index.shape, width)


def feature_summands(game: Any, coalitions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`MeanPooledTokenGame.interaction_summands` (see that class for C, G_I and G_T)."""
    num_patches, dtype = game.num_patches, game.cross.dtype
    batch = game.players.shape[0]
    num_samples, num_targets, n = coalitions.shape[-3:]
    words = game.players[:, None, None, num_patches:]  # [B, 1, 1, L]
    coalitions = coalitions.expand(batch, num_samples, num_targets, n)
    members = targets.expand(batch, num_targets, n).unsqueeze(1)  # [B, 1, T, n]
    x = coalitions[..., :num_patches].to(dtype)  # [B, N, T, N1]
    y = (coalitions[..., num_patches:] & words).to(dtype)  # [B, N, T, L]
    x_a = members[..., :num_patches].to(dtype)  # [B, 1, T, N1]
    y_a = (members[..., num_patches:] & words).to(dtype)  # [B, 1, T, L]
    image_gram, text_gram, cross = game.image_gram, game.text_gram, game.cross
    u = rows_times(x, image_gram)  # G x_S
    s = rows_times(y, text_gram)  # G_T y_S
    w = rows_times(y, cross.transpose(1, 2))  # C y_S
    w_t = rows_times(x, cross)  # C^T x_S
    q_image, q_text, dot = (u * x).sum(-1), (s * y).sum(-1), (w * x).sum(-1)
    n_image, n_text = x.sum(-1), y.sum(-1)
    value_s = _cosine_from_forms(dot, q_image, q_text, n_image, n_text)
    # S | A: the A-only forms depend on the target alone
    dot_a = dot + (w * x_a).sum(-1) + (w_t * y_a).sum(-1) + (rows_times(x_a, cross) * y_a).sum(-1)
    q_image_a = q_image + 2 * (u * x_a).sum(-1) + (rows_times(x_a, image_gram) * x_a).sum(-1)
    q_text_a = q_text + 2 * (s * y_a).sum(-1) + (rows_times(y_a, text_gram) * y_a).sum(-1)
    value_a = _cosine_from_forms(
        dot_a, q_image_a, q_text_a, n_image + x_a.sum(-1), n_text + y_a.sum(-1)
    )
    singles = _singleton_values(game, members, (u, s, w, w_t), (dot, q_image, q_text))
    singles = singles(n_image, n_text, value_s)
    num_members = members.sum(-1).to(dtype)
    return value_a - singles + (num_members - 1) * value_s


def _singleton_values(game, members, products, forms):
    """Σ_{a∈A} v(S | {a}) from the members' entries of G x_S, G_T y_S, C y_S and C^T x_S.

    Returns a function of (|S_image|, |S_text|, v(S)), all `[B, N, T]`, giving `[B, N, T]`.
    """
    num_patches, dtype = game.num_patches, game.cross.dtype
    u, s, w, w_t = products  # [B, N, T, N1 or L]
    dot, q_image, q_text = forms  # [B, N, T]
    num_members = members.sum(-1)  # [B, 1, T]
    width = int(num_members.max())
    index = torch.sort(members.long(), dim=-1, descending=True, stable=True).indices[..., :width]
    valid = torch.arange(width, device=index.device) < num_members.unsqueeze(-1)  # [B, 1, T, m]
    is_patch = valid & (index < num_patches)
    patch = index.clamp(max=num_patches - 1)
    word = (index - num_patches).clamp(min=0)
    per_target = (*index.shape[:-1], -1)  # [B, 1, T, .]
    word_players = game.players[:, None, None, num_patches:].expand(per_target)
    is_word = valid & ~is_patch & word_players.gather(-1, word)
    image_diag = torch.diagonal(game.image_gram, dim1=-2, dim2=-1)[:, None, None].expand(per_target)
    text_diag = torch.diagonal(game.text_gram, dim1=-2, dim2=-1)[:, None, None].expand(per_target)
    patch_diag, word_diag = image_diag.gather(-1, patch), text_diag.gather(-1, word)
    patch, word = patch.expand(*u.shape[:-1], width), word.expand(*s.shape[:-1], width)

    def total(n_image: torch.Tensor, n_text: torch.Tensor, value_s: torch.Tensor) -> torch.Tensor:
        dot_, q_image_, q_text_ = dot.unsqueeze(-1), q_image.unsqueeze(-1), q_text.unsqueeze(-1)
        n_image_, n_text_ = n_image.unsqueeze(-1), n_text.unsqueeze(-1)
        with_patch = _cosine_from_forms(
            dot_ + w.gather(-1, patch),
            q_image_ + 2 * u.gather(-1, patch) + patch_diag,
            q_text_,
            n_image_ + 1,
            n_text_,
        )
        with_word = _cosine_from_forms(
            dot_ + w_t.gather(-1, word),
            q_image_,
            q_text_ + 2 * s.gather(-1, word) + word_diag,
            n_image_,
            n_text_ + 1,
        )
        # a member that is a padding word is a null player: v(S | {a}) = v(S)
        null = (valid & ~is_patch & ~is_word).to(dtype)
        value = with_patch * is_patch.to(dtype) + with_word * is_word.to(dtype)
        return value.sum(-1) + null.sum(-1) * value_s

    return total


def rows_times(rows: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Every row times a per-image matrix: `[B, *rows, P]`, `[B, P, Q]` → `[B, *rows, Q]`."""
    flat = rows.reshape(rows.shape[0], -1, rows.shape[-1])
    return (flat @ matrix).reshape(*rows.shape[:-1], matrix.shape[-1])


def _cosine_from_forms(
    dot: torch.Tensor,
    image_norm2: torch.Tensor,
    text_norm2: torch.Tensor,
    num_image: torch.Tensor,
    num_text: torch.Tensor,
) -> torch.Tensor:
    """cos = x^T C y / sqrt(x^T G x · y^T G_T y), and 0 when a side is empty."""
    similarity = dot * torch.rsqrt((image_norm2 * text_norm2).clamp_min(1e-30))
    return torch.where((num_image > 0) & (num_text > 0), similarity, 0.0)


__all__ = ["cosine", "feature_summands", "max_pooled_summands", "rows_times"]
