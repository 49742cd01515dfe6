"""LOUPE pre-training with `LoupeTrainer`, on one or many processes.

Defaults train the `tiny` model on the built-in synthetic data in a few minutes on two CPU cores:

    python examples/pretrain.py --output_dir outputs/pretrain

Two real CPU processes (gloo):

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no examples/pretrain.py --use_cpu --output_dir outputs/pretrain-2p

Other data: `--dataset user/hub-dataset` (with `--image_column/--caption_column`, `--streaming`),
`--dataset pairs.csv --image_dir images/` (CSV or JSON lines), `--dataset "shards/*.tar"`
(webdataset). The paper's ablation rows: `--ablation backbone|tsa|tsa_fsa|loupe`. The paper's
model: `--preset paper`. An interrupted run resumes from the last checkpoint in `--output_dir`;
`--model_name_or_path CHECKPOINT` starts a new run from a trained LOUPE (e.g. a curriculum: single
objects first, then scenes).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import datasets
import torch
import transformers
from transformers import AutoTokenizer, HfArgumentParser, set_seed

from loupe_hf import (
    LoupeConfig,
    LoupeImageProcessor,
    LoupeModel,
    LoupeProcessor,
    train_wordpiece_tokenizer,
)
from loupe_hf.data import SyntheticConfig, build_dataset, training_captions
from loupe_hf.data.sources import (
    ImageCaptionSource,
    check_stream_shards,
    load_image_caption_dataset,
)
from loupe_hf.data.synthetic import MIN_IMAGE_SIZE
from loupe_hf.modeling_loupe import PRETRAINING_ONLY_KEYS
from loupe_hf.phrases import map_phrase_spans
from loupe_hf.pretraining import (
    LoupeDataCollator,
    LoupeForPreTraining,
    LoupeTrainer,
    LoupeTrainingArguments,
)
from loupe_hf.pretraining.trainer import last_complete_checkpoint
from loupe_hf.visualization import plot_learning_curves

logger = logging.getLogger("loupe_hf.pretrain")

ABLATIONS = {
    "backbone": {"use_tsa": False, "use_fsa": False, "use_unsil": False},
    "tsa": {"use_tsa": True, "use_fsa": False, "use_unsil": False},
    "tsa_fsa": {"use_tsa": True, "use_fsa": True, "use_unsil": False},
    "loupe": {"use_tsa": True, "use_fsa": True, "use_unsil": True},
}


@dataclass
class ModelArguments:
    preset: str = field(
        default="tiny",
        metadata={
            "help": "LoupeConfig preset: tiny | tiny-fine-grid | tiny-128 | tiny-swin | paper"
        },
    )
    ablation: str = field(default="loupe", metadata={"help": "backbone | tsa | tsa_fsa | loupe"})
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "JSON of LoupeConfig fields, e.g. '{\"shapley_num_samples\": 50}'"},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "a BERT tokenizer (Hub id or path); default: train one on the captions"},
    )
    tokenizer_training_captions: int = field(
        default=5000, metadata={"help": "captions to train it on"}
    )
    text_model_name: str | None = field(
        default=None,
        metadata={"help": "initialise the text tower from this pretrained BERT (Hub id or path)"},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "continue pre-training from a LOUPE checkpoint (Hub id or folder): its "
            "architecture, weights and tokenizer; --ablation and --config_overrides still apply "
            "and --preset is not used"
        },
    )


@dataclass
class DataArguments:
    dataset: str = field(
        default="synthetic", metadata={"help": "synthetic | Hub id | .csv/.jsonl | .tar shards"}
    )
    dataset_split: str = field(default="train")
    image_column: str = field(default="image")
    caption_column: str = field(default="caption")
    image_dir: str | None = field(
        default=None, metadata={"help": "base folder of image paths in CSV/JSON"}
    )
    streaming: bool = field(default=False, metadata={"help": "iterate without materialising"})
    synthetic_streaming: bool = field(
        default=True,
        metadata={
            "help": "generate the synthetic data on the fly, so training starts in seconds, one "
            "shard per process and DataLoader worker (false: materialise num_train_samples first)"
        },
    )
    num_train_samples: int | None = field(
        default=20000, metadata={"help": "pairs to use (None: all)"}
    )
    num_eval_samples: int = field(
        default=256, metadata={"help": "synthetic validation pairs (0: no eval)"}
    )
    synthetic_image_size: int | None = field(
        default=None,
        metadata={
            "help": "synthetic: image side in pixels (default: the model's input size; larger "
            "images are drawn only to be shrunk by the processor)"
        },
    )
    synthetic_appearance: str = field(
        default="varied",
        metadata={"help": "synthetic data: varied (wide backgrounds, colours, sizes) | classic"},
    )
    synthetic_min_objects: int = field(
        default=1, metadata={"help": "synthetic: fewest objects per image"}
    )
    synthetic_max_objects: int = field(
        default=4, metadata={"help": "synthetic: most objects per image"}
    )
    synthetic_omit_attributes: bool = field(
        default=False,
        metadata={"help": "synthetic, varied: caption phrases name size and colour only sometimes"},
    )
    synthetic_shape_caption_share: float = field(
        default=0.0,
        metadata={
            "help": "synthetic: the share of captions that name the shapes alone ('an image of a "
            "star.'), so that only shape tells them apart (1 in a curriculum's first stage)"
        },
    )
    phrase_source: str = field(
        default="extract",
        metadata={"help": "extract (noun-phrase chunking) | ground_truth (synthetic) | none"},
    )
    max_phrases: int = field(default=8)


# Training defaults that fit the tiny model on a CPU; any of them can be given on the command line.
TRAINING_DEFAULTS = {
    "output_dir": "outputs/pretrain",
    "per_device_train_batch_size": "64",
    "per_device_eval_batch_size": "64",
    "learning_rate": "1e-3",
    "weight_decay": "0.01",
    "max_steps": "300",
    "logging_steps": "10",
    "save_steps": "100",
    "save_total_limit": "2",
    "eval_strategy": "steps",
    "eval_steps": "100",
    # TensorBoard when its extra is installed (`pip install loupe-hf[tensorboard]`); curves are
    # drawn as learning_curves.png either way.
    "report_to": "tensorboard" if importlib.util.find_spec("tensorboard") else "none",
    "remove_unused_columns": "false",
    "dataloader_num_workers": "0",
    "seed": "0",
}


def accelerator_defaults() -> dict[str, str]:
    """On a GPU, loader defaults that keep it fed: worker processes (a share of the CPU cores per
    GPU, at most 8) that stay alive between epochs; batches are pinned by default already."""
    if not torch.cuda.is_available():
        return {}
    workers = min(8, max(1, (os.cpu_count() or 2) // max(1, torch.cuda.device_count())))
    return {"dataloader_num_workers": str(workers), "dataloader_persistent_workers": "true"}


def parse_arguments() -> tuple[ModelArguments, DataArguments, LoupeTrainingArguments]:
    argv = sys.argv[1:]
    given = {arg.split("=", 1)[0].lstrip("-") for arg in argv if arg.startswith("--")}
    for key, value in {**TRAINING_DEFAULTS, **accelerator_defaults()}.items():
        if key not in given:
            argv += [f"--{key}", value]
    # No accelerator: say so, so that several processes use gloo instead of looking for NCCL.
    if not torch.cuda.is_available() and "use_cpu" not in given:
        argv.append("--use_cpu")
    parser = HfArgumentParser((ModelArguments, DataArguments, LoupeTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if data_args.dataset == "synthetic" and data_args.synthetic_image_size is None:
        data_args.synthetic_image_size = model_image_size(model_args)
    return model_args, data_args, training_args


def synthetic_config(data_args: DataArguments, **fields: Any) -> SyntheticConfig:
    """The built-in data's settings from the command line (`--synthetic_*`)."""
    return SyntheticConfig(
        image_size=data_args.synthetic_image_size,
        appearance=data_args.synthetic_appearance,
        omit_attributes=data_args.synthetic_omit_attributes,
        shape_caption_share=data_args.synthetic_shape_caption_share,
        min_objects=data_args.synthetic_min_objects,
        max_objects=data_args.synthetic_max_objects,
        **fields,
    )


