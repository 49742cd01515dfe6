"""Atomic checkpoints, clear errors when a save fails, and exact resume after a kill (issue #16).

In-process tests train the tiny model for a few steps; the end-to-end ones run
`examples/pretrain.py` in subprocesses, kill them with SIGKILL (after a checkpoint, during a save)
and rerun the same command, comparing with an uninterrupted run bit for bit.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint, sort_checkpoints

from loupe_hf.data import build_dataset
from loupe_hf.pretraining.trainer import (
    CheckpointSaveError,
    LoupeTrainer,
    checkpoint_problem,
    last_complete_checkpoint,
    saved_data_position,
    stream_position,
    write_error_code,
)

from .test_trainer import _trainer as trainer_of_test_trainer

REPO = Path(__file__).resolve().parent.parent
PRETRAIN = REPO / "examples" / "pretrain.py"
# What every complete checkpoint holds: weights, processor, optimizer, scheduler, RNG, the
# process's place in its data, state.
CHECKPOINT_FILES = {
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "processor_config.json",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "data_position_0.json",
    "trainer_state.json",
}


@pytest.fixture(scope="module")
def train_dataset():
    dataset = build_dataset("train", 32)
    return dataset.map(lambda row: {"phrase_spans": row["objects"]["phrase_span"]})


def _trainer(tiny_config, processor, dataset, output_dir, **overrides) -> LoupeTrainer:
    """The trainer of tests/test_trainer.py, logging every step (so every loss can be compared)."""
    overrides = {"logging_steps": 1, **overrides}
    return trainer_of_test_trainer(tiny_config, processor, dataset, output_dir, **overrides)


def _digests(folder: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.iterdir())
        if path.is_file()
    }


def _hidden(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


class _AtStep(TrainerCallback):
    """Runs `action()` at the end of training step `step`, or stops training there."""

    def __init__(self, step: int, action=None):
        self.step, self.action = step, action

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            if self.action is None:
                control.should_training_stop = True
            else:
                self.action()
        return control


# --- atomic saves ------------------------------------------------------------------------------


def test_checkpoints_are_written_beside_their_place_and_renamed_when_complete(
    tiny_config, processor, train_dataset, tmp_path, monkeypatch, caplog
):
    output = tmp_path / "run"
    (output / ".checkpoint-9.partial").mkdir(parents=True)  # what a killed save left
    (output / ".checkpoint-9.partial" / "optimizer.pt").write_bytes(b"\x80" * 37)
    seen = []
    original = LoupeTrainer._save_rng_state

    def spy(self, folder):  # the RNG state is written after the weights and the optimizer
        final = output / f"checkpoint-{self.state.global_step}"
        seen.append((Path(folder).name, final.exists(), sorted(os.listdir(folder))))
        return original(self, folder)

    monkeypatch.setattr(LoupeTrainer, "_save_rng_state", spy)
    trainer = _trainer(tiny_config, processor, train_dataset, output, save_total_limit=1)
    with caplog.at_level("WARNING"):
        trainer.train()
    assert "interrupted checkpoint save" in caplog.text and ".checkpoint-9.partial" in caplog.text
    assert [(name, exists) for name, exists, _ in seen] == [
        (".checkpoint-2.partial", False),
        (".checkpoint-4.partial", False),
    ]
    assert {"model.safetensors", "optimizer.pt"} <= set(seen[0][2])
    assert "trainer_state.json" not in seen[0][2]
    # Renamed complete, rotation kept one, nothing staged is left.
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-4"]
    assert _hidden(output) == []
    assert set(os.listdir(output / "checkpoint-4")) >= CHECKPOINT_FILES
    assert checkpoint_problem(output / "checkpoint-4") is None
    state = json.loads((output / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_resume_tidies_what_killed_saves_left_and_says_what_it_skipped(tmp_path, caplog):
    root = tmp_path / "run"
    complete = root / "checkpoint-2"
    complete.mkdir(parents=True)
    (complete / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (complete / "model.safetensors").write_bytes(b"weights")
    (root / ".checkpoint-4.partial").mkdir()  # a kill during an atomic save
    (root / ".checkpoint-4.partial" / "model.safetensors").write_bytes(b"half")
    (root / "checkpoint-6").mkdir()  # a kill during an older, non-atomic save
    (root / "checkpoint-6" / "optimizer.pt").write_bytes(b"\x80" * 37)
    (root / "checkpoint-8").mkdir()
    (root / "checkpoint-8" / "trainer_state.json").write_text("{truncated")
    (root / "checkpoint-3.incomplete").mkdir()  # set aside under the former name
    with caplog.at_level("WARNING"):
        assert last_complete_checkpoint(root) == str(complete)
    assert "removed" in caplog.text and ".checkpoint-4.partial" in caplog.text
    assert "checkpoint-6 (no trainer_state.json)" in caplog.text
    assert "checkpoint-8 (trainer_state.json unreadable" in caplog.text
    assert sorted(path.name for path in root.iterdir()) == [
        "checkpoint-2",
        "incomplete-checkpoint-3",
        "incomplete-checkpoint-6",
        "incomplete-checkpoint-8",
    ]
    assert (root / "incomplete-checkpoint-6" / "optimizer.pt").is_file()  # kept, not deleted
    # Rotation and transformers' own resume see the complete checkpoint only.
    assert sort_checkpoints(str(root)) == [str(complete)]
    assert get_last_checkpoint(str(root)) == str(complete)


# --- clear errors ------------------------------------------------------------------------------


def _failing_writer(trainer_method: str, code: int, output: Path, snapshot: dict):
    """A replacement for `LoupeTrainer.<trainer_method>` that fails with `code` at step 4 after
    writing part of a file, recording the step-2 checkpoint's digests first."""
    original = getattr(LoupeTrainer, trainer_method)

    def failing(self, folder, *args, **kwargs):
        if self.state.global_step != 4:
            return original(self, folder, *args, **kwargs)
        snapshot.update(_digests(output / "checkpoint-2"))
        if code == errno.ENOSPC:
            Path(folder, "optimizer.pt").write_bytes(b"PK\x03\x04" + bytes(4096))
        raise OSError(code, os.strerror(code))

    return failing


