"""Typed training events and the one path they travel.

The training loop never prints. It calls ``emit(event)``; an :class:`EventBus` stamps each event
with a sequence number (``seq``: 0, 1, 2, ... across resumes, later the SSE ``id:``) and hands the
resulting dict to every subscriber: the metrics.jsonl writer, the CLI progress bar, the web app's
server-sent-event stream.

Units are in the key names (``tokens_per_second``, ``elapsed_s``, ``peak_memory_gb``).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

from wonderland.fileio import atomic_write_jsonl, iter_jsonl

Record = dict[str, Any]
Subscriber = Callable[[Record], None]
log = logging.getLogger(__name__)


@dataclass
class Event:
    kind: ClassVar[str] = "event"
    step: int
    total_steps: int

    def to_dict(self) -> Record:
        return {"event": self.kind, **asdict(self)}


@dataclass
class Started(Event):
    kind: ClassVar[str] = "started"
    run: str = ""
    backend: str = ""
    model: str = ""
    device: str = ""
    train_records: int = 0
    valid_records: int = 0
    trainable_params: int = 0
    speedups: list = field(default_factory=list)  # the torch fast path's levers that applied ([] on the plain path)


@dataclass
class Resumed(Event):
    kind: ClassVar[str] = "resumed"
    checkpoint: str = ""


@dataclass
class Step(Event):
    kind: ClassVar[str] = "step"
    loss: float = 0.0
    learning_rate: float = 0.0
    tokens: int = 0  # real (non-padding) tokens in this step's batch
    tokens_per_second: float = 0.0
    elapsed_s: float = 0.0
    eta_s: float = 0.0
    peak_memory_gb: float = 0.0


@dataclass
class Eval(Event):
    kind: ClassVar[str] = "eval"
    val_loss: float = 0.0
    val_time_s: float = 0.0
    persona_margin: float | None = None  # the checkpoint probe (wonderland/probe.py), when the run has one
    retention_drift: float | None = None
    probe_time_s: float = 0.0  # of val_time_s, the part the probe took


@dataclass
class Checkpoint(Event):
    kind: ClassVar[str] = "checkpoint"
    path: str = ""


@dataclass
class Sample(Event):
    kind: ClassVar[str] = "sample"
    prompt: str = ""
    reply: str = ""


@dataclass
class Stopped(Event):
    kind: ClassVar[str] = "stopped"
    checkpoint: str = ""
    elapsed_s: float = 0.0


@dataclass
class Finished(Event):
    kind: ClassVar[str] = "finished"
    loss: float | None = None
    val_loss: float | None = None
    elapsed_s: float = 0.0
    adapter: str = ""
    best_step: int | None = None  # the checkpoint served (the probe's best), when the run was probed
    stopped_early: bool = False  # the probe ended it before total_steps (--patience)


@dataclass
class Failed(Event):
    kind: ClassVar[str] = "failed"
    error: str = ""


@dataclass
class Rewound(Event):
    """metrics.jsonl was cut back to ``step`` (the checkpoint a resume continues from): ``dropped``
    records of later steps, written before a crash, are gone; this record keeps the seq count."""
    kind: ClassVar[str] = "rewound"
    dropped: int = 0


class SubscriberError(Exception):
    """A critical subscriber (the metrics writer) failed: the run cannot go on without its record."""


class MetricsWriteError(OSError):
    """metrics.jsonl cannot be written (disk full, file gone, a value JSON cannot hold)."""


class EventBus:
    """Stamps events with ``seq`` and ``time`` and fans them out to subscribers (thread-safe).

    Subscribers are called outside the bus lock, each receiving every record in ``seq`` order: a
    record is queued under the lock, and one thread at a time (the one that finds no delivery under
    way) delivers the queue in order. A subscriber that raises is logged once and dropped; the
    others and training go on. A ``critical`` subscriber (the metrics writer) that raises is dropped
    too, and ``emit`` then raises :class:`SubscriberError` so the run stops as failed.
    """

    def __init__(self, start_seq: int = 0) -> None:
        self._seq = start_seq
        self._subscribers: list[tuple[Subscriber, bool]] = []
        self._lock = threading.Lock()
        self._pending: deque[Record] = deque()
        self._delivering = False

    def subscribe(self, fn: Subscriber, critical: bool = False) -> Callable[[], None]:
        with self._lock:
            self._subscribers.append((fn, critical))
        return lambda: self.unsubscribe(fn)

    def unsubscribe(self, fn: Subscriber) -> None:
        with self._lock:
            self._subscribers = [(f, c) for f, c in self._subscribers if f != fn]

    def emit(self, event: Event) -> Record:
        with self._lock:
            record = {"event": event.kind, "seq": self._seq, "time": round(time.time(), 3)}
            record.update({k: v for k, v in event.to_dict().items() if k != "event"})
            self._seq += 1
            self._pending.append(record)
            if self._delivering:  # the delivering thread sends it, after the records before it
                return record
            self._delivering = True
        failure = self._drain()
        if failure is not None:
            raise SubscriberError(str(failure)) from failure
        return record

    def _drain(self) -> Exception | None:
        """Deliver queued records in order until none is left; the first critical failure, if any."""
        failure = None
        while True:
            with self._lock:
                if not self._pending:
                    self._delivering = False
                    return failure
                record = self._pending.popleft()
                subscribers = list(self._subscribers)
            for fn, critical in subscribers:
                try:
                    fn(record)
                except Exception as e:  # noqa: BLE001 - any subscriber bug: log it, drop it, go on
                    self._drop(fn, critical, record, e)
                    failure = failure or (e if critical else None)

    def _drop(self, fn: Subscriber, critical: bool, record: Record, error: Exception) -> None:
        log.error("event subscriber %r failed on %s record seq %s and was dropped%s", fn, record["event"],
                  record["seq"], " (critical: the run stops)" if critical else "", exc_info=error)
        self.unsubscribe(fn)


class MetricsWriter:
    """Appends one JSON line per event to ``metrics.jsonl`` (flushed, so tails see it at once)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def __call__(self, record: Record) -> None:
        try:
            line = json.dumps(record, allow_nan=False) + "\n"  # NaN/Infinity are not JSON: readers would choke
            self._file.write(line)
            self._file.flush()
        except (OSError, ValueError) as e:
            raise MetricsWriteError(f"cannot write {self.path}: {e}") from e

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | Path, after_seq: int = -1) -> list[Record]:
    """The records of a metrics.jsonl with ``seq > after_seq``; a torn last line is ignored."""
    return [rec for rec in iter_jsonl(path) if rec.get("seq", -1) > after_seq]


