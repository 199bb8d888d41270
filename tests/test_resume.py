"""Resume validation (torchtune-style): the checkpoint's saved config is read back; a resume that
changes what is learned exits 2 with one line naming the field unless --allow-config-change; lr,
schedule, warmup, a larger --iters and the cadences may change; a checkpoint whose adapter does not
fit the model (missing / unexpected keys) is an error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import NO_GUARD, write_dataset
from wonderland.cli import main
from wonderland.events import StopFlag


@pytest.fixture(scope="module")
def stopped_template(tmp_path_factory, tiny_model) -> Path:
    """A run of 6 steps stopped after step 2 (checkpoint step-000002), trained once per module."""
    from wonderland.config import TrainConfig
    from wonderland.train import train

    root = tmp_path_factory.mktemp("stopped")
    out = root / "run"
    config = TrainConfig(model=str(tiny_model), iters=6, batch_size=2, warmup=0, val_every=0, save_every=0, seed=0,
                         **NO_GUARD)
    stop = StopFlag()
    train(config, write_dataset(root / "data"), out=str(out), should_stop=stop, log=lambda m: None,
          subscribers=[lambda r: r["event"] == "step" and r["step"] == 2 and stop.set()])
    assert (out / "checkpoints" / "step-000002" / "trainer_state.json").exists()
    return out


@pytest.fixture
def stopped_run(stopped_template, tmp_path) -> Path:
    """A fresh copy of the stopped run for each test (tests resume, tamper with and rewrite it)."""
    import shutil

    return Path(shutil.copytree(stopped_template, tmp_path / "run"))


def _snapshot(run: Path) -> tuple[bytes, bytes]:
    return (run / "run.json").read_bytes(), (run / "metrics.jsonl").read_bytes()


@pytest.mark.parametrize("flag,value", [("--seed", "3"), ("--rank", "8"), ("--alpha", "8"), ("--dropout", "0.1"),
                                        ("--targets", "q_proj"), ("--layers", "1"), ("--batch-size", "3"),
                                        ("--max-seq-len", "64")])
def test_a_resume_that_changes_what_is_learned_exits_2_naming_the_field(stopped_run, capsys, flag, value):
    before = _snapshot(stopped_run)
    assert main(["train", "--resume", str(stopped_run), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"would change {flag} " in err and "--allow-config-change" in err
    assert _snapshot(stopped_run) == before  # nothing written


def test_a_resume_on_changed_data_exits_2(stopped_run, tmp_path, capsys):
    other = write_dataset(tmp_path / "other", n_valid=3)
    assert main(["train", "--resume", str(stopped_run), "--data", str(other)]) == 2
    assert "would change --data " in capsys.readouterr().err


def test_the_saved_config_of_the_checkpoint_is_what_is_compared(stopped_run, capsys):
    """run.json's config is edited to seed 5; the checkpoint says seed 0; resuming with seed 5 is a change."""
    info = json.loads((stopped_run / "run.json").read_text())
    info["config"]["seed"] = 5
    (stopped_run / "run.json").write_text(json.dumps(info))
    assert main(["train", "--resume", str(stopped_run)]) == 2
    assert "would change --seed (0 -> 5)" in capsys.readouterr().err


def test_allow_config_change_lets_the_resume_go_on(stopped_run):
    assert main(["train", "--resume", str(stopped_run), "--seed", "3", "--allow-config-change"]) == 0
    info = json.loads((stopped_run / "run.json").read_text())
    assert info["status"] == "finished" and info["config"]["seed"] == 3


def test_lr_schedule_warmup_iters_and_cadence_may_change(stopped_run):
    assert main(["train", "--resume", str(stopped_run), "--lr", "5e-4", "--schedule", "constant", "--warmup", "1",
                 "--iters", "7", "--val-every", "3", "--save-every", "3"]) == 0
    info = json.loads((stopped_run / "run.json").read_text())
    assert info["status"] == "finished" and info["result"]["step"] == 7


def test_iters_must_go_past_the_checkpoint(stopped_run, capsys):
    assert main(["train", "--resume", str(stopped_run), "--iters", "2"]) == 2
    assert "does not go past the checkpoint's step 2" in capsys.readouterr().err


@pytest.mark.parametrize("tamper", ["drop", "extra"])
def test_a_checkpoint_adapter_with_missing_or_unexpected_keys_is_an_error(stopped_run, capsys, tamper):
    from safetensors.torch import load_file, save_file

    path = stopped_run / "checkpoints" / "step-000002" / "adapter" / "adapter_model.safetensors"
    state = load_file(path)
    first = sorted(state)[0]
    if tamper == "drop":
        del state[first]
    else:
        state[first.replace("lora_A", "lora_C")] = state[first].clone()
    save_file(state, path)
    assert main(["train", "--resume", str(stopped_run)]) == 2
    err = capsys.readouterr().err
    assert "does not match the model's LoRA layers" in err
    assert ("missing 1" if tamper == "drop" else "unexpected 1") in err