@pytest.mark.parametrize(
    ("trainer_method", "code", "cause"),
    [
        ("_save_optimizer_and_scheduler", errno.ENOSPC, "no space left on device (ENOSPC)"),
        ("save_model", errno.EROFS, "read-only file system (EROFS)"),
    ],
    ids=["full-disk", "read-only"],
)
def test_a_failed_save_names_the_folder_and_the_cause_and_keeps_the_last_checkpoint(
    tiny_config, processor, train_dataset, tmp_path, monkeypatch, trainer_method, code, cause
):
    output = tmp_path / "run"
    snapshot: dict[str, str] = {}
    failing = _failing_writer(trainer_method, code, output, snapshot)
    monkeypatch.setattr(LoupeTrainer, trainer_method, failing)
    trainer = _trainer(tiny_config, processor, train_dataset, output, save_total_limit=1)
    with pytest.raises(CheckpointSaveError) as raised:
        trainer.train()
    error = raised.value
    assert f"cannot write checkpoint {output / 'checkpoint-4'}: {cause}" in str(error)
    assert isinstance(error, OSError) and error.errno == code
    assert error.filename == str(output / "checkpoint-4")
    assert not (output / "checkpoint-4").exists() and _hidden(output) == []
    assert snapshot and _digests(output / "checkpoint-2") == snapshot  # untouched
    assert last_complete_checkpoint(output) == str(output / "checkpoint-2")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("disk_full", [True, False], ids=["probe-refused", "probe-accepted"])
def test_torchs_short_write_becomes_a_clear_error(
    tiny_config, processor, train_dataset, tmp_path, monkeypatch, disk_full
):
    """torch's zip writer reports a full disk as `unexpected pos`, with no errno. Writing the
    optimizer into /dev/full gives that very error; the probe write then tells a full disk
    (probe refused, ENOSPC) from an unknown cause (the torch message is kept)."""
    output = tmp_path / "run"
    original = LoupeTrainer._save_optimizer_and_scheduler

    def into_dev_full(self, folder):
        if self.state.global_step == 4:
            os.symlink("/dev/full", os.path.join(folder, "optimizer.pt"))
            if disk_full:
                os.symlink("/dev/full", os.path.join(folder, ".write-probe"))
        return original(self, folder)

    monkeypatch.setattr(LoupeTrainer, "_save_optimizer_and_scheduler", into_dev_full)
    trainer = _trainer(tiny_config, processor, train_dataset, output)
    with pytest.raises(CheckpointSaveError) as raised:
        trainer.train()
    message = str(raised.value)
    assert message.startswith(f"cannot write checkpoint {output / 'checkpoint-4'}: ")
    if disk_full:
        assert "no space left on device (ENOSPC)" in message and raised.value.errno == errno.ENOSPC
    else:
        assert "the write failed" in message and "unexpected pos" in message
    assert isinstance(raised.value.__cause__, RuntimeError)  # torch's own error, chained
    assert not (output / "checkpoint-4").exists() and _hidden(output) == []
    assert checkpoint_problem(output / "checkpoint-2") is None


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (OSError(errno.EROFS, "Read-only file system"), errno.EROFS),
        (RuntimeError("Error while serializing: I/O error (os error 28)"), errno.ENOSPC),
        (RuntimeError("write: Disk quota exceeded"), errno.EDQUOT),
        (ValueError("not a write error"), None),
    ],
)
def test_write_error_codes_are_read_from_the_error(tmp_path, error, code):
    assert write_error_code(error, tmp_path) == code


