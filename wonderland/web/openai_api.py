"""An OpenAI-compatible API, so any OpenAI client can talk to a trained character.

``GET /v1/models`` lists the base model(s) and every run with a finished adapter;
``POST /v1/chat/completions`` answers, streamed (server-sent events: ``data: {chunk}`` lines, then
``data: [DONE]``) or not. The ``model`` field picks the arm:

* a run name: the trained arm (adapter on), with the run's system prompt unless the request
  brings its own system message;
* a base model id (e.g. ``smollm2-135m-instruct``): the base arm (adapter off), neutral system
  prompt unless the request brings one. Base ids win over a run of the same name.

``temperature``, ``top_p``, ``max_tokens`` (or ``max_completion_tokens``) and ``seed`` map onto
:class:`wonderland.config.GenerationConfig`; unset fields keep its defaults (temperature 0.7, not
OpenAI's 1.0: they suit the small models). ``stop`` (a string or up to 4) ends the reply before
the first match. Errors are OpenAI-style ``{"error": {"message", "type", "param", "code"}}``.

Usage: ``OpenAI(base_url="http://127.0.0.1:7860/v1", api_key="unused")``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from wonderland.chat_format import NEUTRAL_SYSTEM_PROMPT, prompt_ids, with_system
from wonderland.config import DEFAULT_MODEL, GenerationConfig, field_value
from wonderland.errors import UserError
from wonderland.fileio import strict_dumps
from wonderland.names import check_name

bp = Blueprint("openai_api", __name__, url_prefix="/v1")

ROLES = ("system", "developer", "user", "assistant")  # "developer" is OpenAI's newer name for system
MAX_STOP = 4  # as OpenAI


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


@bp.errorhandler(APIError)
def _api_error(e: APIError):
    return jsonify({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}), e.status


@bp.errorhandler(UserError)
def _user_error(e: UserError):
    return _api_error(APIError(400, str(e)))


@bp.errorhandler(HTTPException)
def http_error(e: HTTPException):
    """Any HTTP error under /v1 (unknown route, wrong method, body too large, a crash) as an OpenAI
    error object; the web app's handlers send /v1 paths here too."""
    kind = "server_error" if (e.code or 500) >= 500 else "invalid_request_error"
    code = (e.name or "error").lower().replace(" ", "_")
    return _api_error(APIError(e.code or 500, f"{e.name}: {e.description}", kind, code=code))


# ----------------------------------------------------------------------------- models
def _finished_runs() -> list:
    from wonderland.runs import list_runs

    out = []
    for run in list_runs():
        try:
            info = run.read()
            check_name(run.name)  # a folder named before names were checked (runs/nlrun\n): not a model id
        except UserError:  # a corrupt run.json must not take the listing down
            continue
        if info.get("status") == "finished" and (run.adapter / "adapter_config.json").exists():
            out.append((run, info))
    return out


def _base_ids(runs: list) -> list[str]:
    ids = [DEFAULT_MODEL]
    for _, info in runs:
        mid = (info.get("model") or {}).get("id")
        if mid and mid not in ids:
            ids.append(mid)
    return ids


def _model_objects() -> list[dict]:
    runs = _finished_runs()
    data = [{"id": mid, "object": "model", "created": 0, "owned_by": "wonderland", "arm": "base"}
            for mid in _base_ids(runs)]
    for run, info in runs:
        data.append({"id": run.name, "object": "model", "created": int(run.run_json.stat().st_mtime),
                     "owned_by": "wonderland", "arm": "trained", "character": info.get("character"),
                     "base_model": (info.get("model") or {}).get("id")})
    return data


@bp.get("/models")
def list_models():
    return jsonify({"object": "list", "data": _model_objects()})


@bp.get("/models/<path:model_id>")
def retrieve_model(model_id: str):
    """One model object (the OpenAI client's ``models.retrieve``); an OpenAI 404 for an unknown id."""
    data = _model_objects()
    for item in data:
        if item["id"] == model_id:
            return jsonify(item)
    known = ", ".join(m["id"] for m in data)
    raise APIError(404, f"The model {model_id!r} does not exist; available: {known}", param="model", code="model_not_found")


