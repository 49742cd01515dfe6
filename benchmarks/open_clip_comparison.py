"""LOUPE against open_clip with identical towers: training-step time of the same batch on the same
device, in one run; prints one JSON document.

    python benchmarks/open_clip_comparison.py --preset tiny-swin --batch-size 64
    python benchmarks/open_clip_comparison.py --preset paper --device cuda --dtype bf16 --batch-size 32 128

open_clip (`pip install open-clip-torch`, extra `bench`) builds a CLIP from a timm image tower and a
Hugging Face text tower (`CustomTextCLIP`). Here its image trunk is the very Swin LOUPE builds
(`loupe_hf.modeling_loupe.build_swin` of the preset's vision config, average-pooled) and its text
tower is the preset's BERT (from the same `BertConfig`, mean-pooled), each with a linear projection
to the same width; the loss is open_clip's `ClipLoss`. Rows, each a forward, backward and AdamW
step on the same batch: `open_clip`, `loupe_backbone` (LOUPE with CMC only: the same contrastive
objective, its image embedding pooled from the dense patch tokens) and `loupe_full` (CMC + TSA +
FSA + UNSIL, from a fresh model, so before UNSIL supplies labels: `benchmarks/pretraining_step.py`
times it with a trained gate). `ratio_to_open_clip` > 1 means slower than open_clip.

The rows take turns step by step (the machine's speed drifts by 10-15% between minutes, which a
row timed on its own would take for a difference); a round is `--steps` steps of each row, and the
report gives each row's median over `--rounds` rounds and the median and range of its per-round
ratio to open_clip. `--malloc tuned` (the default) keeps freed memory in the
process for every row, as `LoupeTrainer` can (`loupe_hf.cpu_allocator`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import device_name


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


def interleaved_step_times(steps: dict, count: int, device: torch.device) -> dict[str, float]:
    """Median seconds of `count` steps of each row, the rows taking turns step by step (after one
    warm-up step each), so that a slow spell of the machine hits every row alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for index in range(count + 1):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if index:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


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

    steps = {"open_clip": training_step(clip, open_clip_loss, args.dtype, device)}
    for name, overrides in (
        ("loupe_backbone", {"use_tsa": False, "use_fsa": False, "use_unsil": False}),
        ("loupe_full", {}),
    ):
        torch.manual_seed(0)
        loupe_config = LoupeConfig.from_dict({**config.to_dict(), **overrides})
        model = LoupeForPreTraining(loupe_config).train().to(device)
        steps[name] = training_step(
            model, lambda m, model=model: model(**batch).loss, args.dtype, device
        )
    rounds = [interleaved_step_times(steps, args.steps, device) for _ in range(args.rounds)]
    ratios = {name: [times[name] / times["open_clip"] for times in rounds] for name in steps}
    return {
        name: {
            "step_s": round(statistics.median(times[name] for times in rounds), 4),
            "pairs_per_s": round(
                batch_size / statistics.median(times[name] for times in rounds), 1
            ),
            "ratio_to_open_clip": round(statistics.median(ratios[name]), 3),
            "ratio_range": [round(min(ratios[name]), 3), round(max(ratios[name]), 3)],
        }
        for name in steps
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # open_clip's tower here is a Swin, so the LOUPE side must be one too.
    parser.add_argument("--preset", choices=["tiny-swin", "paper"], default="tiny-swin")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--batch-size", type=int, nargs="+", default=[64])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="times every row is timed, in turn")
    parser.add_argument(
        "--malloc",
        choices=["tuned", "default"],
        default="tuned",
        help="glibc allocator setting for every row (loupe_hf.cpu_allocator), as LoupeTrainer trains",
    )
    args = parser.parse_args()
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1")
    malloc_tuned = False
    if args.malloc == "tuned":
        from loupe_hf.cpu_allocator import keep_freed_memory

        malloc_tuned = keep_freed_memory()
    report = {
        "device": device_name(torch.device(args.device)),
        "preset": args.preset,
        "dtype": args.dtype,
        "steps_timed": args.steps,
        "rounds": args.rounds,
        "malloc_tuned": malloc_tuned,
        "batches": {str(size): run(args, size) for size in args.batch_size},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