def test_a_write_error_is_found_in_the_chain(tmp_path):
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] unexpected pos"
            ) from inner
    except RuntimeError as outer:
        assert write_error_code(outer, tmp_path) == errno.ENOSPC


@contextlib.contextmanager
def _tmpfs(path: Path, size: int):
    """A tmpfs of `size` bytes at `path`; skips where mounting is not allowed (not root, or a
    container without CAP_SYS_ADMIN)."""
    path.mkdir(parents=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    if shutil.which("mount") is None or subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.parametrize("cause", ["full", "read-only"])
def test_a_real_full_or_read_only_disk_gives_a_clear_error(
    tiny_config, processor, train_dataset, tmp_path, cause
):
    """On a real tmpfs: room for one checkpoint and a half (the second save runs out of space
    inside torch's writer), or remounted read-only before the second save."""
    trainer = _trainer(tiny_config, processor, train_dataset, tmp_path / "unused")
    weights = sum(parameter.numel() * 4 for parameter in trainer.model.parameters())
    size = int(4.5 * weights) if cause == "full" else 20 * weights  # Adam: 2 more copies
    with _tmpfs(tmp_path / "disk", size) as disk:
        output = disk / "run"
        trainer = _trainer(tiny_config, processor, train_dataset, output, save_total_limit=1)
        snapshot: dict[str, str] = {}

        def before_the_second_save():
            snapshot.update(_digests(output / "checkpoint-2"))
            if cause == "read-only":
                remount = ["mount", "-o", "remount,ro", str(disk)]
                subprocess.run(remount, check=True, capture_output=True)

        trainer.add_callback(_AtStep(3, before_the_second_save))
        with pytest.raises(CheckpointSaveError) as raised:
            trainer.train()
        expected = "no space left on device (ENOSPC)" if cause == "full" else "(EROFS)"
        assert f"cannot write checkpoint {output / 'checkpoint-4'}: " in str(raised.value)
        assert expected in str(raised.value)
        assert not (output / "checkpoint-4").exists() and _hidden(output) == []
        assert snapshot and _digests(output / "checkpoint-2") == snapshot


# --- exact resume ------------------------------------------------------------------------------


def test_stream_position_reads_the_trainers_epoch_count():
    assert stream_position(0.0, 12) == (0, 0)
    assert stream_position(8 / 12, 12) == (0, 8)
    assert stream_position(1 + 2 / 12, 12) == (1, 2)
    assert stream_position(3 + 11 / 12, 12) == (3, 11)


def test_a_process_resumes_from_its_own_saved_position_only_when_it_fits(tmp_path, caplog):
    """What `_init_training_state` reads for process 1 of 2 at step 4; None sends it back to the
    trainer state's (process 0's) epoch, as for checkpoints of versions that saved no position."""
    position = tmp_path / "data_position_1.json"
    assert saved_data_position(tmp_path, 1, 2, 4) is None  # none saved
    position.write_text(json.dumps({"epoch": 1 + 1 / 6, "global_step": 4, "world_size": 2}))
    assert saved_data_position(tmp_path, 1, 2, 4) == 1 + 1 / 6
    assert saved_data_position(tmp_path, 0, 2, 4) is None  # another process's
    with caplog.at_level("WARNING"):
        assert saved_data_position(tmp_path, 1, 4, 4) is None  # other shards
        assert saved_data_position(tmp_path, 1, 2, 6) is None  # another step
        position.write_text('{"epoch": 1.1')
        assert saved_data_position(tmp_path, 1, 2, 4) is None
    assert caplog.text.count(str(position)) == 3


def test_streamed_data_resumes_exactly_after_the_first_pass(
    tiny_config, processor, train_dataset, tmp_path
):
    """32 streamed pairs in batches of 8: 4 batches a pass; the checkpoint at step 6 is 2 batches
    into the second pass. transformers alone skipped 6 batches of the first pass (it has 4) and
    restarted the second pass from its first batch."""
    stream = train_dataset.to_iterable_dataset()
    settings = {"max_steps": 8, "save_steps": 6}
    straight = _trainer(tiny_config, processor, stream, tmp_path / "straight", **settings)
    straight.train()
    interrupted = _trainer(tiny_config, processor, stream, tmp_path / "run", **settings)
    interrupted.add_callback(_AtStep(6))
    interrupted.train()
    assert interrupted.state.global_step == 6
    resumed = _trainer(tiny_config, processor, stream, tmp_path / "run", **settings)
    resumed.train(resume_from_checkpoint=True)
    assert _losses(resumed.state.log_history) == _losses(straight.state.log_history)
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name


def _losses(log_history: list[dict]) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in log_history if "loss" in entry}


