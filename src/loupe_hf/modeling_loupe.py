"""LOUPE: a Swin + BERT dual encoder with a region generation module (Li et al., NeurIPS 2022).

One file for the model, as transformers lays out its models (outputs, building blocks, the
pre-trained base, the public models), and because `trust_remote_code` checkpoints carry this file:
its size is the towers, the region head and the two public models, nothing else.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import SafetensorError
from timm.models.swin_transformer import SwinTransformer, WindowAttention
from torch import nn
from transformers import BertModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .boxes import (
    clip_boxes_to_image,
    fuse_confident_candidates,
    grid_centres,
    hard_box_masks,
    logits_near,
    select_regions,
    soft_box_masks,
)
from .configuration_loupe import LoupeConfig, LoupeVisionConfig
from .losses import cmc_loss
from .pooling import masked_max, masked_mean
from .zero_shot import detect as detect_zero_shot
from .zero_shot import ground as ground_zero_shot


@dataclass
class LoupeRegionOutput(ModelOutput):
    """Region proposals of the region generation module.

    Args:
        boxes (`torch.FloatTensor` of shape `(batch_size, num_regions, 4)`): top-K boxes, normalised (cx, cy, w, h).
        scores (`torch.FloatTensor` of shape `(batch_size, num_regions)`): their confidences c(R) in (0, 1).
        indices (`torch.LongTensor` of shape `(batch_size, num_regions)`): the patch each box is centred on.
        candidate_boxes (`torch.FloatTensor` of shape `(batch_size, num_patches, 4)`): one box per patch.
        candidate_logits (`torch.FloatTensor` of shape `(batch_size, num_patches)`): confidence logits per patch.
    """

    boxes: torch.FloatTensor | None = None
    scores: torch.FloatTensor | None = None
    indices: torch.LongTensor | None = None
    candidate_boxes: torch.FloatTensor | None = None
    candidate_logits: torch.FloatTensor | None = None


@dataclass
class LoupeOutput(ModelOutput):
    """Output of [`LoupeModel`].

    Args:
        loss (`torch.FloatTensor` of shape `(1,)`, *optional*, returned when `return_loss=True`):
            the contrastive (CMC) loss of the batch on one process.
        logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`): scaled cosine
            similarities of image and text embeddings.
        logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`): the transpose.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`): L2-normalised f_I.
        text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`): L2-normalised f_T.
        patch_tokens (`torch.FloatTensor` of shape `(batch_size, num_patches, vision_hidden_size)`): the image
            tokens X_I on the dense grid, row-major.
        word_tokens (`torch.FloatTensor` of shape `(batch_size, sequence_length, text_hidden_size)`): X_T.
        region_boxes (`torch.FloatTensor` of shape `(batch_size, num_regions, 4)`): normalised (cx, cy, w, h),
            on the token grid (centred on cells; [`LoupeModel.grid_to_image`] places them on the image).
        region_scores (`torch.FloatTensor` of shape `(batch_size, num_regions)`): confidences c(R_k).
        region_indices (`torch.LongTensor` of shape `(batch_size, num_regions)`): patch index of each region.
        region_embeds (`torch.FloatTensor` of shape `(batch_size, num_regions, projection_dim)`): L2-normalised
            h_k^I, pooled with the soft box mask.
        candidate_boxes (`torch.FloatTensor` of shape `(batch_size, num_patches, 4)`): every patch's box.
        candidate_logits (`torch.FloatTensor` of shape `(batch_size, num_patches)`): every patch's confidence logit.
        phrase_embeds (`torch.FloatTensor` of shape `(batch_size, num_phrases, projection_dim)`, *optional*):
            L2-normalised h_j^T, returned when `phrase_masks` is given.
        vision_model_output (`BaseModelOutputWithPooling`): the image tower's output: `last_hidden_state`
            (the dense patch tokens), `pooler_output` (their mean, before projection), and `hidden_states`
            / `attentions` when asked for (see [`LoupeVisionTower`]).
        text_model_output (`BaseModelOutputWithPooling`): the text tower's output: `last_hidden_state`
            (the word tokens), `pooler_output` (the pooled text feature before projection), and BERT's
            `hidden_states` / `attentions` when asked for.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    patch_tokens: torch.FloatTensor | None = None
    word_tokens: torch.FloatTensor | None = None
    region_boxes: torch.FloatTensor | None = None
    region_scores: torch.FloatTensor | None = None
    region_indices: torch.LongTensor | None = None
    region_embeds: torch.FloatTensor | None = None
    candidate_boxes: torch.FloatTensor | None = None
    candidate_logits: torch.FloatTensor | None = None
    phrase_embeds: torch.FloatTensor | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None
    text_model_output: BaseModelOutputWithPooling | None = None


@dataclass
class LoupeObjectDetectionOutput(ModelOutput):
    """Output of [`LoupeForZeroShotDetection`].

    Args:
        logits (`torch.FloatTensor` of shape `(batch_size, num_regions, num_queries)`, `num_regions` being
            `config.detection_num_regions` when set): scaled cosine
            similarity of every region embedding with every text query (the class score).
        pred_boxes (`torch.FloatTensor` of shape `(batch_size, num_regions, 4)`): normalised (cx, cy, w, h).
        objectness (`torch.FloatTensor` of shape `(batch_size, num_regions)`): region confidences c(R).
        region_embeds (`torch.FloatTensor` of shape `(batch_size, num_regions, projection_dim)`).
        text_embeds (`torch.FloatTensor` of shape `(batch_size, num_queries, projection_dim)`).
        image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`).
        vision_model_output / text_model_output (`BaseModelOutputWithPooling`): the towers' outputs, as in
            [`LoupeOutput`] (the text one for the queries as scored, prompt template included).
    """

    logits: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    objectness: torch.FloatTensor | None = None
    region_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None
    text_model_output: BaseModelOutputWithPooling | None = None


