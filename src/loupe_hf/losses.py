"""LOUPE's losses as plain tensor functions (METHOD §3): CMC (eq. 1) with its all-gather, TSA (eq. 8),
FSA (eq. 11) and UNSIL (eq. 12).

Each function takes tensors, not model outputs, so it can be tested alone; `LoupeForPreTraining`
wires them to the model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _AllGatherWithGradient(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the incoming gradients of every rank.

    Every rank computes the same global loss from the gathered features, so the gradient of a
    rank's own features is the sum of what all ranks send back; DDP then averages parameter
    gradients over ranks, which recovers exactly the single-process gradient of the global batch.
    Ranks may hold different numbers of rows (a batch that lost corrupt samples): rows are padded
    to the largest count for the collective and the padding is dropped again.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world_size, rank = dist.get_world_size(), dist.get_rank()
        count = torch.tensor([tensor.shape[0]], device=tensor.device)
        counts = [torch.zeros_like(count) for _ in range(world_size)]
        dist.all_gather(counts, count)
        counts = [int(c.item()) for c in counts]
        largest = max(counts)
        padded = torch.zeros(largest, *tensor.shape[1:], dtype=tensor.dtype, device=tensor.device)
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(parts, padded)
        ctx.counts, ctx.rank, ctx.largest = counts, rank, largest
        return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Processes sharing the batch (1 without an initialised process group)."""
    return dist.get_world_size() if is_distributed() else 1


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over all processes, as a new tensor without gradient
    (`tensor` itself on one process). Every process must call it, in the same order."""
    if not is_distributed():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def counts_per_process(counts: list[int], device: torch.device | str) -> torch.Tensor:
    """int64 `[world, len(counts)]`: every process's `counts` (one all-gather; `[1, len]` alone).
    E.g. local batch sizes, from which a process finds the global index of its first sample."""
    local = torch.tensor([counts], dtype=torch.long, device=device)
    if not is_distributed():
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts)


def share_of_global_mean(
    local_mean: torch.Tensor, local_count: float, global_count: float
) -> torch.Tensor:
    """This process's share of a mean over the whole (split) batch: `local_mean` (a mean over
    `local_count` terms) times `local_count · world / global_count`.

    DDP averages gradients over processes, and the Trainer averages logged losses over them: the
    average of the shares (and of their gradients) is the mean over all `global_count` terms, as
    one process with the whole batch computes it, also when processes hold different numbers of
    terms (images with phrases, sampled targets). On one process the factor is exactly 1.
    """
    if global_count <= 0:
        return local_mean
    return local_mean * (local_count * world_size() / global_count)


def gather_with_gradient(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates `tensor` from all processes along dim 0 (identity on one process), keeping the
    gradient path to every process's own slice."""
    if not is_distributed():
        return tensor
    return _AllGatherWithGradient.apply(tensor)


def cmc_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    gather: bool = True,
    negative_text_embeds: torch.Tensor | None = None,
    negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-modal contrastive loss (METHOD eq. 1): symmetric InfoNCE, the two directions averaged.

    Args:
        image_embeds, text_embeds: L2-normalised `[b, P]` embeddings of this process's pairs.
        logit_scale: log inverse temperature (scalar); the logits are `exp(logit_scale) * cosine`.
        gather: with several processes, use the global batch's pairs as negatives (all-gather with
            gradient), so the loss equals the single-process loss on the global batch.
        negative_text_embeds: optional L2-normalised `[b, P]` hard negative captions (one per pair,
            `loupe_hf.pretraining.negatives`): extra texts every image is contrasted against in the
            image-to-text direction; `negative_mask` (`[b]` bool) marks the real ones.
    """
    has_negatives = negative_text_embeds is not None
    if has_negatives and negative_mask is None:
        negative_mask = torch.ones(
            len(negative_text_embeds), dtype=torch.bool, device=negative_text_embeds.device
        )
    if gather:
        image_embeds, text_embeds = (
            gather_with_gradient(image_embeds),
            gather_with_gradient(text_embeds),
        )
        if has_negatives:
            negative_text_embeds = gather_with_gradient(negative_text_embeds)
            negative_mask = gather_with_gradient(negative_mask.to(image_embeds)) > 0.5
    logits = logit_scale.exp() * image_embeds @ text_embeds.t()
    targets = torch.arange(logits.shape[0], device=logits.device)
    text_to_image = F.cross_entropy(logits.t(), targets)
    if has_negatives:
        extra = logit_scale.exp() * image_embeds @ negative_text_embeds.t()
        extra = extra.masked_fill(~negative_mask.to(extra.device)[None, :], float("-inf"))
        logits = torch.cat([logits, extra], dim=1)
    return (F.cross_entropy(logits, targets) + text_to_image) / 2


def unsil_loss(
    predicted: torch.Tensor,
    sigma: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    uncertainty_weight: float = 1.0,
) -> torch.Tensor:
    """Uncertainty-weighted regression of UNSIL on the sampled targets (METHOD eq. 12, our reading).

        L = mean over masked targets of  (Î - I*)² / sigma  +  λ · sigma

    The source garbles where the constants go; this form keeps the two properties that matter:
    a confident predictor (small sigma) pays more for its errors, and sigma cannot grow for free.
    For a fixed error e the loss is minimised at sigma = |e| / √λ, so sigma learns the expected
    absolute error in units of √λ; and since sigma is also the probability of sampling a label, λ
    decides how large an expected error is worth a sample. With interaction labels normalised to
    [0, 1] (`LoupeConfig.interaction_normalization`), λ = 1 gives sigma ≈ |Î - I*|. The predictor
    clamps sigma to [eps, 1 - eps], which keeps 1/sigma bounded.

    Args:
        predicted: `[*targets]` Î, with gradient.
        sigma: `[*targets]` sigma ∈ (0, 1), with gradient.
        target: `[*targets]` sampled interactions I* (treated as constants); entries outside `mask`
            are ignored and may be NaN.
        mask: bool `[*targets]`, the targets that were sampled (and are real, not padding).
        uncertainty_weight: λ ≥ 0.

    Returns:
        Scalar loss (float32). When nothing was sampled it is 0 but still attached to the graph of
        `predicted` and `sigma`, so a backward pass works (and gives zero gradients).
    """
    check_same_shape(predicted=predicted, sigma=sigma, target=target, mask=mask)
    if uncertainty_weight < 0:
        raise ValueError(f"uncertainty_weight must be >= 0, got {uncertainty_weight}")
    mask = mask.bool()
    count = mask.sum()
    if count == 0:
        return (predicted.sum() + sigma.sum()).float() * 0.0
    if not torch.isfinite(target[mask]).all():
        raise ValueError("target must be finite wherever mask is True")
    # Replace unused targets *before* the arithmetic: a NaN that is only masked afterwards would
    # still poison the backward pass (0 · NaN = NaN).
    target = torch.where(mask, target.detach().float(), 0.0)
    predicted, sigma = predicted.float(), sigma.float()
    per_target = (predicted - target).square() / sigma + uncertainty_weight * sigma
    return torch.where(mask, per_target, 0.0).sum() / count


def check_same_shape(**tensors: torch.Tensor) -> None:
    """Raises a `ValueError` listing each named tensor's shape unless they all agree."""
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"expected tensors of one shape, got {shapes}")


