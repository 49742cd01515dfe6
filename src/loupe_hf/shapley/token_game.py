"""The token-level game v1 of LOUPE (METHOD §3.3) as a batched game for the interaction engine.

Players = patch tokens + word tokens; value = cosine similarity of the global image and text
embeddings of the kept tokens. Two masking modes: `"feature"` masks the final token features
before pooling (no encoder pass), `"input"` masks at the encoder input and re-encodes (faithful;
one encoder pass per distinct image side and per distinct text side). A coalition with no patch
or no word has value 0: there is nothing to compare. Padding words are never players (null
players, so they change no Shapley value or interaction).

`token_region_interactions` turns the game into the TSA labels of a batch's regions.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F

from ..choices import IMAGE_POOLING_MODES, TOKEN_GAME_MODES, check_choice
from ..pooling import masked_max
from .estimators import InteractionEstimate
from .protocol import PlayerMaskGame, unique_coalitions
from .targets import game_interactions
from .token_summands import cosine, feature_summands, max_pooled_summands, rows_times


class LoupeGameModel(Protocol):
    """What the token-level game needs from a model (`loupe_hf.LoupeModel` provides it).

    The projections behind `pool_image_tokens` / `pool_text_tokens` must be linear and bias-free,
    so that pooling then projecting equals projecting then pooling.
    """

    def get_image_features(
        self, pixel_values: torch.Tensor, patch_keep_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`[B, 3, H, W]`, bool `[B, N1]` → projected image embedding `[B, P]` (dropped patches
        zeroed at the encoder input)."""
        ...

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """`[B, L]`, `[B, L]` → projected text embedding `[B, P]`."""
        ...

    def pool_image_tokens(self, patch_tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """`[B, N1, Dv]`, `[B, *extra, N1]` → projected masked mean `[B, *extra, P]`."""
        ...

    def pool_text_tokens(self, word_tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """`[B, L, Dt]`, `[B, *extra, L]` → projected masked mean `[B, *extra, P]`."""
        ...

    def __call__(self, **inputs: Any) -> Any:
        """Forward pass whose output has `patch_tokens [B, N1, Dv]` and `word_tokens [B, L, Dt]`."""
        ...


@dataclass(frozen=True, eq=False)
class TokenGame(PlayerMaskGame):
    """Token-level game v1 of a batch of image-text pairs (build it with `token_game`).

    Players `0..N1-1` are the patch tokens, players `N1..N1+L-1` the word positions; word
    positions with attention mask 0 are padding (never present). One subclass per way of
    evaluating a coalition: `MeanPooledTokenGame` and `MaxPooledTokenGame` mask the final token
    features (feature mode, by the model's image pooling), `InputTokenGame` re-encodes.

    Attributes:
        num_patches: N1.
        players: bool `[B, N1 + L]`, the real players.
    """

    num_patches: int
    players: torch.Tensor

    mode: ClassVar[str] = "feature"

    def select_rows(self, index: torch.Tensor) -> TokenGame:
        """The games of the given batch rows (long `[B']`, rows may repeat), e.g. one game per
        target to estimate: every per-pair tensor is indexed."""
        batch = self.players.shape[0]
        per_pair = {
            item.name: value.index_select(0, index)
            for item in fields(self)
            if isinstance(value := getattr(self, item.name), torch.Tensor)
            and value.dim() > 0
            and value.shape[0] == batch
        }
        return replace(self, **per_pair)

    @torch.no_grad()
    def __call__(self, masks: torch.Tensor) -> torch.Tensor:
        """bool `[B, G, N1 + L]` → v1 values `[B, G]`."""
        image_keep = masks[..., : self.num_patches]
        text_keep = masks[..., self.num_patches :] & self.players[:, None, self.num_patches :]
        similarity = self._similarity(image_keep, text_keep)
        return torch.where(image_keep.any(-1) & text_keep.any(-1), similarity, 0.0)

    def _similarity(self, image_keep: torch.Tensor, text_keep: torch.Tensor) -> torch.Tensor:
        """Cosine of the kept patches' and kept words' embeddings, `[B, G]`."""
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class MeanPooledTokenGame(TokenGame):
    """Feature mode for mean image pooling. With z_p, u_w the individually projected tokens, the
    embeddings of a coalition are (means of) Σ_{p∈S} z_p and Σ_{w∈S} u_w; the cosine ignores the
    1/|S| of a mean, so

        v1(S) = x^T C y / sqrt(x^T G_I x · y^T G_T y),   C = Z U^T, G_I = Z Z^T, G_T = U U^T,

    with x, y the coalition's patch and word indicators. The Gram matrices are computed once per
    batch; a coalition then costs O(N1^2 + N1 L) instead of O((N1 + L) P) and no P-wide tensor.

    Attributes:
        cross, image_gram, text_gram: C `[B, N1, L]`, G_I `[B, N1, N1]`, G_T `[B, L, L]` (padding
            words zeroed).
    """

    cross: torch.Tensor
    image_gram: torch.Tensor
    text_gram: torch.Tensor

    def _similarity(self, image_keep: torch.Tensor, text_keep: torch.Tensor) -> torch.Tensor:
        dtype = self.cross.dtype
        x, y = image_keep.to(dtype), text_keep.to(dtype)
        dot = ((x @ self.cross) * y).sum(-1)
        image_norm2 = ((x @ self.image_gram) * x).sum(-1)
        text_norm2 = ((y @ self.text_gram) * y).sum(-1)
        return dot * torch.rsqrt((image_norm2 * text_norm2).clamp_min(1e-30))

    @torch.no_grad()
    def interaction_summands(self, coalitions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The summand of eq. 7 for every (sample, target), without the |A| + 2 coalitions (the
        optional fast path of the game protocol, see `protocol.py`). Every coalition of a summand
        is S plus some players, and x^T G x, x^T C y and y^T G_T y of S plus one player follow from
        G x_S, C y_S, C^T x_S and G_T y_S, so a summand costs about one coalition.

        Args:
            coalitions: bool `[B or (), N, T, n]`, S per (sample, target).
            targets: bool `[B or (), T, n]`, A per target (disjoint from its S).

        Returns:
            `[B, N, T]`, equal to the summand built from `__call__` values.
        """
        return feature_summands(self, coalitions, targets)


@dataclass(frozen=True, eq=False)
class MaxPooledTokenGame(TokenGame):
    """Feature mode for max image pooling: a coalition's image embedding is the element-wise max of
    its rows of Z, its text embedding the sum of its rows of U. No closed form: each coalition costs
    O(N1 P).

    Attributes:
        patch_projections, word_projections: Z `[B_img, N1, P]` and U `[B_img, L, P]`.
        image_rows: optional long `[B]`, the row of the projections that each game reads (see
            `select_rows`); None: game b reads row b.
    """

    patch_projections: torch.Tensor
    word_projections: torch.Tensor
    image_rows: torch.Tensor | None = None

    def select_rows(self, index: torch.Tensor) -> MaxPooledTokenGame:
        """The games of the given batch rows: they share this game's projections (indexed through
        `image_rows`, no copy: many targets of one image read the same cached rows)."""
        rows = index if self.image_rows is None else self.image_rows.index_select(0, index)
        return replace(self, players=self.players.index_select(0, index), image_rows=rows)

    def word_projections_per_game(self) -> torch.Tensor:
        """U `[B, L, P]` of each game."""
        if self.image_rows is None:
            return self.word_projections
        return self.word_projections.index_select(0, self.image_rows)

    def _similarity(self, image_keep: torch.Tensor, text_keep: torch.Tensor) -> torch.Tensor:
        image = masked_max(self.patch_projections, image_keep, token_rows=self.image_rows)
        # The mean's 1/|S| does not change the cosine: sum the kept word projections.
        words = self.word_projections_per_game()
        text = rows_times(text_keep.to(words.dtype), words)
        return cosine(image, text)

    @torch.no_grad()
    def interaction_summands(self, coalitions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The summand of eq. 7 for every (sample, target): one max over S serves all |A| + 2 terms
        (see `MeanPooledTokenGame.interaction_summands` for the arguments)."""
        return max_pooled_summands(self, coalitions, targets)


@dataclass(frozen=True, eq=False)
class InputTokenGame(TokenGame):
    """Input mode: dropped patches and words are masked at the encoder input and every distinct
    (pair, kept-token set) is re-encoded. Faithful and costly; no fast summands.

    Attributes:
        model: what re-encodes (a `LoupeGameModel`).
        pixel_values, input_ids, attention_mask: the batch's inputs.
        encoder_batch_size: images (or texts) per encoder call.
    """

    model: LoupeGameModel
    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    encoder_batch_size: int = 64

    mode: ClassVar[str] = "input"

    def _similarity(self, image_keep: torch.Tensor, text_keep: torch.Tensor) -> torch.Tensor:
        image = self._encode_per_coalition(image_keep, self._encode_images)
        text = self._encode_per_coalition(text_keep, self._encode_texts)
        return cosine(image, text)

    def _encode_per_coalition(self, keep: torch.Tensor, encode: Any) -> torch.Tensor:
        """Encodes each distinct (pair, kept-token set) once: `[B, G, m]` → `[B, G, P]`."""
        b, g, m = keep.shape
        owner = torch.arange(b, device=keep.device).repeat_interleave(g)
        flat = keep.reshape(b * g, m)
        first, inverse = unique_coalitions(flat, groups=owner)
        rows, owners = flat[first], owner[first]
        nonempty = rows.any(-1)  # empty sides are never encoded: their value is 0 by convention
        embeddings = None
        selected = nonempty.nonzero()[:, 0]
        for start in range(0, selected.numel(), self.encoder_batch_size):
            index = selected[start : start + self.encoder_batch_size]
            encoded = encode(owners[index], rows[index])
            if embeddings is None:
                embeddings = encoded.new_zeros(rows.shape[0], encoded.shape[-1])
            embeddings[index] = encoded
        if embeddings is None:  # every coalition is empty on this side
            embeddings = torch.zeros(rows.shape[0], 1, device=keep.device)
        return embeddings[inverse].reshape(b, g, -1)

    def _encode_images(self, owners: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(self.pixel_values[owners], patch_keep_mask=keep)

    def _encode_texts(self, owners: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.model.get_text_features(
            self.input_ids[owners], attention_mask=keep.to(self.attention_mask.dtype)
        )


@torch.no_grad()
def token_game(
    model: LoupeGameModel,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    mode: str = "feature",
    image_pooling: str = "mean",
    patch_tokens: torch.Tensor | None = None,
    word_tokens: torch.Tensor | None = None,
    encoder_batch_size: int = 64,
) -> TokenGame:
    """Builds the token-level game v1 (METHOD §3.3) for a batch of image-text pairs.

    Args:
        model: a `LoupeGameModel` (e.g. `loupe_hf.LoupeModel`).
        pixel_values: `[B, 3, H, W]`.
        input_ids, attention_mask: `[B, L]`; word players are the positions with mask 1
            (`[CLS]` and `[SEP]` included).
        mode: `"feature"` (mask final token features before pooling: cheap, what training uses by
            default) or `"input"` (mask patches/words at the encoder input and re-encode: faithful).
            In feature mode the text side is always the masked mean of word tokens, which is the
            model's own text embedding when it pools by mean (`text_pooling="mean"`).
        image_pooling: feature mode: how the model pools patch tokens into an image embedding,
            `"mean"` or `"max"` (its `config.image_pooling`); input mode re-encodes with the model's
            own pooling.
        patch_tokens, word_tokens: feature mode: the forward pass's `patch_tokens [B, N1, Dv]` and
            `word_tokens [B, L, Dt]`, to avoid a second forward pass; computed when omitted.
        encoder_batch_size: input mode: coalitions per encoder call.
    """
    check_choice("token game mode", mode, TOKEN_GAME_MODES)
    check_choice("image_pooling", image_pooling, IMAGE_POOLING_MODES)
    word_players = attention_mask.bool()
    if mode == "input":
        num_patches = _num_patches(model, pixel_values, patch_tokens)
        players = _token_players(word_players, num_patches)
        return InputTokenGame(
            num_patches,
            players,
            model=model,
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_batch_size=encoder_batch_size,
        )
    if patch_tokens is None or word_tokens is None:
        outputs = model(
            pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask
        )
        patch_tokens, word_tokens = outputs.patch_tokens, outputs.word_tokens
    # Pooling a single token and projecting it = projecting it; with bias-free projections the
    # masked mean of projected tokens is the projected masked mean (what the model computes).
    num_patches, num_words = patch_tokens.shape[-2], word_tokens.shape[-2]
    if num_words != word_players.shape[-1]:
        raise ValueError(
            f"word_tokens has {num_words} positions, attention_mask {word_players.shape[-1]}"
        )
    patch_projections = _project_each(model.pool_image_tokens, patch_tokens)
    word_projections = _project_each(model.pool_text_tokens, word_tokens)
    word_projections = word_projections * word_players.unsqueeze(-1).to(word_projections.dtype)
    if image_pooling == "max":
        # Each patch is pooled alone above, and the max of one projected token is that token.
        return MaxPooledTokenGame(
            num_patches,
            _token_players(word_players, num_patches),
            patch_projections=patch_projections,
            word_projections=word_projections,
        )
    return MeanPooledTokenGame(
        num_patches,
        _token_players(word_players, num_patches),
        cross=patch_projections @ word_projections.transpose(1, 2),
        image_gram=patch_projections @ patch_projections.transpose(1, 2),
        text_gram=word_projections @ word_projections.transpose(1, 2),
    )


def _project_each(pool: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Every token projected on its own: `[B, N, D]` → `[B, N, P]`.

    Each token is pooled as a one-token sequence (its masked mean is itself), so one batched
    projection covers all of them.
    """
    batch, length, width = tokens.shape
    singles = tokens.reshape(batch * length, 1, width)
    keep = tokens.new_ones(batch * length, 1)
    return pool(singles, keep).reshape(batch, length, -1)


def _token_players(word_players: torch.Tensor, num_patches: int) -> torch.Tensor:
    patches = word_players.new_ones(word_players.shape[0], num_patches)
    return torch.cat([patches, word_players], dim=-1)


def _num_patches(model: Any, pixel_values: torch.Tensor, patch_tokens: torch.Tensor | None) -> int:
    if patch_tokens is not None:
        return patch_tokens.shape[-2]
    grid = getattr(model, "grid_size", None)
    if grid is None:
        raise ValueError(
            "input mode needs patch_tokens (or a model with a grid_size) to count patches"
        )
    return int(grid) ** 2


def region_targets(region_masks: torch.Tensor, num_words: int) -> torch.Tensor:
    """Target coalitions of the token game for K regions: bool `[B, K, N1]` → `[B, K, N1 + L]`."""
    return F.pad(region_masks.bool(), (0, num_words))


def token_region_interactions(
    game: TokenGame,
    region_masks: torch.Tensor,
    *,
    num_samples: int | None = 100,
    method: str = "stratified",
    generator: torch.Generator | None = None,
    chunk_size: int | None = 4096,
    allocation: torch.Tensor | None = None,
    stratify_by_patches: bool = False,
) -> InteractionEstimate:
    """Token-level interaction I([R_k]) of every region (METHOD eq. 7), the TSA label before
    normalisation.

    Args:
        game: the batch's `TokenGame`.
        region_masks: bool `[B, K, N1]`, the patches of each region (non-empty).
        num_samples: coalition samples per region; `None` enumerates exactly (n ≤ 20 only).
        method, generator, chunk_size, allocation: see `sampled_interactions`.
        stratify_by_patches: with `"stratified"`, strata are the number of patches in S
            rather than |S| (still exact eq. 7, see `coalitions`). Off by default: it has not
            lowered the variance so far.

    Returns:
        An `InteractionEstimate` with values and standard errors `[B, K]`.
    """
    targets = region_targets(region_masks, game.n_players - game.num_patches)
    strata_players = None
    if stratify_by_patches and method == "stratified":
        strata_players = torch.zeros_like(game.players)
        strata_players[:, : game.num_patches] = True
    return game_interactions(
        game, targets, num_samples, method, generator, chunk_size, allocation, strata_players
    )


__all__ = [
    "TOKEN_GAME_MODES",
    "InputTokenGame",
    "LoupeGameModel",
    "MaxPooledTokenGame",
    "MeanPooledTokenGame",
    "TokenGame",
    "region_targets",
    "token_game",
    "token_region_interactions",
]