class LoupeVisionTower(nn.Module):
    """timm Swin image encoder that returns LOUPE's patch tokens on the dense grid.

    The forward pass walks the Swin stages itself so that patch embeddings can be zeroed at the input
    (the `input` mode of the token-level game) and so that an earlier, finer stage can carry the tokens
    (`dense_stage`, see [`LoupeVisionConfig`]).
    """

    def __init__(self, config: LoupeVisionConfig):
        super().__init__()
        self.config = config
        self.swin = build_swin(config)
        self.grid_size = config.dense_grid_size
        self.dense_stage = config.dense_stage % config.num_stages
        self.is_fused = self.dense_stage != config.num_stages - 1
        if self.is_fused:
            stage_width = config.embed_dim * 2**self.dense_stage
            self.lateral_norm = nn.LayerNorm(stage_width)
            self.lateral = nn.Linear(stage_width, config.hidden_size)

    # A patch embedding (a convolution as wide as its stride) and 2x2 patch merging centre every
    # token on its cell.
    token_centre_offset = (0.0, 0.0)

    def forward(
        self,
        pixel_values: torch.Tensor,
        patch_keep_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutput:
        """`[B, 3, H, W]` → `last_hidden_state`: patch tokens `[B, grid_size**2, hidden_size]` (row-major).

        `patch_keep_mask` (`[B, grid_size**2]`) zeroes, at the input, the patch embeddings that fall in
        each dropped dense-grid cell. `hidden_states` (when asked for) are the patch embedding and each
        stage's output, `[B, tokens, width]`, as in transformers' Swin; `attentions` are each block's
        window attention probabilities, `[B * num_windows, num_heads, window_area, window_area]`.
        """
        x = self.swin.patch_embed(pixel_values)  # [B, H0, W0, C0], channels last
        if patch_keep_mask is not None:
            x = x * self._input_keep_mask(patch_keep_mask, x.shape[1]).to(x.dtype)
        hidden_states = [x.flatten(1, 2)] if output_hidden_states else None
        dense = None
        with record_window_attentions(self.swin, output_attentions) as attentions:
            for index, stage in enumerate(self.swin.layers):
                x = stage(x)
                if hidden_states is not None:
                    hidden_states.append(x.flatten(1, 2))
                if index == self.dense_stage and self.is_fused:
                    dense = self.lateral(self.lateral_norm(x))
        x = self.swin.norm(x)
        if dense is not None:
            factor = dense.shape[1] // x.shape[1]
            batch, rows, cols, width = x.shape
            # Each coarse token over its factor x factor fine cells, in one copy.
            upsampled = x[:, :, None, :, None].expand(batch, rows, factor, cols, factor, width)
            x = dense + upsampled.reshape(dense.shape)
        return BaseModelOutput(
            last_hidden_state=x.flatten(1, 2),
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
            attentions=tuple(attentions) if output_attentions else None,
        )

    def _input_keep_mask(self, patch_keep_mask: torch.Tensor, input_grid: int) -> torch.Tensor:
        """`[B, input_grid, input_grid, 1]`: the mask over the patch embeddings, channels last."""
        return keep_mask_on_grid(patch_keep_mask, self.grid_size, input_grid).unsqueeze(-1)


def keep_mask_on_grid(
    patch_keep_mask: torch.Tensor, grid_size: int, size: int, batch_size: int | None = None
) -> torch.Tensor:
    """A dense-grid keep mask `[B, grid_size**2]` spread over a finer `size x size` grid: `[B, size, size]`."""
    expected = (batch_size or patch_keep_mask.shape[0], grid_size**2)
    if tuple(patch_keep_mask.shape) != expected:
        raise ValueError(
            f"patch_keep_mask must have shape {expected}, got {tuple(patch_keep_mask.shape)}"
        )
    factor = size // grid_size
    mask = patch_keep_mask.reshape(-1, grid_size, grid_size)
    return mask.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)


