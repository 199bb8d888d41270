"""The MLX backend (mlx-lm) through the real CLI on Linux CPU, on a tiny random llama.

Runs the real mlx-lm training loop and generation (the ``mlx[cpu]`` build): files, metrics,
adapter loadable by plain ``mlx_lm.load``, stop/resume, schedule parity with the torch backend,
and the install message when MLX is missing.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from wonderland.cli import main
from wonderland.config import TrainConfig

# Import the backend before anything imports mlx: it loads OpenBLAS for MLX first (~10x faster on CPU).
import wonderland.backends.mlx_lora.backend  # noqa: E402,F401,I001
from tests.helpers import NO_GUARD, NO_GUARD_ARGS, SAMPLED, assert_adapter_switches_per_call, write_dataset  # noqa: E402
from wonderland.events import StopFlag, read_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
@pytest.fixture
def dataset(tmp_path) -> Path:
    return write_dataset(tmp_path / "data")


def mlx_args(dataset: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--backend", "mlx", "--data", str(dataset), "--model", str(model), "--out", str(out),
            "--iters", "4", "--batch-size", "2", "--lr", "1e-2", "--val-every", "2", "--save-every", "2",
            "--warmup", "0", "--schedule", "constant", *NO_GUARD_ARGS, *extra]


def test_mlx_train_writes_mlx_lm_adapter_and_metrics(dataset, tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(mlx_args(dataset, tiny_model, out)) == 0
    assert sorted(p.name for p in out.iterdir()) == [".lock", "adapter", "checkpoints", "metrics.jsonl", "run.json"]
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapters.safetensors"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    ckpt = out / "checkpoints" / "step-000002"
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapter", "optimizer.safetensors", "trainer_state.json"]

    records = read_metrics(out / "metrics.jsonl")
    assert [r["seq"] for r in records] == list(range(len(records)))
    assert [r["event"] for r in records] == ["started", "step", "step", "eval", "checkpoint", "step", "step", "eval", "finished"]
    assert records[0]["backend"] == "mlx" and records[0]["device"].startswith("cpu")
    steps = [r for r in records if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert math.isfinite(r["loss"]) and r["learning_rate"] == pytest.approx(1e-2)
        assert r["tokens"] > 0 and r["tokens_per_second"] > 0 and r["peak_memory_gb"] > 0
    assert steps[-1]["eta_s"] == 0

    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["backend"] == "mlx" and info["adapter_format"] == "mlx-lm"
    assert {"mlx", "mlx-lm"} <= info["versions"].keys()
    assert info["result"]["step"] == 4 and math.isfinite(info["result"]["val_loss"])
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 2
    assert config["lora_parameters"] == {"rank": TrainConfig().rank, "scale": 2.0, "dropout": 0.0, "keys": [
        "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj",
        "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]}
    assert "Adapter saved to" in capsys.readouterr().out

    # Compare on the CLI serves an MLX run like a torch one
    assert main(["chat", "--run", str(out), "--prompt", "What time is it?", "--compare", "--max-tokens", "8"]) == 0
    text = capsys.readouterr().out
    assert ">>> What time is it?" in text and all(arm in text for arm in ("[    base]", "[prompted]", "[ trained]"))

    # plain mlx-lm, no wonderland code: load the base + adapter and generate
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(tiny_model), adapter_path=str(out / "adapter"))
    text = mlx_lm.generate(model, tokenizer, prompt="What time is it?", max_tokens=4)
    assert isinstance(text, str) and text


def test_mlx_adapter_changes_the_output_and_base_stays_pure(dataset, tiny_model, tmp_path):
    import mlx.core as mx

    from wonderland.backends import get_backend
    from wonderland.config import GenerationConfig
    from wonderland.generate import load_run

    out = tmp_path / "run"
    assert main(mlx_args(dataset, tiny_model, out, "--lr", "0.1", "--iters", "12", "--rank", "16", "--sample-every", "6",
                         "--targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")) == 0
    samples = [r for r in read_metrics(out / "metrics.jsonl") if r["event"] == "sample"]
    assert [r["step"] for r in samples] == [6, 12] and all(isinstance(r["reply"], str) for r in samples)
    loaded = load_run(str(out))
    assert loaded.model.has_adapter
    plain = get_backend("mlx").load(tiny_model)
    records = [json.loads(line) for line in (Path(loaded.info["data"]["path"]) / "train.jsonl").read_text().splitlines()]
    on, n = loaded.model.loss(records, adapter=True)
    off, n_off = loaded.model.loss(records, adapter=False)
    ref, _ = plain.loss(records)
    assert n == n_off > 0 and on < off - 1.0  # trained on these records: clearly lower NLL
    assert off == ref  # adapter off == a model loaded without it, exactly

    user = [{"role": "user", "content": "What time is it?"}]
    assert_adapter_switches_per_call(loaded.model, plain, records[:2], loaded.messages_for("trained", user))
    # interleaved Base and Trained streams on one model give what each gives alone
    gen = GenerationConfig(**SAMPLED)
    base_ref = "".join(plain.stream(loaded.messages_for("base", user), gen))
    trained_ref = "".join(loaded.stream("trained", user, gen))
    base_stream, trained_stream = loaded.stream("base", user, gen), loaded.stream("trained", user, gen)
    parts: dict[str, list[str]] = {"base": [], "trained": []}
    for b, t in zip(base_stream, trained_stream):
        parts["base"].append(b)
        parts["trained"].append(t)
    parts["base"] += list(base_stream)
    parts["trained"] += list(trained_stream)
    assert "".join(parts["base"]) == base_ref and "".join(parts["trained"]) == trained_ref

    sampled = GenerationConfig(temperature=1.0, top_p=0.9, max_tokens=12, seed=7)
    first = "".join(loaded.stream("trained", user, sampled))
    mx.random.seed(123)  # the global RNG must not matter: each stream has its own seeded key
    assert "".join(loaded.stream("trained", user, sampled)) == first


def test_mlx_stop_then_resume_matches_an_uninterrupted_run(dataset, tiny_model, tmp_path):
    import mlx.core as mx

    from wonderland.config import TrainConfig
    from wonderland.train import train

    config = TrainConfig(model=str(tiny_model), backend="mlx", iters=5, batch_size=2, lr=1e-2, warmup=2,
                         val_every=0, save_every=0, **NO_GUARD)
    straight = train(config, dataset, out=str(tmp_path / "a"), log=lambda m: None)
    stop = StopFlag()
    stopped = train(config, dataset, out=str(tmp_path / "b"), should_stop=stop, log=lambda m: None,
                    subscribers=[lambda r: r["event"] == "step" and r["step"] == 2 and stop.set()])
    info = stopped.read()
    assert info["status"] == "stopped" and info["result"]["step"] == 2
    assert sorted(p.name for p in stopped.checkpoints.iterdir()) == ["step-000002"]
    assert sorted(p.name for p in stopped.path.iterdir()) == [".lock", "checkpoints", "metrics.jsonl", "run.json"]  # no staging left

    assert main(["train", "--resume", str(tmp_path / "b")]) == 0
    records = read_metrics(stopped.metrics)
    assert [r["seq"] for r in records] == list(range(len(records)))
    kinds = [r["event"] for r in records]
    assert kinds.count("stopped") == 1 and kinds.count("resumed") == 1 and kinds[-1] == "finished"
    assert [r["step"] for r in records if r["event"] == "step"] == [1, 2, 3, 4, 5]
    # same data order, optimizer moments and schedule position: the same adapter
    a = mx.load(str(straight.adapter / "adapters.safetensors"))
    b = mx.load(str(stopped.adapter / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert mx.abs(a[k] - b[k]).max().item() < 1e-5, k
    lrs = [r["learning_rate"] for r in read_metrics(straight.metrics) if r["event"] == "step"]
    assert lrs == [r["learning_rate"] for r in records if r["event"] == "step"]


@pytest.mark.parametrize("schedule,warmup,iters", [("cosine", 5, 60), ("cosine", 1, 10), ("constant", 0, 8), ("constant", 3, 8)])
def test_mlx_schedule_equals_the_torch_schedule(schedule, warmup, iters):
    from wonderland.backends.mlx_lora.backend import lr_schedule
    from wonderland.backends.common import lr_at
    from wonderland.config import TrainConfig

    cfg = TrainConfig(lr=1e-3, schedule=schedule, warmup=warmup, iters=iters)
    fn = lr_schedule(cfg)
    import mlx.core as mx

    for step in range(iters):
        assert fn(mx.array(step)).item() == pytest.approx(lr_at(step, cfg), rel=1e-5), step


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_backend_mlx_without_mlx_says_what_to_install(dataset, tiny_model, tmp_path):
    # a meta-path finder that answers for mlx/mlx_lm as Python does when a package is not installed
    code = ("import sys\n"
            "class NotInstalled:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('mlx', 'mlx_lm'):\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, NotInstalled())\n"
            "from wonderland.cli import main\n"
            f"sys.exit(main({mlx_args(dataset, tiny_model, tmp_path / 'run')!r}))")
    proc = _run_python(code)
    assert proc.returncode == 2, proc.stderr
    assert "the mlx backend needs 'mlx', which is not installed: pip install 'wonderland[mlx]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_importing_wonderland_never_imports_mlx():
    proc = _run_python("import sys, wonderland, wonderland.cli, wonderland.train, wonderland.generate, "
                       "wonderland.backends.torch_peft.adapters, wonderland.backends.torch_peft.backend\n"
                       "from wonderland.cli import build_parser; build_parser()\n"
                       "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_mlx_on_linux_runs_on_openblas():
    """The OpenBLAS preload took effect (`make test` installs libopenblas0-pthread): without it every
    MLX matmul on Linux CPU goes through the wheel's reference BLAS, ~20x slower (bench/README.md)."""
    from wonderland.backends.mlx_lora import backend as mlx_backend, blas

    assert not sys.platform.startswith("linux") or blas.BLAS in blas.OPENBLAS_LIBS
    assert mlx_backend.device_name() == ("gpu (metal)" if sys.platform == "darwin" else "cpu (OpenBLAS)")


