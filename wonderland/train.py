"""The training recipe, top to bottom: check inputs, set up the run, train, save.

``train()`` is what the CLI, the web app and the demo call. It never prints training progress
itself: progress goes out as events (``subscribers`` receive each record) and into
``metrics.jsonl``; ``log`` receives the few setup messages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import shutil
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable

from wonderland import __version__, preflight, quantize, replay
from wonderland.backends import TrainJob, get_backend, resolve_backend_name
from wonderland.backends.common import Diverged
from wonderland.config import TrainConfig
from wonderland.errors import UserError
from wonderland.events import (EventBus, Failed, Finished, MetricsWriter, Subscriber, SubscriberError, next_seq,
                               rewind_metrics)
from wonderland.models import resolve_model, weights_sha256
from wonderland.runs import SCHEMA_VERSION, RunDir, new_run_dir, now_iso, replaced_backup, resolve_run

ADAPTER_FORMATS = {"torch": "peft", "mlx": "mlx-lm"}


def load_data(data_dir: str | Path) -> tuple[list[dict], list[dict], dict]:
    """train/valid records and the dataset's stats.json (system prompt, character, book)."""
    from wonderland.data import load_chat_jsonl

    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise UserError(f"data folder not found: {data_dir}; build one with `wonderland data --out {data_dir}`")
    train_path = data_dir / "train.jsonl"
    if not train_path.exists():
        raise UserError(f"{train_path} not found; build the dataset with `wonderland data --out {data_dir}`")
    train_records = load_chat_jsonl(train_path)
    valid_path = data_dir / "valid.jsonl"
    valid_records = load_chat_jsonl(valid_path) if valid_path.exists() else []
    stats = {}
    if (data_dir / "stats.json").exists():
        try:
            stats = json.loads((data_dir / "stats.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{data_dir / 'stats.json'}: not valid JSON ({e.msg}, line {e.lineno}); rebuild the dataset") from None
    if not stats.get("system_prompt"):
        first = train_records[0]["messages"][0]
        stats["system_prompt"] = first["content"] if first["role"] == "system" else ""
    return train_records, valid_records, stats


def _hash_files(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()


def _versions() -> dict[str, str]:
    out = {"wonderland": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "mlx", "mlx-lm"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def train(
    config: TrainConfig,
    data_dir: str | Path | None = None,
    *,
    name: str | None = None,
    out: str | None = None,
    resume: str | None = None,
    overwrite: bool = False,
    subscribers: Iterable[Subscriber] = (),
    should_stop: Callable[[], bool] = lambda: False,
    log: Callable[[str], None] = print,
    allow_config_change: bool = False,
) -> RunDir:
    """Check everything before writing anything, set up the run folder, train, save the summary.

    A resume continues the run's last checkpoint; it refuses a config that changes what is learned
    (:data:`LEARNED`, the data, the backend) unless ``allow_config_change``."""
    run, info, resume_from = _resumed_run(resume, config) if resume else (None, None, None)
    if resume:
        data_dir = data_dir or info["data"]["path"]
    if data_dir is None:
        raise UserError("--data is required: a folder with train.jsonl/valid.jsonl from `wonderland data`")
    train_records, valid_records, stats = load_data(data_dir)
    if config.batch_size > len(train_records):
        raise UserError(f"--batch-size {config.batch_size} is larger than the dataset ({len(train_records)} training records); lower it")
    backend_name = resolve_backend_name(config.backend, log=log)
    config = _kl_for_backend(config, backend_name, log)
    backend = get_backend(backend_name, log=log)
    quantize.check(config.quantize, backend_name, config.device)
    model_path = resolve_model(config.model, log=log)
    data_dir = Path(data_dir).expanduser().resolve()
    if resume_from is not None and not allow_config_change:
        check_resume(resume_from, info, config, backend_name, _hash_files([data_dir / "train.jsonl", data_dir / "valid.jsonl"]))
    preflight.report(config, model_path, backend_name, log)  # will it fit? a warning, never a refusal
    if resume_from is None:
        character = stats.get("character") or "character"
        run = new_run_dir(name, out, character, overwrite)
        info = _new_run_info(run, config, backend_name, model_path, data_dir, stats, train_records, valid_records)
    lock = run.lock()  # held while this process trains: a crash frees it, and readers see "interrupted"
    try:
        _mark_running(run, info, config)
        mixed, replay_records, probe = replay.guard(config, model_path, info["model"]["sha256"], train_records,
                                                    valid_records, stats["system_prompt"],
                                                    lambda: _AnswerProgress(backend.load(model_path), log), log,
                                                    with_probe=backend_name == "torch")  # the one that probes
        session = _Session(run, config, subscribers, log, _start_seq(run, resume_from, config))
        job = TrainJob(config=config, model_path=model_path, train_records=mixed, valid_records=valid_records,
                       run=run, emit=session.bus.emit, should_stop=should_stop, resume_from=resume_from,
                       system_prompt=stats["system_prompt"], replay_records=replay_records, probe=probe)
        session.run_backend(backend, job, info)
    finally:
        lock.release()
    return run


REPLAY_PROGRESS_EVERY = 10  # replay answers made per progress line in the log


class _AnswerProgress:
    """The base model as replay.guard uses it to make replay answers (one ``stream`` per answer):
    the same model, with a line in ``log`` every :data:`REPLAY_PROGRESS_EVERY` answers, so the web
    log shows progress while they are made (replay's progress bar goes to stderr only)."""

    def __init__(self, chat, log: Callable[[str], None]) -> None:
        self._chat, self._log, self._done, self._t0 = chat, log, 0, time.perf_counter()

    def __getattr__(self, name: str):
        return getattr(self._chat, name)

    def stream(self, *args, **kwargs):
        yield from self._chat.stream(*args, **kwargs)
        self._done += 1
        if self._done % REPLAY_PROGRESS_EVERY == 0:
            each = (time.perf_counter() - self._t0) / self._done
            self._log(f"replay answers: {self._done} made ({each:.1f} s each)")


def _mark_running(run: RunDir, info: dict, config: TrainConfig) -> None:
    info.update(status="running", config=config.to_dict(), versions=_versions(), updated=now_iso())
    info.pop("error", None)  # an interrupted or failed run's reason is history now (metrics.jsonl keeps it)
    info.pop("traceback", None)
    run.write(info)


def _start_seq(run: RunDir, resume_from: Path | None, config: TrainConfig) -> int:
    """Where this process's seq numbers start; a resume first cuts metrics.jsonl back to its checkpoint."""
    if resume_from is None:
        return next_seq(run.metrics)
    return rewind_metrics(run.metrics, checkpoint_step(resume_from), config.iters)


def _kl_for_backend(config: TrainConfig, backend_name: str, log) -> TrainConfig:
    """The KL term runs on the torch backend only: the default weight is dropped (with a note) on
    another backend, a weight the user chose is an error there."""
    if not config.kl or backend_name == "torch":
        return config
    if config.kl == TrainConfig().kl:
        log(f"note: the {backend_name} backend has no KL term; training without it (--replay is the retention guard there)")
        return dataclasses.replace(config, kl=0.0)
    raise UserError(f"--kl needs the torch backend (this run would train with {backend_name}); "
                    "pass --backend torch, or use --replay alone")


def _resumed_run(resume: str, config: TrainConfig) -> tuple[RunDir, dict, Path]:
    """The run to continue, its run.json, and the checkpoint to continue from."""
    run = resolve_run(resume)
    info = run.read()
    if info.get("status") == "running":  # read() turns a run whose process is gone into "interrupted"
        raise UserError(f"run {run.name} is being trained right now; stop it before resuming it")
    if info.get("status") == "finished":
        _check_trains_on(run, info, config)
    resume_from = run.latest_checkpoint()
    if resume_from is None:
        raise UserError(f"run {run.name} has no checkpoint to resume from; start a new run instead")
    return run, info, resume_from


def _check_trains_on(run: RunDir, info: dict, config: TrainConfig) -> None:
    """A finished run resumes only to train more: a larger --iters, or (stopped early) --patience 0."""
    result, iters = info.get("result") or {}, info["config"]["iters"]
    if "stopped_early" in result:
        if config.patience and config.iters <= iters:
            raise UserError(f"run {run.name} stopped early at step {result['step']} of {iters} (--patience "
                            f"{info['config'].get('patience')}); pass --patience 0 to train its remaining steps")
    elif config.iters <= iters:
        raise UserError(f"run {run.name} already finished {iters} steps; pass a larger --iters to continue it")


# What a resume may not change without --allow-config-change: the settings that decide what is
# learned (torchtune checks the same on resume). lr, schedule, warmup, a larger --iters and the
# val/save/sample cadence may change.
LEARNED = ("seed", "model", "quantize", "rank", "alpha", "targets", "layers", "dropout", "batch_size", "max_seq_len")


def check_resume(ckpt: Path, info: dict, config: TrainConfig, backend_name: str, data_sha256: str) -> None:
    """Compare a resume's settings with the config its checkpoint saved; one-line UserError naming
    the first field that changes what is learned."""
    saved = _saved_config(ckpt, info)
    step = checkpoint_step(ckpt)
    if config.iters <= step:
        raise UserError(f"--iters {config.iters} does not go past the checkpoint's step {step}; pass a larger --iters")
    new = config.to_dict()
    changes = [(f"--{k.replace('_', '-')}", saved[k], new[k]) for k in LEARNED if k in saved and saved[k] != new[k]]
    if info.get("backend") and backend_name != info["backend"]:
        changes.append(("--backend", info["backend"], backend_name))
    if (info.get("data") or {}).get("sha256") not in (None, data_sha256):
        changes.append(("--data", info["data"].get("path"), "a different dataset (train/valid records changed)"))
    if changes:
        flag, old, value = changes[0]
        raise UserError(f"resuming {ckpt.parent.parent.name} would change {flag} ({old!r} -> {value!r}), which changes "
                        f"what the run learns; start a new run, or pass --allow-config-change to continue anyway")


def _saved_config(ckpt: Path, info: dict) -> dict:
    """The config a checkpoint was written with (run.json's for checkpoints that predate saving it)."""
    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    return state.get("config") or info.get("config") or {}


def checkpoint_step(ckpt: Path) -> int:
    """The step a finished checkpoint folder was written at (its trainer_state.json)."""
    return int(json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))["step"])


def _new_run_info(run: RunDir, config: TrainConfig, backend_name: str, model_path: Path, data_dir: Path,
                  stats: dict, train_records: list, valid_records: list) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "name": run.name,
        "status": "running",
        "created": now_iso(),
        "character": stats.get("character") or "character",
        "book": stats.get("book"),
        "system_prompt": stats["system_prompt"],
        "backend": backend_name,
        "adapter_format": ADAPTER_FORMATS.get(backend_name, backend_name),
        "model": {"id": config.model, "path": str(model_path), "sha256": weights_sha256(model_path)},
        "data": {"path": str(data_dir), "sha256": _hash_files([data_dir / "train.jsonl", data_dir / "valid.jsonl"]),
                 "train_records": len(train_records), "valid_records": len(valid_records)},
    }


