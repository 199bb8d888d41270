"""Run directories: where a training run keeps its adapter, config, metrics and checkpoints.

Layout of ``$WONDERLAND_HOME/runs/<name>/`` (or ``--out DIR``)::

    run.json        schema version, status, resolved config, model, data, versions, timings
    metrics.jsonl   one JSON object per training event (see wonderland.events)
    adapter/        the final adapter in the backend's native format (PEFT or mlx-lm)
    checkpoints/step-NNNNNN/   what an exact resume needs
    .lock           flock held by the process that trains the run (see :meth:`RunDir.lock`)

A ``running`` run whose lock is free has lost its training process (killed, crashed, power cut): it
reads as ``interrupted`` (and is written so at that read), and resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from wonderland.errors import UserError
from wonderland.fileio import atomic_write_json
from wonderland.names import check_name

SCHEMA_VERSION = 1
STATUSES = ("running", "stopped", "finished", "failed", "interrupted")
LOCK_WAIT_S = 2.0  # a reader holds a free run's lock for the moment it takes to mark it interrupted
INTERRUPTED = "the training process ended without saying why (killed or crashed); resume from the last checkpoint"


def home() -> Path:
    """``$WONDERLAND_HOME`` (default ``~/.cache/wonderland``): models, books, data and runs."""
    return Path(os.environ.get("WONDERLAND_HOME") or Path.home() / ".cache" / "wonderland").expanduser()


def runs_root() -> Path:
    return home() / "runs"


@dataclass
class RunDir:
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def exists(self) -> bool:
        return self.run_json.exists()

    @property
    def lock_path(self) -> Path:
        return self.path / ".lock"

    def lock(self) -> "RunLock":
        """Take the run for a training process: an exclusive ``flock`` on ``RUN/.lock`` until
        :meth:`RunLock.release` (the OS drops it when the process dies, however it dies)."""
        lock = FileLock(self.lock_path)
        try:
            lock.acquire(timeout=LOCK_WAIT_S)
        except Timeout:
            raise UserError(f"run {self.name} is being trained by another process; stop that one first") from None
        return RunLock(self, lock)

    def is_trained_now(self) -> bool:
        """Whether a training process holds the run's lock."""
        lock = FileLock(self.lock_path)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return True
        lock.release()
        return False

    def read(self) -> dict[str, Any]:
        """run.json; a ``running`` run whose training process is gone comes back (and is written)
        as ``interrupted``."""
        info = self._read_json()
        if info.get("status") == "running":
            info = self._mark_if_interrupted(info)
        return info

    def _mark_if_interrupted(self, info: dict[str, Any]) -> dict[str, Any]:
        lock = FileLock(self.lock_path)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return info  # a training process holds it: really running
        except OSError:
            return info  # a read-only run folder: cannot tell, and nothing could be written anyway
        try:
            info = self._read_json()  # again, under the lock: it may have finished meanwhile
            if info.get("status") == "running":
                info.update(status="interrupted", error=INTERRUPTED, updated=now_iso())
                self.write(info)
        finally:
            lock.release()
        return info

    def _read_json(self) -> dict[str, Any]:
        try:
            info = json.loads(self.run_json.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{self.path} is not a run (no run.json); list runs with `wonderland runs`") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{self.run_json}: corrupt run.json ({e.msg} at line {e.lineno}); "
                            f"fix the file or delete the run folder") from None
        except UnicodeDecodeError:
            raise UserError(f"{self.run_json}: corrupt run.json (not UTF-8 text); fix the file or delete the run folder") from None
        if not isinstance(info, dict):
            raise UserError(f"{self.run_json}: corrupt run.json (a JSON {_json_kind(info)}, not an object); "
                            f"fix the file or delete the run folder")
        return info

    def write(self, info: dict[str, Any]) -> None:
        atomic_write_json(self.run_json, info)

    def update(self, **changes: Any) -> dict[str, Any]:
        info = self.read()
        info.update(changes)
        info["updated"] = now_iso()
        self.write(info)
        return info

    def latest_checkpoint(self) -> Path | None:
        if not self.checkpoints.is_dir():
            return None
        done = sorted(p for p in self.checkpoints.glob("step-*") if (p / "trainer_state.json").exists())
        return done[-1] if done else None

    def kept_steps(self) -> list[int]:
        """Steps of the finished checkpoints on disk (the probe's best and the newest are kept)."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(int(p.name[5:]) for p in self.checkpoints.glob("step-*") if (p / "trainer_state.json").exists())

    def adapter_at(self, step: int | None = None) -> Path:
        """The adapter to serve: ``adapter/`` (the best checkpoint's) or checkpoint ``step``'s."""
        if step is None:
            return self.adapter
        path = self.checkpoints / f"step-{step:06d}" / "adapter"
        if not path.is_dir():
            kept = ", ".join(map(str, self.kept_steps())) or "none"
            raise UserError(f"run {self.name} has no checkpoint at step {step} (kept: {kept}); "
                            "pick one of those, or leave --checkpoint out for the best")
        return path


class RunLock:
    """A training process's hold on its run (from :meth:`RunDir.lock`)."""

    def __init__(self, run: RunDir, lock: FileLock) -> None:
        self.run, self._lock = run, lock

    def release(self) -> None:
        """Let go of the run. The lock file stays (a process waiting on it shares its inode)."""
        self._lock.release()


def _json_kind(value: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def default_run_name(character: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() else "-" for c in character.lower()).strip("-") or "run"
    return f"{safe}-{stamp}"


def resolve_run(name_or_path: str | os.PathLike) -> RunDir:
    """A run by name (under runs_root) or by path; a clear error when there is none."""
    text = str(name_or_path)
    candidates = [Path(text).expanduser()]
    if "/" not in text and os.sep not in text:
        candidates.insert(0, runs_root() / check_name(text, "run"))
    for p in candidates:
        if (p / "run.json").exists():
            return RunDir(p.resolve())
    names = [r.name for r in list_runs()][:5]
    hint = f"; known runs: {', '.join(names)}" if names else "; train one with `wonderland train`"
    raise UserError(f"no run named or found at {text!r}{hint}")


def new_run_dir(name: str | None, out: str | None, character: str, overwrite: bool) -> RunDir:
    """The folder for a new run; refuses to touch an existing run unless ``overwrite``."""
    if name and out:
        raise UserError("give either --name or --out, not both")
    path = Path(out).expanduser() if out else runs_root() / check_name(name or default_run_name(character), "run")
    run = RunDir(path.resolve())
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise UserError(f"{path} already holds a run; pick another --name, resume it with --resume, or pass --overwrite")
        if not run.exists():
            raise UserError(f"{path} is not empty and is not a run; refusing to overwrite it, choose another --out")
        if run.is_trained_now():
            raise UserError(f"run {run.name} is being trained by another process; stop it before overwriting it")
        # Keep the old run aside until the new one has trained: a failed retrain loses nothing.
        backup = replaced_backup(path)
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(path, backup)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write the run to {path}: {e.strerror}; choose a writable --out") from None
    return run


def replaced_backup(path: Path) -> Path:
    """Where ``--overwrite`` keeps the run it replaces until the new run has finished or stopped."""
    return Path(path).with_name(f".{Path(path).name}.replaced")


def list_runs(root: Path | None = None) -> list[RunDir]:
    """Runs under ``root`` (default runs_root()), newest first."""
    root = root or runs_root()
    if not root.is_dir():
        return []
    # hidden folders are staging dirs and runs kept aside by --overwrite
    runs = [RunDir(p) for p in root.iterdir() if not p.name.startswith(".") and (p / "run.json").exists()]
    return sorted(runs, key=lambda r: r.run_json.stat().st_mtime, reverse=True)
