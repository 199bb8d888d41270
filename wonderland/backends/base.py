"""The backend interface: what wonderland needs from an ML framework, and nothing more.

A backend trains a LoRA adapter (:meth:`Backend.train`) and loads a base model with an optional
adapter for generation and scoring (:meth:`Backend.load`). Everything else (data, run folders,
events, CLI, web, evaluation) is framework-free and talks to backends only through this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

from wonderland.config import GenerationConfig, TrainConfig
from wonderland.events import Event
from wonderland.runs import RunDir


@dataclass
class TrainJob:
    """Everything one training run needs; built by :func:`wonderland.train.train`."""

    config: TrainConfig
    model_path: Path  # local HF folder of the base model
    train_records: list[dict]  # chat records {"messages": [...]}
    valid_records: list[dict]
    run: RunDir
    emit: Callable[[Event], object]  # the one event path: metrics.jsonl, progress bar, SSE
    should_stop: Callable[[], bool] = lambda: False  # polled once per step
    resume_from: Path | None = None  # a checkpoint folder to continue from exactly
    system_prompt: str = ""
    replay_records: list[dict] = field(default_factory=list)  # the retention guard's records (for --kl)
    probe: object | None = None  # a wonderland.probe.Probe, scored at every validation point


@dataclass
class TrainResult:
    status: str  # "finished" | "stopped"
    step: int
    loss: float | None = None
    val_loss: float | None = None
    extra: dict = field(default_factory=dict)  # backend-specific facts for run.json


class ChatModel(Protocol):
    """A loaded base model with an optional adapter that can be switched off per call."""

    has_adapter: bool
    model_path: Path

    def stream(self, messages: Sequence[dict], gen: GenerationConfig, adapter: bool = True) -> Iterator[str]:
        """Yield the reply text piece by piece. ``adapter=False`` runs the pure base model."""

    def loss(self, records: Sequence[dict], adapter: bool = True, max_seq_len: int = 512) -> tuple[float, int]:
        """Summed negative log-likelihood over the assistant tokens of ``records``, and their count."""


class Backend(Protocol):
    name: str

    def train(self, job: TrainJob) -> TrainResult:
        """Train until ``job.config.iters`` or ``job.should_stop()``; emit events; save the adapter to
        ``job.run.adapter`` when finished and a checkpoint when stopped."""

    def load(self, model_path: Path, adapter_path: Path | None = None, device: str = "auto",
             quantize: str = "none") -> ChatModel:
        """Load the base model (and adapter, if given) for generation and scoring; ``quantize`` is the
        run's ``--quantize`` (the base as its adapter was trained on)."""
