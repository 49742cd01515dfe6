"""Hub model cards for LOUPE checkpoints, rendered from the checkpoint's config and measured results.

`render_model_card(config, results, training=...)` returns the card text: YAML front matter (license,
language, library_name, pipeline_tag, tags, the training datasets when they are Hub datasets, metrics
and a `model-index` built by huggingface_hub's `ModelCardData` from the results) followed by the usual
sections. The Trainer (`LoupeTrainer.create_model_card`) and `examples/push_to_hub.py` both call it,
with the training run's facts as `TrainingFacts`, so a checkpoint gets the same card either way. The
numbers come from an evaluation JSON, never from the paper.

Results are measured in loupe-hf's own terms (`MeasuredResult`: e.g. task "visual-grounding", metric
"accuracy@IoU0.5"); the card translates them into Hub task ids (`HUB_TASKS`, from the Hub's task list)
and slug-like metric types (`HUB_METRICS`), keeping the readable names as `task_name`/`metric_name`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .configuration_loupe import LOUPE_PRESETS, LoupeConfig

# The key results on the built-in synthetic benchmark carry in `MeasuredResult.dataset`. It is not a
# Hub dataset (nothing is published): the card shows it as SYNTHETIC_DATASET_TYPE, a descriptive
# name that links nowhere, and never lists it under `datasets`.
SYNTHETIC_DATASET = "loupe-hf/synthetic-shapes"
SYNTHETIC_DATASET_TYPE = "loupe_hf.data.synthetic"
SYNTHETIC_DATASET_NAME = "Synthetic shapes (loupe_hf.data.synthetic)"
# `TrainingFacts.data` of a run on the built-in generator (`examples/pretrain.py --dataset synthetic`).
SYNTHETIC_TRAINING_DATA = "synthetic"
# Where `LoupeTrainer.create_model_card` records the run, so `examples/push_to_hub.py` can render the
# same card from the output folder later.
TRAINING_FACTS_NAME = "training_facts.json"
# Data sources `loupe_hf.data.sources` reads from local files rather than the Hub.
LOCAL_DATA_SUFFIXES = (".csv", ".json", ".jsonl", ".tar", ".parquet", ".arrow")


@dataclass(frozen=True)
class HubTask:
    """How a loupe-hf task appears in the `model-index`: a Hub task id and a readable name.

    `dataset_config` keeps results apart that share a task id on one dataset split (the
    `model-index` groups metrics by task type, dataset, config and split).
    """

    type: str
    name: str
    dataset_config: str | None = None


@dataclass(frozen=True)
class HubMetric:
    """How a loupe-hf metric appears in the `model-index`: a slug-like type and a readable name."""

    type: str
    name: str
    config: str | None = None


# Task ids from the Hub's task list (huggingface.js, packages/tasks/src/pipelines.ts, PIPELINE_DATA).
# The Hub has no grounding or image–text retrieval task: grounding localises the object a free-text
# phrase names, which is zero-shot detection with one query (a separate config keeps it apart, as
# RefCOCO is apart from COCO); retrieval ranks captions for an image by the same image–text
# similarity a zero-shot image classifier ranks labels by.
HUB_TASKS = {
    "zero-shot-object-detection": HubTask(
        "zero-shot-object-detection", "Zero-shot object detection"
    ),
    "visual-grounding": HubTask(
        "zero-shot-object-detection", "Visual grounding", "referring-expressions"
    ),
    "image-text-retrieval": HubTask("zero-shot-image-classification", "Image-text retrieval"),
}
# Metric types follow the usual slugs (torchmetrics' `map_50`); both retrieval directions are
# recall@1, told apart by the metric config.
HUB_METRICS = {
    "mAP@0.3": HubMetric("map_30", "mAP@0.3"),
    "mAP@0.5": HubMetric("map_50", "mAP@0.5"),
    "accuracy@IoU0.5": HubMetric("accuracy", "Accuracy (IoU ≥ 0.5)"),
    "image-to-text R@1": HubMetric("recall_at_1", "Image-to-text R@1", "image-to-text"),
    "text-to-image R@1": HubMetric("recall_at_1", "Text-to-image R@1", "text-to-image"),
}

CITATION = """@inproceedings{li2022loupe,
  title     = {Fine-Grained Semantically Aligned Vision-Language Pre-Training},
  author    = {Li, Juncheng and He, Xin and Wei, Longhui and Qian, Long and Zhu, Linchao and Xie, Lingxi
               and Zhuang, Yueting and Tian, Qi and Tang, Siliang},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2022}
}"""


@dataclass(frozen=True)
class TrainingFacts:
    """What a pre-training run did, as the card reports it (every field optional: None = unknown).

    Args:
        data: what the model was trained on, as `examples/pretrain.py --dataset` names it:
            `"synthetic"` (the built-in generator), a Hub dataset id, or local files.
        steps: optimizer steps taken.
        global_batch_size: image–caption pairs per step over all processes and accumulation.
        runtime_seconds: wall-clock time of the (last) `train()` call.
        hardware: the devices it ran on, e.g. `"2 × NVIDIA H200"`.
        final_loss / final_loss_step: the last logged training loss and its step.
        learning_rate / lr_schedule: the peak learning rate and the schedule's name.
        earlier_stages: the runs this one continued (`examples/pretrain.py --model_name_or_path` of
            an earlier run's folder), oldest first, each as the dict `training_facts.json` holds;
            a curriculum's last stage alone would under-report what the model saw.
    """

    data: str | None = None
    steps: int | None = None
    global_batch_size: int | None = None
    runtime_seconds: float | None = None
    hardware: str | None = None
    final_loss: float | None = None
    final_loss_step: int | None = None
    learning_rate: float | None = None
    lr_schedule: str | None = None
    earlier_stages: list[dict[str, Any]] | None = None

    @property
    def synthetic(self) -> bool:
        """Whether the model was trained on the built-in synthetic generator."""
        return self.data == SYNTHETIC_TRAINING_DATA

    @property
    def hub_dataset(self) -> str | None:
        """The training data's Hub dataset id, or None when it was generated or local files."""
        if self.data is None or self.synthetic or _is_local_data(self.data):
            return None
        try:
            validate_repo_id(self.data)
        except HFValidationError:
            return None
        return self.data

    @property
    def pairs_seen(self) -> int | None:
        """Image–caption pairs drawn for training (steps × global batch size)."""
        if self.steps is None or self.global_batch_size is None:
            return None
        return self.steps * self.global_batch_size

    @classmethod
    def from_state(cls, state, data: str | None = None) -> TrainingFacts:
        """The facts a `transformers.TrainerState` holds: steps, training time and the last loss."""
        runtime = _last_logged(state.log_history, "train_runtime")
        loss = _last_logged(state.log_history, "loss")
        return cls(
            data=data,
            steps=state.global_step,
            runtime_seconds=runtime and runtime["train_runtime"],
            final_loss=loss and loss["loss"],
            final_loss_step=loss and loss.get("step"),
        )

    @classmethod
    def from_trainer(cls, trainer, data: str | None = None) -> TrainingFacts:
        """The facts of a `transformers.Trainer`'s run: its state plus what its arguments say
        about batch size, hardware and schedule."""
        args = trainer.args
        if hasattr(trainer, "get_total_train_batch_size"):
            batch = trainer.get_total_train_batch_size(args)
        else:  # transformers before 4.50
            batch = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
        return dataclasses.replace(
            cls.from_state(trainer.state, data),
            global_batch_size=int(batch),
            hardware=_hardware(args),
            learning_rate=args.learning_rate,
            lr_schedule=_schedule_name(args),
        )

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, data: str | None = None) -> TrainingFacts:
        """The facts recorded in a training output folder: `training_facts.json` (written by
        `LoupeTrainer.create_model_card`) or else `trainer_state.json`. `data`, when given,
        overrides the recorded data source."""
        folder = Path(folder)
        if (folder / TRAINING_FACTS_NAME).is_file():
            recorded = json.loads((folder / TRAINING_FACTS_NAME).read_text())
            names = {item.name for item in dataclasses.fields(cls)}
            facts = cls(**{key: value for key, value in recorded.items() if key in names})
            return dataclasses.replace(facts, data=data) if data is not None else facts
        if (folder / "trainer_state.json").is_file():
            from transformers import TrainerState

            return cls.from_state(TrainerState.load_from_json(folder / "trainer_state.json"), data)
        return cls(data=data)

    def continuing(self, start: str | os.PathLike | None) -> TrainingFacts:
        """These facts with the stages recorded in `start`, the folder this run's weights came
        from, as `earlier_stages` (unchanged when `start` is None or not a folder, e.g. a Hub id)."""
        if start is None or not Path(start).is_dir():
            return self
        before = TrainingFacts.from_folder(start)
        if before == TrainingFacts():  # no record of any training there
            return self
        own = {**dataclasses.asdict(before), "earlier_stages": None}
        return dataclasses.replace(self, earlier_stages=[*(before.earlier_stages or []), own])

    def save(self, folder: str | os.PathLike) -> Path:
        """Writes the facts as `training_facts.json` in `folder` (read back by `from_folder`)."""
        path = Path(folder) / TRAINING_FACTS_NAME
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        return path


