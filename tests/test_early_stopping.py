"""Early stopping (``--patience``): a run ends once the probe has not beaten its best checkpoint for
``patience`` points in a row; what it trained up to there, and the checkpoint it serves, are what
the full run had at that point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import NO_GUARD_ARGS, train_tiny_run
from wonderland.cli import main
from wonderland.probe import Ledger, best

# 12 probed points; lr high enough that the tiny model's held-out lines get less likely again
RUN = ("--iters", "24", "--val-every", "2", "--lr", "1e-2", "--threads", "1", *NO_GUARD_ARGS)


def _row(step: int, margin: float, drift: float = 0.0) -> dict:
    return {"val_loss": 1.0, "persona_margin": margin, "retention_drift": drift}


def test_a_ledger_is_stalled_after_patience_points_that_do_not_beat_its_best(tmp_path):
    ledger = Ledger(tmp_path)
    for step, margin in ((10, -0.6), (20, -0.4), (30, -0.5)):
        ledger.add(step, _row(step, margin))
    assert not ledger.stalled(2) and ledger.stalled(1) and not ledger.stalled(0)
    ledger.add(40, _row(40, -0.45))
    assert ledger.stalled(2) and not ledger.stalled(3)
    ledger.add(50, _row(50, -0.3))  # a new best: the count starts again
    assert not ledger.stalled(1)
    ledger.add(60, _row(60, 0.9, drift=1.0))  # a higher margin that drifted too far does not count as better
    assert ledger.stalled(1) and ledger.best_step() == 50


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("early")
    return {"full": train_tiny_run(tiny_model, root / "full", *RUN, "--patience", "0"),
            "early": train_tiny_run(tiny_model, root / "early", *RUN, "--patience", "1")}


def _rows(run: Path) -> list[dict]:
    return json.loads((run / "run.json").read_text())["result"]["checkpoints"]


def test_the_run_stops_at_the_first_stalled_point_and_serves_the_full_run_s_choice_so_far(runs):
    full, early = _rows(runs["full"]), _rows(runs["early"])
    assert len(full) == 12
    k = next(i for i in range(1, len(full) + 1) if sum(r["step"] > best(full[:i])["step"] for r in full[:i]) >= 1)
    assert k < len(full), "the full run never stalled: this run tests nothing"
    assert early == full[:k]  # the same training up to the stop, point for point
    info = json.loads((runs["early"] / "run.json").read_text())
    stop, top = full[k - 1]["step"], best(full[:k])["step"]
    assert info["status"] == "finished"
    assert info["result"]["step"] == stop and info["result"]["best_step"] == top
    assert info["result"]["stopped_early"] == {"step": stop, "patience": 1}
    served = (runs["early"] / "adapter" / "adapter_model.safetensors").read_bytes()
    assert served == (runs["early"] / "checkpoints" / f"step-{top:06d}" / "adapter" / "adapter_model.safetensors").read_bytes()
    events = [json.loads(ln) for ln in (runs["early"] / "metrics.jsonl").read_text().splitlines()]
    assert max(e["step"] for e in events if e["event"] == "step") == stop
    assert events[-1]["event"] == "finished" and events[-1]["stopped_early"] is True and events[-1]["best_step"] == top


def test_an_early_stopped_run_resumes_only_with_patience_0_and_then_trains_every_step(runs, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["early"], run)
    assert main(["train", "--resume", str(run), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "stopped early at step" in err and "--patience 0" in err and "Traceback" not in err
    assert main(["train", "--resume", str(run), "--patience", "0", "--threads", "1"]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["result"]["step"] == 24 and "stopped_early" not in info["result"]
    assert _rows(run) == _rows(runs["full"])  # the resumed run caught up with the full one exactly