def next_seq(path: str | Path) -> int:
    """One past the highest seq in a metrics.jsonl (0 for none)."""
    return max((rec.get("seq", -1) for rec in iter_jsonl(path)), default=-1) + 1


def rewind_metrics(path: str | Path, step: int, total_steps: int) -> int:
    """Cut ``metrics.jsonl`` back to a resume from the checkpoint of ``step``: records of later
    steps (the tail a crashed process wrote after its last checkpoint; the resume replays those
    steps) and a torn last line are dropped, so the file holds one ``step`` record per step.
    Returns the seq to continue from: past every seq ever written, dropped ones included, so a
    client's Last-Event-ID never meets a reused number. When something was dropped, a
    :class:`Rewound` record with that seq is written in the same atomic replace (so the count
    survives another crash) and the next seq is one more."""
    path = Path(path)
    if not path.exists():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    records = list(iter_jsonl(path))
    seq = next_seq(path)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) == len(records) == len([ln for ln in lines if ln.strip()]):
        return seq  # nothing replayed, nothing torn
    mark = Rewound(step=step, total_steps=total_steps, dropped=len(records) - len(kept))
    kept.append({"event": mark.kind, "seq": seq, "time": round(time.time(), 3),
                 **{k: v for k, v in mark.to_dict().items() if k != "event"}})
    atomic_write_jsonl(path, kept)
    return seq + 1


def iter_events(records: list[Record], kind: str) -> Iterator[Record]:
    return (r for r in records if r["event"] == kind)


class StopFlag:
    """Set from anywhere (Ctrl-C handler, web Stop button); the training loop polls it each step."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str = "stop requested") -> None:
        self.reason = reason
        self._event.set()

    def __call__(self) -> bool:
        return self._event.is_set()

