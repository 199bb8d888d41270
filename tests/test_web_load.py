"""A bounded load test on loopback: 100 concurrent SSE listeners during a training run.

The server is the real ``wonderland serve`` in a subprocess (its own GIL, as a user runs it),
training the tiny model. 100 clients hold event streams open at once (checked through the
server's own listener count), the server keeps answering other requests meanwhile, and after
Stop every client has received every event of the run, in order, exactly once.
Bounded: 100 clients, one run, every wait capped (the whole test takes well under a minute).
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time

from wonderland.events import read_metrics

try:  # tests/ as a package or as a plain folder on sys.path
    from tests.helpers import NO_GUARD
    from tests.test_web_api import write_dataset
except ImportError:
    from helpers import NO_GUARD
    from test_web_api import write_dataset

LISTENERS = 100
DEADLINE_S = 120  # hard cap on every wait below


def request(port: int, method: str, path: str, body: dict | None = None, timeout: float = 10) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Content-Type": "application/json"} if body is not None else {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def listen(port: int, run: str, out: dict, index: int) -> None:
    """Read one SSE stream to its end event; store the ids received (or the error)."""
    ids: list[int] = []
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
        conn.request("GET", f"/api/runs/{run}/events")
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
        event = None
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith("id: "):
                ids.append(int(line[4:]))
            elif line.startswith("event: "):
                event = line[7:]
            elif line == "":
                if event == "end":
                    break
                event = None
        else:
            raise AssertionError("stream closed without an end event")
        conn.close()
        out[index] = ids
    except Exception as e:  # reported by the test thread
        out[index] = e


def test_hundred_sse_listeners_receive_every_event(wl_home, tiny_model):
    write_dataset(wl_home)
    server = subprocess.Popen([sys.executable, "-m", "wonderland", "serve", "--port", "0"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        first = server.stdout.readline()
        assert "http://127.0.0.1:" in first, first
        # Keep draining the server's output (its request log): a full pipe would block the server.
        log: list[str] = []
        threading.Thread(target=lambda: log.extend(server.stdout), daemon=True).start()
        port = int(first.split("http://127.0.0.1:")[1].split("/")[0])
        config = {"model": str(tiny_model), "iters": 100_000, "batch_size": 2, "val_every": 5, "save_every": 0,
                  "max_seq_len": 64, "threads": 1, **NO_GUARD}
        status, body = request(port, "POST", "/api/train", {"dataset": "tiny", "name": "load", "config": config})
        assert status == 202, body

        received: dict[int, object] = {}
        threads = [threading.Thread(target=listen, args=(port, "load", received, i), daemon=True) for i in range(LISTENERS)]
        for t in threads:
            t.start()

        # All 100 streams open at once, as the server counts them; meanwhile it answers other requests.
        deadline = time.monotonic() + DEADLINE_S
        while True:
            status, job = request(port, "GET", "/api/train/status")
            if job["listeners"] == LISTENERS:
                break
            assert job["active"] and time.monotonic() < deadline, job
        first_step = job["last_step"]["step"] if job["last_step"] else 0
        for _ in range(10):
            assert request(port, "GET", "/api/health", timeout=5)[1]["training"] is True
            assert request(port, "GET", "/api/runs", timeout=5)[0] == 200
        # Let training go on a few steps with everyone attached, then stop it.
        while (request(port, "GET", "/api/train/status")[1]["last_step"] or {"step": 0})["step"] < first_step + 3:
            assert time.monotonic() < deadline
        assert request(port, "POST", "/api/train/stop")[0] == 202

        for t in threads:
            t.join(timeout=max(1.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads), "some listeners never got the end event"
        errors = [v for v in received.values() if isinstance(v, Exception)]
        assert not errors, errors[:3]
        stored = [r["seq"] for r in read_metrics(wl_home / "runs" / "load" / "metrics.jsonl")]
        assert stored == list(range(len(stored))) and read_metrics(wl_home / "runs" / "load" / "metrics.jsonl")[-1]["event"] == "stopped"
        assert len(received) == LISTENERS and all(ids == stored for ids in received.values())
        status, job = request(port, "GET", "/api/train/status")
        assert job["state"] == "stopped" and job["listeners"] == 0
    finally:
        server.terminate()
        server.wait(timeout=30)


def read_stream(response, stop_after: int | None = None) -> tuple[list[int], bool]:
    """The ids of an SSE response's events until ``stop_after`` of them (then the caller drops the
    connection mid-stream) or until the end event; and whether the end event came."""
    ids, event = [], None
    for raw in response:
        line = raw.decode().rstrip("\n")
        if line.startswith("id: "):
            ids.append(int(line[4:]))
            if stop_after is not None and len(ids) >= stop_after:
                return ids, False
        elif line.startswith("event: "):
            event = line[7:]
        elif line == "":
            if event == "end":
                return ids, True
            event = None
    raise AssertionError("stream closed without an end event")


def test_a_client_that_drops_and_reconnects_with_last_event_id_misses_nothing(wl_home, tiny_model):
    """EventSource's reconnect: the client drops mid-stream while training goes on, comes back with
    Last-Event-ID = the last id it saw, and gets exactly the events after it: no gap, no repeat."""
    from wonderland.web import create_app
    from wonderland.web.server import BackgroundServer

    write_dataset(wl_home)
    with BackgroundServer(create_app()) as url:
        port = int(url.rsplit(":", 1)[1])
        config = {"model": str(tiny_model), "iters": 100_000, "batch_size": 2, "val_every": 3, "save_every": 0,
                  "max_seq_len": 64, "threads": 1, **NO_GUARD}
        assert request(port, "POST", "/api/train", {"dataset": "tiny", "name": "drop", "config": config})[0] == 202
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
        conn.request("GET", "/api/runs/drop/events")
        first, ended = read_stream(conn.getresponse(), stop_after=4)
        conn.close()  # dropped mid-stream, while the run goes on
        assert not ended and first == list(range(4))
        deadline = time.monotonic() + DEADLINE_S
        seen_at_drop = len(read_metrics(wl_home / "runs" / "drop" / "metrics.jsonl"))
        while len(read_metrics(wl_home / "runs" / "drop" / "metrics.jsonl")) < seen_at_drop + 4:  # missed while away
            assert time.monotonic() < deadline and request(port, "GET", "/api/train/status")[1]["active"]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE_S)
        conn.request("GET", "/api/runs/drop/events", headers={"Last-Event-ID": str(first[-1])})
        response = conn.getresponse()
        assert request(port, "POST", "/api/train/stop")[0] == 202  # live events follow the replayed ones, then the end
        second, ended = read_stream(response)
        conn.close()
        assert ended
        stored = [r["seq"] for r in read_metrics(wl_home / "runs" / "drop" / "metrics.jsonl")]
        assert first + second == stored == list(range(len(stored)))
        assert len(second) > seen_at_drop + 4 - len(first)  # the reconnect replayed what happened while away
