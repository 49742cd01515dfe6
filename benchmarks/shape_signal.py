"""Can contrastive training find shape at all? The simplest case: one object per image, captions
that name only its shape ("a star."), CMC only. Three objectives on the same images, same steps:

- `supervised`: the image tower with a free linear head and shape labels (the reference);
- `contrastive`: LOUPE's CMC loss, both towers trained (what pre-training does);
- `contrastive_text_frozen`: CMC with the text tower and its projection frozen at their random
  initialisation, so the ten caption embeddings cannot collapse onto each other.

Each is read every `--eval-every` steps on held-out single-object images: shape accuracy of the
global image embedding against the ten captions (or the head), and the mean cosine between the ten
caption embeddings (how far apart the text side keeps the classes). Prints JSON.

    python -m benchmarks.shape_signal --image-sizes 64 128 --steps 200
    python -m benchmarks.shape_signal --image-sizes 64 --towers swin resnet10t --steps 300
    python -m benchmarks.shape_signal --image-sizes 64 --towers resnet10t --patch-sizes 4 2
    python -m benchmarks.shape_signal --image-sizes 64 --towers resnet10t --patch-sizes 2 \
        --objectives contrastive --captions shape half full --steps 250 --learning-rate 5e-4

`--captions` picks what the images are captioned with: `bare` ("a star."), or the generator's
captions with size and colour named only sometimes, of which a share name the shape alone ("an
image of a star.", `SyntheticConfig.shape_caption_share`): all of them (`shape`), half (`half`) or
none (`full`, as the curriculum's first stage had them until 2026-12-07's seventh session).

Measurements and what they mean: docs/design_choices.md, "Shape: the contrastive signal".
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.common import device_name
from loupe_hf import LoupeConfig, LoupeImageProcessor, LoupeProcessor, train_wordpiece_tokenizer
from loupe_hf.data import SHAPES, SyntheticConfig, generate_sample
from loupe_hf.pretraining import LoupeForPreTraining

OBJECTIVES = ("supervised", "contrastive", "contrastive_text_frozen")
# Each name's share of captions that name the shape alone; "bare" is the benchmark's own "a star.".
SHAPE_CAPTION_SHARES = {"shape": 1.0, "half": 0.5, "full": 0.0}
CAPTIONS = ("bare", *SHAPE_CAPTION_SHARES)
BACKBONE = {"use_tsa": False, "use_fsa": False, "use_unsil": False}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    parser.add_argument(
        "--captions", nargs="+", default=["bare"], choices=CAPTIONS, help="see the module docstring"
    )
    parser.add_argument(
        "--towers",
        nargs="+",
        default=["swin"],
        help="image towers: swin (the preset's Swin) or a timm convolutional network, e.g. resnet10t",
    )
    parser.add_argument(
        "--patch-sizes",
        type=int,
        nargs="+",
        default=[4],
        help="the preset's patch_size (4) or a finer one: 2 puts the tokens on a 16x16 grid at 64 px",
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-samples", type=int, default=300)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def caption(shape: str) -> str:
    return f"a {shape}."


class ShapeBatches:
    """Single-object images of one size, their captions (`--captions`) and shape labels; the ten
    class captions they are read with are "a {shape}." for `bare`, else "an image of a {shape}."."""

    def __init__(self, image_size: int, captions: str = "bare"):
        self.captions = captions
        self.config = SyntheticConfig(
            min_objects=1,
            max_objects=1,
            image_size=image_size,
            omit_attributes=True,
            shape_caption_share=SHAPE_CAPTION_SHARES.get(captions, 0.0),
        )
        corpus = [self.class_caption(s) for s in SHAPES] * 20
        if captions != "bare":
            corpus += [generate_sample(k, "train", self.config)["caption"] for k in range(2000)]
        tokenizer = train_wordpiece_tokenizer(corpus, vocab_size=256 if captions == "bare" else 512)
        size = {"height": image_size, "width": image_size}
        self.processor = LoupeProcessor(LoupeImageProcessor(size=size), tokenizer)

    def class_caption(self, shape: str) -> str:
        return caption(shape) if self.captions == "bare" else f"an image of a {shape}."

    def text(self, sample: dict) -> str:
        shape = sample["objects"]["category"][0]
        return caption(shape) if self.captions == "bare" else sample["caption"]

    def __call__(self, indices: range, split: str = "train") -> tuple[dict, torch.Tensor]:
        samples = [generate_sample(k, split, self.config) for k in indices]
        shapes = [sample["objects"]["category"][0] for sample in samples]
        batch = self.processor(
            images=[sample["image"] for sample in samples],
            text=[self.text(sample) for sample in samples],
            padding=True,
            return_tensors="pt",
        )
        inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
        return inputs, torch.tensor([SHAPES.index(s) for s in shapes])

    def class_captions(self) -> dict:
        text = self.processor(
            text=[self.class_caption(s) for s in SHAPES], padding=True, return_tensors="pt"
        )
        return {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}


def build(objective: str, image_size: int, vocab_size: int, args, tower: str, patch_size: int):
    """The model, the shape head (supervised only) and an optimizer over what the objective trains."""
    preset = "tiny-128" if image_size == 128 else "tiny"
    backbone = None if tower == "swin" else tower
    vision = {
        "image_size": image_size,
        "convolutional_backbone": backbone,
        "patch_size": patch_size,
    }
    config = LoupeConfig.from_preset(
        preset,
        **BACKBONE,
        vision_config=vision,
        text_config={"vocab_size": vocab_size},
    )
    model = LoupeForPreTraining(config).train()
    loupe = model.loupe
    head = torch.nn.Linear(config.projection_dim, len(SHAPES))
    if objective == "supervised":
        trained = [*loupe.vision_model.parameters(), *loupe.visual_projection.parameters()]
        trained += list(head.parameters())
    else:
        frozen = set()
        if objective == "contrastive_text_frozen":
            frozen = {*loupe.text_model.parameters(), *loupe.text_projection.parameters()}
        trained = [p for p in model.parameters() if p not in frozen]
    optimizer = torch.optim.AdamW(trained, lr=args.learning_rate, weight_decay=0.01)
    return model, head, optimizer


def training_loss(objective: str, model, head, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    if objective == "supervised":
        image = F.normalize(model.loupe.get_image_features(inputs["pixel_values"]), dim=-1)
        return F.cross_entropy(head(10.0 * image), labels)  # 10: the benchmark's fixed scale
    return model(**inputs).loss


@torch.no_grad()
def read_shape(objective: str, model, head, valid: tuple, captions: dict) -> dict:
    """Shape accuracy of the global image embedding, and the ten captions' mean pairwise cosine."""
    model.eval()
    inputs, labels = valid
    image = F.normalize(model.loupe.get_image_features(inputs["pixel_values"]), dim=-1)
    text = F.normalize(model.loupe.get_text_features(**captions), dim=-1)
    scores = head(10.0 * image) if objective == "supervised" else image @ text.T
    cosine = text @ text.T
    off_diagonal = ~torch.eye(len(SHAPES), dtype=torch.bool)
    model.train()
    return {
        "shape_accuracy": round(float((scores.argmax(-1) == labels).float().mean()), 4),
        "caption_cosine": round(float(cosine[off_diagonal].mean()), 4),
    }


