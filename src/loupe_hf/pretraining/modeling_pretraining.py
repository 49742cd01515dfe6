"""LOUPE pre-training: the dual encoder plus the CMC, TSA, FSA and UNSIL objectives (METHOD §3)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers.dynamic_module_utils import custom_object_save
from transformers.utils import ModelOutput

from ..configuration_loupe import LoupeConfig
from ..losses import cmc_loss, fsa_loss, region_phrase_logits, tsa_loss
from ..modeling_loupe import REMOTE_CODE_AUTO_MAP, LoupeModel, LoupeOutput, LoupePreTrainedModel
from ..shapley import (
    TokenGame,
    region_phrase_interactions,
    region_targets,
    selected_images_interactions,
    selected_interactions,
    semantic_game,
    token_game,
)
from .labels import (
    InteractionLabels,
    interaction_labels,
    normalize_interactions,
    sampling_arguments,
    tsa_label_values,
)
from .unsil import build_unsil

# Momentum of the similarity offset used to calibrate zero-shot detection scores.
OFFSET_MOMENTUM = 0.98


@dataclass
class LoupePreTrainingOutput(ModelOutput):
    """Output of [`LoupeForPreTraining`]: the total loss and every component, each a scalar.

    Args:
        loss: weighted sum of the enabled losses.
        cmc_loss / tsa_loss / fsa_loss / unsil_loss: the components (0 when switched off).
        tsa_unsil_share / fsa_unsil_share: share of that level's labels that came from UNSIL (the
            rest were sampled); 0 without UNSIL or during warm-up.
        tsa_unsil_error / fsa_unsil_error: UNSIL's mean absolute error against the sampled labels, in
            units of the running interaction scale.
        tsa_unsil_sigma / fsa_unsil_sigma: mean predicted uncertainty σ.
        region_confidence: mean confidence c(R) of the selected regions.
        region_size: mean side (fraction of the image) of the selected boxes.
        logits_per_image: `[b, b]` scaled image–text similarities of this process's pairs.
    """

    loss: torch.FloatTensor | None = None
    cmc_loss: torch.FloatTensor | None = None
    tsa_loss: torch.FloatTensor | None = None
    fsa_loss: torch.FloatTensor | None = None
    unsil_loss: torch.FloatTensor | None = None
    tsa_unsil_share: torch.FloatTensor | None = None
    tsa_unsil_error: torch.FloatTensor | None = None
    tsa_unsil_sigma: torch.FloatTensor | None = None
    fsa_unsil_share: torch.FloatTensor | None = None
    fsa_unsil_error: torch.FloatTensor | None = None
    fsa_unsil_sigma: torch.FloatTensor | None = None
    region_confidence: torch.FloatTensor | None = None
    region_size: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None


class LoupeForPreTraining(LoupePreTrainedModel):
    """LOUPE with its pre-training objectives: L = L_CMC + L_TSA + L_FSA (+ L_UNSIL), weighted by the
    config's `*_loss_weight`, each switchable (`use_tsa`, `use_fsa`, `use_unsil`), so the paper's
    ablation rows are config flags: backbone (all off), +TSA, +TSA+FSA (sampling), +UNSIL
    (`unsil_levels` says which levels UNSIL predicts).

    Interaction labels come from the Shapley engine (`loupe_hf.shapley`): the token-level game v1
    for TSA (targets: the selected regions, hard masks) and the semantics-level game v2 for FSA
    (targets: all region–phrase pairs). With UNSIL, a predictor per level gives Î and σ for every
    target; a target is sampled (and trains UNSIL) when u ~ U(0,1) ≤ σ or during the first
    `unsil_warmup_steps` training steps, and takes Î otherwise (METHOD §3.5). UNSIL sees detached
    features: it learns from the encoders and never pushes gradients into them.

    The randomness of a step (which targets are sampled, which coalitions) comes from a generator
    seeded by the step counter and the process rank, so a resumed run continues exactly.
    """

    def __init__(self, config: LoupeConfig):
        super().__init__(config)
        self.loupe = LoupeModel(config)
        vision, text = config.vision_config.hidden_size, config.text_config.hidden_size
        unsil = {"architecture": config.unsil_architecture, "hidden_dim": config.unsil_hidden_dim}
        self.token_unsil = None
        self.semantic_unsil = None
        if config.use_unsil and config.use_tsa and "token" in config.unsil_levels:
            self.token_unsil = build_unsil(
                level="token",
                image_dim=vision,
                text_dim=text,
                region_pooling=config.unsil_region_pooling,
                **unsil,
            )
        if config.use_unsil and config.use_fsa and "semantic" in config.unsil_levels:
            dim = config.projection_dim
            self.semantic_unsil = build_unsil(
                level="semantic", image_dim=dim, text_dim=dim, **unsil
            )
        self.register_buffer("training_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("token_interaction_scale", torch.zeros(()))
        self.register_buffer("semantic_interaction_scale", torch.zeros(()))
        self.post_init()

    def unsil_parameters(self):
        """Parameters of the UNSIL predictors (trained by L_UNSIL only)."""
        for predictor in (self.token_unsil, self.semantic_unsil):
            if predictor is not None:
                yield from predictor.parameters()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        phrase_masks: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> LoupePreTrainingOutput | tuple:
        """Computes every enabled loss for a batch of image–caption pairs.

        Args:
            pixel_values (`[b, 3, H, W]`), input_ids / attention_mask / token_type_ids (`[b, L]`): as for
                [`LoupeModel`].
            phrase_masks (`[b, M, L]`, *optional*): caption phrases from [`LoupeProcessor`]; FSA needs them.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        config = self.config
        out = self.loupe(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            phrase_masks=phrase_masks,
        )
        cmc = cmc_loss(out.image_embeds, out.text_embeds, self.loupe.logit_scale)
        zero = cmc.new_zeros(())
        generator = self.step_generator(pixel_values.device)
        tsa, tsa_labels = zero, None
        if config.use_tsa:
            tsa, tsa_labels = self.token_level(
                out, pixel_values, input_ids, attention_mask, generator
            )
        fsa, fsa_labels = zero, None
        if config.use_fsa and phrase_masks is not None and phrase_masks.shape[1] > 0:
            fsa, fsa_labels = self.semantic_level(out, phrase_masks, generator)
        unsil = sum(
            (labels.unsil_loss for labels in (tsa_labels, fsa_labels) if labels is not None), zero
        )
        loss = (
            config.cmc_loss_weight * cmc
            + config.tsa_loss_weight * tsa
            + config.fsa_loss_weight * fsa
            + config.unsil_loss_weight * unsil
        )
        if self.training:
            self.training_steps += 1
            self._track_similarity_offset(out.image_embeds.detach(), out.text_embeds.detach())
        output = LoupePreTrainingOutput(
            loss=loss,
            cmc_loss=cmc.detach(),
            tsa_loss=tsa.detach(),
            fsa_loss=fsa.detach(),
            unsil_loss=unsil.detach(),
            **_unsil_statistics("tsa", tsa_labels, zero),
            **_unsil_statistics("fsa", fsa_labels, zero),
            region_confidence=out.region_scores.detach().mean(),
            region_size=out.region_boxes[..., 2:].detach().mean(),
            logits_per_image=out.logits_per_image.detach(),
        )
        return_dict = return_dict if return_dict is not None else config.return_dict
        return output if return_dict else output.to_tuple()

    # --- TSA ----------------------------------------------------------------------------------------
    def token_level(
        self,
        out: LoupeOutput,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, InteractionLabels]:
        """L_TSA of the batch and its raw labels: the token-level interaction of each selected
        region (game v1, hard masks), sampled or predicted by the token-level UNSIL."""
        region_masks, game = self.token_level_game(out, pixel_values, input_ids, attention_mask)
        patch_tokens, word_tokens = (
            out.patch_tokens.detach().float(),
            out.word_tokens.detach().float(),
        )
        # Interactions are small differences of similarities: compute them in float32 even when
        # training runs under bf16 autocast.
        with torch.autocast(pixel_values.device.type, enabled=False):
            targets = region_targets(region_masks, input_ids.shape[1])
            predictor_inputs = None
            if self.token_unsil is not None:
                predictor_inputs = {
                    "patch_tokens": patch_tokens,
                    "word_tokens": word_tokens,
                    "word_mask": attention_mask,
                    "region_masks": region_masks.float(),
                }
            valid = torch.ones(region_masks.shape[:2], dtype=torch.bool, device=region_masks.device)

            def estimate(selected: torch.Tensor) -> torch.Tensor:
                # One game per chosen region: only the regions UNSIL is unsure of pay for samples.
                return selected_interactions(
                    game.select_rows,
                    targets,
                    selected,
                    **sampling_arguments(self.config, "token", generator),
                )

            labels = self._interaction_labels(
                estimate, valid, self.token_unsil, predictor_inputs, "token", generator
            )
        normalized = normalize_interactions(
            tsa_label_values(labels.raw, region_masks, self.config.tsa_label),
            method=self.config.interaction_normalization,
        )

        confidence_logits = out.candidate_logits.gather(1, out.region_indices)
        return tsa_loss(confidence_logits, normalized), labels

    def token_level_game(
        self,
        out: LoupeOutput,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, TokenGame]:
        """The selected regions' hard masks `[B, K, N1]` and the batch's token-level game v1, built
        in float32 from the forward pass's detached tokens (the players TSA's labels are about)."""
        region_masks = self.loupe.region_masks(out.region_boxes.detach(), soft=False)
        with torch.autocast(pixel_values.device.type, enabled=False):
            game = token_game(
                self.loupe,
                pixel_values,
                input_ids,
                attention_mask,
                mode=self.config.token_game_mode,
                image_pooling=self.config.image_pooling,
                patch_tokens=out.patch_tokens.detach().float(),
                word_tokens=out.word_tokens.detach().float(),
            )
        return region_masks, game

    # --- FSA ----------------------------------------------------------------------------------------
    def semantic_level(
        self, out: LoupeOutput, phrase_masks: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, InteractionLabels]:
        """L_FSA of the batch and its raw labels `[B, K, M]`: the semantics-level interaction of
        every region-phrase pair (game v2), sampled or predicted by the semantics-level UNSIL."""
        phrase_valid = phrase_masks.sum(-1) > 0
        num_regions, num_phrases = out.region_embeds.shape[1], phrase_masks.shape[1]
        scale = self.loupe.logit_scale.exp().detach()
        region_embeds, phrase_embeds = (
            out.region_embeds.detach().float(),
            out.phrase_embeds.detach().float(),
        )
        valid = (
            phrase_valid[:, None, :].expand(-1, num_regions, -1).reshape(phrase_valid.shape[0], -1)
        )
        with torch.autocast(phrase_masks.device.type, enabled=False):

            def make_game(index: torch.Tensor):
                return semantic_game(
                    region_embeds.index_select(0, index),
                    phrase_embeds.index_select(0, index),
                    phrase_valid[index],
                    temperature=1 / scale.item(),
                )

            predictor_inputs = None
            if self.semantic_unsil is not None:
                predictor_inputs = {
                    "region_embeds": region_embeds,
                    "phrase_embeds": phrase_embeds,
                    "phrase_mask": phrase_valid,
                }

            def estimate(selected: torch.Tensor) -> torch.Tensor:
                # v2 is cheap and a game's pairs share coalition evaluations: estimate every pair of
                # each image that has at least one pair to label.
                def all_pairs(index: torch.Tensor) -> torch.Tensor:
                    values = region_phrase_interactions(
                        make_game(index), **sampling_arguments(self.config, "semantic", generator)
                    ).values
                    return values.reshape(index.shape[0], -1)

                return selected_images_interactions(all_pairs, selected)

            labels = self._interaction_labels(
                estimate, valid, self.semantic_unsil, predictor_inputs, "semantic", generator
            )
        raw = labels.raw.reshape(-1, num_regions, num_phrases)
        labels.raw = raw
        valid_pairs = valid.reshape_as(raw)
        normalized = normalize_interactions(
            raw, valid_pairs, self.config.interaction_normalization, dims=2
        )
        logits = region_phrase_logits(out.region_embeds, out.phrase_embeds, self.loupe.logit_scale)
        return fsa_loss(logits, normalized, phrase_valid), labels

    def _interaction_labels(
        self,
        estimate: Callable[[torch.Tensor], torch.Tensor],
        valid: torch.Tensor,
        predictor: torch.nn.Module | None,
        predictor_inputs: dict[str, torch.Tensor] | None,
        level: str,
        generator: torch.Generator,
    ) -> InteractionLabels:
        """`labels.interaction_labels` with this model's UNSIL settings and running scale."""
        # No collective on the running scale: a process whose batch has no phrases skips FSA, and a
        # collective would then hang; DDP broadcasts rank 0's buffers before every forward anyway.
        return interaction_labels(
            estimate,
            valid,
            predictor=predictor,
            predictor_inputs=predictor_inputs,
            generator=generator,
            warmup=bool(self.training_steps < self.config.unsil_warmup_steps),
            min_sample_rate=self.config.unsil_min_sample_rate,
            uncertainty_weight=self.config.unsil_uncertainty_weight,
            scale=getattr(self, f"{level}_interaction_scale"),
            training=self.training,
        )

    @torch.no_grad()
    def _track_similarity_offset(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor
    ) -> None:
        """Moves the model's `similarity_offset` towards the midpoint between the mean cosine of
        matched and of unmatched image–caption pairs in this batch; zero-shot detection subtracts it
        from region–query cosines, so its sigmoid scores threshold sensibly without box labels."""
        if image_embeds.shape[0] < 2:
            return
        cosine = image_embeds.float() @ text_embeds.float().t()
        matched = cosine.diagonal().mean()
        unmatched = (cosine.sum() - cosine.diagonal().sum()) / (cosine.numel() - cosine.shape[0])
        midpoint = (matched + unmatched) / 2
        offset = self.loupe.similarity_offset
        offset.copy_(
            midpoint
            if self.training_steps.item() <= 1
            else OFFSET_MOMENTUM * offset + (1 - OFFSET_MOMENTUM) * midpoint
        )

    def step_generator(self, device: torch.device) -> torch.Generator:
        """The generator of this step's random draws (sampled targets, coalitions): seeded by the step
        counter and the process rank, so a resumed run continues exactly."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        generator = torch.Generator(device=device)
        generator.manual_seed(int(self.training_steps.item()) * 1_000_003 + rank * 7919 + 17)
        return generator

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves the whole pre-training model (UNSIL included, for resuming) plus the code of
        `LoupeModel`, so `AutoModel.from_pretrained(..., trust_remote_code=True)` loads its encoders."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True) and LoupeModel._auto_class is not None:
            custom_object_save(self.loupe, save_directory, config=self.config)
            self.config.auto_map = {**(self.config.auto_map or {}), **REMOTE_CODE_AUTO_MAP}
            self.config.save_pretrained(save_directory)
        return result


def _unsil_statistics(
    prefix: str, labels: InteractionLabels | None, zero: torch.Tensor
) -> dict[str, torch.Tensor]:
    if labels is None:
        return {f"{prefix}_unsil_{name}": zero for name in ("share", "error", "sigma")}
    return labels.statistics(prefix, zero)


__all__ = ["LoupeForPreTraining", "LoupePreTrainingOutput"]