def _is_local_data(source: str) -> bool:
    # The rule `loupe_hf.data.sources` loads by: files, shards, globs and existing folders are local.
    return (
        source.lower().endswith(LOCAL_DATA_SUFFIXES)
        or any(char in source for char in "*?[")
        or source.startswith((".", "/", "~"))
        or os.path.exists(source)
    )


def _last_logged(log_history: Sequence[Mapping[str, Any]], key: str) -> Mapping[str, Any] | None:
    return next((entry for entry in reversed(log_history) if key in entry), None)


def _hardware(args) -> str:
    """The devices a run used: accelerator name × count, or the CPU's processes and threads."""
    device = args.device
    if device.type == "cpu":
        processes = args.world_size
        plural = "es" if processes > 1 else ""
        return f"CPU ({processes} process{plural}, {torch.get_num_threads()} threads each)"
    # n_gpu > 1 only for one process driving several GPUs (DataParallel).
    count = args.world_size * max(args.n_gpu, 1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()
    return f"{count} × {name}"


def _schedule_name(args) -> str:
    schedule = getattr(args, "lr_schedule", "transformers")
    if schedule == "onecycle":
        return "OneCycle"
    return str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))


def published_parameters(model: torch.nn.Module) -> int:
    """Parameter count of the published `LoupeModel` (a head's or pre-training module's `loupe`),
    so the Trainer's card and `examples/push_to_hub.py`'s card report the same number."""
    return sum(parameter.numel() for parameter in getattr(model, "loupe", model).parameters())


