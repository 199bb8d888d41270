"""Talking to a run: load it once, stream replies, compare Base / Prompted / Trained.

``stream_generate`` yields text pieces; ``generate`` is a thin join. The three arms differ only
in what the product claims matters:

* **base**: adapter off, neutral system prompt (the model as it ships);
* **prompted**: adapter off, the character's system prompt (prompt engineering, which we replace);
* **trained**: adapter on, the same system prompt (our LoRA).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from wonderland.backends import ChatModel, get_backend
from wonderland.chat_format import NEUTRAL_SYSTEM_PROMPT, with_system
from wonderland.config import GenerationConfig
from wonderland.runs import RunDir, resolve_run


@dataclass(frozen=True)
class Arm:
    name: str
    adapter: bool
    character_prompt: bool
    description: str


ARMS = (
    Arm("base", False, False, "adapter off, neutral system prompt"),
    Arm("prompted", False, True, "adapter off, the character's system prompt"),
    Arm("trained", True, True, "adapter on, the character's system prompt"),
)
ARMS_BY_NAME = {a.name: a for a in ARMS}


@dataclass
class LoadedRun:
    run: RunDir
    info: dict
    model: ChatModel
    base_key: tuple | None = None  # the shared base's cache key, when the adapter lives on it

    @property
    def system_prompt(self) -> str:
        return self.info.get("system_prompt") or NEUTRAL_SYSTEM_PROMPT

    def messages_for(self, arm: Arm | str, messages: Sequence[dict]) -> list[dict]:
        arm = ARMS_BY_NAME[arm] if isinstance(arm, str) else arm
        return with_system(messages, self.system_prompt if arm.character_prompt else NEUTRAL_SYSTEM_PROMPT)

    def stream(self, arm: Arm | str, messages: Sequence[dict], gen: GenerationConfig) -> Iterator[str]:
        arm = ARMS_BY_NAME[arm] if isinstance(arm, str) else arm
        return stream_generate(self.model, self.messages_for(arm, messages), gen, adapter=arm.adapter)

    def replies(self, requests: Sequence[tuple[Arm | str, Sequence[dict], GenerationConfig]]) -> list[str]:
        """The replies to several ``(arm, messages, gen)`` requests: decoded as one batch where the
        model can (torch), else one after another; each as :meth:`stream` would give it."""
        arms = [ARMS_BY_NAME[a] if isinstance(a, str) else a for a, _, _ in requests]
        prepared = [(self.messages_for(arm, m), g, arm.adapter) for arm, (_, m, g) in zip(arms, requests)]
        batch = getattr(self.model, "generate_batch", None)
        if batch is not None:
            return [r.strip() for r in batch(prepared)]
        return ["".join(stream_generate(self.model, m, g, adapter=a)).strip() for m, g, a in prepared]


class ModelCache:
    """Loaded models, bounded: least recently used first out once there are more than ``max_models``
    entries or more than ``max_bytes`` of weights (0 = no byte limit). Each key has its own lock, so
    loads of different models run side by side while a second caller of the same key waits for the
    first's load and shares it. Keys are tuples whose first item says what they hold: ``("base",
    backend, path, device, quantize)`` or ``("run", run path, updated, device, checkpoint)``."""

    def __init__(self, max_models: int = 4, max_bytes: int = 0) -> None:
        self.max_models, self.max_bytes = max_models, max_bytes
        self._lock = threading.Lock()  # guards the two dicts below, never held through a load
        self._entries: OrderedDict[tuple, tuple[object, int]] = OrderedDict()  # key -> (value, bytes)
        self._key_locks: dict[tuple, threading.Lock] = {}

    def get(self, key: tuple, load: Callable[[], tuple[object, int]]):
        """The value under ``key``, loading it with ``load() -> (value, bytes)`` when absent."""
        with self._lock:
            if key in self._entries:
                return self._touch(key)
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._entries:  # loaded by the caller we waited for
                    return self._touch(key)
            value, size = load()
            with self._lock:
                self._entries[key] = (value, size)
                self._key_locks.pop(key, None)
                self._touch(key)
                self._shrink(keep=key)
            return value

    def _touch(self, key: tuple):
        """Mark ``key`` (and the base its adapter lives on) as just used; its value."""
        value = self._entries[key][0]
        self._entries.move_to_end(key)
        base = getattr(value, "base_key", None)
        if base in self._entries:
            self._entries.move_to_end(base)
        return value

    def _shrink(self, keep: tuple) -> None:
        protected = {keep, getattr(self._entries[keep][0], "base_key", None)}

        def over() -> bool:
            total = sum(size for _, size in self._entries.values())
            return len(self._entries) > self.max_models or bool(self.max_bytes and total > self.max_bytes)

        while over():
            oldest = next((k for k in self._entries if k not in protected), None)
            if oldest is None:
                return
            self._drop(oldest)

    def _drop(self, key: tuple) -> None:
        value, _ = self._entries.pop(key)
        if key[0] == "base":  # its runs' adapters live on it: they go with it
            for k in [k for k, (v, _) in self._entries.items() if getattr(v, "base_key", None) == key]:
                self._entries.pop(k)
        else:
            detach = getattr(getattr(value, "model", None), "detach", None)
            if detach:
                detach()

    def evict(self, match: Callable[[tuple], bool]) -> int:
        """Drop every entry whose key ``match``es (a deleted run); how many were dropped."""
        with self._lock:
            keys = [k for k in self._entries if match(k)]
            for k in keys:
                if k in self._entries:
                    self._drop(k)
            return len(keys)

    def keys(self) -> list[tuple]:
        with self._lock:
            return list(self._entries)


def _env_int(name: str, default: int) -> int:
    from wonderland.errors import UserError

    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(float(raw))
    except ValueError:
        raise UserError(f"${name} must be a number (got {raw!r})") from None
    if value < 0:
        raise UserError(f"${name} must be >= 0 (got {raw!r})")
    return value


# One cache per process: the CLI, the web app's Compare page and its OpenAI API share it, so each
# base model is in memory once. $WONDERLAND_MAX_MODELS entries (default 6: bases and runs on them)
# and $WONDERLAND_MAX_MODEL_GB of weights (default 0: no limit).
MODELS = ModelCache(max_models=max(1, _env_int("WONDERLAND_MAX_MODELS", 6)),
                    max_bytes=_env_int("WONDERLAND_MAX_MODEL_GB", 0) * 10**9)


def _weights_bytes(model_path: Path) -> int:
    """What a base costs in memory, estimated from its weight files (float32 folders here)."""
    return sum(f.stat().st_size for f in Path(model_path).glob("*.safetensors")) or \
        sum(f.stat().st_size for f in Path(model_path).glob("*.bin"))


def load_base(model_path: Path, backend_name: str = "torch", device: str = "auto", quantize: str = "none") -> ChatModel:
    """A base model with no adapter, loaded once per process and shared: runs attach their adapters
    to it by name (torch), the OpenAI API's base ids and the Base/Prompted arms use it directly.
    ``quantize``: a run's ``--quantize`` (the same base quantized is another entry)."""
    model_path = Path(model_path).resolve()
    key = ("base", backend_name, str(model_path), device, quantize)
    return MODELS.get(key, lambda: (get_backend(backend_name).load(model_path, None, device=device, quantize=quantize),
                                    _weights_bytes(model_path)))