def model_image_size(model_args: ModelArguments) -> int:
    """The side of the synthetic images: that of the images the model reads (the checkpoint's,
    else `--preset`'s with `--config_overrides`), at least the generator's smallest."""
    if model_args.model_name_or_path:
        config = LoupeConfig.from_pretrained(model_args.model_name_or_path)
    else:
        config = build_config(model_args, None)
    return max(config.vision_config.image_size, MIN_IMAGE_SIZE)


def parse_overrides(text: str | None) -> dict:
    """`--config_overrides` as a dict; a `ValueError` naming the option when it is not a JSON
    object (`json.loads` alone says only "Expecting value: line 1 column 1")."""
    if not text:
        return {}
    expected = "--config_overrides must be a JSON object of LoupeConfig fields, e.g. '{\"num_regions\": 8}'"
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{expected}; {text!r} is not JSON ({error})") from error
    if not isinstance(overrides, dict):
        raise ValueError(f"{expected}, got a {type(overrides).__name__}")
    return overrides


def config_overrides(model_args: ModelArguments) -> dict:
    """The config fields `--ablation` and `--config_overrides` set."""
    if model_args.ablation not in ABLATIONS:
        raise ValueError(
            f"--ablation must be one of {sorted(ABLATIONS)}, got {model_args.ablation!r}"
        )
    return {**ABLATIONS[model_args.ablation], **parse_overrides(model_args.config_overrides)}


