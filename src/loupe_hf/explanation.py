"""What LOUPE sees in one image-caption pair: its interaction labels (METHOD §3.3-3.5), computed
the way pre-training computes them, for a person to look at.

For one image, one caption with phrase spans and a [`LoupeModel`], `explain_pair` returns a
[`LoupeExplanation`]:

- **token level** (game v1, players = patch and word tokens): the interaction I([R_k]) of each of
  the most confident regions, the TSA label before normalisation; and a per-patch map whose cell p
  holds I([R]) of the most confident candidate box centred on p, i.e. what the confidence of p's
  box is trained towards;
- **semantics level** (game v2, players = the K regions and the M phrases): the region x phrase
  interaction matrix I([H_kj]), the FSA label before normalisation, next to the alignment matrix
  (softmax over phrases of the scaled region-phrase cosines) that FSA trains;
- **UNSIL**, when the checkpoint has it (`load_unsil`): the predicted Î and σ of the same targets,
  in the same units as the sampled values.

Every estimate goes through the Shapley engine (`loupe_hf.shapley`) with the estimator and sample
counts of the model's config (`sampling_arguments`), drawn from a generator seeded by `seed`, so an
explanation is reproducible; `exact=True` enumerates instead (small games only).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .configuration_loupe import LoupeConfig
from .modeling_loupe import LoupeModel, LoupeRegionOutput
from .pretraining.labels import sampling_arguments, update_interaction_scale
from .pretraining.modeling_pretraining import LoupeForPreTraining
from .pretraining.unsil import UnsilPredictor
from .shapley import (
    region_phrase_interactions,
    semantic_game,
    token_game,
    token_region_interactions,
)

DEFAULT_SEED = 0
UNSIL_LEVELS_SAVED = ("token", "semantic")
# Seed offsets of the two levels: each level has its own stream, so that changing one level's
# targets (e.g. how many regions are shown) never changes the other level's draws.
LEVEL_SEED_OFFSETS = {"token": 0, "semantic": 1_000_003}


# --- UNSIL predictors ------------------------------------------------------------------------------


@dataclass
class UnsilPrediction:
    """UNSIL's prediction for some targets, in the raw units of the sampled interactions.

    Attributes:
        interaction: Î, `[K]` (token level: regions) or `[K, M]` (semantic level: pairs).
        sigma: its uncertainty σ in (0, 1), same shape.
    """

    interaction: torch.Tensor
    sigma: torch.Tensor


@dataclass
class UnsilPredictors:
    """The UNSIL predictors of a pre-training checkpoint, with the running scales their outputs
    are measured in (`labels.update_interaction_scale`): Î x scale is an interaction.

    Attributes:
        token / semantic: the predictor of each level, or None when the checkpoint has none.
        token_scale / semantic_scale: the levels' running interaction scales (0: never trained).
        training_steps: pre-training steps the checkpoint had taken.
    """

    token: UnsilPredictor | None = None
    semantic: UnsilPredictor | None = None
    token_scale: float = 0.0
    semantic_scale: float = 0.0
    training_steps: int = 0

    @property
    def levels(self) -> list[str]:
        """The levels that have a predictor, `"token"` before `"semantic"`."""
        return [level for level in UNSIL_LEVELS_SAVED if getattr(self, level) is not None]

    @classmethod
    def from_pretraining_model(cls, model: LoupeForPreTraining) -> UnsilPredictors | None:
        """The predictors of a loaded [`LoupeForPreTraining`] (shared, not copied), or None."""
        if model.token_unsil is None and model.semantic_unsil is None:
            return None
        return cls(
            token=model.token_unsil,
            semantic=model.semantic_unsil,
            token_scale=float(model.token_interaction_scale),
            semantic_scale=float(model.semantic_interaction_scale),
            training_steps=int(model.training_steps),
        )

    @torch.no_grad()
    def predict_regions(
        self,
        patch_tokens: torch.Tensor,
        word_tokens: torch.Tensor,
        attention_mask: torch.Tensor,
        region_masks: torch.Tensor,
    ) -> UnsilPrediction | None:
        """Token level: Î and σ `[K]` of the regions `region_masks` (bool `[1, K, N1]`) of one
        pair, fed as in pre-training (`LoupeForPreTraining.token_level`); None without a predictor."""
        if self.token is None:
            return None
        output = _run(
            self.token,
            patch_tokens=patch_tokens.float(),
            word_tokens=word_tokens.float(),
            word_mask=attention_mask,
            region_masks=region_masks.float(),
        )
        return _in_raw_units(output.interaction[0], output.sigma[0], self.token_scale)

    @torch.no_grad()
    def predict_pairs(
        self, region_embeds: torch.Tensor, phrase_embeds: torch.Tensor, phrase_valid: torch.Tensor
    ) -> UnsilPrediction | None:
        """Semantic level: Î and σ `[K, M]` of every region-phrase pair of one image, fed as in
        pre-training (`LoupeForPreTraining.semantic_level`); None without a predictor."""
        if self.semantic is None:
            return None
        output = _run(
            self.semantic,
            region_embeds=region_embeds.float(),
            phrase_embeds=phrase_embeds.float(),
            phrase_mask=phrase_valid,
        )
        return _in_raw_units(output.interaction[0], output.sigma[0], self.semantic_scale)


def _run(predictor: UnsilPredictor, **inputs: torch.Tensor) -> Any:
    """The predictor on its own device (`load_unsil` materialises it on the CPU), outputs back on
    the inputs' device."""
    device = next(predictor.parameters()).device
    home = next(iter(inputs.values())).device
    output = predictor.eval()(**{name: value.to(device) for name, value in inputs.items()})
    return type(output)(interaction=output.interaction.to(home), sigma=output.sigma.to(home))