@dataclass(frozen=True)
class MeasuredResult:
    """One measured number: `value` of `metric` for `task` on `dataset`/`split`."""

    task: str
    dataset: str
    split: str
    metric: str
    value: float


def results_from_synthetic_report(
    report: Mapping[str, Any], dataset: str = SYNTHETIC_DATASET
) -> list[MeasuredResult]:
    """Results of `examples/evaluate.py --task synthetic` (or `examples/demo.py`'s metrics.json)."""
    split = report.get("split", "validation")
    results = []
    detection = report.get("detection", {})
    for metric in ("mAP@0.3", "mAP@0.5"):
        if metric in detection:
            results.append(
                MeasuredResult(
                    "zero-shot-object-detection", dataset, split, metric, detection[metric]
                )
            )
    grounding = report.get("grounding", {})
    accuracy = grounding.get("accuracy", grounding.get("accuracy@0.5"))
    if accuracy is not None:
        results.append(
            MeasuredResult("visual-grounding", dataset, split, "accuracy@IoU0.5", accuracy)
        )
    retrieval = report.get("retrieval", report.get("retrieval_R@1", {}))
    for key, metric in (("i2t_R@1", "image-to-text R@1"), ("image_to_text", "image-to-text R@1"),
                        ("t2i_R@1", "text-to-image R@1"), ("text_to_image", "text-to-image R@1")):  # fmt: skip
        if key in retrieval:
            results.append(
                MeasuredResult("image-text-retrieval", dataset, split, metric, retrieval[key])
            )
    return results


def results_from_ablation(
    ablation: Mapping[str, Any], row: str = "loupe", dataset: str = SYNTHETIC_DATASET
) -> list[MeasuredResult]:
    """Results of one row of `examples/ablation.py`'s ablation.json."""
    results = []
    for split, scores in ablation["results"][row]["splits"].items():
        results += [
            MeasuredResult(
                "zero-shot-object-detection", dataset, split, "mAP@0.3", scores["mAP@0.3"]
            ),
            MeasuredResult(
                "zero-shot-object-detection", dataset, split, "mAP@0.5", scores["mAP@0.5"]
            ),
            MeasuredResult(
                "visual-grounding", dataset, split, "accuracy@IoU0.5", scores["grounding_acc"]
            ),
            MeasuredResult(
                "image-text-retrieval", dataset, split, "image-to-text R@1", scores["i2t_R@1"]
            ),
            MeasuredResult(
                "image-text-retrieval", dataset, split, "text-to-image R@1", scores["t2i_R@1"]
            ),
        ]
    return results


