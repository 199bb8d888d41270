"""Compare API: Base / Prompted / Trained (and Ollama) replies, streamed together over ONE response.

Browsers allow ~6 HTTP/1.1 connections per origin. One stream per column would take four of
them, a training progress stream a fifth, and a second tab would stall. So a compare request
runs every column in its own worker thread and multiplexes their pieces into a single
``text/event-stream`` response (``POST /api/compare``, read with ``fetch``): events ``token``,
``done``, ``error``, ``status``, each tagged with its ``column``, then one ``end``.

The local columns share one loaded model (:func:`wonderland.generate.load_run`, loaded lazily,
once per run, with a visible loading state). The model's own lock interleaves their decode steps
token by token and switches the adapter per step, so Base never runs with the adapter on.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from flask import Blueprint, current_app, jsonify, request

from wonderland.chat_format import with_system
from wonderland.config import GenerationConfig, form_name, merge_config
from wonderland.errors import UserError
from wonderland.generate import ARMS, LoadedRun, evict_run, load_run
from wonderland.web import sse
from wonderland.web.api_runs import summary
from wonderland.web.common import ApiError, json_body, run_dir
from wonderland.web.ollama import OllamaClient, OllamaError

bp = Blueprint("compare_api", __name__)

LOCAL_COLUMNS = tuple(a.name for a in ARMS)  # base, prompted, trained
COLUMNS = (*LOCAL_COLUMNS, "ollama")
SUGGESTED_PROMPTS = ("What time is it?", "Tell me a riddle.", "Who are you?", "Would you like some tea?",
                     "Why is a raven like a writing-desk?")
MAX_PROMPT_CHARS = 2_000
MAX_TURNS = 40  # messages of history per column: more than any small model's context holds anyway


class ModelCache:
    """Which runs' models (a run and one of its checkpoints; None: the best, what the run serves) are
    loaded or loading. The models themselves live in load_run's cache, keyed like this one by the
    run's last update: a resumed run is a new model to load."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (run, updated, checkpoint) -> loading | ready | error: <message>
        self.state: dict[tuple[str, str | None, int | None], str] = {}

    @staticmethod
    def _key(name: str, checkpoint: int | None) -> tuple[str, str | None, int | None]:
        return name, run_dir(name).read().get("updated"), checkpoint

    def get(self, name: str, checkpoint: int | None = None) -> LoadedRun:
        key = self._key(name, checkpoint)
        with self._lock:
            if self.state.get(key) != "ready":
                self.state[key] = "loading"
        try:
            # blocks while another thread loads the same run, then shares it
            loaded = load_run(run_dir(name), checkpoint=checkpoint)
        except Exception as e:
            with self._lock:
                self.state[key] = f"error: {e}"
            raise
        with self._lock:
            self.state[key] = "ready"
        return loaded

    def warm(self, name: str, checkpoint: int | None = None) -> str:
        """Start loading ``name`` in the background (the page calls this when a run is picked)."""
        key = self._key(name, checkpoint)
        with self._lock:
            current = self.state.get(key)
            if current in ("loading", "ready"):
                return current
            self.state[key] = "loading"
        threading.Thread(target=self._load_quietly, args=(name, checkpoint), daemon=True, name=f"load-{name}").start()
        return "loading"

    def _load_quietly(self, name: str, checkpoint: int | None) -> None:
        try:
            self.get(name, checkpoint)
        except (UserError, OSError):
            return  # get() recorded it in self.state for the page to show; anything else is a bug: it surfaces

    def forget(self, name: str) -> None:
        """The run was deleted: its states go, and its models leave the shared cache (memory freed)."""
        with self._lock:
            for key in [k for k in self.state if k[0] == name]:
                del self.state[key]
        evict_run(run_dir(name, must_exist=False).path)

    def status(self, name: str, checkpoint: int | None = None) -> str:
        key = self._key(name, checkpoint)
        with self._lock:
            return self.state.get(key, "unloaded")


