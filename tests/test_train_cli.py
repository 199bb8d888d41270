"""The training recipe through the real CLI, on a tiny random llama: files, metrics, resume, chat."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers import NO_GUARD, NO_GUARD_ARGS, SAMPLED, SYSTEM, assert_adapter_switches_per_call, write_dataset
from wonderland.cli import main
from wonderland.config import TrainConfig
from wonderland.events import StopFlag, read_metrics

@pytest.fixture
def dataset(tmp_path) -> Path:
    return write_dataset(tmp_path / "data")


def train_args(dataset: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(dataset), "--model", str(model), "--out", str(out), "--iters", "4",
            "--batch-size", "2", "--lr", "1e-2", "--val-every", "2", "--save-every", "2", "--warmup", "0", "--schedule", "constant",
            *NO_GUARD_ARGS, *extra]


@pytest.fixture(scope="module")
def cli_run(tiny_model, tmp_path_factory) -> tuple[Path, Path, str]:
    """One CLI run of :func:`train_args` for the tests that only read it: (dataset, run, its stdout)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("cli-run")
    dataset, out, printed = write_dataset(root / "data"), root / "run", io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(train_args(dataset, tiny_model, out)) == 0
    return dataset, out, printed.getvalue()


def test_train_writes_run_folder_and_metrics(cli_run, tiny_model):
    dataset, out, printed = cli_run
    assert sorted(p.name for p in out.iterdir()) == [".lock", "adapter", "checkpoints", "metrics.jsonl", "run.json"]
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    # every validation point gets a checkpoint (the last one too); best.json names the one served as adapter/
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.json", "step-000002", "step-000004"]
    assert sorted(p.name for p in (out / "checkpoints" / "step-000002").iterdir()) == [
        "adapter", "trainer.pt", "trainer_state.json"]

    records = read_metrics(out / "metrics.jsonl")
    assert [r["seq"] for r in records] == list(range(len(records)))
    kinds = [r["event"] for r in records]
    assert kinds == ["started", "step", "step", "eval", "checkpoint", "step", "step", "eval", "checkpoint", "finished"]
    for r in records:
        assert {"event", "seq", "time", "step", "total_steps"} <= r.keys() and r["total_steps"] == 4
    steps = [r for r in records if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert math.isfinite(r["loss"]) and r["tokens_per_second"] > 0 and r["learning_rate"] == pytest.approx(1e-2)
        assert {"elapsed_s", "eta_s", "peak_memory_gb", "tokens"} <= r.keys()
    assert steps[-1]["eta_s"] == 0

    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["schema_version"] == 1
    assert info["config"]["iters"] == 4 and info["config"]["rank"] == TrainConfig().rank and info["config"]["lr"] == 1e-2
    assert info["model"]["path"] == str(tiny_model) and len(info["model"]["sha256"]) == 64
    assert info["data"]["train_records"] == 6 and info["data"]["valid_records"] == 2
    assert info["system_prompt"] == SYSTEM and info["adapter_format"] == "peft" and info["backend"] == "torch"
    assert {"torch", "transformers", "peft", "wonderland"} <= info["versions"].keys()
    assert info["result"]["step"] == 4 and math.isfinite(info["result"]["val_loss"])
    assert "Adapter saved to" in printed


def test_adapter_reloads_and_changes_the_output(cli_run, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, out, _ = cli_run
    ids = torch.tensor([[1, 504, 3055, 314, 357, 47]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
        after = tuned(ids).logits
        with tuned.disable_adapter():
            off = tuned(ids).logits
    assert not torch.allclose(before, after, atol=1e-4)
    assert torch.allclose(before, off)


def test_stop_then_resume_continues_from_the_checkpoint(dataset, tiny_model, tmp_path):
    from wonderland.config import TrainConfig
    from wonderland.train import train

    out = tmp_path / "run"
    config = TrainConfig(model=str(tiny_model), iters=6, batch_size=2, lr=1e-2, warmup=0, val_every=0, save_every=0,
                         **NO_GUARD)
    stop = StopFlag()
    run = train(config, dataset, out=str(out), should_stop=stop, log=lambda m: None,
                subscribers=[lambda r: r["event"] == "step" and r["step"] == 3 and stop.set()])
    info = run.read()
    assert info["status"] == "stopped" and info["result"]["step"] == 3
    assert (out / "checkpoints" / "step-000003" / "trainer_state.json").exists()
    assert not (out / "adapter").exists()

    assert main(["train", "--resume", str(out)]) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert [r["seq"] for r in records] == list(range(len(records)))
    kinds = [r["event"] for r in records]
    assert kinds.count("stopped") == 1 and kinds.count("resumed") == 1 and kinds[-1] == "finished"
    steps = [r["step"] for r in records if r["event"] == "step"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_a_stop_on_a_save_step_writes_its_checkpoint_once(dataset, tiny_model, tmp_path, monkeypatch):
    """Stop requested during step 2, a save step: its checkpoint is written once (one Checkpoint
    event, one write), and the Stopped event names that checkpoint."""
    from wonderland.backends.torch_peft.backend import TorchBackend
    from wonderland.train import train

    writes = []
    save = TorchBackend._save_checkpoint
    monkeypatch.setattr(TorchBackend, "_save_checkpoint", lambda self, job, model, opt, step:
                        writes.append(step) or save(self, job, model, opt, step))
    config = TrainConfig(model=str(tiny_model), iters=4, batch_size=2, warmup=0, val_every=2, save_every=2, **NO_GUARD)
    stop = StopFlag()
    run = train(config, dataset, out=str(tmp_path / "run"), should_stop=stop, log=lambda m: None,
                subscribers=[lambda r: r["event"] == "step" and r["step"] == 2 and stop.set()])
    assert run.read()["status"] == "stopped" and writes == [2]
    records = read_metrics(run.metrics)
    checkpoints = [r for r in records if r["event"] == "checkpoint"]
    assert [r["step"] for r in checkpoints] == [2]
    assert [r["checkpoint"] for r in records if r["event"] == "stopped"] == [checkpoints[0]["path"]]


def test_resume_matches_an_uninterrupted_run(dataset, tiny_model, tmp_path):
    """Exact resume: the adapter after stop+resume equals the one from a straight run."""
    from safetensors.torch import load_file

    from wonderland.config import TrainConfig
    from wonderland.train import train

    config = TrainConfig(model=str(tiny_model), iters=4, batch_size=2, lr=1e-2, warmup=0, val_every=0, save_every=0)
    straight = train(config, dataset, out=str(tmp_path / "a"), log=lambda m: None)
    stop = StopFlag()
    train(config, dataset, out=str(tmp_path / "b"), should_stop=stop, log=lambda m: None,
          subscribers=[lambda r: r["event"] == "step" and r["step"] == 2 and stop.set()])
    resumed = train(config, None, resume=str(tmp_path / "b"), log=lambda m: None)
    a = load_file(straight.adapter / "adapter_model.safetensors")
    b = load_file(resumed.adapter / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-5, k


def test_chat_compare_prints_three_labelled_arms(cli_run, capsys):
    _, out, _ = cli_run
    assert main(["chat", "--run", str(out), "--prompt", "What time is it?", "--compare", "--max-tokens", "8"]) == 0
    text = capsys.readouterr().out
    assert ">>> What time is it?" in text
    for arm in ("[    base]", "[prompted]", "[ trained]"):
        assert arm in text


def test_base_arm_never_uses_the_adapter(dataset, tiny_model, tmp_path):
    """Base/Prompted run the same weights as a model loaded without any adapter (judged on losses)."""
    from wonderland.backends import get_backend
    from wonderland.config import GenerationConfig
    from wonderland.generate import load_run

    out = tmp_path / "run"
    # a strong adapter (high lr, rank 16 on every projection), so the trained scores move clearly
    assert main(train_args(dataset, tiny_model, out, "--lr", "0.1", "--iters", "12", "--rank", "16", "--val-every", "0",
                           "--save-every", "0", "--targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")) == 0
    loaded = load_run(str(out))
    plain = get_backend("torch").load(tiny_model)
    records = [json.loads(line) for line in (dataset / "train.jsonl").read_text().splitlines()]
    user = [{"role": "user", "content": "What time is it?"}]
    assert_adapter_switches_per_call(loaded.model, plain, records[:2], loaded.messages_for("trained", user))
    # the arms: Prompted and Base are the plain model's replies, also while a Trained stream interleaves
    gen = GenerationConfig(**SAMPLED)
    assert "".join(loaded.stream("prompted", user, gen)) == "".join(plain.stream(loaded.messages_for("prompted", user), gen))
    base_stream, trained_stream = loaded.stream("base", user, gen), loaded.stream("trained", user, gen)
    base_parts, trained_parts = [], []
    for b, t in zip(base_stream, trained_stream):
        base_parts.append(b)
        trained_parts.append(t)
    base_parts += list(base_stream)
    trained_parts += list(trained_stream)
    assert "".join(base_parts) == "".join(plain.stream(loaded.messages_for("base", user), gen))
    assert "".join(trained_parts) == "".join(loaded.stream("trained", user, gen))


def test_runs_lists_finished_runs(dataset, tiny_model, capsys):
    assert main(["runs"]) == 0
    assert "No runs in" in capsys.readouterr().out
    args = ["train", "--data", str(dataset), "--model", str(tiny_model), "--name", "hatter-test", "--iters", "2",
            "--batch-size", "2", "--val-every", "0", "--save-every", "0", *NO_GUARD_ARGS]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["runs", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["name"], r["status"], r["step"]) for r in rows] == [("hatter-test", "finished", 2)]


def test_yaml_configs_in_the_repo_are_valid():
    from wonderland.config import TrainConfig, load_yaml, merge_config

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        assert path.read_text().startswith("# wonderland train ")
        merge_config(TrainConfig, load_yaml(path), source=str(path))