def _in_raw_units(interaction: torch.Tensor, sigma: torch.Tensor, scale: float) -> UnsilPrediction:
    # The unit pre-training divides sampled values by (1 until the scale has been measured).
    unit = update_interaction_scale(
        interaction.new_tensor(scale), interaction.new_empty(0), training=False
    )
    return UnsilPrediction(interaction * unit.to(interaction), sigma)


def load_unsil(
    checkpoint: str | os.PathLike, config: LoupeConfig | None = None, **hub_kwargs: Any
) -> UnsilPredictors | None:
    """The UNSIL predictors saved in a checkpoint (a directory or a Hub id), or None if it has none.

    [`LoupeForZeroShotDetection.from_pretrained`] drops UNSIL by design (`PRETRAINING_ONLY_KEYS`),
    so the predictors are read from the weights files themselves: the `token_unsil.*` and
    `semantic_unsil.*` tensors that [`LoupeForPreTraining`] (and so `LoupeTrainer` and
    `examples/pretrain.py`) saves, with the running interaction scales.

    Args:
        checkpoint: what `from_pretrained` takes.
        config: the checkpoint's config (read from `checkpoint` when omitted); it says which
            architecture each level's predictor has.
        **hub_kwargs: passed to `transformers.utils.cached_file` (e.g. `revision`, `token`).

    Raises:
        ValueError: when a level's weights are there but do not fit its predictor (a damaged file,
            or a config that is not the checkpoint's).
    """
    tensors = _pretraining_tensors(checkpoint, hub_kwargs)
    if not any(name.startswith(("token_unsil.", "semantic_unsil.")) for name in tensors):
        return None
    config = config or LoupeConfig.from_pretrained(checkpoint, **hub_kwargs)
    # Built on the meta device exactly as pre-training builds it, so the predictors can never
    # drift from the training code; only the two small predictors are then materialised.
    with torch.device("meta"):
        shell = LoupeForPreTraining(config)
    predictors = {
        level: _materialise(
            getattr(shell, f"{level}_unsil"), tensors, f"{level}_unsil.", checkpoint
        )
        for level in UNSIL_LEVELS_SAVED
    }
    if all(predictor is None for predictor in predictors.values()):
        return None
    return UnsilPredictors(
        **predictors,
        token_scale=_scalar(tensors, "token_interaction_scale"),
        semantic_scale=_scalar(tensors, "semantic_interaction_scale"),
        training_steps=int(_scalar(tensors, "training_steps")),
    )


def _materialise(
    module: UnsilPredictor | None,
    tensors: dict[str, torch.Tensor],
    prefix: str,
    checkpoint: str | os.PathLike,
) -> UnsilPredictor | None:
    state = {
        name[len(prefix) :]: value for name, value in tensors.items() if name.startswith(prefix)
    }
    if module is None or not state:
        return None
    module = module.to_empty(device="cpu")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"the {prefix.rstrip('.')} weights of {os.fspath(checkpoint)} do not fit the predictor "
            f"its config describes: {error}"
        ) from error
    return module.eval()