def _ext():
    return current_app.extensions["wonderland"]


def _usable_run(name: str):
    run = run_dir(name)
    item = summary(run, run.read())
    if not item["has_adapter"]:
        raise ApiError(400, f"run {run.name} has no finished adapter (status: {item['status']}); finish or resume its training first")
    return run


def checkpoint_of(run, value: Any) -> int | None:
    """The ``checkpoint`` a request picked: None (absent, null or ""): the best, which the run
    serves; else a kept checkpoint's step, or a 400 with the one-line error naming the kept ones."""
    if value is None or value == "":
        return None
    whole = isinstance(value, int) and not isinstance(value, bool) or isinstance(value, str) and value.strip().isdigit()
    if not whole:
        raise ApiError(400, f"checkpoint must be a step number (got {value!r}); leave it out for the best")
    step = int(value)
    try:
        run.adapter_at(step)
    except UserError as e:
        raise ApiError(400, str(e)) from None
    return step


@bp.get("/api/compare/options")
def options():
    return jsonify(columns=[{"name": a.name, "description": a.description} for a in ARMS],
                   suggested_prompts=list(SUGGESTED_PROMPTS), generation=GenerationConfig().to_dict())


@bp.get("/api/ollama")
def ollama_status():
    return jsonify(OllamaClient(_ext().ollama_host).status())


@bp.get("/api/model")
def model_status():
    """``?run=NAME&checkpoint=STEP`` (checkpoint left out: the best, the run's adapter)."""
    name = request.args.get("run", "")
    checkpoint = checkpoint_of(run_dir(name), request.args.get("checkpoint"))
    return jsonify(run=name, checkpoint=checkpoint, state=_ext().models.status(name, checkpoint))


@bp.post("/api/model/load")
def model_load():
    body = json_body()
    name = str(body.get("run") or "")
    checkpoint = checkpoint_of(_usable_run(name), body.get("checkpoint"))
    return jsonify(run=name, checkpoint=checkpoint, state=_ext().models.warm(name, checkpoint)), 202


def _messages(history: Any, prompt: str, column: str) -> list[dict]:
    msgs = history.get(column, []) if isinstance(history, dict) else None
    if not isinstance(msgs, list) or len(msgs) > MAX_TURNS:
        raise ApiError(400, f"history.{column} must be a list of at most {MAX_TURNS} messages")
    out = []
    for m in msgs:
        if not (isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)):
            raise ApiError(400, f"history.{column}: each message needs role user|assistant and text content")
        out.append({"role": m["role"], "content": m["content"][:MAX_PROMPT_CHARS * 4]})
    return out + [{"role": "user", "content": prompt}]


