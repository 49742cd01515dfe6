"""Two real CPU processes (gloo): the CMC loss uses the global batch, two processes pre-train
exactly as one process with their whole batch does, and the shipped launch configs run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from loupe_hf import LoupeModel
from loupe_hf.data import generate_sample
from loupe_hf.shapley import SAMPLING_METHODS, sample_coalitions
from loupe_hf.shapley.coalitions import DrawStreams, keyed_uniforms

from .distributed_worker import (
    LOSSES,
    global_batch,
    loss_and_gradients,
    pretrain,
    pretraining_worker,
    run,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    ("counts", "negatives"),
    [([4, 4], False), ([3, 5], False), ([3, 5], True)],
    ids=["equal-shares", "unequal-shares", "unequal-shares-hard-negatives"],
)
def test_two_process_cmc_loss_and_gradients_equal_the_single_process_ones(
    tmp_path, counts, negatives
):
    store = str(tmp_path / "store")
    mp.spawn(run, args=(2, store, counts, str(tmp_path), negatives), nprocs=2, join=True)
    images, texts, negative_texts = global_batch(sum(counts))
    expected = loss_and_gradients(
        images, texts, gather=False, negatives=negative_texts if negatives else None
    )
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["loss"], expected["loss"])
        for name, grad in expected.items():
            torch.testing.assert_close(
                result[name], grad, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}"
            )


@pytest.mark.parametrize("method", [*SAMPLING_METHODS, "stratified by a group"])
def test_keyed_coalitions_depend_on_neither_padding_nor_batch_mates(method):
    # What lets a process pad its share to its own length: game 1 of a batch of three, with 6
    # padding players appended, draws what it draws alone without padding.
    generator = torch.Generator().manual_seed(0)
    players = torch.rand(3, 20, generator=generator) < 0.8
    players[1, 14:] = False  # game 1 has 14 players at most
    targets = torch.zeros(3, 2, 20, dtype=torch.bool)
    targets[:, 0, :2], targets[:, 1, 3:6] = True, True
    targets &= players.unsqueeze(1)
    group = torch.zeros(20, dtype=torch.bool)
    group[:8] = True

    def draw(targets, players):
        options = {"strata_players": group[: players.shape[-1]].expand_as(players)}
        return sample_coalitions(
            targets,
            16,
            method.split()[0],
            DrawStreams.keyed(42),
            players,
            **(options if method.endswith("group") else {}),
        ).coalitions

    padded = draw(targets, players)[1]
    alone = draw(targets[1:2, :, :14], players[1:2, :14])[0]
    assert torch.equal(padded[..., :14], alone) and not padded[..., 14:].any()


def test_keyed_uniforms_depend_on_the_row_and_coordinates_only():
    whole = keyed_uniforms(7, torch.arange(64), (4, 6))
    share = keyed_uniforms(7, torch.arange(32, 64), (4, 3))  # other rows, less padding
    assert torch.equal(share, whole[32:, :, :3])
    assert not torch.equal(keyed_uniforms(8, torch.arange(64), (4, 6)), whole)
    assert whole.min() >= 0 and whole.max() < 1 and abs(whole.mean().item() - 0.5) < 0.03


# The paper's ablation rows, as `examples/pretrain.py --ablation` names them.
ROWS = {
    "backbone": {"use_tsa": False, "use_fsa": False, "use_unsil": False},
    "tsa": {"use_tsa": True, "use_fsa": False, "use_unsil": False},
    "tsa_fsa": {"use_tsa": True, "use_fsa": True, "use_unsil": False},
    "loupe": {"use_tsa": True, "use_fsa": True, "use_unsil": True},
}
# Small label games; both UNSIL levels, warm for one step only, so that steps 2 and 3 pick their
# sampled targets by the gate's draws. Dropout off: its masks are drawn per process, so only with
# it off can two processes match one exactly (docs/design_choices.md).
SMALL = {
    "shapley_num_samples": 4,
    "num_regions": 4,
    "unsil_hidden_dim": 16,
    "unsil_levels": ["token", "semantic"],
    "unsil_warmup_steps": 1,
    "unsil_min_sample_rate": 0.2,
}
NO_DROPOUT = {
    "vision_config": {"drop_path_rate": 0.0},
    "text_config": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
}
STEPS = 3
# Samples per process and step: equal shares for every row, and unequal ones for full LOUPE.
CASES = {**{row: (row, [3, 3]) for row in ROWS}, "loupe, shares 2+4": ("loupe", [2, 4])}


def _config(tiny_config, row: str) -> dict:
    config = tiny_config.to_dict()
    for tower, values in NO_DROPOUT.items():
        config[tower].update(values)
    return {**config, **SMALL, **ROWS[row]}


def _samples(step: int, counts: list[int]) -> list[tuple]:
    """(image, caption, phrase spans) of each sample of a step. Sample 0 has no phrase; at step 2
    the last process's samples have none either, so that process skips FSA while the other runs it
    (and images with phrases are split unequally)."""
    samples = []
    for index in range(sum(counts)):
        sample = generate_sample(100 * step + index)
        last_share = index >= sum(counts[:-1])
        spans = [] if index == 0 or (step == 1 and last_share) else sample["objects"]["phrase_span"]
        samples.append((sample["image"], sample["caption"], spans))
    return samples


def _batch(processor, samples: list[tuple]) -> dict[str, torch.Tensor]:
    """The processor's batch, padded to its own longest caption and phrase count."""
    images, captions, spans = zip(*samples, strict=True)
    return dict(processor(images=list(images), text=list(captions), phrase_spans=list(spans)))


