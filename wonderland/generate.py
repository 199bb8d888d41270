"""Talking to a run: load it once, stream replies, compare Base / Prompted / Trained.

``stream_generate`` yields text pieces; ``generate`` is a thin join. The three arms differ only
in what the product claims matters:

* **base**: adapter off, neutral system prompt (the model as it ships);
* **prompted**: adapter off, the character's system prompt (prompt engineering, which we replace);
* **trained**: adapter on, the same system prompt (our LoRA).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

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

    @property
    def system_prompt(self) -> str:
        return self.info.get("system_prompt") or NEUTRAL_SYSTEM_PROMPT

    def messages_for(self, arm: Arm | str, messages: Sequence[dict]) -> list[dict]:
        arm = ARMS_BY_NAME[arm] if isinstance(arm, str) else arm
        return with_system(messages, self.system_prompt if arm.character_prompt else NEUTRAL_SYSTEM_PROMPT)

    def stream(self, arm: Arm | str, messages: Sequence[dict], gen: GenerationConfig) -> Iterator[str]:
        arm = ARMS_BY_NAME[arm] if isinstance(arm, str) else arm
        return stream_generate(self.model, self.messages_for(arm, messages), gen, adapter=arm.adapter)


_cache: dict[tuple, LoadedRun] = {}
_cache_lock = threading.Lock()


def load_run(run_ref: str | Path | RunDir, device: str = "auto", checkpoint: int | None = None) -> LoadedRun:
    """Load a run's base model + adapter once per process (later calls reuse it): the served
    adapter (the best checkpoint's), or checkpoint ``checkpoint``'s."""
    run = run_ref if isinstance(run_ref, RunDir) else resolve_run(run_ref)
    info = run.read()
    key = (str(run.path), info.get("updated"), device, checkpoint)
    with _cache_lock:
        if key not in _cache:
            from wonderland.errors import UserError

            if not (run.adapter / "adapter_config.json").exists():
                raise UserError(f"run {run.name} has no finished adapter (status: {info.get('status')}); "
                                f"resume it with `wonderland train --resume {run.name}`")
            from wonderland.models import resolve_model

            model_path = Path(info["model"]["path"])
            if not model_path.exists():  # a run copied from another machine: find its base here
                model_path = resolve_model(info["model"]["id"])
            backend_name, adapter = info.get("backend", "torch"), run.adapter_at(checkpoint)
            if backend_name == "mlx" and not _mlx_installed():
                backend_name, adapter = "torch", _peft_copy_of_mlx_adapter(run, model_path)
            model = get_backend(backend_name).load(model_path, adapter, device=device)
            _cache[key] = LoadedRun(run, info, model)
        return _cache[key]


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