TOKENIZER_SCRIPT = """
import hashlib, json
from loupe_hf import train_wordpiece_tokenizer
from loupe_hf.data import SyntheticConfig, training_captions
tokenizer = train_wordpiece_tokenizer(training_captions(200, SyntheticConfig()), vocab_size=2048)
print(hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest())
"""


def test_the_wordpiece_tokenizer_is_the_same_in_every_process():
    """Different hash seeds reorder sets and dicts: the vocabulary must not depend on them."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", TOKENIZER_SCRIPT],
            cwd=REPO,
            env={**os.environ, "PYTHONHASHSEED": seed, "RAYON_NUM_THREADS": "2"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in ("1", "2")
    ]
    digests = set()
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        digests.add(stdout.split()[-1])
    assert len(digests) == 1


# --- kill -9 and resume, end to end ------------------------------------------------------------

# 32 pairs in batches of 4: 8 batches a pass. The first checkpoint (step 10) is 2 batches into the
# second pass; 6 steps follow it, so a kill right after it lands well before the end.
MAX_STEPS, FIRST_CHECKPOINT = 16, 10
KILL_DURING_SAVE = """
import os, runpy, signal, sys
from loupe_hf.pretraining.trainer import LoupeTrainer

output, step = sys.argv[1], int(sys.argv[2])
checked = []
train_step, save_rng_state = LoupeTrainer.training_step, LoupeTrainer._save_rng_state

def training_step(self, *args, **kwargs):
    if not checked:
        checked.append(True)
        saved = os.path.isfile(os.path.join(output, "tokenizer.json"))
        print(f"tokenizer saved before step 1: {saved}", flush=True)
    return train_step(self, *args, **kwargs)

def killed_mid_save(self, folder):  # weights and optimizer written, RNG and trainer state not
    if self.state.global_step == step:
        os.kill(os.getpid(), signal.SIGKILL)
    return save_rng_state(self, folder)