@dataclass
class Target:
    """What a ``model`` name resolves to: a loaded model, which arm, the default system prompt."""

    model: Any  # wonderland.backends.ChatModel
    adapter: bool
    system_prompt: str


def _resolve(name: str) -> Target:
    """A run name: its adapter on the shared base; a base id: that base itself (the one copy the web
    app's Compare page and every run on it use too, see wonderland.generate.load_base)."""
    from wonderland.generate import load_run

    runs = _finished_runs()
    if name in _base_ids(runs):
        return Target(_load_base(name, runs), False, NEUTRAL_SYSTEM_PROMPT)
    run_name, _, step = name.partition("@")  # "RUN@STEP": that checkpoint instead of the run's best
    if step and not step.isdigit():
        raise APIError(400, f"model {name!r}: the part after '@' must be a checkpoint step, e.g. {run_name}@20", param="model")
    for run, info in runs:
        if run.name == run_name:
            try:
                loaded = load_run(run, checkpoint=int(step) if step else None)
            except UserError as e:
                raise APIError(404, str(e), param="model", code="model_not_found") from None
            return Target(loaded.model, True, loaded.system_prompt)
    known = ", ".join([*_base_ids(runs), *(r.name for r, _ in runs)])
    raise APIError(404, f"The model {name!r} does not exist; available: {known}", param="model", code="model_not_found")


def _load_base(model_id: str, runs: list):
    """The base ``model_id`` from the folder a run on it was trained from (so it is the same cache
    entry as that run's base), else resolved by id."""
    from wonderland.backends import resolve_backend_name
    from wonderland.generate import load_base, load_run
    from wonderland.models import resolve_model

    for run, info in runs:
        model = info.get("model") or {}
        if model.get("id") == model_id and Path(model.get("path") or "").exists():
            if info.get("backend", "torch") != "torch":  # an MLX run: its own model, adapter off
                return load_run(run).model
            return load_base(Path(model["path"]), "torch")
    path = resolve_model(model_id, log=lambda m: None)
    return load_base(Path(path), resolve_backend_name("auto", log=lambda m: None))


# ----------------------------------------------------------------------------- request parsing
@dataclass
class ChatRequest:
    model: str
    messages: list[dict]
    system: str | None  # the request's own system prompt, if any
    gen: GenerationConfig
    max_tokens: int | None  # as asked (None: the default, which is fitted to the context)
    stream: bool
    include_usage: bool
    stop: list[str]


def _number(body: dict, key: str, field_name: str | None = None):
    """``body[key]`` checked against GenerationConfig's bounds for ``field_name`` (default: ``key``);
    None when absent or null (OpenAI's parameters are nullable: null means the default)."""
    value = body.get(key)
    if value is None:
        return None
    f = GenerationConfig.__dataclass_fields__[field_name or key]
    number, problem = field_value(f, value)
    if isinstance(value, str):
        problem = f"must be {'an integer' if f.type == 'int' else 'a number'} (got {value!r})"
    if problem:
        raise APIError(400, f"{key} {problem}", param=key)
    return number


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        raise APIError(400, f"messages[{i}].content: only text parts are supported", param=f"messages[{i}].content")
    raise APIError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")


def parse_request(body: Any) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "model is required: a run name or a base model id (see GET /v1/models)", param="model")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "messages must be a non-empty list of {role, content}", param="messages")
    messages, systems = [], []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}", param=f"messages[{i}].role")
        text = _content(m, i)
        if m["role"] in ("system", "developer"):
            systems.append(text)
        else:
            messages.append({"role": m["role"], "content": text})
    if not messages or messages[-1]["role"] != "user":
        raise APIError(400, "the last message must come from the user", param="messages")
    if body.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    max_tokens = _number(body, "max_completion_tokens", "max_tokens") or _number(body, "max_tokens")
    fields = {"temperature": _number(body, "temperature"), "top_p": _number(body, "top_p"),
              "max_tokens": max_tokens, "seed": _number(body, "seed")}
    gen = GenerationConfig(**{k: v for k, v in fields.items() if v is not None})
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"stop must be a non-empty string or a list of up to {MAX_STOP} of them", param="stop")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", param="stream_options")
    return ChatRequest(model, messages, "\n\n".join(systems) if systems else None, gen, max_tokens,
                       bool(body.get("stream", False)), bool(options.get("include_usage")), stop)


