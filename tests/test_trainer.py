"""LoupeTrainer: logging of every loss component, the OneCycle schedule, exact resume, Hub upload."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import TrainerCallback

from loupe_hf import LoupeConfig, LoupeModel
from loupe_hf.data import build_dataset
from loupe_hf.pretraining import LoupeDataCollator, LoupeForPreTraining
from loupe_hf.pretraining.trainer import LOGGED_COMPONENTS, LoupeTrainer, LoupeTrainingArguments

from .loopback_hub import LoopbackHub

FAST = {"shapley_num_samples": 4, "num_regions": 4, "unsil_hidden_dim": 16, "unsil_warmup_steps": 2}


@pytest.fixture(scope="module")
def train_dataset():
    dataset = build_dataset("train", 32)
    return dataset.map(lambda row: {"phrase_spans": row["objects"]["phrase_span"]})


def _trainer(tiny_config, processor, dataset, output_dir, **overrides) -> LoupeTrainer:
    torch.manual_seed(0)
    config = LoupeConfig.from_dict({**tiny_config.to_dict(), **FAST})
    arguments = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 8,
        "max_steps": 4,
        "learning_rate": 1e-3,
        "logging_steps": 2,
        "save_steps": 2,
        "report_to": "none",
        "remove_unused_columns": False,
        "use_cpu": True,
        "seed": 0,
        "dataloader_num_workers": 0,
        **overrides,
    }
    return LoupeTrainer(
        model=LoupeForPreTraining(config),
        args=LoupeTrainingArguments(**arguments),
        train_dataset=dataset,
        data_collator=LoupeDataCollator(processor),
        processing_class=processor,
    )


def test_every_loss_component_is_logged(tiny_config, processor, train_dataset, tmp_path):
    trainer = _trainer(tiny_config, processor, train_dataset, tmp_path)
    trainer.train()
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == 2
    for row in logged:
        assert set(LOGGED_COMPONENTS) <= set(row), set(LOGGED_COMPONENTS) - set(row)
        assert row["skipped_samples"] == 0
        assert row["cmc_loss"] > 0 and row["tsa_loss"] > 0 and row["fsa_loss"] > 0
    # Warm-up (2 steps) samples every label; afterwards UNSIL supplies some of them.
    assert logged[0]["tsa_unsil_share"] == 0.0
    assert os.path.isfile(tmp_path / "checkpoint-4" / "model.safetensors")


def test_keeping_freed_memory_is_opt_in():
    assert LoupeTrainingArguments(output_dir="unused").keep_freed_memory is False


@pytest.mark.parametrize("keep", [True, False])
def test_training_keeps_freed_memory_only_when_asked(
    keep, tiny_config, processor, train_dataset, tmp_path, monkeypatch
):
    import loupe_hf.pretraining.trainer

    calls = []
    monkeypatch.setattr(
        loupe_hf.pretraining.trainer, "keep_freed_memory", lambda: calls.append(1) or True
    )
    trainer = _trainer(
        tiny_config, processor, train_dataset, tmp_path, max_steps=1, keep_freed_memory=keep
    )
    trainer.train()
    assert len(calls) == (1 if keep else 0)


def test_onecycle_schedule_cycles_learning_rate_and_momentum(
    tiny_config, processor, train_dataset, tmp_path
):
    trainer = _trainer(
        tiny_config, processor, train_dataset, tmp_path, max_steps=10, onecycle_pct_start=0.3
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    lrs, betas = [], []
    for _ in range(10):
        group = trainer.optimizer.param_groups[0]
        lrs.append(group["lr"])
        betas.append(group["betas"][0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    peak = lrs.index(max(lrs))
    assert peak == 2 and max(lrs) == pytest.approx(
        1e-3
    )  # OneCycle peaks at step pct_start * total - 1
    assert lrs[0] < max(lrs) and lrs[-1] < lrs[0]
    assert betas[0] == pytest.approx(0.95) and betas[peak] == pytest.approx(0.85)
    assert betas[-1] > 0.94


def test_unknown_schedule_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="lr_schedule"):
        LoupeTrainingArguments(output_dir=str(tmp_path), lr_schedule="linear-ish", use_cpu=True)


class _StopAfter(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def test_resume_from_checkpoint_continues_exactly(tiny_config, processor, train_dataset, tmp_path):
    straight = _trainer(tiny_config, processor, train_dataset, tmp_path / "straight")
    straight.train()
    # Interrupt a run after its step-2 checkpoint, then resume it in a new trainer.
    interrupted = _trainer(tiny_config, processor, train_dataset, tmp_path / "resumed")
    interrupted.add_callback(_StopAfter(2))
    interrupted.train()
    assert interrupted.state.global_step == 2
    resumed = _trainer(tiny_config, processor, train_dataset, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    expected, actual = straight.model.state_dict(), resumed.model.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert resumed.model.training_steps.item() == straight.model.training_steps.item() == 4


def test_a_half_written_checkpoint_is_set_aside_and_the_run_resumes_from_the_last_complete_one(
    tiny_config, processor, train_dataset, tmp_path, caplog
):
    straight = _trainer(tiny_config, processor, train_dataset, tmp_path / "straight")
    straight.train()
    interrupted = _trainer(tiny_config, processor, train_dataset, tmp_path / "run")
    interrupted.add_callback(_StopAfter(2))
    interrupted.train()
    # What a kill during the step-4 save leaves: a small optimizer file and no trainer state.
    partial = tmp_path / "run" / "checkpoint-4"
    partial.mkdir()
    (partial / "optimizer.pt").write_bytes(b"\x80" * 37)
    resumed = _trainer(tiny_config, processor, train_dataset, tmp_path / "run")
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=True)
    assert "skipped the incomplete checkpoint" in caplog.text and "checkpoint-4" in caplog.text
    assert (tmp_path / "run" / "incomplete-checkpoint-4" / "optimizer.pt").is_file()  # kept
    for name, tensor in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)


def test_resuming_with_no_complete_checkpoint_says_so(
    tiny_config, processor, train_dataset, tmp_path
):
    (tmp_path / "empty" / "checkpoint-2").mkdir(parents=True)
    trainer = _trainer(tiny_config, processor, train_dataset, tmp_path / "empty")
    with pytest.raises(ValueError, match="no complete checkpoint to resume from"):
        trainer.train(resume_from_checkpoint=True)


def test_corrupt_samples_are_skipped_and_counted(processor):
    collator = LoupeDataCollator(processor)
    good = {"image": torch.zeros(3, 8, 8, dtype=torch.uint8).numpy(), "caption": "a red star"}
    broken_bytes = {"image": {"bytes": b"not an image", "path": None}, "caption": "a blue circle"}
    empty_caption = {"image": torch.zeros(3, 8, 8, dtype=torch.uint8).numpy(), "caption": "  "}
    batch = collator([good, broken_bytes, empty_caption, good])
    assert batch["pixel_values"].shape[0] == 2 and collator.skipped == 2
    with pytest.raises(ValueError, match="all 1 samples of a batch were unreadable"):
        collator([broken_bytes])
    assert "skipped_samples" not in batch  # the model's inputs only, unless asked
    counting = LoupeDataCollator(processor, count_in_batch=True)
    assert counting([good, broken_bytes, good])["skipped_samples"].tolist() == [1]
    assert counting([good])["skipped_samples"].tolist() == [0]


def _with_empty_captions(dataset, rows: set[int]):
    return dataset.map(
        lambda row, index: {"caption": "  " if index in rows else row["caption"]},
        with_indices=True,
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_skipped_samples_are_counted_from_dataloader_workers(
    workers, tiny_config, processor, train_dataset, tmp_path
):
    """Every corrupt sample of the epoch is in the count, whether the collator ran in the training
    process or in DataLoader workers (whose copies' own counters that process never sees)."""
    dataset = _with_empty_captions(train_dataset, {3, 17, 30})
    trainer = _trainer(
        tiny_config, processor, dataset, tmp_path, dataloader_num_workers=workers, save_steps=4
    )
    trainer.train()
    logged = [row["skipped_samples"] for row in trainer.state.log_history if "loss" in row]
    assert logged[-1] == 3 and logged == sorted(logged)  # 4 steps of 8: the whole epoch


def test_a_resumed_run_goes_on_counting_skipped_samples(
    tiny_config, processor, train_dataset, tmp_path
):
    dataset = _with_empty_captions(train_dataset, {3, 17, 30})
    straight = _trainer(tiny_config, processor, dataset, tmp_path / "straight")
    straight.train()
    interrupted = _trainer(tiny_config, processor, dataset, tmp_path / "resumed")
    interrupted.add_callback(_StopAfter(2))
    interrupted.train()
    saved = json.loads((tmp_path / "resumed" / "checkpoint-2" / "data_position_0.json").read_text())
    resumed = _trainer(tiny_config, processor, dataset, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    final = [row["skipped_samples"] for row in resumed.state.log_history if "loss" in row][-1]
    assert final == 3 and 0 < saved["skipped_samples"] < 3  # some before the interruption


PUSH_SCRIPT = """
import json, sys, torch
from loupe_hf import LoupeConfig
from loupe_hf.pretraining import LoupeDataCollator
from loupe_hf.data import build_dataset
from loupe_hf.pretraining import LoupeForPreTraining
from loupe_hf.pretraining import LoupeTrainer, LoupeTrainingArguments
from tests.conftest import CAPTIONS
from loupe_hf import LoupeImageProcessor, LoupeProcessor, train_wordpiece_tokenizer

tokenizer = train_wordpiece_tokenizer(CAPTIONS * 4, vocab_size=256)
processor = LoupeProcessor(LoupeImageProcessor(size={"height": 64, "width": 64}), tokenizer)
config = LoupeConfig.from_preset("tiny", text_config={"vocab_size": len(tokenizer)}, **json.loads(sys.argv[2]))
dataset = build_dataset("train", 8).map(lambda row: {"phrase_spans": row["objects"]["phrase_span"]})
args = LoupeTrainingArguments(
    output_dir=sys.argv[1], per_device_train_batch_size=4, max_steps=2, save_steps=2, report_to="none",
    remove_unused_columns=False, use_cpu=True, push_to_hub=True, hub_model_id="tester/loupe-tiny",
    hub_token="dummy-token", hub_strategy=sys.argv[3],
)
trainer = LoupeTrainer(model=LoupeForPreTraining(config), args=args, train_dataset=dataset,
                       data_collator=LoupeDataCollator(processor), processing_class=processor)
# Decoys a user might keep in the output folder: none of them may reach the Hub.
import os, pathlib
out = pathlib.Path(sys.argv[1]); (out / "notes").mkdir(parents=True, exist_ok=True)
(out / ".env").write_text("HF_TOKEN=hf_secret_decoy"); (out / "id_rsa").write_text("PRIVATE KEY")
(out / "notes" / "plan.txt").write_text("private notes")
trainer.train()
trainer.push_to_hub(commit_message="tiny LOUPE")
print("pushed")
"""


@pytest.mark.parametrize("strategy", ["end", "checkpoint"])
def test_trainer_push_to_hub_uploads_a_loadable_checkpoint(tmp_path, strategy):
    with LoopbackHub(tmp_path / "hub") as hub:
        env = {
            key: value for key, value in os.environ.items() if not key.startswith("HF_HUB_OFFLINE")
        }
        env.update(
            {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf_home")}
        )
        env.pop("TRANSFORMERS_OFFLINE", None)
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                textwrap.dedent(PUSH_SCRIPT),
                str(tmp_path / "run"),
                json.dumps(FAST),
                strategy,
            ],
            cwd=os.path.dirname(os.path.dirname(__file__)),
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        repo = hub.repo_dir("tester/loupe-tiny")
        files = {path.name for path in repo.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "processor_config.json",
        "README.md",
    } <= files
    assert {"modeling_loupe.py", "configuration_loupe.py"} <= files  # remote code travels with it
    assert any(path.endswith("/commit/main") for _, path in hub.requests)
    uploaded = [path for path in repo.rglob("*") if path.is_file()]
    folders = {path.parent.relative_to(repo).as_posix() for path in uploaded}
    # No checkpoint-*/ or notes/ folder; the checkpoint strategy adds the resume state only.
    assert folders == ({".", "last-checkpoint"} if strategy == "checkpoint" else {"."})
    names = {path.name for path in uploaded}
    assert not names & {".env", "id_rsa", "training_args.bin", "plan.txt"}
    assert not files & {"optimizer.pt", "trainer_state.json"}  # resume state stays in its folder
    if strategy == "checkpoint":
        assert {"optimizer.pt", "trainer_state.json", "data_position_0.json"} <= names
    assert not any(b"dummy-token" in path.read_bytes() for path in uploaded)
    model = LoupeModel.from_pretrained(repo)
    assert isinstance(model, LoupeModel)


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 11])
def test_onecycle_schedule_works_for_any_step_count(
    steps, tiny_config, processor, train_dataset, tmp_path
):
    trainer = _trainer(tiny_config, processor, train_dataset, tmp_path, max_steps=steps)
    trainer.create_optimizer_and_scheduler(num_training_steps=steps)
    rates = []
    for _ in range(steps):
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        rates.append(trainer.lr_scheduler.get_last_lr()[0])
    assert all(math.isfinite(rate) and rate >= 0 for rate in rates)
    assert max(rates) <= trainer.args.learning_rate * (1 + 1e-6)


