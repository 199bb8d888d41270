"""Scene records: the character's conversations in the book as multi-turn chats (data/scenes.py)."""

from __future__ import annotations

import pytest

from wonderland.chat_format import IGNORE, _ids, encode_chat
from wonderland.data import build_dataset, load_chat_jsonl
from wonderland.data.scenes import CHARS_PER_TOKEN, TURN_OVERHEAD


@pytest.fixture(scope="module")
def hatter(alice_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes") / "hatter"
    stats = build_dataset(alice_path, "Hatter", out, max_seq_len=256)
    records = load_chat_jsonl(out / "train.jsonl") + load_chat_jsonl(out / "valid.jsonl")
    return stats, [r for r in records if r["source"]["kind"] == "scene"], out


def test_scenes_are_conversations_that_end_on_the_character(hatter):
    stats, scenes, _ = hatter
    assert stats["scene_records"] == len(scenes) >= 5
    assert stats["scene_turns"] == sum(len(r["messages"]) - 1 for r in scenes)
    speakers = set()
    for r in scenes:
        turns = r["messages"][1:]
        assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2)
        assert len(turns) >= 4  # at least two replies of the character
        for m in turns:
            if m["role"] == "user":  # every line of another speaker carries its name
                for line in m["content"].split("\n"):
                    assert line.startswith("[") or ": " in line, line
                    speakers.add(line.split(": ")[0])
            else:
                assert not m["content"].startswith(("The Hatter:", "Hatter:", "["))
    assert {"Alice", "The March Hare"} <= speakers


def test_scene_windows_fit_the_token_budget(alice_path, tmp_path):
    stats = build_dataset(alice_path, "Hatter", tmp_path / "d", max_seq_len=192)
    small = [r for r in load_chat_jsonl(tmp_path / "d" / "train.jsonl") if r["source"]["kind"] == "scene"]
    assert small
    for r in small:  # the conservative estimate the windows are cut by
        assert sum(len(m["content"]) / CHARS_PER_TOKEN + TURN_OVERHEAD for m in r["messages"]) <= 192 + TURN_OVERHEAD


def test_no_text_in_both_splits(hatter):
    _, _, out = hatter

    def texts(path):
        return {m["content"] for r in load_chat_jsonl(path) for m in r["messages"][1:]}

    def lines(path):
        return {ln for r in load_chat_jsonl(path) for key in ("lines", "context_lines") for ln in r["source"].get(key, [])}

    assert not texts(out / "train.jsonl") & texts(out / "valid.jsonl")
    assert not lines(out / "train.jsonl") & lines(out / "valid.jsonl")


def test_every_assistant_turn_is_labelled_and_nothing_else(hatter, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    _, scenes, _ = hatter
    for r in scenes[:4]:
        msgs = r["messages"]
        enc = encode_chat(tok, msgs, max_len=4096)
        labelled = [i for i, t in enumerate(enc.labels) if t != IGNORE]
        expected = []
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":  # this turn's tokens: from its generation prompt to its end marker
                start = len(_ids(tok, msgs[:i], add_generation_prompt=True))
                end = len(_ids(tok, msgs[: i + 1], add_generation_prompt=False))
                turn_ids = tok(m["content"], add_special_tokens=False)["input_ids"]
                assert end - start >= len(turn_ids)  # the reply and its end-of-turn marker
                expected += range(start, end)
        assert labelled == expected
        n_assistant = sum(m["role"] == "assistant" for m in msgs)
        assert n_assistant >= 2 and enc.n_target_tokens == len(expected)


def test_no_scenes_flag_and_a_character_without_conversations(alice_path, tmp_path):
    off = build_dataset(alice_path, "Hatter", tmp_path / "off", scenes=False)
    assert off["scene_records"] == 0 and off["scenes"] is False
    book = tmp_path / "book.txt"
    book.write_text("A TALE\n\n" + "".join(f"`Line {i} of my own,' said the Hermit.\n\nThe wind blew.\n\n" for i in range(8)))
    warned = []
    alone = build_dataset(book, "Hermit", tmp_path / "alone", valid_fraction=0, warn=warned.append)
    assert alone["scene_records"] == 0 and alone["dialogue_records"] >= 2
    assert any("no scene with other speakers" in w for w in warned)