def _scalar(tensors: dict[str, torch.Tensor], name: str) -> float:
    return float(tensors[name]) if name in tensors else 0.0


def _pretraining_tensors(
    checkpoint: str | os.PathLike, hub_kwargs: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint's safetensors file(s) that only pre-training uses."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    wanted = ("token_unsil.", "semantic_unsil.", "token_interaction_scale")
    wanted += ("semantic_interaction_scale", "training_steps")
    tensors: dict[str, torch.Tensor] = {}
    for path in _weight_files(checkpoint, cached_file, hub_kwargs):
        with safe_open(path, framework="pt") as weights:
            names = weights.keys()  # a safetensors handle is not iterable itself
            for name in names:
                if name.startswith(wanted):
                    tensors[name] = weights.get_tensor(name)
    return tensors


def _weight_files(checkpoint: str | os.PathLike, cached_file: Any, hub_kwargs: dict) -> list[str]:
    """Local paths of the checkpoint's safetensors weights: one file, or the shards of an index."""

    def fetch(name: str) -> str | None:
        return cached_file(
            os.fspath(checkpoint), name, _raise_exceptions_for_missing_entries=False, **hub_kwargs
        )

    single = fetch("model.safetensors")
    if single is not None:
        return [single]
    index = fetch("model.safetensors.index.json")
    if index is None:
        return []
    with open(index) as handle:
        shards = sorted(set(json.load(handle)["weight_map"].values()))
    return [path for path in map(fetch, shards) if path is not None]


# --- the explanation -------------------------------------------------------------------------------


@dataclass
class LoupeExplanation:
    """Interaction labels of one image-caption pair (see the module docstring).

    Regions are the model's proposals sorted by confidence, the first `K` shown; phrases are the
    caption's `M` phrases. Interactions are raw (before the per-image normalisation of the losses).

    Attributes:
        boxes: `[K, 4]` normalised (cx, cy, w, h), on the token grid (`LoupeModel.grid_to_image`
            places them on the image).
        confidences: `[K]` region confidences c(R), descending.
        region_masks: bool `[K, N1]`, the patches of each region (hard box masks, as in TSA).
        token_interactions / token_stderr: `[K]` I([R_k]) in game v1 and its standard error.
        patch_map / patch_map_stderr: `[G, G]` I([R]) of the most confident candidate box centred on
            each patch of the `G x G` grid, and its standard error.
        patch_map_boxes: `[G * G, 4]` those boxes, normalised (cx, cy, w, h), row-major.
        alignment: `[K, M]` softmax over phrases of the scaled region-phrase cosines.
        semantic_interactions / semantic_stderr: `[K, M]` I([H_kj]) in game v2 (all proposals and
            phrases are players, as in FSA) and its standard error.
        token_unsil / semantic_unsil: UNSIL's Î and σ for the same targets, or None.
        token_samples / semantic_samples: coalition samples per target (None: exact enumeration).
        seed: the seed of the draws.
    """

    boxes: torch.Tensor
    confidences: torch.Tensor
    region_masks: torch.Tensor
    token_interactions: torch.Tensor
    token_stderr: torch.Tensor
    patch_map: torch.Tensor
    patch_map_stderr: torch.Tensor
    patch_map_boxes: torch.Tensor
    alignment: torch.Tensor
    semantic_interactions: torch.Tensor
    semantic_stderr: torch.Tensor
    token_unsil: UnsilPrediction | None
    semantic_unsil: UnsilPrediction | None
    token_samples: int | None
    semantic_samples: int | None
    seed: int

    @property
    def grid_size(self) -> int:
        return self.patch_map.shape[-1]


@torch.no_grad()
def explain_pair(
    model: LoupeModel,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    phrase_masks: torch.Tensor,
    *,
    patch_tokens: torch.Tensor | None = None,
    num_regions: int | None = None,
    token_samples: int | None = None,
    semantic_samples: int | None = None,
    exact: bool = False,
    seed: int = DEFAULT_SEED,
    unsil: UnsilPredictors | None = None,
) -> LoupeExplanation:
    """Explains one processed image-caption pair (batch size 1, from [`LoupeProcessor`] with
    `phrase_spans`).

    Args:
        model: the dual encoder (`detector.loupe` of a [`LoupeForZeroShotDetection`]).
        pixel_values: `[1, 3, H, W]`.
        input_ids, attention_mask: `[1, L]`.
        phrase_masks: `[1, M, L]`; all-zero rows (truncated phrases) are padding and get no column
            values (NaN in `alignment` and 0 interactions, as in FSA).
        patch_tokens: the image's `[1, N1, Dv]` patch tokens when already computed (e.g. cached).
        num_regions: how many of the most confident proposals to explain (default: all of them).
        token_samples / semantic_samples: coalition samples per target; default: the config's
            (`sampling_arguments`), what pre-training labels use.
        exact: enumerate every coalition instead of sampling (games of at most 20 players).
        seed: seeds the draws of both levels (each has its own generator).
        unsil: the checkpoint's UNSIL predictors (`load_unsil`), to predict the same targets.
    """
    _check_single_pair(pixel_values, input_ids, phrase_masks)
    phrase_valid = phrase_masks.bool().any(-1)
    if not bool(phrase_valid.any()):
        raise ValueError("no phrase of the caption survived tokenisation; nothing to explain")
    if patch_tokens is None:
        patch_tokens = model.encode_image(pixel_values)
    word_tokens = model.encode_text(input_ids, attention_mask)
    proposals = model.propose_regions(patch_tokens)
    order = proposals.scores[0].argsort(descending=True)
    boxes = proposals.boxes[:, order]
    shown = min(num_regions or order.numel(), order.numel())
    region_masks = model.region_masks(boxes[:, :shown], soft=False)
    region_embeds = F.normalize(model.pool_regions(patch_tokens, boxes), dim=-1)
    phrase_embeds = F.normalize(model.pool_phrases(word_tokens, phrase_masks), dim=-1)

    # Token level: the shown regions and every patch's best box share one estimate, so a region
    # that is also a cell's box shows one value.
    token_arguments = _sampling(model, "token", token_samples, exact, seed)
    game = pair_token_game(
        model, pixel_values, input_ids, attention_mask, patch_tokens, word_tokens
    )
    centred_boxes, centred_masks = best_box_per_patch(model, proposals)
    values, stderr = region_interactions(
        game, torch.cat([region_masks, centred_masks], dim=1), **token_arguments
    )
    # Semantics level: every proposal is a player of v2, as in FSA, whatever is shown.
    semantic_arguments = _sampling(model, "semantic", semantic_samples, exact, seed)
    semantic_values, semantic_stderr = region_phrase_matrix(
        model, region_embeds, phrase_embeds, phrase_valid, **semantic_arguments
    )
    alignment = region_phrase_alignment(model, region_embeds, phrase_embeds, phrase_valid)[0]
    token_unsil = semantic_unsil = None
    if unsil is not None:
        token_unsil = unsil.predict_regions(patch_tokens, word_tokens, attention_mask, region_masks)
        semantic_unsil = _first_rows(
            unsil.predict_pairs(region_embeds, phrase_embeds, phrase_valid), shown
        )
    grid = model.grid_size
    return LoupeExplanation(
        boxes=boxes[0, :shown],
        confidences=proposals.scores[0, order[:shown]],
        region_masks=region_masks[0],
        token_interactions=values[:shown],
        token_stderr=stderr[:shown],
        patch_map=values[shown:].reshape(grid, grid),
        patch_map_stderr=stderr[shown:].reshape(grid, grid),
        patch_map_boxes=centred_boxes[0],
        alignment=alignment[:shown],
        semantic_interactions=semantic_values[:shown],
        semantic_stderr=semantic_stderr[:shown],
        token_unsil=token_unsil,
        semantic_unsil=semantic_unsil,
        token_samples=token_arguments["num_samples"],
        semantic_samples=semantic_arguments["num_samples"],
        seed=seed,
    )


def _check_single_pair(
    pixel_values: torch.Tensor, input_ids: torch.Tensor, phrase_masks: torch.Tensor
) -> None:
    sizes = {pixel_values.shape[0], input_ids.shape[0], phrase_masks.shape[0]}
    if sizes != {1}:
        raise ValueError(
            f"explain_pair explains one image-caption pair; got batch sizes {sorted(sizes)}"
        )


def _sampling(
    model: LoupeModel, level: str, samples: int | None, exact: bool, seed: int
) -> dict[str, Any]:
    """The engine's arguments for one level: the config's (as in pre-training) unless overridden,
    with the level's own seeded generator on the model's device (as pre-training draws)."""
    generator = torch.Generator(device=model.device)
    generator.manual_seed(seed + LEVEL_SEED_OFFSETS[level])
    arguments = sampling_arguments(model.config, level, generator)
    if exact:
        arguments["num_samples"] = None
    elif samples is not None:
        arguments["num_samples"] = int(samples)
    return arguments


def _first_rows(prediction: UnsilPrediction | None, rows: int) -> UnsilPrediction | None:
    """The prediction of the first `rows` regions (None stays None)."""
    if prediction is None:
        return None
    return UnsilPrediction(prediction.interaction[:rows], prediction.sigma[:rows])


def pair_token_game(
    model: LoupeModel,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    patch_tokens: torch.Tensor,
    word_tokens: torch.Tensor,
) -> Any:
    """The token-level game v1 of the pair, masked and pooled as the config says (what
    `LoupeForPreTraining.token_level_game` builds for TSA's labels)."""
    return token_game(
        model,
        pixel_values,
        input_ids,
        attention_mask,
        mode=model.config.token_game_mode,
        image_pooling=model.config.image_pooling,
        patch_tokens=patch_tokens,
        word_tokens=word_tokens,
    )


def best_box_per_patch(
    model: LoupeModel, proposals: LoupeRegionOutput
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every patch, the candidate box centred on it with the highest confidence (one of the
    anchor sizes, or the learned box): boxes `[1, N1, 4]` and their hard masks bool `[1, N1, N1]`."""
    num_patches = model.grid_size**2
    logits = proposals.candidate_logits[:1].reshape(1, num_patches, -1)
    per_patch = logits.shape[-1]
    chosen = torch.arange(num_patches, device=logits.device) * per_patch + logits.argmax(-1)[0]
    boxes = proposals.candidate_boxes[:1, chosen]
    return boxes, model.region_masks(boxes, soft=False)


def region_interactions(
    game: Any, region_masks: torch.Tensor, **sampling: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level interactions I([R]) `[T]` and standard errors `[T]` of one pair's regions
    (bool `[1, T, N1]`, repeats allowed), estimated by the engine (`token_region_interactions`).

    Each distinct region is estimated once, so a region that is also a cell's box of the patch map
    shows the same value in both."""
    distinct, inverse = torch.unique(region_masks[0], dim=0, return_inverse=True)
    estimate = token_region_interactions(game, distinct[None], **sampling)
    return estimate.values[0, inverse], estimate.stderr[0, inverse]


def region_phrase_matrix(
    model: LoupeModel,
    region_embeds: torch.Tensor,
    phrase_embeds: torch.Tensor,
    phrase_valid: torch.Tensor,
    **sampling: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics-level interactions I([H_kj]) `[K, M]` and standard errors of one image's region-phrase
    pairs, in the game v2 that FSA labels come from (`LoupeForPreTraining.semantic_level`: the
    logits are the cosines times the model's logit scale)."""
    scale = model.logit_scale.exp().item()
    game = semantic_game(region_embeds, phrase_embeds, phrase_valid, temperature=1 / scale)
    estimate = region_phrase_interactions(game, **sampling)
    return estimate.values[0], estimate.stderr[0]


def region_phrase_alignment(
    model: LoupeModel,
    region_embeds: torch.Tensor,
    phrase_embeds: torch.Tensor,
    phrase_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """`[B, K, M]` softmax over (real) phrases of the temperature-scaled region-phrase cosines: for
    each region, how its match splits across the caption's phrases (the paper's Fig. 5 view, and
    the ã of FSA). Padding phrases get NaN."""
    logits = model.logit_scale.exp() * region_embeds @ phrase_embeds.transpose(-1, -2)
    if phrase_valid is None:
        return torch.softmax(logits, dim=-1)
    valid = phrase_valid[:, None, :]
    softmax = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=-1)
    return softmax.masked_fill(~valid, float("nan"))


__all__ = [
    "DEFAULT_SEED",
    "LoupeExplanation",
    "UnsilPrediction",
    "UnsilPredictors",
    "best_box_per_patch",
    "explain_pair",
    "load_unsil",
    "pair_token_game",
    "region_interactions",
    "region_phrase_alignment",
    "region_phrase_matrix",
]