class LoupeConvolutionalTower(nn.Module):
    """timm convolutional network that returns LOUPE's patch tokens on the dense grid.

    Its feature maps at reductions `patch_size * 2**stage` play the Swin's stages: the dense stage's map
    and the last stage's map are each normalised and projected to `hidden_size`, and added with the
    last one upsampled, so every token also sees the whole image, as in the fused Swin tower.
    """

    def __init__(self, config: LoupeVisionConfig):
        super().__init__()
        self.config = config
        self.grid_size = config.dense_grid_size
        stages = sorted({config.dense_stage % config.num_stages, config.num_stages - 1})
        reductions = [config.patch_size * 2**stage for stage in stages]
        self.backbone = build_convolutional_backbone(config, reductions)
        channels = self.backbone.feature_info.channels()
        self.norms = nn.ModuleList(nn.LayerNorm(width) for width in channels)
        self.projections = nn.ModuleList(nn.Linear(width, config.hidden_size) for width in channels)

    def forward(
        self,
        pixel_values: torch.Tensor,
        patch_keep_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutput:
        """`[B, 3, H, W]` → `last_hidden_state`: patch tokens `[B, grid_size**2, hidden_size]` (row-major).

        `patch_keep_mask` (`[B, grid_size**2]`) zeroes the input pixels of each dropped dense-grid cell
        (a convolution has no patch embedding to zero). `hidden_states` (when asked for) are the used
        feature maps, `[B, tokens, channels]`; a convolutional tower has no `attentions` (an empty tuple).
        """
        statistics = contextlib.nullcontext()
        if patch_keep_mask is not None:
            pixel_values = pixel_values * self._pixel_keep_mask(patch_keep_mask, pixel_values)
            # A masked image is a coalition of the token game: its value must not depend on the other
            # coalitions in the batch, nor may masked batches move the running statistics.
            statistics = running_batch_statistics(self.backbone)
        with statistics:
            maps = [feature.permute(0, 2, 3, 1) for feature in self.backbone(pixel_values)]
        tokens = None
        for feature, norm, projection in zip(maps, self.norms, self.projections, strict=True):
            projected = projection(norm(feature))
            factor = self.grid_size // projected.shape[1]
            if factor > 1:  # the coarse map over its factor x factor fine cells
                projected = projected.repeat_interleave(factor, 1).repeat_interleave(factor, 2)
            tokens = projected if tokens is None else tokens + projected
        return BaseModelOutput(
            last_hidden_state=tokens.flatten(1, 2),
            hidden_states=tuple(m.flatten(1, 2) for m in maps) if output_hidden_states else None,
            attentions=() if output_attentions else None,
        )

    @property
    def token_centre_offset(self) -> tuple[float, float]:
        """Where the dense tokens' receptive fields are centred relative to their cells, (x, y) as
        fractions of the image side (`receptive_field_offset`)."""
        config = self.config
        reduction = config.image_size // self.grid_size
        x, y = receptive_field_offset(config.convolutional_backbone, reduction, config.num_channels)
        return x / config.image_size, y / config.image_size

    def _pixel_keep_mask(
        self, patch_keep_mask: torch.Tensor, pixel_values: torch.Tensor
    ) -> torch.Tensor:
        """`[B, 1, H, W]`: the mask over the input pixels."""
        size, batch_size = pixel_values.shape[-1], pixel_values.shape[0]
        mask = keep_mask_on_grid(patch_keep_mask, self.grid_size, size, batch_size)
        return mask.unsqueeze(1).to(device=pixel_values.device, dtype=pixel_values.dtype)


@contextlib.contextmanager
def running_batch_statistics(module: nn.Module) -> Iterator[None]:
    """Inside the block, `module`'s BatchNorm layers in training mode normalise with their running
    statistics and leave them unchanged (the rest of `module` stays in training mode)."""
    batch_norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    switched = [m for m in module.modules() if isinstance(m, batch_norms) and m.training]
    for layer in switched:
        layer.train(False)
    try:
        yield
    finally:
        for layer in switched:
            layer.train(True)


def build_convolutional_backbone(config: LoupeVisionConfig, reductions: list[int]) -> nn.Module:
    """The timm network's feature extractor for the maps at `reductions`, with a clear error when it has none there."""
    name = config.convolutional_backbone
    with torch.device("meta"):  # only to read where its maps are
        available = timm.create_model(name, features_only=True).feature_info.reduction()
    missing = [reduction for reduction in reductions if reduction not in available]
    if missing:
        raise ValueError(
            f"the timm network {name!r} has feature maps at reductions {available}, none at {missing}: "
            "choose patch_size, dense_stage and depths so that patch_size * 2**stage is among them"
        )
    indices = tuple(available.index(reduction) for reduction in reductions)
    # Not every timm network takes drop_path_rate: pass it only when asked for.
    extra = {"drop_path_rate": config.drop_path_rate} if config.drop_path_rate else {}
    return timm.create_model(
        name,
        features_only=True,
        out_indices=indices,
        pretrained=False,
        in_chans=config.num_channels,
        **extra,
    )


@functools.lru_cache(maxsize=32)
def receptive_field_offset(name: str, reduction: int, in_chans: int = 3) -> tuple[float, float]:
    """Where the receptive field of a token of the timm network `name`'s feature map at `reduction`
    is centred, relative to the centre of the cell the token stands for: (x, y) in input pixels.

    Strided layers that pad to keep sizes (ResNets' 3x3 convolutions and max pools) centre output j
    on input pixel `reduction * j`, not on its cell's middle `reduction * (j + 1/2) - 1/2`: every token
    sees a little up and to the left of its cell (-1.5 px for ResNet-10 at reduction 4), so boxes
    read off the grid sit that much down and to the right of their objects. Patchifying stems
    (ConvNeXt) centre tokens on their cells (0). Measured on the architecture alone: in a copy with
    positive weights and max pools made averages, the input pixels that the middle token's gradient
    reaches are exactly its receptive field."""
    # The probe needs gradients even when asked for from inference code.
    with torch.device("cpu"), torch.inference_mode(False), torch.enable_grad():
        probe = timm.create_model(name, features_only=True, pretrained=False, in_chans=in_chans)
        available = probe.feature_info.reduction()
        if reduction not in available:
            raise ValueError(
                f"the timm network {name!r} has feature maps at reductions {available}, "
                f"none at {reduction}"
            )
        index = available.index(reduction)
        probe = timm.create_model(
            name, features_only=True, out_indices=(index,), pretrained=False, in_chans=in_chans
        ).eval()
        for module in list(probe.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.MaxPool2d):  # a max's gradient reaches one pixel only
                    pool = nn.AvgPool2d(
                        child.kernel_size, child.stride, child.padding, child.ceil_mode
                    )
                    setattr(module, child_name, pool)
        with torch.no_grad():
            for parameter in probe.parameters():
                parameter.copy_(parameter.abs() + 1e-3)
            for module in probe.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.running_mean.zero_()
                    module.running_var.fill_(1.0)
        size = 32 * reduction
        while True:  # an image large enough that the middle token's field stays inside it
            pixels = torch.ones(1, in_chans, size, size, requires_grad=True)
            features = probe(pixels)[0]
            middle = features.shape[-1] // 2
            features[0, :, middle, middle].sum().backward()
            reached = pixels.grad[0].abs().sum(0) > 0
            rows, columns = (reached.any(dim).nonzero()[:, 0] for dim in (1, 0))
            if min(rows.min(), columns.min()) > 0 and max(rows.max(), columns.max()) < size - 1:
                break
            size *= 2
    cell_middle = middle * reduction + reduction / 2
    return (
        float((columns.min() + columns.max() + 1) / 2 - cell_middle),
        float((rows.min() + rows.max() + 1) / 2 - cell_middle),
    )


@contextlib.contextmanager
def record_window_attentions(swin: nn.Module, enabled: bool) -> Iterator[list[torch.Tensor]]:
    """Collects the attention probabilities of every Swin window-attention block run inside the block.

    timm computes attention with a fused kernel that never materialises the probabilities, so while
    recording the blocks take timm's own unfused path and a hook keeps its softmax output.
    """
    recorded: list[torch.Tensor] = []
    if not enabled:
        yield recorded
        return
    blocks = [module for module in swin.modules() if isinstance(module, WindowAttention)]
    fused = [block.fused_attn for block in blocks]
    hooks = [
        block.softmax.register_forward_hook(lambda _module, _inputs, probs: recorded.append(probs))
        for block in blocks
    ]
    try:
        for block in blocks:
            block.fused_attn = False
        yield recorded
    finally:
        for block, was_fused in zip(blocks, fused, strict=True):
            block.fused_attn = was_fused
        for hook in hooks:
            hook.remove()


@contextlib.contextmanager
def eager_text_attention(text_config: Any, enabled: bool) -> Iterator[None]:
    """Runs BERT with its eager attention inside the block when `enabled`: the fused kernels
    (`sdpa`, flash) never materialise the attention probabilities that `output_attentions` asks for."""
    previous = text_config._attn_implementation
    if not enabled or previous == "eager":
        yield
        return
    text_config._attn_implementation = "eager"
    try:
        yield
    finally:
        text_config._attn_implementation = previous


def build_swin(config: LoupeVisionConfig) -> SwinTransformer:
    """Builds the timm Swin from a timm name (optionally with pretrained weights) or from the shape fields."""
    if config.timm_model_name:
        overlay = {"file": config.timm_checkpoint_path} if config.timm_checkpoint_path else None
        swin = timm.create_model(
            config.timm_model_name,
            pretrained=config.timm_pretrained,
            pretrained_cfg_overlay=overlay,
            num_classes=0,
            img_size=config.image_size,
            drop_path_rate=config.drop_path_rate,
        )
        if config.timm_pretrained:
            # Keep the pretrained weights: transformers' post_init skips what is flagged initialised.
            for item in (*swin.modules(), *swin.parameters(), *swin.buffers()):
                item._is_hf_initialized = True
        return swin
    return SwinTransformer(
        img_size=config.image_size,
        patch_size=config.patch_size,
        in_chans=config.num_channels,
        num_classes=0,
        embed_dim=config.embed_dim,
        depths=tuple(config.depths),
        num_heads=tuple(config.num_heads),
        window_size=config.window_size,
        mlp_ratio=config.mlp_ratio,
        drop_path_rate=config.drop_path_rate,
    )


class LoupeRegionHead(nn.Module):
    """Region generation module (METHOD §3.3): from each patch token, boxes centred on that patch and a
    confidence c(R) for each.

    Two box parameterisations (`LoupeConfig.region_box_mode`), which differ in how the box gets a
    learning signal (the paper's TSA loss only supervises the confidence):

    - `"anchors"` (default): every patch proposes one box per side in `region_anchor_sizes`, each with
      its own confidence. TSA trains the confidence of each candidate towards the normalised
      token-level interaction of its patches, so the box *size* is chosen by interaction: the scale
      whose patches cooperate most wins the top-K selection. Region embeddings are pooled with a
      soft mask of the fixed-size box.
    - `"learned"`: one box per patch whose width and height are predicted through a sigmoid between
      `region_min_size` and `region_max_size`; region embeddings are pooled with a *soft*,
      differentiable box mask, so every loss on region embeddings (FSA, region scoring) moves the
      sizes. FSA can then grow every box to the whole image (a global embedding aligns with every
      phrase), which is why it is not the default.

    Interaction labels always use the hard mask (patches whose centres fall inside the box).
    """

    def __init__(self, config: LoupeConfig):
        super().__init__()
        width = config.vision_config.hidden_size
        self.mode = config.region_box_mode
        self.min_size = config.region_min_size
        self.max_size = config.region_max_size
        self.init_size = config.region_init_size
        self.anchor_sizes = [float(size) for size in config.region_anchor_sizes]
        self.grid_size = config.vision_config.dense_grid_size
        self.norm = nn.LayerNorm(width)
        self.hidden = nn.Linear(width, width)
        # learned: (width logit, height logit, confidence logit); anchors: a confidence per anchor.
        self.out = nn.Linear(width, 3 if self.mode == "learned" else len(self.anchor_sizes))

    @property
    def candidates_per_patch(self) -> int:
        return 1 if self.mode == "learned" else len(self.anchor_sizes)

    def bias_at_init(self) -> torch.Tensor:
        """Output bias at initialisation: boxes `region_init_size` wide (learned), confidences 0.5."""
        if self.mode != "learned":
            return torch.zeros(len(self.anchor_sizes))
        span = self.max_size - self.min_size
        fraction = (self.init_size - self.min_size) / span if span > 0 else 0.5
        fraction = min(max(fraction, 1e-4), 1 - 1e-4)
        size_logit = math.log(fraction / (1 - fraction))
        return torch.tensor([size_logit, size_logit, 0.0])

    def forward(self, patch_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, N, D]` → candidate boxes `[B, N * A, 4]` (cx, cy, w, h) and confidence logits `[B, N * A]`,
        patch-major (candidate `n * A + a` is patch n's a-th box; A = 1 in learned mode)."""
        raw = self.out(F.gelu(self.hidden(self.norm(patch_tokens))))
        centres = grid_centres(self.grid_size, patch_tokens.device).to(raw.dtype)
        if self.mode == "learned":
            sizes = self.min_size + (self.max_size - self.min_size) * torch.sigmoid(raw[..., :2])
            boxes = torch.cat([centres.expand(*sizes.shape[:-1], 2), sizes], dim=-1)
            return clip_boxes_to_image(boxes), raw[..., 2]
        anchors = torch.tensor(self.anchor_sizes, device=raw.device, dtype=raw.dtype)
        count = len(self.anchor_sizes)
        boxes = torch.cat(
            [
                centres.repeat_interleave(count, dim=0),
                anchors.repeat(centres.shape[0])[:, None].expand(-1, 2),
            ],
            dim=-1,
        )
        return clip_boxes_to_image(boxes).expand(raw.shape[0], -1, -1), raw.flatten(1)


def rewrap_queries(
    config: LoupeConfig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    strip: tuple[list[int], list[int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-wraps tokenised texts `[CLS] strip_prefix body strip_suffix [SEP]` as
    `[CLS] prompt_prefix body prompt_suffix [SEP]` (the config's prompt template), re-padded.

    Rows that do not start and end with `strip` (with a non-empty body in between) stay as they are;
    with an empty `strip` every row is wrapped. Returns the inputs themselves when no row changed.
    """
    prefix, suffix = config.prompt_prefix_ids or [], config.prompt_suffix_ids or []
    old_prefix, old_suffix = strip
    limit = config.text_config.max_position_embeddings
    rows, changed = [], False
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
        real = [token for token, keep in zip(ids, mask, strict=True) if keep]
        body = real[1:-1]
        shortest = len(old_prefix) + len(old_suffix) + (1 if old_prefix or old_suffix else 0)
        wrapped = (
            len(body) >= shortest
            and body[: len(old_prefix)] == old_prefix
            and body[len(body) - len(old_suffix) :] == old_suffix
        )
        if wrapped:
            body = body[len(old_prefix) : len(body) - len(old_suffix)]
            real = [real[0], *prefix, *body, *suffix, real[-1]][:limit]
            changed = True
        rows.append(real)
    if not changed:
        return input_ids, attention_mask
    pad = config.text_config.pad_token_id or 0
    length = max(len(row) for row in rows)
    padded = torch.full((len(rows), length), pad, dtype=input_ids.dtype, device=input_ids.device)
    padded_mask = torch.zeros_like(padded)
    for index, row in enumerate(rows):
        padded[index, : len(row)] = torch.tensor(row, dtype=input_ids.dtype, device=padded.device)
        padded_mask[index, : len(row)] = 1
    return padded, padded_mask


def rewrap_pipeline_hypothesis(
    config: LoupeConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts in the zero-shot-image-classification pipeline's default hypothesis ("This is a photo
    of {}."), re-wrapped in the checkpoint's prompt template: the checkpoint was trained on captions
    like its template, and scores are flat under another wording. Other texts pass unchanged; a
    checkpoint without a tokenised template (or without the hypothesis' tokens) leaves all as given."""
    if config.prompt_prefix_ids is None or config.hypothesis_prefix_ids is None:
        return input_ids, attention_mask
    strip = (config.hypothesis_prefix_ids, config.hypothesis_suffix_ids or [])
    return rewrap_queries(config, input_ids, attention_mask, strip)


REMOTE_CODE_AUTO_MAP = {
    "AutoModel": "modeling_loupe.LoupeModel",
    "AutoModelForZeroShotImageClassification": "modeling_loupe.LoupeModel",
    "AutoModelForZeroShotObjectDetection": "modeling_loupe.LoupeForZeroShotDetection",
}


# What a pre-training checkpoint holds besides the dual encoder: loading it for inference drops these
# by design, so transformers need not list them as unexpected keys.
PRETRAINING_ONLY_KEYS = [
    r"(^|\.)token_unsil\.",
    r"(^|\.)semantic_unsil\.",
    r"(^|\.)training_steps$",
    r"(^|\.)(token|semantic)_interaction_scale$",
]


def check_local_checkpoint(name: Any, kwargs: dict[str, Any]) -> None:
    """Refuses a local checkpoint folder that does not exist (the Hub client would report a
    malformed repository id) or that has no `config.json` while no `config` is passed (transformers
    would build the default, paper-size config and fail on mismatched shapes)."""
    text = str(name)
    folder = Path(text) / (kwargs.get("subfolder") or "")
    if (text.startswith((".", "~", "/")) or text.count("/") > 1) and not folder.exists():
        raise OSError(f"no such checkpoint folder: {folder}")
    if folder.is_dir() and kwargs.get("config") is None and not (folder / "config.json").is_file():
        raise OSError(
            f"{folder} has no config.json; a LOUPE checkpoint is saved with model.save_pretrained()"
        )


class LoupePreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading conventions shared by the LOUPE models."""

    config_class = LoupeConfig
    config: LoupeConfig
    base_model_prefix = "loupe"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # `attn_implementation` selects BERT's attention ("sdpa" or "eager"); the Swin uses timm's kernel.
    _supports_sdpa = True
    _no_split_modules = ["SwinTransformerStage", "BertLayer"]

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *args,
        allow_missing_weights: bool = False,
        allow_non_finite_weights: bool = False,
        **kwargs,
    ):
        """Loads a checkpoint like any transformers model, but refuses one that lacks weights the model
        needs (transformers would silently initialise them at random) unless `allow_missing_weights`,
        and one whose weights hold NaN or infinite values (a damaged file would otherwise give NaN
        logits and no detections) unless `allow_non_finite_weights`."""
        wants_info = kwargs.pop("output_loading_info", False)
        check_local_checkpoint(pretrained_model_name_or_path, kwargs)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        except SafetensorError as error:
            # Its own message ("header too large") names neither the file nor the checkpoint.
            raise OSError(
                f"checkpoint {pretrained_model_name_or_path}: its weights file (model.safetensors) "
                f"is damaged: {error}"
            ) from error
        missing = sorted(info.get("missing_keys") or [])
        if missing and not allow_missing_weights:
            shown = ", ".join(missing[:8]) + (
                f" and {len(missing) - 8} more" if len(missing) > 8 else ""
            )
            raise OSError(
                f"checkpoint {pretrained_model_name_or_path} lacks {len(missing)} weight(s) of "
                f"{cls.__name__}: {shown}; pass allow_missing_weights=True to initialise them at random"
            )
        if not allow_non_finite_weights:
            damaged = [
                name
                for name, tensor in model.state_dict().items()
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
            ]
            if damaged:
                shown = ", ".join(damaged[:8]) + (
                    f" and {len(damaged) - 8} more" if len(damaged) > 8 else ""
                )
                raise OSError(
                    f"checkpoint {pretrained_model_name_or_path} holds NaN or infinite values in "
                    f"{len(damaged)} weight(s): {shown}; the weights file is damaged (pass "
                    "allow_non_finite_weights=True to load it anyway)"
                )
        return (model, info) if wants_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves weights and config; the config's `auto_map` names both LOUPE model classes, so either
        Auto class loads the checkpoint with `trust_remote_code=True`."""
        # The timm weights now live in this checkpoint: loading it must not fetch them again.
        self.config.vision_config.timm_pretrained = False
        if self._auto_class is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.update(REMOTE_CODE_AUTO_MAP)
            self.config.auto_map = auto_map
        scalars = getattr(self, "_fsdp_scalar_names", None)
        if scalars:  # trained as 1-element parameters under FSDP: saved as the scalars they are
            state_dict = kwargs.get("state_dict")
            state_dict = self.state_dict() if state_dict is None else state_dict
            kwargs["state_dict"] = {
                name: value.reshape(()) if name in scalars else value
                for name, value in state_dict.items()
            }
        return super().save_pretrained(save_directory, *args, **kwargs)

    def make_fsdp_shardable(self) -> None:
        """Turns every 0-d parameter (the logit scale) into a 1-element one, in place.

        FSDP refuses to shard 0-d parameters ("Change logit_scale to a 1D tensor with numel equal
        to 1"); every use of the scale broadcasts alike. `save_pretrained` still writes them as
        scalars, so checkpoints trained with FSDP load into any LOUPE model. Called by
        `LoupeTrainer` when FSDP is on, before the optimizer is built.
        """
        names = set(getattr(self, "_fsdp_scalar_names", set()))
        for name, parameter in list(self.named_parameters()):
            if parameter.dim() == 0:
                owner, _, attribute = name.rpartition(".")
                module = self.get_submodule(owner) if owner else self
                shaped = nn.Parameter(parameter.detach().reshape(1))
                shaped.requires_grad_(parameter.requires_grad)
                setattr(module, attribute, shaped)
                names.add(name)
        self._fsdp_scalar_names = names

    def _set_gradient_checkpointing(
        self,
        enable: bool = True,
        gradient_checkpointing_func: Any = torch.utils.checkpoint.checkpoint,
        every_n_layers: int = 1,
    ) -> None:
        """Activation checkpointing for both towers: BERT's layers through transformers, and the Swin
        blocks through timm's own switch (timm modules carry no `gradient_checkpointing` flag)."""
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)
        for module in self.modules():
            if isinstance(module, LoupeVisionTower):
                module.swin.set_grad_checkpointing(enable)
            elif isinstance(module, LoupeConvolutionalTower):
                module.backbone.set_grad_checkpointing(enable)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, std=std)
        if isinstance(module, WindowAttention):
            init.trunc_normal_(module.relative_position_bias_table, std=0.02)
        if isinstance(module, LoupeModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            init.zeros_(module.similarity_offset)
            # Done here rather than on the head: transformers skips modules without direct parameters
            # when initialising custom code, and this runs after the head's own Linear layers.
            head = module.region_head
            if head.mode == "learned":
                init.zeros_(head.out.weight)  # every box starts exactly region_init_size wide
            else:
                init.normal_(
                    head.out.weight, std=0.01
                )  # break the ties of the initial top-K choice
            init.copy_(head.out.bias, head.bias_at_init())
        # transformers builds models on the meta device when loading; timm's non-persistent buffers
        # (relative position index, shifted-window attention masks) are not in the checkpoint and
        # would stay uninitialised memory unless re-created here.
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()


class LoupeModel(LoupePreTrainedModel):
    """LOUPE dual encoder: global image/text embeddings, patch and word tokens, and region proposals.

    Example:

    ```python
    >>> from loupe_hf import LoupeConfig, LoupeModel
    >>> model = LoupeModel(LoupeConfig.from_preset("tiny"))
    >>> outputs = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
    >>> outputs.logits_per_image.shape, outputs.region_boxes.shape
    ```
    """

    _keys_to_ignore_on_load_unexpected = PRETRAINING_ONLY_KEYS

    def __init__(self, config: LoupeConfig):
        super().__init__(config)
        vision = config.vision_config
        tower = LoupeConvolutionalTower if vision.is_convolutional else LoupeVisionTower
        self.vision_model = tower(vision)
        self.text_model = BertModel(config.text_config, add_pooling_layer=False)
        # Bias-free linear projections: pooling then projecting equals projecting then pooling, which
        # lets the token-level game project every token once and pool cheaply per coalition.
        self.visual_projection = nn.Linear(
            config.vision_config.hidden_size, config.projection_dim, bias=False
        )
        self.text_projection = nn.Linear(
            config.text_config.hidden_size, config.projection_dim, bias=False
        )
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        # Midpoint between matched and unmatched image–caption cosines, tracked during pre-training:
        # detection logits subtract it so that sigmoid(logit) thresholds sensibly (no box labels needed).
        self.register_buffer("similarity_offset", torch.zeros(()))
        self.region_head = LoupeRegionHead(config)
        self.post_init()

    @classmethod
    def from_pretrained_text_tower(
        cls, config: LoupeConfig, text_model_name_or_path: str, **kwargs
    ) -> LoupeModel:
        """Builds a LOUPE model whose text tower starts from a pretrained BERT (a Hub id or a local
        directory); the config's `text_config` is replaced by that model's. Other parts start random
        (or from timm weights, see [`LoupeVisionConfig`])."""
        text_model = BertModel.from_pretrained(
            text_model_name_or_path, add_pooling_layer=False, **kwargs
        )
        config = copy.deepcopy(config)
        config.text_config = text_model.config
        model = cls(config)
        model.text_model.load_state_dict(text_model.state_dict())
        return model

    @property
    def grid_size(self) -> int:
        """Side of the dense patch-token grid."""
        return self.vision_model.grid_size

    def grid_to_image(self, boxes: torch.Tensor) -> torch.Tensor:
        """Normalised (cx, cy, w, h) boxes from the token grid's frame, where region boxes are
        centred on cells (`region_boxes`, the masks TSA labels), to the image's, where objects are:
        shifted by where the tokens' receptive fields are centred (`token_centre_offset`; zero for
        Swin) and cut to the image."""
        return self._shift_boxes(boxes, 1.0)

    def image_to_grid(self, boxes: torch.Tensor) -> torch.Tensor:
        """The inverse of `grid_to_image`, e.g. for ground-truth boxes pooled on the grid."""
        return self._shift_boxes(boxes, -1.0)

    def _shift_boxes(self, boxes: torch.Tensor, sign: float) -> torch.Tensor:
        x, y = self.vision_model.token_centre_offset
        if x == 0 and y == 0:
            return boxes
        shift = torch.tensor([x, y, 0.0, 0.0], device=boxes.device, dtype=boxes.dtype)
        return clip_boxes_to_image(boxes + sign * shift)

    # --- encoders -----------------------------------------------------------------------------------
    def encode_image(
        self, pixel_values: torch.Tensor, patch_keep_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Patch tokens X_I `[B, N1, Dv]` of the dense grid."""
        return self.run_vision_tower(pixel_values, patch_keep_mask).last_hidden_state

    def encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Word tokens X_T `[B, L, Dt]` (`[CLS]` first)."""
        return self.run_text_tower(input_ids, attention_mask, token_type_ids).last_hidden_state

    def run_vision_tower(
        self,
        pixel_values: torch.Tensor,
        patch_keep_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutput:
        """The image tower's full output (patch tokens, and hidden states / attentions when asked for)."""
        self._check_pixel_values(pixel_values)
        return self.vision_model(
            pixel_values,
            patch_keep_mask=patch_keep_mask,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )

    def run_text_tower(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> BaseModelOutput:
        """BERT's full output for the text (word tokens, and hidden states / attentions when asked for)."""
        if input_ids.shape[-1] > self.config.text_config.max_position_embeddings:
            raise ValueError(
                f"input_ids has {input_ids.shape[-1]} tokens but the text tower takes at most "
                f"{self.config.text_config.max_position_embeddings}; truncate when tokenizing"
            )
        with eager_text_attention(self.text_model.config, output_attentions):
            return self.text_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                output_hidden_states=output_hidden_states,
                output_attentions=output_attentions,
            )

    def pool_image_tokens(
        self, patch_tokens: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Projected (unnormalised) image embedding of the kept patch tokens: the projection of their
        mean (`image_pooling="mean"`) or the max of their projections (`"max"`).

        Args:
            patch_tokens: `[B, N1, Dv]`.
            keep: `[B, *extra, N1]` weights or bool mask (coalitions, regions); `None` keeps all.
        Returns:
            `[B, *extra, projection_dim]`.
        """
        if self.config.image_pooling == "max":
            projected = self.visual_projection(patch_tokens)
            if keep is None:  # every token: a plain max (masked_max's gathers cost ~10x more)
                return projected.max(dim=-2).values
            return masked_max(projected, keep)
        if keep is None:
            return self.visual_projection(patch_tokens.mean(dim=-2))
        return self.visual_projection(masked_mean(patch_tokens, keep))

    def pool_text_tokens(self, word_tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Projected (unnormalised) text embedding of the kept word tokens (`keep`: `[B, *extra, L]`)."""
        return self.text_projection(masked_mean(word_tokens, keep))

    def get_image_features(
        self, pixel_values: torch.Tensor, patch_keep_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Projected image embeddings `[B, projection_dim]` (not normalised).

        With `patch_keep_mask` (`[B, N1]`), the dropped patches are zeroed at the encoder input and the
        mean is taken over the kept tokens (the `input` mode of the token-level game).
        """
        patch_tokens = self.encode_image(pixel_values, patch_keep_mask=patch_keep_mask)
        return self.pool_image_tokens(patch_tokens, patch_keep_mask)

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Projected text embeddings `[B, projection_dim]` (not normalised)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        word_tokens = self.encode_text(input_ids, attention_mask, token_type_ids)
        return self.text_embeds_from_tokens(word_tokens, attention_mask)

    def text_embeds_from_tokens(
        self, word_tokens: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Projected (unnormalised) text embeddings `[B, projection_dim]` of word tokens."""
        return self.text_projection(self.pooled_text_features(word_tokens, attention_mask))

    def pooled_text_features(
        self, word_tokens: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The text feature before projection: the `[CLS]` output or the mean of the real tokens."""
        if self.config.text_pooling == "cls":
            return word_tokens[:, 0]
        return masked_mean(word_tokens, attention_mask)

    def tower_outputs(
        self,
        vision: BaseModelOutput,
        text: BaseModelOutput,
        attention_mask: torch.Tensor,
        text_features: torch.Tensor | None = None,
    ) -> tuple[BaseModelOutputWithPooling, BaseModelOutputWithPooling]:
        """Both towers' outputs with a `pooler_output` each (the features before projection: Swin's
        average pool and the pooled text, `text_features` when already computed), as CLIP-style
        models return them."""
        if text_features is None:
            text_features = self.pooled_text_features(text.last_hidden_state, attention_mask)
        image = BaseModelOutputWithPooling(
            last_hidden_state=vision.last_hidden_state,
            pooler_output=vision.last_hidden_state.mean(dim=1),
            hidden_states=vision.hidden_states,
            attentions=vision.attentions,
        )
        words = BaseModelOutputWithPooling(
            last_hidden_state=text.last_hidden_state,
            pooler_output=text_features,
            hidden_states=text.hidden_states,
            attentions=text.attentions,
        )
        return image, words

    # --- regions and phrases --------------------------------------------------------------------------
    def propose_regions(
        self, patch_tokens: torch.Tensor, num_regions: int | None = None
    ) -> LoupeRegionOutput:
        """Runs the region generation module and keeps the top-K regions (after NMS)."""
        candidate_boxes, candidate_logits = self.region_head(patch_tokens)
        indices = select_regions(
            candidate_boxes,
            candidate_logits,
            num_regions or self.config.num_regions,
            self.config.region_nms_iou,
        )
        boxes = candidate_boxes.gather(1, indices.unsqueeze(-1).expand(-1, -1, 4))
        scores = torch.sigmoid(candidate_logits.gather(1, indices))
        return LoupeRegionOutput(
            boxes=boxes,
            scores=scores,
            indices=indices,
            candidate_boxes=candidate_boxes,
            candidate_logits=candidate_logits,
        )

    def region_masks(self, boxes: torch.Tensor, soft: bool = True) -> torch.Tensor:
        """Membership of patches in regions, `[B, K, N1]`: soft (differentiable) or hard (bool)."""
        if soft:
            return soft_box_masks(boxes, self.grid_size, self.config.region_mask_sharpness)
        return hard_box_masks(boxes, self.grid_size)

    def pool_regions(
        self, patch_tokens: torch.Tensor, boxes: torch.Tensor, soft: bool = True
    ) -> torch.Tensor:
        """Region embeddings h^I `[B, K, projection_dim]` (unnormalised): mean of the patch tokens in each box."""
        # A max has no gradient through mask weights: max pooling uses the hard box membership.
        soft = soft and self.config.image_pooling == "mean"
        return self.pool_image_tokens(patch_tokens, self.region_masks(boxes, soft=soft))

    def pool_phrases(self, word_tokens: torch.Tensor, phrase_masks: torch.Tensor) -> torch.Tensor:
        """Phrase embeddings h^T `[B, M, projection_dim]` (unnormalised) from `phrase_masks` `[B, M, L]`
        (1 on the word tokens of each phrase; an all-zero row is a padding phrase and gives zeros)."""
        return self.pool_text_tokens(word_tokens, phrase_masks)

    # --- forward ------------------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        phrase_masks: torch.Tensor | None = None,
        return_loss: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        output_regions: bool = True,
        **kwargs,
    ) -> LoupeOutput | tuple:
        """Encodes both modalities, scores every image against every text and proposes regions.

        Args:
            pixel_values (`[B, 3, H, W]`): from [`LoupeImageProcessor`].
            input_ids, attention_mask, token_type_ids (`[B, L]`): from the BERT tokenizer. Texts that
                arrive wrapped in the zero-shot-image-classification pipeline's default hypothesis
                ("This is a photo of {}.") are re-wrapped in the checkpoint's prompt template.
            phrase_masks (`[B, M, L]`, *optional*): word-token membership of each caption phrase.
            return_loss (`bool`, *optional*): also return the single-process CMC loss.
            output_hidden_states / output_attentions (`bool`, *optional*): also return both towers'
                hidden states / attention probabilities, in `vision_model_output` and `text_model_output`.
            output_regions (`bool`, defaults to `True`): run the region module; without it the
                `region_*` and `candidate_*` outputs are `None` (the CMC-only backbone needs none).
        """
        if pixel_values is None or input_ids is None:
            raise ValueError("LoupeModel needs both pixel_values and input_ids")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        flags = self._output_flags(output_hidden_states, output_attentions)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if phrase_masks is None:  # phrase masks index the tokens as given: never re-wrap under them
            rewrapped, attention_mask = rewrap_pipeline_hypothesis(
                self.config, input_ids, attention_mask
            )
            if rewrapped is not input_ids:  # single-segment texts: the segment ids are all 0
                input_ids, token_type_ids = rewrapped, None
        vision = self.run_vision_tower(pixel_values, **flags)
        text = self.run_text_tower(input_ids, attention_mask, token_type_ids, **flags)
        patch_tokens, word_tokens = vision.last_hidden_state, text.last_hidden_state
        image_embeds = F.normalize(self.pool_image_tokens(patch_tokens), dim=-1)
        text_features = self.pooled_text_features(word_tokens, attention_mask)
        text_embeds = F.normalize(self.text_projection(text_features), dim=-1)
        logits_per_text = self.logit_scale.exp() * text_embeds @ image_embeds.t()
        regions, region_embeds = LoupeRegionOutput(), None
        if output_regions:
            regions = self.propose_regions(patch_tokens)
            region_embeds = F.normalize(self.pool_regions(patch_tokens, regions.boxes), dim=-1)
        phrase_embeds = None
        if phrase_masks is not None:
            phrase_embeds = F.normalize(self.pool_phrases(word_tokens, phrase_masks), dim=-1)
        vision_model_output, text_model_output = self.tower_outputs(
            vision, text, attention_mask, text_features
        )
        output = LoupeOutput(
            loss=cmc_loss(image_embeds, text_embeds, self.logit_scale, gather=False)
            if return_loss
            else None,
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            patch_tokens=patch_tokens,
            word_tokens=word_tokens,
            region_boxes=regions.boxes,
            region_scores=regions.scores,
            region_indices=regions.indices,
            region_embeds=region_embeds,
            candidate_boxes=regions.candidate_boxes,
            candidate_logits=regions.candidate_logits,
            phrase_embeds=phrase_embeds,
            vision_model_output=vision_model_output,
            text_model_output=text_model_output,
        )
        return output if return_dict else output.to_tuple()

    def _output_flags(
        self, output_hidden_states: bool | None, output_attentions: bool | None
    ) -> dict[str, bool]:
        """The tower switches, defaulting to the config's (as every transformers model does)."""
        return {
            "output_hidden_states": bool(
                self.config.output_hidden_states
                if output_hidden_states is None
                else output_hidden_states
            ),
            "output_attentions": bool(
                self.config.output_attentions if output_attentions is None else output_attentions
            ),
        }

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        size = self.config.vision_config.image_size
        channels = self.config.vision_config.num_channels
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (channels, size, size):
            raise ValueError(
                f"pixel_values must have shape [batch, {channels}, {size}, {size}], got "
                f"{tuple(pixel_values.shape)}; prepare images with LoupeImageProcessor"
            )


@dataclass
class LoupeImageRegions(ModelOutput):
    """What [`LoupeForZeroShotDetection`] computes once per image, to score any number of queries.
    Its boxes are on the image ([`LoupeModel.grid_to_image`]).

    Args:
        region_embeds (`(batch_size, num_regions, projection_dim)`): L2-normalised region embeddings,
            pooled over the proposed boxes.
        boxes (`(batch_size, num_regions, 4)`): normalised (cx, cy, w, h), each proposed box refined to the
            most confident candidate around it (`LoupeConfig.box_refinement_iou`).
        objectness (`(batch_size, num_regions)`): the confidences c(R) of those boxes.
        image_embeds (`(batch_size, projection_dim)`): L2-normalised global image embeddings.
        candidate_boxes (`(batch_size, num_candidates, 4)`): every candidate box, normalised (cx, cy, w, h).
        patch_tokens (`(batch_size, num_patches, vision_hidden_size)`): the dense grid's tokens, to pool
            other boxes (e.g. ground-truth ones when diagnosing).
        proposed_boxes (`(batch_size, num_regions, 4)`): the kept regions' own boxes, before refinement
            (what `region_embeds` were pooled over), normalised (cx, cy, w, h).
    """

    region_embeds: torch.FloatTensor | None = None
    boxes: torch.FloatTensor | None = None
    objectness: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    candidate_boxes: torch.FloatTensor | None = None
    patch_tokens: torch.FloatTensor | None = None
    proposed_boxes: torch.FloatTensor | None = None


class LoupeForZeroShotDetection(LoupePreTrainedModel):
    """Zero-shot object detection and visual grounding with LOUPE (METHOD §5): the region module
    proposes boxes, and each box's region embedding is scored against each text query. The box a
    region reports is the most confident candidate around the proposed one (`box_refinement_iou`):
    the embedding decides which object, the TSA-trained confidence where its extent is.

    `logits[b, k, q] = exp(logit_scale) * (cos(region_k, query_q) - similarity_offset)`, where the offset
    is the midpoint between matched and unmatched image–caption similarities tracked during
    pre-training, so `sigmoid(logits)` is a score that thresholds sensibly (0.5 ≈ "as similar as a
    matching caption is, on average"). The image processor's `post_process_object_detection` turns
    them into boxes in pixels.

    Queries are class names or phrases. When the config holds a tokenised prompt template
    (`LoupeConfig.set_prompt_template`, default "an image of a {}."), `forward` wraps each query in it,
    so `pipeline("zero-shot-object-detection")` (which tokenises bare labels) and the direct API
    [`~LoupeForZeroShotDetection.detect`] score exactly the same text. Grounding
    ([`~LoupeForZeroShotDetection.ground`]) scores referring expressions as they are.

    Text rows pair with images as in OWL-ViT: `input_ids` of shape `[B * Q, L]` holds Q queries per
    image, in image order (with one image, all rows are its queries). The pipeline calls the model
    once per label; the direct API encodes each image once for all its labels.
    """

    _keys_to_ignore_on_load_unexpected = PRETRAINING_ONLY_KEYS

    def __init__(self, config: LoupeConfig):
        super().__init__(config)
        self.loupe = LoupeModel(config)
        self.post_init()

    @classmethod
    def from_model(cls, model: LoupeModel) -> LoupeForZeroShotDetection:
        """A detector around `model`'s weights (shared, not copied), e.g. for evaluating a dual encoder."""
        with torch.device(
            "meta"
        ):  # the detector's own LoupeModel is replaced at once: never allocate it
            detector = cls(model.config)
        detector.loupe = model
        detector.train(model.training)
        return detector

    # --- building blocks --------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> LoupeImageRegions:
        """Region proposals and embeddings of `[B, 3, H, W]` images (computed once, reusable)."""
        return self.regions_from_patch_tokens(self.loupe.encode_image(pixel_values))

    def regions_from_patch_tokens(self, patch_tokens: torch.Tensor) -> LoupeImageRegions:
        """Region proposals and embeddings from the image tower's patch tokens."""
        model = self.loupe
        regions = model.propose_regions(patch_tokens, self.config.detection_num_regions)
        # Which object a region shows comes from its proposed box's embedding; where its extent is,
        # from the most confident candidates around it (see `refine_by_confidence`).
        config = self.config
        around = (
            regions.boxes,
            regions.candidate_boxes,
            regions.candidate_logits,
            config.box_refinement_iou,
        )
        near = logits_near(*around)  # one IoU matrix serves the refinement and the fusion
        refined = near.argmax(-1)  # `refine_by_confidence`
        if config.box_refinement_candidates > 1:
            boxes = fuse_confident_candidates(*around, config.box_refinement_candidates, near=near)
        else:
            boxes = regions.candidate_boxes.gather(1, refined[..., None].expand(-1, -1, 4))
        # Everything above is on the token grid; what the detector reports is on the image.
        return LoupeImageRegions(
            region_embeds=F.normalize(model.pool_regions(patch_tokens, regions.boxes), dim=-1),
            boxes=model.grid_to_image(boxes),
            objectness=torch.sigmoid(regions.candidate_logits.gather(1, refined)),
            image_embeds=F.normalize(model.pool_image_tokens(patch_tokens), dim=-1),
            candidate_boxes=model.grid_to_image(regions.candidate_boxes),
            patch_tokens=patch_tokens,
            proposed_boxes=model.grid_to_image(regions.boxes),
        )

    def encode_queries(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        apply_prompt_template: bool = True,
    ) -> torch.Tensor:
        """L2-normalised text embeddings `[Q, P]` of tokenised queries (wrapped in the prompt template
        when the config has one and `apply_prompt_template`)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if apply_prompt_template and self.config.prompt_prefix_ids is not None:
            input_ids, attention_mask = self._wrap_in_prompt(input_ids, attention_mask)
        model = self.loupe
        word_tokens = model.encode_text(input_ids, attention_mask)
        return F.normalize(model.text_embeds_from_tokens(word_tokens, attention_mask), dim=-1)

    def score(self, regions: LoupeImageRegions, text_embeds: torch.Tensor) -> torch.Tensor:
        """Detection logits `[B, K, Q]` of regions against `[B, Q, P]` (or shared `[Q, P]`) queries."""
        if text_embeds.dim() == 2:
            text_embeds = text_embeds.expand(regions.region_embeds.shape[0], -1, -1)
        cosine = regions.region_embeds @ text_embeds.transpose(1, 2)
        logits = self.loupe.logit_scale.exp() * (cosine - self.loupe.similarity_offset)
        weight = self.config.detection_objectness_weight
        if weight and regions.objectness is not None:
            # Log-odds add: the region is an object (its confidence c(R)) and matches the query.
            objectness = regions.objectness.clamp(1e-6, 1 - 1e-6)
            logits = logits + weight * torch.logit(objectness).unsqueeze(-1)
        return logits

    def _wrap_in_prompt(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`[CLS] query [SEP]` → `[CLS] prefix query suffix [SEP]`, re-padded."""
        return rewrap_queries(self.config, input_ids, attention_mask, strip=([], []))

    # --- the direct API (the one zero-shot path, `loupe_hf.zero_shot`) ----------------------------------
    @torch.inference_mode()
    def detect(
        self,
        images: Any,
        labels: Sequence[str],
        processor: Any,
        threshold: float = 0.1,
        top_k: int | None = None,
        nms_threshold: float | None = None,
    ) -> list[dict[str, Any]]:
        """Zero-shot detection of `labels` (class names, wrapped in the prompt template) in `images`.

        Faster than the pipeline for several labels: each image is encoded once and all labels are
        scored in one text batch. Returns per image a dict with `scores`, `labels` (indices),
        `text_labels` and `boxes` (x0, y0, x1, y1 in pixels of the original image), best first.
        """
        return detect_zero_shot(self, processor, images, labels, threshold, top_k, nms_threshold)

    @torch.inference_mode()
    def ground(
        self, images: Any, expressions: Sequence[str] | str, processor: Any
    ) -> list[dict[str, Any]]:
        """Visual grounding: the single best region of each image for its referring expression
        (scored as written, without the detection prompt). Returns per image a dict with `box`
        (x0, y0, x1, y1 in pixels), `score` (sigmoid of the logit), `region_index` and `expression`."""
        return ground_zero_shot(self, processor, images, expressions)

    # --- the transformers entry point (used by the pipeline) -------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> LoupeObjectDetectionOutput | tuple:
        """Scores `[B * Q, L]` tokenised queries against the regions of `[B, 3, H, W]` images.

        `token_type_ids` is accepted for tokenizer compatibility and ignored (queries are single
        segments). `output_hidden_states` / `output_attentions` add both towers' hidden states /
        attention probabilities to `vision_model_output` and `text_model_output`.
        """
        if pixel_values is None or input_ids is None:
            raise ValueError("LoupeForZeroShotDetection needs both pixel_values and input_ids")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        batch = pixel_values.shape[0]
        if input_ids.shape[0] % batch:
            raise ValueError(
                f"{input_ids.shape[0]} text rows cannot be split evenly over {batch} images"
            )
        model = self.loupe
        flags = model._output_flags(output_hidden_states, output_attentions)
        vision = model.run_vision_tower(pixel_values, **flags)
        regions = self.regions_from_patch_tokens(vision.last_hidden_state)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.config.prompt_prefix_ids is not None:
            input_ids, attention_mask = self._wrap_in_prompt(input_ids, attention_mask)
        text = model.run_text_tower(input_ids, attention_mask, **flags)
        text_embeds = model.text_embeds_from_tokens(text.last_hidden_state, attention_mask)
        text_embeds = F.normalize(text_embeds, dim=-1).reshape(batch, -1, text_embeds.shape[-1])
        vision_model_output, text_model_output = model.tower_outputs(vision, text, attention_mask)
        output = LoupeObjectDetectionOutput(
            logits=self.score(regions, text_embeds),
            pred_boxes=regions.boxes,
            objectness=regions.objectness,
            region_embeds=regions.region_embeds,
            text_embeds=text_embeds,
            image_embeds=regions.image_embeds,
            vision_model_output=vision_model_output,
            text_model_output=text_model_output,
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "LoupeForZeroShotDetection",
    "LoupeImageRegions",
    "LoupeModel",
    "LoupeObjectDetectionOutput",
    "LoupeOutput",
    "LoupePreTrainedModel",
    "LoupeRegionOutput",
]
