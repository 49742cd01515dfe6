"""Zero-shot detection latency of the tiny LOUPE model next to OWL-ViT of similar size; prints JSON.

    python benchmarks/detection_latency.py --checkpoint outputs/demo/checkpoint

One 128 px image, 5 labels, medians over repeats, all in one process:
- `loupe_pipeline`: `pipeline("zero-shot-object-detection")` end to end (one model call per label);
- `loupe_direct`: `LoupeForZeroShotDetection.detect` (the image encoded once for all labels);
- `loupe_model_calls` / `owlvit_model_calls`: the model forward passes the pipeline makes (5 calls
  of one label each, preprocessed inputs), for LOUPE and for a random-init OWL-ViT built from a
  config of similar size. OWL-ViT's pipeline needs CLIP's BPE files, which cannot be downloaded
  here, so it is compared at the model-call level, which dominates the pipeline's time.
Without `--checkpoint`, a random-init tiny LOUPE is used (latency does not depend on training).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from transformers import OwlViTConfig, OwlViTForObjectDetection, pipeline

from loupe_hf import (
    LoupeConfig,
    LoupeForZeroShotDetection,
    LoupeImageProcessor,
    LoupeProcessor,
    train_wordpiece_tokenizer,
)
from loupe_hf.data import generate_sample, training_captions

LABELS = ["star", "circle", "red square", "heart", "cross"]


def median_time(function, repeats: int) -> float:
    function()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def loupe_checkpoint(path: str | None) -> str:
    if path:
        return path
    tokenizer = train_wordpiece_tokenizer(training_captions(500), vocab_size=2048)
    config = LoupeConfig.from_preset("tiny", text_config={"vocab_size": len(tokenizer)})
    config.set_prompt_template(tokenizer)
    folder = tempfile.mkdtemp()
    LoupeForZeroShotDetection(config).save_pretrained(folder)
    LoupeProcessor(
        LoupeImageProcessor(size={"height": 64, "width": 64}), tokenizer
    ).save_pretrained(folder)
    return folder


def owlvit_of_similar_size() -> OwlViTForObjectDetection:
    config = OwlViTConfig(
        text_config={
            "hidden_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 512,
            "vocab_size": 2048,
        },
        vision_config={
            "hidden_size": 192,
            "num_hidden_layers": 6,
            "num_attention_heads": 3,
            "intermediate_size": 768,
            "image_size": 64,
            "patch_size": 8,
        },
        projection_dim=128,
    )
    return OwlViTForObjectDetection(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    image = generate_sample(3, "validation")["image"]
    path = loupe_checkpoint(args.checkpoint)
    detect = pipeline("zero-shot-object-detection", model=path)
    detector = LoupeForZeroShotDetection.from_pretrained(path).eval()
    processor = LoupeProcessor.from_pretrained(path)
    owlvit = owlvit_of_similar_size()

    loupe_inputs = [processor(images=image, text=label) for label in LABELS]
    owl_pixels = torch.randn(1, 3, 64, 64)
    owl_text = [
        {
            "input_ids": torch.randint(0, 2048, (1, 8)),
            "attention_mask": torch.ones(1, 8, dtype=torch.long),
        }
        for _ in LABELS
    ]

    timings = {
        "loupe_pipeline_s": median_time(
            lambda: detect(image, candidate_labels=LABELS, threshold=0.1), args.repeats
        ),
        "loupe_direct_s": median_time(
            lambda: detector.detect(image, LABELS, processor, threshold=0.1), args.repeats
        ),
        "loupe_model_calls_s": median_time(
            lambda: [detector(**inputs) for inputs in loupe_inputs], args.repeats
        ),
        "owlvit_model_calls_s": median_time(
            lambda: [owlvit(pixel_values=owl_pixels, **text) for text in owl_text], args.repeats
        ),
    }
    report = {
        "image_size": image.size,
        "labels": LABELS,
        "threads": torch.get_num_threads(),
        "loupe_parameters": sum(p.numel() for p in detector.parameters()),
        "owlvit_parameters": sum(p.numel() for p in owlvit.parameters()),
        **{key: round(value, 5) for key, value in timings.items()},
        "ratio_loupe_over_owlvit_model_calls": round(
            timings["loupe_model_calls_s"] / timings["owlvit_model_calls_s"], 3
        ),
        "ratio_direct_over_pipeline": round(
            timings["loupe_direct_s"] / timings["loupe_pipeline_s"], 3
        ),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
