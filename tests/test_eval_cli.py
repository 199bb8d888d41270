"""`wonderland eval` end to end on a tiny training run (tiny random llama, hand-made dataset)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import NO_GUARD_ARGS, train_tiny_run
from wonderland.cli import main
from wonderland.config import GenerationConfig
from wonderland.errors import UserError
from wonderland.eval.evaluate import EVAL_MAX_TOKENS, OUTPUT_FILES, default_generation, evaluate, seeded_for

SYSTEM = "You are the Hatter from Alice's Adventures in Wonderland. Stay in character."
PAIRS = [
    ("What time is it?", "It's always six o'clock now: always tea-time."),
    ("Who are you?", "I'm a poor man, your Majesty, and I hadn't begun my tea."),
    ("Tell me a riddle.", "Why is a raven like a writing-desk?"),
    ("Any more tea?", "Take some more tea, it's very easy to take more than nothing."),
    ("What is wrong with your watch?", "It was the best butter, you know, the best butter."),
    ("Do you know Time?", "If you knew Time as well as I do, you wouldn't talk about wasting it."),
]
OTHER_LINES = [("Alice", "What a funny watch! It tells the day of the month, and doesn't tell what o'clock it is!"),
               ("March Hare", "Have some wine."), ("Dormouse", "Twinkle, twinkle, twinkle, twinkle...")]
ARMS = ("base", "prompted", "trained")
ARM_KEYS = {"perplexity", "loss", "in_character_rate", "persona_score", "similarity_character", "similarity_generic",
            "marker_rate", "distinct_1", "distinct_2", "repetition_rate", "shared_opening_rate", "copy_rate", "mean_words", "empty_rate",
            "retention_rate", "retention", "generation_s", "adapter", "system_prompt", "world_mention_rate"}


def write_dataset(folder: Path) -> Path:
    folder.mkdir(parents=True)
    recs = [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": u},
                          {"role": "assistant", "content": a}]} for u, a in PAIRS]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[2:]))
    (folder / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:2]))
    (folder / "stats.json").write_text(json.dumps({"character": "Hatter", "display_name": "the Hatter",
                                                   "book": "Alice", "system_prompt": SYSTEM, "aliases": []}))
    lines = [{"line": i, "text": a, "speaker": "Hatter"} for i, (_, a) in enumerate(PAIRS)]
    lines += [{"line": 100 + i, "text": t, "speaker": s} for i, (s, t) in enumerate(OTHER_LINES)]
    (folder / "utterances.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tmp_path_factory) -> Path:
    return train_tiny_run(tiny_model, tmp_path_factory.mktemp("eval-run"), "--iters", "2", "--lr", "1e-2",
                          "--val-every", "1", "--warmup", "0", *NO_GUARD_ARGS, write=write_dataset)


def test_eval_cli_writes_report(tiny_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# held out\nGood morning!\n\nWhat should I wear?\n")
    assert main(["eval", "--run", str(tiny_run), "--prompts", str(prompts), "--max-tokens", "3", "--no-retention",
                 "--samples", "2", "--quiet"]) == 0
    out = tiny_run / "eval"
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    result = json.loads((out / "eval.json").read_text())
    assert set(ARMS) <= result.keys()
    for arm in ARMS:
        assert set(result[arm]) == ARM_KEYS
        r = result[arm]
        assert r["perplexity"] > 1 and 0 <= r["in_character_rate"] <= 1 and 0 <= r["distinct_2"] <= 1
        assert r["retention_rate"] is None
    assert result["base"]["system_prompt"] == "You are a helpful assistant."
    assert result["prompted"]["system_prompt"] == result["trained"]["system_prompt"] == SYSTEM
    assert result["trained"]["adapter"] and not result["prompted"]["adapter"]
    assert result["prompted"]["perplexity"] != result["trained"]["perplexity"]  # the adapter is really on
    assert result["seed"] == 0 and result["config"]["generation"]["max_tokens"] == 3
    assert result["model"]["path"] and result["config"]["prompts"] == 2 and result["config"]["samples_per_prompt"] == 2
    assert [c["name"] for c in result["target"]["checks"]] == [
        "trained_in_character", "persona_vs_prompted", "world_vs_prompted", "retention", "ppl", "no_collapse",
        "no_copies", "openings"]
    samples = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    assert [(s["prompt"], s["sample"]) for s in samples] == [("Good morning!", 0), ("What should I wear?", 0),
                                                             ("Good morning!", 1), ("What should I wear?", 1)]
    assert all(set(s) == {"prompt", "sample", *ARMS, "scores"} and all(isinstance(s[a], str) for a in ARMS)
               for s in samples)
    html = (out / "report.html").read_text()
    assert 'src="loss.png"' in html and 'src="persona.png"' in html and "Good morning!" in html
    for png in ("loss.png", "persona.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "perplexity" in printed and f"report: {out}/report.html" in printed


def test_evaluate_api_same_seed_same_replies_and_retention(tiny_run, tmp_path):
    """The Python API the web app calls: list of prompts, custom out, progress events, determinism."""
    events = []
    gen = GenerationConfig(max_tokens=2, seed=3)
    first = evaluate(tiny_run, ["Hello there."], tmp_path / "a", gen, progress=events.append)
    second = evaluate(tiny_run, ["Hello there."], tmp_path / "b", gen, retention=False)
    assert first["out"] == str(tmp_path / "a") and second["base"]["retention"] == []
    samples = [(tmp_path / d / "samples.jsonl").read_text() for d in "ab"]
    assert samples[0] == samples[1]  # same seed and settings: same replies
    n_ret = len(first["base"]["retention"])
    assert n_ret >= 4 and all(set(x) == {"prompt", "reply", "expected", "passed"} for x in first["base"]["retention"])
    assert events[-1]["done"] == events[-1]["total"] == 3 * (1 + n_ret)
    assert {e["phase"] for e in events} == {"loss", "generate", "retention"}
    assert first["seed"] == 3 and first["config"]["retention_max_tokens"] == 2
    # more samples per prompt: the first sample is the one-sample reply (same seed), the next ones add to it
    more = evaluate(tiny_run, ["Hello there."], tmp_path / "c", gen, retention=False, samples=3)
    rows = [json.loads(ln) for ln in (tmp_path / "c" / "samples.jsonl").read_text().splitlines()]
    assert [r["sample"] for r in rows] == [0, 1, 2] and more["config"]["samples_per_prompt"] == 3
    assert {a: rows[0][a] for a in ARMS} == {a: json.loads(samples[1])[a] for a in ARMS}
    with pytest.raises(UserError, match="samples per prompt"):
        evaluate(tiny_run, ["Hello there."], tmp_path / "d", gen, samples=0)


def test_default_generation_is_short_and_seeded():
    gen = default_generation()
    assert gen.max_tokens == EVAL_MAX_TOKENS == 60 and gen.seed == 0
    # each prompt its own seed (independent samples), every arm the same one (paired arms)
    third = seeded_for(gen, 2)
    assert third.seed == 2 and {**third.to_dict(), "seed": 0} == gen.to_dict()


def test_eval_errors_are_one_line(tiny_run, tmp_path, capsys):
    assert main(["eval", "--run", str(tiny_run), "--prompts", str(tmp_path / "missing.txt")]) == 2
    assert "prompts file not found" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["eval", "--run", str(tiny_run), "--out", str(busy)]) == 2
    assert "not an evaluation folder" in capsys.readouterr().err and (busy / "notes.txt").exists()
    assert main(["eval", "--run", "no-such-run"]) == 2
