"""LOUPE pre-training: the dual encoder plus the CMC, TSA, FSA and UNSIL objectives (METHOD §3)."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers.dynamic_module_utils import custom_object_save
from transformers.utils import ModelOutput

from ..configuration_loupe import LoupeConfig
from ..losses import (
    cmc_loss,
    counts_per_process,
    fsa_loss,
    gather_with_gradient,
    is_distributed,
    region_phrase_logits,
    share_of_global_mean,
    sum_over_processes,
    tsa_loss,
)
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
from ..shapley.coalitions import DrawStreams, keyed_uniforms, stream_key
from .labels import (
    InteractionLabels,
    interaction_labels,
    join_interaction_labels,
    normalize_interactions,
    sampling_arguments,
    tsa_label_values,
)
from .unsil import build_unsil

# Momentum of the similarity offset used to calibrate zero-shot detection scores.
OFFSET_MOMENTUM = 0.98
# Seed of every label stream: a step's labels are a function of the step counter and of the
# samples (and their global indices) alone.
LABEL_SEED = 17


@dataclass(frozen=True)
class BatchPlacement:
    """Where this process's samples sit in the step's global batch.

    The global batch is taken to be the processes' local batches side by side in rank order: what
    Accelerate's sharding gives the Trainer (process r takes the r-th of each run of `world`
    consecutive batches, or the r-th slice of a split batch), so a sample has the index it would
    have in one process's batch of the same samples. Local batches may differ in size.

    Attributes:
        sample_index: int64 `[b]`, the global index of each local sample.
        num_samples: samples in the global batch.
        num_phrase_images: images with at least one phrase in the global batch (FSA's mean).
    """

    sample_index: torch.Tensor
    num_samples: int
    num_phrase_images: int


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
        region_confidence: mean confidence c(R) of the selected regions (0 when neither TSA nor FSA
            is on: the backbone does not run the region module).
        region_size: mean side (fraction of the image) of the selected boxes (0 likewise).
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

    The randomness of a step is a function of the step counter and the samples, never of the
    process rank, so a resumed run continues exactly and a batch split over processes gets the
    labels of the whole batch: coalitions come from streams keyed by (step, level) — shared by the
    samples of the step, which lets the engine evaluate shared coalitions once, and independent of
    padding (`shapley.coalitions`) — and UNSIL's gate draws u per target from a counter-based
    stream keyed by (step, level, global sample index, target) (`BatchPlacement`). Whatever couples
    samples (the CMC negatives, the running interaction scale, the means of every loss, the
    similarity offset) uses totals over all processes. Dropout is the exception: its masks are
    drawn per process (docs/design_choices.md).
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
        negative_input_ids: torch.Tensor | None = None,
        negative_attention_mask: torch.Tensor | None = None,
        negative_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> LoupePreTrainingOutput | tuple:
        """Computes every enabled loss for a batch of image–caption pairs.

        Args:
            pixel_values (`[b, 3, H, W]`), input_ids / attention_mask / token_type_ids (`[b, L]`): as for
                [`LoupeModel`].
            phrase_masks (`[b, M, L]`, *optional*): caption phrases from [`LoupeProcessor`]; FSA needs them.
            negative_input_ids / negative_attention_mask (`[b, L']`), negative_mask (`[b]`), *optional*:
                one hard negative caption per pair (`LoupeDataCollator(hard_negatives=True)`), added to the
                CMC loss's image-to-text negatives.
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
            # Only TSA and FSA use regions: the CMC-only backbone skips the region module.
            output_regions=config.use_tsa or config.use_fsa,
        )
        # One gather serves the CMC negatives and the similarity offset.
        image_embeds, text_embeds = (
            gather_with_gradient(out.image_embeds),
            gather_with_gradient(out.text_embeds),
        )
        negatives = self.negative_text_embeds(negative_input_ids, negative_attention_mask)
        cmc = cmc_loss(
            image_embeds,
            text_embeds,
            self.loupe.logit_scale,
            gather=False,
            negative_text_embeds=None if negatives is None else gather_with_gradient(negatives),
            negative_mask=None
            if negatives is None
            else self._gathered_mask(negative_mask, negatives),
        )
        zero = cmc.new_zeros(())
        has_phrases = phrase_masks is not None and phrase_masks.shape[1] > 0
        placement = self.batch_placement(
            input_ids.shape[0],
            int((phrase_masks.sum(-1) > 0).any(-1).sum()) if has_phrases else 0,
            input_ids.device,
        )
        tsa, tsa_labels = zero, None
        if config.use_tsa:
            tsa, tsa_labels = self.token_level(
                out, pixel_values, input_ids, attention_mask, placement
            )
        fsa, fsa_labels = zero, None
        if config.use_fsa and has_phrases:
            fsa, fsa_labels = self.semantic_level(out, phrase_masks, placement)
        elif config.use_fsa and self.semantic_unsil is not None:
            # No phrase here, maybe some on another process: join its sums over processes.
            fsa_labels = join_interaction_labels(
                sum_over_processes,
                input_ids.device,
                self.semantic_interaction_scale,
                self.training,
            )
            # And hand the unused predictor's zero gradient to the reduction: FSDP reduce-scatters
            # the same parameters on every process (a mismatch aborts gloo and hangs NCCL).
            fsa = sum((p.sum() for p in self.semantic_unsil.parameters()), zero) * 0.0
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
            self._track_similarity_offset(image_embeds.detach(), text_embeds.detach())
        output = LoupePreTrainingOutput(
            loss=loss,
            cmc_loss=cmc.detach(),
            tsa_loss=tsa.detach(),
            fsa_loss=fsa.detach(),
            unsil_loss=unsil.detach(),
            **_unsil_statistics("tsa", tsa_labels, zero),
            **_unsil_statistics("fsa", fsa_labels, zero),
            region_confidence=_mean_or_zero(out.region_scores, zero),
            region_size=_mean_or_zero(
                None if out.region_boxes is None else out.region_boxes[..., 2:], zero
            ),
            logits_per_image=out.logits_per_image.detach(),
        )
        return_dict = return_dict if return_dict is not None else config.return_dict
        return output if return_dict else output.to_tuple()

    def negative_text_embeds(
        self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """L2-normalised embeddings `[b, P]` of the hard negative captions, or None without them."""
        if input_ids is None:
            return None
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        words = self.loupe.encode_text(input_ids, attention_mask)
        return F.normalize(self.loupe.text_embeds_from_tokens(words, attention_mask), dim=-1)

    @staticmethod
    def _gathered_mask(mask: torch.Tensor | None, negatives: torch.Tensor) -> torch.Tensor:
        if mask is None:
            mask = torch.ones(len(negatives), dtype=torch.bool, device=negatives.device)
        # Gathered as numbers: the all-gather carries floating-point tensors.
        return gather_with_gradient(mask.to(negatives.dtype)) > 0.5

    # --- TSA ----------------------------------------------------------------------------------------
    def token_level(
        self,
        out: LoupeOutput,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        placement: BatchPlacement,
    ) -> tuple[torch.Tensor, InteractionLabels]:
        """L_TSA of the batch (this process's share of the global mean) and its raw labels: the
        token-level interaction of each selected region (game v1, hard masks), sampled or
        predicted by the token-level UNSIL."""
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
                # One stream for the step's token games: their coalitions are shared.
                generator = self.label_streams(pixel_values.device, "token")
                return selected_interactions(
                    game.select_rows,
                    targets,
                    selected,
                    **sampling_arguments(self.config, "token", generator),
                )

            labels = self._interaction_labels(
                estimate,
                valid,
                self.token_unsil,
                predictor_inputs,
                "token",
                placement,
                (region_masks.shape[1],),
            )
        normalized = normalize_interactions(
            tsa_label_values(labels.raw, region_masks, self.config.tsa_label),
            method=self.config.interaction_normalization,
        )

        confidence_logits = out.candidate_logits.gather(1, out.region_indices)
        num_regions = confidence_logits.shape[1]
        loss = share_of_global_mean(
            tsa_loss(confidence_logits, normalized),
            confidence_logits.numel(),
            placement.num_samples * num_regions,
        )
        return loss, labels

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
        self, out: LoupeOutput, phrase_masks: torch.Tensor, placement: BatchPlacement
    ) -> tuple[torch.Tensor, InteractionLabels]:
        """L_FSA of the batch (this process's share of the global mean) and its raw labels
        `[B, K, M]`: the semantics-level interaction of every region-phrase pair (game v2), sampled
        or predicted by the semantics-level UNSIL."""
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
                    return self._semantic_interactions(make_game, phrase_valid, index)

                return selected_images_interactions(all_pairs, selected)

            labels = self._interaction_labels(
                estimate,
                valid,
                self.semantic_unsil,
                predictor_inputs,
                "semantic",
                placement,
                (num_regions, num_phrases),
            )
        raw = labels.raw.reshape(-1, num_regions, num_phrases)
        labels.raw = raw
        valid_pairs = valid.reshape_as(raw)
        normalized = normalize_interactions(
            raw, valid_pairs, self.config.interaction_normalization, dims=2
        )
        config = self.config
        region_embeds = out.region_embeds
        if not config.fsa_image_gradient:
            region_embeds = region_embeds.detach()
        logits = region_phrase_logits(region_embeds, out.phrase_embeds, self.loupe.logit_scale)
        region_weights = None
        if config.fsa_region_weighting == "confidence":
            confidence = out.region_scores.detach().float()
            region_weights = confidence / confidence.mean(-1, keepdim=True).clamp_min(1e-6)
        loss = share_of_global_mean(
            fsa_loss(
                logits,
                normalized,
                phrase_valid,
                region_weights=region_weights,
                both_directions=config.fsa_direction == "both",
            ),
            int(phrase_valid.any(-1).sum()),
            placement.num_phrase_images,
        )
        return loss, labels

    def _semantic_interactions(
        self,
        make_game: Callable[[torch.Tensor], object],
        phrase_valid: torch.Tensor,
        index: torch.Tensor,
    ) -> torch.Tensor:
        """Sampled interactions `[B', K·M]` of every pair of the images `index`, one game per set of
        real phrases. Each set has its own stream, keyed by the set: `region_phrase_interactions`
        estimates an image as a game of its real players, so its coalitions then depend on its
        own phrases only, not on which other images (and how much padding) the batch holds."""
        patterns, group = torch.unique(phrase_valid[index], dim=0, return_inverse=True)
        values = None
        for number, pattern in enumerate(patterns):
            members = (group == number).nonzero()[:, 0]
            real = pattern.nonzero()[:, 0].tolist()
            generator = self.label_streams(phrase_valid.device, "semantic", len(real), *real)
            estimate = region_phrase_interactions(
                make_game(index[members]), **sampling_arguments(self.config, "semantic", generator)
            ).values
            if values is None:
                values = estimate.new_zeros(index.shape[0], *estimate.shape[1:])
            values[members] = estimate
        return values.reshape(index.shape[0], -1)

    def _interaction_labels(
        self,
        estimate: Callable[[torch.Tensor], torch.Tensor],
        valid: torch.Tensor,
        predictor: torch.nn.Module | None,
        predictor_inputs: dict[str, torch.Tensor] | None,
        level: str,
        placement: BatchPlacement,
        target_shape: tuple[int, ...],
    ) -> InteractionLabels:
        """`labels.interaction_labels` with this model's UNSIL settings and running scale, the gate's
        draws keyed by global sample index, and totals summed over processes (a process without
        phrases joins the semantic level's sums in `forward`)."""
        gate_draws = None
        if predictor is not None:
            # Drawn per target coordinate ((k,) or (k, j)), so phrase padding shifts no draw.
            gate_draws = keyed_uniforms(
                self.label_key(f"{level}-gate"), placement.sample_index, target_shape
            ).reshape(valid.shape)
        return interaction_labels(
            estimate,
            valid,
            predictor=predictor,
            predictor_inputs=predictor_inputs,
            gate_draws=gate_draws,
            sum_over_processes=sum_over_processes,
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

    def label_key(self, stream: str, *key: int) -> int:
        """The seed of one of this step's label streams: a function of `LABEL_SEED`, the step
        counter, the stream's name and `key`, never of the process."""
        name = zlib.crc32(stream.encode())  # `hash(str)` is salted per process
        return stream_key(LABEL_SEED, int(self.training_steps.item()), name, *key)

    def label_streams(self, device: torch.device, stream: str, *key: int) -> DrawStreams:
        """Coalition draws on `device` keyed by `label_key(stream, *key)`, independent of padding
        (`shapley.coalitions.DrawStreams`)."""
        return DrawStreams.keyed(self.label_key(stream, *key), device)

    def batch_placement(
        self, batch: int, phrase_images: int, device: torch.device
    ) -> BatchPlacement:
        """Places this process's `batch` samples (`phrase_images` of them with phrases) in the
        global batch, with one all-gather of the per-process counts (see `BatchPlacement`)."""
        counts = counts_per_process([batch, phrase_images], device)
        rank = dist.get_rank() if is_distributed() else 0
        offset = int(counts[:rank, 0].sum())
        num_samples, num_phrase_images = (int(value) for value in counts.sum(0))
        return BatchPlacement(
            torch.arange(offset, offset + batch, device=device), num_samples, num_phrase_images
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves the whole pre-training model (UNSIL included, for resuming) plus the code of
        `LoupeModel`, so `AutoModel.from_pretrained(..., trust_remote_code=True)` loads its encoders."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True) and LoupeModel._auto_class is not None:
            custom_object_save(self.loupe, save_directory, config=self.config)
            self.config.auto_map = {**(self.config.auto_map or {}), **REMOTE_CODE_AUTO_MAP}
            self.config.save_pretrained(save_directory)
        return result


def _mean_or_zero(values: torch.Tensor | None, zero: torch.Tensor) -> torch.Tensor:
    """The detached mean of `values`, or `zero` when they were not computed."""
    return zero if values is None else values.detach().mean()


def _unsil_statistics(
    prefix: str, labels: InteractionLabels | None, zero: torch.Tensor
) -> dict[str, torch.Tensor]:
    if labels is None:
        return {f"{prefix}_unsil_{name}": zero for name in ("share", "error", "sigma")}
    return labels.statistics(prefix, zero)


__all__ = ["LoupeForPreTraining", "LoupePreTrainingOutput"]
