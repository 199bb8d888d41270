"""A crash never strands a run: the training process holds RUN/.lock; a `running` run whose lock is
free reads as `interrupted` (CLI, web, API); resuming it continues from the last checkpoint with one
step record per step in metrics.jsonl and no seq number used twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import NO_GUARD, NO_GUARD_ARGS, write_dataset
from wonderland.cli import main
from wonderland.errors import UserError
from wonderland.events import read_metrics, rewind_metrics
from wonderland.runs import RunDir

REPO = Path(__file__).resolve().parents[1]


def _wait_for(predicate, timeout_s: float = 120.0) -> None:
    """Poll a condition on files another process writes (the condition, not the delay, is the sync)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _checkpointed_with_tail(metrics: Path) -> bool:
    records = read_metrics(metrics)
    ckpts = [r["step"] for r in records if r["event"] == "checkpoint"]
    steps = [r["step"] for r in records if r["event"] == "step"]
    return bool(ckpts) and bool(steps) and steps[-1] >= ckpts[-1] + 2


@pytest.fixture(scope="module")
def killed_template(tmp_path_factory, tiny_model) -> Path:
    """A CLI training process killed with SIGKILL two or more steps after a checkpoint, plus a torn
    last line in metrics.jsonl (a write cut off mid-line); killed once per module."""
    home = tmp_path_factory.mktemp("crash-home")
    out = home / "runs" / "crashed"
    data = write_dataset(home / "data-crashed")
    cmd = [sys.executable, "-m", "wonderland", "train", "--data", str(data), "--model", str(tiny_model), "--name",
           "crashed", "--iters", "5000", "--batch-size", "2", "--save-every", "3", "--val-every", "0", "--warmup", "0",
           *NO_GUARD_ARGS]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "WONDERLAND_HOME": str(home)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: _checkpointed_with_tail(out / "metrics.jsonl"))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"event": "step", "seq": 99999, "st')
    return out


@pytest.fixture
def killed_run(killed_template, wl_home) -> Path:
    """The killed run, copied into this test's $WONDERLAND_HOME (tests read, mark and resume it)."""
    import shutil

    return Path(shutil.copytree(killed_template, wl_home / "runs" / "crashed"))


def test_a_killed_run_reads_as_interrupted_everywhere_and_is_written_so(killed_run, capsys):
    assert json.loads((killed_run / "run.json").read_text())["status"] == "running"  # what the crash left
    assert main(["runs", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["name"], r["status"]) for r in rows] == [("crashed", "interrupted")]
    assert json.loads((killed_run / "run.json").read_text())["status"] == "interrupted"


def test_the_web_run_list_offers_an_interrupted_run_for_resume(killed_run):
    from wonderland.web.app import create_app

    client = create_app().test_client()
    runs = client.get("/api/runs").get_json()["runs"]
    assert [(r["name"], r["status"], r["resumable"]) for r in runs] == [("crashed", "interrupted", True)]


def test_resuming_a_killed_run_keeps_one_step_record_per_step_and_never_reuses_a_seq(killed_run):
    before = read_metrics(killed_run / "metrics.jsonl")
    # the newest checkpoint on disk, as resume picks it: a kill can land after its folder was written
    # and before its "checkpoint" event was (a CI run of this test did)
    last_ckpt = max(int(d.name.split("-")[1]) for d in (killed_run / "checkpoints").glob("step-*"))
    assert max(r["step"] for r in before if r["event"] == "step") >= last_ckpt  # the steps up to it were logged
    max_seq = max(r["seq"] for r in before)
    iters = last_ckpt + 3
    assert main(["train", "--resume", str(killed_run), "--iters", str(iters)]) == 0

    records = read_metrics(killed_run / "metrics.jsonl")
    assert [r["step"] for r in records if r["event"] == "step"] == list(range(1, iters + 1))
    seqs = [r["seq"] for r in records]
    assert seqs == sorted(set(seqs))
    resumed = next(r for r in records if r["event"] == "resumed")
    assert resumed["seq"] > max_seq and resumed["step"] == last_ckpt
    assert len((killed_run / "metrics.jsonl").read_text().splitlines()) == len(records)  # no torn line left
    assert RunDir(killed_run).read()["status"] == "finished"


def test_a_run_in_training_reads_as_running_and_cannot_be_resumed_twice(tmp_path, tiny_model):
    from wonderland.config import TrainConfig
    from wonderland.train import train

    out = tmp_path / "run"
    seen = {}

    def at_step_2(record):
        if record["event"] == "step" and record["step"] == 2:
            seen["status"] = RunDir(out).read()["status"]
            try:
                train(config, None, resume=str(out), log=lambda m: None)
            except UserError as e:
                seen["resume"] = str(e)

    config = TrainConfig(model=str(tiny_model), iters=3, batch_size=2, warmup=0, val_every=0, save_every=1, **NO_GUARD)
    train(config, write_dataset(tmp_path / "data"), out=str(out), subscribers=[at_step_2], log=lambda m: None)
    assert seen["status"] == "running"
    assert "being trained" in seen["resume"]
    assert RunDir(out).read()["status"] == "finished"


def _write_lines(path: Path, records: list[dict], torn: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + torn)


def test_rewind_drops_the_replayed_tail_and_a_torn_line_and_keeps_the_seq_count(tmp_path):
    path = tmp_path / "metrics.jsonl"
    steps = [{"event": "step", "seq": s - 1, "step": s, "total_steps": 9} for s in range(1, 6)]
    ckpt = {"event": "checkpoint", "seq": 5, "step": 3, "total_steps": 9}
    _write_lines(path, steps[:3] + [ckpt] + steps[3:], torn='{"event": "st')
    nxt = rewind_metrics(path, 3, 9)
    records = read_metrics(path)
    assert [(r["event"], r["step"]) for r in records] == [("step", 1), ("step", 2), ("step", 3), ("checkpoint", 3),
                                                          ("rewound", 3)]
    assert records[-1]["seq"] == 6 and records[-1]["dropped"] == 2
    assert nxt == 7
    assert rewind_metrics(path, 3, 9) == 7  # a second crash before any new record: still no reuse
    assert len(read_metrics(path)) == 5


def test_rewind_leaves_a_clean_file_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_lines(path, [{"event": "step", "seq": s - 1, "step": s, "total_steps": 9} for s in range(1, 4)])
    before = path.read_bytes()
    assert rewind_metrics(path, 3, 9) == 3
    assert path.read_bytes() == before
