"""The dataset built from the real book: files, records, split, persona pairs, determinism, quality."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from wonderland.data import build_dataset, character_system_prompt, list_characters, load_chat_jsonl
from wonderland.data.attribution import analyse
from wonderland.data.book import parse_book
from wonderland.data.persona import USES_PER_LINE, build_persona_pairs
from wonderland.data.quotes import gutenberg_to_curly
from wonderland.errors import UserError

_spec = importlib.util.spec_from_file_location(
    "wonderland_bench_attribution", Path(__file__).resolve().parents[1] / "bench" / "attribution.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def hatter(alice_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "hatter"
    warnings: list[str] = []
    stats = build_dataset(alice_path, "Hatter", out, warn=warnings.append)
    return out, stats, warnings


def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()]


def test_files_and_stats(hatter, alice_path):
    out, stats, warnings = hatter
    assert sorted(p.name for p in out.iterdir()) == ["stats.json", "train.jsonl", "utterances.jsonl", "valid.jsonl"]
    assert json.loads((out / "stats.json").read_text()) == json.loads(json.dumps(stats))
    for k in ("spans", "spans_by_attribution", "character_utterances", "train_records", "valid_records", "words",
              "character", "book", "book_path", "book_sha256", "system_prompt", "seed"):
        assert k in stats, k
    assert stats["character"] == "Hatter" and stats["book"] == "Alice's Adventures in Wonderland"
    assert stats["system_prompt"] == character_system_prompt("the Hatter", stats["book"])
    assert sum(stats["spans_by_attribution"].values()) == stats["spans"] > 1000
    assert stats["character_utterances"] >= 60
    assert not any("only" in w for w in warnings)  # enough lines: no few-lines warning
    utt = read_jsonl(out / "utterances.jsonl")
    assert len(utt) == stats["spans"]
    assert set(utt[0]) >= {"line", "text", "speaker", "attribution", "chapter"}


def test_records_are_chat_format_and_clean(hatter):
    out, stats, _ = hatter
    train, valid = load_chat_jsonl(out / "train.jsonl"), load_chat_jsonl(out / "valid.jsonl")
    assert len(train) == stats["train_records"] and len(valid) == stats["valid_records"] >= 1
    for r in train + valid:
        assert list(r)[0] == "messages"
        roles = [m["role"] for m in r["messages"]]
        if r["source"]["kind"] == "scene":  # user / assistant turns in turn, ending on the character
            assert roles == ["system"] + ["user", "assistant"] * ((len(roles) - 1) // 2) and len(roles) >= 5
        else:
            assert roles == ["system", "user", "assistant"]
        assert r["messages"][0]["content"] == stats["system_prompt"]
        assert r["source"]["kind"] in ("dialogue", "persona", "scene") and r["source"]["lines"]
        for a in (m["content"] for m in r["messages"] if m["role"] == "assistant"):
            assert not re.search(r"\b(said|cried|replied) the\b", a), a  # no narration leaking in
            assert "`" not in a and not a.endswith(",")
    # no line in both files, no duplicate records
    lines = lambda rs: {ln for r in rs for ln in r["source"]["lines"]}  # noqa: E731
    assert not lines(train) & lines(valid)
    pairs = [tuple(m["content"] for m in r["messages"][1:]) for r in train + valid]
    assert len(pairs) == len(set(pairs))


def test_only_the_hatters_lines(hatter, alice_path):
    out, _, _ = hatter
    utt = read_jsonl(out / "utterances.jsonl")
    hatter_lines = {u["line"] for u in utt if u["speaker"] == "Hatter"}
    for r in load_chat_jsonl(out / "train.jsonl") + load_chat_jsonl(out / "valid.jsonl"):
        assert set(r["source"]["lines"]) <= hatter_lines


def test_persona_pairs_are_retrieved_and_a_modest_share(hatter):
    out, stats, _ = hatter
    recs = load_chat_jsonl(out / "train.jsonl") + load_chat_jsonl(out / "valid.jsonl")
    persona = [r for r in recs if r["source"]["kind"] == "persona"]
    dialogue = {r["messages"][2]["content"] for r in recs if r["source"]["kind"] == "dialogue"}
    assert 5 <= len(persona) <= stats["persona_share"] * stats["dialogue_records"]
    assert len({r["messages"][1]["content"] for r in persona}) == len(persona)  # varied prompts
    for r in persona:  # every answer is one of his own lines
        assert r["messages"][2]["content"] in dialogue
    uses = Counter(r["messages"][2]["content"] for r in persona)
    assert max(uses.values()) <= USES_PER_LINE  # no single line answers everything


def test_persona_share_sets_how_many_pairs(alice_path, tmp_path, hatter):
    _, stats, _ = hatter
    none = build_dataset(alice_path, "Hatter", tmp_path / "p0", persona_share=0)
    few = build_dataset(alice_path, "Hatter", tmp_path / "p02", persona_share=0.2)
    more = build_dataset(alice_path, "Hatter", tmp_path / "p3", persona_share=3)
    assert none["persona_records"] == 0 and none["persona_share"] == 0
    assert 0 < few["persona_records"] <= int(0.2 * few["dialogue_records"]) < stats["persona_records"]
    assert more["persona_records"] >= stats["persona_records"]
    # the dialogue records are the same whatever the share: only persona pairs are added
    assert none["dialogue_records"] == few["dialogue_records"] == more["dialogue_records"] == stats["dialogue_records"]
    with pytest.raises(UserError, match="persona share"):
        build_dataset(alice_path, "Hatter", tmp_path / "bad", persona_share=-1)
    assert not (tmp_path / "bad").exists()


def test_persona_retrieval_by_topic():
    lines = ["It's always six o'clock now, and my watch is two days wrong.", "Why is a raven like a writing-desk?",
             "I want a clean cup of tea.", "Your hair wants cutting.", "The March Hare said so, you know.",
             "I keep them to sell. I'm a hatter."]
    pairs = build_persona_pairs(lines, ["the March Hare"], limit=100, seed=0, self_name="Hatter")
    by_topic = {}
    for p in pairs:
        by_topic.setdefault(p.topic, set()).add(lines[p.answer_index])
    assert by_topic["time"] == {lines[0]}
    assert by_topic["riddle"] == {lines[1]}
    assert by_topic["tea"] == {lines[2]}
    assert by_topic["character:the March Hare"] == {lines[4]}
    assert lines[5] in by_topic["identity"]  # "Who are you?" finds the line with his own name
    assert lines[3] in by_topic["rude"]
    assert build_persona_pairs(lines, [], limit=3, seed=0) == build_persona_pairs(lines, [], limit=3, seed=0)


def test_deterministic_and_seeded(alice_path, tmp_path, hatter):
    out, _, _ = hatter
    build_dataset(alice_path, "hatter", tmp_path / "again")
    for f in ("train.jsonl", "valid.jsonl", "utterances.jsonl"):
        assert (tmp_path / "again" / f).read_bytes() == (out / f).read_bytes()
    build_dataset(alice_path, "Hatter", tmp_path / "seed1", seed=1)
    assert (tmp_path / "seed1" / "valid.jsonl").read_bytes() != (out / "valid.jsonl").read_bytes()


def test_no_persona_and_other_character(alice_path, tmp_path):
    stats = build_dataset(alice_path, "the King", tmp_path / "king", persona=False, valid_fraction=0.2)
    assert stats["character"] == "King" and stats["persona_records"] == 0
    assert stats["valid_records"] >= 0.1 * stats["dialogue_records"]


def test_one_long_conversation_still_splits_near_the_target(alice_path, tmp_path):
    # the Mock Turtle speaks almost only in one long exchange (chapters IX-X)
    out = tmp_path / "mock"
    stats = build_dataset(alice_path, "Mock Turtle", out, persona=False)
    assert 1 <= stats["valid_records"] <= 0.2 * stats["dialogue_records"]
    lines = lambda f: {ln for r in load_chat_jsonl(out / f) for ln in r["source"]["lines"]}  # noqa: E731
    assert not lines("train.jsonl") & lines("valid.jsonl")


def test_no_validation_set_means_no_valid_file(alice_path, tmp_path):
    stats = build_dataset(alice_path, "Hatter", tmp_path / "h", valid_fraction=0)
    assert stats["valid_records"] == 0 and not (tmp_path / "h" / "valid.jsonl").exists()
    assert len(load_chat_jsonl(tmp_path / "h" / "train.jsonl")) == stats["train_records"]


def test_aliases_and_few_lines_warning(alice_path, tmp_path):
    warnings: list[str] = []
    stats = build_dataset(alice_path, "Knave", tmp_path / "knave", warn=warnings.append)
    assert stats["character_utterances"] < 10
    assert any("only" in w and str(stats["character_utterances"]) in w for w in warnings)
    merged = build_dataset(alice_path, "Hatter", tmp_path / "both", aliases=["March Hare"])
    assert merged["character_utterances"] > 67 and merged["aliases"] == ["March Hare"]


def test_character_who_never_speaks_lists_top_speakers(alice_path, tmp_path):
    with pytest.raises(UserError, match=r"never speaks.*Alice \(\d+\)"):
        build_dataset(alice_path, "Humpty Dumpty", tmp_path / "nobody")
    assert not (tmp_path / "nobody").exists()


def test_list_characters(alice_path):
    rows = list_characters(alice_path)
    names = [n for n, _ in rows]
    assert names[0] == "Alice" and {"Hatter", "King", "March Hare", "Mock Turtle", "White Rabbit"} <= set(names[:15])
    assert [c for _, c in rows] == sorted((c for _, c in rows), reverse=True)


@pytest.mark.parametrize("style", ["gutenberg", "curly"])
def test_gold_precision_recall(alice_path, style):
    data = alice_path.read_bytes()
    if style == "curly":
        data = gutenberg_to_curly(data.decode().replace("\r\n", "\n")).encode()
    an = analyse(parse_book(data, alice_path))
    assert an.style.name == style
    golds = bench.load_gold()
    assert {"Hatter", "King"} <= {g["character"] for g in golds}
    for gold in golds:
        r = bench.score(an, gold)["overall"]
        assert r["precision"] >= 0.98, (gold["character"], r)
        if not gold.get("held_out"):  # held-out characters: precision is the promise, recall is reported
            assert r["recall"] >= 0.95, (gold["character"], r)


@pytest.mark.parametrize("content, message", [
    ("", "empty"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n',
     r":2: malformed JSON"),
    ('{"text": "no messages"}\n', r":1: record has no \"messages\""),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', r":1: no assistant"),
    ('{"messages": [{"role": "wizard", "content": "hi"}]}\n', r":1: each message"),
])
def test_load_chat_jsonl_errors(tmp_path, content, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(UserError, match=message) as e:
        load_chat_jsonl(p)
    assert "bad.jsonl" in str(e.value)
