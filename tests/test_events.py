"""The event bus: subscribers outside the lock, in seq order; a failing subscriber is dropped, except
the metrics writer, whose failure fails the run with the reason."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from tests.helpers import NO_GUARD, write_dataset
from wonderland.events import EventBus, MetricsWriter, Step, read_metrics


def step(n: int) -> Step:
    return Step(step=n, total_steps=100)


def test_a_subscriber_runs_outside_the_lock():
    """While one subscriber is busy, other threads can still subscribe and unsubscribe."""
    bus = EventBus()
    inside, release = threading.Event(), threading.Event()

    def slow(record):
        inside.set()
        release.wait(10)

    bus.subscribe(slow)
    emitter = threading.Thread(target=bus.emit, args=(step(1),))
    emitter.start()
    assert inside.wait(10)
    def subscribe_and_leave():
        bus.subscribe(lambda r: None)()  # subscribe returns its unsubscribe

    other = threading.Thread(target=subscribe_and_leave)
    other.start()
    other.join(10)
    busy = other.is_alive()
    release.set()
    emitter.join(10)
    assert not busy


@pytest.mark.timeout(30)  # under a bus that delivers inside its lock this deadlocks: fail, do not hang
def test_a_subscriber_may_emit_from_inside_its_call():
    bus = EventBus()
    seen = []

    def chained(record):
        seen.append(record["step"])
        if record["step"] == 1:
            bus.emit(step(2))

    bus.subscribe(chained)
    bus.emit(step(1))
    assert seen == [1, 2]


def test_every_subscriber_gets_every_record_in_seq_order_across_threads():
    bus = EventBus(start_seq=7)
    got: dict[str, list[int]] = {"a": [], "b": []}
    bus.subscribe(lambda r: got["a"].append(r["seq"]))
    bus.subscribe(lambda r: got["b"].append(r["seq"]))
    threads = [threading.Thread(target=lambda: [bus.emit(step(i)) for i in range(200)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert got["a"] == list(range(7, 7 + 800))
    assert got["b"] == got["a"]


def test_a_raising_subscriber_is_logged_once_and_dropped(caplog):
    bus = EventBus()
    calls, good = [], []

    def broken(record):
        calls.append(record["seq"])
        raise RuntimeError("boom")

    bus.subscribe(broken)
    bus.subscribe(lambda r: good.append(r["seq"]))
    with caplog.at_level(logging.ERROR, logger="wonderland.events"):
        for i in range(3):
            bus.emit(step(i))
    assert calls == [0]
    assert good == [0, 1, 2]
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1


def test_a_non_finite_number_is_not_written_to_metrics(tmp_path):
    from wonderland.events import MetricsWriteError

    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    writer({"event": "step", "seq": 0, "step": 1, "loss": 1.5})
    with pytest.raises(MetricsWriteError, match="metrics.jsonl"):
        writer({"event": "step", "seq": 1, "step": 2, "loss": float("nan")})
    writer.close()
    assert [r["seq"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0]
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()


def test_training_survives_a_broken_subscriber(tmp_path, tiny_model):
    from wonderland.config import TrainConfig
    from wonderland.train import train

    def broken(record):
        raise ValueError("a buggy progress display")

    config = TrainConfig(model=str(tiny_model), iters=3, batch_size=2, warmup=0, val_every=0, save_every=0, **NO_GUARD)
    run = train(config, write_dataset(tmp_path / "data"), out=str(tmp_path / "run"), subscribers=[broken],
                log=lambda m: None)
    assert run.read()["status"] == "finished"
    assert [r["step"] for r in read_metrics(run.metrics) if r["event"] == "step"] == [1, 2, 3]


def test_a_metrics_write_failure_fails_the_run_with_the_reason(tmp_path, tiny_model, monkeypatch):
    """metrics.jsonl stops being writable at step 2 (disk full): the run is failed, and says why."""
    from wonderland.config import TrainConfig
    from wonderland.train import train

    real = MetricsWriter.__call__

    def disk_full_at_step_2(self, record):
        if record["event"] == "step" and record["step"] == 2:
            raise OSError(28, "No space left on device")
        real(self, record)

    monkeypatch.setattr(MetricsWriter, "__call__", disk_full_at_step_2)
    config = TrainConfig(model=str(tiny_model), iters=5, batch_size=2, warmup=0, val_every=0, save_every=0, **NO_GUARD)
    out = tmp_path / "run"
    with pytest.raises(Exception, match="No space left on device"):
        train(config, write_dataset(tmp_path / "data"), out=str(out), log=lambda m: None)
    from wonderland.runs import RunDir

    info = RunDir(Path(out)).read()
    assert info["status"] == "failed"
    assert "metrics" in info["error"] and "No space left on device" in info["error"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["event"] == "step"] == [1]
