"""A run's adapter in PEFT form, and the base model with it merged in (PyTorch + PEFT).

Every export goes through PEFT: a torch run's adapter already is one; an MLX run's adapter is
converted with :func:`wonderland.backends.torch_peft.adapters.mlx_to_peft` first. Merging is PEFT's
``merge_and_unload`` in float32 on the CPU (W + alpha/r * B @ A), so the merged weights equal what
base + adapter computes, up to float32 rounding.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from wonderland.errors import UserError
from wonderland.runs import RunDir


@dataclass
class RunSource:
    """What an export needs to know about a finished run."""

    run: RunDir
    info: dict
    base_path: Path  # local HF folder of the base model
    checkpoint: int | None = None  # None: the served adapter (the best checkpoint's)

    @property
    def adapter(self) -> Path:
        """The adapter folder exported: ``adapter/`` or the chosen checkpoint's."""
        return self.run.adapter_at(self.checkpoint)

    @property
    def adapter_format(self) -> str:
        return self.info.get("adapter_format") or ("mlx-lm" if self.info.get("backend") == "mlx" else "peft")

    @property
    def base_config(self) -> dict:
        return json.loads((self.base_path / "config.json").read_text(encoding="utf-8"))

    @property
    def system_prompt(self) -> str:
        return self.info.get("system_prompt") or ""


def run_source(run: RunDir, checkpoint: int | None = None) -> RunSource:
    """The run's info and base model folder; a UserError when there is no finished adapter (or no
    checkpoint ``checkpoint``)."""
    from wonderland.models import resolve_model

    info = run.read()
    if info.get("status") != "finished" or not (run.adapter / "adapter_config.json").exists():
        raise UserError(f"run {run.name} has no finished adapter (status: {info.get('status')}); "
                        f"finish it with `wonderland train --resume {run.name}`")
    base = Path(info["model"]["path"])
    if not (base / "config.json").exists():  # a run copied from another machine: find its base here
        base = resolve_model(info["model"]["id"], log=lambda m: None)
    run.adapter_at(checkpoint)  # a UserError naming the kept steps when it does not exist
    return RunSource(run, info, base, checkpoint)


@contextmanager
def peft_adapter(src: RunSource, scratch: Path) -> Iterator[Path]:
    """A folder holding the run's adapter in PEFT format (converted into ``scratch`` if needed)."""
    if src.adapter_format == "peft":
        yield src.adapter
        return
    from wonderland.backends.torch_peft.adapters import mlx_to_peft

    out = scratch / "peft-adapter"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        mlx_to_peft(src.adapter, out, src.base_path)
        yield out
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def merged_model(src: RunSource, adapter_dir: Path):
    """(model, tokenizer): the base in float32 with the adapter merged into its weights; the base of a
    run trained on a quantized MLX base (``--quantize 4|8``) is that base de-quantized first."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src.base_path)
    base = AutoModelForCausalLM.from_pretrained(src.base_path, dtype=torch.float32)
    use_dequantized_base(src, base)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    model.eval()
    return model, tokenizer


def mlx_quantize(src: RunSource) -> str:
    """The run's ``--quantize`` when it trained on a base quantized by MLX (``4`` or ``8``), else ``none``."""
    quantize = (src.info.get("config") or {}).get("quantize", "none")
    return quantize if src.info.get("backend") == "mlx" and quantize in ("4", "8") else "none"


def use_dequantized_base(src: RunSource, base) -> None:
    """Replace the float base's weights by the de-quantized weights of the quantized base the run
    trained on (mlx-lm fuse's ``--dequantize``), so the merge adds the adapter to what it learned on
    (and the adapter alone is verified, and its --lora base GGUF written, on that base too).
    Nothing for a run on a float base."""
    quantize = mlx_quantize(src)
    if quantize == "none":
        return
    try:
        from wonderland.backends.mlx_lora.backend import load_base
        from wonderland.backends.mlx_lora.quantized import dequantized_weights
    except ImportError:
        raise UserError(f"run {src.run.name} trained on a {quantize}-bit MLX base; exporting it merged de-quantizes "
                        f"that base with MLX: pip install 'wonderland[mlx]'") from None
    import torch

    weights = dequantized_weights(load_base(src.base_path, "float32", quantize)[0])
    state = base.state_dict()
    unknown = sorted(set(weights) - set(state))
    if unknown:
        raise UserError(f"run {src.run.name}: the quantized base's weights {', '.join(unknown[:3])} have no "
                        f"counterpart in {src.base_path}; export --format peft or mlx instead")
    with torch.no_grad():
        for name, value in weights.items():  # a tied LM head shares the embedding's tensor
            state[name].copy_(torch.from_numpy(value))


def save_merged(model, tokenizer, out: Path) -> None:
    """A plain HF folder: safetensors weights, config, generation config, tokenizer + chat template."""
    from wonderland.models import _fix_config_for_mlx

    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _fix_config_for_mlx(out / "config.json")  # so mlx-lm reads the right rope_theta too


def packaged_base_gguf(src: RunSource) -> Path | None:
    """The embedded model's own GGUF: our base folder was dequantised from it, so its weights are
    exactly the ones the adapter was trained on (None for other bases or without the package)."""
    from wonderland.models import EMBEDDED, embedded_gguf_path

    if src.info["model"].get("id") not in EMBEDDED:
        return None
    try:
        return embedded_gguf_path(src.info["model"]["id"])
    except UserError:  # package missing: the caller converts the base folder instead
        return None