def test_mlx_run_is_served_through_torch_where_mlx_is_missing(dataset, tiny_model, tmp_path):
    """A run trained with MLX (say on a Mac) still chats where MLX is not installed: its adapter is
    converted to PEFT once, and the torch replies equal the ones of a PEFT-converted adapter."""
    out = tmp_path / "run"
    assert main(mlx_args(dataset, tiny_model, out)) == 0
    # transformers probes for mlx with find_spec at import time: import it before MLX "disappears"
    code = ("import sys, peft, transformers\n"
            "class NotInstalled:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('mlx', 'mlx_lm'):\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, NotInstalled())\n"
            "from wonderland.config import GenerationConfig\n"
            "from wonderland.generate import load_run\n"
            f"loaded = load_run({str(out)!r}, device='cpu')\n"
            "gen = GenerationConfig(temperature=0, max_tokens=8)\n"
            "msgs = [{'role': 'user', 'content': 'What time is it?'}]\n"
            "print(type(loaded.model).__name__, repr(''.join(loaded.stream('trained', msgs, gen))))\n")
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("TorchChatModel ")
    assert (out / "adapter-peft" / "adapter_model.safetensors").exists()

    from wonderland.backends import get_backend
    from wonderland.config import GenerationConfig

    torch_model = get_backend("torch").load(tiny_model, out / "adapter-peft", device="cpu")
    loaded_msgs = [{"role": "system", "content": json.loads((out / "run.json").read_text())["system_prompt"]},
                   {"role": "user", "content": "What time is it?"}]
    reply = "".join(torch_model.stream(loaded_msgs, GenerationConfig(temperature=0, max_tokens=8)))
    assert proc.stdout.strip() == f"TorchChatModel {reply!r}"


