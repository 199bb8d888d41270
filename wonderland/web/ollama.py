"""A minimal client for a local Ollama server: is it there, which models, stream a chat reply.

Ollama is optional: the Compare page shows an extra column when a server answers at
``$OLLAMA_HOST`` (default http://127.0.0.1:11434), and says so when none does. Only the
standard library is used (urllib), with short timeouts so a missing server costs ~1 s at most.

Protocol (``POST /api/chat`` with ``"stream": true``): newline-delimited JSON objects, each
``{"message": {"role": "assistant", "content": "<piece>"}, "done": false}``, the last one
``{"done": true, ...}``; failures arrive as ``{"error": "..."}`` or an HTTP error status.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Iterator, Sequence

from wonderland.config import GenerationConfig

DEFAULT_HOST = "http://127.0.0.1:11434"
PREFERRED_MODEL = "llama3.1"  # what the seed's prompt-engineered Hatter ran on
PROBE_TIMEOUT_S = 1.0
CHAT_TIMEOUT_S = 120.0  # per read: a cold Ollama model can take a while to load


def ollama_host(env: str | None = None) -> str:
    """``$OLLAMA_HOST`` as a base URL; accepts Ollama's own forms (``host``, ``host:port``)."""
    raw = (env if env is not None else os.environ.get("OLLAMA_HOST", "")).strip() or DEFAULT_HOST
    if "://" not in raw:
        raw = "http://" + raw
    scheme, rest = raw.split("://", 1)
    hostport = rest.split("/", 1)[0]
    if hostport.startswith("0.0.0.0"):  # a bind address, not a destination: Ollama itself treats it so
        hostport = "127.0.0.1" + hostport[len("0.0.0.0"):]
    if ":" not in hostport.rsplit("]", 1)[-1]:
        hostport += ":11434"
    return f"{scheme}://{hostport}"


class OllamaError(Exception):
    pass


@dataclass
class OllamaClient:
    host: str
    model: str | None = None  # None: $WONDERLAND_OLLAMA_MODEL, else llama3.1 if pulled, else the first model

    def models(self) -> list[str]:
        try:
            with urllib.request.urlopen(f"{self.host}/api/tags", timeout=PROBE_TIMEOUT_S) as r:
                data = json.load(r)
        except (OSError, ValueError) as e:
            raise OllamaError(f"no Ollama server at {self.host} ({_why(e)})") from None
        return [m.get("name") or m.get("model") for m in data.get("models", []) if m.get("name") or m.get("model")]

    def status(self) -> dict:
        """``{"available": bool, "host", "model", "models", "message"}`` for the page."""
        try:
            models = self.models()
        except OllamaError as e:
            return {"available": False, "host": self.host, "model": None, "models": [], "message": str(e)}
        model = self.pick(models)
        if model is None:
            return {"available": False, "host": self.host, "model": None, "models": [],
                    "message": f"Ollama at {self.host} has no models; pull one with `ollama pull {PREFERRED_MODEL}`"}
        return {"available": True, "host": self.host, "model": model, "models": models, "message": f"Ollama {model}"}

    def pick(self, models: list[str]) -> str | None:
        wanted = self.model or os.environ.get("WONDERLAND_OLLAMA_MODEL")
        if wanted:
            return wanted
        for m in models:
            if m == PREFERRED_MODEL or m.startswith(PREFERRED_MODEL + ":"):
                return m
        return models[0] if models else None

    def stream_chat(self, model: str, messages: Sequence[dict], gen: GenerationConfig) -> Iterator[str]:
        """Yield reply pieces from ``/api/chat`` (same sampling settings as the local columns)."""
        body = {"model": model, "messages": list(messages), "stream": True,
                "options": {"temperature": gen.temperature, "top_p": gen.top_p, "num_predict": gen.max_tokens,
                            "repeat_penalty": gen.repetition_penalty, "seed": gen.seed}}
        req = urllib.request.Request(f"{self.host}/api/chat", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            response = urllib.request.urlopen(req, timeout=CHAT_TIMEOUT_S)
        except urllib.error.HTTPError as e:
            raise OllamaError(f"Ollama answered {e.code}: {_error_text(e)}") from None
        except OSError as e:
            raise OllamaError(f"no Ollama server at {self.host} ({_why(e)})") from None
        with response:
            for line in response:
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:
                    raise OllamaError(f"Ollama sent a line that is not JSON: {line[:80]!r}") from None
                if item.get("error"):
                    raise OllamaError(f"Ollama: {item['error']}")
                piece = (item.get("message") or {}).get("content") or ""
                if piece:
                    yield piece
                if item.get("done"):
                    return


def _why(e: Exception) -> str:
    reason = getattr(e, "reason", None)
    return str(reason or e) or type(e).__name__


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        return json.loads(e.read()).get("error", e.reason)
    except (ValueError, OSError, AttributeError):
        return str(e.reason)
