"""The OpenAI-compatible API, driven by the real ``openai`` client against a real server on loopback.

A minimal Flask app registering the blueprint (as the web app's ``create_app`` does) runs in
werkzeug's threaded server on a free port; the run is a tiny trained run copied under
``$WONDERLAND_HOME/runs``. Expected replies come from the same run through ``wonderland.generate``.
"""

from __future__ import annotations

import json
import shutil
import threading
import urllib.request

import openai
import pytest
from flask import Flask
from werkzeug.serving import make_server

from tests.export_helpers import SYSTEM, shared_tiny_run
from wonderland.chat_format import NEUTRAL_SYSTEM_PROMPT, with_system
from wonderland.config import DEFAULT_MODEL, GenerationConfig
from wonderland.generate import generate, load_run
from wonderland.web.openai_api import bp

PROMPT = [{"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model):
    return shared_tiny_run(tmp_path_factory, tiny_model)


@pytest.fixture
def api(trained_run, wl_home):
    """(client, base_url, run): the run installed as $WONDERLAND_HOME/runs/hatter, a live server."""
    shutil.copytree(trained_run.path, wl_home / "runs" / "hatter")
    app = Flask(__name__)
    app.register_blueprint(bp)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}/v1"
    try:
        yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120), url, load_run("hatter")
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def _expected(loaded, messages, system, adapter, **gen) -> str:
    return generate(loaded.model, with_system(messages, system), GenerationConfig(**gen), adapter=adapter)


def test_models_lists_the_base_and_the_finished_runs(api, wl_home):
    client, _, loaded = api
    shutil.copytree(wl_home / "runs" / "hatter", wl_home / "runs" / "unfinished")
    info = json.loads((wl_home / "runs" / "unfinished" / "run.json").read_text())
    (wl_home / "runs" / "unfinished" / "run.json").write_text(json.dumps({**info, "status": "stopped"}))
    models = {m.id: m for m in client.models.list()}
    assert DEFAULT_MODEL in models and loaded.info["model"]["id"] in models
    assert "hatter" in models and "unfinished" not in models
    assert models["hatter"].model_extra["character"] == "Hatter"


@pytest.fixture
def calls(monkeypatch) -> list[tuple]:
    """(adapter the model view runs, adapter flag, the model, its system prompt) of every generation
    the server runs. The text of the random tiny model can be all newlines for any prompt, so what
    reached the model is asserted here, and the replies only equal the in-process ones."""
    from wonderland.backends.torch_peft.chat import TorchChatModel

    seen, stream = [], TorchChatModel.stream

    def spy(self, messages, gen, adapter=True):
        seen.append((self.adapter_name, adapter, self.model, messages[0]["content"] if messages[0]["role"] == "system" else None))
        return stream(self, messages, gen, adapter=adapter)

    monkeypatch.setattr(TorchChatModel, "stream", spy)
    return seen


def test_trained_and_base_arms_non_streaming(api, calls):
    client, _, loaded = api
    reply = client.chat.completions.create(model="hatter", messages=PROMPT, temperature=0, max_tokens=10, seed=1)
    assert [c[:2] for c in calls] == [(loaded.model.adapter_name, True)] and loaded.model.adapter_name
    assert calls[0][3] == SYSTEM  # the run's character prompt
    want = _expected(loaded, PROMPT, SYSTEM, True, temperature=0, max_tokens=10, seed=1)
    assert reply.choices[0].message.content == want and reply.choices[0].message.role == "assistant"
    assert reply.object == "chat.completion" and reply.model == "hatter"
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 5

    base_id = loaded.info["model"]["id"]
    shared = calls[0][2]
    calls.clear()
    base = client.chat.completions.create(model=base_id, messages=PROMPT, temperature=0, max_tokens=10)
    assert [c[:2] for c in calls] == [(None, False)]  # the base name runs no adapter
    assert calls[0][2] is shared  # one copy of the base weights: the run's adapter is attached to it
    assert calls[0][3] == NEUTRAL_SYSTEM_PROMPT
    calls.clear()
    assert base.choices[0].message.content == _expected(loaded, PROMPT, NEUTRAL_SYSTEM_PROMPT, False, temperature=0, max_tokens=10)


