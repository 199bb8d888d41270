"""Export API: a run's exports as a background job with progress, and the verify table.

``POST /api/runs/<name>/export`` ``{"format": "all" | "peft" | ..., "gguf_type": "f16", "verify": true}``
starts :func:`wonderland.export.export_many` in a worker thread (one export at a time; refused
with 409 while a training runs, since both want the CPU and the run may be the one training).
``GET /api/runs/<name>/export`` answers the job's state, its log lines (the progress), the
verify report and the one-line error, or the last ``verify.json`` of the run when no job ran.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, current_app, jsonify

from wonderland.errors import UserError
from wonderland.web.common import ApiError, json_body, run_dir

bp = Blueprint("export_api", __name__)
FORMATS = ("all", "peft", "mlx", "merged", "gguf", "ollama")


@dataclass
class ExportJob:
    run: str
    format: str
    state: str = "running"  # running -> finished | failed
    log: list[str] = field(default_factory=list)
    report: dict | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)
    done: threading.Event = field(default_factory=threading.Event)

    def summary(self) -> dict[str, Any]:
        return {"run": self.run, "format": self.format, "state": self.state, "active": not self.done.is_set(),
                "log": list(self.log), "report": self.report, "error": self.error, "started": self.started}


_lock = threading.Lock()
_jobs: dict[int, ExportJob] = {}  # per app (id of its state object): the current or last job


def _state():
    return current_app.extensions["wonderland"]


def _work(job: ExportJob, options: dict[str, Any]) -> None:
    from wonderland.export import export_many

    try:
        _, job.report, _ = export_many(job.run, job.format, None, log=job.log.append, **options)
        job.state = "finished"
    except UserError as e:  # a verify below target still has its report in verify.json
        job.state, job.error = "failed", str(e)
        job.report = job.report or _last_report(job.run, job.format, options["gguf_type"])
    except Exception as e:  # noqa: BLE001 - shown as one line; the traceback goes to the server log
        job.state, job.error = "failed", f"{type(e).__name__}: {e}"
        logging.getLogger(__name__).exception("export of %s failed", job.run)
    finally:
        job.done.set()


def _last_report(name: str, fmt: str, gguf_type: str = "f16") -> dict | None:
    """The verify.json an export of ``fmt`` writes by default (``all``: <run>/exports/verify.json)."""
    from wonderland.export import default_out

    run = run_dir(name)
    path = run.path / "exports" / "verify.json" if fmt == "all" else default_out(run, fmt, gguf_type) / "verify.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _options(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    fmt = body.get("format", "all")
    if fmt not in FORMATS:
        raise ApiError(400, f"format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    gguf_type = body.get("gguf_type", "f16")
    if gguf_type not in ("f16", "q8_0", "f32"):
        raise ApiError(400, f"gguf_type must be one of f16, q8_0, f32 (got {gguf_type!r})")
    if not isinstance(body.get("verify", True), bool) or not isinstance(body.get("overwrite", False), bool):
        raise ApiError(400, "verify and overwrite must be true or false")
    return fmt, {"gguf_type": gguf_type, "verify": body.get("verify", True), "overwrite": body.get("overwrite", False)}


@bp.post("/api/runs/<name>/export")
def start_export(name: str):
    run = run_dir(name)
    fmt, options = _options(json_body())
    state = _state()
    training = state.jobs.job
    if training is not None and training.active:
        raise ApiError(409, f"a training run ({training.run}) is in progress: export when it has finished")
    with _lock:
        current = _jobs.get(id(state))
        if current is not None and not current.done.is_set():
            raise ApiError(409, f"an export of {current.run} is in progress: wait for it to finish")
        job = _jobs[id(state)] = ExportJob(run.name, fmt)
    app = current_app._get_current_object()

    def work():
        with app.app_context():
            _work(job, options)
    threading.Thread(target=work, name=f"export-{run.name}", daemon=True).start()
    return jsonify(job.summary()), 202


@bp.get("/api/runs/<name>/export")
def export_status(name: str):
    run = run_dir(name)
    job = _jobs.get(id(_state()))
    if job is not None and job.run == run.name:
        return jsonify(job.summary())
    return jsonify({"run": run.name, "state": "none", "active": False, "log": [], "error": None,
                    "report": _last_report(run.name, "all")})
