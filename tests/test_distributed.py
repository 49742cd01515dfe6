"""Two real CPU processes (gloo): the CMC loss uses the global batch, two processes pre-train
exactly as one process with their whole batch does (under DDP and under FSDP2), and the shipped
launch configs run."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import datasets
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

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
from .test_data_sources import _png

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


def run_cases(
    folder, processor, tiny_config, names: tuple[str, ...] = tuple(CASES), wrap: str = "ddp"
) -> dict[str, tuple]:
    """The cases `names` of `CASES` run by one process with each step's whole batch and by two
    processes (DDP, or FSDP2 with `wrap="fsdp"`) with consecutive shares of it (as Accelerate
    shards batches): case → (one, [rank 0, rank 1], whole batches, shares)."""
    cases = {}
    for name in names:
        row, counts = CASES[name]
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
        args=(2, str(folder / "store"), str(folder / "job.pt"), str(folder), wrap),
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
                # Adam divides by the root of tiny second moments: fp32 sums taken in another order
                # (all-reduce against one batch) move a few weights by up to ~3e-6 after 3 steps.
                rtol=1e-5,
                atol=1e-5,
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


def test_two_fsdp_processes_give_the_losses_and_weights_of_one(tmp_path, processor, tiny_config):
    # FSDP2 over gloo, each Swin stage and BERT layer a shard unit as in the shipped FSDP config
    # (accelerate runs FSDP configs only on GPUs; with `use_cpu` it falls back to DDP).
    runs = run_cases(tmp_path, processor, tiny_config, names=("backbone", "loupe"), wrap="fsdp")
    for case, (one, two, _, _) in runs.items():
        mean = torch.stack([run_["losses"] for run_ in two]).mean(0)
        torch.testing.assert_close(
            mean,
            one["losses"],
            rtol=1e-5,
            atol=1e-5,
            msg=lambda m, c=case: f"{c}: {m}",
        )
        for rank, run_ in enumerate(two):
            torch.testing.assert_close(run_["statistics"], one["statistics"], rtol=1e-5, atol=1e-5)
            for name, value in one["state"].items():
                torch.testing.assert_close(  # the scale was trained as a 1-element parameter
                    run_["state"][name].reshape(value.shape),
                    value,
                    rtol=1e-5,
                    atol=1e-5,
                    msg=lambda m, n=name, r=rank, c=case: f"{c}, rank {r}, {n}: {m}",
                )


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


# --- streamed data on two processes ------------------------------------------------------------

ACCELERATE = shutil.which("accelerate", path=os.path.dirname(sys.executable))
needs_accelerate_cli = pytest.mark.skipif(ACCELERATE is None, reason="accelerate CLI not installed")
DDP_2CPU = os.path.join(REPO, "examples", "accelerate", "ddp_2cpu.yaml")
# Streamed files: (files, samples per file). 8 files give each of 2 processes x 2 DataLoader
# workers two; 3 are fewer than those 4 consumers but not fewer than the processes; 1 is fewer
# than the processes.
LAYOUTS = {"8 files": (8, 6), "3 files": (3, 6), "1 file": (1, 6)}
FILE_SOURCES = ("webdataset", "hub-folder")
SPLIT_CASES = [
    (source, layout, workers)
    for source in FILE_SOURCES
    for layout in ("8 files", "3 files")
    for workers in (0, 2)
]
SAMPLE_BUDGET = 20  # of the 48 samples in 8 files: pretrain.py always passes num_train_samples


def _case(*parts) -> str:
    return "-".join(str(part).replace(" ", "_") for part in parts)


def _write_streamed_files(folder: Path, files: int, per_file: int) -> dict[str, str]:
    """The same samples as `files` webdataset shards and as a folder laid out like a Hub dataset
    (`files` parquet files); sample i lies in file i // per_file and has the caption "caption i".
    Returns each source's `ImageCaptionSource.name`."""
    png = _png((0, 0, 200))
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    (folder / "shards").mkdir(parents=True)
    (folder / "hub" / "data").mkdir(parents=True)
    for file in range(files):
        ids = range(file * per_file, (file + 1) * per_file)
        with tarfile.open(folder / "shards" / f"shard-{file:06d}.tar", "w") as archive:
            for index in ids:
                for suffix, payload in ((".png", png), (".txt", f"caption {index}".encode())):
                    info = tarfile.TarInfo(f"sample{index:04d}{suffix}")
                    info.size = len(payload)
                    archive.addfile(info, io.BytesIO(payload))
        rows = {
            "image": [{"bytes": png, "path": None}] * per_file,
            "caption": [f"caption {index}" for index in ids],
        }
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            folder / "hub" / "data" / f"train-{file:05d}-of-{files:05d}.parquet"
        )
    return {"webdataset": str(folder / "shards"), "hub-folder": str(folder / "hub")}


