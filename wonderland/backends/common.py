"""What every backend shares and no framework owns: the data order, the learning-rate schedule and
the checkpoint bookkeeping.

Both are pure functions of the step number, so a checkpoint needs nothing but its step to resume
the exact data position, and the torch and MLX backends train on the same batches in the same order.
"""

from __future__ import annotations

import math
import random
import shutil
from pathlib import Path

from wonderland.config import TrainConfig
from wonderland.events import Checkpoint
from wonderland.fileio import atomic_replace_dir, atomic_write_json

KEEP_CHECKPOINTS = 2  # the newest checkpoints kept in run/checkpoints/


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Records of step ``step`` (0-based): a fresh seeded shuffle of ``range(n)`` each epoch."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[k * batch_size : (k + 1) * batch_size]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then constant/cosine."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup) / max(1, cfg.iters - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))  # floor at 10 %


def finish_checkpoint(job, tmp: Path, final: Path, step: int) -> Path:
    """Complete a checkpoint whose backend-specific files are in ``tmp``: add trainer_state.json (its
    presence marks a finished checkpoint), move it into place as ``final``, keep only the newest
    ``KEEP_CHECKPOINTS``, and emit the Checkpoint event."""
    atomic_write_json(tmp / "trainer_state.json", {"step": step, "config": job.config.to_dict()})
    atomic_replace_dir(tmp, final)
    for old in sorted(job.run.checkpoints.glob("step-*"))[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    job.emit(Checkpoint(step=step, total_steps=job.config.iters, path=str(final)))
    return final