class _Session:
    """One training process's event path (bus -> metrics.jsonl, the caller's subscribers) and the
    status it leaves in run.json."""

    def __init__(self, run: RunDir, config: TrainConfig, subscribers: Iterable[Subscriber], log, start_seq: int) -> None:
        self.run, self.config, self.log = run, config, log
        self.bus = EventBus(start_seq=start_seq)
        self.metrics = MetricsWriter(run.metrics)
        self.bus.subscribe(self.metrics, critical=True)  # no metrics.jsonl, no run: it fails
        self.last_step = 0  # for the Failed event: where training was when it broke
        self.bus.subscribe(self._track)
        for fn in subscribers:
            self.bus.subscribe(fn)

    def _track(self, record: dict) -> None:
        self.last_step = record["step"]

    def run_backend(self, backend, job: TrainJob, info: dict) -> None:
        t0 = time.time()
        try:
            result = backend.train(job)
        except BaseException as e:
            self.fail(_reason(e))
            raise
        self.finish(result, info, time.time() - t0)

    def fail(self, reason: str) -> None:
        run = self.run
        if replaced_backup(run.path).exists():
            self.log(f"the run this one replaced is kept in {replaced_backup(run.path)}")
        try:
            self.bus.emit(Failed(step=self.last_step, total_steps=self.config.iters, error=reason))
        except SubscriberError as e:  # the metrics writer broke on this very record: run.json still says why
            reason = f"{reason}; {e}"
        run.update(status="failed", error=reason, traceback=traceback.format_exc()[-4000:])
        self.metrics.close()

    def finish(self, result, info: dict, duration: float) -> None:
        run, config = self.run, self.config
        timings = info.get("timings", {})
        timings["train_s"] = round(timings.get("train_s", 0.0) + duration, 2)
        result_info = {"step": result.step, "loss": result.loss, "val_loss": result.val_loss, **result.extra}
        if result.status == "finished":
            early = "stopped_early" in result.extra
            if early:
                self.log(f"stopped early at step {result.step} of {config.iters}: the last {config.patience} probed "
                         f"checkpoints did not beat step {result.extra.get('best_step')}, the one served "
                         f"(--patience 0 trains every step)")
            self.bus.emit(Finished(step=result.step, total_steps=config.iters, loss=result.loss, val_loss=result.val_loss,
                                   elapsed_s=duration, adapter=str(run.adapter), best_step=result.extra.get("best_step"),
                                   stopped_early=early))
        run.update(status=result.status, timings=timings, result=result_info,
                   finished=now_iso() if result.status == "finished" else None)
        self.metrics.close()
        shutil.rmtree(replaced_backup(run.path), ignore_errors=True)  # from --overwrite: no longer needed


def _reason(e: BaseException) -> str:
    """The one line run.json and the Failed event give for why training ended."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    if isinstance(e, SubscriberError):
        return f"metrics could not be recorded: {e}"
    if isinstance(e, Diverged):
        return str(e)
    return f"{type(e).__name__}: {e}"