def test_contrast_group_sampler_shuffles_whole_groups_and_is_seeded():
    from loupe_hf.pretraining.collator import ContrastGroupSampler

    sampler = ContrastGroupSampler(14, 4, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(14)) and order[-2:] == [12, 13]
    groups = [order[i : i + 4] for i in range(0, 12, 4)]
    assert all(group == list(range(group[0], group[0] + 4)) for group in groups)
    assert list(ContrastGroupSampler(14, 4, seed=3)) == order
    orders = set()
    for epoch in range(6):
        sampler.set_epoch(epoch)
        orders.add(tuple(sampler))
    assert len(orders) > 1  # each epoch reshuffles the groups


def test_trainer_batches_hold_whole_contrast_groups(
    tiny_config, processor, train_dataset, tmp_path
):
    trainer = _trainer(tiny_config, processor, train_dataset, tmp_path, contrast_group=4)
    sampler = trainer._get_train_sampler()
    order = list(sampler)
    assert len(order) == len(train_dataset)
    for start in range(0, len(order) - len(order) % 8, 8):  # batch 8 = two whole groups
        batch = order[start : start + 8]
        assert [index // 4 for index in batch] == [batch[0] // 4] * 4 + [batch[4] // 4] * 4
    with pytest.raises(ValueError, match="contrast_group must be >= 1 and divide"):
        LoupeTrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=6, contrast_group=4
        )


@pytest.mark.parametrize(("size", "group"), [(10, 0), (-1, 2)])
def test_contrast_group_sampler_refuses_bad_sizes(size, group):
    from loupe_hf.pretraining.collator import ContrastGroupSampler

    with pytest.raises(ValueError, match="need group_size >= 1 and num_samples >= 0"):
        ContrastGroupSampler(size, group)
