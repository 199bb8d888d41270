"""The torch training loop, in pieces, the way mlx-lm's ``tuner.train`` takes them.

:func:`train` runs optimizer steps from ``start_step`` to ``iters``. What a step computes and what
happens around it are arguments: ``loss(batch) -> (summed loss, target tokens, real tokens)``,
``iterate_batches(step) -> batch`` (0-based step), ``lr_at(step)``, and a
:class:`TrainingCallback` whose ``on_step`` runs after every optimizer step (events, validation,
samples, checkpoints, the divergence guard). A new loss term (e.g. a KL penalty) is a different
``loss``; per-validation probes or best-checkpoint selection are callbacks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from wonderland.backends.torch_peft import distributed


@dataclass
class StepReport:
    """What one optimizer step did; ``step`` counts steps done (1-based)."""

    step: int
    loss: float  # mean loss per target token of the global batch
    learning_rate: float
    tokens: int  # real (non-padding) tokens of the global batch
    seconds: float


class TrainingCallback:
    """Hooks into :func:`train`; subclass and override what you need."""

    done = False  # set by a callback to end training after this step, finished (early stopping)

    def on_step(self, report: StepReport) -> None:
        """After each optimizer step (raise to end training as failed; set ``done`` to finish now)."""


@dataclass
class LoopResult:
    status: str  # "finished" | "stopped"
    step: int


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(optimizer, params: list, grad_clip: float) -> None:
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train(*, optimizer, params: list, start_step: int, iters: int, loss: Callable[[Any], tuple],
          iterate_batches: Callable[[int], Any], lr_at: Callable[[int], float], grad_clip: float = 0.0,
          world=None, device=None, should_stop: Callable[[], bool] = lambda: False,
          training_callback: TrainingCallback | None = None) -> LoopResult:
    """Optimizer steps ``start_step + 1 .. iters``; a stop request (any rank) ends it between steps,
    and so does the callback's ``done`` (then the loop has finished, at an earlier step)."""
    world = world or distributed.world()
    callback = training_callback or TrainingCallback()
    step, upcoming = start_step, None
    while step < iters:
        if distributed.any_rank(should_stop(), world, device):
            return LoopResult("stopped", step)
        t0 = time.perf_counter()
        batch = upcoming if upcoming is not None else iterate_batches(step)
        lr = lr_at(step)
        set_lr(optimizer, lr)
        loss_sum, n, tokens = loss(batch)
        n, tokens = distributed.global_counts(n, tokens, world, device)  # all ranks together
        # mean NLL per assistant token of the global batch (x world size: DDP averages gradients)
        (loss_sum * (world.size / max(n, 1))).backward()
        optimizer_step(optimizer, params, grad_clip)
        # the next batch's host work while the GPU runs this step, then the step's one wait for it
        upcoming = iterate_batches(step + 1) if step + 1 < iters else None
        total = distributed.global_sum(loss_sum, world)
        step += 1
        callback.on_step(StepReport(step, total / max(n, 1), lr, tokens, time.perf_counter() - t0))
        if callback.done:  # decided from the probe, which every rank computes alike on the same weights
            break
    return LoopResult("finished", step)
