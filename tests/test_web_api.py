"""The web app's JSON API through Flask's test client: every route, SSE framing and replay,
one job at a time, stop / resume, security checks and bad inputs (400 with a message).

Training runs for real on the ``tiny_model`` fixture (a 2-layer random llama) over a small chat
dataset written here, so these tests exercise the same train() / load_run() path as the CLI.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zlib
import struct
from pathlib import Path

import pytest

from tests.helpers import NO_GUARD
from wonderland.config import GenerationConfig
from wonderland.events import read_metrics
from wonderland.generate import load_run
from wonderland.web import create_app

SYSTEM = "You are the Hatter from Alice's Adventures in Wonderland. Stay in character."
LINES = [("What time is it?", "It's always six o'clock now: always tea-time."),
         ("Have some wine.", "There isn't any. It wasn't very civil of you to offer it."),
         ("Who are you?", "A hatter. I keep hats to sell; I've none of my own."),
         ("Tell me a riddle.", "Why is a raven like a writing-desk?"),
         ("Your hair wants cutting.", "You should learn not to make personal remarks."),
         ("Is it late?", "Two days wrong! I told you butter wouldn't suit the works."),
         ("Move on, please.", "I want a clean cup: let's all move one place on."),
         ("What about Time?", "If you knew Time as well as I do, you wouldn't talk about wasting it.")]


def write_dataset(home: Path, name: str = "tiny") -> Path:
    """A small chat dataset in the layout build_dataset writes (train/valid.jsonl, stats.json)."""
    folder = home / "data" / name
    folder.mkdir(parents=True)
    records = [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": u},
                             {"role": "assistant", "content": a}], "source": {"lines": [100 + i], "kind": "dialogue"}}
               for i, (u, a) in enumerate(LINES)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:6]))
    (folder / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[6:]))
    (folder / "utterances.jsonl").write_text("".join(
        json.dumps({"line": 100 + i, "text": a, "speaker": "Hatter", "attribution": "explicit" if i % 2 else "pronoun"}) + "\n"
        for i, (_, a) in enumerate(LINES)))
    (folder / "stats.json").write_text(json.dumps({
        "character": "Hatter", "book": "Alice's Adventures in Wonderland", "system_prompt": SYSTEM,
        "character_utterances": len(LINES), "train_records": 6, "valid_records": 2,
        "spans_by_attribution": {"explicit": 5, "pronoun": 3}}))
    return folder


def png_bytes() -> bytes:
    """A valid 1x1 PNG (what an evaluation plot file looks like to the server)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


def sse_frames(response):
    """Parse a streamed text/event-stream response into (id, event, data) tuples, lazily."""
    buffer = ""
    for chunk in response.response:
        buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
        while "\n\n" in buffer:
            frame, buffer = buffer.split("\n\n", 1)
            if frame.startswith(":"):
                continue
            fields = {}
            for line in frame.split("\n"):
                key, _, value = line.partition(": ")
                fields[key] = value
            yield (int(fields["id"]) if "id" in fields else None, fields.get("event", "message"), json.loads(fields["data"]))


@pytest.fixture
def app():
    # Port 9 (discard) on loopback: nothing listens there, so the Ollama column is "absent".
    return create_app(ollama_host="http://127.0.0.1:9")


@pytest.fixture
def client(app):
    return app.test_client()


def test_page_and_static_assets_are_served(client):
    page = client.get("/")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    for tab in ("Dataset", "Train", "Compare", "Runs", "Evaluation"):
        assert tab in html
    assert "cdn" not in html.lower() and "https://" not in html  # everything is served locally
    for asset in ("/static/js/main.js", "/static/style.css", "/static/vendor/uPlot.iife.min.js", "/static/vendor/uPlot.min.css"):
        assert client.get(asset).status_code == 200, asset
    assert client.get("/api/health").json["ok"] is True


def test_config_schema_is_built_from_the_dataclasses(client):
    from dataclasses import fields

    from wonderland.config import PRESETS, GenerationConfig, TrainConfig

    data = client.get("/api/config").json
    assert [f["name"] for f in data["train"]] == [f.name for f in fields(TrainConfig)]
    assert [f["name"] for f in data["generation"]] == [f.name for f in fields(GenerationConfig)]
    assert data["presets"] == PRESETS
    backend = next(f for f in data["train"] if f["name"] == "backend")
    assert backend["choices"] == ["auto", "torch", "mlx"] and backend["help"]


