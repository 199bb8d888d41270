"""Data-parallel training (wonderland.backends.torch_peft.distributed): 2 gloo processes on the CPU train what one
process trains with the same global batch, write one metrics stream, and leave checkpoints that
resume on a different process count. The processes are real (torchrun, launched by
``wonderland train --num-gpus 2``); only the backend (gloo instead of NCCL) differs from a GPU run.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from wonderland.backends.torch_peft import distributed
from wonderland.config import TrainConfig
from wonderland.train import train


def test_shards_partition_the_global_batch():
    idx = [7, 3, 9, 0, 5]
    shards = [distributed.shard(idx, distributed.World(rank=r, size=2)) for r in range(2)]
    assert shards == [[7, 9, 5], [3, 0]]
    assert sorted(shards[0] + shards[1]) == sorted(idx)
    one = distributed.World()
    assert distributed.shard(idx, one) == idx and not one.distributed and one.is_main
    assert distributed.global_counts(4, 10, one, torch.device("cpu")) == (4, 10)
    assert distributed.global_sum(torch.tensor(2.5), one) == 2.5


def _dataset(path, n: int = 10) -> None:
    path.mkdir()
    rows = [{"messages": [{"role": "system", "content": "You are the Hatter."},
                          {"role": "user", "content": f"Question {i}?" + " Why?" * (i % 3)},
                          {"role": "assistant", "content": "No room! No room!" + " Tea." * (i % 4)}]} for i in range(n)]
    (path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _steps(run) -> list[dict]:
    return [json.loads(line) for line in run.metrics.read_text().splitlines() if '"event": "step"' in line]


def test_two_gloo_processes_match_one_process_and_resume_on_one(tiny_model, tmp_path):
    _dataset(tmp_path / "data")
    opts = dict(backend="torch", device="cpu", batch_size=4, lr=2e-3, schedule="constant", warmup=1, rank=4,
                alpha=8, val_every=0, save_every=2, threads=1, kl=0.0)  # KL runs in one process only
    # one process, 6 steps (constant lr: the first 4 steps are those of a 4-step run)
    single = train(TrainConfig(model=str(tiny_model), iters=6, **opts), tmp_path / "data", out=str(tmp_path / "single"),
                   log=lambda m: None)
    # two processes, 4 steps, checkpoint at step 2
    cmd = [sys.executable, "-m", "wonderland", "train", "--num-gpus", "2", "--data", str(tmp_path / "data"),
           "--out", str(tmp_path / "ddp"), "--model", str(tiny_model), "--iters", "4"]
    for k, v in opts.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from wonderland.runs import RunDir

    ddp = RunDir(tmp_path / "ddp")
    ddp_steps, single_steps = _steps(ddp), _steps(single)
    assert [s["step"] for s in ddp_steps] == [1, 2, 3, 4]  # one metrics stream: rank 0 only
    assert [s["tokens"] for s in ddp_steps] == [s["tokens"] for s in single_steps[:4]]  # global tokens
    assert [s["loss"] for s in ddp_steps] == pytest.approx([s["loss"] for s in single_steps[:4]], rel=1e-4)
    assert ddp.read()["status"] == "finished" and (ddp.adapter / "adapter_config.json").exists()
    assert [p.name for p in ddp.checkpoints.iterdir()] == ["step-000002"]

    # the 2-process checkpoint resumes in one process and ends where the single run ended
    resumed = train(TrainConfig(model=str(tiny_model), iters=6, **opts), resume=str(ddp.path), log=lambda m: None)
    a, b = load_file(str(resumed.adapter / "adapter_model.safetensors")), load_file(str(single.adapter / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # float32; only the order of gradient summation differs (two shards + all-reduce)
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    assert _steps(resumed)[-1]["loss"] == pytest.approx(single_steps[-1]["loss"], rel=1e-4)


def test_num_gpus_must_be_positive(tmp_path, capsys):
    from wonderland.cli import main

    _dataset(tmp_path / "data")
    assert main(["train", "--data", str(tmp_path / "data"), "--num-gpus", "0"]) == 2
    assert "--num-gpus must be >= 1" in capsys.readouterr().err


def test_global_sum_of_a_loss_that_requires_grad_warns_nothing():
    import warnings

    loss = (torch.ones(3, requires_grad=True) * 2).sum()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when a tensor that requires grad becomes a float
        assert distributed.global_sum(loss, distributed.World()) == 6.0
