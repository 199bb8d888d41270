"""The packaged held-out prompts never appear among the training prompts."""

from __future__ import annotations

import re

import pytest

from wonderland.data import build_dataset, load_chat_jsonl
from wonderland.data.persona import CHARACTER_PROMPTS, TOPICS
from wonderland.errors import UserError
from wonderland.eval.evaluate import DEFAULT_PROMPTS, load_prompts


def norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower().replace("\u2019", "'")))


def test_default_prompts_are_a_small_clean_set():
    prompts = load_prompts(DEFAULT_PROMPTS)
    assert 20 <= len(prompts) <= 30
    assert len({norm(p) for p in prompts}) == len(prompts)


@pytest.mark.parametrize("character", ["Hatter", "Alice"])
def test_default_prompts_are_disjoint_from_training_prompts(alice_path, tmp_path, character):
    build_dataset(alice_path, character, tmp_path / "data")
    users = {norm(m["content"]) for split in ("train", "valid")
             for r in load_chat_jsonl(tmp_path / "data" / f"{split}.jsonl") for m in r["messages"] if m["role"] == "user"}
    persona = {norm(p) for _, prompts, _ in TOPICS for p in prompts}
    persona_stems = {norm(t.split("{name}")[0]) for t in CHARACTER_PROMPTS}
    for prompt in load_prompts(DEFAULT_PROMPTS):
        n = norm(prompt)
        assert n not in users, prompt
        assert n not in persona, prompt
        assert not any(n.startswith(stem) for stem in persona_stems), prompt


def test_prompts_file_errors(tmp_path):
    empty = tmp_path / "p.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(UserError, match="no prompts"):
        load_prompts(empty)
    with pytest.raises(UserError, match="not found"):
        load_prompts(tmp_path / "nope.txt")
