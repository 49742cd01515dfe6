"""Quick start: build the tiny LOUPE model offline, run it on a synthetic image, save and reload it.

    python examples/quickstart.py --output-dir outputs/quickstart

Writes `regions.png` (the region module's top proposals on a held-out image; the model is untrained,
so the boxes are not meaningful yet) and a checkpoint directory that `AutoModel.from_pretrained` and
`AutoProcessor.from_pretrained` load, and prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoProcessor

from loupe_hf import (
    LoupeConfig,
    LoupeImageProcessor,
    LoupeModel,
    LoupeProcessor,
    train_wordpiece_tokenizer,
)
from loupe_hf.boxes import pixel_boxes
from loupe_hf.data import SyntheticConfig, generate_sample, training_captions
from loupe_hf.visualization import draw_boxes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/quickstart"))
    parser.add_argument(
        "--preset", default="tiny", choices=["tiny", "tiny-fine-grid", "tiny-128", "paper"]
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--image-index", type=int, default=0, help="index in the synthetic validation split"
    )
    return parser.parse_args()


def build_processor(config: LoupeConfig, num_captions: int = 2000) -> LoupeProcessor:
    print(
        f"[quickstart] training a WordPiece tokenizer on {num_captions} synthetic captions (offline)"
    )
    tokenizer = train_wordpiece_tokenizer(
        training_captions(num_captions, SyntheticConfig()),
        vocab_size=config.text_config.vocab_size,
        model_max_length=config.text_config.max_position_embeddings,
    )
    size = config.vision_config.image_size
    return LoupeProcessor(LoupeImageProcessor(size={"height": size, "width": size}), tokenizer)


def main() -> None:
    args = parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    config = LoupeConfig.from_preset(args.preset)
    processor = build_processor(config)
    config.text_config.vocab_size = len(processor.tokenizer)
    model = LoupeModel(config).eval()
    parameters = sum(p.numel() for p in model.parameters())
    print(f"[quickstart] built the {args.preset} LOUPE model: {parameters / 1e6:.2f}M parameters")

    sample = generate_sample(args.image_index, "validation")
    inputs = processor(images=sample["image"], text=sample["caption"])
    start = time.perf_counter()
    with torch.inference_mode():
        outputs = model(**inputs)
    latency = time.perf_counter() - start
    print(f"[quickstart] caption: {sample['caption']!r}")
    print(
        f"[quickstart] image-text logit {outputs.logits_per_image.item():.3f}, forward {latency * 1000:.1f} ms"
    )

    checkpoint = args.output_dir / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    reloaded = AutoModel.from_pretrained(checkpoint).eval()
    reloaded_inputs = AutoProcessor.from_pretrained(checkpoint)(
        images=sample["image"], text=sample["caption"]
    )
    with torch.inference_mode():
        again = reloaded(**reloaded_inputs)
    # Equal up to float rounding: memory-mapped weights may take another SIMD path than fresh ones.
    max_difference = max(
        (outputs[name] - again[name]).abs().max().item()
        for name in (
            "logits_per_image",
            "image_embeds",
            "text_embeds",
            "region_boxes",
            "region_embeds",
        )
    )
    if max_difference > 1e-5:
        raise SystemExit(f"[quickstart] the reloaded checkpoint differs by {max_difference:.3g}")
    print(f"[quickstart] saved and reloaded {checkpoint}: outputs agree to {max_difference:.1e}")

    image = sample["image"]
    top = 5
    on_image = model.grid_to_image(outputs.region_boxes[0, :top])  # region boxes are on the grid
    boxes = pixel_boxes(on_image, (image.height, image.width)).tolist()
    picture = draw_boxes(image, boxes, scores=outputs.region_scores[0, :top].tolist(), scale=3)
    picture_path = args.output_dir / "regions.png"
    picture.save(picture_path)
    print(f"[quickstart] wrote {picture_path} (top-{top} region proposals of the untrained model)")
    summary = {
        "preset": args.preset,
        "parameters": parameters,
        "caption": sample["caption"],
        "forward_ms": round(latency * 1000, 2),
        "region_boxes_cxcywh": [[round(v, 4) for v in box] for box in on_image.tolist()],
        "checkpoint": str(checkpoint),
        "picture": str(picture_path),
        "reload_max_abs_difference": max_difference,
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