def load_run(run_ref: str | Path | RunDir, device: str = "auto", checkpoint: int | None = None) -> LoadedRun:
    """A run's model, loaded once per process (later calls reuse it): the served adapter (the best
    checkpoint's), or checkpoint ``checkpoint``'s. A torch run is its adapter attached by name to the
    shared base (:func:`load_base`); an MLX run is a model of its own. Keyed by (run, checkpoint)."""
    run = run_ref if isinstance(run_ref, RunDir) else resolve_run(run_ref)
    info = run.read()
    key = ("run", str(run.path.resolve()), info.get("updated"), device, checkpoint)
    return MODELS.get(key, lambda: _load_run(run, info, device, checkpoint, key))


def _load_run(run: RunDir, info: dict, device: str, checkpoint: int | None, key: tuple) -> tuple[LoadedRun, int]:
    from wonderland.errors import UserError
    from wonderland.models import resolve_model

    if not (run.adapter / "adapter_config.json").exists():
        raise UserError(f"run {run.name} has no finished adapter (status: {info.get('status')}); "
                        f"resume it with `wonderland train --resume {run.name}`")
    model_path = Path(info["model"]["path"])
    if not model_path.exists():  # a run copied from another machine: find its base here
        model_path = resolve_model(info["model"]["id"])
    backend_name, adapter = info.get("backend", "torch"), run.adapter_at(checkpoint)
    quantize = (info.get("config") or {}).get("quantize", "none")  # the base the adapter was trained on
    if backend_name == "mlx" and not _mlx_installed():  # torch has no MLX quantization: the float base
        backend_name, adapter, quantize = "torch", _peft_copy_of_mlx_adapter(run, model_path), "none"
    size = sum(f.stat().st_size for f in Path(adapter).glob("*.safetensors"))
    if backend_name != "torch":  # MLX's LoRA layers replace the base's: no sharing, a copy per run
        model = get_backend(backend_name).load(model_path, adapter, device=device, quantize=quantize)
        return LoadedRun(run, info, model), size + _weights_bytes(model_path)
    base = load_base(model_path, "torch", device, quantize)
    loaded = LoadedRun(run, info, base.with_adapter(adapter_name(key), Path(adapter)))
    loaded.base_key = ("base", "torch", str(Path(model_path).resolve()), device, quantize)
    return loaded, size


