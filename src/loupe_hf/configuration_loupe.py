"""LOUPE model configuration: a timm Swin image tower, a BERT text tower, and the LOUPE heads."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import math
from typing import Any

import timm
from huggingface_hub.dataclasses import strict
from transformers import BertConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .choices import (
    FSA_DIRECTIONS,
    FSA_REGION_WEIGHTINGS,
    IMAGE_POOLING_MODES,
    INTERACTION_NORMALIZATIONS,
    REGION_BOX_MODES,
    SAMPLING_METHODS,
    TEXT_POOLING_MODES,
    TOKEN_GAME_MODES,
    TSA_LABELS,
    UNSIL_ARCHITECTURES,
    UNSIL_LEVELS,
    check_choice,
    check_number,
)

logger = logging.getLogger(__name__)

# The paper's zero-shot detection prompt (METHOD §5); the one home of the default.
DEFAULT_PROMPT_TEMPLATE = "an image of a {}."

# The default hypothesis of transformers' zero-shot-image-classification pipeline.
PIPELINE_HYPOTHESIS_TEMPLATE = "This is a photo of {}."

# The paper's "BERT-Small" text encoder (LOUPE, Table 5).
BERT_SMALL: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "intermediate_size": 2048,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 60,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
}


# The numeric fields of LoupeConfig and what each must be (see `check_number`): checked when the
# config is built and whenever one of them is set.
NUMERIC_FIELDS: dict[str, dict[str, Any]] = {
    "projection_dim": {"integer": True, "minimum": 1},
    "num_regions": {"integer": True, "minimum": 1},
    "detection_num_regions": {"integer": True, "minimum": 1, "optional": True},
    "shapley_num_samples": {"integer": True, "minimum": 1},
    "shapley_token_num_samples": {"integer": True, "minimum": 1, "optional": True},
    "unsil_hidden_dim": {"integer": True, "minimum": 1},
    "unsil_warmup_steps": {"integer": True, "minimum": 0},
    "logit_scale_init_value": {},
    "region_min_size": {"above": 0, "maximum": 1},
    "region_max_size": {"above": 0, "maximum": 1},
    "region_init_size": {"above": 0, "maximum": 1},
    "region_mask_sharpness": {"above": 0},
    "region_nms_iou": {"above": 0, "maximum": 1},
    "detection_nms_iou": {"above": 0, "maximum": 1},
    "box_refinement_iou": {"above": 0, "maximum": 1},
    "box_refinement_candidates": {"integer": True, "minimum": 1},
    "cmc_loss_weight": {"minimum": 0},
    "tsa_loss_weight": {"minimum": 0},
    "fsa_loss_weight": {"minimum": 0},
    "unsil_loss_weight": {"minimum": 0},
    "unsil_uncertainty_weight": {"minimum": 0},
    "detection_objectness_weight": {"minimum": 0},
    "unsil_min_sample_rate": {"minimum": 0, "maximum": 1},
    "initializer_range": {"above": 0},
}


def check_field(name: str, value: Any) -> None:
    """Checks one numeric LoupeConfig field against its rule in `NUMERIC_FIELDS`."""
    if name == "region_anchor_sizes":
        for size in value:
            check_number("every entry of region_anchor_sizes", size, above=0, maximum=1)
    elif name in NUMERIC_FIELDS:
        check_number(name, value, **NUMERIC_FIELDS[name])


# What a config carries besides its fields: transformers writes these when saving, and sets
# `use_cache` on a model's config when training (the Trainer, gradient checkpointing).
SAVED_CONFIG_KEYS = frozenset(
    {"auto_map", "model_type", "transformers_version", "architectures", "use_cache"}
)


def warn_unknown_keys(config: PretrainedConfig) -> None:
    """Warns, by name, about keys that are no field of `config` (a misspelt key is otherwise stored
    and silently ignored), with the closest field name as a suggestion."""
    fields = {field.name for field in dataclasses.fields(config)}
    known = fields | SAVED_CONFIG_KEYS | set(vars(PretrainedConfig()))
    unknown = sorted(key for key in vars(config) if key not in known and not key.startswith("_"))
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(fields), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        logger.warning(
            "%s got the unknown key %r, which nothing reads%s", type(config).__name__, key, hint
        )


def tokenize_template(tokenizer, template: str) -> tuple[list[int], list[int]]:
    """The token ids of a template's text before and after its `{}` (no special tokens)."""
    if template.count("{}") != 1:
        raise ValueError(f"the prompt template needs exactly one '{{}}', got {template!r}")
    prefix, suffix = template.split("{}")

    def ids(piece: str) -> list[int]:
        return tokenizer(piece, add_special_tokens=False)["input_ids"] if piece.strip() else []

    return ids(prefix), ids(suffix)


