"""Look-up tables over the subsets of a few players: why a v2 coalition costs a few look-ups.

The semantics-level game needs, for a coalition, quantities of the form

    total(S_soft, S_other) = Σ_{q ∈ S_other} max_{p ∈ S_soft} softmax_{p' ∈ S_soft}(a_{p'q})_p

(regions as `soft` and phrases as `other` for one direction, the reverse for the other), where
max of a softmax = max_p e^{a_pq} / Σ_p e^{a_pq} over the present p. Both the max and the sum
over a subset of a block of c players can be tabulated for all 2^c subsets by doubling, and
combine across blocks by max and +. When the soft side fits in one block, the whole total is
additive over the other side's blocks and becomes a sum of a few scalar look-ups.

Values are kept in linear space, shifted by the per-q maximum so that the largest term is 1.
float32 holds that exactly enough while a softmax row spans < 80 nats of logits; wider rows are
computed in float64 (up to 700 nats, beyond which a ValueError asks for a larger temperature).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FLOAT32_LOGIT_SPAN = 80.0
FLOAT64_LOGIT_SPAN = 700.0
SCALAR_TABLE_LIMIT = 2**25
"""Largest scalar table (entries, all images together) before falling back to vector look-ups."""


def block_layout(num_players: int, max_bits: int) -> tuple[int, int]:
    """Splits P players into C balanced blocks of c ≤ max_bits players: returns (C, c)."""
    num_blocks = max(1, math.ceil(num_players / max_bits))
    return num_blocks, max(1, math.ceil(num_players / num_blocks))


def block_codes(present: torch.Tensor, num_blocks: int, bits: int) -> torch.Tensor:
    """Bit codes of the present players of each block: bool `[..., G, P]` → int64 `[..., G, C]`."""
    padded = F.pad(present, (0, num_blocks * bits - present.shape[-1]))
    weights = 1 << torch.arange(bits, device=present.device)
    return (padded.unflatten(-1, (num_blocks, bits)).long() * weights).sum(-1)


def subset_reduce(values: torch.Tensor, num_blocks: int, bits: int, reduce: str) -> torch.Tensor:
    """Sum or max of `values [B, R, P]` over every subset of each block of players.

    Returns:
        `[B, R, C, 2^c]`: entry `[b, r, i, s]` reduces the players of block i whose bits are set
        in s (0 for the empty subset; values must be ≥ 0 for `"max"`).
    """
    batch, rows, num_players = values.shape
    padded = F.pad(values, (0, num_blocks * bits - num_players))
    blocks = padded.reshape(batch, rows, num_blocks, bits)
    table = values.new_zeros(batch, rows, num_blocks, 1)
    combine = torch.add if reduce == "sum" else torch.maximum
    for bit in range(bits):
        # Subsets containing player `bit` are those without it, plus it: the table doubles.
        table = torch.cat([table, combine(table, blocks[..., bit : bit + 1])], dim=-1)
    return table


@dataclass(frozen=True, eq=False)
class SoftmaxMaxTables:
    """Tables for total(S_soft, S_other) of one direction, for a batch of B images.

    Build with `SoftmaxMaxTables.build`; evaluate with `total`. The image axis is innermost, so
    a coalition shared by all images reads one contiguous row of B (or B x Q) values.

    Attributes:
        soft_layout, other_layout: (blocks, bits) of the two sides.
        scalar: `[2^c_soft, C_other, 2^c_other, B]` totals when the soft side is one block,
            else None.
        maxima, sums: `[C_soft, 2^c_soft, B, Q]` per-block max and sum of e^{a - max} (zeroed
            for padding players), used when `scalar` is None.
        other_valid: `[B, Q]` float, 0 for padding players of the other side.
    """

    soft_layout: tuple[int, int]
    other_layout: tuple[int, int]
    scalar: torch.Tensor | None
    maxima: torch.Tensor | None
    sums: torch.Tensor | None
    other_valid: torch.Tensor

    @classmethod
    def build(
        cls,
        logits: torch.Tensor,
        max_bits: int,
        soft_valid: torch.Tensor | None = None,
        other_valid: torch.Tensor | None = None,
    ) -> SoftmaxMaxTables:
        """Tables for `logits [B, P_soft, Q_other]`; the softmax runs over P for each q.

        `soft_valid [B, P]` / `other_valid [B, Q]` mark real players (padding never counts).
        """
        batch, num_soft, num_other = logits.shape
        if soft_valid is None:
            soft_valid = torch.ones(batch, num_soft, dtype=torch.bool, device=logits.device)
        if other_valid is None:
            other_valid = torch.ones(batch, num_other, dtype=torch.bool, device=logits.device)
        soft_layout = block_layout(num_soft, max_bits)
        other_layout = block_layout(num_other, max_bits)
        valid = soft_valid.unsqueeze(-1)
        shifted, span = shifted_logits(logits, soft_valid)
        dtype = logits.dtype if span <= FLOAT32_LOGIT_SPAN else torch.float64
        weights = (shifted.to(dtype).exp() * valid).transpose(1, 2)  # [B, Q, P]
        other_weight = other_valid.to(dtype)
        maxima = subset_reduce(weights, *soft_layout, "max")  # [B, Q, Cs, 2^cs]
        sums = subset_reduce(weights, *soft_layout, "sum")
        scalar_entries = batch * 2 ** soft_layout[1] * other_layout[0] * 2 ** other_layout[1]
        if soft_layout[0] == 1 and scalar_entries <= SCALAR_TABLE_LIMIT:
            ratio = _safe_ratio(maxima[:, :, 0], sums[:, :, 0])  # [B, Q, 2^cs]
            ratio = ratio * other_weight.unsqueeze(-1)
            scalar = subset_reduce(
                ratio.transpose(1, 2), *other_layout, "sum"
            )  # [B, 2^cs, Co, 2^co]
            return cls(
                soft_layout,
                other_layout,
                scalar.permute(1, 2, 3, 0).contiguous(),
                None,
                None,
                other_weight,
            )
        # Zero maxima for padding players of the other side: their ratio is then 0, so they drop
        # out of the total without a separate mask.
        maxima = maxima * other_weight[:, :, None, None]
        return cls(
            soft_layout,
            other_layout,
            None,
            maxima.permute(2, 3, 0, 1).contiguous(),  # [Cs, 2^cs, B, Q]
            sums.permute(2, 3, 0, 1).contiguous(),
            other_weight,
        )

    @property
    def batch_size(self) -> int:
        return self.other_valid.shape[0]

    def total(self, soft_present: torch.Tensor, other_present: torch.Tensor) -> torch.Tensor:
        """Σ_{q ∈ S_other} max softmax over S_soft: bool `[B', G, P]`, `[B', G, Q]` → `[B, G]`.

        B' is the game batch B, or 1 for coalitions shared by every image (read as whole rows).
        """
        shared = soft_present.shape[0] == 1 and self.batch_size > 1
        soft_codes = block_codes(soft_present, *self.soft_layout)  # [B', G, Cs]
        if self.scalar is not None:
            return self._scalar_total(
                soft_codes, block_codes(other_present, *self.other_layout), shared
            )
        num_blocks, rows, batch, width = self.maxima.shape
        block = torch.arange(num_blocks, device=soft_codes.device)
        row = block * rows + soft_codes  # [B', G, Cs]
        if shared:
            g = row.shape[1]
            index = row[0].reshape(-1)
            maxima = self.maxima.reshape(-1, batch * width).index_select(0, index)
            sums = self.sums.reshape(-1, batch * width).index_select(0, index)
            maxima = maxima.reshape(g, num_blocks, batch, width).amax(1)  # [G, B, Q]
            sums = sums.reshape(g, num_blocks, batch, width).sum(1)
            ratio = _safe_ratio(maxima, sums)
            return torch.bmm(ratio, other_present[0].unsqueeze(-1).to(ratio.dtype))[..., 0].T
        image = torch.arange(batch, device=soft_codes.device)[:, None, None]
        index = (row * batch + image).reshape(-1)
        g = row.shape[1]
        maxima = self.maxima.reshape(-1, width).index_select(0, index)
        sums = self.sums.reshape(-1, width).index_select(0, index)
        maxima = maxima.reshape(batch, g, num_blocks, width).amax(-2)  # [B, G, Q]
        sums = sums.reshape(batch, g, num_blocks, width).sum(-2)
        return (_safe_ratio(maxima, sums) * other_present.to(maxima.dtype)).sum(-1)

    def _scalar_total(
        self, soft_codes: torch.Tensor, other_codes: torch.Tensor, shared: bool
    ) -> torch.Tensor:
        _, other_blocks, other_rows, batch = self.scalar.shape
        block = torch.arange(other_blocks, device=soft_codes.device)
        cell = (soft_codes * other_blocks + block) * other_rows + other_codes  # [B', G, Co]
        if shared:
            g = cell.shape[1]
            picked = self.scalar.reshape(-1, batch).index_select(0, cell[0].reshape(-1))
            return picked.reshape(g, other_blocks, batch).sum(1).T
        image = torch.arange(batch, device=soft_codes.device)[:, None, None]
        return self.scalar.reshape(-1)[cell * batch + image].sum(-1)


def shifted_logits(logits: torch.Tensor, soft_valid: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Logits `[B, P, Q]` minus their max over the valid p of each q (0 at padding), and the
    widest span of a softmax row in nats.

    Raises:
        ValueError: when a row spans more than `FLOAT64_LOGIT_SPAN` nats (not even float64 tables
            would hold it).
    """
    valid = soft_valid.unsqueeze(-1)
    shifted = logits - logits.masked_fill(~valid, -math.inf).amax(1, keepdim=True)
    shifted = shifted.masked_fill(~valid | ~torch.isfinite(shifted), 0.0)
    span = float(-shifted.amin()) if shifted.numel() else 0.0
    if span > FLOAT64_LOGIT_SPAN:
        raise ValueError(f"logits span {span:.0f} nats within a softmax; use a larger temperature")
    return shifted, span


def _safe_ratio(maxima: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """max / sum, and 0 for the empty subset (max = sum = 0)."""
    return maxima / sums.clamp_min(torch.finfo(sums.dtype).tiny)
