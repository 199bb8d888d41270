"""The web app and the probed checkpoints of a run (issue 14, item 3): their scores and the best
step in the runs API, a picked checkpoint passed through Compare to load_run, a missing one refused.

One real run of the ``tiny_model`` fixture (``--iters 4 --val-every 2``: scored checkpoints at steps
2 and 4) is trained once per module and copied into each test's ``$WONDERLAND_HOME/runs``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import write_dataset
from wonderland.cli import main
from wonderland.probe import best
from wonderland.runs import RunDir
from wonderland.web import create_app

RUN = "cp"


@pytest.fixture(scope="module")
def trained_run(tiny_model, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("web-checkpoints")
    data = write_dataset(tmp / "data")
    out = tmp / "runs" / RUN
    assert main(["train", "--data", str(data), "--out", str(out), "--model", str(tiny_model), "--iters", "4",
                 "--batch-size", "2", "--val-every", "2", "--save-every", "0", "--lr", "3e-3", "--threads", "1"]) == 0
    return out


@pytest.fixture
def run(trained_run, wl_home) -> RunDir:
    """The module's trained run, copied into this test's home."""
    shutil.copytree(trained_run, wl_home / "runs" / RUN)
    return RunDir(wl_home / "runs" / RUN)


@pytest.fixture
def client():
    return create_app(ollama_host="http://127.0.0.1:9").test_client()


def test_the_runs_api_exposes_each_checkpoints_scores_the_best_step_and_the_kept_steps(client, run):
    result = run.read()["result"]
    assert [r["step"] for r in result["checkpoints"]] == [2, 4]
    expected = {"best_step": result["best_step"], "checkpoints": result["checkpoints"], "kept_steps": run.kept_steps()}
    assert result["best_step"] == best(result["checkpoints"])["step"] and result["best_step"] in expected["kept_steps"]
    (item,) = client.get("/api/runs").json["runs"]
    assert {k: item[k] for k in expected} == expected
    assert item["curve"]["best_step"] == result["best_step"]
    detail = client.get(f"/api/runs/{RUN}").json
    assert {k: detail["summary"][k] for k in expected} == expected
    assert detail["curve"]["best_step"] == result["best_step"]


def test_a_run_without_a_result_yet_scores_its_checkpoints_from_its_eval_events(client, wl_home):
    """A stopped (or running) run has no result.checkpoints: its eval events so far give the rows,
    and the best step follows probe.best's rule (drift over the limit disqualifies step 4)."""
    folder = wl_home / "runs" / "stopped"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"status": "stopped", "config": {"iters": 8}, "result": {"step": 4}}))
    evals = [(2, 2.5, 0.10, 0.01), (4, 2.2, 0.30, 0.90), (3, 2.4, None, None)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(
        {"seq": i, "event": "eval", "step": s, "val_loss": v, "persona_margin": m, "retention_drift": d, "time": i}) + "\n"
        for i, (s, v, m, d) in enumerate(evals)))
    item = client.get("/api/runs/stopped").json["summary"]
    assert item["checkpoints"] == [{"step": 2, "val_loss": 2.5, "persona_margin": 0.10, "retention_drift": 0.01},
                                   {"step": 4, "val_loss": 2.2, "persona_margin": 0.30, "retention_drift": 0.90}]
    assert (item["best_step"], item["kept_steps"]) == (2, [])


def compare_frames(client, body: dict) -> list[tuple[str, dict]]:
    try:
        from tests.test_web_api import sse_frames
    except ImportError:
        from test_web_api import sse_frames
    return [(event, data) for _, event, data in sse_frames(client.post("/api/compare", json=body, buffered=False))]


def test_compare_passes_the_picked_checkpoint_to_load_run(client, run, monkeypatch):
    import wonderland.web.compare as compare

    best_step = run.read()["result"]["best_step"]
    other = next(s for s in run.kept_steps() if s != best_step)
    calls = []

    def spy(run_ref: RunDir, **kw):  # the real load, recorded
        calls.append((run_ref.name, kw))
        return real(run_ref, **kw)

    real = compare.load_run
    monkeypatch.setattr(compare, "load_run", spy)
    body = {"run": RUN, "prompt": "What time is it?", "columns": ["trained"], "gen": {"max_tokens": 2, "temperature": 0}}
    frames = compare_frames(client, {**body, "checkpoint": other})
    assert frames[0][0] == "start" and frames[0][1]["checkpoint"] == other and frames[-1][0] == "end"
    assert [e for e, _ in frames].count("done") == 1
    assert calls == [(RUN, {"checkpoint": other})]
    assert client.get(f"/api/model?run={RUN}&checkpoint={other}").json["state"] == "ready"
    assert client.get(f"/api/model?run={RUN}").json == {"run": RUN, "checkpoint": None, "state": "unloaded"}
    compare_frames(client, body)  # no checkpoint: the best, i.e. the run's own adapter
    assert calls[1:] == [(RUN, {"checkpoint": None})]
    assert client.get(f"/api/model?run={RUN}").json["state"] == "ready"


def test_a_missing_or_malformed_checkpoint_is_a_400_with_one_line(client, run):
    body = {"run": RUN, "prompt": "hi", "columns": ["trained"]}
    kept = ", ".join(map(str, run.kept_steps()))
    for value, message in [(99, f"run {RUN} has no checkpoint at step 99 (kept: {kept})"), ("abc", "checkpoint must be a step number"),
                           (2.5, "checkpoint must be a step number"), (True, "checkpoint must be a step number")]:
        for r in (client.post("/api/compare", json={**body, "checkpoint": value}),
                  client.post("/api/model/load", json={"run": RUN, "checkpoint": value})):
            assert r.status_code == 400 and message in r.json["error"] and "\n" not in r.json["error"], (value, r.json)
    r = client.get(f"/api/model?run={RUN}&checkpoint=99")
    assert r.status_code == 400 and "no checkpoint at step 99" in r.json["error"]