def _parse(body: dict) -> tuple[str, list[str], dict[str, list[dict]], GenerationConfig]:
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ApiError(400, "prompt is required: the message to send to every column")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ApiError(400, f"prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    columns = body.get("columns", list(LOCAL_COLUMNS))
    if not isinstance(columns, list) or not columns or len(set(columns)) != len(columns) or any(c not in COLUMNS for c in columns):
        raise ApiError(400, f"columns must be a list of distinct names from {', '.join(COLUMNS)}")
    history = body.get("history")
    history = {} if history is None else history
    if not isinstance(history, dict):
        raise ApiError(400, "history must be an object: column -> list of messages")
    gen_raw = {} if body.get("gen") is None else body["gen"]
    if not isinstance(gen_raw, dict):
        raise ApiError(400, "gen must be an object of generation settings")
    try:
        gen = merge_config(GenerationConfig, gen_raw, source="gen", naming=form_name)
    except UserError as e:
        raise ApiError(400, str(e)) from None
    return prompt.strip(), columns, {c: _messages(history, prompt.strip(), c) for c in columns}, gen


class _Compare:
    """One compare request: a worker thread per column, their pieces multiplexed into one queue
    that :meth:`frames` turns into the response's SSE frames."""

    def __init__(self, ext, run, columns: list[str], conversations: dict[str, list[dict]], gen: GenerationConfig,
                 checkpoint: int | None = None) -> None:
        self.ext, self.run, self.columns, self.conversations, self.gen = ext, run, columns, conversations, gen
        self.checkpoint = checkpoint  # None: the best checkpoint, which the run serves
        self.system_prompt = run.read().get("system_prompt") or ""
        self.events: queue.Queue = queue.Queue()
        self.cancel = threading.Event()

    def pump(self, column: str, pieces) -> None:
        parts: list[str] = []
        try:
            for piece in pieces:
                if self.cancel.is_set():
                    break
                parts.append(piece)
                self.events.put(("token", {"column": column, "text": piece}))
            self.events.put(("done", {"column": column, "text": "".join(parts)}))
        except (UserError, OllamaError) as e:
            self.events.put(("error", {"column": column, "message": str(e)}))
        except Exception as e:  # noqa: BLE001 - a failing column is reported in it; the others go on
            self.events.put(("error", {"column": column, "message": f"{type(e).__name__}: {e}"}))
            raise  # and the thread's traceback shows the bug
        finally:
            close = getattr(pieces, "close", None)
            if close:
                close()

    def local(self, column: str) -> None:
        try:
            loaded = self.ext.models.get(self.run.name, self.checkpoint)
        except Exception as e:  # noqa: BLE001 - the column must end (the stream waits for it), bugs re-raised
            self.events.put(("error", {"column": column, "message": f"could not load the model: {e}"}))
            if not isinstance(e, (UserError, OSError)):
                raise
            return
        self.events.put(("status", {"column": column, "state": "ready"}))
        self.pump(column, loaded.stream(column, self.conversations[column], self.gen))

    def ollama(self, column: str) -> None:
        client = OllamaClient(self.ext.ollama_host)
        status = client.status()
        if not status["available"]:
            self.events.put(("error", {"column": column, "message": status["message"], "unavailable": True}))
            return
        self.events.put(("status", {"column": column, "state": "ready", "model": status["model"]}))
        messages = with_system(self.conversations[column], self.system_prompt)
        self.pump(column, client.stream_chat(status["model"], messages, self.gen))

    def frames(self):
        loading = self.ext.models.status(self.run.name, self.checkpoint) != "ready"
        yield sse.frame({"run": self.run.name, "checkpoint": self.checkpoint, "columns": self.columns,
                         "gen": self.gen.to_dict()}, event="start")
        for column in self.columns:
            state = "loading" if column in LOCAL_COLUMNS and loading else "waiting"
            yield sse.frame({"column": column, "state": state}, event="status")
        for column in self.columns:
            target = self.ollama if column == "ollama" else self.local
            threading.Thread(target=target, args=(column,), daemon=True, name=f"compare-{column}").start()
        remaining = len(self.columns)
        try:
            while remaining:
                try:
                    kind, payload = self.events.get(timeout=sse.KEEPALIVE_S)
                except queue.Empty:
                    yield sse.KEEPALIVE
                    continue
                if kind in ("done", "error"):
                    remaining -= 1
                yield sse.frame(payload, event=kind)
            yield sse.frame({"run": self.run.name}, event="end")
        finally:
            self.cancel.set()  # the browser went away (or we are done): workers stop at their next piece


@bp.post("/api/compare")
def compare():
    """Body: ``{"run", "prompt", "checkpoint"?: STEP, "columns"?, "history"?: {column: [messages]},
    "gen"?: {...}}`` (no checkpoint: the best, the run's adapter)."""
    body = json_body()
    _prompt, columns, conversations, gen = _parse(body)
    run = _usable_run(str(body.get("run") or ""))
    checkpoint = checkpoint_of(run, body.get("checkpoint"))
    return sse.response(_Compare(_ext(), run, columns, conversations, gen, checkpoint).frames())