# ----------------------------------------------------------------------------- generation
class Reply:
    """Streams the model's pieces, cut at the first stop sequence; knows why it ended."""

    def __init__(self, target: Target, req: ChatRequest) -> None:
        self.target, self.req = target, req
        self.messages = with_system(req.messages, req.system or target.system_prompt)
        self.text = ""
        self.finish_reason = "stop"

    def pieces(self) -> Iterator[str]:
        stream = self.target.model.stream(self.messages, self.req.gen, adapter=self.target.adapter)
        hold = max((len(s) for s in self.req.stop), default=1) - 1  # chars that may begin a stop sequence
        buf, sent = "", 0
        try:
            for piece in stream:
                buf += piece
                cut = min((i for i in (buf.find(s) for s in self.req.stop) if i >= 0), default=-1)
                if cut >= 0:
                    if cut > sent:
                        yield buf[sent:cut]
                    self.text = buf[:cut]
                    return
                if len(buf) - hold > sent:
                    yield buf[sent:len(buf) - hold]
                    sent = len(buf) - hold
            if len(buf) > sent:
                yield buf[sent:]
            self.text = buf
            if self._n_tokens(buf) >= self.req.gen.max_tokens:
                self.finish_reason = "length"
        finally:
            close = getattr(stream, "close", None)  # stop the model's decoding loop early
            if close:
                close()

    def fit_context(self) -> None:
        """``max_tokens`` within the model's context (its config's max_position_embeddings) after
        the prompt: a 400 when asked for more (or when the prompt alone fills it), else the default
        shortened to the room left."""
        from wonderland.generate import context_length

        tok, ctx = self._tokenizer(), context_length(self.target.model)
        if tok is None or ctx is None:
            return
        prompt = len(prompt_ids(tok, self.messages))
        room = ctx - prompt
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens and the messages take {prompt}; "
                                "shorten them", param="messages", code="context_length_exceeded")
        if self.req.max_tokens is not None and self.req.max_tokens > room:
            raise APIError(400, f"max_tokens must be between 1 and {room} for these messages (the model's context is "
                                f"{ctx} tokens, the messages take {prompt})", param="max_tokens", code="context_length_exceeded")
        if self.req.gen.max_tokens > room:
            self.req.gen = replace(self.req.gen, max_tokens=room)

    def _tokenizer(self):
        return getattr(self.target.model, "tokenizer", None)

    def _n_tokens(self, text: str) -> int:
        """Completion length in tokens, by re-encoding the text (the ChatModel yields text only)."""
        tok = self._tokenizer()
        return len(tok.encode(text, add_special_tokens=False)) if tok is not None else 0

    def usage(self) -> dict | None:
        tok = self._tokenizer()
        if tok is None:
            return None
        prompt = len(prompt_ids(tok, self.messages))
        completion = self._n_tokens(self.text)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@bp.post("/chat/completions")
def chat_completions():
    req = parse_request(request.get_json(silent=True))
    target = _resolve(req.model)
    reply = Reply(target, req)
    reply.fit_context()
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if not req.stream:
        text = "".join(reply.pieces())
        body = {"id": cid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": reply.finish_reason, "logprobs": None}]}
        usage = reply.usage()
        if usage:
            body["usage"] = usage
        return jsonify(body)

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {strict_dumps(obj, ensure_ascii=False)}\n\n"

    def events() -> Iterator[str]:
        yield chunk({"role": "assistant", "content": ""})
        try:
            for piece in reply.pieces():
                yield chunk({"content": piece})
        except Exception as e:  # noqa: BLE001 - headers are sent: any failure is reported in-band, as OpenAI does
            yield f"data: {strict_dumps({'error': {'message': str(e), 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
            return
        yield chunk({}, reply.finish_reason)
        if req.include_usage:
            usage = reply.usage()
            yield f"data: {strict_dumps({'id': cid, 'object': 'chat.completion.chunk', 'created': created, 'model': req.model, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    return Response(events(), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
