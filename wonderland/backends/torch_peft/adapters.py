"""LoRA adapter conversion between mlx-lm and PEFT, both ways, exactly.

Both compute ``y = W x + s * B A x`` for the adapted linear layers; they differ in bookkeeping:

==========================  ===============================================  ==============================================
                            mlx-lm (``adapters.safetensors``)                 PEFT (``adapter_model.safetensors``)
==========================  ===============================================  ==============================================
tensor names                ``model.layers.N.self_attn.q_proj.lora_a``        ``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``
shapes                      ``lora_a`` (in, r), ``lora_b`` (r, out)           ``lora_A`` (r, in), ``lora_B`` (out, r): transposed
scale s                     ``lora_parameters.scale``                         ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA)
which modules               ``lora_parameters.keys`` (``self_attn.q_proj``)   ``target_modules`` (``q_proj``)
which layers                the last ``num_layers`` decoder layers            ``layers_to_transform`` (any subset, or all)
==========================  ===============================================  ==============================================

A PEFT layer subset that is not a suffix converts exactly too: mlx-lm adds LoRA to the last
``num_layers`` layers, and the layers without tensors keep ``lora_b = 0``, i.e. no change.

Only torch/safetensors are needed (no mlx), so a Mac-trained run can be served and exported by
the torch path on any machine. Used by the export command and by ``wonderland`` tests.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from wonderland.errors import UserError
from wonderland.fileio import atomic_replace_dir, atomic_write_json, staging_dir

MLX_WEIGHTS, MLX_CONFIG = "adapters.safetensors", "adapter_config.json"
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the HF model's own names
_MLX_KEY = re.compile(r"^(?P<module>.*\.layers\.(?P<layer>\d+)\.(?P<rel>.+))\.lora_(?P<ab>[ab])$")
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.*\.layers\.(?P<layer>\d+)\.(?P<rel>.+))\.lora_(?P<AB>[AB])(\.default)?\.weight$")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} not found: expected an adapter folder") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


def _num_layers(base_model_path: Path | str | None, fallback_cfg: dict) -> int:
    path = Path(base_model_path or fallback_cfg.get("base_model_name_or_path") or fallback_cfg.get("model") or "")
    if not (path / "config.json").exists():
        raise UserError(f"base model folder {str(path)!r} has no config.json; pass base_model_path (the model the adapter was trained on)")
    cfg = _read_json(path / "config.json")
    return int(cfg.get("num_hidden_layers") or cfg.get("text_config", {}).get("num_hidden_layers"))


def _leaf_names(rel_keys: set[str]) -> list[str]:
    """PEFT target_modules: leaf names (``q_proj``) when unambiguous, else the full relative keys."""
    leaves = {k.rsplit(".", 1)[-1] for k in rel_keys}
    return sorted(leaves) if len(leaves) == len(rel_keys) else sorted(rel_keys)


def mlx_to_peft(mlx_adapter_dir: str | Path, out_dir: str | Path, base_model_path: str | Path | None = None) -> Path:
    """Write the PEFT adapter equivalent to an mlx-lm LoRA adapter; returns ``out_dir``.

    ``base_model_path`` (the HF folder the adapter was trained on; default: the adapter config's
    ``model``) gives the layer count, to tell "all layers" from a subset."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    src, out = Path(mlx_adapter_dir), Path(out_dir)
    cfg = _read_json(src / MLX_CONFIG)
    if cfg.get("fine_tune_type", "lora") != "lora":
        raise UserError(f"{src}: only LoRA adapters convert to PEFT (this one is {cfg['fine_tune_type']!r})")
    lp = cfg["lora_parameters"]
    rank, scale = int(lp["rank"]), float(lp["scale"])
    weights = load_file(str(src / MLX_WEIGHTS))
    tensors, rel_keys, layers = {}, set(), set()
    for name, w in weights.items():
        m = _MLX_KEY.match(name)
        if not m:
            raise UserError(f"{src / MLX_WEIGHTS}: unexpected tensor {name!r}; only LoRA lora_a/lora_b of decoder layers convert")
        rel_keys.add(m["rel"])
        layers.add(int(m["layer"]))
        peft_name = f"{PEFT_PREFIX}{m['module']}.lora_{m['ab'].upper()}.weight"
        tensors[peft_name] = w.T.contiguous().to(torch.float32) if w.dtype != torch.float32 else w.T.contiguous()
    n_layers = _num_layers(base_model_path, cfg)
    all_layers = layers == set(range(n_layers))
    config = LoraConfig(r=rank, lora_alpha=scale * rank, lora_dropout=float(lp.get("dropout", 0.0)),
                        target_modules=_leaf_names(rel_keys), layers_to_transform=None if all_layers else sorted(layers),
                        bias="none", task_type="CAUSAL_LM",
                        base_model_name_or_path=str(base_model_path or cfg.get("model") or ""))
    tmp = staging_dir(out)
    config.save_pretrained(str(tmp))
    save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
    atomic_replace_dir(tmp, out)
    return out


def peft_to_mlx(peft_adapter_dir: str | Path, out_dir: str | Path, base_model_path: str | Path | None = None) -> Path:
    """Write the mlx-lm adapter equivalent to a PEFT LoRA adapter; returns ``out_dir``.

    ``mlx_lm.load(base_model_path, adapter_path=out_dir)`` then computes the same function."""
    from safetensors.torch import load_file, save_file

    src, out = Path(peft_adapter_dir), Path(out_dir)
    cfg = _read_json(src / PEFT_CONFIG)
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
        raise UserError(f"{src}: only plain LoRA adapters convert to mlx-lm (not {cfg.get('peft_type')}{' DoRA' if cfg.get('use_dora') else ''})")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise UserError(f"{src}: per-module rank/alpha patterns have no mlx-lm equivalent (one rank and scale for all layers)")
    if cfg.get("bias", "none") != "none" or cfg.get("fan_in_fan_out") or cfg.get("modules_to_save"):
        raise UserError(f"{src}: LoRA biases, fan_in_fan_out and modules_to_save have no mlx-lm equivalent")
    rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    weights_file = src / PEFT_WEIGHTS
    if not weights_file.exists():
        raise UserError(f"{weights_file} not found (a .bin adapter? re-save it with safetensors)")
    tensors, rel_keys, layers = {}, set(), set()
    for name, w in load_file(str(weights_file)).items():
        m = _PEFT_KEY.match(name)
        if not m:
            raise UserError(f"{weights_file}: unexpected tensor {name!r}; only LoRA lora_A/lora_B of decoder layers convert")
        rel_keys.add(m["rel"])
        layers.add(int(m["layer"]))
        tensors[f"{m['module']}.lora_{m['AB'].lower()}"] = w.T.contiguous()
    n_layers = _num_layers(base_model_path, cfg)
    mlx_cfg = {
        "model": str(base_model_path or cfg.get("base_model_name_or_path") or ""),
        "fine_tune_type": "lora",
        "num_layers": n_layers - min(layers),  # mlx-lm: the last N layers; the others get no tensors
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": float(cfg.get("lora_dropout", 0.0)),
                            "keys": sorted(rel_keys)},
    }
    tmp = staging_dir(out)
    save_file(tensors, str(tmp / MLX_WEIGHTS), metadata={"format": "mlx"})
    atomic_write_json(tmp / MLX_CONFIG, mlx_cfg)
    atomic_replace_dir(tmp, out)
    return out
