"""Worker for the two-process tests: computes the CMC loss and gradients on its share of a batch."""

from __future__ import annotations

import torch
import torch.distributed as dist

from loupe_hf.losses import cmc_loss


def encoder_pair(seed: int = 0) -> tuple[torch.nn.Linear, torch.nn.Linear, torch.Tensor]:
    torch.manual_seed(seed)
    return torch.nn.Linear(6, 4), torch.nn.Linear(5, 4), torch.tensor(2.0)


def global_batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(123)
    return torch.randn(size, 6, generator=generator), torch.randn(size, 5, generator=generator)


def loss_and_gradients(
    images: torch.Tensor, texts: torch.Tensor, gather: bool
) -> dict[str, torch.Tensor]:
    image_encoder, text_encoder, logit_scale = encoder_pair()
    logit_scale.requires_grad_(True)
    image_embeds = torch.nn.functional.normalize(image_encoder(images), dim=-1)
    text_embeds = torch.nn.functional.normalize(text_encoder(texts), dim=-1)
    loss = cmc_loss(image_embeds, text_embeds, logit_scale, gather=gather)
    loss.backward()
    grads = {f"image.{n}": p.grad for n, p in image_encoder.named_parameters()}
    grads.update({f"text.{n}": p.grad for n, p in text_encoder.named_parameters()})
    return {"loss": loss.detach(), **grads}


def run(rank: int, world_size: int, store: str, counts: list[int], out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    images, texts = global_batch(sum(counts))
    start = sum(counts[:rank])
    local = slice(start, start + counts[rank])
    result = loss_and_gradients(images[local], texts[local], gather=True)
    # What DDP does with parameter gradients: average them over processes.
    for name, value in result.items():
        if name != "loss":
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            result[name] = value / world_size
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()
