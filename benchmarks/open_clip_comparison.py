"""LOUPE against open_clip with identical towers: training-step time of the same batch on the same
device, in one run; prints one JSON document.

    python benchmarks/open_clip_comparison.py --preset tiny --batch-size 64
    python benchmarks/open_clip_comparison.py --preset paper --device cuda --dtype bf16 --batch-size 32 128

open_clip (`pip install open-clip-torch`, extra `bench`) builds a CLIP from a timm image tower and a
Hugging Face text tower (`CustomTextCLIP`). Here its image trunk is the very Swin LOUPE builds
(`loupe_hf.modeling_loupe.build_swin` of the preset's vision config, average-pooled) and its text
tower is the preset's BERT (from the same `BertConfig`, mean-pooled), each with a linear projection
to the same width; the loss is open_clip's `ClipLoss`. Rows, each a forward, backward and AdamW
step on the same batch: `open_clip`, `loupe_backbone` (LOUPE with CMC only: the same contrastive
objective, plus LOUPE's dense tokens and region module) and `loupe_full` (CMC + TSA + FSA + UNSIL).
`ratio_to_open_clip` > 1 means slower than open_clip.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def open_clip_model(config):
    """open_clip's CustomTextCLIP whose towers are LOUPE's Swin and BERT."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP

    from loupe_hf.modeling_loupe import build_swin

    with tempfile.TemporaryDirectory() as folder:
        config.text_config.save_pretrained(folder)  # open_clip reads an HF config by path
        vision = CLIPVisionCfg(
            # Any timm Swin name: its trunk is replaced by LOUPE's own below.
            timm_model_name="swin_tiny_patch4_window7_224",
            timm_pool="avg",
            timm_proj="linear",
            image_size=config.vision_config.image_size,
        )
        text = CLIPTextCfg(
            hf_model_name=folder,
            hf_model_pretrained=False,
            hf_pooler_type="mean_pooler",
            hf_proj_type="linear",
            context_length=config.text_config.max_position_embeddings,
            vocab_size=config.text_config.vocab_size,
        )
        model = CustomTextCLIP(config.projection_dim, vision, text)
    model.visual.trunk = build_swin(config.vision_config)  # num_classes=0: average-pooled features
    model.visual.head.proj = torch.nn.Linear(
        model.visual.trunk.num_features, config.projection_dim, bias=False
    )
    return model


def step_time(step, steps: int, device: torch.device) -> float:
    """Median seconds of `steps` calls of `step` after one warm-up call."""
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def training_step(model, loss_of, dtype: str, device: torch.device):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = loss_of(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def batch_for(processor, batch_size: int, device: torch.device) -> dict:
    from loupe_hf.data import generate_sample

    samples = [generate_sample(index) for index in range(batch_size)]
    size = processor.image_processor.size["height"]
    batch = processor(
        images=[s["image"].resize((size, size)) for s in samples],
        text=[s["caption"] for s in samples],
        phrase_spans=[s["objects"]["phrase_span"] for s in samples],
    )
    return {key: value.to(device) for key, value in batch.items() if torch.is_tensor(value)}


def run(args: argparse.Namespace, batch_size: int) -> dict:
    from open_clip.loss import ClipLoss

    from loupe_hf import LoupeConfig, LoupeImageProcessor, LoupeProcessor, train_wordpiece_tokenizer
    from loupe_hf.data import training_captions
    from loupe_hf.pretraining import LoupeForPreTraining

    device = torch.device(args.device)
    tokenizer = train_wordpiece_tokenizer(training_captions(1000), vocab_size=2048)
    config = LoupeConfig.from_preset(args.preset, text_config={"vocab_size": len(tokenizer)})
    size = config.vision_config.image_size
    processor = LoupeProcessor(LoupeImageProcessor(size={"height": size, "width": size}), tokenizer)
    batch = batch_for(processor, batch_size, device)
    torch.manual_seed(0)
    clip = open_clip_model(config).train().to(device)
    clip_loss = ClipLoss()

    def open_clip_loss(model):
        image, text, scale = (
            model.encode_image(batch["pixel_values"], normalize=True),
            model.encode_text(batch["input_ids"], normalize=True),
            model.logit_scale.exp(),
        )
        return clip_loss(image, text, scale)

    rows = {
        "open_clip": step_time(
            training_step(clip, open_clip_loss, args.dtype, device), args.steps, device
        )
    }
    for name, overrides in (
        ("loupe_backbone", {"use_tsa": False, "use_fsa": False, "use_unsil": False}),
        ("loupe_full", {}),
    ):
        torch.manual_seed(0)
        loupe_config = LoupeConfig.from_dict({**config.to_dict(), **overrides})
        model = LoupeForPreTraining(loupe_config).train().to(device)
        step = training_step(model, lambda m: m(**batch).loss, args.dtype, device)
        rows[name] = step_time(step, args.steps, device)
    return {
        name: {
            "step_s": round(seconds, 4),
            "pairs_per_s": round(batch_size / seconds, 1),
            "ratio_to_open_clip": round(seconds / rows["open_clip"], 3),
        }
        for name, seconds in rows.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--batch-size", type=int, nargs="+", default=[64])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    report = {
        "device": device_name(torch.device(args.device)),
        "preset": args.preset,
        "dtype": args.dtype,
        "steps_timed": args.steps,
        "batches": {str(size): run(args, size) for size in args.batch_size},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
