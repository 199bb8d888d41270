"""Data-parallel LoRA training over several processes: torchrun launches, PyTorch DDP syncs.

``wonderland train ... --num-gpus N`` re-launches itself under ``torch.distributed.run``
(torchrun) with N processes (:func:`launch_train`); launching ``torchrun --nproc-per-node N -m wonderland train ...``
yourself works the same. One process per GPU (NCCL), or on CPU N processes with gloo.

Accounting, so that N processes train exactly what one process would:

* ``--batch-size`` stays the *global* batch (records per optimizer step, all ranks together):
  each rank takes every N-th record of the step's batch, so the learning rate and schedule need
  no rescaling and a run gives the same adapter on any process count (up to float summation order).
* The loss is the mean NLL over all assistant tokens of the global batch. Each rank's summed loss
  is divided by the global token count (one all-reduce of [loss, labelled tokens, tokens]) and
  multiplied by N, because DDP averages gradients over ranks.
* Only rank 0 writes: run.json, metrics.jsonl (its events carry global loss and tokens),
  checkpoints and the adapter. Checkpoints hold the adapter, the optimizer state (identical on
  all ranks after DDP's all-reduce) and the step; the data position is the step number, so a
  run resumes on a different process count.
* The stop flag (Ctrl-C, web stop button) is all-reduced each step, so every rank stops together.

NVLink multicast is switched off (``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``) in
launched processes unless the user set them: the shared GPU hosts this targets forbid it, and
LoRA's small gradient all-reduce gains nothing from it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched() -> bool:
    """True inside a process started by torchrun (or anything that sets its variables) with > 1 rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> World:
    return World(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                 int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group (NCCL on CUDA, gloo otherwise) and pick this rank's device."""
    w = world()
    if not w.distributed:
        return w, device
    if device.type == "cuda":
        device = torch.device("cuda", w.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                **({"device_id": device} if device.type == "cuda" else {}))
    return w, device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(indices: list[int], w: World) -> list[int]:
    """This rank's records of a global batch: every N-th one (ranks get sizes that differ by <= 1)."""
    return indices[w.rank :: w.size]


def global_counts(n: int, tokens: int, w: World, device: torch.device) -> tuple[int, int]:
    """Labelled tokens and tokens over all ranks. Host numbers: in one process nothing waits for
    the GPU here; under torchrun, one small all-reduce."""
    if not w.distributed:
        return n, tokens
    t = torch.tensor([n, tokens], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t[0]), int(t[1])


def global_sum(x: torch.Tensor, w: World) -> float:
    """A per-rank scalar tensor summed over all ranks, as a float. It waits for the GPU: call it
    once a step, after everything of the step has been launched."""
    x = x.detach()
    if w.distributed:
        x = x.to(torch.float64).clone()
        dist.all_reduce(x)
    return float(x)


def any_rank(flag: bool, w: World, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    if not w.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class _LossModule(torch.nn.Module):
    """Lets DDP see the loss computation as the wrapped module's forward (so it can prepare its
    gradient buckets), whatever path computes the loss: plain logits or the fused fast path."""

    def __init__(self, model: torch.nn.Module, fn: Callable) -> None:
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, *args, **kwargs):
        return self.fn(self.model, *args, **kwargs)


def wrap_loss(model: torch.nn.Module, fn: Callable, w: World, device: torch.device) -> Callable:
    """``fn(model, ...)`` as is in one process; under DDP (gradients all-reduced and averaged
    during backward, parameters broadcast from rank 0 at start) with several."""
    if not w.distributed:
        return lambda *a, **k: fn(model, *a, **k)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(_LossModule(model, fn), device_ids=[device.index] if device.type == "cuda" else None)
    return ddp


def launch_train(num_procs: int, config, args) -> int:
    """Re-run ``wonderland train`` under torchrun with ``num_procs`` processes on this machine.

    The resolved config travels as a YAML file, so every rank trains with exactly the settings this
    process resolved (preset, YAML, command line, a resumed run's config)."""
    import tempfile

    import yaml

    env = {**os.environ, "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE", "0"),
           "TORCH_SYMM_MEM_DISABLE_MULTICAST": os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_procs)))
    with tempfile.TemporaryDirectory(prefix="wonderland-launch") as tmp:
        cfg_path = Path(tmp) / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(config.to_dict()), encoding="utf-8")
        argv = ["train", "--config", str(cfg_path)]
        for opt in ("data", "name", "out", "resume"):
            if getattr(args, opt, None):
                argv += [f"--{opt}", str(getattr(args, opt))]
        if args.overwrite:
            argv.append("--overwrite")
        if getattr(args, "allow_config_change", False):
            argv.append("--allow-config-change")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={num_procs}",
               "-m", "wonderland", *argv]
        return subprocess.call(cmd, env=env)


def run_worker(config, data_dir: str | None, resume: str | None) -> None:
    """What ranks > 0 run instead of :func:`wonderland.train.train`: the same backend loop, but no
    run folder of their own (rank 0 writes it) and no events."""
    import tempfile

    from wonderland import replay
    from wonderland.backends import TrainJob, get_backend
    from wonderland.events import StopFlag
    from wonderland.models import resolve_model, weights_sha256
    from wonderland.runs import RunDir, resolve_run
    from wonderland.train import load_data

    resume_from = None
    if resume:
        run = resolve_run(resume)
        resume_from = run.latest_checkpoint()
        data_dir = data_dir or run.read()["data"]["path"]
    train_records, valid_records, stats = load_data(data_dir)
    model_path, backend = resolve_model(config.model, log=lambda m: None), get_backend("torch", log=lambda m: None)
    # the records rank 0 trains on: the character's with --replay's records mixed in, as train() mixes
    # them (the probe and its answers are rank 0's; there is no KL term under torchrun)
    mixed, _, _ = replay.guard(config, model_path, weights_sha256(model_path), train_records, [], stats["system_prompt"],
                               lambda: backend.load(model_path), lambda m: None)
    stop = StopFlag()
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set("interrupted"))  # rank 0 decides; all stop together
    with tempfile.TemporaryDirectory(prefix="wonderland-rank") as tmp:
        job = TrainJob(config=config, model_path=model_path, train_records=mixed, valid_records=valid_records,
                       run=RunDir(Path(tmp)), emit=lambda event: None, should_stop=stop, resume_from=resume_from,
                       system_prompt=stats["system_prompt"])
        try:
            backend.train(job)
        finally:
            shutdown()