def test_streaming_matches_non_streaming(api):
    client, _, loaded = api
    kw = {"model": "hatter", "messages": PROMPT, "temperature": 0.8, "top_p": 0.95, "max_tokens": 12, "seed": 7}
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole == _expected(loaded, PROMPT, SYSTEM, True, temperature=0.8, top_p=0.95, max_tokens=12, seed=7)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_raw_sse_ends_with_done(api):
    _, url, _ = api
    body = json.dumps({"model": "hatter", "messages": PROMPT, "stream": True, "max_tokens": 4}).encode()
    req = urllib.request.Request(f"{url}/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in r.read().decode().split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_request_system_prompt_replaces_the_runs(api, calls):
    client, _, loaded = api
    messages = [{"role": "system", "content": "You are a pirate."}, *PROMPT]
    reply = client.chat.completions.create(model="hatter", messages=messages, temperature=0, max_tokens=10)
    want = _expected(loaded, PROMPT, "You are a pirate.", True, temperature=0, max_tokens=10)
    assert reply.choices[0].message.content == want
    developer = [{"role": "developer", "content": "You are a pirate."}, *PROMPT]  # OpenAI's newer name
    assert client.chat.completions.create(model="hatter", messages=developer, temperature=0,
                                          max_tokens=10).choices[0].message.content == want
    assert [c[3] for c in calls] == ["You are a pirate."] * 3  # both requests, and _expected's own run


def _first_stop(text: str) -> str:
    """A 3-character stop sequence that first occurs after the start of ``text`` and is not blank."""
    for i in range(1, len(text) - 3):
        if text[i:i + 3].strip() and text.index(text[i:i + 3]) == i:
            return text[i:i + 3]
    raise AssertionError(f"no usable stop sequence in {text!r}")


def test_stop_sequences_and_length(api):
    client, _, loaded = api
    kw = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 12, "seed": 3}  # sampled: varied tokens on a random model
    full = _expected(loaded, PROMPT, SYSTEM, True, **kw)
    stop = _first_stop(full)
    cut = client.chat.completions.create(model="hatter", messages=PROMPT, stop=[stop], **kw)
    assert cut.choices[0].message.content == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="hatter", messages=PROMPT, stop=stop, stream=True, **kw)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == full[:full.index(stop)]
    short = client.chat.completions.create(model="hatter", messages=PROMPT, **{**kw, "max_tokens": 2})
    assert short.choices[0].finish_reason == "length"


def test_errors_are_openai_style(api):
    client, url, _ = api
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="march-hare", messages=PROMPT)
    assert e.value.body["code"] == "model_not_found" and "hatter" in e.value.body["message"]
    bad = [({"temperature": 3}, "temperature"), ({"max_tokens": 0}, "max_tokens"), ({"n": 2}, "n"),
           ({"messages": []}, "messages"), ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
           ({"stop": ["a", "b", "c", "d", "e"]}, "stop")]
    for override, param in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**{"model": "hatter", "messages": PROMPT, **override})
        assert e.value.body["type"] == "invalid_request_error" and e.value.body["param"] == param
    req = urllib.request.Request(f"{url}/chat/completions", data=b"not json", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and "error" in json.loads(e.value.read())


def test_models_retrieve(api):
    client, url, loaded = api
    model = client.models.retrieve("hatter")
    assert model.id == "hatter" and model.object == "model" and model.model_extra["character"] == "Hatter"
    assert client.models.retrieve(DEFAULT_MODEL).model_extra["arm"] == "base"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("march-hare")
    assert e.value.body["code"] == "model_not_found" and e.value.body["type"] == "invalid_request_error"


def test_numbers_are_checked_against_the_generation_bounds(api):
    client, url, _ = api
    bad = [({"temperature": 2.5}, "temperature must be between 0 and 2"), ({"top_p": 0}, "top_p must be > 0"),
           ({"max_tokens": 100_000}, "max_tokens must be between 1 and 8192"), ({"seed": -1}, "seed must be between 0"),
           ({"max_tokens": 2.5}, "max_tokens must be an integer"), ({"temperature": "hot"}, "temperature must be a number")]
    for override, message in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**{"model": "hatter", "messages": PROMPT, **override})
        assert message in e.value.body["message"] and e.value.body["param"] == next(iter(override)), e.value.body
    for raw in (b'{"model": "hatter", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
                b'{"model": "hatter", "messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}'):
        req = urllib.request.Request(f"{url}/chat/completions", data=raw, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 400 and "must be a finite number" in json.loads(e.value.read())["error"]["message"]


def test_max_tokens_is_capped_at_the_models_context(api):
    client, _, loaded = api
    context = json.loads((loaded.model.model_path / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="hatter", messages=PROMPT, max_tokens=context)
    body = e.value.body
    assert body["param"] == "max_tokens" and body["code"] == "context_length_exceeded"
    room = int(body["message"].split("between 1 and ")[1].split()[0])
    assert 0 < room < context
    long = [{"role": "user", "content": "tea " * context}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="hatter", messages=long, max_tokens=1)
    assert e.value.body["param"] == "messages" and e.value.body["code"] == "context_length_exceeded"


def test_every_v1_error_is_an_openai_error_object(wl_home):
    from wonderland.web import create_app

    client = create_app().test_client()
    for method, path, status in [("get", "/v1/nope", 404), ("delete", "/v1/models", 405), ("get", "/v1/chat/completions", 405)]:
        r = getattr(client, method)(path)
        assert r.status_code == status and r.is_json, (path, r.data[:80])
        assert set(r.json["error"]) == {"message", "type", "param", "code"} and r.json["error"]["type"] == "invalid_request_error"
    r = client.get("/v1/models/nobody")
    assert r.status_code == 404 and r.json["error"]["code"] == "model_not_found"
