"""The pre-flight memory estimate (issue 18): its terms, the warning and what it suggests, the CLI lines, the
web endpoint, and the estimate against a measured peak (MLX's allocator on CPU, the tiny model)."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest

from tests.helpers import write_dataset
from wonderland import preflight
from wonderland.cli import main
from wonderland.config import TrainConfig
from wonderland.quantize import NF4_NEEDS


def test_weights_and_lora_terms_count_the_model_exactly(tiny_model):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from wonderland.backends.torch_peft.backend import lora_config

    config = TrainConfig(layers=1, targets="q_proj,v_proj,down_proj")
    est = preflight.estimate(config, tiny_model, "torch")
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert est.weights == 4 * sum(p.numel() for p in base.parameters())  # float32 on CPU, tied head counted once
    model = get_peft_model(base, lora_config(config, base.config.num_hidden_layers))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert est.lora == 4 * trainable and est.optimizer == 12 * trainable


def test_quantized_weights_are_what_mlx_lm_stores(tiny_model):
    import wonderland.backends.mlx_lora.backend  # noqa: F401  (OpenBLAS before mlx)
    from mlx.utils import tree_flatten

    from wonderland.backends.mlx_lora.backend import load_base

    for q in ("4", "8"):
        model, _ = load_base(tiny_model, quantize=q)
        stored = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        assert preflight.estimate(TrainConfig(quantize=q), tiny_model, "mlx").weights == stored
    nf4 = preflight.weight_bytes(preflight.tensors(tiny_model), preflight.model_config(tiny_model), "nf4", 2)
    assert nf4 < preflight.estimate(TrainConfig(), tiny_model, "torch").weights


def test_the_nf4_estimate_follows_the_path_the_run_takes(tiny_model):
    """--quantize nf4 on CUDA: the fused layers (LoRA dropout 0, a llama) keep the bf16 fast path's
    activations plus one layer's de-quantized weights; the PEFT fallback (dropout > 0) checkpoints,
    builds the logits and keeps the other weights in float32."""
    named, cfg = preflight.tensors(tiny_model), preflight.model_config(tiny_model)

    def terms(**kw):
        return preflight._terms(TrainConfig(**kw), "torch", "cuda", named, cfg, None, "cuda:0")
    assert preflight.nf4_fused(TrainConfig(quantize="nf4"), cfg, "cuda")
    assert not preflight.nf4_fused(TrainConfig(quantize="nf4", dropout=0.1), cfg, "cuda")
    fused, plain, bf16 = terms(quantize="nf4"), terms(quantize="nf4", dropout=0.1), terms()
    assert fused.activations - bf16.activations == 2 * preflight.layer_weights(preflight.dims(cfg))
    assert fused.weights < bf16.weights  # 4-bit projections
    assert fused.weights < plain.weights  # and a bf16 embedding on the fused path, float32 off it (k-bit preparation)


def test_a_run_that_will_not_fit_warns_with_what_would(tiny_model, monkeypatch):
    full = preflight.estimate(TrainConfig(batch_size=8), tiny_model, "mlx")
    assert full.fits and full.warning() is None and full.suggestions == []
    one = preflight.estimate(TrainConfig(batch_size=1), tiny_model, "mlx")
    monkeypatch.setattr(preflight, "free_memory", lambda kind: (one.total / preflight.FIT_SHARE * 1.01, "RAM available"))
    tight = preflight.estimate(TrainConfig(batch_size=8), tiny_model, "mlx")
    assert not tight.fits
    assert [s["field"] for s in tight.suggestions] == ["batch_size"] and tight.suggestions[-1]["value"] == 1
    assert tight.warning().startswith(f"warning: this run needs ~{tight.total / 1e9:.1f} GB but RAM available has")
    assert "try --batch-size 1 (~" in tight.warning()
    monkeypatch.setattr(preflight, "free_memory", lambda kind: (1e3, "RAM available"))
    assert "try a smaller --batch-size or --max-seq-len, --quantize" in preflight.estimate(TrainConfig(), tiny_model, "mlx").warning()


def test_wonderland_train_prints_the_estimate_before_training(tiny_model, tmp_path, capsys, monkeypatch):
    data = write_dataset(tmp_path / "data")
    monkeypatch.setattr(preflight, "free_memory", lambda kind: (1e3, "RAM available"))
    assert main(["train", "--data", str(data), "--model", str(tiny_model), "--out", str(tmp_path / "run"),
                 "--preset", "smoke", "--kl", "0", "--replay", "0", "--iters", "1"]) == 0
    err = capsys.readouterr().err
    assert "memory estimate: ~" in err and "of 0.0 GB RAM available" in err
    assert "warning: this run needs" in err and err.index("memory estimate") < err.index("Training ")


def test_the_web_form_gets_the_estimate(tiny_model):
    from wonderland.web import create_app

    client = create_app().test_client()
    body = client.post("/api/train/estimate", json={"preset": "smoke", "config": {"model": str(tiny_model),
                                                                                   "backend": "mlx", "quantize": "4"}}).json
    est = body["estimate"]
    assert est["gb"]["total"] > 0 and est["fits"] and "RAM available" in est["where"] and est["warning"] is None
    assert est["summary"].startswith("memory estimate: ~")
    missing = client.post("/api/train/estimate", json={"config": {"model": "nobody-here/no-such-model"}}).json
    assert missing["estimate"] is None and "no estimate until nobody-here/no-such-model is on this machine" in missing["reason"]
    nf4 = client.post("/api/train/estimate", json={"config": {"model": str(tiny_model), "backend": "torch",
                                                             "quantize": "nf4"}}).json
    assert nf4["estimate"] is None and nf4["reason"] == NF4_NEEDS
    assert client.post("/api/train/estimate", json={"config": {"lr": "x"}}).status_code == 400


def long_records(folder: Path, words: int = 300) -> Path:
    """write_dataset's layout with replies long enough to be cut at any max_seq_len up to ~300 tokens."""
    write_dataset(folder)
    for name in ("train.jsonl", "valid.jsonl"):
        rows = [json.loads(line) for line in (folder / name).read_text().splitlines()]
        for r in rows:
            r["messages"][-1]["content"] = " ".join([r["messages"][-1]["content"]] * (words // 8))
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.parametrize("quantize", ["none", "4"])
def test_the_estimate_is_within_25_percent_of_the_measured_mlx_peak(tiny_model, tmp_path, quantize):
    """float32 and 4-bit (checkpointed: --grad-checkpoint auto) on the tiny model. The embedded model's
    figures: bench/README.md, "MLX 4-bit" (bench/preflight.py)."""
    import wonderland.backends.mlx_lora.backend  # noqa: F401,I001
    from wonderland.events import read_metrics
    from wonderland.train import train

    config = TrainConfig(model=str(tiny_model), backend="mlx", quantize=quantize, iters=2, batch_size=2, max_seq_len=192,
                         val_every=0, save_every=0, warmup=0, replay=0, kl=0)
    est = preflight.estimate(config, tiny_model, "mlx")
    import mlx.core as mx

    gc.collect()
    held = mx.get_active_memory()  # what earlier tests of this process keep alive (cached models): in the peak too
    run = train(config, long_records(tmp_path / "data"), out=str(tmp_path / "run"), log=lambda m: None)
    steps = [r for r in read_metrics(run.metrics) if r["event"] == "step"]
    assert all(r["tokens"] == config.batch_size * config.max_seq_len for r in steps)  # the estimate's worst case
    measured = max(r["peak_memory_gb"] for r in steps) * 1e9 - held  # MLX's allocator: the estimate less its runtime
    assert 0.75 < (est.total - est.runtime) / measured < 1.25, (est.to_dict(), measured)
