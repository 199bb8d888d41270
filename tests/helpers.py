"""Shared test helpers: a tiny hand-made Hatter chat dataset for plumbing tests, and random
tokenised records shaped like chat data."""

from __future__ import annotations

import json
from pathlib import Path

SYSTEM = "You are the Hatter from Alice's Adventures in Wonderland."
# Training options for tests that do not test the retention guard: no KL term, no replay records.
# The defaults (--kl 1 --replay 0.25) make every tiny training several times slower; tests of the
# guard (KL, replay, exact resume with KL) keep them.
NO_GUARD = {"kl": 0.0, "replay": 0.0}
NO_GUARD_ARGS = ("--kl", "0", "--replay", "0")
LINES = [
    ("What time is it?", "It's always six o'clock now: always tea-time."),
    ("Who are you?", "I'm the Hatter, and this is my tea-party."),
    ("Tell me a riddle.", "Why is a raven like a writing-desk?"),
    ("Any more tea?", "Take some more tea, it's very easy to take more than nothing."),
    ("What is wrong with your watch?", "It was the best butter, you know, the best butter."),
    ("Where is the March Hare?", "He's in the March, and mad as ever, at the table."),
    ("Why move round the table?", "Because the things get used up, of course. Clean cup!"),
    ("Do you know Time?", "If you knew Time as well as I do, you wouldn't talk about wasting it."),
]


def write_dataset(folder: Path, n_valid: int = 2) -> Path:
    """6 train / 2 valid records (system + user + assistant) and a stats.json, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    records = [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": u},
                             {"role": "assistant", "content": a}]} for u, a in LINES]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[n_valid:]))
    (folder / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:n_valid]))
    (folder / "stats.json").write_text(json.dumps({"character": "Hatter", "book": "Alice", "system_prompt": SYSTEM}))
    return folder


def chat_records(n: int, seed: int, lo: int = 6, hi: int = 40, vocab: int = 500) -> list:
    """``n`` Encoded records of lo..hi-1 random token ids below ``vocab``, shaped like chat data: an
    unlabelled prompt (the first half), then labelled reply tokens."""
    import torch

    from wonderland.chat_format import IGNORE, Encoded

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        prompt = length // 2
        out.append(Encoded(ids, [IGNORE] * prompt + ids[prompt:]))
    return out


# Sampling settings whose replies are many varied tokens even on a random model (greedy decoding
# of a random model often repeats one token or stops at once): the streams below really interleave.
SAMPLED = dict(temperature=1.0, top_p=1.0, repetition_penalty=1.0, max_tokens=8, seed=3)


def assert_adapter_switches_per_call(model, plain, records: list, messages: list) -> None:
    """The adapter is on or off per call on one loaded ``model``, judged on losses, never on the
    greedy text of a random model: adapter off scores exactly like ``plain`` (the same base loaded
    without an adapter), adapter on scores differently, and a stream of one arm suspended between
    two of its decode steps leaves the other arm's score unchanged (no leak either way)."""
    from wonderland.config import GenerationConfig

    on = model.loss(records, adapter=True)
    off = model.loss(records, adapter=False)
    assert off == plain.loss(records) and off[1] > 0
    assert on[0] != off[0] and on[1] == off[1]
    for stream_adapter, other in ((True, off), (False, on)):
        steps = 0
        for _ in model.stream(messages, GenerationConfig(**SAMPLED), adapter=stream_adapter):
            steps += 1
            assert model.loss(records, adapter=not stream_adapter) == other, (stream_adapter, steps)
        assert steps >= 2, "the stream ended before a second decode step: nothing was interleaved"


def train_tiny_run(tiny_model: Path, root: Path, *options: str, write=write_dataset) -> Path:
    """A finished run of the tiny model on the records ``write(folder)`` makes (default:
    :func:`write_dataset`'s), trained by the real CLI with ``options``; returns ``root/run``."""
    from wonderland.cli import main

    data = write(root / "data")
    out = root / "run"
    assert main(["train", "--data", str(data), "--model", str(tiny_model), "--out", str(out), "--batch-size", "2",
                 "--save-every", "0", *options]) == 0
    return out
