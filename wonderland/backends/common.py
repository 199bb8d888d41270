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
from wonderland.errors import UserError
from wonderland.events import Checkpoint
from wonderland.fileio import atomic_replace_dir, atomic_write_json, staging_dir
from wonderland.probe import best_checkpoint_step

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
    best = best_checkpoint_step(job.run.checkpoints)  # the probe's best is never pruned
    for old in sorted(job.run.checkpoints.glob("step-*"))[:-KEEP_CHECKPOINTS]:
        if best is None or old.name != f"step-{best:06d}":
            shutil.rmtree(old, ignore_errors=True)
    job.emit(Checkpoint(step=step, total_steps=job.config.iters, path=str(final)))
    return final


def check_keys(ckpt: Path, missing: list[str], unexpected: list[str]) -> None:
    """A checkpoint's adapter must fill exactly the model's LoRA weights: a missing or an unexpected
    key means it was written for another model or LoRA shape, and a resume would silently mix them."""
    if missing or unexpected:
        what = "; ".join(f"{label} {len(keys)} (e.g. {keys[0]})" for label, keys in
                         (("missing", missing), ("unexpected", unexpected)) if keys)
        raise UserError(f"{ckpt}: the checkpoint's adapter does not match the model's LoRA layers ({what}); "
                        f"resume with the model and LoRA settings that wrote it")


class Diverged(UserError):
    """Training went wrong in a way more steps cannot fix: the run stops as ``failed`` with this reason
    (a UserError: the fix is the user's, a lower --lr; the CLI says it in one line and exits 2).

    Raised by :class:`DivergenceGuard` from inside either backend's loop; the last good checkpoint
    (written before the loss went bad) is kept, so the run can be resumed with a lower ``--lr``."""


class DivergenceGuard:
    """The divergence rule both backends apply after every step (docs/ARCHITECTURE.md):

    - a non-finite training loss (NaN, ±inf), a non-finite validation loss, or non-finite LoRA
      weights at a checkpoint stop the run at once;
    - once the first ``baseline_steps`` steps of this process have set a baseline (their mean
      loss), a loss above ``factor`` x baseline for ``patience`` steps in a row stops it.

    While the loss is above the limit no checkpoint is written (:attr:`healthy` is False), so the
    newest checkpoint is always one from before the loss went bad.
    """

    def __init__(self, baseline_steps: int = 10, factor: float = 3.0, patience: int = 5) -> None:
        self.baseline_steps, self.factor, self.patience = baseline_steps, factor, patience
        self._first: list[float] = []
        self._over = 0

    @property
    def limit(self) -> float | None:
        if len(self._first) < self.baseline_steps:
            return None
        return self.factor * sum(self._first) / len(self._first)

    @property
    def healthy(self) -> bool:
        return self._over == 0

    def check(self, step: int, loss: float) -> None:
        """After step ``step`` (1-based) with training loss ``loss``; raises :class:`Diverged`."""
        if not math.isfinite(loss):
            raise Diverged(f"training loss became non-finite ({loss}) at step {step}; "
                           f"lower --lr and resume from the last checkpoint")
        limit = self.limit
        if limit is None:
            self._first.append(loss)
            return
        self._over = self._over + 1 if loss > limit else 0
        if self._over >= self.patience:
            raise Diverged(f"training loss diverged: above {limit:.4g} ({self.factor:g}x the mean of the first "
                           f"{self.baseline_steps} steps) for {self.patience} steps in a row, {loss:.4g} at step "
                           f"{step}; lower --lr and resume from the last checkpoint")

    def check_val(self, step: int, val_loss: float) -> None:
        if not math.isfinite(val_loss):
            raise Diverged(f"validation loss became non-finite ({val_loss}) at step {step}; "
                           f"lower --lr and resume from the last checkpoint")

    def check_weights(self, step: int, finite: bool) -> None:
        if not finite:
            raise Diverged(f"LoRA weights became non-finite after step {step}; "
                           f"lower --lr and resume from the last checkpoint")


def serve_best(run, best_step: int | None, last_step: int, save_final) -> None:
    """Write ``run/adapter``, the adapter every consumer serves: the probe's best checkpoint's, or
    the final model's (``save_final(folder)``) when there is no probe or the last step is best."""
    tmp = staging_dir(run.adapter)
    best = run.checkpoints / f"step-{best_step:06d}" / "adapter" if best_step not in (None, last_step) else None
    if best is not None and best.is_dir():
        shutil.copytree(best, tmp, dirs_exist_ok=True)
    else:
        save_final(tmp)
    atomic_replace_dir(tmp, run.adapter)
