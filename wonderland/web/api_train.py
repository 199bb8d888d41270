"""Training API: the form's schema, start / resume / stop, status, and the live event stream."""

from __future__ import annotations

import json
from dataclasses import MISSING, fields
from typing import Any

from flask import Blueprint, current_app, jsonify, request

from wonderland.config import PRESET_ALIASES, PRESETS, GenerationConfig, TrainConfig, form_name, merge_config
from wonderland.errors import UserError
from wonderland.runs import default_run_name
from wonderland.web import sse
from wonderland.web.common import ApiError, json_body, run_dir, valid_name
from wonderland.web.datasets import dataset_dir
from wonderland.web.jobs import TrainingManager

bp = Blueprint("train_api", __name__)

# Form sections, in page order; fields not listed land in "advanced".
FORM_GROUPS = {
    "model": ("model", "backend", "device", "dtype", "quantize", "grad_checkpoint", "threads"),
    "schedule": ("iters", "batch_size", "lr", "schedule", "warmup", "weight_decay", "grad_clip", "max_seq_len", "seed"),
    "lora": ("rank", "alpha", "dropout", "layers", "targets"),
    "monitoring": ("val_every", "patience", "val_batches", "save_every", "sample_every", "sample_prompt"),
}


def manager() -> TrainingManager:
    return current_app.extensions["wonderland"].jobs


def describe(cls: type) -> list[dict[str, Any]]:
    """The fields of a config dataclass as the page needs them to build a form."""
    group_of = {name: group for group, names in FORM_GROUPS.items() for name in names}
    out = []
    for f in fields(cls):
        item = {"name": f.name, "type": str(f.type), "default": None if f.default is MISSING else f.default,
                "help": f.metadata.get("help", ""), "group": group_of.get(f.name, "advanced")}
        if "choices" in f.metadata:
            item["choices"] = list(f.metadata["choices"])
        if "bounds" in f.metadata:  # (low, high[, "open-low" | "open-high" | "open-both"]): the server checks
            item["bounds"] = list(f.metadata["bounds"])
        item["label"] = f.metadata.get("label", f.name)
        out.append(item)
    return out


@bp.get("/api/config")
def config_schema():
    return jsonify(train=describe(TrainConfig), generation=describe(GenerationConfig), presets=PRESETS,
                   default_preset="default", preset_aliases=PRESET_ALIASES)


def _overrides(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ApiError(400, "config must be an object of option: value")
    # Empty form inputs mean "use the preset/default", not "set to empty".
    return {k: v for k, v in raw.items() if not (isinstance(v, str) and v.strip() == "")}


def _config(*layers: dict[str, Any]) -> TrainConfig:
    try:
        return merge_config(TrainConfig, *layers, source="", naming=form_name)
    except UserError as e:
        raise ApiError(400, str(e)) from None


@bp.post("/api/train/estimate")
def estimate():
    """The form's pre-flight memory estimate: ``{"preset"?, "config"?}`` -> ``{"estimate": {...}}``, or
    ``{"estimate": null, "reason": ...}`` when there is none (model not here yet, a setting the backend refuses)."""
    from wonderland import preflight, quantize
    from wonderland.backends import resolve_backend_name

    body = json_body()
    name = PRESET_ALIASES.get(body.get("preset") or "", body.get("preset") or "")
    config = _config(PRESETS.get(name, {}), _overrides(body.get("config")))
    model_path = preflight.cached_model(config.model)
    if model_path is None:
        return jsonify(estimate=None, reason=f"no estimate until {config.model} is on this machine (the first run fetches it)")
    try:
        backend_name = resolve_backend_name(config.backend, log=lambda m: None)
        quantize.check(config.quantize, backend_name, config.device)
        est = preflight.estimate(config, model_path, backend_name)
    except UserError as e:
        return jsonify(estimate=None, reason=str(e))
    except (OSError, KeyError, ValueError, TypeError) as e:
        return jsonify(estimate=None, reason=f"no estimate for this model ({type(e).__name__}: {e})")
    return jsonify(estimate={**est.to_dict(), "warning": est.warning(naming=lambda f: form_name(f, TrainConfig))})


@bp.post("/api/train")
def start():
    """Start a run: ``{"dataset", "preset"?, "config"?, "name"?}``, or resume one: ``{"resume", "iters"?}``."""
    body = json_body()
    jobs = manager()
    if body.get("resume"):
        run = run_dir(str(body["resume"]))
        info = run.read()
        if jobs.job is not None and jobs.job.active and jobs.job.run == run.name:
            raise ApiError(409, f"run {run.name} is already training")
        extra = {"iters": body["iters"]} if body.get("iters") not in (None, "") else {}
        config = _config(info.get("config", {}), extra)
        if info.get("status") == "finished" and config.iters <= info.get("config", {}).get("iters", 0):
            raise ApiError(400, f"run {run.name} already finished {config.iters} steps; give a larger iters to continue it")
        if run.latest_checkpoint() is None:
            raise ApiError(400, f"run {run.name} has no checkpoint to resume from; start a new run instead")
        job = jobs.start(config, None, run.name, resume=True)
        return jsonify(run=job.run, state=job.state, resume=True, config=job.config), 202

    name = PRESET_ALIASES.get(body.get("preset") or "", body.get("preset") or "")
    if name and name not in PRESETS:
        raise ApiError(400, f"unknown preset {body['preset']!r}; choose one of {', '.join(PRESETS)}")
    config = _config(PRESETS.get(name, {}), _overrides(body.get("config")))
    data = dataset_dir(str(body.get("dataset") or ""))
    if not (data / "train.jsonl").exists():
        raise ApiError(400, f"dataset {data.name!r} has no train.jsonl; build it on the Dataset page first")
    if body.get("name"):
        name = valid_name(str(body["name"]))
    else:
        stats = _read_json(data / "stats.json")
        name = default_run_name(str(stats.get("character") or data.name))
    if run_dir(name, must_exist=False).path.exists():
        raise ApiError(409, f"a run named {name!r} already exists; pick another name, or resume or delete it on the Runs page")
    job = jobs.start(config, data, name)
    return jsonify(run=job.run, state=job.state, resume=False, config=job.config), 202


def _read_json(path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


@bp.post("/api/train/stop")
def stop():
    job = manager().stop()
    return jsonify(job.summary()), 202


@bp.get("/api/train/status")
def status():
    jobs = manager()
    if jobs.job is None:
        return jsonify(state="idle", active=False, run=None)
    return jsonify({**jobs.job.summary(), "listeners": jobs.listener_count})


@bp.get("/api/runs/<name>/events")
def events(name: str):
    """SSE: the run's events (``id:`` = seq), replayed after ``Last-Event-ID`` / ``?after=``, then live."""
    name = valid_name(name)
    jobs = manager()
    # the current (or just ended) job may have no run folder yet: a start that failed early
    if jobs.job is None or jobs.job.run != name:
        run_dir(name)  # 404 for a run that neither exists nor is the latest job
    after = sse.last_event_id(request.headers, request.args)
    return sse.response(jobs.stream(name, after))
