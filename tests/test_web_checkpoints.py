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

from tests.helpers import train_tiny_run
from wonderland.probe import best
from wonderland.runs import RunDir
from wonderland.web import create_app

from tests.test_web_browser import browser_page, shot, wait_until  # noqa: F401 - browser_page is a fixture

RUN = "cp"


@pytest.fixture(scope="module")
def trained_run(tiny_model, tmp_path_factory) -> Path:
    return train_tiny_run(tiny_model, tmp_path_factory.mktemp("web-checkpoints"), "--iters", "4", "--val-every", "2",
                          "--lr", "3e-3", "--threads", "1")


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
    from tests.test_web_api import sse_frames

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


def test_browser_marks_the_best_step_in_the_train_chart_runs_table_and_compare_picker(browser_page, tiny_model, wl_home):
    """A run trained through the web app: the Train chart's best step (found in the page from the live
    eval events) is run.json's; the Runs checkpoint table marks that step; Compare offers the kept ones."""
    from tests.test_web_api import write_dataset as write_web_dataset
    from wonderland.web.server import BackgroundServer

    page, problems = browser_page
    write_web_dataset(wl_home)
    app = create_app(ollama_host="http://127.0.0.1:9")
    config = {"model": str(tiny_model), "iters": 4, "batch_size": 2, "val_every": 2, "save_every": 0,
              "max_seq_len": 96, "threads": 1}
    with BackgroundServer(app) as url:
        r = app.test_client().post("/api/train", json={"dataset": "tiny", "name": RUN, "config": config})
        assert r.status_code == 202, r.json
        page.goto(url + "/#train")
        page.wait_for_selector("body[data-ready='1']")
        wait_until(page, "document.querySelector('#train-msg').textContent.includes('finished: talk to it')", timeout_s=180)
        result = RunDir(wl_home / "runs" / RUN).read()["result"]
        best_step = result["best_step"]
        assert [c["step"] for c in result["checkpoints"]] == [2, 4]
        assert page.get_attribute("#loss-chart", "data-best-step") == str(best_step)
        shot(page, "web-train-best-step.png")

        page.click("a[data-page=runs]")
        page.wait_for_selector(f"#runs-body tr[data-run={RUN}]")
        page.wait_for_selector("#detail-checkpoints tr.best")
        assert page.locator("#detail-checkpoints tbody tr").count() == 2
        assert page.get_attribute("#detail-checkpoints tr.best", "data-step") == str(best_step)
        assert page.inner_text("#detail-checkpoints tr.best td:first-child") == str(best_step)
        assert page.get_attribute("#detail-chart", "data-best-step") == str(best_step)
        shot(page, "web-runs-checkpoints.png")

        page.click("a[data-page=compare]")
        wait_until(page, f"document.querySelector('#compare-run').value === '{RUN}'")
        options = page.eval_on_selector_all("#compare-checkpoint option", "os => os.map(o => [o.value, o.textContent])")
        assert [v for v, _ in options] == ["", *map(str, RunDir(wl_home / "runs" / RUN).kept_steps())]
        assert options[0][1] == f"best (step {best_step})" and page.input_value("#compare-checkpoint") == ""
    assert problems == []


def test_the_pages_best_step_rule_is_probe_best(browser_page):
    """chart.js's bestStep and MAX_DRIFT against wonderland.probe's, on random score tables (drift
    over and under the limit, unknown drift, unscored rows, ties)."""
    import random

    from wonderland.probe import MAX_DRIFT
    from wonderland.web.server import BackgroundServer

    rng = random.Random(0)
    tables = []
    for _ in range(300):
        rows = [{"step": s, "persona_margin": rng.choice([None, round(rng.uniform(-1, 1), 1)]),
                 "retention_drift": rng.choice([None, 0.25, round(rng.uniform(0, 0.5), 2)])}
                for s in rng.sample(range(1, 40), rng.randint(0, 6))]
        tables.append(rows)
    page, problems = browser_page
    with BackgroundServer(create_app()) as url:
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']")
        got = page.evaluate("async (tables) => { const m = await import('/static/js/chart.js');"
                            " return [m.MAX_DRIFT, tables.map((t) => m.bestStep(t))]; }", tables)
    expected = [(best(t) or {}).get("step") for t in tables]
    assert got[0] == MAX_DRIFT and got[1] == expected

    def branch(rows):  # which part of the rule decides
        scored = [r for r in rows if r["persona_margin"] is not None]
        ok = [r for r in scored if r["retention_drift"] is None or r["retention_drift"] <= MAX_DRIFT]
        return "none scored" if not scored else "margin" if ok else "least drift"
    assert {branch(t) for t in tables} == {"none scored", "margin", "least drift"}
    assert problems == []