def check_model_arguments(model_args: ModelArguments) -> None:
    """Refuses option combinations that would train a model unlike the one asked for."""
    if model_args.model_name_or_path:
        given = [
            name for name in ("tokenizer_name", "text_model_name") if getattr(model_args, name)
        ]
        if given:
            raise ValueError(
                f"--model_name_or_path brings its own tokenizer and text tower; drop --{given[0]}"
            )
        config_overrides(model_args)  # a bad --ablation / --config_overrides fails before loading


def build_config(model_args: ModelArguments, vocab_size: int | None) -> LoupeConfig:
    overrides = config_overrides(model_args)
    if vocab_size is not None:
        overrides["text_config"] = {**overrides.get("text_config", {}), "vocab_size": vocab_size}
    return LoupeConfig.from_preset(model_args.preset, **overrides)


def build_tokenizer(
    model_args: ModelArguments,
    data_args: DataArguments,
    dataset,
    max_length: int,
    output_dir: str,
):
    if model_args.tokenizer_name or model_args.text_model_name:
        return AutoTokenizer.from_pretrained(
            model_args.tokenizer_name or model_args.text_model_name
        )
    if model_args.model_name_or_path:  # the checkpoint's text tower reads its own tokens
        return AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    # A run's tokenizer is built once and kept in its output folder, so that a resumed run (or any
    # relaunch into the same folder) tokenises exactly as the first launch did.
    if os.path.isfile(os.path.join(output_dir, "tokenizer.json")):
        logger.info("reusing the tokenizer of %s", output_dir)
        return AutoTokenizer.from_pretrained(output_dir)
    count = model_args.tokenizer_training_captions
    if data_args.dataset == "synthetic":
        captions = training_captions(count, vocabulary_scenes(synthetic_config(data_args)))
    else:
        captions = (row["caption"] for row in islice(iter(dataset), count) if row.get("caption"))
    vocab_size = LoupeConfig.from_preset(model_args.preset).text_config.vocab_size
    logger.info("training a WordPiece tokenizer (vocab <= %d) on %d captions", vocab_size, count)
    return train_wordpiece_tokenizer(captions, vocab_size=vocab_size, model_max_length=max_length)


def vocabulary_scenes(config: SyntheticConfig) -> SyntheticConfig:
    """The scenes whose captions train the tokenizer: this run's, with as many objects as the
    built-in scenes have at least, and full captions. A single-object or shape-only stage (the
    curriculum's first) would otherwise leave the words of lists, relations, positions and
    attributes ("and", "above", "left", "red") to [UNK] and single characters for the stages
    that continue from it and for the referring expressions."""
    most = max(config.max_objects, SyntheticConfig.max_objects)
    return dataclasses.replace(config, max_objects=most, shape_caption_share=0.0)