@pytest.fixture(scope="module")
def pretraining_runs(tmp_path_factory, processor, tiny_config):
    return run_cases(tmp_path_factory.mktemp("pretraining"), processor, tiny_config)


def run_cases(folder, processor, tiny_config) -> dict[str, tuple]:
    """Every case of `CASES` run by one process with each step's whole batch and by two processes
    with consecutive shares of it (as Accelerate shards batches): case → (one, [rank 0, rank 1],
    whole batches, shares)."""
    cases = {}
    for name, (row, counts) in CASES.items():
        steps = [_samples(step, counts) for step in range(STEPS)]
        starts = [sum(counts[:rank]) for rank in range(2)]
        shares = [
            [_batch(processor, step[start : start + count]) for step in steps]
            for start, count in zip(starts, counts, strict=True)
        ]
        cases[name] = {
            "config": _config(tiny_config, row),
            "learning_rate": 0.1,
            "shares": shares,
            "whole": [_batch(processor, step) for step in steps],
        }
    torch.save(cases, folder / "job.pt")
    mp.spawn(
        pretraining_worker,
        args=(2, str(folder / "store"), str(folder / "job.pt"), str(folder)),
        nprocs=2,
        join=True,
    )
    ranks = [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    torch.set_num_threads(1)  # the same arithmetic as each worker's
    return {
        name: (
            pretrain(case["config"], case["whole"], case["learning_rate"]),
            [results[name] for results in ranks],
            case["whole"],
            case["shares"],
        )
        for name, case in cases.items()
    }


def loss_table(one: dict, two: list[dict]) -> list[tuple[int, float, float, float]]:
    """Per step: the one-process loss, the two-process loss (mean of the processes' shares) and
    the largest difference over the loss and its components."""
    mean = torch.stack([run["losses"] for run in two]).mean(0)
    difference = (mean - one["losses"]).abs().amax(-1)
    return [
        (step + 1, float(one["losses"][step, 0]), float(mean[step, 0]), float(difference[step]))
        for step in range(one["losses"].shape[0])
    ]


def test_shares_are_padded_differently_from_the_whole_batch(pretraining_runs):
    # Otherwise the equality below would not show that padding leaves the labels alone.
    _, _, whole, shares = pretraining_runs["loupe"]
    for key in ("input_ids", "phrase_masks"):
        widths = [batch[key].shape[1] for rank in shares for batch in rank]
        assert min(widths) < max(batch[key].shape[1] for batch in whole)
    assert shares[1][1]["phrase_masks"].shape[1] == 0  # a process without phrases at step 2


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_give_the_losses_and_weights_of_one(pretraining_runs, case):
    one, two, _, _ = pretraining_runs[case]
    table = "\n".join(
        f"step {s}: {a:.6f} vs {b:.6f} (max diff {d:.1e})" for s, a, b, d in loss_table(one, two)
    )
    # Each process reports its share of every loss: their mean is the loss of the global batch.
    mean = torch.stack([run_["losses"] for run_ in two]).mean(0)
    torch.testing.assert_close(
        mean, one["losses"], rtol=1e-5, atol=1e-5, msg=lambda m: f"{m}\n{table}"
    )
    for rank, run_ in enumerate(two):
        # UNSIL's statistics are totals over processes: every process reports the global value.
        torch.testing.assert_close(run_["statistics"], one["statistics"], rtol=1e-5, atol=1e-5)
        for name, value in one["state"].items():  # parameters and buffers (running scales, ...)
            torch.testing.assert_close(
                run_["state"][name],
                value,
                rtol=1e-5,
                atol=2e-6,
                msg=lambda m, n=name, r=rank: f"rank {r}, {n}: {m}",
            )
    flags = ROWS[CASES[case][0]]
    for loss, flag in (
        ("tsa_loss", "use_tsa"),
        ("fsa_loss", "use_fsa"),
        ("unsil_loss", "use_unsil"),
    ):
        assert bool(one["losses"][:, LOSSES.index(loss)].ne(0).all()) == flags[flag], loss
    if flags["use_unsil"]:
        # After the warm-up step the gate chose: some labels were sampled, some predicted.
        unsil_shares = one["statistics"][1:, [0, 2]]
        assert ((unsil_shares > 0) & (unsil_shares < 1)).all()


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None,
    reason="accelerate CLI not installed",
)
def test_two_process_pretraining_with_accelerate_launch_saves_a_checkpoint(tmp_path):
    output = tmp_path / "run"
    command = [
        os.path.join(os.path.dirname(sys.executable), "accelerate"),
        "launch",
        "--config_file",  # the shipped two-CPU-process config, so it is exercised for real
        os.path.join(REPO, "examples", "accelerate", "ddp_2cpu.yaml"),
        os.path.join(REPO, "examples", "pretrain.py"),
        "--use_cpu",
        "--output_dir",
        str(output),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--num_train_samples",
        "32",
        "--num_eval_samples",
        "0",
        "--save_steps",
        "2",
        "--logging_steps",
        "1",
        "--tokenizer_training_captions",
        "200",
        "--config_overrides",
        '{"shapley_num_samples": 4, "num_regions": 4}',
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    log = result.stdout + result.stderr
    assert "process 0, world size 2" in log and "process 1, world size 2" in log
    model = LoupeModel.from_pretrained(output)
    assert isinstance(model, LoupeModel)
    assert (output / "checkpoint-2" / "model.safetensors").is_file()


ACCELERATE_CONFIGS = {
    "ddp_1node_8gpu.yaml": ("MULTI_GPU", 8, 1),
    "ddp_2nodes_8gpu.yaml": ("MULTI_GPU", 16, 2),
    "fsdp_1node_8gpu.yaml": ("FSDP", 8, 1),
    "deepspeed_zero2_1node_8gpu.yaml": ("DEEPSPEED", 8, 1),
    "ddp_2cpu.yaml": ("MULTI_GPU", 2, 1),
}


@pytest.mark.parametrize("name", sorted(ACCELERATE_CONFIGS))
def test_shipped_accelerate_configs_load_and_say_what_they_run(name, tiny_config):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(os.path.join(REPO, "examples", "accelerate", name))
    kind, processes, machines = ACCELERATE_CONFIGS[name]
    assert str(config.distributed_type).split(".")[-1] == kind
    assert (config.num_processes, config.num_machines) == (processes, machines)
    assert config.mixed_precision == ("no" if config.use_cpu else "bf16")
    if kind == "FSDP":  # the wrapped layer classes must exist in a LOUPE model
        wrapped = set(config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(","))
        present = {type(module).__name__ for module in LoupeModel(tiny_config).modules()}
        assert wrapped <= present
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 2


@pytest.mark.parametrize("workers", [0, 2])
def test_two_processes_stream_disjoint_shards_of_the_generated_data(tmp_path, workers):
    """As `examples/pretrain.py` streams the synthetic data on several processes: each process and
    worker generates its own shard; no sample is read twice across ranks; contrast groups stay whole."""
    command = [
        os.path.join(os.path.dirname(sys.executable), "accelerate"),
        "launch",
        "--config_file",
        os.path.join(REPO, "examples", "accelerate", "ddp_2cpu.yaml"),
        os.path.join(REPO, "tests", "stream_shard_worker.py"),
        str(tmp_path),
        "synthetic",
        str(workers),
        "6",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(rank["world"] == 2 and len(rank["batches"]) == 6 for rank in ranks)
    seen = [index for rank in ranks for batch in rank["batches"] for index in batch]
    assert len(seen) == len(set(seen)) == 2 * 6 * 4  # 48 reads, 48 different samples
    for rank in ranks:
        for batch in rank["batches"]:
            # A contrast group (2 consecutive indices) lies within one batch of one process.
            assert sorted(index // 2 for index in batch) == [
                g for g in sorted({i // 2 for i in batch}) for _ in (0, 1)
            ]