def preset_name(config: LoupeConfig) -> str | None:
    """The preset `config`'s towers were built from, if any."""
    for name, preset in LOUPE_PRESETS.items():
        # A preset without a convolutional backbone names a Swin: `tiny` differs from `tiny-swin` only there.
        vision = {"convolutional_backbone": None, **preset["vision_config"]}
        if all(
            _same(getattr(config.vision_config, key), value) for key, value in vision.items()
        ) and all(
            _same(getattr(config.text_config, key), value)
            for key, value in preset["text_config"].items()
            if key != "vocab_size"
        ):
            return name
    return None


def _same(left: Any, right: Any) -> bool:
    return list(left) == list(right) if isinstance(right, (list, tuple)) else left == right


def render_model_card(
    config: LoupeConfig,
    results: Sequence[MeasuredResult] = (),
    *,
    model_name: str = "LOUPE",
    repo_id: str | None = None,
    training: TrainingFacts | None = None,
    ablation_table: str | None = None,
    num_parameters: int | None = None,
) -> str:
    """The model card (README.md) of a LOUPE checkpoint.

    Args:
        config: the checkpoint's config.
        results: measured results (see `results_from_synthetic_report`, `results_from_ablation`).
        model_name: the name in the card and its `model-index`.
        repo_id: Hub id used in the loading snippet (a placeholder when None).
        training: facts about the training run (`TrainingFacts`); its data source decides the
            `datasets` field and whether the synthetic-data limitation applies.
        ablation_table: a Markdown table to include (e.g. `docs/ablation_table.md`).
        num_parameters: the published model's parameter count (`published_parameters`).
    """
    training = training or TrainingFacts()
    evaluations = [_eval_result(result) for result in results]
    data = ModelCardData(
        language="en",
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="zero-shot-object-detection",
        tags=[
            "loupe",
            "vision-language",
            "zero-shot-object-detection",
            "visual-grounding",
            "shapley-interaction",
            "custom_code",
        ],
        # `datasets` names the training data, and only real Hub datasets (the Hub checks them).
        datasets=[training.hub_dataset] if training.hub_dataset else None,
        metrics=sorted({result.metric_type for result in evaluations}) or None,
        model_name=model_name,
        eval_results=evaluations or None,
    )
    body = _body(
        config,
        evaluations,
        model_name,
        repo_id or "path/to/checkpoint",
        training,
        ablation_table,
        num_parameters,
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def _eval_result(result: MeasuredResult) -> EvalResult:
    """`result` in the Hub's terms: a task id from its task list and a slug-like metric type."""
    if result.task not in HUB_TASKS:
        raise ValueError(f"no Hub task for {result.task!r}; known: {sorted(HUB_TASKS)}")
    task = HUB_TASKS[result.task]
    metric = HUB_METRICS.get(result.metric) or HubMetric(_slug(result.metric), result.metric)
    synthetic = result.dataset == SYNTHETIC_DATASET
    return EvalResult(
        task_type=task.type,
        task_name=task.name,
        dataset_type=SYNTHETIC_DATASET_TYPE if synthetic else result.dataset,
        dataset_name=SYNTHETIC_DATASET_NAME if synthetic else result.dataset,
        dataset_config=task.dataset_config,
        dataset_split=result.split,
        metric_type=metric.type,
        metric_name=metric.name,
        metric_config=metric.config,
        metric_value=round(float(result.value), 4),
    )


def _slug(name: str) -> str:
    """A metric type for a metric `HUB_METRICS` does not know: lower case, `_` between words."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower().replace("@", " at ")).strip("_")


def _pooling_limitation(config) -> str:
    """What the measured ablation says about this model's image pooling (docs/ablation.md)."""
    if config.image_pooling == "max":
        return (
            'This model pools image tokens by max (`image_pooling="max"`), not by the paper\'s '
            "mean:\n  at the tiny scale, mean pooling made region–text similarity inverted (objects "
            "the least\n  caption-like part of the image) and zero-shot localisation failed. In "
            "loupe-hf's ablation\n  on its synthetic data (a CMC-only first stage on single objects, "
            "then 300 steps of each row),\n  full LOUPE reached mAP@0.5 0.36 and grounding accuracy "
            "0.62 on `validation` (the CMC-only\n  backbone's dense-similarity maps: mAP@0.5 0.13).\n  "
            "See `docs/ablation.md` of loupe-hf."
        )
    return (
        'This model pools image tokens by mean (`image_pooling="mean"`, the paper\'s choice). At '
        "the tiny\n  scale that made region–text similarity inverted (objects the least "
        "caption-like part of the\n  image), so detection mAP and grounding accuracy stayed near "
        "zero; max pooling fixed it.\n  See `docs/ablation.md` of loupe-hf."
    )


def _limitations(config, training: TrainingFacts) -> str:
    """The card's limitations; the synthetic-data one only for a model trained on that data."""
    items = []
    if training.synthetic:
        items.append(
            "Trained only on data generated by `loupe_hf.data.synthetic`, the CPU-sized built-in "
            "benchmark:\n  shapes and colours on textured backgrounds. The numbers do not transfer "
            "to real photos."
        )
    items += [
        "The paper's scale (240M pairs, Swin-L, 20 days on 128 V100) was not reproduced; the "
        "`paper` preset\n  reproduces its architecture (226.7M parameters vs. the paper's 226M), "
        "not its results.",
        "Detection scores are calibrated by the similarity offset learned during pre-training, "
        "not by box\n  labels; thresholds may need tuning per use.",
        _pooling_limitation(config),
    ]
    return "\n".join(f"- {item}" for item in items)


def _image_tower(vision) -> str:
    grid = f"{vision.dense_grid_size}x{vision.dense_grid_size} patch tokens"
    if vision.is_convolutional:
        return (
            f"timm {vision.convolutional_backbone} (from scratch), {vision.image_size} px, {grid}"
        )
    return (
        f"timm Swin, {vision.image_size} px, patch {vision.patch_size}, embed {vision.embed_dim}, "
        f"depths {list(vision.depths)}, window {vision.window_size}, {grid}"
    )


def _body(
    config, evaluations, model_name, repo_id, training, ablation_table, num_parameters
) -> str:
    vision, text = config.vision_config, config.text_config
    preset = preset_name(config)
    size = f"{num_parameters / 1e6:.2f}M parameters" if num_parameters else "see config.json"
    ablation = (
        f"\n## Small-scale ablation (synthetic data)\n\n{ablation_table.strip()}\n"
        if ablation_table
        else ""
    )
    return f"""# {model_name}

A LOUPE dual encoder (Li et al., *Fine-Grained Semantically Aligned Vision-Language Pre-Training*,
NeurIPS 2022) in the transformers format, built with loupe-hf. It learns from
image–caption pairs alone which image regions match which caption phrases (game-theoretic Shapley
interactions supervise a region generation module and region–phrase alignment), and then detects and
grounds objects zero-shot: no box labels, no fine-tuning.

## Model
- Image tower: {_image_tower(vision)}.
- Text tower: BERT, {text.num_hidden_layers} layers, hidden {text.hidden_size}, {text.num_attention_heads} heads, vocabulary {text.vocab_size}.
- Joint space: {config.projection_dim} dims; {config.num_regions} regions per image from the region module.
- Preset: {preset or "custom"}; {size}.
- Objectives: {_objectives(config)}.

## Intended use
Zero-shot object detection and visual grounding from free-text queries, zero-shot image
classification and image–text retrieval; research on fine-grained vision-language alignment.

## How to load
```python
import loupe_hf  # registers the LOUPE classes (or pass trust_remote_code=True without it)
from transformers import AutoModel, AutoProcessor, pipeline

model = AutoModel.from_pretrained("{repo_id}")
processor = AutoProcessor.from_pretrained("{repo_id}")
detector = pipeline("zero-shot-object-detection", model="{repo_id}")
detector(image, candidate_labels=["star", "circle"], threshold=0.3)
```
The prompt template `{config.prompt_template}` is applied to detection labels by the model itself.

## Training data and procedure
{_training_section(training)}

## Evaluation
{_results_table(evaluations)}
{ablation}
## Limitations
{_limitations(config, training)}

## Citation
```bibtex
{CITATION}
```
"""


def _objectives(config) -> str:
    """The losses the checkpoint was trained with, and which labels UNSIL could supply."""
    fsa = "FSA" if config.fsa_image_gradient else "FSA (no gradient into the image tower)"
    terms = ["CMC"] + [
        name for name, used in (("TSA", config.use_tsa), (fsa, config.use_fsa)) if used
    ]
    text = " + ".join(terms)
    used = {"token": config.use_tsa, "semantic": config.use_fsa}
    levels = [level for level in config.unsil_levels if used[level]]
    if config.use_unsil and levels:
        names = {"token": "token-level (TSA)", "semantic": "semantics-level (FSA)"}
        text += " + UNSIL for the " + " and ".join(names[level] for level in levels) + " labels"
    return text


def _data_description(training: TrainingFacts) -> str:
    if training.data is None:
        return "not recorded for this checkpoint."
    if training.synthetic:
        return (
            "image–caption pairs generated by loupe-hf's built-in synthetic generator\n"
            "  (`loupe_hf.data.synthetic`): scenes of shapes and colours on textured backgrounds. "
            "No dataset\n  was downloaded or published."
        )
    if training.hub_dataset:
        return (
            f"the Hub dataset [`{training.data}`](https://huggingface.co/datasets/{training.data})."
        )
    return f"`{training.data}` (local files, not published on the Hub)."


def _stage_summary(stage: Mapping[str, Any]) -> str:
    """An earlier stage in a clause: its steps, batch size and pairs, and its data."""
    facts = TrainingFacts(**{key: stage.get(key) for key in ("data", "steps", "global_batch_size")})
    if facts.steps is None:
        return "a run whose steps were not recorded"
    words = f"{facts.steps:,} steps"
    if facts.global_batch_size:
        words += (
            f" at a global batch size of {facts.global_batch_size:,} ({facts.pairs_seen:,} pairs)"
        )
    if facts.data is None:
        return words
    return words + (", the synthetic generator" if facts.synthetic else f", `{facts.data}`")


def _training_section(training: TrainingFacts) -> str:
    """The run in sentences: data, steps and pairs, schedule, time, hardware, final loss."""
    lines = [f"- Data: {_data_description(training)}"]
    if training.steps is not None:
        batch = training.global_batch_size
        at = f" at a global batch size of {batch:,}" if batch else ""
        pairs = f" ({training.pairs_seen:,} image–caption pairs seen)" if batch else ""
        lines.append(f"- Steps: {training.steps:,}{at}{pairs}.")
    for number, stage in enumerate(training.earlier_stages or [], start=1):
        lines.append(f"- Continued from stage {number}: {_stage_summary(stage)}.")
    if training.learning_rate is not None:
        lines.append(
            f"- Learning rate: {training.learning_rate:g} peak, {training.lr_schedule} schedule."
        )
    if training.runtime_seconds is not None:
        lines.append(f"- Training time: {_duration(training.runtime_seconds)}.")
    if training.hardware:
        lines.append(f"- Hardware: {training.hardware}.")
    if training.final_loss is not None:
        step = f" (step {training.final_loss_step:,})" if training.final_loss_step else ""
        lines.append(f"- Final training loss: {training.final_loss:.4f}{step}.")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    """`seconds` as a person reads it: 42.5 s, 3 min 19 s, 2 h 05 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, second = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {second:02d} s"
    hours, minute = divmod(minutes, 60)
    return f"{hours} h {minute:02d} min"


def _results_table(evaluations: Sequence[EvalResult]) -> str:
    if not evaluations:
        return "No evaluation results were recorded for this checkpoint."
    lines = ["| task | dataset | split | metric | value |", "|---|---|---|---|---|"]
    lines += [
        f"| {e.task_name} | {e.dataset_name} | {e.dataset_split} | {e.metric_name} | "
        f"{e.metric_value:.4f} |"
        for e in evaluations
    ]
    return "\n".join(lines)


__all__ = [
    "HUB_METRICS",
    "HUB_TASKS",
    "MeasuredResult",
    "TrainingFacts",
    "preset_name",
    "published_parameters",
    "render_model_card",
    "results_from_ablation",
    "results_from_synthetic_report",
]
