"""`LoupeTrainer`: a thin `transformers.Trainer` for LOUPE pre-training.

It wires; the model computes. `LoupeForPreTraining.forward` returns the loss and every component
as declared fields of `LoupePreTrainingOutput`; the trainer averages the components over the steps
between two logs (and over processes) and logs them next to the loss, adds the count of skipped
corrupt samples, and offers the paper's OneCycle schedule with momentum cycling.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from huggingface_hub import HfApi
from torch.optim.lr_scheduler import OneCycleLR
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import has_length
from transformers.utils.hub import PushInProgress

from ..cpu_allocator import keep_freed_memory
from ..hub import upload_model_folder
from ..model_card import (
    TrainingFacts,
    published_parameters,
    render_model_card,
    results_from_synthetic_report,
)
from .collator import ContrastGroupSampler
from .modeling_pretraining import LoupePreTrainingOutput

logger = logging.getLogger(__name__)

LOGGED_COMPONENTS = tuple(
    item.name
    for item in fields(LoupePreTrainingOutput)
    if item.name not in ("loss", "logits_per_image")
)
LR_SCHEDULES = ("onecycle", "transformers")


@dataclass
class LoupeTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the paper's schedule (METHOD §4: AdamW, OneCycle with momentum cycling).

    Args:
        lr_schedule: `"onecycle"` (torch's OneCycleLR, peak `learning_rate`, cosine annealing, Adam's β1
            cycled between `base_momentum` and `max_momentum`) or `"transformers"` (use
            `lr_scheduler_type` and `warmup_steps` as usual).
        onecycle_pct_start: share of the steps spent warming up to the peak learning rate.
        base_momentum / max_momentum: β1 range of the momentum cycle (paper: 0.85–0.95).
        keep_freed_memory: when training starts, set glibc's allocator to keep freed memory in the
            process (`loupe_hf.cpu_allocator`), so CPU steps stop page-faulting their intermediates
            back in. Off by default because it holds for the whole process and keeps resident
            memory at its peak: turn it on for CPU training in a process of its own (the example
            scripts do). No effect off glibc.
        contrast_group: consecutive training examples form groups of this size (synthetic
            contrast groups, `SyntheticConfig.contrast_group`) that are shuffled as wholes, so that
            every batch holds whole groups; the per-device batch size must be a multiple of it.
    """

    lr_schedule: str = field(default="onecycle", metadata={"help": "onecycle | transformers"})
    onecycle_pct_start: float = field(default=0.1, metadata={"help": "OneCycle warm-up share"})
    base_momentum: float = field(default=0.85, metadata={"help": "OneCycle lowest beta1"})
    max_momentum: float = field(default=0.95, metadata={"help": "OneCycle highest beta1"})
    keep_freed_memory: bool = field(
        default=False,
        metadata={
            "help": "glibc: keep freed memory in the process (faster CPU steps; process-wide)"
        },
    )
    contrast_group: int = field(
        default=1, metadata={"help": "keep groups of this many consecutive examples in one batch"}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.contrast_group < 1 or self.per_device_train_batch_size % self.contrast_group:
            raise ValueError(
                f"contrast_group must be >= 1 and divide per_device_train_batch_size "
                f"({self.per_device_train_batch_size}), got {self.contrast_group}"
            )


class LoupeTrainer(Trainer):
    """Trainer for [`LoupeForPreTraining`] (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The model returns a loss already averaged over its batch: let the Trainer divide by the
        # gradient-accumulation steps itself rather than expect a sum over `num_items_in_batch`.
        self.model_accepts_loss_kwargs = False
        self._component_sums = torch.zeros(len(LOGGED_COMPONENTS), dtype=torch.float64)
        self._component_steps = 0

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` resumes from the newest *complete*
        checkpoint of the output folder (`last_complete_checkpoint`), not merely the newest."""
        if getattr(self.args, "keep_freed_memory", False):
            applied = keep_freed_memory()
            logger.info("glibc allocator keeps freed memory: %s", "yes" if applied else "not glibc")
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no complete checkpoint to resume from in {self.args.output_dir}")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        group = getattr(self.args, "contrast_group", 1)
        if group > 1 and dataset is not None and has_length(dataset):
            return ContrastGroupSampler(len(dataset), group, seed=self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        if model.training:
            values = [float(getattr(outputs, name)) for name in LOGGED_COMPONENTS]
            self._component_sums += torch.tensor(values, dtype=torch.float64)
            self._component_steps += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation reports the loss only: the outputs are per-batch scalars, not predictions."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._component_steps > 0:
            means = (self._component_sums / self._component_steps).to(
                self.args.device, torch.float32
            )
            means = self.accelerator.reduce(means, reduction="mean")
            logs.update(
                {
                    name: round(float(value), 6)
                    for name, value in zip(LOGGED_COMPONENTS, means, strict=True)
                }
            )
            self._component_sums.zero_()
            self._component_steps = 0
        skipped = getattr(self.data_collator, "skipped", None)
        if skipped is not None and "loss" in logs:
            logs["skipped_samples"] = skipped
        super().log(logs, start_time)

    def _clip_grad_norm(self, model):
        """Clips the encoders and the UNSIL predictors separately. UNSIL learns from detached
        features and its loss starts large; clipped jointly, its gradients would dominate the
        global norm and shrink the encoders' updates. Returns the encoders' pre-clip norm."""
        unwrapped = self.accelerator.unwrap_model(model)
        if not hasattr(unwrapped, "unsil_parameters"):
            return super()._clip_grad_norm(model)
        unsil = list(unwrapped.unsil_parameters())
        if unsil:
            torch.nn.utils.clip_grad_norm_(unsil, self.args.max_grad_norm)
        unsil_ids = {id(parameter) for parameter in unsil}
        encoders = [parameter for parameter in model.parameters() if id(parameter) not in unsil_ids]
        return torch.nn.utils.clip_grad_norm_(encoders, self.args.max_grad_norm)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        **kwargs,
    ):
        """Saves the model and its card, then uploads the output folder's allow-listed files only
        (`loupe_hf.hub.MODEL_FILES`): never `training_args.bin` (it holds the Hub token), optimizer
        state, logs or anything else kept there. Keywords go to `create_model_card`."""
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        model_name = kwargs.pop("model_name", None) or self.hub_model_id.split("/")[-1]
        self.create_model_card(model_name=model_name, **kwargs)
        self._finish_current_push()
        return upload_model_folder(
            HfApi(),
            self.hub_model_id,
            self.args.output_dir,
            commit_message=commit_message,
            token=token,
            revision=revision if revision is not None else self.args.hub_revision,
            run_as_future=not blocking,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Pushes a saved checkpoint's allow-listed files while training (`hub_strategy`): the model
        at the repo's root and, for the checkpoint strategies, what resuming needs in its own folder."""
        strategy = str(getattr(self.args.hub_strategy, "value", self.args.hub_strategy))
        if not self.is_world_process_zero() or strategy == "end":
            return
        busy = self.push_in_progress is not None and not self.push_in_progress.is_done()
        if busy and not self.args.hub_always_push:
            return
        upload = {
            "token": self.args.hub_token,
            "revision": self.args.hub_revision,
            "run_as_future": True,
        }
        message = f"Training in progress, step {self.state.global_step}"
        jobs = [
            upload_model_folder(
                HfApi(), self.hub_model_id, checkpoint_folder, commit_message=message, **upload
            )
        ]
        if strategy in ("checkpoint", "all_checkpoints"):
            folder = "last-checkpoint" if strategy == "checkpoint" else Path(checkpoint_folder).name
            jobs.append(
                upload_model_folder(
                    HfApi(),
                    self.hub_model_id,
                    checkpoint_folder,
                    with_resume_state=True,
                    path_in_repo=folder,
                    commit_message=f"{message}, checkpoint",
                    **upload,
                )
            )
        if busy:
            self.push_in_progress.jobs.extend(jobs)
        else:
            self.push_in_progress = PushInProgress(jobs)

    def create_model_card(
        self, model_name: str | None = None, training_data: str | None = None, **kwargs
    ) -> None:
        """Writes the LOUPE model card (`loupe_hf.model_card.render_model_card`) as `README.md` of
        the output folder, so `push_to_hub` uploads the card `examples/push_to_hub.py` renders.

        Args:
            model_name: the card's and its `model-index`'s name (default: the output folder's).
            training_data: what the model was trained on, as `examples/pretrain.py --dataset` names
                it (`"synthetic"`, a Hub dataset id, local files); None: not recorded.
            kwargs: transformers' card arguments, ignored: the card is rendered from the checkpoint.

        Results are read from `evaluation.json` in the output folder when an evaluation wrote one.
        The run's facts are also saved there (`training_facts.json`), from which
        `examples/push_to_hub.py` renders the same card later."""
        if not self.is_world_process_zero():
            return
        model = self.accelerator.unwrap_model(self.model)
        results = []
        evaluation = os.path.join(self.args.output_dir, "evaluation.json")
        if os.path.isfile(evaluation):
            with open(evaluation) as handle:
                results = results_from_synthetic_report(json.load(handle))
        training = TrainingFacts.from_trainer(self, data=training_data)
        training.save(self.args.output_dir)
        card = render_model_card(
            model.config,
            results,
            model_name=model_name or os.path.basename(os.path.normpath(self.args.output_dir)),
            repo_id=self.hub_model_id or self.args.hub_model_id,
            training=training,
            num_parameters=published_parameters(model),
        )
        with open(os.path.join(self.args.output_dir, "README.md"), "w") as handle:
            handle.write(card)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if getattr(self.args, "lr_schedule", "transformers") != "onecycle":
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            optimizer = optimizer if optimizer is not None else self.optimizer
            total_steps = max(num_training_steps, 2)
            self.lr_scheduler = OneCycleLR(
                optimizer,
                max_lr=self.args.learning_rate,
                total_steps=total_steps,
                pct_start=onecycle_warmup_share(self.args.onecycle_pct_start, total_steps),
                anneal_strategy="cos",
                cycle_momentum=True,
                base_momentum=self.args.base_momentum,
                max_momentum=self.args.max_momentum,
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` folder of `output_dir` that a save finished: its trainer state (the
    last file a save writes) parses and its weights are there. Newer folders a killed save left
    half-written are renamed `checkpoint-N.incomplete` (kept, not deleted) with a warning naming
    them, so that relaunching the same command resumes instead of failing on them."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = [
        (int(path.name.split("-", 1)[1]), path)
        for path in root.iterdir()
        if path.is_dir() and path.name.startswith("checkpoint-") and path.name[11:].isdigit()
    ]
    for _, path in sorted(found, reverse=True):
        if _is_complete(path):
            return str(path)
        moved = path.with_name(f"{path.name}.incomplete")
        path.rename(moved)
        logger.warning("skipped the incomplete checkpoint %s (moved to %s)", path, moved)
    return None


def _is_complete(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return any(
        (checkpoint / name).is_file()
        for name in ("model.safetensors", "model.safetensors.index.json")
    )


def onecycle_warmup_share(pct_start: float, total_steps: int) -> float:
    """`pct_start` moved just enough that both OneCycle phases last more than one step: torch
    divides by each phase's length in steps, and a phase of length 0 (e.g. 10% of 10 steps) fails."""
    return min(max(pct_start, 1.5 / total_steps), 1 - 0.5 / total_steps)


__all__ = [
    "LOGGED_COMPONENTS",
    "LoupeTrainer",
    "LoupeTrainingArguments",
    "last_complete_checkpoint",
    "onecycle_warmup_share",
]