@strict
class LoupeVisionConfig(PretrainedConfig):
    r"""
    Configuration of LOUPE's image tower: a timm Swin Transformer (the paper's), or a timm convolutional
    network (`convolutional_backbone`).

    Args:
        image_size (`int`, defaults to 224): square input resolution; timm Swin fixes it at build time.
        patch_size (`int`, defaults to 4): side of the patch-embedding convolution.
        num_channels (`int`, defaults to 3): input channels.
        embed_dim (`int`, defaults to 192): channels of stage 1; stage `i` has `embed_dim * 2**i`.
        depths (`list[int]`, defaults to `(2, 2, 18, 2)`): blocks per stage (Swin-L).
        num_heads (`list[int]`, defaults to `(6, 12, 24, 48)`): attention heads per stage (Swin-L).
        window_size (`int`, defaults to 7): attention window side.
        mlp_ratio (`float`, defaults to 4.0): MLP width relative to the stage width.
        drop_path_rate (`float`, defaults to 0.1): stochastic depth.
        dense_stage (`int`, defaults to -1): stage whose grid carries LOUPE's patch tokens (the players of
            the token-level game and the cells regions are made of). `-1` is the last stage, as in the
            paper. An earlier stage gives a finer grid (useful at small resolutions, where the last grid
            is too coarse for boxes): its features are projected to the last stage's width and added to
            the upsampled last-stage features, so every token still sees the whole image.
        timm_model_name (`str`, *optional*): a timm model name (e.g. `"swin_large_patch4_window7_224"`)
            to build the tower from instead of the explicit shape fields above.
        timm_pretrained (`bool`, defaults to `False`): load pretrained weights for `timm_model_name` when
            the model is first built: timm's own (needs network access), or `timm_checkpoint_path`.
            Saving a LOUPE checkpoint resets it to `False`, since the weights then live in the checkpoint.
        timm_checkpoint_path (`str`, *optional*): a local timm checkpoint (`.safetensors`, `.pth`) for
            `timm_pretrained`, for offline machines.
        convolutional_backbone (`str`, *optional*): the name of a timm convolutional network (e.g.
            `"convnext_atto"`), built from scratch, in place of the Swin. Its feature maps at reductions
            `patch_size * 2**i` play the Swin's stages (`len(depths)` of them; `depths`' entries,
            `num_heads`, `window_size` and `mlp_ratio` are then unused): the dense stage and the last one
            are each projected to `hidden_size` and added, the last upsampled. A small data set teaches a
            convolutional tower shape much faster than a Swin (docs/design_choices.md).
        initializer_range (`float`, defaults to 0.02): std of the truncated-normal weight init.
    """

    model_type = "loupe_vision_model"
    base_config_key = "vision_config"

    image_size: int = 224
    patch_size: int = 4
    num_channels: int = 3
    embed_dim: int = 192
    depths: list[int] | tuple[int, ...] = (2, 2, 18, 2)
    num_heads: list[int] | tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1
    dense_stage: int = -1
    timm_model_name: str | None = None
    timm_pretrained: bool = False
    timm_checkpoint_path: str | None = None
    convolutional_backbone: str | None = None
    initializer_range: float = 0.02

    def validate_architecture(self) -> None:
        """Checks the Swin geometry is buildable, with messages that name the field at fault."""
        warn_unknown_keys(self)
        for name in ("image_size", "patch_size", "num_channels", "embed_dim", "window_size"):
            check_number(name, getattr(self, name), integer=True, minimum=1)
        for name in ("depths", "num_heads"):
            for value in getattr(self, name):
                check_number(f"every entry of {name}", value, integer=True, minimum=1)
        check_number("mlp_ratio", self.mlp_ratio, above=0)
        check_number("drop_path_rate", self.drop_path_rate, minimum=0, below=1)
        check_number("dense_stage", self.dense_stage, integer=True)
        check_number("initializer_range", self.initializer_range, above=0)
        if len(self.depths) != len(self.num_heads):
            raise ValueError(
                f"depths ({list(self.depths)}) and num_heads ({list(self.num_heads)}) need one entry per stage"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if not -self.num_stages <= self.dense_stage < self.num_stages:
            raise ValueError(
                f"dense_stage {self.dense_stage} is not a stage of a {self.num_stages}-stage Swin"
            )
        if self.timm_pretrained and not self.timm_model_name:
            raise ValueError("timm_pretrained=True needs timm_model_name")
        if self.convolutional_backbone is not None:
            self._check_convolutional_backbone()
        last_grid = self.image_size // (self.patch_size * 2 ** (self.num_stages - 1))
        if last_grid < 1:
            raise ValueError(
                f"image_size {self.image_size} is too small for {self.num_stages} stages"
            )

    def _check_convolutional_backbone(self) -> None:
        if self.timm_model_name:
            raise ValueError(
                "set either convolutional_backbone or timm_model_name (a Swin), not both: got "
                f"{self.convolutional_backbone!r} and {self.timm_model_name!r}"
            )
        if not isinstance(self.convolutional_backbone, str) or not timm.is_model(
            self.convolutional_backbone
        ):
            raise ValueError(
                f"convolutional_backbone {self.convolutional_backbone!r} is not a timm model name"
            )

    @property
    def is_convolutional(self) -> bool:
        return self.convolutional_backbone is not None

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def hidden_size(self) -> int:
        """Width of the last stage, which is also the width of LOUPE's patch tokens."""
        return int(self.embed_dim * 2 ** (self.num_stages - 1))

    @property
    def dense_grid_size(self) -> int:
        """Side of the square grid of patch tokens (players and region cells)."""
        stage = self.dense_stage % self.num_stages
        return self.image_size // (self.patch_size * 2**stage)


@strict
class LoupeConfig(PretrainedConfig):
    r"""
    Configuration of a LOUPE dual encoder with its region module and pre-training settings.

    Use [`LoupeConfig.from_preset`] for the named presets: `"tiny"` (trains on two CPU cores in minutes:
    a ResNet-10 image tower at 64 px, max image pooling and 30 Shapley samples, see `image_pooling`),
    `"tiny-fine-grid"` (the same with its tokens on a 16x16 grid: the main job's model), `"tiny-128"` (the
    same at 128 px), `"tiny-swin"` (`"tiny"` with a small Swin, the paper's tower
    family) and `"paper"` (Swin-L at 224 px + BERT-Small, LOUPE Table 5, mean pooling as in the paper).

    Args:
        vision_config (`dict` or [`LoupeVisionConfig`], *optional*): the image tower (Swin, or convolutional).
        text_config (`dict` or `BertConfig`, *optional*): the BERT text tower; defaults to the paper's
            BERT-Small (4 layers, hidden 512, 8 heads, intermediate 2048, max length 60).
        projection_dim (`int`, defaults to 512): width of the joint embedding space.
        logit_scale_init_value (`float`, defaults to `log(1/0.07)`): initial log inverse temperature, as in CLIP.
        text_pooling (`str`, defaults to `"mean"`): how the global text embedding is pooled from the word
            tokens: `"mean"` over non-padding tokens, or `"cls"` (the `[CLS]` output). Mean pooling makes
            the image and text sides symmetric (Swin has no `[CLS]` token, its global feature is a mean) and
            makes the feature-mode token game exact at the full coalition; `"cls"` follows BERT.
        image_pooling (`str`, defaults to `"mean"`): how patch tokens become the global image embedding and
            the region embeddings: `"mean"`, the projection of their mean (Swin's average pool, the paper);
            or `"max"`, the element-wise max of their projections. The `tiny` preset uses max pooling,
            under which an object's cells are its most caption-like ones; its token game costs more
            per sample (no closed form).
        num_regions (`int`, defaults to 16): K, the regions kept per image (top-K by confidence).
        region_box_mode (`str`, defaults to `"anchors"`): how boxes are parameterised and learned (see
            [`~modeling_loupe.LoupeRegionHead`]): `"anchors"`, boxes of the sides in `region_anchor_sizes`
            per patch, chosen by their interaction-trained confidences; or `"learned"`, one box per
            patch whose size is regressed through a differentiable soft box mask.
        region_anchor_sizes (`list[float]`, defaults to `(0.3, 0.5, 0.75)`): anchor box sides, as
            fractions of the image side (`"anchors"` mode). Each should cover at least two cell centres
            of the dense grid: the interaction of a one-patch region is 0 by definition.
        region_min_size (`float`, defaults to 0.05): smallest box side, as a fraction of the image side.
        region_max_size (`float`, defaults to 1.0): largest box side, as a fraction of the image side.
        region_init_size (`float`, defaults to 0.3): box side the region head predicts at initialisation.
        region_mask_sharpness (`float`, defaults to 0.25): softness of the differentiable box mask used to
            pool region embeddings, in grid cells (the mask is 0.5 on the box edge and falls to ~0.02
            one cell outside it at the default).
        region_nms_iou (`float`, defaults to 0.7): IoU above which a lower-confidence candidate box is
            suppressed when picking the top-K regions (1.0 disables suppression).
        token_game_mode (`str`, defaults to `"feature"`): how the token-level game masks players:
            `"feature"` masks output token features before pooling (cheap), `"input"` masks at the encoder
            input and re-encodes (faithful, one encoder pass per coalition).
        shapley_num_samples (`int`, defaults to 100): coalition samples per interaction estimate.
        shapley_token_num_samples (`int`, *optional*): samples per token-level (TSA) label when it should
            differ from `shapley_num_samples`: a token-level label costs far more per sample than a
            semantics-level one, while its quality saturates with fewer samples.
        shapley_estimator (`str`, defaults to `"stratified"`): sampling estimator of the interaction engine.
        interaction_normalization (`str`, defaults to `"minmax"`): how interactions become [0, 1] labels.
        tsa_label (`str`, defaults to `"magnitude_per_patch"`): what the region confidence is trained to
            rank: `"magnitude"`, |I([R])| — how strongly the region's patches act *together* in the
            image–text game, whether they complement (I > 0) or duplicate (I < 0) each other;
            `"magnitude_per_patch"`, |I([R])| / |R|, the same per player, so that a box is not preferred
            for merely holding more patches (|I| grows with the region); or `"signed"`, I([R]) itself as
            in the paper, under which redundant object patches (I < 0) would teach the region module to
            avoid objects.
        use_tsa / use_fsa / use_unsil (`bool`): switch the TSA and FSA losses and the UNSIL predictor on or
            off; with all three off LOUPE is the CMC-only backbone of the paper's ablation.
        hard_negative_captions (`bool`, defaults to `False`): add to the CMC loss, for every image, its own
            caption with one phrase's head noun swapped for another noun of the batch
            (`loupe_hf.pretraining.negatives`): a negative only that noun can reject, so the towers must
            learn what colour and size alone cannot tell apart (shape, on the synthetic data).
        cmc_loss_weight / tsa_loss_weight / fsa_loss_weight / unsil_loss_weight (`float`): loss weights.
        fsa_direction (`str`, defaults to `"region_to_phrase"`): the softmax of L_FSA: over the phrases for
            each region (the paper's eq. 11), or `"both"`, averaged with the softmax over the regions for
            each phrase, so that a phrase learns which of the image's regions is its own.
        fsa_region_weighting (`str`, defaults to `"uniform"`): weight of each region's L_FSA terms:
            `"uniform"` (the paper), or `"confidence"`, its confidence c(R) (detached, over the image's
            mean), so that regions TSA does not take for a visual entity teach the alignment less.
        fsa_image_gradient (`bool`, defaults to `True`): whether L_FSA's gradient reaches the image
            tower through the region embeddings (the paper) or only the text tower and the scale.
        unsil_architecture (`str`, defaults to `"mlp_attention"`): `"mlp_attention"` (the paper's additive
            attention), `"mlp_dot_attention"` (scaled dot-product attention, cheaper), `"conv1d"` or
            `"transformer"`.
        unsil_hidden_dim (`int`, defaults to 256): width of the UNSIL predictor.
        unsil_levels (`list[str]`, defaults to `("token", "semantic")`): the levels whose labels UNSIL may
            supply (with `use_unsil`): `"token"` (TSA) and/or `"semantic"` (FSA); a level left out always
            samples its labels. The paper predicts both; the `tiny` preset only token-level labels, since
            its small semantics-level game costs less to sample than a predictor costs to run and train.
        unsil_region_pooling (`str`, defaults to `"mean"`): the token-level UNSIL's region vector h: the
            `"mean"` of the region's patch tokens (the paper) or their `"max"`, which predicts the game
            of a model with max image pooling better.
        unsil_warmup_steps (`int`, defaults to 1000): steps that always sample labels and train UNSIL.
        unsil_uncertainty_weight (`float`, defaults to 1.0): λ of the uncertainty term of the UNSIL loss.
        unsil_min_sample_rate (`float`, defaults to 0.05): floor on the probability that a target is sampled
            (σ is clamped to it in the hybrid rule), so UNSIL keeps seeing fresh labels even when it is
            confident — otherwise a confident but wrong prediction would almost never be corrected.
        prompt_template (`str`, defaults to `"an image of a {}."`): the detection prompt (METHOD §5).
        prompt_prefix_ids / prompt_suffix_ids (`list[int]`, *optional*): the template's text before and after
            `{}`, tokenised; set by [`~LoupeConfig.set_prompt_template`] so that the detection model wraps
            bare labels (as the transformers pipeline passes them) in the template itself.
        hypothesis_prefix_ids / hypothesis_suffix_ids (`list[int]`, *optional*): the same pieces of the
            zero-shot-image-classification pipeline's default hypothesis template ("This is a photo of
            {}."), set with the prompt so that [`LoupeModel`] can re-wrap what that pipeline sends in the
            checkpoint's own template.
        detection_nms_iou (`float`, defaults to 0.5): IoU of the class-aware NMS in detection post-processing.
        detection_num_regions (`int`, *optional*): regions kept per image in detection and grounding (at most
            all candidates), when it should differ from `num_regions` (what TSA and FSA label in
            pre-training): with boxes refined by confidence, more regions give the query more objects
            to choose from.
        box_refinement_iou (`float`, defaults to 0.3): in detection and grounding, each kept region's box
            becomes the most confident candidate box that overlaps it by at least this IoU: the region's
            embedding says which object it shows, its confidence (trained by TSA on how the patches
            interact) where the object's extent is. 1.0 keeps the proposed boxes.
        box_refinement_candidates (`int`, defaults to 1): how many of the most confident candidates around a
            kept region make its box: the single most confident (1), or the mean of the `n` most
            confident, weighted by the softmax of their confidence logits (anchors on a grid rarely fit
            an object exactly; the confident ones around it err on different sides).
        detection_objectness_weight (`float`, defaults to 0.0): weight of the region confidence in detection
            and grounding scores: `weight * logit(c(R))` is added to every region–query logit (log-odds
            add, as in "object × matches the query"). 0 scores regions by similarity alone, as the paper.
        initializer_range (`float`, defaults to 0.02): std of weight init for the LOUPE heads.
    """

    model_type = "loupe"
    sub_configs_defaults = {
        "vision_config": LoupeVisionConfig,
        "text_config": SubConfigSpec(BertConfig, init_kwargs=BERT_SMALL),
    }

    vision_config: dict | LoupeVisionConfig | None = None
    text_config: dict | BertConfig | None = None
    projection_dim: int = 512
    logit_scale_init_value: float = math.log(1 / 0.07)
    text_pooling: str = "mean"
    image_pooling: str = "mean"
    num_regions: int = 16
    region_box_mode: str = "anchors"
    region_anchor_sizes: list[float] | tuple[float, ...] = (0.3, 0.5, 0.75)
    region_min_size: float = 0.05
    region_max_size: float = 1.0
    region_init_size: float = 0.3
    region_mask_sharpness: float = 0.25
    region_nms_iou: float = 0.7
    token_game_mode: str = "feature"
    shapley_num_samples: int = 100
    shapley_token_num_samples: int | None = None
    shapley_estimator: str = "stratified"
    interaction_normalization: str = "minmax"
    tsa_label: str = "magnitude_per_patch"
    use_tsa: bool = True
    use_fsa: bool = True
    use_unsil: bool = True
    hard_negative_captions: bool = False
    cmc_loss_weight: float = 1.0
    tsa_loss_weight: float = 1.0
    fsa_loss_weight: float = 1.0
    fsa_direction: str = "region_to_phrase"
    fsa_region_weighting: str = "uniform"
    fsa_image_gradient: bool = True
    unsil_loss_weight: float = 1.0
    unsil_architecture: str = "mlp_attention"
    unsil_hidden_dim: int = 256
    unsil_levels: list[str] | tuple[str, ...] = ("token", "semantic")
    unsil_region_pooling: str = "mean"
    unsil_warmup_steps: int = 1000
    unsil_uncertainty_weight: float = 1.0
    unsil_min_sample_rate: float = 0.05
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    prompt_prefix_ids: list[int] | None = None
    prompt_suffix_ids: list[int] | None = None
    hypothesis_prefix_ids: list[int] | None = None
    hypothesis_suffix_ids: list[int] | None = None
    detection_nms_iou: float = 0.5
    detection_objectness_weight: float = 0.0
    detection_num_regions: int | None = None
    box_refinement_iou: float = 0.3
    box_refinement_candidates: int = 1
    initializer_range: float = 0.02

    def __setattr__(self, name: str, value: Any) -> None:
        # Numeric fields are checked where they are set, not only when the config is built: a wrong
        # value would otherwise surface later as a crash deep inside torch or timm.
        check_field(name, value)
        super().__setattr__(name, value)

    def set_prompt_template(self, tokenizer, template: str | None = None) -> None:
        """Tokenises the detection prompt template with `tokenizer` and stores its pieces, so that the
        detection model can wrap bare labels in it (see [`LoupeForZeroShotDetection`]); stores the
        classification pipeline's default hypothesis the same way, for [`LoupeModel`] to re-wrap."""
        template = template or self.prompt_template
        self.prompt_prefix_ids, self.prompt_suffix_ids = tokenize_template(tokenizer, template)
        self.prompt_template = template
        self.hypothesis_prefix_ids, self.hypothesis_suffix_ids = tokenize_template(
            tokenizer, PIPELINE_HYPOTHESIS_TEMPLATE
        )

    def validate_architecture(self) -> None:
        """Checks choices and ranges, with messages that name the field at fault."""
        warn_unknown_keys(self)
        self._check_numbers()
        check_choice("text_pooling", self.text_pooling, TEXT_POOLING_MODES)
        check_choice("token_game_mode", self.token_game_mode, TOKEN_GAME_MODES)
        check_choice(
            "interaction_normalization", self.interaction_normalization, INTERACTION_NORMALIZATIONS
        )
        check_choice("unsil_architecture", self.unsil_architecture, UNSIL_ARCHITECTURES)
        check_choice("region_box_mode", self.region_box_mode, REGION_BOX_MODES)
        check_choice("tsa_label", self.tsa_label, TSA_LABELS)
        check_choice("image_pooling", self.image_pooling, IMAGE_POOLING_MODES)
        check_choice("fsa_direction", self.fsa_direction, FSA_DIRECTIONS)
        check_choice("fsa_region_weighting", self.fsa_region_weighting, FSA_REGION_WEIGHTINGS)
        check_choice("shapley_estimator", self.shapley_estimator, SAMPLING_METHODS)
        if not isinstance(self.prompt_template, str) or self.prompt_template.count("{}") != 1:
            raise ValueError(
                "prompt_template must be a string with exactly one {} for the label, got "
                f"{self.prompt_template!r}"
            )
        check_choice("unsil_region_pooling", self.unsil_region_pooling, IMAGE_POOLING_MODES)
        if not self.unsil_levels or any(level not in UNSIL_LEVELS for level in self.unsil_levels):
            raise ValueError(
                f"unsil_levels must be a non-empty subset of {list(UNSIL_LEVELS)}, got "
                f"{self.unsil_levels!r}"
            )
        if self.region_box_mode == "learned" and self.image_pooling != "mean":
            # Box sizes learn through soft region masks; max pooling uses hard masks (no gradient).
            raise ValueError(
                "region_box_mode='learned' needs image_pooling='mean' (box sizes learn through soft "
                f"masks, which max pooling does not use), got image_pooling={self.image_pooling!r}"
            )
        if not self.region_anchor_sizes or not all(
            0 < size <= 1 for size in self.region_anchor_sizes
        ):
            raise ValueError(
                f"region_anchor_sizes must be sides in (0, 1], got {list(self.region_anchor_sizes)}"
            )
        if self.num_regions > self.num_candidate_regions:
            raise ValueError(
                f"num_regions ({self.num_regions}) exceeds the {self.num_candidate_regions} candidate "
                "boxes the region module proposes (dense grid cells x anchor sizes)"
            )
        if not 0 < self.region_min_size <= self.region_init_size <= self.region_max_size <= 1:
            raise ValueError(
                "need 0 < region_min_size <= region_init_size <= region_max_size <= 1, got "
                f"{self.region_min_size}, {self.region_init_size}, {self.region_max_size}"
            )

    def _check_numbers(self) -> None:
        """Types and ranges of the numeric fields, before anything computes with them."""
        for name in (*NUMERIC_FIELDS, "region_anchor_sizes"):
            check_field(name, getattr(self, name))
        text = self.text_config
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        ):
            check_number(f"text_config.{name}", getattr(text, name), integer=True, minimum=1)
        # [CLS], at least one word and [SEP].
        check_number(
            "text_config.max_position_embeddings",
            text.max_position_embeddings,
            integer=True,
            minimum=3,
        )
        if text.hidden_size % text.num_attention_heads:
            raise ValueError(
                f"text_config.hidden_size ({text.hidden_size}) must be a multiple of "
                f"text_config.num_attention_heads ({text.num_attention_heads})"
            )

    @property
    def num_candidate_regions(self) -> int:
        """Candidate boxes: one per anchor size (or one, learned mode) per patch of the dense grid."""
        per_patch = 1 if self.region_box_mode == "learned" else len(self.region_anchor_sizes)
        return self.vision_config.dense_grid_size**2 * per_patch

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LoupeConfig:
        """Builds a named preset (`"tiny"`, `"tiny-fine-grid"`, `"tiny-128"`, `"tiny-swin"` or `"paper"`); keyword overrides replace top-level fields.

        `vision_config` / `text_config` overrides given as dicts are merged into the preset's sub-config.
        """
        if name not in LOUPE_PRESETS:
            raise ValueError(
                f"unknown LOUPE preset {name!r}; choose one of {sorted(LOUPE_PRESETS)}"
            )
        kwargs = copy.deepcopy(LOUPE_PRESETS[name])
        for key in ("vision_config", "text_config"):
            kwargs[key].update(overrides.pop(key, None) or {})
        kwargs.update(overrides)
        return cls(**kwargs)