def encoder_weights_missing(missing_keys: list[str]) -> list[str]:
    """The missing weights a continued run cannot start fresh: all but the pre-training-only ones
    (UNSIL's predictors, the step counter, the running label scales), which a run of other losses
    or an inference-only export does not have."""
    return sorted(
        key
        for key in missing_keys
        if not any(re.search(pattern, key) for pattern in PRETRAINING_ONLY_KEYS)
    )


def build_model(model_args: ModelArguments, tokenizer) -> LoupeForPreTraining:
    """A fresh model of `--preset`, or the `--model_name_or_path` checkpoint to continue from;
    `--ablation` and `--config_overrides` apply to either."""
    if model_args.model_name_or_path:
        model, info = LoupeForPreTraining.from_pretrained(
            model_args.model_name_or_path,
            allow_missing_weights=True,
            output_loading_info=True,
            **config_overrides(model_args),
        )
        lacking = encoder_weights_missing(info["missing_keys"])
        if lacking:
            raise OSError(
                f"{model_args.model_name_or_path} lacks {len(lacking)} weight(s) of the LOUPE model "
                f"({', '.join(lacking[:4])}...): it is not a LOUPE checkpoint of this architecture"
            )
        if info["missing_keys"]:  # e.g. a CMC-only backbone continued as full LOUPE
            logger.info("starting fresh: %s", ", ".join(sorted(info["missing_keys"])[:4]) + "...")
        # Steps count from 0 again: UNSIL warms up (its predictor may be new or of other losses)
        # and the label streams restart, as in any fresh run.
        model.training_steps.zero_()
        logger.info("continuing from %s (--preset is not used)", model_args.model_name_or_path)
    else:
        trained_tokenizer = not (model_args.tokenizer_name or model_args.text_model_name)
        config = build_config(model_args, len(tokenizer) if trained_tokenizer else None)
        model = LoupeForPreTraining(config)
        if model_args.text_model_name:
            text_tower = LoupeModel.from_pretrained_text_tower(config, model_args.text_model_name)
            model = LoupeForPreTraining(text_tower.config)
            model.loupe.load_state_dict(text_tower.state_dict())
    # Saved checkpoints then serve `pipeline("zero-shot-object-detection")` with the paper's prompt.
    model.config.set_prompt_template(tokenizer)
    return model


def save_run_tokenizer(tokenizer, output_dir: str) -> None:
    """Saves the run's tokenizer into `output_dir` (before step 1, so that a resumed run reuses it)
    without ever leaving half of it there: its files are written to a staging folder and moved in
    with `tokenizer.json`, whose presence means "reuse this tokenizer", last."""
    os.makedirs(output_dir, exist_ok=True)
    for leftover in glob.glob(os.path.join(output_dir, ".tokenizer-*")):  # of a killed launch
        shutil.rmtree(leftover, ignore_errors=True)
    staging = tempfile.mkdtemp(prefix=".tokenizer-", dir=output_dir)
    try:
        tokenizer.save_pretrained(staging)
        for name in sorted(os.listdir(staging), key=lambda name: name == "tokenizer.json"):
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def add_phrases(dataset, data_args: DataArguments):
    if data_args.phrase_source == "none":
        return dataset
    if data_args.phrase_source == "ground_truth":
        if "objects" not in (dataset.column_names or []):
            raise ValueError(
                "--phrase_source ground_truth needs the synthetic data's object annotations"
            )
        return dataset.map(lambda row: {"phrase_spans": row["objects"]["phrase_span"]})
    if data_args.phrase_source != "extract":
        raise ValueError(
            f"--phrase_source must be extract, ground_truth or none, got {data_args.phrase_source!r}"
        )
    if isinstance(dataset, datasets.IterableDataset):
        from loupe_hf.phrases import add_phrase_spans

        return dataset.map(add_phrase_spans, batched=True)
    return map_phrase_spans(dataset, max_phrases=data_args.max_phrases)


