"""Runs API: history with config, final losses, duration and loss curves; delete; evaluation report."""

from __future__ import annotations

import json
import shutil
from typing import Any

from flask import Blueprint, abort, current_app, jsonify, request, send_from_directory

from wonderland.errors import UserError
from wonderland.events import read_metrics
from wonderland.runs import RunDir, list_runs
from wonderland.web.common import ApiError, run_dir

bp = Blueprint("runs_api", __name__)

MAX_CURVE_POINTS = 400  # per curve, enough for a chart; longer runs are strided


def training_seconds(records: list[dict]) -> float | None:
    """Training time over all of a run's sessions: each session's last step's ``elapsed_s``, summed
    (the Train page's stats and log count the same way: one elapsed time everywhere)."""
    total, session, seen = 0.0, 0.0, False
    for r in records:
        if r["event"] in ("started", "resumed"):
            total, session = total + session, 0.0
        elif r["event"] == "step" and isinstance(r.get("elapsed_s"), (int, float)):
            session, seen = r["elapsed_s"], True
    return round(total + session, 2) if seen else None


def curve(run: RunDir, records: list[dict] | None = None) -> dict[str, list]:
    """Train loss per step and val loss per evaluation, from metrics.jsonl (resumes included)."""
    records = read_metrics(run.metrics) if records is None else records
    steps = [(r["step"], r["loss"]) for r in records if r["event"] == "step"]
    evals = [(r["step"], r["val_loss"]) for r in records if r["event"] == "eval"]
    stride = max(1, len(steps) // MAX_CURVE_POINTS)
    steps = steps[::stride] + ([steps[-1]] if steps and (len(steps) - 1) % stride else [])
    return {"step": [s for s, _ in steps], "loss": [l for _, l in steps],
            "val_step": [s for s, _ in evals], "val_loss": [v for _, v in evals]}


SCORES = ("val_loss", "persona_margin", "retention_drift")


def checkpoint_scores(run: RunDir, info: dict[str, Any], records: list[dict]) -> dict[str, Any]:
    """The probe's scores per validation point (``checkpoints``), the best step by the rule of
    :func:`wonderland.probe.best` and the checkpoint steps kept on disk (``kept_steps``). A finished
    run's come from run.json's result; a running or stopped one's from its eval events so far."""
    from wonderland.probe import best

    result = info.get("result") or {}
    rows = result.get("checkpoints")
    if isinstance(rows, list):
        best_step = result.get("best_step")
    else:
        rows = [{"step": r["step"], **{k: r.get(k) for k in SCORES}} for r in records
                if r["event"] == "eval" and r.get("persona_margin") is not None]
        rows = list({r["step"]: r for r in rows}.values())  # a resumed run may score a step twice: the last wins
        top = best(rows)
        best_step = top["step"] if top else None
    return {"best_step": best_step, "checkpoints": rows, "kept_steps": run.kept_steps()}


def summary(run: RunDir, info: dict[str, Any]) -> dict[str, Any]:
    result = info.get("result") or {}
    return {
        "name": run.name, "status": info.get("status"), "character": info.get("character"),
        "created": info.get("created"), "updated": info.get("updated"), "backend": info.get("backend"),
        "model": (info.get("model") or {}).get("id"), "config": info.get("config", {}),
        "data": info.get("data", {}), "step": result.get("step"), "loss": result.get("loss"),
        "val_loss": result.get("val_loss"),
        "error": info.get("error"), "has_adapter": (run.adapter / "adapter_config.json").exists()
        or (run.adapter / "adapters.safetensors").exists(),
        "resumable": run.latest_checkpoint() is not None, "has_eval": (run.path / "eval").is_dir(),
    }


def read_or_unreadable(run: RunDir) -> dict[str, Any]:
    """run.json, or for one that cannot be read (corrupt, unreadable file) a stand-in
    with status ``unreadable`` and the reason: the run is listed with its error, as the CLI lists
    it, instead of vanishing from the page."""
    try:
        info = run.read()
    except (UserError, OSError, UnicodeDecodeError) as e:
        return {"status": "unreadable", "error": str(e)}
    return info


@bp.get("/api/runs")
def runs():
    out = []
    for run in list_runs():
        records = read_metrics(run.metrics)
        info = read_or_unreadable(run)
        item = summary(run, info)
        item["curve"], item["duration_s"] = curve(run, records), training_seconds(records)
        item.update(checkpoint_scores(run, info, records))
        item["curve"]["best_step"] = item["best_step"]  # the loss chart marks it
        out.append(item)
    return jsonify(runs=out)


@bp.get("/api/runs/<name>")
def run_info(name: str):
    run = run_dir(name)
    info, records = run.read(), read_metrics(run.metrics)
    item = {**summary(run, info), "duration_s": training_seconds(records), **checkpoint_scores(run, info, records)}
    return jsonify(summary=item, run=info, curve={**curve(run, records), "best_step": item["best_step"]})


@bp.delete("/api/runs/<name>")
def delete(name: str):
    """Delete a run folder; ``?confirm=<name>`` must repeat the name (a typed confirmation)."""
    run = run_dir(name)
    if request.args.get("confirm") != run.name:
        raise ApiError(400, f"to delete run {run.name}, repeat its name: DELETE /api/runs/{run.name}?confirm={run.name}")
    state = current_app.extensions["wonderland"]
    job = state.jobs.job
    if job is not None and job.active and job.run == run.name:
        raise ApiError(409, f"run {run.name} is training; stop it first")
    shutil.rmtree(run.path)
    state.models.forget(run.name)
    return jsonify(deleted=run.name)


@bp.get("/api/runs/<name>/eval")
def evaluation(name: str):
    """What `wonderland eval` left in RUN/eval/: eval.json's contents, the report and its plots."""
    folder = run_dir(name).path / "eval"
    if not folder.is_dir():
        return jsonify(exists=False, report=None, images=[], results=None)
    results = None
    if (folder / "eval.json").exists():
        try:
            results = json.loads((folder / "eval.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            results = None
    images = sorted(p.name for p in folder.glob("*.png"))
    report = f"/runs/{name}/eval/report.html" if (folder / "report.html").exists() else None
    return jsonify(exists=True, report=report, images=[f"/runs/{name}/eval/{i}" for i in images], results=results)


@bp.get("/runs/<name>/eval/<path:filename>")
def eval_file(name: str, filename: str):
    """The report and its images (send_from_directory refuses paths that leave the folder)."""
    folder = run_dir(name).path / "eval"
    if not filename.endswith((".html", ".png", ".json")):
        abort(404)
    response = send_from_directory(folder, filename)
    if filename.endswith(".html"):
        # No scripts, forms or plugins in the report: it quotes model output. (The page's frame adds
        # sandbox="allow-same-origin": still no scripts, but its relative plot images load.)
        response.headers["Content-Security-Policy"] = ("default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
                                                       "form-action 'none'; base-uri 'none'; frame-ancestors 'self'")
    return response
