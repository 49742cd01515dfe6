"""Workers for the two-process tests: the CMC loss and gradients on a share of a batch, and a few
LOUPE pre-training steps on a share of each step's batch (DDP over gloo)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from loupe_hf import LoupeConfig
from loupe_hf.losses import cmc_loss
from loupe_hf.pretraining import LoupeForPreTraining

# What a pre-training step reports and the tests compare: the loss and its components (each
# process's share; their mean over processes is the loss of the global batch) ...
LOSSES = ("loss", "cmc_loss", "tsa_loss", "fsa_loss", "unsil_loss")
# ... and UNSIL's statistics, which are totals over processes, so equal on every process.
STATISTICS = ("tsa_unsil_share", "tsa_unsil_error", "fsa_unsil_share", "fsa_unsil_error")


def encoder_pair(seed: int = 0) -> tuple[torch.nn.Linear, torch.nn.Linear, torch.Tensor]:
    torch.manual_seed(seed)
    return torch.nn.Linear(6, 4), torch.nn.Linear(5, 4), torch.tensor(2.0)


def global_batch(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images, texts and hard negative texts of a global batch."""
    generator = torch.Generator().manual_seed(123)
    return tuple(torch.randn(size, n, generator=generator) for n in (6, 5, 5))


def loss_and_gradients(
    images: torch.Tensor,
    texts: torch.Tensor,
    gather: bool,
    negatives: torch.Tensor | None = None,
    first_index: int = 0,
) -> dict[str, torch.Tensor]:
    image_encoder, text_encoder, logit_scale = encoder_pair()
    logit_scale.requires_grad_(True)
    image_embeds = torch.nn.functional.normalize(image_encoder(images), dim=-1)
    text_embeds = torch.nn.functional.normalize(text_encoder(texts), dim=-1)
    negative_embeds, mask = None, None
    if negatives is not None:
        negative_embeds = torch.nn.functional.normalize(text_encoder(negatives), dim=-1)
        # Every third pair of the global batch has no negative.
        mask = torch.arange(first_index, first_index + len(negatives)) % 3 != 0
    loss = cmc_loss(
        image_embeds, text_embeds, logit_scale, gather, negative_embeds, negative_mask=mask
    )
    loss.backward()
    grads = {f"image.{n}": p.grad for n, p in image_encoder.named_parameters()}
    grads.update({f"text.{n}": p.grad for n, p in text_encoder.named_parameters()})
    return {"loss": loss.detach(), **grads}


def run(
    rank: int, world_size: int, store: str, counts: list[int], out_dir: str, negatives: bool = False
) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    images, texts, negative_texts = global_batch(sum(counts))
    start = sum(counts[:rank])
    local = slice(start, start + counts[rank])
    result = loss_and_gradients(
        images[local],
        texts[local],
        gather=True,
        negatives=negative_texts[local] if negatives else None,
        first_index=start,
    )
    # What DDP does with parameter gradients: average them over processes.
    for name, value in result.items():
        if name != "loss":
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            result[name] = value / world_size
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


# --- pre-training ---------------------------------------------------------------------------------


def pretrain(
    config: dict, batches: list[dict[str, torch.Tensor]], learning_rate: float, wrap: str = "ddp"
) -> dict[str, torch.Tensor]:
    """`len(batches)` SGD steps of `LoupeForPreTraining` (when a process group is up: DDP, or with
    `wrap="fsdp"` FSDP2 sharding each Swin stage and BERT layer, as the shipped FSDP config does)
    from a fixed initialisation: the per-step `LOSSES` and `STATISTICS` `[steps, n]`, the final
    state and each parameter's update (final - initial), as full (unsharded) tensors.

    Plain SGD, not the Trainer's AdamW: an update is then the gradients times the learning rate,
    so equal updates mean equal gradients. AdamW divides by the root of the squared gradients,
    which turns float noise in a near-zero gradient into an update of a full learning rate."""
    torch.manual_seed(0)
    model = LoupeForPreTraining(LoupeConfig.from_dict(config)).train()
    initial = {name: value.detach().clone() for name, value in model.named_parameters()}
    module = model
    if dist.is_initialized() and wrap == "fsdp":
        model.make_fsdp_shardable()
        initial = {name: value.detach().clone() for name, value in model.named_parameters()}
        for layer in model.modules():
            if type(layer).__name__ in ("SwinTransformerStage", "BertLayer"):
                fully_shard(layer)
        fully_shard(model)
    elif dist.is_initialized():
        # Like the Trainer: rows without FSA or UNSIL leave some parameters without gradient. No
        # copy of rank 0's buffers at each step (the Trainer's DDP makes one): every process must
        # keep its running scales right on its own, as under FSDP.
        module = torch.nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=True, broadcast_buffers=False
        )
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    losses, statistics = [], []
    for batch in batches:
        out = module(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(torch.stack([getattr(out, name).detach() for name in LOSSES]))
        statistics.append(torch.stack([getattr(out, name).detach() for name in STATISTICS]))
    state = {name: _full(value).clone() for name, value in model.state_dict().items()}
    updates = {name: _full(value) - initial[name] for name, value in model.named_parameters()}
    return {
        "losses": torch.stack(losses),
        "statistics": torch.stack(statistics),
        "state": state,
        "updates": updates,
    }


def _full(value: torch.Tensor) -> torch.Tensor:
    """A tensor as one process would hold it: FSDP's shards gathered (a scalar made 1-element for
    FSDP as the scalar it is)."""
    value = value.detach()
    return value.full_tensor() if isinstance(value, DTensor) else value


def pretraining_worker(
    rank: int, world_size: int, store: str, job: str, out_dir: str, wrap: str = "ddp"
) -> None:
    """Runs every case of `job` (a `torch.save`d dict: case → {config, learning_rate, shares},
    `shares[rank]` being this process's batch of each step) and saves the results per rank."""
    torch.set_num_threads(1)  # two processes on a shared CPU
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    cases = torch.load(job, weights_only=False)
    results = {
        name: pretrain(case["config"], case["shares"][rank], case["learning_rate"], wrap)
        for name, case in cases.items()
    }
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()