def main() -> None:
    model_args, data_args, training_args = parse_arguments()
    check_model_arguments(model_args)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO
    )
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)
    logger.info(
        "process %d, world size %d, device %s",
        training_args.process_index,
        training_args.world_size,
        training_args.device,
    )

    on_the_fly = data_args.dataset == "synthetic" and data_args.synthetic_streaming
    streaming = data_args.streaming or on_the_fly
    if streaming and training_args.world_size > 1:
        # Each process reads its own shards of the stream (accelerate splits a stream by its shards)
        # instead of one process dispatching batches, which cannot be concatenated when their
        # phrase and token counts differ.
        training_args.accelerator_config.dispatch_batches = False
    source = ImageCaptionSource(
        name=data_args.dataset,
        split=data_args.dataset_split,
        image_column=data_args.image_column,
        caption_column=data_args.caption_column,
        image_dir=data_args.image_dir,
        streaming=streaming,
        num_samples=data_args.num_train_samples,
        # One shard of the generated stream per consumer: no sample is generated twice.
        num_shards=training_args.world_size * max(1, training_args.dataloader_num_workers),
        # Contrast groups (one scene, then one-attribute edits of it) for training only.
        synthetic=synthetic_config(data_args, contrast_group=training_args.contrast_group),
    )
    with training_args.main_process_first(desc="dataset preparation"):
        train_dataset = add_phrases(load_image_caption_dataset(source), data_args)
        eval_dataset = None
        if data_args.dataset == "synthetic" and data_args.num_eval_samples > 0:
            validation = build_dataset(
                "validation",
                data_args.num_eval_samples,
                synthetic_config(data_args),
            )
            eval_dataset = add_phrases(validation, data_args)
    check_stream_shards(train_dataset, training_args.world_size)
    if eval_dataset is None:
        training_args.eval_strategy = "no"

    preset_text = LoupeConfig.from_preset(model_args.preset).text_config
    with training_args.main_process_first(desc="tokenizer"):
        tokenizer = build_tokenizer(
            model_args,
            data_args,
            train_dataset,
            preset_text.max_position_embeddings,
            training_args.output_dir,
        )
        if training_args.process_index == 0 and not os.path.isfile(
            os.path.join(training_args.output_dir, "tokenizer.json")
        ):
            save_run_tokenizer(tokenizer, training_args.output_dir)  # before step 1, for resuming
    model = build_model(model_args, tokenizer)
    config = model.config
    size = config.vision_config.image_size
    processor = LoupeProcessor(LoupeImageProcessor(size={"height": size, "width": size}), tokenizer)
    collator = LoupeDataCollator(
        processor,
        max_phrases=data_args.max_phrases,
        hard_negatives=model.config.hard_negative_captions,
    )
    parameters = sum(parameter.numel() for parameter in model.parameters())
    logger.info(
        "LOUPE %s / %s: %.2fM parameters", model_args.preset, model_args.ablation, parameters / 1e6
    )

    trainer = LoupeTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=processor,
    )
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is None:
        # The newest checkpoint a save finished; what a killed save left is removed or set aside
        # (by the saving process, first: the others then find the folder tidied).
        with training_args.main_process_first(
            local=training_args.save_on_each_node, desc="checkpoints"
        ):
            checkpoint = last_complete_checkpoint(training_args.output_dir)
        if checkpoint:
            logger.info("resuming from %s", checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()
    trainer.save_state()
    if trainer.is_world_process_zero():
        metrics = {**result.metrics, "skipped_samples": collator.skipped, "parameters": parameters}
        trainer.save_metrics("train", metrics)
        # The card (README.md) and the training facts it reads: examples/push_to_hub.py renders the
        # same card from this folder later.
        trainer.create_model_card(
            training_data=data_args.dataset, initialised_from=model_args.model_name_or_path
        )
        curves = plot_learning_curves(
            trainer.state.log_history, os.path.join(training_args.output_dir, "learning_curves.png")
        )
        logger.info(
            "saved the checkpoint to %s (learning curves: %s)", training_args.output_dir, curves
        )
    if training_args.push_to_hub:
        trainer.push_to_hub(
            commit_message=f"LOUPE {model_args.preset} pre-training ({model_args.ablation})",
            training_data=data_args.dataset,
            initialised_from=model_args.model_name_or_path,
        )


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():
        # Stop the process group's threads before the interpreter tears down: left running, gloo's
        # could abort a rank at exit ("terminate called without an active exception").
        torch.distributed.destroy_process_group()
