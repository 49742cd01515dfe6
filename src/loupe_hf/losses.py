"""LOUPE's losses as plain tensor functions (METHOD §3): CMC (eq. 1), TSA (eq. 8), FSA (eq. 11), and
the normalisation that turns Shapley interactions into [0, 1] labels.

Each function takes tensors, not model outputs, so it can be tested alone; `LoupeForPreTraining`
wires them to the model.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

NORMALIZATIONS = ("minmax", "sigmoid")


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
) -> torch.Tensor:
    """Cross-modal contrastive loss (METHOD eq. 1): symmetric InfoNCE, the two directions averaged.

    Args:
        image_embeds, text_embeds: L2-normalised `[b, P]` embeddings of this process's pairs.
        logit_scale: log inverse temperature (scalar); the logits are `exp(logit_scale) * cosine`.
        gather: with several processes, use the global batch's pairs as negatives (all-gather with
            gradient), so the loss equals the single-process loss on the global batch.
    """
    if gather:
        image_embeds, text_embeds = (
            gather_with_gradient(image_embeds),
            gather_with_gradient(text_embeds),
        )
    logits = logit_scale.exp() * image_embeds @ text_embeds.t()
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def normalize_interactions(
    values: torch.Tensor, valid: torch.Tensor | None = None, method: str = "minmax", dims: int = 1
) -> torch.Tensor:
    """Maps interactions to [0, 1] labels, separately for each image (the paper says "normalised"
    without detail; this is our documented choice).

    Args:
        values: `[B, *targets]` interactions (e.g. `[B, K]` regions or `[B, K, M]` pairs).
        valid: bool like `values`; invalid targets (padding phrases) are ignored and get 0.
        method: `"minmax"` — (I − min) / (max − min) over the image's valid targets, so the most
            cooperative target gets 1 and the least 0 (an image whose targets all tie gets 0.5);
            `"sigmoid"` — sigmoid of the interaction standardised by the image's mean and std,
            which keeps relative gaps and is less sensitive to one outlier.
        dims: how many trailing dims index the targets of one image.
    """
    if method not in NORMALIZATIONS:
        raise ValueError(
            f"unknown interaction normalization {method!r}; choose one of {NORMALIZATIONS}"
        )
    if valid is None:
        valid = torch.ones_like(values, dtype=torch.bool)
    flat, flat_valid = values.flatten(-dims), valid.flatten(-dims)
    count = flat_valid.sum(-1, keepdim=True).clamp_min(1)
    if method == "minmax":
        low = torch.where(flat_valid, flat, torch.inf).amin(-1, keepdim=True)
        high = torch.where(flat_valid, flat, -torch.inf).amax(-1, keepdim=True)
        span = high - low
        scaled = torch.where(span > 1e-12, (flat - low) / span.clamp_min(1e-12), 0.5)
    else:
        mean = torch.where(flat_valid, flat, 0).sum(-1, keepdim=True) / count
        variance = torch.where(flat_valid, (flat - mean) ** 2, 0).sum(-1, keepdim=True) / count
        scaled = torch.sigmoid((flat - mean) / variance.sqrt().clamp_min(1e-12))
    return torch.where(flat_valid, scaled, 0.0).reshape(values.shape)


def tsa_loss(confidence_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-level semantic alignment loss (METHOD eq. 8): binary cross-entropy between the region
    confidences c(R_k) = sigmoid(logit) and the normalised interactions I'_k, averaged over the K
    regions and the batch. Takes logits for numerical stability."""
    if confidence_logits.shape != labels.shape:
        raise ValueError(
            f"confidence logits {tuple(confidence_logits.shape)} and labels {tuple(labels.shape)} differ"
        )
    return F.binary_cross_entropy_with_logits(confidence_logits, labels.detach())


def region_phrase_logits(
    region_embeds: torch.Tensor, phrase_embeds: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Alignment matrix a_kj = h_k · h_j of L2-normalised embeddings, scaled like the CMC logits:
    `[B, K, D] x [B, M, D] → [B, K, M]`. The same scale is used by the semantics-level game."""
    return logit_scale.exp() * torch.einsum("bkd,bmd->bkm", region_embeds, phrase_embeds)


def fsa_loss(
    alignment_logits: torch.Tensor, labels: torch.Tensor, phrase_valid: torch.Tensor
) -> torch.Tensor:
    """Fine-grained semantic alignment loss (METHOD eq. 11):
    −1/(K·M) Σ_k Σ_j I'_kj · log ã_kj, with ã the region→phrase softmax over the image's real
    phrases. Averaged over the images that have at least one phrase (0 if none has).

    Args:
        alignment_logits: `[B, K, M]`.
        labels: `[B, K, M]` normalised interactions in [0, 1].
        phrase_valid: bool `[B, M]`, False for padding phrases.
    """
    if alignment_logits.shape != labels.shape:
        raise ValueError(
            f"alignment logits {tuple(alignment_logits.shape)} and labels {tuple(labels.shape)} differ"
        )
    valid = phrase_valid[:, None, :].expand_as(alignment_logits)
    log_probs = torch.log_softmax(alignment_logits.masked_fill(~valid, -torch.inf), dim=-1)
    terms = torch.where(valid, labels.detach() * log_probs, 0.0)
    num_phrases = phrase_valid.sum(-1)
    has_phrases = num_phrases > 0
    if not has_phrases.any():
        return alignment_logits.sum() * 0.0
    per_image = -terms.sum(dim=(1, 2)) / (alignment_logits.shape[1] * num_phrases.clamp_min(1))
    return per_image[has_phrases].mean()


__all__ = [
    "NORMALIZATIONS",
    "cmc_loss",
    "fsa_loss",
    "gather_with_gradient",
    "is_distributed",
    "normalize_interactions",
    "region_phrase_logits",
    "tsa_loss",
]
