"""`LoupeTrainer`: a thin `transformers.Trainer` for LOUPE pre-training.

It wires; the model computes. `LoupeForPreTraining.forward` returns the loss and every component
as declared fields of `LoupePreTrainingOutput`; the trainer averages the components over the steps
between two logs (and over processes) and logs them next to the loss, adds the count of skipped
corrupt samples (summed over processes, carried in the batches from DataLoader workers, kept across
a resume), and offers the paper's OneCycle schedule with momentum cycling.

Checkpoints are written atomically: to a hidden staging folder beside their place, renamed to
`checkpoint-N` once every file is in, so that a kill or a full disk during a save never leaves a
`checkpoint-N` that resuming would pick. A failed save raises `CheckpointSaveError` naming the
folder and the cause (`no space left on device (ENOSPC)`, not torch's `unexpected pos`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi
from torch.optim.lr_scheduler import OneCycleLR
from transformers import Trainer, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    SaveStrategy,
    has_length,
    rotate_checkpoints,
)
from transformers.utils.hub import PushInProgress

from ..cpu_allocator import keep_freed_memory
from ..hub import upload_model_folder
from ..model_card import (
    TrainingFacts,
    published_parameters,
    render_model_card,
    results_from_synthetic_report,
)
from .collator import SKIPPED_SAMPLES_KEY, ContrastGroupSampler
from .modeling_pretraining import LoupePreTrainingOutput

logger = logging.getLogger(__name__)

LOGGED_COMPONENTS = tuple(
    item.name
    for item in fields(LoupePreTrainingOutput)
    if item.name not in ("loss", "logits_per_image")
)
LR_SCHEDULES = ("onecycle", "transformers")
# A checkpoint is written to `.checkpoint-N.partial` and renamed `checkpoint-N` when complete; a
# half-written `checkpoint-N` from an older, non-atomic save is set aside as `incomplete-checkpoint-N`.
# Neither name matches the `checkpoint-*` glob of transformers' rotation and resume, which would
# otherwise count them as checkpoints (and could delete the last complete one in their place).
PARTIAL_SUFFIX = ".partial"
SET_ASIDE_PREFIX = "incomplete-"
# Errors whose cause names a full disk, a read-only folder and the like, in words or as a number.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)
_ERRNO_IN_MESSAGE = re.compile(r"(?:os error|errno)\s*(\d+)", re.IGNORECASE)
# What torch's zip writer says when a write falls short; it carries no errno.
_TORCH_WRITE_FAILURES = (
    "unexpected pos",
    "failed writing file",
    "iostream error",
    "cannot be opened",
)
_PROBE_BYTES = 1 << 20
# Each process's own place in its data, saved beside its `rng_state_{i}.pth`: `trainer_state.json`
# is process 0's, and a streamed pass can be shorter on one process than on another.
DATA_POSITION_FILE = "data_position_{}.json"


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
        if self.is_fsdp_enabled and hasattr(self.model, "make_fsdp_shardable"):
            self.model.make_fsdp_shardable()  # FSDP shards no 0-d parameter (the logit scale)
        # The model returns a loss already averaged over its batch: let the Trainer divide by the
        # gradient-accumulation steps itself rather than expect a sum over `num_items_in_batch`.
        self.model_accepts_loss_kwargs = False
        self._component_sums = torch.zeros(len(LOGGED_COMPONENTS), dtype=torch.float64)
        self._component_steps = 0
        # Samples this process's collator dropped, counted from the batches: a collator running
        # in a DataLoader worker is a copy, whose own `skipped` the training process never sees.
        self._counts_skipped = hasattr(self.data_collator, "count_in_batch")
        if self._counts_skipped:
            self.data_collator.count_in_batch = True
        self._skipped_samples = 0

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`; `resume_from_checkpoint=True` resumes from the newest *complete*
        checkpoint of the output folder (`last_complete_checkpoint`), not merely the newest.
        Staging folders of saves a killed run left behind are removed first, with a log line."""
        if getattr(self.args, "keep_freed_memory", False):
            applied = keep_freed_memory()
            logger.info("glibc allocator keeps freed memory: %s", "yes" if applied else "not glibc")
        # The saving process goes first, so that the others find the folder already tidied.
        with self.args.main_process_first(local=self.args.save_on_each_node, desc="checkpoints"):
            if resume_from_checkpoint is True:
                resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
                if resume_from_checkpoint is None:
                    raise ValueError(
                        f"no complete checkpoint to resume from in {self.args.output_dir}"
                    )
                logger.info("resuming from %s", resume_from_checkpoint)
            elif self.args.should_save:
                remove_partial_saves(self.args.output_dir)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _init_training_state(
        self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
    ):
        """Where a resumed run picks up its data. For a dataloader without a length (streamed data)
        transformers counts every step as one of epoch 0 and would skip `global_step` batches of
        the first pass, running past its end and restarting the next pass from its first batch
        when the checkpoint was taken after the first pass: the resumed run saw other batches than
        the uninterrupted one. The process's `epoch` (passes + batches / batches-per-pass, as the
        trainer counts them) gives the true pass and batch: its own, saved in the checkpoint by
        `_save_data_position`, or, in a checkpoint without it, the trainer state's (process 0's)."""
        epochs, batches = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        saved = None
        if resume_from_checkpoint is not None:
            saved = saved_position(
                resume_from_checkpoint,
                self.args.process_index,
                self.args.world_size,
                self.state.global_step,
            )
        # The resumed run goes on counting the skipped samples where the interrupted one stopped.
        self._skipped_samples = 0 if saved is None else saved["skipped_samples"]
        streamed = num_train_epochs == sys.maxsize  # transformers' mark of a length-less loader
        if resume_from_checkpoint is None or not streamed or self.args.ignore_data_skip:
            return epochs, batches
        own_epoch = None if saved is None else saved["epoch"]
        if own_epoch is not None:
            self.state.epoch = own_epoch  # as this process counted it in the interrupted run
        saved_max_steps = _saved_max_steps(resume_from_checkpoint)
        if self.state.epoch is None or saved_max_steps is None:
            return epochs, batches
        batches_per_pass = saved_max_steps * self.args.gradient_accumulation_steps
        passes, batches = stream_position(self.state.epoch, batches_per_pass)
        logger.info(
            "process %d resumes its stream at pass %d, batch %d (%s)",
            self.args.process_index,
            passes,
            batches,
            "its own position" if own_epoch is not None else "the trainer state's position",
        )
        return passes, batches

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        group = getattr(self.args, "contrast_group", 1)
        if group > 1 and dataset is not None and has_length(dataset):
            return ContrastGroupSampler(len(dataset), group, seed=self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        skipped = inputs.pop(SKIPPED_SAMPLES_KEY, None)
        outputs = model(**inputs)
        if model.training:
            if skipped is not None:
                self._skipped_samples += int(skipped.sum())
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
        if "loss" in logs and self._counts_skipped:
            count = torch.tensor([self._skipped_samples], device=self.args.device)
            logs["skipped_samples"] = int(self.accelerator.reduce(count, reduction="sum").item())
        elif "loss" in logs and hasattr(self.data_collator, "skipped"):
            logs["skipped_samples"] = self.data_collator.skipped  # a collator of its own kind
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
        self,
        model_name: str | None = None,
        training_data: str | None = None,
        initialised_from: str | None = None,
        **kwargs,
    ) -> None:
        """Writes the LOUPE model card (`loupe_hf.model_card.render_model_card`) as `README.md` of
        the output folder, so `push_to_hub` uploads the card `examples/push_to_hub.py` renders.

        Args:
            model_name: the card's and its `model-index`'s name (default: the output folder's).
            training_data: what the model was trained on, as `examples/pretrain.py --dataset` names
                it (`"synthetic"`, a Hub dataset id, local files); None: not recorded.
            initialised_from: the folder (or Hub id) the run's weights were loaded from; the stages
                recorded in a folder's `training_facts.json` are listed as earlier stages.
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
        training = TrainingFacts.from_trainer(self, data=training_data).continuing(initialised_from)
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

    def _save_checkpoint(self, model, trial) -> None:
        """`Trainer._save_checkpoint` (transformers 5.x), made atomic: every file (weights,
        processor, optimizer, scheduler, RNG states and data positions of all processes, trainer
        state) goes to a staging folder beside the checkpoint's place, which is renamed
        `checkpoint-N` only when all are written; then the Hub upload and the rotation run as usual
        on the final folder. A failed write removes the staging folder and raises
        `CheckpointSaveError`."""
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        checkpoint = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        staging = str(staging_folder(checkpoint))
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # an earlier, failed save of this step
        self.accelerator.wait_for_everyone()  # ... removed before any process writes to it
        try:
            self._write_checkpoint(model, staging, run_dir)
            self.accelerator.wait_for_everyone()  # every process's files (RNG states) are in
            if self.args.should_save:
                publish_checkpoint(staging, checkpoint)
        except BaseException as error:
            failure = _failed_save(checkpoint, staging, error)
            if failure is None:
                raise
            raise failure from error
        self.accelerator.wait_for_everyone()  # the others see the final folder from here on
        if self.args.push_to_hub:
            self._push_from_checkpoint(checkpoint)
        if self.args.should_save:
            # mtime as transformers does; `sort_checkpoints` falls back to step numbers if needed.
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _write_checkpoint(self, model, folder: str, run_dir: str) -> None:
        """Writes what `Trainer._save_checkpoint` writes, in `folder`, trainer state last."""
        self.save_model(folder, _internal_call=True)
        self._note_best_checkpoint(run_dir)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(folder)
            self._save_scaler(folder)
            self._save_rng_state(folder)
            self._save_data_position(folder)
        if self.args.should_save:
            self._export_callback_states()
            self.state.save_to_json(os.path.join(folder, TRAINER_STATE_NAME))

    def _save_data_position(self, folder: str) -> None:
        """Writes this process's place in its data (`DATA_POSITION_FILE`, read back by
        `saved_data_position`): its epoch count, with the step and the number of processes."""
        os.makedirs(folder, exist_ok=True)  # process 0 may not have created it yet
        position = {
            "epoch": self.state.epoch,
            "global_step": self.state.global_step,
            "world_size": self.args.world_size,
            "skipped_samples": self._skipped_samples,
        }
        path = Path(folder) / DATA_POSITION_FILE.format(self.args.process_index)
        path.write_text(json.dumps(position))

    def _note_best_checkpoint(self, run_dir: str) -> None:
        """Records the best checkpoint's folder (as transformers does), counting this save's own
        folder as there although it is still being staged."""
        strategies = (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)
        best_step = self.state.best_global_step
        if self.args.save_strategy not in strategies or not best_step:
            return
        self.accelerator.wait_for_everyone()  # process 0 has saved the model
        best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best_step}")
        if best_step == self.state.global_step or os.path.exists(best):
            self.state.best_model_checkpoint = best

    def _export_callback_states(self) -> None:
        """Stores the `ExportableState` callbacks' and the control's state in the trainer state."""
        for callback in [*self.callback_handler.callbacks, self.control]:
            if not isinstance(callback, ExportableState):
                continue
            name = callback.__class__.__name__
            if isinstance(self.state.stateful_callbacks[name], list):
                self.state.stateful_callbacks[name].append(callback.state())
            else:
                self.state.stateful_callbacks[name] = callback.state()

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


class CheckpointSaveError(OSError):
    """A checkpoint could not be written. `filename` is the checkpoint's folder and `errno` the
    cause where one was found (`errno.ENOSPC` for a full disk, `errno.EROFS` for a read-only
    folder); the message names both. Nothing of the failed save is kept."""

    def __init__(self, folder: str, code: int | None, detail: str):
        super().__init__(code, detail, folder)
        self.message = (
            f"cannot write checkpoint {folder}: {detail}; its partial files were removed and "
            "earlier checkpoints are untouched"
        )

    def __str__(self) -> str:
        return self.message


def staging_folder(checkpoint: str | os.PathLike) -> Path:
    """Where `checkpoint` (`.../checkpoint-N`) is written before being renamed into place: a
    hidden sibling that `checkpoint-*` globs never see."""
    path = Path(checkpoint)
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


def publish_checkpoint(staging: str | os.PathLike, checkpoint: str | os.PathLike) -> None:
    """Renames a completely written staging folder to `checkpoint`, after flushing its files to
    disk (so that the name never points at data still in flight). A folder already at that name
    (the same step saved by an earlier run) is replaced."""
    staging, checkpoint = Path(staging), Path(checkpoint)
    _sync_folder(staging)
    if not checkpoint.exists():
        staging.rename(checkpoint)
        return
    replaced = checkpoint.with_name(f".{checkpoint.name}.replaced")
    shutil.rmtree(replaced, ignore_errors=True)
    checkpoint.rename(replaced)
    staging.rename(checkpoint)
    shutil.rmtree(replaced, ignore_errors=True)


def _sync_folder(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    # Some file systems refuse to sync a folder; the files themselves are on disk by now.
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _failed_save(checkpoint: str, staging: str, error: BaseException) -> CheckpointSaveError | None:
    """Removes the staging folder of a failed save; returns the `CheckpointSaveError` to raise for
    a failed write, or None (after noting the folder on it) for any other error."""
    code = write_error_code(error, staging if os.path.isdir(staging) else os.path.dirname(staging))
    shutil.rmtree(staging, ignore_errors=True)
    if code is not None:
        detail = f"{os.strerror(code).lower()} ({errno.errorcode.get(code, code)})"
        return CheckpointSaveError(checkpoint, code, detail)
    message = str(error)
    if isinstance(error, OSError) or any(words in message for words in _TORCH_WRITE_FAILURES):
        return CheckpointSaveError(checkpoint, None, f"the write failed ({message.strip()})")
    if hasattr(error, "add_note"):  # Python 3.11+
        error.add_note(f"while saving checkpoint {checkpoint}; its partial files were removed")
    return None


def write_error_code(error: BaseException, folder: str | os.PathLike) -> int | None:
    """The errno behind a failed write, or None: from an `OSError` in the exception's chain, from
    the message (safetensors: `os error 28`), or, for writers that report no errno (torch's zip
    writer: `unexpected pos`), by writing a probe file of 1 MiB in `folder` and seeing it refused.
    """
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    message = str(error)
    number = _ERRNO_IN_MESSAGE.search(message)
    if number:
        return int(number.group(1))
    for code in WRITE_ERRNOS:
        if os.strerror(code).lower() in message.lower():
            return code
    if isinstance(error, OSError) or any(words in message for words in _TORCH_WRITE_FAILURES):
        return _probe_write(Path(folder))
    return None


def _probe_write(folder: Path) -> int | None:
    probe = folder / ".write-probe"
    try:
        with open(probe, "wb") as handle:
            handle.write(bytes(_PROBE_BYTES))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as refused:
        return refused.errno
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return None


def remove_partial_saves(output_dir: str | os.PathLike) -> list[Path]:
    """Deletes the staging folders (`.checkpoint-N.partial`) that saves interrupted by a kill left
    in `output_dir`, with a warning naming each; returns them. Nothing else is touched."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.glob(f".{PREFIX_CHECKPOINT_DIR}-*{PARTIAL_SUFFIX}")):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            logger.warning("removed %s, the staging folder of an interrupted checkpoint save", path)
            removed.append(path)
    return removed


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` folder of `output_dir` that a save finished: its trainer state (the
    last file a save writes) parses and its weights are there. Staging folders of interrupted saves
    are removed (`remove_partial_saves`). Newer `checkpoint-N` folders that are incomplete (left
    by a non-atomic save, e.g. of an older version) are renamed `incomplete-checkpoint-N` (kept,
    not deleted) with a warning naming each and what it lacks, so that relaunching the same
    command resumes instead of failing on them."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    remove_partial_saves(root)
    for path in root.glob(f"{PREFIX_CHECKPOINT_DIR}-*.incomplete"):  # this module's former name
        if path.is_dir():
            _set_aside(path.with_name(path.name.removesuffix(".incomplete")), source=path)
    for path in _numbered_checkpoints(root):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        moved = _set_aside(path)
        logger.warning(
            "skipped the incomplete checkpoint %s (%s); moved it to %s", path, problem, moved
        )
    return None


def _numbered_checkpoints(root: Path) -> list[Path]:
    """`checkpoint-N` folders of `root`, newest (highest N) first."""
    found = [
        (int(path.name[len(PREFIX_CHECKPOINT_DIR) + 1 :]), path)
        for path in root.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        if path.is_dir() and path.name[len(PREFIX_CHECKPOINT_DIR) + 1 :].isdigit()
    ]
    return [path for _, path in sorted(found, reverse=True)]


def _set_aside(checkpoint: Path, source: Path | None = None) -> Path:
    """Renames `source` (default: `checkpoint`) to a free `incomplete-checkpoint-N[.k]` name."""
    target = checkpoint.with_name(f"{SET_ASIDE_PREFIX}{checkpoint.name}")
    index = 1
    while target.exists():
        target = checkpoint.with_name(f"{SET_ASIDE_PREFIX}{checkpoint.name}.{index}")
        index += 1
    (source or checkpoint).rename(target)
    return target


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """What makes `checkpoint` unusable for resuming (in words), or None when it is complete."""
    folder = Path(checkpoint)
    state = folder / TRAINER_STATE_NAME
    if not state.is_file():
        return f"no {TRAINER_STATE_NAME}"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError) as error:
        return f"{TRAINER_STATE_NAME} unreadable: {error}"
    if not any(
        (folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")
    ):
        return "no model weights (model.safetensors)"
    return None


def stream_position(epoch: float, batches_per_pass: int) -> tuple[int, int]:
    """(finished passes, batches into the current pass) from `TrainerState.epoch` of a run whose
    dataloader has no length, where the trainer counts `epoch` as passes + batches /
    `batches_per_pass` (`batches_per_pass` = max_steps x gradient accumulation)."""
    batches = round(epoch * batches_per_pass)
    return divmod(batches, batches_per_pass)


def saved_data_position(
    checkpoint: str | os.PathLike, process_index: int, world_size: int, global_step: int
) -> float | None:
    """The epoch count that process `process_index` saved in `checkpoint`, or None where there is
    none to trust (see `saved_position`)."""
    saved = saved_position(checkpoint, process_index, world_size, global_step)
    return None if saved is None else saved["epoch"]


def saved_position(
    checkpoint: str | os.PathLike, process_index: int, world_size: int, global_step: int
) -> dict[str, Any] | None:
    """What process `process_index` saved of its data in `checkpoint`: `epoch` (its epoch count)
    and `skipped_samples` (the samples its collator dropped so far; 0 in files written before it
    was kept). None where there is none to trust: no file (a checkpoint of an older version), an
    unreadable one, or one written at another step or by another number of processes (which shard
    the data otherwise)."""
    path = Path(checkpoint) / DATA_POSITION_FILE.format(process_index)
    if not path.is_file():
        return None
    try:
        position = json.loads(path.read_text())
        saved = (int(position["world_size"]), int(position["global_step"]))
        epoch = float(position["epoch"])
        skipped = int(position.get("skipped_samples", 0))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        logger.warning("ignored %s, which is unreadable: %s", path, error)
        return None
    if saved != (world_size, global_step):
        logger.warning(
            "ignored %s: written by %d process(es) at step %d, resuming with %d at step %d",
            path,
            *saved,
            world_size,
            global_step,
        )
        return None
    return {"epoch": epoch, "skipped_samples": skipped}


def _saved_max_steps(checkpoint: str | os.PathLike) -> int | None:
    try:
        return int(json.loads((Path(checkpoint) / TRAINER_STATE_NAME).read_text())["max_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def onecycle_warmup_share(pct_start: float, total_steps: int) -> float:
    """`pct_start` moved just enough that both OneCycle phases last more than one step: torch
    divides by each phase's length in steps, and a phase of length 0 (e.g. 10% of 10 steps) fails."""
    return min(max(pct_start, 1.5 / total_steps), 1 - 0.5 / total_steps)


__all__ = [
    "LOGGED_COMPONENTS",
    "CheckpointSaveError",
    "LoupeTrainer",
    "LoupeTrainingArguments",
    "checkpoint_problem",
    "last_complete_checkpoint",
    "onecycle_warmup_share",
    "publish_checkpoint",
    "remove_partial_saves",
    "saved_data_position",
    "saved_position",
    "staging_folder",
    "stream_position",
    "write_error_code",
]