def adapter_name(key: tuple) -> str:
    """The PEFT adapter name of a cached run key: a digest, as torch module names cannot hold the
    dots of a run's path (``~/.cache/...``) or its timestamp."""
    return "run_" + hashlib.sha1("|".join(map(str, key[1:])).encode()).hexdigest()[:16]


def evict_run(run_path: str | Path) -> int:
    """Forget every loaded model of the run at ``run_path`` (it was deleted): adapters detached."""
    path = str(Path(run_path).resolve())
    return MODELS.evict(lambda k: k[0] == "run" and k[1] == path)


def _mlx_installed() -> bool:
    try:
        import mlx_lm  # noqa: F401
    except ImportError:
        return False
    return True


def _peft_copy_of_mlx_adapter(run: RunDir, model_path: Path) -> Path:
    """An MLX run served where MLX is missing (e.g. trained on a Mac, served on Linux/CUDA): its
    adapter converted once to PEFT (same logits, see wonderland.backends.torch_peft.adapters) and kept in the run."""
    from wonderland.backends.torch_peft.adapters import mlx_to_peft
    from wonderland.fileio import atomic_replace_dir, staging_dir

    target = run.path / "adapter-peft"
    source = run.adapter / "adapters.safetensors"
    if not (target / "adapter_model.safetensors").exists() or target.stat().st_mtime < source.stat().st_mtime:
        tmp = staging_dir(target)
        mlx_to_peft(run.adapter, tmp, model_path)
        atomic_replace_dir(tmp, target)
    return target


def context_length(model: ChatModel) -> int | None:
    """How many tokens (prompt + reply) ``model`` can attend to: its config.json's
    max_position_embeddings; None when the folder does not say."""
    try:
        config = json.loads((Path(model.model_path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    n = config.get("max_position_embeddings") if isinstance(config, dict) else None
    return n if isinstance(n, int) and n > 0 else None


def stream_generate(model: ChatModel, messages: Sequence[dict], gen: GenerationConfig | None = None,
                    adapter: bool = True) -> Iterator[str]:
    """Yield the reply to ``messages`` piece by piece."""
    return model.stream(list(messages), gen or GenerationConfig(), adapter=adapter)


def generate(model: ChatModel, messages: Sequence[dict], gen: GenerationConfig | None = None, adapter: bool = True) -> str:
    return "".join(stream_generate(model, messages, gen, adapter))