def _stream_cases(names: dict[str, dict[str, str]]) -> list[dict]:
    """The worker's cases: the synthetic stream (6 batches of it: it is endless), each file layout
    and source read for a whole pass, and a sample budget over 8 files."""
    cases = [
        {
            "case": _case("synthetic", workers),
            "source": "synthetic",
            "workers": workers,
            "batches": 6,
        }
        for workers in (0, 2)
    ]
    for source, layout, workers in [*SPLIT_CASES, *((s, "1 file", 0) for s in FILE_SOURCES)]:
        name = names[layout][source]
        cases.append({"case": _case(source, layout, workers), "source": name, "workers": workers})
    for source in FILE_SOURCES:
        name = names["8 files"][source]
        budget = {"num_samples": SAMPLE_BUDGET}
        cases.append({"case": _case(source, "budget"), "source": name, "workers": 2, **budget})
    return [{"batches": None, **case} for case in cases]


@pytest.fixture(scope="module")
def stream_reads(tmp_path_factory) -> dict[str, list[dict]]:
    """Every case of `_stream_cases` read by tests/stream_shard_worker.py in one two-process launch
    (a launch costs far more than the reading): case → what rank 0 and rank 1 wrote."""
    if ACCELERATE is None:
        pytest.skip("accelerate CLI not installed")
    root = tmp_path_factory.mktemp("streams")
    names = {name: _write_streamed_files(root / _case(name), *LAYOUTS[name]) for name in LAYOUTS}
    cases = _stream_cases(names)
    out = root / "reads"
    command = [ACCELERATE, "launch", "--config_file", DDP_2CPU]
    command += [os.path.join(REPO, "tests", "stream_shard_worker.py"), str(out), json.dumps(cases)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    reads = {}
    for case in cases:
        ranks = [json.loads((out / case["case"] / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert all(rank["world"] == 2 for rank in ranks)
        reads[case["case"]] = ranks
    return reads


def _batches(stream_reads, case: str) -> list[list[list[int]]]:
    """Rank 0's and rank 1's batches of sample ids in `case`."""
    ranks = stream_reads[case]
    assert not any("error" in rank for rank in ranks), ranks
    return [rank["batches"] for rank in ranks]


def _ids(batches: list[list[int]]) -> list[int]:
    return [index for batch in batches for index in batch]


@pytest.mark.parametrize("workers", [0, 2])
def test_two_processes_stream_disjoint_shards_of_the_generated_data(stream_reads, workers):
    """As `examples/pretrain.py` streams the synthetic data on several processes: each process and
    worker generates its own shard; no sample is read twice across ranks; contrast groups stay whole."""
    ranks = _batches(stream_reads, _case("synthetic", workers))
    assert all(len(batches) == 6 for batches in ranks)
    seen = [index for batches in ranks for index in _ids(batches)]
    assert len(seen) == len(set(seen)) == 2 * 6 * 4  # 48 reads, 48 different samples
    for batches in ranks:
        for batch in batches:
            # A contrast group (2 consecutive indices) lies within one batch of one process.
            assert sorted(index // 2 for index in batch) == [
                g for g in sorted({i // 2 for i in batch}) for _ in (0, 1)
            ]


@pytest.mark.parametrize(
    ("source", "layout", "workers"), SPLIT_CASES, ids=[_case(*case) for case in SPLIT_CASES]
)
def test_two_processes_read_every_streamed_file_sample_once_a_pass(
    stream_reads, source, layout, workers
):
    """At least one file per process: accelerate gives each process whole files (`shard`), and
    `datasets` each of its DataLoader workers whole files of those (a worker without one stops):
    over a pass every sample is read, by one process and once. With 3 files one process reads 2
    and the other 1, so the processes' passes differ in length."""
    files, per_file = LAYOUTS[layout]
    seen = [_ids(batches) for batches in _batches(stream_reads, _case(source, layout, workers))]
    assert sorted(seen[0] + seen[1]) == list(range(files * per_file))  # all, none twice
    readers = [
        {rank for rank in (0, 1) if any(index // per_file == file for index in seen[rank])}
        for file in range(files)
    ]
    assert all(len(reader) == 1 for reader in readers)  # a file is read by one process
    shares = [len(ids) // per_file for ids in seen]
    assert sorted(shares) == sorted([files // 2, files - files // 2])


@pytest.mark.parametrize("source", FILE_SOURCES)
def test_a_stream_of_fewer_files_than_processes_is_refused_with_the_reason(stream_reads, source):
    """One file, two processes: accelerate would have each process read the whole stream, keep its
    share of every 8 samples (2 processes x batches of 4) and complete the last share of a pass with
    samples from its start, read twice. `check_stream_shards` (called by pretrain.py) says so."""
    for rank in stream_reads[_case(source, "1 file", 0)]:
        assert "batches" not in rank
        assert "has 1 shard(s) (files) for 2 processes" in rank["error"]
        assert "give it at least 2 files" in rank["error"]


@pytest.mark.parametrize("source", FILE_SOURCES)
def test_a_sample_budget_is_shared_by_processes_and_workers(stream_reads, source):
    """`num_samples` (pretrain.py's `--num_train_samples`) caps the stream with `take`, whose
    count `datasets` divides among the shards it gives to processes and workers: 20 samples are
    read in all, none twice."""
    seen = [_ids(batches) for batches in _batches(stream_reads, _case(source, "budget"))]
    assert len(seen[0]) == len(seen[1]) == SAMPLE_BUDGET // 2
    assert len(set(seen[0] + seen[1])) == SAMPLE_BUDGET


STREAMED_PRETRAINING = [
    "--use_cpu",
    "--synthetic_streaming",
    "true",
    "--max_steps",
    "6",
    "--save_steps",
    "4",
    "--per_device_train_batch_size",
    "4",
    # 25 pairs, 13 and 12 per process: passes of 4 and 3 batches. At the step-4 checkpoint
    # process 0 has read its whole first pass and process 1 one batch of its second; after it,
    # process 0 starts its second pass and process 1 reads on into its second.
    "--num_train_samples",
    "25",
    "--num_eval_samples",
    "0",
    "--synthetic_image_size",
    "64",
    "--logging_steps",
    "1",
    "--tokenizer_training_captions",
    "200",
    "--report_to",
    "none",
    "--config_overrides",
    '{"shapley_num_samples": 4, "num_regions": 4}',
]


def _pretrain_on_two_processes(output: Path, *arguments: str) -> None:
    """examples/pretrain.py with `STREAMED_PRETRAINING` and `arguments`, on two CPU processes."""
    command = [ACCELERATE, "launch", "--config_file", DDP_2CPU]
    command += [os.path.join(REPO, "examples", "pretrain.py"), "--output_dir", str(output)]
    command += [*STREAMED_PRETRAINING, *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def _logged_losses(output: Path) -> dict[int, float]:
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


@pytest.mark.slow
@needs_accelerate_cli
def test_two_process_streamed_pretraining_resumed_from_a_checkpoint_ends_with_the_same_weights(
    tmp_path,
):
    """Two processes streaming the synthetic data in passes of different lengths (4 and 3
    batches): 6 steps straight, and 4 steps then a resume from checkpoint-4
    (`--resume_from_checkpoint`) to step 6, end with the same losses and weights, bit for bit:
    each process skips the batches it read before the checkpoint, in its own pass, and reads the
    ones the straight run read after it. The interrupted run is what a run killed after its
    step-4 checkpoint leaves: the tokenizer (saved before step 1) and checkpoint-4, here copied
    from the straight run (the same seed gives the same first steps). Placing process 1 by
    process 0's position (the shared `trainer_state.json`) had it skip 4 batches of its first
    pass of 3 and start its second pass over: other losses at steps 5 and 6 (6.74 and 8.27
    instead of 10.53 and 5.93), weights ~3e-3 away."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _pretrain_on_two_processes(straight)
    resumed.mkdir()
    for path in straight.glob("tokenizer*.json"):
        shutil.copy(path, resumed / path.name)
    shutil.copytree(straight / "checkpoint-4", resumed / "checkpoint-4")
    # The premise: at the checkpoint the processes are at different places in their passes,
    # process 0 at the end of its first (4 of 4 batches), process 1 one batch into its second.
    positions = [
        json.loads((resumed / "checkpoint-4" / f"data_position_{rank}.json").read_text())
        for rank in (0, 1)
    ]
    assert [position["epoch"] for position in positions] == pytest.approx([4 / 6, 1 + 1 / 6])
    _pretrain_on_two_processes(resumed, "--resume_from_checkpoint", str(resumed / "checkpoint-4"))
    assert sorted(_logged_losses(resumed)) == [1, 2, 3, 4, 5, 6]
    assert _logged_losses(resumed) == _logged_losses(straight)
    weights = load_file(resumed / "model.safetensors")
    expected = load_file(straight / "model.safetensors")
    assert weights.keys() == expected.keys()
    differences = {
        name: (weights[name] - tensor).abs().max().item() for name, tensor in expected.items()
    }
    assert max(differences.values()) == 0, max(differences.items(), key=lambda item: item[1])
