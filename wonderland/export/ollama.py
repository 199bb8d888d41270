"""Ollama Modelfiles: write one for a run, and check one against Ollama's documented syntax.

Two routes (https://github.com/ollama/ollama/blob/main/docs/modelfile.md, docs/import.md):

* ``adapter`` (opt-in; Ollama's safetensors-adapter import is unreliable in current releases, see
  docs/export.md): ``FROM <base model folder>`` + ``ADAPTER ./adapter`` (a PEFT safetensors adapter).
  Ollama converts safetensors adapters for llama-family and Gemma-2 bases only. It reads the
  strength from ``lora_alpha`` (a JSON *integer*: Go unmarshals it into a uint32, so ``16.0``
  fails) and ignores mlx-lm's ``scale``; we write an integer alpha and fold any remainder into
  lora_B so that ``alpha / r * B`` equals the trained update exactly.
* ``gguf`` (the default): ``FROM ./<run>.<type>.gguf``, the merged model written by our GGUF writer.

No Ollama binary runs here: :func:`parse_modelfile` implements the documented grammar and the
export checks its own output with it; ``export --verify`` loads the GGUF route's file in llama.cpp.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wonderland.config import GenerationConfig
from wonderland.errors import UserError

# model_type values whose safetensors adapters Ollama converts (convert/convert.go: "llama", "gemma2")
ADAPTER_MODEL_TYPES = ("llama", "mistral", "gemma2")
INSTRUCTIONS = ("FROM", "ADAPTER", "PARAMETER", "TEMPLATE", "SYSTEM", "LICENSE", "MESSAGE", "REQUIRES")
# documented PARAMETERs and their value types
PARAMETERS: dict[str, type] = {
    "mirostat": int, "mirostat_eta": float, "mirostat_tau": float, "num_ctx": int, "repeat_last_n": int,
    "repeat_penalty": float, "temperature": float, "seed": int, "stop": str, "num_predict": int,
    "top_k": int, "top_p": float, "min_p": float,
}

# ChatML as an Ollama (Go text/template) chat template. Ollama gathers the system messages into
# .System; the loop renders the user/assistant turns and opens the assistant turn at the end.
CHATML_TEMPLATE = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}<|im_end|>
{{ end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""
CHATML_STOPS = ("<|im_start|>", "<|im_end|>")


def is_chatml(chat_template: str | None) -> bool:
    return bool(chat_template) and "<|im_start|>" in chat_template and "<|im_end|>" in chat_template


def _triple(text: str) -> str:
    if '"""' in text:
        raise UserError('the system prompt contains """, which a Modelfile cannot quote; edit the run\'s system prompt')
    return f'"""{text}"""'


