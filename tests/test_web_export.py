"""The Runs tab's export job: POST starts export_many in a worker (verify on), GET shows progress
and the verify table; refused while a training runs; bad options answer 400."""

from __future__ import annotations

import shutil

import pytest

from tests.export_helpers import shared_tiny_run
from wonderland.runs import runs_root
from wonderland.web import create_app
from wonderland.web.api_export import _jobs
from wonderland.web.jobs import Job


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    return shared_tiny_run(tmp_path_factory, tiny_model)


@pytest.fixture
def app(trained, wl_home):
    shutil.copytree(trained.path, runs_root() / "hatter")
    return create_app(ollama_host="http://127.0.0.1:9")


def test_export_job_reports_progress_and_the_verify_table(app):
    client = app.test_client()
    r = client.post("/api/runs/hatter/export", json={"format": "peft", "verify": True})
    assert r.status_code == 202 and r.json["active"] is True
    job = _jobs[id(app.extensions["wonderland"])]
    assert job.done.wait(300)
    status = client.get("/api/runs/hatter/export").json
    assert status["state"] == "finished" and status["error"] is None, status
    assert any("probe prompts" in line for line in status["log"])
    assert status["report"]["artefacts"]["peft"]["exact_match"] == 1.0
    assert (runs_root() / "hatter" / "exports" / "peft" / "verify.json").is_file()


def test_export_refused_while_training_and_bad_options(app):
    client = app.test_client()
    state = app.extensions["wonderland"]
    state.jobs.job = Job(run="other", config={}, resume=False)  # active: its done event is not set
    r = client.post("/api/runs/hatter/export", json={"format": "all"})
    assert r.status_code == 409 and "training run (other) is in progress" in r.json["error"]
    state.jobs.job.done.set()
    r = client.post("/api/runs/hatter/export", json={"format": "onnx"})
    assert r.status_code == 400 and "format must be one of" in r.json["error"]
    assert client.post("/api/runs/nope/export", json={}).status_code == 404
    assert not (runs_root() / "hatter" / "exports").exists()
