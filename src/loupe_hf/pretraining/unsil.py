"""UNSIL: uncertainty-aware neural Shapley interaction learning (METHOD §3.5).

(One module over 500 lines: the paper compares three predictor architectures on one shared,
level-independent view of the inputs; they are kept side by side so that they stay comparable.)

Sampled Shapley interactions are the expensive part of LOUPE's labels. A UNSIL predictor is a
small network that predicts, for every target, an interaction Î and an uncertainty
sigma ∈ (0, 1); the hybrid rule of `loupe_hf.pretraining.labels` then samples a label only where
UNSIL is unsure.

Two levels, one predictor each:

- `"token"` (TSA labels): a target is a region R_k of an image. Context: the patch tokens (image
  side) and the word tokens (text side). Output `[B, K]`.
- `"semantic"` (FSA labels): a target is a region-phrase pair (k, j). Context: the K regions
  (image side) and the M phrases (text side). Output `[B, K, M]`, all pairs at once.

Three architectures (the paper's comparison), each for both levels:

- `"mlp_attention"` (default, `UnsilMlpAttention`): the target attends over each side's tokens,
  the two pooled vectors and the target go through two 3-layer MLP heads.
- `"mlp_dot_attention"`: the same with scaled dot-product attention instead of the additive
  (tanh) one, which must materialise a `[B, T, N, H]` tensor; ours, for speed.
- `"conv1d"` (`UnsilConv1d`): the target is fused into every token by a Hadamard product, a strided
  Conv1D and a max-pool summarise each side, two linear heads.
- `"transformer"` (`UnsilTransformer`): one sequence per target, [CLS] + image side + text side,
  with token types marking the target; 3 encoder layers; heads on [CLS].

All of them first project the inputs (whatever their widths) to `hidden_dim` and then see the
same level-independent view (`UnsilContext`): image-side tokens, text-side tokens with a padding
mask, and for every target its membership weights over the tokens of each side.

Gradients: UNSIL learns *from* the encoders' features, it must not train them. Callers pass
detached features (`patch_tokens.detach()`, ...); the module does not detach by itself, so
that its own parameters are trained as usual and tests can check its gradient flow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from ..choices import IMAGE_POOLING_MODES, UNSIL_ARCHITECTURES, UNSIL_LEVELS, check_choice
from ..pooling import masked_max, masked_mean

UnsilLevel = Literal["token", "semantic"]


@dataclass
class UnsilOutput(ModelOutput):
    """Output of a UNSIL predictor.

    Args:
        interaction (`torch.FloatTensor` of shape `(batch_size, num_regions)` at the token level,
            `(batch_size, num_regions, num_phrases)` at the semantic level): predicted Î.
        sigma (`torch.FloatTensor`, same shape): uncertainty sigma in [eps, 1 - eps]. Pairs with a
            padded phrase get Î = 0 and sigma = eps (so the hybrid rule never samples them); they
            still have to be masked out of every loss.
    """

    interaction: torch.FloatTensor | None = None
    sigma: torch.FloatTensor | None = None


@dataclass(frozen=True)
class UnsilContext:
    """The level-independent inputs every architecture works on (all widths = `hidden_dim`).

    Attributes:
        image_tokens: `[B, NI, H]` image-side tokens (patches, or regions); padding zeroed.
        image_mask: bool `[B, NI]`, True = real token.
        text_tokens: `[B, NT, H]` text-side tokens (words, or phrases); padding zeroed.
        text_mask: bool `[B, NT]`, True = real token.
        image_targets: `[B, T, NI]` weight of each image-side token in target t (a soft region
            mask, or one-hot on the target region).
        text_targets: `[B, T, NT]` the same for the text side (one-hot on the target phrase), or
            None at the token level, where a target has no text part.
        target_valid: bool `[B, T]`, False for targets that involve padding (or None: all real).
        target_shape: shape of the outputs, `(B, K)` or `(B, K, M)`, with T = K or K·M.
        target_features: `[B, T, H]` a precomputed h per target (token level, max region pooling),
            or None: h is derived from the tokens and `image_targets`.
    """

    image_tokens: torch.Tensor
    image_mask: torch.Tensor
    text_tokens: torch.Tensor
    text_mask: torch.Tensor
    image_targets: torch.Tensor
    text_targets: torch.Tensor | None
    target_valid: torch.Tensor | None
    target_shape: tuple[int, ...]
    target_features: torch.Tensor | None = None


# --- shared pieces ------------------------------------------------------------------------------


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to `mask`; a row with no True entry gives all zeros.

    (Filling with -inf would make such a row NaN; the finite minimum plus the final multiply
    gives exact zeros for masked entries and for empty rows alike.)
    """
    logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    return torch.softmax(logits, dim=-1) * mask


