"""The semantics-level game v2 of LOUPE (METHOD §3.4) as a batched game for the interaction engine.

Players = K regions + M phrases; value = fine-grained region-phrase similarity of the kept
regions and phrases, and 0 for a coalition with no region or no phrase. Padding phrases are never
players. `region_phrase_interactions` turns the game into the FSA labels of a batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from .estimators import InteractionEstimate
from .protocol import PlayerMaskGame
from .subset_tables import SoftmaxMaxTables, shifted_logits
from .targets import game_interactions


@dataclass(frozen=True, eq=False)
class SemanticGame(PlayerMaskGame):
    """Semantics-level game v2 of a batch of images (build it with `semantic_game`).

    Players `0..K-1` are regions, `K..K+M-1` phrases. For a coalition with region set R and
    phrase set Q (padding phrases removed), with logits a_kj = h_k · h_j / temperature:

        s1 = mean_{k∈R} max_{j∈Q} softmax_{j'∈Q}(a_kj')_j      (region → phrase)
        s2 = mean_{j∈Q} max_{k∈R} softmax_{k'∈R}(a_k'j)_k      (phrase → region)
        v2 = (s1 + s2) / 2, and 0 if R or Q is empty.

    Each sum over R (resp. Q) of a softmax maximum over Q (resp. R) is read from per-image
    look-up tables over player subsets (`subset_tables.py`), so a coalition costs a few table
    look-ups instead of a K x M softmax.

    Attributes:
        num_regions: K.
        players: bool `[B, K + M]`.
        logits: `[B, K, M]`.
        table_bits: players per look-up table block.
        region_to_phrase / phrase_to_region: the tables for Σ_{k∈R} max_j softmax over Q
            (softmax side: phrases) and for Σ_{j∈Q} max_k softmax over R (softmax side: regions),
            built on first use: `region_phrase_interactions` re-groups images with padding
            phrases into games of their real players and never evaluates the batch's own game.
    """

    num_regions: int
    players: torch.Tensor
    logits: torch.Tensor
    table_bits: int = 12

    @functools.cached_property
    def region_to_phrase(self) -> SoftmaxMaxTables:
        phrase_mask = self.players[:, self.num_regions :]
        with torch.no_grad():
            return SoftmaxMaxTables.build(
                self.logits.transpose(1, 2), self.table_bits, soft_valid=phrase_mask
            )

    @functools.cached_property
    def phrase_to_region(self) -> SoftmaxMaxTables:
        phrase_mask = self.players[:, self.num_regions :]
        with torch.no_grad():
            return SoftmaxMaxTables.build(self.logits, self.table_bits, other_valid=phrase_mask)

    @torch.no_grad()
    def __call__(self, masks: torch.Tensor) -> torch.Tensor:
        """bool `[B, G, K + M]` → v2 values `[B, G]`."""
        if masks.shape[0] > 1 and masks.stride(0) == 0:
            masks = masks[:1]  # coalitions shared by every image: encoded once, read as rows
        regions, phrases = masks[..., : self.num_regions], masks[..., self.num_regions :]
        # Padding phrases are excluded inside the tables; only the phrase count needs the mask.
        s1 = self.region_to_phrase.total(phrases, regions)
        s2 = self.phrase_to_region.total(regions, phrases)
        num_regions = regions.sum(-1)
        phrase_players = self.players[:, self.num_regions :]
        if masks.shape[0] == 1:
            num_phrases = (phrases[0].float() @ phrase_players.T.float()).T
        else:
            num_phrases = (phrases & phrase_players.unsqueeze(1)).sum(-1)
        value = (s1 / num_regions.clamp_min(1) + s2 / num_phrases.clamp_min(1)) / 2
        return torch.where((num_regions > 0) & (num_phrases > 0), value, 0.0).to(self.logits.dtype)


@torch.no_grad()
def semantic_game(
    region_embeds: torch.Tensor,
    phrase_embeds: torch.Tensor,
    phrase_mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    table_bits: int = 12,
) -> SemanticGame:
    """Builds the semantics-level game v2 (METHOD §3.4) for a batch of images.

    Args:
        region_embeds: `[B, K, D]` region representations h^I.
        phrase_embeds: `[B, M, D]` phrase representations h^T.
        phrase_mask: bool `[B, M]`, False for padding phrases (never players); default all True.
        temperature: logits are h_k · h_j / temperature. The default 1.0 is the plain dot product
            of METHOD §3.4; with L2-normalised embeddings a CLIP-like temperature (e.g. 1/logit
            scale) sharpens the softmaxes.
        table_bits: players per look-up table block (tables have 2^c rows per block, c ≤ this).

    Returns:
        A `SemanticGame` with K + M players.
    """
    if region_embeds.dim() != 3 or phrase_embeds.dim() != 3:
        raise ValueError("region_embeds and phrase_embeds must be [B, K, D] and [B, M, D]")
    logits = torch.einsum("bkd,bmd->bkm", region_embeds, phrase_embeds) / temperature
    return semantic_game_from_logits(logits, phrase_mask, table_bits=table_bits)


def semantic_game_from_logits(
    logits: torch.Tensor, phrase_mask: torch.Tensor | None = None, *, table_bits: int = 12
) -> SemanticGame:
    """`semantic_game` from the region-phrase logits a_kj / temperature `[B, K, M]`."""
    batch, num_regions, num_phrases = logits.shape
    if phrase_mask is None:
        phrase_mask = torch.ones(batch, num_phrases, dtype=torch.bool, device=logits.device)
    phrase_mask = phrase_mask.bool()
    players = torch.cat([phrase_mask.new_ones(batch, num_regions), phrase_mask], dim=-1)
    # The tables are built lazily, but a temperature too small for them is refused now.
    shifted_logits(logits.transpose(1, 2), phrase_mask)
    shifted_logits(logits, torch.ones_like(logits[..., 0], dtype=torch.bool))
    return SemanticGame(num_regions, players, logits, table_bits=table_bits)


def region_phrase_targets(
    num_regions: int, num_phrases: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """All K x M region-phrase pairs as targets of v2: bool `[K * M, K + M]`, row k M + j = {k, K + j}."""
    region = torch.arange(num_regions, device=device).repeat_interleave(num_phrases)
    phrase = num_regions + torch.arange(num_phrases, device=device).repeat(num_regions)
    targets = torch.zeros(
        num_regions * num_phrases, num_regions + num_phrases, dtype=torch.bool, device=device
    )
    rows = torch.arange(num_regions * num_phrases, device=device)
    targets[rows, region] = True
    targets[rows, phrase] = True
    return targets


def region_phrase_interactions(
    game: SemanticGame,
    *,
    num_samples: int | None = 100,
    method: str = "stratified",
    generator: torch.Generator | None = None,
    chunk_size: int | None = 4096,
    allocation: torch.Tensor | None = None,
) -> InteractionEstimate:
    """Semantics-level interaction I([H_kj]) of every region-phrase pair (METHOD eq. 10), the FSA
    label before normalisation. Pairs with a padding phrase get 0.

    Images are grouped by which phrases are real, and each group is estimated as a game of its
    real players only: padding phrases are null players (their pairs interact 0 exactly), and
    leaving them out keeps the coalition samples shared by the group and the strata sharp.

    Args:
        game: the batch's `SemanticGame`.
        num_samples: coalition samples per pair; `None` enumerates exactly (K + M ≤ 20 only).
        method, generator, chunk_size, allocation: see `sampled_interactions`.

    Returns:
        An `InteractionEstimate` with values and standard errors `[B, K, M]`; `num_evaluations`
        and `stratum_std` are the largest, respectively the image-weighted pooled, over groups.
    """
    num_regions = game.num_regions
    phrase_players = game.players[:, num_regions:]
    if bool(phrase_players.all()):
        return _all_pairs(game, num_samples, method, generator, chunk_size, allocation)
    batch, num_phrases = phrase_players.shape
    values = game.logits.new_zeros(batch, num_regions, num_phrases)
    stderr = torch.zeros_like(values)
    parts = []
    patterns, group = torch.unique(phrase_players, dim=0, return_inverse=True)
    for index, pattern in enumerate(patterns):
        rows, real = (group == index).nonzero()[:, 0], pattern.nonzero()[:, 0]
        if real.numel() == 0:
            continue  # no phrase at all: every pair interacts 0
        sub_game = semantic_game_from_logits(
            game.logits[rows][:, :, real], table_bits=game.table_bits
        )
        part = _all_pairs(sub_game, num_samples, method, generator, chunk_size, allocation)
        values[rows[:, None], :, real] = part.values.transpose(1, 2).to(values.dtype)
        stderr[rows[:, None], :, real] = part.stderr.transpose(1, 2).to(values.dtype)
        parts.append((rows.numel(), part))
    return InteractionEstimate(
        values,
        stderr,
        parts[0][1].num_samples if parts else 0,
        max((part.num_evaluations for _, part in parts), default=0),
        _pooled_spread(parts),
    )


def _all_pairs(
    game: SemanticGame,
    num_samples: int | None,
    method: str,
    generator: torch.Generator | None,
    chunk_size: int | None,
    allocation: torch.Tensor | None,
) -> InteractionEstimate:
    """Every pair of a game whose phrases are all real: `[B, K, M]`."""
    num_phrases = game.n_players - game.num_regions
    targets = region_phrase_targets(game.num_regions, num_phrases, game.players.device)
    estimate = game_interactions(
        game, targets, num_samples, method, generator, chunk_size, allocation
    )
    shape = (*game.batch_shape, game.num_regions, num_phrases)
    return replace(
        estimate, values=estimate.values.reshape(shape), stderr=estimate.stderr.reshape(shape)
    )


def _pooled_spread(parts: list[tuple[int, InteractionEstimate]]) -> torch.Tensor | None:
    """Image-weighted pooled per-stratum spread of several groups (strata indexed alike)."""
    spreads = [(count, part.stratum_std) for count, part in parts if part.stratum_std is not None]
    if not spreads:
        return None
    width = max(spread.numel() for _, spread in spreads)
    variance = torch.zeros(width, dtype=torch.float64)
    weight = torch.zeros(width, dtype=torch.float64)
    for count, spread in spreads:
        variance[: spread.numel()] += count * spread.double().square().cpu()
        weight[: spread.numel()] += count
    return (variance / weight.clamp_min(1)).sqrt()


__all__ = [
    "SemanticGame",
    "region_phrase_interactions",
    "region_phrase_targets",
    "semantic_game",
    "semantic_game_from_logits",
]