def run_variant(
    objective: str,
    image_size: int,
    tower: str,
    patch_size: int,
    captions: str,
    args: argparse.Namespace,
) -> dict:
    torch.manual_seed(args.seed)
    batches = ShapeBatches(image_size, captions)
    vocab_size = len(batches.processor.tokenizer)
    model, head, optimizer = build(objective, image_size, vocab_size, args, tower, patch_size)
    grid = model.config.vision_config.dense_grid_size
    valid = batches(range(args.eval_samples), "validation")
    prompts = batches.class_captions()
    curve = [{"step": 0, **read_shape(objective, model, head, valid, prompts)}]
    start, losses = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        first = (step - 1) * args.batch_size
        inputs, labels = batches(range(first, first + args.batch_size))
        loss = training_loss(objective, model, head, inputs, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            reading = read_shape(objective, model, head, valid, prompts)
            curve.append({"step": step, "loss": round(losses[-1], 4), **reading})
            print(
                f"[shape_signal] {tower} {grid}x{grid} {objective} {captions} {image_size}px "
                f"step {step}: {reading}",
                file=sys.stderr,
            )
    return {
        "tower": tower,
        "dense_grid": grid,
        "objective": objective,
        "captions": captions,
        "image_size": image_size,
        "seconds": round(time.perf_counter() - start, 1),
        "final": curve[-1],
        "curve": curve,
    }


def main() -> None:
    args = parse_args()
    variants = [
        run_variant(objective, size, tower, patch_size, captions, args)
        for size in args.image_sizes
        for tower in args.towers
        for patch_size in args.patch_sizes
        for captions in args.captions
        for objective in args.objectives
    ]
    print(json.dumps({
        "benchmark": "shape_signal",
        "device": device_name(torch.device("cpu")),
        "steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
        "chance": 1 / len(SHAPES),
        "variants": variants,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