LOUPE_PRESETS: dict[str, dict[str, Any]] = {
    # Swin-L 224 (patch 4, window 7) + BERT-Small, exactly LOUPE Table 5.
    "paper": {
        "vision_config": {
            "image_size": 224,
            "patch_size": 4,
            "embed_dim": 192,
            "depths": [2, 2, 18, 2],
            "num_heads": [6, 12, 24, 48],
            "window_size": 7,
            "drop_path_rate": 0.2,
            "dense_stage": -1,
        },
        "text_config": dict(BERT_SMALL),
        "projection_dim": 512,
        "region_anchor_sizes": [0.2, 0.35, 0.5, 0.75],
    },
    # 64 px, 3 stages: a 4x4 last grid; patch tokens live on the 8x8 grid of stage 2 (see dense_stage).
    # The paper's tower family at CPU scale; `tiny` is the same model with a convolutional tower.
    "tiny-swin": {
        "vision_config": {
            "image_size": 64,
            "patch_size": 4,
            "embed_dim": 48,
            "depths": [2, 2, 2],
            "num_heads": [3, 6, 12],
            "window_size": 4,
            "drop_path_rate": 0.0,
            "dense_stage": 1,
        },
        "text_config": {
            **BERT_SMALL,
            "vocab_size": 2048,
            "hidden_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 512,
            "max_position_embeddings": 64,
        },
        "projection_dim": 128,
        "num_regions": 16,
        # Synthetic objects span 14-44% of the image side (1-4 cells of the 8x8 grid). A box centred
        # on a cell covers an odd number of cell centres: these sides give 3x3 and 5x5 regions. A
        # one-cell region is useless: the interaction of a single player is 0 by definition.
        "region_anchor_sizes": [0.3, 0.55],
        # Mean pooling (the paper's choice) made the tiny model's similarity maps inverted, so no
        # region loss could localise; max pooling costs more per sample, so fewer samples.
        "image_pooling": "max",
        "shapley_num_samples": 30,
        # Token-level labels lose little from 30 to 15 samples and cost half.
        "shapley_token_num_samples": 15,
        # Cheaper UNSIL at the same label quality (docs/design_choices.md).
        "unsil_architecture": "mlp_dot_attention",
        "unsil_region_pooling": "max",
        "unsil_hidden_dim": 64,
        "unsil_warmup_steps": 200,
        # Sampling v2 is cheaper than predicting it at this size (see `unsil_levels`).
        "unsil_levels": ["token"],
        # FSA's gradient through max-pooled loose regions taught the patches around an object to
        # look like its phrase, turning the similarity maps against the boxes that fit
        # (docs/design_choices.md, "FSA without the image gradient").
        "fsa_image_gradient": False,
        # Detection and grounding: 64 regions, each box refined to the most confident candidate
        # around it (`box_refinement_iou`), ranked by similarity plus 3 x TSA's confidence. Tuned on
        # validation images 256-511 of the shape recipe's model (docs/design_choices.md, "Which
        # object, then which box"): mAP@0.5 0.078 -> 0.19, grounding 0.21 -> 0.42.
        "detection_num_regions": 64,
        "detection_objectness_weight": 3.0,
        # Each box the mean of the 6 most confident candidates at IoU >= 0.2 around the region,
        # tuned on the same images with FSA's image gradient off (grounding 0.54 -> 0.63; docs/
        # design_choices.md, "FSA without the image gradient").
        "box_refinement_iou": 0.2,
        "box_refinement_candidates": 6,
    },
}

