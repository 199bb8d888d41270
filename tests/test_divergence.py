"""A run whose loss turns non-finite or diverges stops as failed with its reason; the last good
checkpoint is kept and nothing non-finite is written (the rule: backends/common.DivergenceGuard,
docs/ARCHITECTURE.md "Divergence")."""

from __future__ import annotations

import math

import pytest

from tests.helpers import NO_GUARD, NO_GUARD_ARGS, write_dataset
from wonderland.backends.common import Diverged, DivergenceGuard
from wonderland.events import read_metrics
from wonderland.runs import RunDir


def test_a_non_finite_loss_stops_at_once():
    guard = DivergenceGuard()
    guard.check(1, 10.0)
    with pytest.raises(Diverged, match="non-finite .nan. at step 2"):
        guard.check(2, math.nan)
    with pytest.raises(Diverged, match="non-finite .inf. at step 3"):
        guard.check(3, math.inf)


def test_a_loss_above_three_times_the_baseline_for_five_steps_stops():
    guard = DivergenceGuard(baseline_steps=10, factor=3.0, patience=5)
    for step in range(1, 11):
        guard.check(step, 2.0)  # baseline 2.0: limit 6.0
    for step in range(11, 15):
        guard.check(step, 7.0)  # four steps over the limit: not yet
        assert not guard.healthy
    guard.check(15, 5.0)  # back under the limit: the count starts again
    assert guard.healthy
    for step in range(16, 20):
        guard.check(step, 7.0)
    with pytest.raises(Diverged, match="above 6 .3x the mean of the first 10 steps. for 5 steps in a row, 7 at step 20"):
        guard.check(20, 7.0)


def test_a_high_loss_before_the_baseline_is_set_is_not_divergence():
    guard = DivergenceGuard(baseline_steps=10)
    for step, loss in enumerate([10.0, 50.0, 80.0, 90.0, 95.0, 99.0], 1):
        guard.check(step, loss)
    assert guard.healthy


def _loss_times(monkeypatch, factor_from_step: dict):
    """Wrap the torch backend's step loss: from the given step on (1-based), multiply it."""
    from wonderland.backends.torch_peft import backend

    real = backend.step_loss

    def patched(s, start=0):
        loss = real(s, start)
        calls = [0]

        def wrapped(batch):
            calls[0] += 1
            loss_sum, n, tokens = loss(batch)
            factor = next((f for start, f in sorted(factor_from_step.items(), reverse=True) if calls[0] >= start), 1.0)
            return loss_sum * factor, n, tokens
        return wrapped

    monkeypatch.setattr(backend, "step_loss", patched)


def _train(tmp_path, tiny_model, **kw):
    from wonderland.config import TrainConfig
    from wonderland.train import train

    config = TrainConfig(model=str(tiny_model), batch_size=2, warmup=0, val_every=0, **{**NO_GUARD, **kw})
    out = tmp_path / "run"
    with pytest.raises(Diverged) as failed:
        train(config, write_dataset(tmp_path / "data"), out=str(out), log=lambda m: None)
    return RunDir(out), str(failed.value)


def test_torch_a_nan_loss_fails_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model, monkeypatch):
    _loss_times(monkeypatch, {4: math.nan})
    run, reason = _train(tmp_path, tiny_model, iters=10, save_every=2)
    info = run.read()
    assert info["status"] == "failed" and "non-finite (nan) at step 4" in info["error"] and reason in info["error"]
    records = read_metrics(run.metrics)
    assert [r["step"] for r in records if r["event"] == "step"] == [1, 2, 3]
    assert records[-1]["event"] == "failed"
    assert "NaN" not in run.metrics.read_text()
    assert run.latest_checkpoint().name == "step-000002"
    assert not run.adapter.exists()


def test_torch_a_diverging_loss_fails_and_no_checkpoint_is_taken_while_it_climbs(tmp_path, tiny_model, monkeypatch):
    _loss_times(monkeypatch, {13: 100.0})  # steps 1-12 normal (~10.8), then ~1080: above 3x the baseline
    run, _ = _train(tmp_path, tiny_model, iters=30, save_every=4)
    info = run.read()
    assert info["status"] == "failed" and "diverged" in info["error"] and "at step 17" in info["error"]
    assert [r["step"] for r in read_metrics(run.metrics) if r["event"] == "step"] == list(range(1, 17))
    assert run.latest_checkpoint().name == "step-000012"  # step 16 was above the limit: not saved


def test_mlx_a_nan_loss_fails_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model, monkeypatch):
    from wonderland.backends.mlx_lora import backend

    real = backend._Reporter.on_train_loss_report

    def nan_at_step_4(self, info):
        if self.start + info["iteration"] >= 4:
            info = {**info, "train_loss": math.nan}
        real(self, info)

    monkeypatch.setattr(backend._Reporter, "on_train_loss_report", nan_at_step_4)
    run, _ = _train(tmp_path, tiny_model, iters=10, save_every=2, backend="mlx")
    info = run.read()
    assert info["status"] == "failed" and "non-finite (nan) at step 4" in info["error"]
    assert [r["step"] for r in read_metrics(run.metrics) if r["event"] == "step"] == [1, 2, 3]
    assert run.latest_checkpoint().name == "step-000002"
    assert not run.adapter.exists() and not list(run.path.glob(".adapter*"))  # no staging left


def test_the_cli_says_why_in_one_line_and_exits_2(tmp_path, tiny_model, monkeypatch, capsys):
    from wonderland.cli import main

    _loss_times(monkeypatch, {2: math.inf})
    data = write_dataset(tmp_path / "data")
    code = main(["train", "--data", str(data), "--model", str(tiny_model), "--out", str(tmp_path / "run"),
                 "--iters", "5", "--batch-size", "2", "--warmup", "0", "--val-every", "0", *NO_GUARD_ARGS])
    assert code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "non-finite" in ln]
    assert len(err) == 1 and "lower --lr" in err[0]
