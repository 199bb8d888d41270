"""One training job at a time, in a worker thread, its events fanned out to any number of listeners.

The worker calls :func:`wonderland.train.train` with this manager as a subscriber, so the web
app sees exactly the records the CLI sees and that metrics.jsonl stores (the one event path).
Each SSE connection owns a :class:`queue.Queue`; delivery is a non-blocking ``put`` per listener,
so a slow or gone browser can never stall the training loop.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from wonderland.config import TrainConfig
from wonderland.errors import UserError
from wonderland.events import StopFlag, read_metrics
from wonderland.runs import RunDir, runs_root
from wonderland.web import sse
from wonderland.web.common import ApiError

END = "end"
LOG_LINES = 500  # setup/log lines kept for late listeners


@dataclass
class Job:
    run: str
    config: dict[str, Any]
    resume: bool
    stop: StopFlag = field(default_factory=StopFlag)
    state: str = "starting"  # starting -> running -> finished | stopped | failed
    error: str | None = None
    started: float = field(default_factory=time.time)
    ended: float | None = None
    last_step: dict | None = None
    last_eval: dict | None = None
    log: deque = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def active(self) -> bool:
        return not self.done.is_set()

    def summary(self) -> dict[str, Any]:
        return {"run": self.run, "state": self.state, "active": self.active, "resume": self.resume,
                "error": self.error, "started": self.started, "ended": self.ended, "config": self.config,
                "last_step": self.last_step, "last_eval": self.last_eval, "stop_requested": self.stop()}


class TrainingManager:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.job: Job | None = None  # the current job, or the last one (kept for its final state)
        self._listeners: set[queue.Queue] = set()

    # --- starting and stopping

    def start(self, config: TrainConfig, data_dir: Path | None, name: str, resume: bool = False) -> Job:
        """Start training in a worker thread; a 409 while another job is running."""
        with self._lock:
            if self.job is not None and self.job.active:
                raise ApiError(409, f"a training run ({self.job.run}) is already in progress: "
                                    "stop it or wait for it to finish before starting another")
            job = Job(run=name, config=config.to_dict(), resume=resume)
            self.job = job
            self._listeners = set()
        thread = threading.Thread(target=self._work, args=(job, config, data_dir), name=f"train-{name}", daemon=True)
        thread.start()
        return job

    def stop(self) -> Job:
        with self._lock:
            job = self.job
        if job is None or not job.active:
            raise ApiError(409, "no training run is in progress")
        job.stop.set("stopped from the web app")
        return job

    def _work(self, job: Job, config: TrainConfig, data_dir: Path | None) -> None:
        from wonderland.train import train  # imported here: it pulls in the backend registry only

        try:
            run = train(config, data_dir, name=None if job.resume else job.run, resume=job.run if job.resume else None,
                        subscribers=[lambda rec: self._deliver(job, rec)], should_stop=job.stop, log=lambda m: self._log(job, m))
            job.state = run.read().get("status", "finished")
        except UserError as e:
            job.state, job.error = "failed", str(e)
            self._log(job, f"error: {e}")
        except Exception as e:  # the run folder records the traceback; the page shows the one line
            job.state, job.error = "failed", f"{type(e).__name__}: {e}"
            self._log(job, f"error: {job.error}")
        finally:
            job.ended = time.time()
            with self._lock:
                job.done.set()
                for q in self._listeners:
                    q.put((END, job.summary()))
                self._listeners = set()

    # --- the event fan-out

    def _deliver(self, job: Job, record: dict) -> None:
        if record["event"] == "step":
            job.state, job.last_step = "running", record
        elif record["event"] == "eval":
            job.last_eval = record
        elif record["event"] in ("started", "resumed"):
            job.state = "running"
        with self._lock:
            for q in self._listeners:
                q.put(("event", record))

    def _log(self, job: Job, message: str) -> None:
        line = {"time": round(time.time(), 3), "message": message}
        job.log.append(line)
        with self._lock:
            for q in self._listeners:
                q.put(("log", line))

    def _subscribe(self, name: str) -> tuple[queue.Queue | None, Job | None]:
        """A live queue for run ``name`` if it is the running job (None otherwise)."""
        with self._lock:
            job = self.job
            if job is None or job.run != name or not job.active:
                return None, None
            q: queue.Queue = queue.Queue()
            self._listeners.add(q)
            return q, job

    def _unsubscribe(self, q: queue.Queue | None) -> None:
        if q is not None:
            with self._lock:
                self._listeners.discard(q)

    @property
    def listener_count(self) -> int:
        with self._lock:
            return len(self._listeners)

    def stream(self, name: str, after: int) -> Iterator[str]:
        """SSE for run ``name``: every stored event with seq > ``after`` from metrics.jsonl, then the
        live ones, then an ``end`` event. Subscribing before reading the file (and skipping seqs
        already sent) makes the hand-over gap-free: metrics.jsonl is written before fan-out."""
        q, job = self._subscribe(name)
        if job is None and self.job is not None and self.job.run == name:
            job = self.job  # it has ended (maybe before its run folder existed): replay its log too
        try:
            sent = after
            if job is not None and after < 0:  # a reconnecting client already has the log
                for line in list(job.log):
                    yield sse.frame(line, event="log")
            for rec in read_metrics(RunDir(runs_root() / name).metrics, after):
                yield sse.frame(rec, id=rec["seq"])
                sent = rec["seq"]
            if q is None:
                yield sse.frame(self._final(name), event=END)
                return
            while True:
                try:
                    kind, payload = q.get(timeout=sse.KEEPALIVE_S)
                except queue.Empty:
                    yield sse.KEEPALIVE
                    continue
                if kind == "event":
                    if payload["seq"] > sent:
                        yield sse.frame(payload, id=payload["seq"])
                        sent = payload["seq"]
                elif kind == "log":
                    yield sse.frame(payload, event="log")
                else:
                    yield sse.frame(payload, event=END)
                    return
        finally:
            self._unsubscribe(q)

    def _final(self, name: str) -> dict[str, Any]:
        job = self.job
        if job is not None and job.run == name:
            return job.summary()
        run = RunDir(runs_root() / name)
        info = run.read() if run.exists() else {}
        return {"run": name, "state": info.get("status", "unknown"), "active": False, "error": info.get("error")}