# `tiny-swin` with a ResNet-10 image tower (1.3M parameters, as the Swin's) on the same 8x8 dense grid:
# from scratch on small data a convolutional tower learns shape far faster than a Swin (single
# objects, shape-only captions, 300 contrastive steps: 0.79 of the shapes against 0.17), and it keeps
# more on the second renderer (docs/design_choices.md, "A convolutional image tower").
LOUPE_PRESETS["tiny"] = {
    **copy.deepcopy(LOUPE_PRESETS["tiny-swin"]),
    "vision_config": {
        **LOUPE_PRESETS["tiny-swin"]["vision_config"],
        "convolutional_backbone": "resnet10t",
    },
}

# `tiny` at 128 px: the same towers, a 16x16 dense grid. Trained with shape labels, the tiny Swin read
# the shape of 0.50 of the objects at 64 px and 0.92 at 128 px (benchmarks/shape_ceiling.py,
# docs/design_choices.md), and only the finer grid lets boxes fit small objects.
LOUPE_PRESETS["tiny-128"] = {
    **copy.deepcopy(LOUPE_PRESETS["tiny"]),
    "vision_config": {**LOUPE_PRESETS["tiny"]["vision_config"], "image_size": 128},
    # Square anchors from which 99% of the synthetic objects (1/8 to 1/2 of the side) have a box
    # at IoU >= 0.5 on the 16x16 grid (69% for tiny's [0.3, 0.55] on its 8x8 grid); each spans
    # at least two cells, so its interaction is defined.
    "region_anchor_sizes": [0.15, 0.22, 0.32, 0.46],
}

# `tiny` with patch size 2: the same 64 px images and towers, tokens on a 16x16 grid with `tiny-128`'s
# anchors. What the main job and the CPU shape recipe train: without a first stage on single
# objects the finer grid alone did not help (grounding 0.07 against 0.11), with it shape on
# ground-truth boxes went from 0.15 to 0.70 (docs/design_choices.md, "A convolutional image tower").
LOUPE_PRESETS["tiny-fine-grid"] = {
    **copy.deepcopy(LOUPE_PRESETS["tiny"]),
    "vision_config": {**LOUPE_PRESETS["tiny"]["vision_config"], "patch_size": 2},
    "region_anchor_sizes": list(LOUPE_PRESETS["tiny-128"]["region_anchor_sizes"]),
}

__all__ = ["DEFAULT_PROMPT_TEMPLATE", "LOUPE_PRESETS", "LoupeConfig", "LoupeVisionConfig"]