def mlp(in_dim: int, hidden_dim: int, num_layers: int) -> nn.Sequential:
    """`num_layers` linear layers with GELU in between, ending in one output unit."""
    layers: list[nn.Module] = []
    for _ in range(num_layers - 1):
        layers += [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        in_dim = hidden_dim
    layers.append(nn.Linear(in_dim, 1))
    return nn.Sequential(*layers)


class TokenProjection(nn.Sequential):
    """Linear map to the shared width, then LayerNorm: encoder features come at any width and
    scale (raw hidden states, or L2-normalised embeddings), the predictor wants one of each."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim))


# --- base class ---------------------------------------------------------------------------------


class UnsilPredictor(nn.Module):
    """Base of the UNSIL predictors: input projections, the two levels, the sigma squashing.

    Subclasses implement `predict(context, targets)`, which maps the level-independent view to
    an interaction and a sigma logit per target.

    Args:
        level: `"token"` (targets = regions) or `"semantic"` (targets = region-phrase pairs).
        image_dim: width of the image-side inputs (Dv of patch tokens, or D of region embeddings).
        text_dim: width of the text-side inputs (Dt of word tokens, or D of phrase embeddings).
        hidden_dim: the predictor's width.
        eps: sigma is clamped to [eps, 1 - eps], which bounds the 1/sigma of the UNSIL loss.
        region_pooling: token level: h is the `"mean"` of the region's projected patch tokens (the
            paper's avg-pool of R), or the projection of the element-wise `"max"` of its patch
            tokens (for a model with `image_pooling="max"`, whose game it predicts better).
    """

    # Whether `predict` consumes a target vector h. The Transformer marks its target with token
    # types instead, and would leave the pair-fusion layer without gradient.
    uses_target_vector = True

    def __init__(
        self,
        level: UnsilLevel,
        image_dim: int,
        text_dim: int,
        hidden_dim: int = 128,
        eps: float = 1e-4,
        region_pooling: str = "mean",
    ):
        super().__init__()
        check_choice("UNSIL level", level, UNSIL_LEVELS)
        check_choice("UNSIL region_pooling", region_pooling, IMAGE_POOLING_MODES)
        self.region_pooling = region_pooling
        if not 0 < eps < 0.5:
            raise ValueError(f"eps must be in (0, 0.5), got {eps}")
        self.level = level
        self.hidden_dim = hidden_dim
        self.eps = eps
        self.image_projection = TokenProjection(image_dim, hidden_dim)
        self.text_projection = TokenProjection(text_dim, hidden_dim)
        if level == "semantic" and self.uses_target_vector:
            # h_kj from [h_k, h_j, h_k ⊙ h_j]: the product term lets even linear layers see
            # how well region and phrase agree.
            self.pair_fusion = nn.Sequential(nn.Linear(3 * hidden_dim, hidden_dim), nn.GELU())

    def forward(
        self,
        patch_tokens: torch.Tensor | None = None,
        word_tokens: torch.Tensor | None = None,
        word_mask: torch.Tensor | None = None,
        region_masks: torch.Tensor | None = None,
        region_embeds: torch.Tensor | None = None,
        phrase_embeds: torch.Tensor | None = None,
        phrase_mask: torch.Tensor | None = None,
    ) -> UnsilOutput:
        """Predicts Î and sigma for every target. Pass *detached* features (module docstring).

        Token level (`patch_tokens`, `word_tokens`, `region_masks` required):
            patch_tokens: `[B, N1, Dv]`.
            word_tokens: `[B, L, Dt]`.
            word_mask: `[B, L]`, 1 = real token (default: all real).
            region_masks: `[B, K, N1]`, float weights in [0, 1] or bool: the patches of each region.
            → interaction, sigma `[B, K]`.

        Semantic level (`region_embeds`, `phrase_embeds` required):
            region_embeds: `[B, K, D_image]`.
            phrase_embeds: `[B, M, D_text]`.
            phrase_mask: `[B, M]`, 1 = real phrase (default: all real).
            → interaction, sigma `[B, K, M]`.
        """
        if self.level == "token":
            _check_inputs(
                "token",
                required={"patch_tokens": patch_tokens, "word_tokens": word_tokens,
                          "region_masks": region_masks},
                forbidden={"region_embeds": region_embeds, "phrase_embeds": phrase_embeds,
                           "phrase_mask": phrase_mask},
            )  # fmt: skip
            context = self.token_context(patch_tokens, word_tokens, word_mask, region_masks)
        else:
            _check_inputs(
                "semantic",
                required={"region_embeds": region_embeds, "phrase_embeds": phrase_embeds},
                forbidden={"patch_tokens": patch_tokens, "word_tokens": word_tokens,
                           "word_mask": word_mask, "region_masks": region_masks},
            )  # fmt: skip
            context = self.semantic_context(region_embeds, phrase_embeds, phrase_mask)
        targets = self.target_vectors(context) if self.uses_target_vector else None
        interaction, sigma_logit = self.predict(context, targets)
        sigma = torch.sigmoid(sigma_logit).clamp(self.eps, 1 - self.eps)
        if context.target_valid is not None:
            interaction = interaction.masked_fill(~context.target_valid, 0.0)
            sigma = sigma.masked_fill(~context.target_valid, self.eps)
        return UnsilOutput(
            interaction=interaction.reshape(context.target_shape),
            sigma=sigma.reshape(context.target_shape),
        )

    def predict(
        self, context: UnsilContext, targets: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`context`, target vectors `[B, T, H]` (None unless `uses_target_vector`) →
        interaction `[B, T]` and sigma logit `[B, T]`."""
        raise NotImplementedError

    # -- the two levels ---------------------------------------------------------------------------

    def token_context(
        self,
        patch_tokens: torch.Tensor,
        word_tokens: torch.Tensor,
        word_mask: torch.Tensor | None,
        region_masks: torch.Tensor,
    ) -> UnsilContext:
        """Token level: image side = patches (never padded), text side = words, targets =
        regions."""
        batch, num_patches, _ = patch_tokens.shape
        word_mask = _mask_or_all_real(word_mask, word_tokens)
        if region_masks.shape[0] != batch or region_masks.shape[-1] != num_patches:
            raise ValueError(
                f"region_masks of shape {tuple(region_masks.shape)} do not match patch_tokens of "
                f"shape {tuple(patch_tokens.shape)}; expected [B, K, N1]"
            )
        image_tokens = self.image_projection(patch_tokens)
        target_features = None
        if self.region_pooling == "max" and self.uses_target_vector:
            # Max of the (detached) input tokens, then the projection: the max needs no autograd
            # (see `masked_max`), so h costs [B, K, Dv] instead of a [B, K, N1, H] intermediate.
            target_features = self.image_projection(masked_max(patch_tokens, region_masks))
        return UnsilContext(
            image_tokens=image_tokens,
            image_mask=torch.ones(batch, num_patches, dtype=torch.bool, device=image_tokens.device),
            text_tokens=self._project_text(word_tokens, word_mask),
            text_mask=word_mask,
            target_features=target_features,
            image_targets=region_masks.to(image_tokens.dtype),
            text_targets=None,
            target_valid=None,
            target_shape=tuple(region_masks.shape[:2]),
        )

    def semantic_context(
        self,
        region_embeds: torch.Tensor,
        phrase_embeds: torch.Tensor,
        phrase_mask: torch.Tensor | None,
    ) -> UnsilContext:
        """Semantic level: image side = regions, text side = phrases, targets = all K·M pairs,
        flattened region-major (t = k·M + j)."""
        batch, num_regions, _ = region_embeds.shape
        num_phrases = phrase_embeds.shape[1]
        phrase_mask = _mask_or_all_real(phrase_mask, phrase_embeds)
        image_tokens = self.image_projection(region_embeds)
        device, dtype = image_tokens.device, image_tokens.dtype
        # Target (k, j) is one-hot on region k and on phrase j.
        image_targets = torch.eye(num_regions, device=device, dtype=dtype).repeat_interleave(
            num_phrases, dim=0
        )
        text_targets = torch.eye(num_phrases, device=device, dtype=dtype).repeat(num_regions, 1)
        return UnsilContext(
            image_tokens=image_tokens,
            image_mask=torch.ones(batch, num_regions, dtype=torch.bool, device=device),
            text_tokens=self._project_text(phrase_embeds, phrase_mask),
            text_mask=phrase_mask,
            image_targets=image_targets.expand(batch, -1, -1),
            text_targets=text_targets.expand(batch, -1, -1),
            target_valid=phrase_mask[:, None, :].expand(-1, num_regions, -1).reshape(batch, -1),
            target_shape=(batch, num_regions, num_phrases),
        )

    def _project_text(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Projects the text side with its padding zeroed before and after: before, so that
        whatever sits there (even NaN) cannot reach the projection's gradient (0 · NaN = NaN);
        after, so that padding is an exact zero vector for every architecture."""
        return _zero_padding(self.text_projection(_zero_padding(tokens, mask)), mask)

    def target_vectors(self, context: UnsilContext) -> torch.Tensor:
        """h per target `[B, T, H]`: the region's mean (the paper's avg-pool of R) or max patch
        token (token level, `region_pooling`), or the fused region-phrase pair (semantic level)."""
        if context.target_features is not None:
            return context.target_features
        if context.text_targets is None:
            return masked_mean(context.image_tokens, context.image_targets)
        batch, num_regions, num_phrases = context.target_shape
        regions = context.image_tokens[:, :, None, :].expand(-1, -1, num_phrases, -1)
        phrases = context.text_tokens[:, None, :, :].expand(-1, num_regions, -1, -1)
        pairs = torch.cat([regions, phrases, regions * phrases], dim=-1)
        return self.pair_fusion(pairs).reshape(batch, num_regions * num_phrases, -1)


# --- MLP + attention ----------------------------------------------------------------------------


class AttentionPooling(nn.Module):
    """Additive attention of each target over a set of tokens (Bahdanau style, as in the paper):
    e_tn = w3ᵀ tanh(W4 h_t + W5 x_n), alpha_t = masked softmax_n(e_t), output Σ_n alpha_tn x_n.

    Attention pooling is a weighted sum, so it is invariant to the order of the tokens.
    """

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.target_proj = nn.Linear(hidden_dim, hidden_dim, bias=False)  # W4 (W5 has the bias)
        self.token_proj = nn.Linear(hidden_dim, hidden_dim)  # W5
        self.score = nn.Linear(hidden_dim, 1, bias=False)  # w3 (a bias cancels in the softmax)

    def forward(
        self, targets: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """`[B, T, H]`, `[B, N, H]`, bool `[B, N]` → pooled `[B, T, H]`."""
        hidden = self.target_proj(targets)[:, :, None, :] + self.token_proj(tokens)[:, None, :, :]
        scores = self.score(torch.tanh(hidden)).squeeze(-1)  # [B, T, N]
        weights = masked_softmax(scores, mask[:, None, :])
        return weights @ tokens


class DotProductAttentionPooling(nn.Module):
    """Scaled dot-product attention of each target over a set of tokens:
    e_tn = (Wq h_t)ᵀ (Wk x_n) / √H, alpha_t = masked softmax_n(e_t), output Σ_n alpha_tn x_n.

    The cheap alternative to `AttentionPooling`: its scores need `[B, T, N]` memory, not the
    `[B, T, N, H]` that additive attention must materialise before its tanh.
    """

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.target_proj = nn.Linear(hidden_dim, hidden_dim, bias=False)  # Wq
        self.token_proj = nn.Linear(hidden_dim, hidden_dim)  # Wk
        self.scale = hidden_dim**-0.5

    def forward(
        self, targets: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """`[B, T, H]`, `[B, N, H]`, bool `[B, N]` → pooled `[B, T, H]`."""
        queries = self.target_proj(targets)
        if targets.shape[1] < tokens.shape[1]:
            # (Wq h)·(Wk x + b) = ((Wq h) Wk)·x + (Wq h)·b: with fewer targets than tokens (regions
            # over patches), mapping the queries through Wk costs less than projecting every token.
            keys = self.token_proj
            scores = (queries @ keys.weight) @ tokens.transpose(1, 2) + (queries @ keys.bias)[
                ..., None
            ]
        else:
            scores = queries @ self.token_proj(tokens).transpose(1, 2)  # [B, T, N]
        weights = masked_softmax(scores * self.scale, mask[:, None, :])
        return weights @ tokens


ATTENTION_POOLING: dict[str, type[nn.Module]] = {
    "additive": AttentionPooling,
    "dot": DotProductAttentionPooling,
}


class UnsilMlpAttention(UnsilPredictor):
    """MLP + Attention (the paper's default): e^I = attention of h over the image side, e^T over
    the text side; [e^I, e^T, h] → two 3-layer MLP heads (Î; sigma logit).

    Args (besides `UnsilPredictor`'s):
        head_layers: linear layers per head (3 in the paper).
        attention: `"additive"` (the paper's tanh attention, `AttentionPooling`) or `"dot"`
            (`DotProductAttentionPooling`, the `"mlp_dot_attention"` architecture).
    """

    def __init__(
        self,
        level: UnsilLevel,
        image_dim: int,
        text_dim: int,
        hidden_dim: int = 128,
        *,
        head_layers: int = 3,
        attention: str = "additive",
        eps: float = 1e-4,
        region_pooling: str = "mean",
    ):
        super().__init__(level, image_dim, text_dim, hidden_dim, eps, region_pooling)
        check_choice("UNSIL attention", attention, tuple(ATTENTION_POOLING))
        self.image_attention = ATTENTION_POOLING[attention](hidden_dim)
        self.text_attention = ATTENTION_POOLING[attention](hidden_dim)
        self.interaction_head = mlp(3 * hidden_dim, hidden_dim, head_layers)
        self.sigma_head = mlp(3 * hidden_dim, hidden_dim, head_layers)

    def predict(
        self, context: UnsilContext, targets: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.image_attention(targets, context.image_tokens, context.image_mask)
        text = self.text_attention(targets, context.text_tokens, context.text_mask)
        features = torch.cat([image, text, targets], dim=-1)
        return self.interaction_head(features).squeeze(-1), self.sigma_head(features).squeeze(-1)


# --- Conv1D -------------------------------------------------------------------------------------


class FusionConv(nn.Module):
    """One side of the Conv1D predictor: F = (W1 h 1ᵀ) ⊙ (W2 X), a strided Conv1D over the token
    positions, then a max-pool over the output positions that see at least one real token.

    Padded tokens are zeroed before the convolution and windows made only of padding are left
    out of the max, so neither the values nor the amount of padding change the result.
    """

    def __init__(self, hidden_dim: int, kernel_size: int = 4, stride: int = 2):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride
        self.target_proj = nn.Linear(hidden_dim, hidden_dim)  # W1
        self.token_proj = nn.Linear(hidden_dim, hidden_dim)  # W2
        self.conv = nn.Conv1d(hidden_dim, hidden_dim, kernel_size, stride)

    def forward(
        self, targets: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """`[B, T, H]`, `[B, N, H]`, bool `[B, N]` → `[B, T, H]`."""
        batch, num_targets, hidden = targets.shape
        fused = self.target_proj(targets)[:, :, None, :] * self.token_proj(tokens)[:, None, :, :]
        fused = fused.masked_fill(~mask[:, None, :, None], 0.0)  # [B, T, N, H]
        fused, mask = self._pad(fused, mask)
        out = self.conv(fused.reshape(batch * num_targets, -1, hidden).transpose(1, 2))
        # An output position is real if its window holds a real token.
        real = F.max_pool1d(mask[:, None, :].float(), self.kernel_size, self.stride) > 0  # [B,1,P]
        out = out.reshape(batch, num_targets, hidden, -1)
        out = out.masked_fill(~real[:, :, None, :], torch.finfo(out.dtype).min).amax(-1)
        return out.masked_fill(~real.any(-1)[:, :, None], 0.0)  # no real token at all → 0

    def _pad(self, fused: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pads kernel_size - 1 zero positions: every stride-aligned start up to the last
        token then has a full window, so short sequences get one, an odd last token is not
        dropped by the stride, and extra padding adds only windows without a real token."""
        missing = self.kernel_size - 1
        return F.pad(fused, (0, 0, 0, missing)), F.pad(mask, (0, missing), value=False)


class UnsilConv1d(UnsilPredictor):
    """Conv1D: f^I, f^T from `FusionConv` on each side; [f^I, f^T, h] → two linear heads.

    Args (besides `UnsilPredictor`'s):
        kernel_size / stride: of the Conv1D (4 / 2 in the paper).
    """

    def __init__(
        self,
        level: UnsilLevel,
        image_dim: int,
        text_dim: int,
        hidden_dim: int = 128,
        *,
        kernel_size: int = 4,
        stride: int = 2,
        eps: float = 1e-4,
        region_pooling: str = "mean",
    ):
        super().__init__(level, image_dim, text_dim, hidden_dim, eps, region_pooling)
        self.image_conv = FusionConv(hidden_dim, kernel_size, stride)
        self.text_conv = FusionConv(hidden_dim, kernel_size, stride)
        self.interaction_head = nn.Linear(3 * hidden_dim, 1)
        self.sigma_head = nn.Linear(3 * hidden_dim, 1)

    def predict(
        self, context: UnsilContext, targets: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.image_conv(targets, context.image_tokens, context.image_mask)
        text = self.text_conv(targets, context.text_tokens, context.text_mask)
        features = torch.cat([image, text, targets], dim=-1)
        return self.interaction_head(features).squeeze(-1), self.sigma_head(features).squeeze(-1)


# --- Transformer --------------------------------------------------------------------------------

TEXT, IMAGE_CONTEXT, IMAGE_TARGET, TEXT_TARGET = range(4)


class UnsilTransformer(UnsilPredictor):
    """3-layer Transformer: one sequence per target, [CLS] + image side + text side, with learned
    position embeddings (one table per side, so text positions do not depend on the number of
    image tokens) and token-type embeddings: text, context image token, target image token, and
    at the semantic level also target text token (the target phrase). A soft region mask mixes
    the context and target types by its weight. The [CLS] output feeds two MLP heads.

    Targets are folded into the batch (B·T sequences): the expensive variant, by design.

    Args (besides `UnsilPredictor`'s):
        num_layers / num_heads: encoder depth and attention heads (3 / 4).
        ffn_dim: feed-forward width (default 2 · hidden_dim).
        dropout: inside the encoder layers.
        max_image_tokens / max_text_tokens: sizes of the position tables.
    """

    uses_target_vector = False

    def __init__(
        self,
        level: UnsilLevel,
        image_dim: int,
        text_dim: int,
        hidden_dim: int = 128,
        *,
        num_layers: int = 3,
        num_heads: int = 4,
        ffn_dim: int | None = None,
        dropout: float = 0.0,
        max_image_tokens: int = 1024,
        max_text_tokens: int = 128,
        eps: float = 1e-4,
        region_pooling: str = "mean",
    ):
        super().__init__(level, image_dim, text_dim, hidden_dim, eps, region_pooling)
        self.cls_token = nn.Parameter(torch.randn(hidden_dim) * 0.02)
        self.image_positions = nn.Embedding(max_image_tokens, hidden_dim)
        self.text_positions = nn.Embedding(max_text_tokens, hidden_dim)
        # Only the semantic level has a target phrase; an unused row would get no gradient.
        self.token_types = nn.Embedding(4 if level == "semantic" else 3, hidden_dim)
        layer = nn.TransformerEncoderLayer(
            hidden_dim,
            num_heads,
            ffn_dim or 2 * hidden_dim,
            dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(
            layer, num_layers, norm=nn.LayerNorm(hidden_dim), enable_nested_tensor=False
        )
        self.interaction_head = mlp(hidden_dim, hidden_dim, 2)
        self.sigma_head = mlp(hidden_dim, hidden_dim, 2)

    def predict(
        self, context: UnsilContext, targets: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, num_targets, _ = context.image_targets.shape
        sequence = torch.cat(
            [
                self.cls_token.expand(batch, num_targets, 1, -1),
                self._image_side(context),
                self._text_side(context),
            ],
            dim=2,
        ).flatten(0, 1)  # [B·T, 1 + NI + NT, H]
        padding = torch.cat(
            [
                torch.zeros_like(context.image_mask[:, :1]),
                ~context.image_mask,
                ~context.text_mask,
            ],
            dim=1,
        ).repeat_interleave(num_targets, dim=0)  # True = ignore; [CLS] is never padding
        cls = self.encoder(sequence, src_key_padding_mask=padding)[:, 0]
        cls = cls.reshape(batch, num_targets, -1)
        return self.interaction_head(cls).squeeze(-1), self.sigma_head(cls).squeeze(-1)

    def _image_side(self, context: UnsilContext) -> torch.Tensor:
        """`[B, T, NI, H]`: tokens + positions + (context type, moved towards the target type by
        each token's membership weight in the target)."""
        tokens = context.image_tokens + self._positions(self.image_positions, context.image_tokens)
        types = self.token_types.weight
        weight = context.image_targets[..., None]
        typed = types[IMAGE_CONTEXT] + weight * (types[IMAGE_TARGET] - types[IMAGE_CONTEXT])
        return tokens[:, None] + typed

    def _text_side(self, context: UnsilContext) -> torch.Tensor:
        """`[B, T, NT, H]`, like `_image_side`; at the token level every word has the text type."""
        tokens = context.text_tokens + self._positions(self.text_positions, context.text_tokens)
        types = self.token_types.weight
        num_targets = context.image_targets.shape[1]
        if context.text_targets is None:
            return (tokens + types[TEXT])[:, None].expand(-1, num_targets, -1, -1)
        weight = context.text_targets[..., None]
        return tokens[:, None] + types[TEXT] + weight * (types[TEXT_TARGET] - types[TEXT])

    @staticmethod
    def _positions(table: nn.Embedding, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        if length > table.num_embeddings:
            raise ValueError(
                f"{length} tokens on one side exceed the {table.num_embeddings} position "
                "embeddings of the UNSIL transformer (raise max_image_tokens / max_text_tokens)"
            )
        return table(torch.arange(length, device=tokens.device))


# --- factory ------------------------------------------------------------------------------------

UNSIL_CLASSES: dict[str, type[UnsilPredictor]] = {
    "mlp_attention": UnsilMlpAttention,
    "mlp_dot_attention": UnsilMlpAttention,
    "conv1d": UnsilConv1d,
    "transformer": UnsilTransformer,
}
# Architectures that are another one with a fixed option.
UNSIL_VARIANT_OPTIONS: dict[str, dict[str, str]] = {"mlp_dot_attention": {"attention": "dot"}}


def build_unsil(
    architecture: str,
    level: UnsilLevel,
    image_dim: int,
    text_dim: int,
    hidden_dim: int = 128,
    **kwargs,
) -> UnsilPredictor:
    """Builds a UNSIL predictor by name (`LoupeConfig.unsil_architecture`).

    Args:
        architecture: `"mlp_attention"`, `"mlp_dot_attention"` (the same with scaled dot-product
            attention), `"conv1d"` or `"transformer"`.
        level: `"token"` or `"semantic"`.
        image_dim / text_dim / hidden_dim: see `UnsilPredictor`.
        **kwargs: architecture-specific options (e.g. `num_layers` for the transformer).

    Raises:
        ValueError: naming an unknown architecture or level.
    """
    check_choice("UNSIL architecture", architecture, UNSIL_ARCHITECTURES)
    check_choice("UNSIL level", level, UNSIL_LEVELS)
    options = {**UNSIL_VARIANT_OPTIONS.get(architecture, {}), **kwargs}
    return UNSIL_CLASSES[architecture](level, image_dim, text_dim, hidden_dim, **options)


# --- input checks -------------------------------------------------------------------------------


def _check_inputs(
    level: str, required: dict[str, torch.Tensor | None], forbidden: dict[str, torch.Tensor | None]
) -> None:
    missing = [name for name, value in required.items() if value is None]
    extra = [name for name, value in forbidden.items() if value is not None]
    if missing or extra:
        raise ValueError(
            f"a {level}-level UNSIL needs {sorted(required)}; missing {missing}, "
            f"not applicable {extra}"
        )


def _mask_or_all_real(mask: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    """A padding mask as bool `[B, N]` (1 = real); None means no padding."""
    if mask is None:
        return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    if mask.shape != tokens.shape[:2]:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not match tokens of shape "
            f"{tuple(tokens.shape)}; expected [B, N]"
        )
    return mask.bool()


def _zero_padding(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`[B, N, D]` tokens with the rows where `mask` `[B, N]` is False set to zero."""
    return tokens.masked_fill(~mask[..., None], 0.0)


__all__ = [
    "UNSIL_ARCHITECTURES",
    "UNSIL_LEVELS",
    "DotProductAttentionPooling",
    "UnsilContext",
    "UnsilConv1d",
    "UnsilMlpAttention",
    "UnsilOutput",
    "UnsilPredictor",
    "UnsilTransformer",
    "build_unsil",
]
