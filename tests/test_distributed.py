"""Two real CPU processes (gloo): the CMC loss uses the global batch, and pre-training runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from loupe_hf import LoupeModel

from .distributed_worker import global_batch, loss_and_gradients, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("counts", [[4, 4], [3, 5]], ids=["equal-shares", "unequal-shares"])
def test_two_process_cmc_loss_and_gradients_equal_the_single_process_ones(tmp_path, counts):
    mp.spawn(run, args=(2, str(tmp_path / "store"), counts, str(tmp_path)), nprocs=2, join=True)
    images, texts = global_batch(sum(counts))
    expected = loss_and_gradients(images, texts, gather=False)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["loss"], expected["loss"])
        for name, grad in expected.items():
            torch.testing.assert_close(
                result[name], grad, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}"
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