LoupeTrainer.training_step, LoupeTrainer._save_rng_state = training_step, killed_mid_save
sys.argv = [sys.argv[3], *sys.argv[4:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _pretrain_arguments(output: Path) -> list[str]:
    return [
        str(PRETRAIN),
        "--output_dir",
        str(output),
        "--max_steps",
        str(MAX_STEPS),
        "--save_steps",
        str(FIRST_CHECKPOINT),
        "--per_device_train_batch_size",
        "4",
        "--num_train_samples",
        "32",
        "--num_eval_samples",
        "0",
        "--tokenizer_training_captions",
        "200",
        "--config_overrides",
        json.dumps({"shapley_num_samples": 4, "num_regions": 4}),
        "--logging_steps",
        "1",
        "--report_to",
        "none",
    ]


def _environment() -> dict[str, str]:
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return {**os.environ, **offline, "OMP_NUM_THREADS": "1"}


def _pretrain(output: Path, arguments: list[str] | None = None) -> str:
    """Runs `examples/pretrain.py` (the tests' arguments, or `arguments`); its log."""
    result = subprocess.run(
        [sys.executable, *(arguments or _pretrain_arguments(output))],
        cwd=REPO,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout + result.stderr


def _run_losses(folder: Path) -> dict[int, float]:
    return _losses(json.loads((folder / "trainer_state.json").read_text())["log_history"])


def _vocabulary(folder: Path) -> dict[str, int]:
    return json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]


def _max_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max(
        (torch.as_tensor(first[key]).double() - torch.as_tensor(second[key]).double()).abs().max()
        for key in first
    ).item()


def _assert_same_run(resumed: Path, reference: Path) -> None:
    losses, expected = _run_losses(resumed), _run_losses(reference)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    assert _max_difference(losses, expected) == 0.0, (losses, expected)
    weights = load_file(resumed / "model.safetensors")
    assert _max_difference(weights, load_file(reference / "model.safetensors")) == 0.0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("uninterrupted") / "run"
    _pretrain(output)
    return output


def test_a_run_continues_from_a_checkpoint_with_its_architecture_weights_and_tokenizer(
    uninterrupted, tmp_path
):
    output = tmp_path / "continued"
    arguments = _pretrain_arguments(output)
    arguments[arguments.index("--max_steps") + 1] = "1"
    # A learning rate of 0 leaves the weights as loaded; --preset is the checkpoint's business.
    arguments += ["--model_name_or_path", str(uninterrupted), "--ablation", "backbone"]
    arguments += ["--learning_rate", "0", "--preset", "paper"]
    assert f"continuing from {uninterrupted}" in _pretrain(output, arguments)
    config = json.loads((output / "config.json").read_text())
    source = json.loads((uninterrupted / "config.json").read_text())
    assert (config["use_tsa"], source["use_tsa"]) == (False, True)  # --ablation applies
    # The checkpoint's architecture (loading records the dtype it was loaded in).
    architecture = {key: value for key, value in config["vision_config"].items() if key != "dtype"}
    assert architecture == {k: v for k, v in source["vision_config"].items() if k != "dtype"}
    assert config["text_config"]["vocab_size"] == source["text_config"]["vocab_size"]
    assert _vocabulary(output) == _vocabulary(uninterrupted)
    weights, expected = (
        load_file(folder / "model.safetensors") for folder in (output, uninterrupted)
    )
    # Every learnt weight as loaded; the similarity offset and BatchNorm's running mean, variance and
    # count are statistics that a training step updates even at a learning rate of 0.
    statistics = ("offset", "running_mean", "running_var", "num_batches_tracked")
    encoders = [
        key
        for key in expected
        if key.startswith("loupe.") and not any(name in key for name in statistics)
    ]
    assert encoders and all(torch.equal(weights[key], expected[key]) for key in encoders)
    # The card lists the run it continued, so the model's training is not under-reported.
    facts = json.loads((output / "training_facts.json").read_text())
    before = json.loads((uninterrupted / "training_facts.json").read_text())
    assert facts["steps"] == 1 and facts["earlier_stages"] == [before]
    assert "- Continued from stage 1:" in (output / "README.md").read_text()
    assert int(weights["training_steps"]) == 1  # steps count from 0 again


@pytest.mark.slow
def test_kill_after_the_first_checkpoint_then_rerun_equals_an_uninterrupted_run(
    uninterrupted, tmp_path
):
    output = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, *_pretrain_arguments(output)],
        cwd=REPO,
        env=_environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = output / f"checkpoint-{FIRST_CHECKPOINT}"
    deadline = time.monotonic() + 240
    while not first.is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run ended before it was killed"
    assert not (output / f"checkpoint-{MAX_STEPS}").exists()
    assert checkpoint_problem(first) is None  # what appears under the final name is complete
    # Two fresh runs with the same seed (each training its own tokenizer) agree up to the kill.
    killed_losses = _run_losses(first)
    assert sorted(killed_losses) == list(range(1, FIRST_CHECKPOINT + 1))
    reference = {step: _run_losses(uninterrupted)[step] for step in killed_losses}
    assert killed_losses == reference
    assert _vocabulary(output) == _vocabulary(uninterrupted)

    log = _pretrain(output)  # the same command again
    assert f"resuming from {first}" in log
    _assert_same_run(output, uninterrupted)


@pytest.mark.slow
def test_kill_during_a_save_leaves_nothing_resume_would_pick_and_the_rerun_is_exact(
    uninterrupted, tmp_path
):
    output = tmp_path / "run"
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(KILL_DURING_SAVE),
            str(output),
            str(MAX_STEPS),
            *_pretrain_arguments(output),
        ],
        cwd=REPO,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    assert "tokenizer saved before step 1: True" in killed.stdout
    # The killed save's files are in its staging folder only; the name `checkpoint-16` is free.
    staged = output / f".checkpoint-{MAX_STEPS}.partial"
    assert {"model.safetensors", "optimizer.pt"} <= set(os.listdir(staged))
    assert not (staged / "trainer_state.json").exists()
    assert not (output / f"checkpoint-{MAX_STEPS}").exists()
    previous = str(output / f"checkpoint-{FIRST_CHECKPOINT}")
    assert get_last_checkpoint(str(output)) == previous  # transformers' own choice, too

    log = _pretrain(output)
    assert f"resuming from {previous}" in log and "interrupted checkpoint save" in log
    assert not staged.exists()
    _assert_same_run(output, uninterrupted)