def test_host_and_origin_checks(client):
    # DNS rebinding: a foreign name resolving to 127.0.0.1 still carries its own Host header.
    r = client.get("/api/runs", headers={"Host": "attacker.example:7860"})
    assert r.status_code == 403 and "DNS-rebinding" in r.json["error"]
    # Cross-site POST from another page.
    r = client.post("/api/train/stop", headers={"Origin": "http://attacker.example"})
    assert r.status_code == 403 and "cross-origin" in r.json["error"]
    assert client.post("/api/train/stop", headers={"Origin": "null"}).status_code == 403
    assert client.post("/api/train/stop", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    # Same origin (the app's own page) and no Origin at all (curl, SDKs) reach the route.
    assert client.post("/api/train/stop", headers={"Origin": "http://localhost"}).status_code == 409
    assert client.post("/api/train/stop").status_code == 409
    assert client.get("/api/runs", headers={"Host": "127.0.0.1:7860"}).status_code == 200
    assert client.get("/api/runs", headers={"Host": "[::1]:7860"}).status_code == 200
    headers = client.get("/").headers
    assert "script-src 'self'" in headers["Content-Security-Policy"] and headers["X-Content-Type-Options"] == "nosniff"


def test_token_required_off_loopback():
    app = create_app(host="0.0.0.0", token="s3cret-token")
    c = app.test_client()
    r = c.get("/api/runs", headers={"Host": "192.0.2.10:7860"})
    assert r.status_code == 401 and "token" in r.json["error"]
    assert c.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/api/runs", headers={"Authorization": "Bearer s3cret-token", "Host": "192.0.2.10:7860"}).status_code == 200
    r = c.get("/?token=s3cret-token")
    assert r.status_code == 302 and "token" not in r.headers["Location"]
    assert "HttpOnly" in r.headers["Set-Cookie"] and "SameSite=Strict" in r.headers["Set-Cookie"]
    assert c.get("/api/runs").status_code == 200  # the cookie now carries the token
    assert create_app(host="127.0.0.1").test_client().get("/api/runs").status_code == 200


def test_web_layer_never_imports_torch():
    code = ("import sys; from wonderland.web import create_app; c = create_app().test_client(); "
            "[c.get(p) for p in ('/', '/api/config', '/api/runs', '/api/datasets', '/api/compare/options')]; "
            "print(sorted(m for m in ('torch', 'mlx', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_dataset_routes(client, wl_home):
    write_dataset(wl_home)
    listing = client.get("/api/datasets").json["datasets"]
    assert [d["name"] for d in listing] == ["tiny"] and listing[0]["character"] == "Hatter"
    stats = client.get("/api/datasets/tiny").json["stats"]
    assert stats["train_records"] == 6 and stats["spans_by_attribution"] == {"explicit": 5, "pronoun": 3}
    page = client.get("/api/datasets/tiny/records?split=train&page=2&per_page=4").json
    assert (page["total"], page["pages"], page["page"], len(page["records"])) == (6, 2, 2, 2)
    row = page["records"][0]
    assert row == {"user": LINES[4][0], "reply": LINES[4][1], "kind": "dialogue", "attribution": "pronoun",
                   "lines": [104], "turns": 3, "scene": False,
                   "messages": [{"role": "user", "content": LINES[4][0]}, {"role": "assistant", "content": LINES[4][1]}]}
    valid = client.get("/api/datasets/tiny/records?split=valid").json
    assert [r["user"] for r in valid["records"]] == [LINES[6][0], LINES[7][0]]
    download = client.get("/api/datasets/tiny/download/valid")
    assert download.status_code == 200 and "attachment" in download.headers["Content-Disposition"]
    assert [json.loads(line)["messages"][1]["content"] for line in download.get_data(as_text=True).splitlines()] == [LINES[6][0], LINES[7][0]]
    # bad inputs: 400 (or 404) with a message
    for url, status in [("/api/datasets/tiny/records?split=test", 400), ("/api/datasets/tiny/records?page=0", 400),
                        ("/api/datasets/tiny/records?per_page=x", 400), ("/api/datasets/tiny/download/all", 400),
                        ("/api/datasets/nope", 404), ("/api/datasets/bad%20name", 400)]:
        r = client.get(url)
        assert r.status_code == status and r.json["error"], url


def test_a_scene_record_is_previewed_as_its_whole_conversation(client, wl_home):
    folder = write_dataset(wl_home)
    turns = [{"role": "user", "content": "Alice: I don't see any wine.\nThe March Hare: There isn't any."},
             {"role": "assistant", "content": "Your hair wants cutting."},
             {"role": "user", "content": "Alice: You should learn not to make personal remarks."},
             {"role": "assistant", "content": "Why is a raven like a writing-desk?"}]
    scene = {"messages": [{"role": "system", "content": SYSTEM}, *turns], "source": {"kind": "scene", "lines": [100, 101]}}
    (folder / "train.jsonl").write_text(json.dumps(scene) + "\n" + (folder / "train.jsonl").read_text())
    stats = json.loads((folder / "stats.json").read_text())
    (folder / "stats.json").write_text(json.dumps({**stats, "scene_records": 1, "scene_turns": 4}))
    row = client.get("/api/datasets/tiny/records?split=train&per_page=2").json["records"][0]
    assert (row["scene"], row["kind"], row["messages"]) == (True, "scene", turns)
    assert (row["user"], row["reply"]) == (turns[2]["content"], turns[3]["content"])
    assert client.get("/api/datasets").json["datasets"][0]["scene_records"] == 1


def test_build_dataset_from_default_book_and_upload(client, alice_path, monkeypatch):
    monkeypatch.setenv("WONDERLAND_BOOK", str(alice_path))
    r = client.post("/api/datasets", data={"character": "Hatter"})
    assert r.status_code == 201, r.json
    assert r.json["name"] == "hatter" and r.json["stats"]["character"] == "Hatter" and r.json["stats"]["train_records"] > 10
    rows = client.get("/api/datasets/hatter/records?per_page=200").json["records"]
    assert rows and all(row["reply"] for row in rows) and any(row["attribution"] for row in rows)

    speakers = client.get("/api/characters").json["characters"]
    assert {"name": "Hatter", "lines": r.json["stats"]["character_utterances"]} in speakers
    assert speakers[0]["lines"] >= speakers[-1]["lines"]

    book = alice_path.read_bytes()
    r = client.post("/api/datasets", data={"character": "Queen", "name": "queen-upload",
                                           "book": (io.BytesIO(book), "alice.txt")}, content_type="multipart/form-data")
    assert r.status_code == 201, r.json
    assert r.json["stats"]["character"] == "Queen"
    assert {d["name"] for d in client.get("/api/datasets").json["datasets"]} == {"hatter", "queen-upload"}


def test_build_dataset_bad_inputs(client, app, alice_path, monkeypatch, wl_home):
    monkeypatch.setenv("WONDERLAND_BOOK", str(alice_path))
    cases = [
        ({}, 400, "character is required"),
        ({"character": "Hatter", "name": "../etc"}, 400, "dataset name"),
        ({"character": "Hatter", "valid_fraction": "0.9"}, 400, "valid_fraction"),
        ({"character": "Nobody-in-this-book"}, 400, "never speaks"),
        ({"character": "Hatter", "book": (io.BytesIO(b"\x00\x01binary" * 500), "x.txt")}, 400, "binary"),
        ({"character": "Hatter", "book": (io.BytesIO("\xff\xfe".encode("latin-1") * 2000), "x.txt")}, 400, "UTF-8"),
        ({"character": "Hatter", "book": (io.BytesIO(b"too short"), "x.txt")}, 400, "at least"),
    ]
    for data, status, message in cases:
        r = client.post("/api/datasets", data=data, content_type="multipart/form-data")
        assert r.status_code == status, (data, r.json)
        assert message in r.json["error"]
    # a valid book whose build is refused (nobody by that name speaks in it) is not kept in books/
    r = client.post("/api/datasets", data={"character": "Nobody-in-this-book", "book": (io.BytesIO(alice_path.read_bytes()), "alice.txt")},
                    content_type="multipart/form-data")
    assert r.status_code == 400 and "never speaks" in r.json["error"]
    books = wl_home / "books"
    assert not books.exists() or list(books.iterdir()) == []
    app.config["MAX_CONTENT_LENGTH"] = 4096  # the same 413 path as a 16 MiB+ upload, without sending one
    r = client.post("/api/datasets", data={"character": "Hatter", "book": (io.BytesIO(b"a" * 8192), "big.txt")},
                    content_type="multipart/form-data")
    assert r.status_code == 413 and "too large" in r.json["error"]


def test_train_bad_inputs(client, wl_home):
    write_dataset(wl_home)
    cases = [
        (None, "JSON object"),
        ({"dataset": "tiny", "preset": "turbo"}, "unknown preset"),
        ({"dataset": "tiny", "config": {"iters": -1}}, "steps (iters) must be between 1 and"),
        ({"dataset": "tiny", "config": {"itres": 5}}, "unknown option 'itres'"),
        ({"dataset": "tiny", "config": {"lr": "fast"}}, "learning rate (lr) must be a finite number (got 'fast')"),
        ({"dataset": "tiny", "config": {"lr": 1e308}}, "learning rate (lr) must be > 0 and <= 1 (got 1e+308)"),
        ('{"dataset": "tiny", "config": {"lr": NaN}}', "learning rate (lr) must be a finite number (got nan)"),
        ('{"dataset": "tiny", "config": {"lr": 1e999}}', "learning rate (lr) must be a finite number (got inf)"),
        ({"dataset": "tiny", "config": {"lr": "1e999"}}, "learning rate (lr) must be a finite number (got '1e999')"),
        ({"dataset": "tiny", "config": {"lr": None}}, "learning rate (lr) needs a value (got null)"),
        ({"dataset": "tiny", "config": {"batch_size": 2.5}}, "batch size (batch_size) must be an integer"),
        ({"dataset": "tiny", "config": ["iters", 5]}, "config must be an object"),
        ({"dataset": "tiny", "name": "../../escape"}, "invalid"),
        ({"dataset": "../tiny"}, "dataset name"),
        ({"resume": "no-such-run"}, "no run named"),
    ]
    for body, message in cases:
        raw = "not json" if body is None else body if isinstance(body, str) else json.dumps(body)
        r = client.post("/api/train", data=raw, content_type="application/json")
        assert r.status_code in (400, 404), (body, r.json)
        assert message in r.json["error"] and "--" not in r.json["error"], (body, r.json)
    assert not (wl_home / "runs").exists() or not any((wl_home / "runs").iterdir())  # nothing was started
    assert client.post("/api/train", json={"dataset": "missing"}).status_code == 404
    assert client.get("/api/runs/nope/events").status_code == 404
    assert client.get("/api/runs/bad%20name/events").status_code == 400
    assert client.get("/api/train/status").json == {"state": "idle", "active": False, "run": None}


def strict_json(text: str):
    """Parse as a browser does: NaN / Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def write_nan_run(home: Path, name: str = "nan-run") -> Path:
    """A run stored before non-finite numbers were refused: loss NaN from step 2, lr 1e999 = Infinity
    in its config, written as Python's json writes them (not JSON)."""
    run = home / "runs" / name
    run.mkdir(parents=True)
    (run / "run.json").write_text('{"schema_version": 1, "status": "failed", "error": "loss is NaN", "backend": "torch", '
                                  '"config": {"lr": Infinity, "iters": 4}, "result": {"step": 2, "loss": NaN}}')
    (run / "metrics.jsonl").write_text('{"seq": 0, "event": "step", "step": 1, "loss": 3.5, "time": 1}\n'
                                       '{"seq": 1, "event": "step", "step": 2, "loss": NaN, "time": 2}\n')
    return run


def test_stored_non_finite_numbers_are_answered_as_valid_json(client, wl_home):
    """A run stored with NaN / Infinity is listed and shown as failed with nulls, and every answer
    stays valid JSON."""
    write_nan_run(wl_home)
    runs = strict_json(client.get("/api/runs").get_data(as_text=True))["runs"]
    assert [(r["name"], r["status"], r["loss"], r["config"]["lr"]) for r in runs] == [("nan-run", "failed", None, None)]
    assert runs[0]["curve"]["loss"] == [3.5, None]
    detail = strict_json(client.get("/api/runs/nan-run").get_data(as_text=True))
    assert detail["summary"]["error"] == "loss is NaN" and detail["run"]["result"]["loss"] is None
    events = client.get("/api/runs/nan-run/events").get_data(as_text=True)
    data = [strict_json(line[6:]) for line in events.splitlines() if line.startswith("data: ")]
    assert [d.get("loss") for d in data if d.get("event") == "step"] == [3.5, None]


def test_a_job_that_fails_reports_why(client, wl_home, tmp_path):
    write_dataset(wl_home)
    missing = tmp_path / "no-model-here"
    r = client.post("/api/train", json={"dataset": "tiny", "name": "doomed", "config": {"model": str(missing)}})
    assert r.status_code == 202
    frames = list(sse_frames(client.get("/api/runs/doomed/events", buffered=False)))
    end = frames[-1]
    assert end[1] == "end" and end[2]["state"] == "failed" and str(missing) in end[2]["error"]
    assert any(f[1] == "log" and "error" in f[2]["message"] for f in frames)
    status = client.get("/api/train/status").json
    assert status["state"] == "failed" and not status["active"] and status["error"] == end[2]["error"]


def test_a_job_that_failed_before_its_run_folder_existed_still_streams_why(app, client, wl_home, tmp_path):
    """The order that raced in CI: the job has already failed (no run folder was ever made) when
    the page subscribes; the stream must still replay its log and end with the error, not 404."""
    write_dataset(wl_home)
    missing = tmp_path / "no-model-here"
    assert client.post("/api/train", json={"dataset": "tiny", "name": "doomed", "config": {"model": str(missing)}}).status_code == 202
    assert app.extensions["wonderland"].jobs.job.done.wait(timeout=60)
    assert not (wl_home / "runs" / "doomed").exists()
    frames = list(sse_frames(client.get("/api/runs/doomed/events", buffered=False)))
    assert frames and frames[-1][1] == "end" and frames[-1][2]["state"] == "failed"
    assert any(f[1] == "log" and str(missing) in f[2]["message"] for f in frames)
    assert client.get("/api/runs/someone-else/events").status_code == 404


def read_until(frames, predicate):
    """Consume SSE frames until predicate(frame) is true; returns the frames read (incl. that one)."""
    seen = []
    for frame in frames:
        seen.append(frame)
        if predicate(frame):
            return seen
    raise AssertionError(f"stream ended before the expected event; got {[f[1:] for f in seen][-5:]}")


def test_train_stream_stop_replay_resume_compare_delete(client, wl_home, tiny_model):
    write_dataset(wl_home)
    config = {"model": str(tiny_model), "iters": 400, "batch_size": 2, "val_every": 2, "save_every": 0,
              "max_seq_len": 64, "threads": 1, **NO_GUARD}
    r = client.post("/api/train", json={"dataset": "tiny", "name": "t1", "config": config})
    assert r.status_code == 202 and r.json["run"] == "t1" and r.json["config"]["iters"] == 400

    # One job at a time: a second start is refused with a clear message.
    second = client.post("/api/train", json={"dataset": "tiny", "name": "t2", "config": config})
    assert second.status_code == 409 and "already in progress" in second.json["error"]

    stream = client.get("/api/runs/t1/events", buffered=False)
    assert stream.mimetype == "text/event-stream" and stream.headers["Cache-Control"] == "no-cache"
    frames = sse_frames(stream)
    head = read_until(frames, lambda f: f[1] == "message" and f[2]["event"] == "step" and f[2]["step"] >= 3)
    assert client.get("/api/train/status").json["state"] == "running"
    assert client.post("/api/train/stop").status_code == 202
    rest = read_until(frames, lambda f: f[1] == "end")
    stream.close()
    events = [f for f in head + rest if f[1] == "message"]
    ids = [f[0] for f in events]
    assert ids == [f[2]["seq"] for f in events] == list(range(len(ids)))  # id: = seq, gap-free from 0
    kinds = [f[2]["event"] for f in events]
    assert kinds[0] == "started" and "eval" in kinds and kinds[-1] == "stopped"
    assert rest[-1][2]["state"] == "stopped" and rest[-1][2]["active"] is False
    stopped_at = events[-1][2]["step"]
    assert 3 <= stopped_at < 400

    # Replay: Last-Event-ID (what EventSource sends on reconnect) yields exactly the later events.
    stored = read_metrics(wl_home / "runs" / "t1" / "metrics.jsonl")
    assert [r["seq"] for r in stored] == ids
    replay = list(sse_frames(client.get("/api/runs/t1/events", headers={"Last-Event-ID": "2"}, buffered=False)))
    assert [f[0] for f in replay if f[1] == "message"] == ids[3:] and replay[-1][1] == "end"
    assert [f[2] for f in replay if f[1] == "message"] == stored[3:]
    after = list(sse_frames(client.get(f"/api/runs/t1/events?after={ids[-2]}", buffered=False)))
    assert [f[0] for f in after if f[1] == "message"] == [ids[-1]]
    assert client.get("/api/runs/t1/events", headers={"Last-Event-ID": "abc"}).status_code == 400

    runs = client.get("/api/runs").json["runs"]
    assert [(x["name"], x["status"], x["resumable"], x["has_adapter"]) for x in runs] == [("t1", "stopped", True, False)]
    assert runs[0]["curve"]["step"][-1] == stopped_at and len(runs[0]["curve"]["val_loss"]) >= 1
    r = client.post("/api/compare", json={"run": "t1", "prompt": "hi"})
    assert r.status_code == 400 and "no finished adapter" in r.json["error"]

    # Resume to a few more steps; ids continue where the stopped run left off.
    r = client.post("/api/train", json={"resume": "t1", "iters": stopped_at + 2})
    assert r.status_code == 202 and r.json["resume"] is True
    resumed = list(sse_frames(client.get(f"/api/runs/t1/events?after={ids[-1]}", buffered=False)))
    kinds = [f[2]["event"] for f in resumed if f[1] == "message"]
    assert kinds[0] == "resumed" and kinds[-1] == "finished", kinds
    first_id = next(f[0] for f in resumed if f[1] == "message")  # log lines (the memory estimate) carry no id
    assert first_id == ids[-1] + 1 and resumed[-1] == (None, "end", resumed[-1][2]) and resumed[-1][2]["state"] == "finished"
    detail = client.get("/api/runs/t1").json
    assert detail["summary"]["status"] == "finished" and detail["summary"]["has_adapter"]
    assert detail["run"]["config"]["iters"] == stopped_at + 2 and detail["curve"]["step"][-1] == stopped_at + 2
    r = client.post("/api/train", json={"resume": "t1"})
    assert r.status_code == 400 and "already finished" in r.json["error"]

    # Compare: every column streams over one response; tokens add up to each column's reply.
    assert client.get("/api/model?run=t1").json["state"] == "unloaded"
    body = {"run": "t1", "prompt": "What time is it?", "columns": ["base", "prompted", "trained", "ollama"],
            "gen": {"max_tokens": 6, "temperature": 0}, "history": {"trained": [
                {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Tea?"}]}}
    frames = list(sse_frames(client.post("/api/compare", json=body, buffered=False)))
    assert frames[0][1] == "start" and frames[-1][1] == "end"
    assert {f[2]["column"] for f in frames if f[1] == "status" and f[2]["state"] == "loading"} == {"base", "prompted", "trained"}
    done = {f[2]["column"]: f[2]["text"] for f in frames if f[1] == "done"}
    assert set(done) == {"base", "prompted", "trained"}
    loaded = load_run("t1")
    for column, text in done.items():
        assert "".join(f[2]["text"] for f in frames if f[1] == "token" and f[2]["column"] == column) == text
        conversation = body["history"].get(column, []) + [{"role": "user", "content": body["prompt"]}]
        assert text == "".join(loaded.stream(column, conversation, GenerationConfig(max_tokens=6, temperature=0)))
    (err,) = [f[2] for f in frames if f[1] == "error"]
    assert err["column"] == "ollama" and err["unavailable"] and "no Ollama server" in err["message"]
    assert client.get("/api/model?run=t1").json["state"] == "ready"
    assert client.post("/api/model/load", json={"run": "t1"}).json["state"] == "ready"

    # Evaluation files written by `wonderland eval` are listed and served (report sandboxed).
    eval_dir = wl_home / "runs" / "t1" / "eval"
    eval_dir.mkdir()
    (eval_dir / "eval.json").write_text(json.dumps({"perplexity": {"base": 50.1, "trained": 11.4}}))
    (eval_dir / "report.html").write_text("<h1>Report</h1><img src='loss.png'>")
    (eval_dir / "loss.png").write_bytes(png_bytes())
    ev = client.get("/api/runs/t1/eval").json
    assert ev == {"exists": True, "report": "/runs/t1/eval/report.html", "images": ["/runs/t1/eval/loss.png"],
                  "results": {"perplexity": {"base": 50.1, "trained": 11.4}}}
    report = client.get("/runs/t1/eval/report.html")
    assert report.status_code == 200 and "default-src 'none'" in report.headers["Content-Security-Policy"]
    assert "script-src" not in report.headers["Content-Security-Policy"]  # default-src 'none': no scripts at all
    assert client.get("/runs/t1/eval/loss.png").data == png_bytes()
    assert client.get("/runs/t1/eval/../run.json").status_code == 404
    assert client.get("/runs/t1/eval/%2e%2e/run.json").status_code == 404

    # Delete needs the name repeated; then the run is gone.
    r = client.delete("/api/runs/t1")
    assert r.status_code == 400 and "repeat its name" in r.json["error"]
    assert client.delete("/api/runs/t1?confirm=t1").json == {"deleted": "t1"}
    assert not (wl_home / "runs" / "t1").exists() and client.get("/api/runs").json["runs"] == []


def test_replay_answers_being_made_are_in_the_web_log(client, wl_home, tiny_model, tmp_path, monkeypatch):
    """A model without packaged replay answers: the answers made before training are announced, with
    progress lines, in the job's log (the Train form's log), not only on the server's stderr."""
    from wonderland import replay

    monkeypatch.setenv("WONDERLAND_MODELS", str(tmp_path / "models"))  # no cached answers
    monkeypatch.setattr(replay, "MAX_TOKENS", 2)  # short answers: the plumbing is under test, not the answers
    write_dataset(wl_home)
    config = {"model": str(tiny_model), "iters": 1, "batch_size": 2, "val_every": 0, "save_every": 0, "kl": 0,
              "replay": 0, "max_seq_len": 64}
    assert client.post("/api/train", json={"dataset": "tiny", "name": "answers", "config": config}).status_code == 202
    frames = list(sse_frames(client.get("/api/runs/answers/events", buffered=False)))
    assert frames[-1][1] == "end" and frames[-1][2]["state"] == "finished", frames[-1]
    logged = [f[2]["message"] for f in frames if f[1] == "log"]
    n_probe = len(replay.split(replay.load_prompts())[1])
    assert any(m.startswith(f"Answering {n_probe} replay prompts") for m in logged), logged
    progress = [m.split(" made")[0] for m in logged if m.startswith("replay answers: ")]
    assert progress == [f"replay answers: {k}" for k in range(10, n_probe + 1, 10)] != []  # a line per 10 answers


def test_compare_bad_inputs(client, wl_home):
    run = wl_home / "runs" / "r1"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "run.json").write_text(json.dumps({"name": "r1", "status": "finished", "system_prompt": SYSTEM}))
    cases = [
        ({"run": "r1"}, 400, "prompt is required"),
        ({"run": "r1", "prompt": "x" * 3000}, 400, "limit"),
        ({"run": "r1", "prompt": "hi", "columns": ["gpt"]}, 400, "columns"),
        ({"run": "r1", "prompt": "hi", "columns": ["base", "base"]}, 400, "distinct"),
        ({"run": "r1", "prompt": "hi", "gen": {"temperature": -1}}, 400, "temperature"),
        ({"run": "r1", "prompt": "hi", "gen": {"top_k": 3}}, 400, "unknown option"),
        ({"run": "r1", "prompt": "hi", "history": {"base": [{"role": "system", "content": "x"}]}}, 400, "role"),
        ({"run": "r1", "prompt": "hi", "history": []}, 400, "history"),
        ({"run": "nope", "prompt": "hi"}, 404, "no run"),
        ({"run": "../r1", "prompt": "hi"}, 400, "invalid"),
    ]
    for body, status, message in cases:
        r = client.post("/api/compare", json=body)
        assert r.status_code == status, (body, r.json)
        assert message in r.json["error"], (body, r.json)
    assert client.get("/api/model?run=nope").status_code == 404
    opts = client.get("/api/compare/options").json
    assert [c["name"] for c in opts["columns"]] == ["base", "prompted", "trained"] and "What time is it?" in opts["suggested_prompts"]
    assert client.get("/api/ollama").json["available"] is False


BAD_NAMES = ["nlrun\n", "tab\there", "bell\x07", "a" * 101, "-leading-dash", "dot.ted", "sp ace", "ünicode"]


def test_bad_run_and_dataset_names_are_400_everywhere(client, wl_home):
    """One rule for run and dataset names (\\A...\\Z, length, no control characters): "nlrun\\n" used
    to pass a ``$``-anchored check and create the folder runs/nlrun\\n."""
    write_dataset(wl_home)
    for name in BAD_NAMES:
        r = client.post("/api/train", json={"dataset": "tiny", "name": name})
        assert r.status_code == 400 and "invalid run name" in r.json["error"], (name, r.json)
        r = client.post("/api/datasets", data={"character": "Hatter", "name": name}, content_type="multipart/form-data")
        assert r.status_code == 400 and "invalid dataset name" in r.json["error"], (name, r.json)
        quoted = "".join(c if c.isalnum() else f"%{ord(c):02X}" for c in name) if name.isascii() else "%C3%BCnicode"
        assert client.get(f"/api/runs/{quoted}").status_code == 400, name
        assert client.get(f"/api/datasets/{quoted}").status_code == 400, name
    assert sorted(p.name for p in (wl_home / "data").iterdir()) == ["tiny"]
    assert not (wl_home / "runs").exists() or not any((wl_home / "runs").iterdir())
    r = client.post("/api/train", json={"dataset": "tiny", "name": "a" * 100, "config": {"iters": "x"}})
    assert r.status_code == 400 and "steps (iters)" in r.json["error"]  # 100 characters is a valid name


def test_an_unreadable_run_is_listed_with_its_error(client, wl_home):
    (wl_home / "runs" / "corrupt").mkdir(parents=True)
    (wl_home / "runs" / "corrupt" / "run.json").write_text('{"status": "fini')
    runs = {r["name"]: r for r in client.get("/api/runs").json["runs"]}
    assert runs["corrupt"]["status"] == "unreadable" and "corrupt run.json" in runs["corrupt"]["error"]
    r = client.get("/api/runs/corrupt")
    assert r.status_code == 400 and "corrupt run.json" in r.json["error"]


@pytest.mark.parametrize("text,kind", [("[1, 2]", "list"), ('"finished"', "string"), ("3", "number"), ("null", "null")])
def test_a_run_json_that_is_not_an_object_is_a_clear_error_and_listed_as_broken(client, wl_home, capsys, text, kind):
    from wonderland.cli import main
    from wonderland.errors import UserError
    from wonderland.runs import RunDir

    (wl_home / "runs" / "odd").mkdir(parents=True)
    (wl_home / "runs" / "odd" / "run.json").write_text(text)
    with pytest.raises(UserError) as e:
        RunDir(wl_home / "runs" / "odd").read()
    message = str(e.value)
    assert str(wl_home / "runs" / "odd" / "run.json") in message and f"a JSON {kind}, not an object" in message
    assert "delete the run folder" in message and "\n" not in message
    (item,) = client.get("/api/runs").json["runs"]
    assert (item["name"], item["status"], item["error"]) == ("odd", "unreadable", message)
    r = client.get("/api/runs/odd")
    assert r.status_code == 400 and r.json["error"] == message
    assert main(["runs", "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["name"] == "odd" and row["status"] == f"unreadable ({message})"


def test_runs_duration_is_training_time_summed_over_sessions(client, wl_home):
    """One elapsed time: each session's last step's elapsed_s, summed over stop / resume (the Train
    page counts the same way), not run.json's timings (setup included)."""
    run = wl_home / "runs" / "two-sessions"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"status": "finished", "backend": "torch", "config": {"backend": "auto"},
                                              "timings": {"train_s": 346.0}}))
    rows = [{"event": "started"}, {"event": "step", "step": 1, "loss": 3.0, "elapsed_s": 50.0},
            {"event": "step", "step": 2, "loss": 2.5, "elapsed_s": 100.0}, {"event": "stopped", "step": 2, "elapsed_s": 101.0},
            {"event": "resumed", "step": 2}, {"event": "step", "step": 3, "loss": 2.0, "elapsed_s": 52.0},
            {"event": "finished", "step": 3, "elapsed_s": 190.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps({"seq": i, "time": i, **r}) + "\n" for i, r in enumerate(rows)))
    (item,) = client.get("/api/runs").json["runs"]
    assert item["duration_s"] == 152.0 and item["backend"] == "torch"
    assert client.get("/api/runs/two-sessions").json["summary"]["duration_s"] == 152.0
