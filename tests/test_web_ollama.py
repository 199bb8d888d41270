"""The Ollama column, against a stand-in server on loopback.

No Ollama build can be installed on this machine (no internet besides the package registries,
and Ollama ships as a binary download), so :class:`FakeOllama` speaks the part of Ollama's HTTP
API the app uses: ``GET /api/tags`` and streaming ``POST /api/chat`` (NDJSON lines
``{"message": {"role": "assistant", "content": ...}, "done": false}`` ending with ``"done": true``).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from wonderland.config import GenerationConfig
from wonderland.web import create_app
from wonderland.web.ollama import OllamaClient, OllamaError, ollama_host

SYSTEM = "You are the Hatter. Stay in character."
REPLY = ["It is ", "always ", "six o'clock ", "here: ", "tea-time!"]


class FakeOllama:
    """A loopback HTTP server answering like Ollama; records the chat requests it receives."""

    def __init__(self, models=("llama3.1:latest", "qwen2:0.5b"), pieces=REPLY, fail_with: str | None = None) -> None:
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                if self.path != "/api/tags":
                    return self._send(404, {"error": "not found"})
                self._send(200, {"models": [{"name": m, "model": m} for m in models]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                if self.path != "/api/chat":
                    return self._send(404, {"error": "not found"})
                if body["model"] not in models:
                    return self._send(404, {"error": f"model '{body['model']}' not found"})
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                lines = [{"model": body["model"], "message": {"role": "assistant", "content": p}, "done": False} for p in pieces]
                if fail_with:
                    lines.append({"error": fail_with})
                lines.append({"model": body["model"], "message": {"role": "assistant", "content": ""}, "done": True,
                              "done_reason": "stop", "eval_count": len(pieces)})
                for line in lines:
                    data = (json.dumps(line) + "\n").encode()
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

            def _send(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeOllama":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def finished_run(home, name="r1"):
    """A run folder with an adapter marker: enough for the API to accept it for Compare."""
    run = home / "runs" / name
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "run.json").write_text(json.dumps({"name": name, "status": "finished", "system_prompt": SYSTEM}))
    return run


def frames_of(response):
    out = []
    for block in response.get_data(as_text=True).split("\n\n"):
        if not block or block.startswith(":"):
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((fields.get("event", "message"), json.loads(fields["data"])))
    return out


@pytest.mark.parametrize("env, url", [("", "http://127.0.0.1:11434"), ("localhost", "http://localhost:11434"),
                                      ("0.0.0.0:11500", "http://127.0.0.1:11500"), ("https://gpu.lan:443", "https://gpu.lan:443"),
                                      ("http://127.0.0.1:11434/", "http://127.0.0.1:11434")])
def test_ollama_host_forms(env, url):
    assert ollama_host(env) == url


def test_client_streams_chat_with_the_shared_settings():
    with FakeOllama() as fake:
        client = OllamaClient(fake.host)
        status = client.status()
        assert status["available"] and status["model"] == "llama3.1:latest"
        gen = GenerationConfig(temperature=0.3, top_p=0.8, max_tokens=17, repetition_penalty=1.2, seed=5)
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What time is it?"}]
        assert list(client.stream_chat("llama3.1:latest", msgs, gen)) == REPLY
        (request,) = fake.requests
        assert request["stream"] is True and request["messages"] == msgs
        assert request["options"] == {"temperature": 0.3, "top_p": 0.8, "num_predict": 17, "repeat_penalty": 1.2, "seed": 5}
        with pytest.raises(OllamaError, match="not found"):
            list(client.stream_chat("missing-model", msgs, gen))


def test_absent_server_is_reported_not_raised():
    status = OllamaClient("http://127.0.0.1:9").status()
    assert status["available"] is False and "no Ollama server at http://127.0.0.1:9" in status["message"]
    with FakeOllama(models=()) as fake:
        status = OllamaClient(fake.host).status()
        assert status["available"] is False and "ollama pull" in status["message"]


def test_compare_streams_the_ollama_column_with_the_character_prompt(wl_home):
    finished_run(wl_home)
    with FakeOllama() as fake:
        client = create_app(ollama_host=fake.host).test_client()
        assert client.get("/api/ollama").json["model"] == "llama3.1:latest"
        history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "No room!"}]
        r = client.post("/api/compare", json={"run": "r1", "prompt": "What time is it?", "columns": ["ollama"],
                                              "history": {"ollama": history}, "gen": {"max_tokens": 9}})
        frames = frames_of(r)
        assert [e for e, _ in frames] == ["start", "status", "status"] + ["token"] * len(REPLY) + ["done", "end"]
        assert [d["text"] for e, d in frames if e == "token"] == REPLY
        assert frames[-2][1] == {"column": "ollama", "text": "".join(REPLY)}
        (request,) = fake.requests
        assert request["messages"] == [{"role": "system", "content": SYSTEM}, *history, {"role": "user", "content": "What time is it?"}]
        assert request["options"]["num_predict"] == 9


def test_compare_reports_an_ollama_failure_in_its_column(wl_home):
    finished_run(wl_home)
    with FakeOllama(fail_with="model ran out of memory") as fake:
        r = create_app(ollama_host=fake.host).test_client().post("/api/compare", json={"run": "r1", "prompt": "hi", "columns": ["ollama"]})
        frames = frames_of(r)
        assert frames[-2] == ("error", {"column": "ollama", "message": "Ollama: model ran out of memory"})
        assert frames[-1][0] == "end"
