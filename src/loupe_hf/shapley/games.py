"""The two LOUPE games (METHOD §3.3-3.4) as batched games for the interaction engine.

- `token_game` — v1, players = patch tokens + word tokens, value = cosine similarity of the
  global image and text embeddings of the kept tokens. Two masking modes: `"feature"` masks the
  final token features before pooling (no encoder pass), `"input"` masks at the encoder input and
  re-encodes (faithful; one encoder pass per distinct image side and per distinct text side).
- `semantic_game` — v2, players = K regions + M phrases, value = fine-grained region-phrase
  similarity of the kept regions and phrases.

Both are dataclasses that are called like any game (`game(masks [B, G, n]) -> [B, G]`) and carry
`n_players`, `batch_shape` and `players` (bool `[B, n]`, False for padding positions, which are
always treated as absent: null players, so they change no Shapley value or interaction).
Convention shared by both: a coalition with no player on one side (no patch or no word; no region
or no phrase) has value 0 — there is nothing to compare.

`region_phrase_interactions` and `token_region_interactions` turn the games into LOUPE's labels.
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ..pooling import masked_max
from .coalitions import MAX_EXACT_PLAYERS
from .estimators import InteractionEstimate, exact_interactions, sampled_interactions
from .protocol import unique_coalitions
from .subset_tables import SoftmaxMaxTables, shifted_logits

TOKEN_GAME_MODES = ("feature", "input")


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


# --- v1: token-level game ----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TokenGame:
    """Token-level game v1 of a batch of image-text pairs (build it with `token_game`).

    Players `0..N1-1` are the patch tokens, players `N1..N1+L-1` the word positions; word
    positions with attention mask 0 are padding (never present).

    Feature mode: with z_p, u_w the individually projected tokens, the embeddings of a coalition
    are (means of) Σ_{p∈S} z_p and Σ_{w∈S} u_w; the cosine ignores the 1/|S| of a mean, so

        v1(S) = x^T C y / sqrt(x^T G_I x · y^T G_T y),   C = Z U^T, G_I = Z Z^T, G_T = U U^T,

    with x, y the coalition's patch and word indicators. The Gram matrices are computed once per
    batch; a coalition then costs O(N1^2 + N1 L) instead of O((N1 + L) P) and no P-wide tensor.

    Attributes:
        mode: `"feature"` or `"input"`.
        num_patches: N1.
        players: bool `[B, N1 + L]`, the real players.
        cross, image_gram, text_gram: feature mode, mean image pooling: C `[B, N1, L]`,
            G_I `[B, N1, N1]`, G_T `[B, L, L]` (padding words zeroed).
        patch_projections, word_projections: feature mode, max image pooling (the model's
            `config.image_pooling == "max"`): Z `[B, N1, P]` and U `[B, L, P]`; a coalition's image
            embedding is the element-wise max of its rows of Z, its text embedding the sum of its
            rows of U. No closed form: each coalition costs O(N1 P).
        model, pixel_values, input_ids, attention_mask: input mode: what is re-encoded.
        encoder_batch_size: input mode: images (or texts) per encoder call.
        image_rows: max image pooling: optional long `[B]`, the row of `patch_projections` and
            `word_projections` that each game reads (see `select_rows`); None: game b reads row b.
    """

    mode: str
    num_patches: int
    players: torch.Tensor
    cross: torch.Tensor | None = None
    image_gram: torch.Tensor | None = None
    text_gram: torch.Tensor | None = None
    patch_projections: torch.Tensor | None = None
    word_projections: torch.Tensor | None = None
    model: LoupeGameModel | None = None
    pixel_values: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    encoder_batch_size: int = 64
    image_rows: torch.Tensor | None = None

    @property
    def n_players(self) -> int:
        return self.players.shape[-1]

    def select_rows(self, index: torch.Tensor) -> TokenGame:
        """The games of the given batch rows (long `[B']`, rows may repeat), e.g. one game per
        target to estimate. With max image pooling the new games share this game's projections
        (indexed through `image_rows`, no copy: many targets of one image read the same cached
        rows); otherwise every per-pair tensor is indexed."""
        if self.patch_projections is not None:
            rows = index if self.image_rows is None else self.image_rows.index_select(0, index)
            return replace(self, players=self.players.index_select(0, index), image_rows=rows)
        batch = self.players.shape[0]
        per_pair = {
            item.name: value.index_select(0, index)
            for item in fields(self)
            if isinstance(value := getattr(self, item.name), torch.Tensor)
            and value.dim() > 0
            and value.shape[0] == batch
        }
        return replace(self, **per_pair)

    def word_projections_per_game(self) -> torch.Tensor:
        """U `[B, L, P]` of each game (max image pooling)."""
        if self.image_rows is None:
            return self.word_projections
        # index_select: indexing with `[self.image_rows]` was 20x slower on this CPU.
        return self.word_projections.index_select(0, self.image_rows)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.players.shape[:-1])

    @torch.no_grad()
    def __call__(self, masks: torch.Tensor) -> torch.Tensor:
        """bool `[B, G, N1 + L]` → v1 values `[B, G]`."""
        image_keep = masks[..., : self.num_patches]
        text_keep = masks[..., self.num_patches :] & self.players[:, None, self.num_patches :]
        if self.patch_projections is not None:
            similarity = self._max_pooled_similarity(image_keep, text_keep)
        elif self.mode == "feature":
            dtype = self.cross.dtype
            x, y = image_keep.to(dtype), text_keep.to(dtype)
            dot = ((x @ self.cross) * y).sum(-1)
            image_norm2 = ((x @ self.image_gram) * x).sum(-1)
            text_norm2 = ((y @ self.text_gram) * y).sum(-1)
            similarity = dot * torch.rsqrt((image_norm2 * text_norm2).clamp_min(1e-30))
        else:
            image = self._encode_per_coalition(image_keep, self._encode_images)
            text = self._encode_per_coalition(text_keep, self._encode_texts)
            similarity = _cosine(image, text)
        return torch.where(image_keep.any(-1) & text_keep.any(-1), similarity, 0.0)

    @torch.no_grad()
    def interaction_summands(
        self, coalitions: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor | None:
        """The summand of eq. 7 for every (sample, target), without the |A| + 2 coalitions.

        The optional fast path of the game protocol (see `protocol.py`); feature mode only
        (returns None in input mode). Every coalition of a summand is S plus some players, and
        x^T G x, x^T C y and y^T G_T y of S plus one player follow from G x_S, C y_S, C^T x_S and
        G_T y_S (one matrix-vector product each), so a summand costs about one coalition.

        Args:
            coalitions: bool `[B or (), N, T, n]`, S per (sample, target).
            targets: bool `[B or (), T, n]`, A per target (disjoint from its S).

        Returns:
            `[B, N, T]`, equal to the summand built from `__call__` values.
        """
        if self.mode != "feature":
            return None
        if self.patch_projections is not None:
            return _max_pooled_summands(self, coalitions, targets)
        return _feature_summands(self, coalitions, targets)

    def _max_pooled_similarity(
        self, image_keep: torch.Tensor, text_keep: torch.Tensor
    ) -> torch.Tensor:
        """Cosine of max-pooled patch and mean-pooled word projections, `[B, G]`."""
        image = masked_max(self.patch_projections, image_keep, token_rows=self.image_rows)
        # The mean's 1/|S| does not change the cosine: sum the kept word projections.
        words = self.word_projections_per_game()
        text = _rows_times(text_keep.to(words.dtype), words)
        return _cosine(image, text)

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


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1) * torch.rsqrt((a.square().sum(-1) * b.square().sum(-1)).clamp_min(1e-30))


def _max_pooled_summands(
    game: TokenGame, coalitions: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """`TokenGame.interaction_summands` for max image pooling. Every coalition of a summand is S plus
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
    text_s = _rows_times(y.to(u.dtype), u)

    def value(image, image_present, text, text_present):
        present = image_present & text_present
        return torch.where(present, _cosine(image.masked_fill(~present[..., None], 0.0), text), 0.0)

    value_s = value(image_s, has_image, text_s, has_text)
    value_a = value(
        torch.maximum(image_s, _max_or_minus_inf(z, x_a, a_image, rows)),
        has_image | a_image,
        text_s + _rows_times(y_a.to(u.dtype), u),
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
        chunk: elements of the `[b, N, T, slots, P]` intermediate per step. 4 MB of float32 stays in
            cache; 32 MB steps took about twice as long on this CPU.
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
            # products took 2.4x as long on this CPU.
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


def _feature_summands(
    game: TokenGame, coalitions: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """`TokenGame.interaction_summands` in feature mode (see the class docstring for C, G, G_T)."""
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
    u = _rows_times(x, image_gram)  # G x_S
    s = _rows_times(y, text_gram)  # G_T y_S
    w = _rows_times(y, cross.transpose(1, 2))  # C y_S
    w_t = _rows_times(x, cross)  # C^T x_S
    q_image, q_text, dot = (u * x).sum(-1), (s * y).sum(-1), (w * x).sum(-1)
    n_image, n_text = x.sum(-1), y.sum(-1)
    value_s = _cosine_from_forms(dot, q_image, q_text, n_image, n_text)
    # S | A: the A-only forms depend on the target alone
    dot_a = dot + (w * x_a).sum(-1) + (w_t * y_a).sum(-1) + (_rows_times(x_a, cross) * y_a).sum(-1)
    q_image_a = q_image + 2 * (u * x_a).sum(-1) + (_rows_times(x_a, image_gram) * x_a).sum(-1)
    q_text_a = q_text + 2 * (s * y_a).sum(-1) + (_rows_times(y_a, text_gram) * y_a).sum(-1)
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


def _rows_times(rows: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
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


@torch.no_grad()
def token_game(
    model: LoupeGameModel,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    mode: str = "feature",
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
        patch_tokens, word_tokens: feature mode: the forward pass's `patch_tokens [B, N1, Dv]` and
            `word_tokens [B, L, Dt]`, to avoid a second forward pass; computed when omitted.
        encoder_batch_size: input mode: coalitions per encoder call.
    """
    if mode not in TOKEN_GAME_MODES:
        raise ValueError(f"unknown token game mode {mode!r}; choose one of {TOKEN_GAME_MODES}")
    word_players = attention_mask.bool()
    if mode == "input":
        num_patches = _num_patches(model, pixel_values, patch_tokens)
        players = _token_players(word_players, num_patches)
        return TokenGame(
            mode,
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
    if getattr(getattr(model, "config", None), "image_pooling", "mean") == "max":
        # Each patch is pooled alone above, and the max of one projected token is that token.
        return TokenGame(
            mode,
            num_patches,
            _token_players(word_players, num_patches),
            patch_projections=patch_projections,
            word_projections=word_projections,
        )
    return TokenGame(
        mode,
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
            rather than |S| (still exact eq. 7, see `coalitions`). Off by default: on the tiny
            model it did not lower the variance (`benchmarks/shapley_estimators.py`).

    Returns:
        An `InteractionEstimate` with values and standard errors `[B, K]`.
    """
    targets = region_targets(region_masks, game.n_players - game.num_patches)
    strata_players = None
    if stratify_by_patches and method == "stratified":
        strata_players = torch.zeros_like(game.players)
        strata_players[:, : game.num_patches] = True
    return _interactions(
        game, targets, num_samples, method, generator, chunk_size, allocation, strata_players
    )


# --- v2: semantics-level game ------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SemanticGame:
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

    @property
    def n_players(self) -> int:
        return self.players.shape[-1]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.players.shape[:-1])

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
    estimate = _interactions(game, targets, num_samples, method, generator, chunk_size, allocation)
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


def _interactions(
    game: TokenGame | SemanticGame,
    targets: torch.Tensor,
    num_samples: int | None,
    method: str,
    generator: torch.Generator | None,
    chunk_size: int | None,
    allocation: torch.Tensor | None = None,
    strata_players: torch.Tensor | None = None,
) -> InteractionEstimate:
    """Exact enumeration when `num_samples` is None, sampling otherwise."""
    n, batch_shape = game.n_players, game.batch_shape
    if num_samples is None:
        if n > MAX_EXACT_PLAYERS:
            raise ValueError(f"exact interactions need n <= {MAX_EXACT_PLAYERS}, the game has {n}")
        values = exact_interactions(
            game, n, targets, batch_shape=batch_shape, chunk_size=chunk_size
        )
        return InteractionEstimate(values, torch.zeros_like(values), 0, 2**n)
    # Padding players are null players: leaving them out of the samples keeps the estimate
    # unbiased and lowers its variance (when there is none, coalitions stay shared by the batch).
    players = None if bool(game.players.all()) else game.players
    return sampled_interactions(
        game,
        n,
        targets,
        num_samples,
        method=method,
        generator=generator,
        batch_shape=batch_shape,
        chunk_size=chunk_size,
        players=players,
        strata_players=strata_players,
        allocation=allocation,
    )
