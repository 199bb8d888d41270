"""mlx-lm <-> PEFT adapter conversion, proved on logits: the same prompt through MLX (mlx-lm model +
mlx adapter) and through torch (transformers model + converted PEFT adapter) gives the same
logits, both ways, and a round trip gives back the original tensors.

The adapters here have random, large ``B`` matrices (a freshly initialised LoRA has B = 0 and
would change nothing, so equal logits would prove nothing); the test also checks they move the
logits far more than the tolerance.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from wonderland.errors import UserError

# Import the backend before anything imports mlx: it loads OpenBLAS for MLX first (~10x faster on CPU).
import wonderland.backends.mlx_lora.backend  # noqa: E402,F401,I001

PROMPT = [1, 504, 3055, 314, 357, 47, 2146, 30, 198, 77, 1035, 42]  # a fixed prompt, several positions
ATOL = 2e-4  # float32 on two frameworks; the adapters move logits by > 0.1


@pytest.fixture(scope="module")
def rope_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny llama with rope_theta 100000 written only where transformers 5 writes it
    (``rope_parameters``): the trap from NOTES.md that mlx-lm silently reads as 10000."""
    out = tmp_path_factory.mktemp("rope-llama")
    for p in tiny_model.iterdir():
        shutil.copy(p, out / p.name)
    cfg = json.loads((out / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": 100000.0, "rope_type": "default"}
    cfg.pop("rope_theta", None)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def torch_logits(model_path: Path, peft_dir: Path | None = None) -> np.ndarray:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if peft_dir is not None:
        model = PeftModel.from_pretrained(model, str(peft_dir))
    with torch.no_grad():
        return model.eval()(torch.tensor([PROMPT])).logits[0].numpy()


def mlx_logits(model_path: Path, mlx_dir: Path | None = None) -> np.ndarray:
    import mlx.core as mx

    from wonderland.backends.mlx_lora.backend import BACKEND

    chat = BACKEND.load(model_path, mlx_dir)
    return np.array(chat.model(mx.array([PROMPT]))[0].astype(mx.float32))


def make_mlx_adapter(model_path: Path, out: Path, num_layers: int, keys: list[str], rank: int = 4, scale: float = 3.0) -> Path:
    """An mlx-lm adapter as mlx-lm writes it, with random non-zero lora_a and lora_b."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner import linear_to_lora_layers

    from wonderland.backends.mlx_lora.backend import load_base

    model, _ = load_base(model_path)
    model.freeze()
    params = {"rank": rank, "scale": scale, "dropout": 0.0, "keys": keys}
    linear_to_lora_layers(model, num_layers, params)
    mx.random.seed(1)
    weights = {k: mx.random.normal(v.shape) * 0.3 for k, v in tree_flatten(model.trainable_parameters())}
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(json.dumps(
        {"model": str(model_path), "fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params}))
    return out


def test_mlx_loads_transformers5_rope_theta(rope_model):
    """Base models agree across frameworks, which needs the top-level rope_theta fix."""
    import mlx.core as mx
    import mlx_lm

    ref = torch_logits(rope_model)
    assert np.abs(mlx_logits(rope_model) - ref).max() < ATOL
    naive, _ = mlx_lm.load(str(rope_model))  # what mlx-lm does without the fix: rope_theta 10000
    # the random tiny model is not very position-sensitive: measured 1.9e-3, ~9x the tolerance
    assert np.abs(np.array(naive(mx.array([PROMPT]))[0]) - ref).max() > 5 * ATOL


def test_mlx_adapter_to_peft_gives_the_same_logits_and_round_trips(rope_model, tmp_path):
    from safetensors.numpy import load_file

    from wonderland.backends.torch_peft.adapters import mlx_to_peft, peft_to_mlx

    mlx_dir = make_mlx_adapter(rope_model, tmp_path / "mlx", num_layers=1,
                               keys=["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"])
    peft_dir = mlx_to_peft(mlx_dir, tmp_path / "peft", rope_model)
    peft_cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    assert peft_cfg["r"] == 4 and peft_cfg["lora_alpha"] == pytest.approx(12.0)
    assert sorted(peft_cfg["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert peft_cfg["layers_to_transform"] == [1]  # mlx-lm's "last 1 layer" of 2

    base, on_mlx, on_torch = mlx_logits(rope_model), mlx_logits(rope_model, mlx_dir), torch_logits(rope_model, peft_dir)
    assert np.abs(on_mlx - base).max() > 0.1  # the adapter matters...
    assert np.abs(on_mlx - on_torch).max() < ATOL  # ...and both frameworks apply it identically

    back = peft_to_mlx(peft_dir, tmp_path / "back", rope_model)
    original, again = load_file(str(mlx_dir / "adapters.safetensors")), load_file(str(back / "adapters.safetensors"))
    assert original.keys() == again.keys()
    for k in original:
        np.testing.assert_array_equal(original[k], again[k])
    cfg, cfg_back = (json.loads((d / "adapter_config.json").read_text()) for d in (mlx_dir, back))
    assert cfg_back["num_layers"] == cfg["num_layers"]
    assert cfg_back["lora_parameters"] == {**cfg["lora_parameters"], "keys": sorted(cfg["lora_parameters"]["keys"])}


def test_peft_adapter_to_mlx_gives_the_same_logits_and_round_trips(rope_model, tmp_path):
    """A PEFT adapter on layer 0 only (not a suffix of the layers, which mlx-lm counts from the end)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from wonderland.backends.torch_peft.adapters import mlx_to_peft, peft_to_mlx

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(rope_model, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "k_proj", "gate_proj"], layers_to_transform=[0],
                        init_lora_weights=False, task_type="CAUSAL_LM")  # random B: a non-trivial adapter
    peft_dir = tmp_path / "peft"
    get_peft_model(base, config).save_pretrained(peft_dir)

    mlx_dir = peft_to_mlx(peft_dir, tmp_path / "mlx", rope_model)
    mlx_cfg = json.loads((mlx_dir / "adapter_config.json").read_text())
    assert mlx_cfg["num_layers"] == 2 and mlx_cfg["lora_parameters"]["scale"] == pytest.approx(4.0)
    assert mlx_cfg["lora_parameters"]["keys"] == ["mlp.gate_proj", "self_attn.k_proj", "self_attn.q_proj"]

    on_torch, on_mlx = torch_logits(rope_model, peft_dir), mlx_logits(rope_model, mlx_dir)
    assert np.abs(on_torch - torch_logits(rope_model)).max() > 0.1
    assert np.abs(on_mlx - on_torch).max() < ATOL

    back = mlx_to_peft(mlx_dir, tmp_path / "back", rope_model)
    original, again = load_file(str(peft_dir / "adapter_model.safetensors")), load_file(str(back / "adapter_model.safetensors"))
    assert original.keys() == again.keys()
    for k in original:
        assert torch.equal(original[k], again[k]), k
    cfg_back = json.loads((back / "adapter_config.json").read_text())
    assert cfg_back["layers_to_transform"] == [0] and cfg_back["lora_alpha"] == pytest.approx(32.0)


def test_trained_mlx_run_serves_through_torch(tiny_model, tmp_path):
    """An adapter written by the MLX backend (a Mac run) converts and runs on the torch path."""
    from wonderland.backends.torch_peft.adapters import mlx_to_peft
    from wonderland.cli import main

    data = tmp_path / "data"
    data.mkdir()
    record = {"messages": [{"role": "system", "content": "You are the Hatter."}, {"role": "user", "content": "Tea?"},
                           {"role": "assistant", "content": "Always tea-time, and no time to wash the things."}]}
    (data / "train.jsonl").write_text((json.dumps(record) + "\n") * 4)
    run = tmp_path / "run"
    assert main(["train", "--backend", "mlx", "--data", str(data), "--model", str(tiny_model), "--out", str(run),
                 "--iters", "3", "--batch-size", "2", "--lr", "0.05", "--warmup", "0", "--layers", "1", "--replay", "0"]) == 0
    peft_dir = mlx_to_peft(run / "adapter", tmp_path / "peft")  # base model path from the adapter config
    on_mlx, on_torch = mlx_logits(tiny_model, run / "adapter"), torch_logits(tiny_model, peft_dir)
    assert np.abs(on_mlx - mlx_logits(tiny_model)).max() > 10 * ATOL
    assert np.abs(on_mlx - on_torch).max() < ATOL


@pytest.mark.parametrize("change,message", [
    ({"use_dora": True}, "only plain LoRA"),
    ({"rank_pattern": {"q_proj": 4}}, "per-module rank/alpha"),
    ({"bias": "all"}, "no mlx-lm equivalent"),
])
def test_peft_features_without_an_mlx_equivalent_are_refused(tmp_path, tiny_model, change, message):
    from wonderland.backends.torch_peft.adapters import peft_to_mlx

    src = tmp_path / "peft"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, **change}))
    with pytest.raises(UserError, match=message):
        peft_to_mlx(src, tmp_path / "out", tiny_model)


@pytest.mark.slow
def test_embedded_model_logits_agree_across_frameworks_with_a_converted_adapter(embedded_model, tmp_path):
    """The packaged SmolLM2-135M (rope_theta 100000, 30 layers): MLX + mlx adapter == torch + PEFT."""
    from wonderland.backends.torch_peft.adapters import mlx_to_peft

    mlx_dir = make_mlx_adapter(embedded_model, tmp_path / "mlx", num_layers=30, rank=8, scale=0.5,
                               keys=["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"])
    peft_dir = mlx_to_peft(mlx_dir, tmp_path / "peft", embedded_model)
    base_mlx, base_torch = mlx_logits(embedded_model), torch_logits(embedded_model)
    on_mlx, on_torch = mlx_logits(embedded_model, mlx_dir), torch_logits(embedded_model, peft_dir)
    scale = np.abs(base_torch).max()  # logits of a real model reach ~20-30: compare relative to that
    assert np.abs(base_mlx - base_torch).max() < 1e-4 * scale
    assert np.abs(on_mlx - base_mlx).max() > 0.05 * scale
    assert np.abs(on_mlx - on_torch).max() < 1e-4 * scale
