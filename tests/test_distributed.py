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
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
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