def test_checkpointed_layers_and_chunked_head_give_the_plain_loss_and_gradients(tiny_model):
    """--grad-checkpoint (issue 18): per-layer mx.checkpoint and the LM head in chunks under mx.checkpoint
    compute the loss and LoRA gradients of the model's own full logits, on the labelled tokens only."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map

    from tests.helpers import chat_records
    from wonderland.backends.mlx_lora.backend import training_model
    from wonderland.backends.mlx_lora.batching import collate, mean_loss

    batch = collate(chat_records(3, seed=1, lo=30, hi=60))

    def full_logits(model, ids, positions, weights):  # the reference: every position through the head
        logits = model(ids[:, :-1]).astype(mx.float32)
        nll = nn.losses.cross_entropy(logits, ids[:, 1:]).reshape(-1)[positions]
        return (nll * weights).sum() / weights.sum(), weights.sum()

    results = {}
    for name, setting, loss in [("full", "off", full_logits), ("gathered", "off", mean_loss),
                                ("checkpointed", "on", lambda m, *b: mean_loss(m, *b, chunk=16))]:
        mx.random.seed(0)
        model, _, _, checkpointed = training_model(TrainConfig(grad_checkpoint=setting), tiny_model)
        assert checkpointed == (setting == "on")
        assert all(type(layer).__name__.startswith("Checkpointed") == checkpointed for layer in model.layers)
        mx.random.seed(1)
        model.update(tree_map(lambda a: 0.05 * mx.random.normal(a.shape), model.trainable_parameters()))  # B != 0
        model.train()
        (value, n), grads = nn.value_and_grad(model, loss)(model, *batch)
        results[name] = value.item(), dict(tree_flatten(grads))
    ref_loss, ref_grads = results["full"]
    for name, (value, grads) in results.items():
        assert value == pytest.approx(ref_loss, rel=1e-5), name
        for key, g in ref_grads.items():
            assert mx.abs(grads[key] - g).max().item() <= 1e-4 * max(mx.abs(g).max().item(), 1e-6), (name, key)


def test_grad_checkpoint_on_trains_a_float_run_and_samples_with_a_kv_cache(dataset, tiny_model, tmp_path):
    out = tmp_path / "run"
    assert main(mlx_args(dataset, tiny_model, out, "--grad-checkpoint", "on", "--sample-every", "2")) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["grad_checkpoint"] == "on" and info["result"]["grad_checkpoint"] is True
    events = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in events if r["event"] == "sample"] == [2, 4]
    losses = [r["loss"] for r in events if r["event"] == "step"]
    assert all(math.isfinite(v) for v in losses)
    plain = tmp_path / "plain"
    assert main(mlx_args(dataset, tiny_model, plain, "--grad-checkpoint", "off")) == 0  # same run, not checkpointed
    assert json.loads((plain / "run.json").read_text())["result"]["grad_checkpoint"] is False
    plain_losses = [r["loss"] for r in read_metrics(plain / "metrics.jsonl") if r["event"] == "step"]
    assert plain_losses == pytest.approx(losses, rel=1e-3)