def render_modelfile(from_: str, system_prompt: str, chat_template: str | None, adapter: str | None = None,
                     gen: GenerationConfig | None = None, num_ctx: int = 2048, character: str = "") -> str:
    """A Modelfile for the run: FROM (+ ADAPTER), SYSTEM, TEMPLATE (ChatML) and PARAMETERs."""
    gen = gen or GenerationConfig()
    lines = [f"# {character or 'wonderland'} - exported by `wonderland export --format ollama`",
             f"FROM {from_}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if is_chatml(chat_template):
        lines.append(f"TEMPLATE {_triple(CHATML_TEMPLATE)}")
        lines += [f"PARAMETER stop {s}" for s in CHATML_STOPS]
    # otherwise Ollama takes the template from the model's own chat template
    lines += [f"PARAMETER temperature {gen.temperature:g}", f"PARAMETER top_p {gen.top_p:g}",
              f"PARAMETER repeat_penalty {gen.repetition_penalty:g}", f"PARAMETER num_ctx {num_ctx}"]
    if system_prompt:
        lines.append(f"SYSTEM {_triple(system_prompt)}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- parsing
@dataclass
class Instruction:
    command: str  # upper case
    args: str


def parse_modelfile(text: str) -> list[Instruction]:
    """Parse a Modelfile by Ollama's documented syntax; UserError on anything Ollama rejects.

    ``INSTRUCTION arguments`` per line, case-insensitive, ``#`` comments, values in ``\"\"\"``
    may span lines; exactly one FROM; PARAMETER names and value types from the docs."""
    out: list[Instruction] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        command, _, args = line.partition(" ")
        command, args = command.upper(), args.strip()
        if command not in INSTRUCTIONS:
            raise UserError(f"Modelfile line {i}: unknown instruction {command!r}")
        if args.startswith('"""'):
            body = args[3:]
            while '"""' not in body:
                if i >= len(lines):
                    raise UserError(f"Modelfile: unterminated \"\"\" in {command}")
                body += "\n" + lines[i]
                i += 1
            args, _, rest = body.partition('"""')
            if rest.strip():
                raise UserError(f"Modelfile line {i}: text after the closing \"\"\" of {command}")
        elif not args:
            raise UserError(f"Modelfile line {i}: {command} needs an argument")
        if command == "PARAMETER":
            _check_parameter(args, i)
        out.append(Instruction(command, args))
    froms = [x for x in out if x.command == "FROM"]
    if len(froms) != 1:
        raise UserError(f"Modelfile: exactly one FROM is required (found {len(froms)})")
    for x in out:
        if x.command == "TEMPLATE":
            _check_template(x.args)
    return out


def _check_parameter(args: str, line: int) -> None:
    name, _, value = args.partition(" ")
    value = value.strip()
    if name not in PARAMETERS:
        raise UserError(f"Modelfile line {line}: unknown PARAMETER {name!r}")
    if not value:
        raise UserError(f"Modelfile line {line}: PARAMETER {name} needs a value")
    typ = PARAMETERS[name]
    if typ is not str:
        try:
            typ(value)
        except ValueError:
            raise UserError(f"Modelfile line {line}: PARAMETER {name} must be {typ.__name__} (got {value!r})") from None
    elif len(shlex.split(value)) != 1:
        raise UserError(f"Modelfile line {line}: PARAMETER {name} takes one value (quote it)")


def _check_template(template: str) -> None:
    """Go template actions must balance, and every block (if/range/with) must be closed."""
    actions = re.findall(r"\{\{-?\s*(.*?)\s*-?\}\}", template, flags=re.DOTALL)
    if template.count("{{") != template.count("}}") or len(actions) != template.count("{{"):
        raise UserError("Modelfile TEMPLATE: unbalanced {{ }}")
    depth = 0
    for a in actions:
        word = a.split(" ", 1)[0]
        if word in ("if", "range", "with", "block", "define"):
            depth += 1
        elif word == "end":
            depth -= 1
            if depth < 0:
                raise UserError("Modelfile TEMPLATE: {{ end }} without an open block")
    if depth:
        raise UserError("Modelfile TEMPLATE: a block is not closed with {{ end }}")


# ----------------------------------------------------------------------------- adapter alpha
def ollama_alpha(r: int, scale: float) -> tuple[int, float]:
    """(integer lora_alpha for Ollama, factor to multiply lora_B by) so that
    ``lora_alpha / r * factor == scale`` exactly (in real arithmetic)."""
    alpha = max(1, round(scale * r))
    return alpha, scale * r / alpha


def write_ollama_adapter(peft_dir: Path, out: Path) -> dict[str, Any]:
    """Copy a PEFT adapter into ``out`` with an Ollama-readable integer ``lora_alpha``."""
    from safetensors.numpy import load_file, save_file

    cfg = json.loads((peft_dir / "adapter_config.json").read_text(encoding="utf-8"))
    r = int(cfg["r"])
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("use_dora"):
        raise UserError("Ollama adapter export supports plain LoRA (no per-module ranks, no DoRA); use --ollama-from gguf")
    scale = float(cfg["lora_alpha"]) / (math.sqrt(r) if cfg.get("use_rslora") else r)
    alpha, factor = ollama_alpha(r, scale)
    tensors = load_file(str(peft_dir / "adapter_model.safetensors"))
    if factor != 1.0:
        tensors = {k: (v * factor).astype(v.dtype) if ".lora_B." in k else v for k, v in tensors.items()}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg.update(lora_alpha=alpha, use_rslora=False)
    cfg.pop("lora_parameters", None)  # mlx-lm's block: Ollama would prefer its alpha over lora_alpha
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return {"r": r, "lora_alpha": alpha, "scale": scale, "lora_b_factor": factor}
