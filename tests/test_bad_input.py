"""Bad input to `wonderland train` / `chat`: one-line error naming the fix, exit code 2, nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import NO_GUARD, NO_GUARD_ARGS, write_dataset
from wonderland.cli import main
from wonderland.events import read_metrics


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(tmp_path / "data")


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def assert_user_error(code, err, *needles):
    assert code == 2
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("wonderland ") and "error:" in last
    for needle in needles:
        assert needle in last, (needle, last)


@pytest.mark.parametrize("args, needles", [
    (["--rank", "0"], ["--rank must be between 1 and"]),
    (["--lr", "0"], ["--lr must be > 0 and <= 1 (got 0.0)"]),
    (["--lr", "nan"], ["--lr must be a finite number (got nan)"]),
    (["--lr", "inf"], ["--lr must be a finite number (got inf)"]),
    (["--lr", "1e308"], ["--lr must be > 0 and <= 1 (got 1e+308)"]),
    (["--iters", "-3"], ["--iters must be between 1 and"]),
    (["--batch-size", "99"], ["--batch-size 99 is larger than the dataset (6 training records)"]),
    (["--model", "/no/such/model"], ["model not found", "/no/such/model"]),
])
def test_bad_training_options(capsys, dataset, tmp_path, args, needles):
    out = tmp_path / "run"
    code, err = run_cli(capsys, "train", "--data", str(dataset), "--out", str(out), *args)
    assert_user_error(code, err, *needles)
    assert not out.exists()


def test_missing_data_folder(capsys, tmp_path):
    code, err = run_cli(capsys, "train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run"))
    assert_user_error(code, err, "data folder not found", "wonderland data")
    assert not (tmp_path / "run").exists()


def test_malformed_jsonl_names_file_and_line(capsys, dataset, tmp_path):
    lines = (dataset / "train.jsonl").read_text().splitlines()
    lines[2] = '{"messages": [oops'
    (dataset / "train.jsonl").write_text("\n".join(lines) + "\n")
    code, err = run_cli(capsys, "train", "--data", str(dataset), "--out", str(tmp_path / "run"))
    assert_user_error(code, err, "train.jsonl:3", "malformed JSON")
    assert not (tmp_path / "run").exists()


def test_empty_jsonl(capsys, dataset, tmp_path):
    (dataset / "train.jsonl").write_text("")
    code, err = run_cli(capsys, "train", "--data", str(dataset), "--out", str(tmp_path / "run"))
    assert_user_error(code, err, "train.jsonl")
    assert not (tmp_path / "run").exists()


def test_output_not_writable(capsys, dataset, tiny_model, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, err = run_cli(capsys, "train", "--data", str(dataset), "--model", str(tiny_model),
                        "--out", str(blocker / "run"))
    assert_user_error(code, err, "cannot write the run", "--out")


def test_existing_run_is_never_overwritten_without_the_flag(capsys, dataset, tiny_model, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", str(dataset), "--model", str(tiny_model), "--out", str(out), "--iters", "2",
            "--batch-size", "2", "--val-every", "0", "--save-every", "0", *NO_GUARD_ARGS]
    assert main(args) == 0
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    code, err = run_cli(capsys, *args)
    assert_user_error(code, err, "already holds a run", "--overwrite")
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert main([*args, "--overwrite", "--lr", "0.05"]) == 0
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() != adapter


def test_overwrite_keeps_the_old_run_until_the_new_one_trained(dataset, tiny_model, tmp_path):
    from wonderland.config import TrainConfig
    from wonderland.runs import replaced_backup
    from wonderland.train import train

    out = tmp_path / "run"
    config = TrainConfig(model=str(tiny_model), iters=2, batch_size=2, val_every=0, save_every=0, **NO_GUARD)
    train(config, dataset, out=str(out), log=lambda m: None)
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()

    polls = iter([False])  # the loop polls should_stop before each step: the second poll (after step 1) fails

    def crash() -> bool:
        if next(polls, None) is None:
            raise RuntimeError("power cut")
        return False

    with pytest.raises(RuntimeError, match="power cut"):
        train(config, dataset, out=str(out), overwrite=True, should_stop=crash, log=lambda m: None)
    failed = [r for r in read_metrics(out / "metrics.jsonl") if r["event"] == "failed"]
    assert len(failed) == 1 and failed[0]["step"] == 1 and "power cut" in failed[0]["error"]
    kept = replaced_backup(out)
    assert (kept / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert (out / "run.json").exists() and '"failed"' in (out / "run.json").read_text()

    train(config, dataset, out=str(out), overwrite=True, log=lambda m: None)
    assert not kept.exists() and (out / "adapter" / "adapter_model.safetensors").exists()


def test_unknown_run_for_chat(capsys):
    code, err = run_cli(capsys, "chat", "--run", "no-such-run", "--prompt", "hi")
    assert_user_error(code, err, "no run named or found at 'no-such-run'")


def test_no_traceback_from_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "wonderland", "train", "--data", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["nlrun\n", "bell\x07", "a" * 101, "dot.ted"])
def test_bad_run_names_exit_2(capsys, dataset, wl_home, name):
    code, err = run_cli(capsys, "train", "--data", str(dataset), "--name", name, "--iters", "1")
    assert_user_error(code, err, "invalid run name")
    assert not (wl_home / "runs").exists() or not any((wl_home / "runs").iterdir())
