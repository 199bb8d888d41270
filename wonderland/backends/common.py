"""What every backend shares and no framework owns: the data order and the learning-rate schedule.

Both are pure functions of the step number, so a checkpoint needs nothing but its step to resume
the exact data position, and the torch and MLX backends train on the same batches in the same order.
"""

from __future__ import annotations

import math
import random

from wonderland.config import TrainConfig


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