def tsa_loss(confidence_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-level semantic alignment loss (METHOD eq. 8): binary cross-entropy between the region
    confidences c(R_k) = sigmoid(logit) and the normalised interactions I'_k, averaged over the K
    regions and the batch. Takes logits for numerical stability."""
    check_same_shape(confidence_logits=confidence_logits, labels=labels)
    return F.binary_cross_entropy_with_logits(confidence_logits, labels.detach())


def region_phrase_logits(
    region_embeds: torch.Tensor, phrase_embeds: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Alignment matrix a_kj = h_k · h_j of L2-normalised embeddings, scaled like the CMC logits:
    `[B, K, D] x [B, M, D] → [B, K, M]`. The same scale is used by the semantics-level game."""
    return logit_scale.exp() * torch.einsum("bkd,bmd->bkm", region_embeds, phrase_embeds)


def fsa_loss(
    alignment_logits: torch.Tensor,
    labels: torch.Tensor,
    phrase_valid: torch.Tensor,
    region_weights: torch.Tensor | None = None,
    both_directions: bool = False,
) -> torch.Tensor:
    """Fine-grained semantic alignment loss (METHOD eq. 11):
    −1/(K·M) Σ_k Σ_j w_k · I'_kj · log ã_kj, with ã the region→phrase softmax over the image's real
    phrases. Averaged over the images that have at least one phrase (0 if none has).

    Args:
        alignment_logits: `[B, K, M]`.
        labels: `[B, K, M]` normalised interactions in [0, 1].
        phrase_valid: bool `[B, M]`, False for padding phrases.
        region_weights: optional `[B, K]` weights w_k of the regions' terms (1 when not given).
        both_directions: also take the phrase→region softmax (over the K regions, for every real
            phrase) with the same labels and average the two, as the game's s averages s1 and s2:
            only this direction makes a phrase prefer one region over another.
    """
    check_same_shape(alignment_logits=alignment_logits, labels=labels)
    valid = phrase_valid[:, None, :].expand_as(alignment_logits)
    labels = labels.detach()
    if region_weights is not None:
        labels = labels * region_weights.detach()[..., None]
    num_phrases = phrase_valid.sum(-1)
    has_phrases = num_phrases > 0
    if not has_phrases.any():
        return alignment_logits.sum() * 0.0
    log_probs = torch.log_softmax(alignment_logits.masked_fill(~valid, -torch.inf), dim=-1)
    terms = torch.where(valid, labels * log_probs, 0.0)
    if both_directions:
        # A padding phrase's column is a softmax of its own: `valid` drops its terms.
        over_regions = torch.log_softmax(alignment_logits, dim=1)
        terms = (terms + torch.where(valid, labels * over_regions, 0.0)) / 2
    per_image = -terms.sum(dim=(1, 2)) / (alignment_logits.shape[1] * num_phrases.clamp_min(1))
    return per_image[has_phrases].mean()


__all__ = [
    "check_same_shape",
    "cmc_loss",
    "counts_per_process",
    "fsa_loss",
    "gather_with_gradient",
    "is_distributed",
    "region_phrase_logits",
    "share_of_global_mean",
    "sum_over_processes",
    "tsa_loss",
    "unsil_loss",
    "world_size",
]
