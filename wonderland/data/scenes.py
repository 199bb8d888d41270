"""Scene records: the stretches of the book where the character talks with others, as multi-turn chats.

A scene is one exchange (a run of consecutive paragraphs that hold speech) in which the character
speaks at least twice and someone else speaks too. It is cut into windows of at most
``max_tokens`` (estimated from characters: no tokenizer here), each starting on another speaker's
turn and ending on a character turn, so every window teaches the character's reply to what came
before. The other speakers' lines are user turns, each line prefixed with the speaker's name
(``Alice: Why is a raven like a writing-desk?``; several speakers in a row share one user turn,
a line each); the character's lines are assistant turns, bare. Short narration that carries
meaning (not a bare "said the Hatter") goes in square brackets at the end of the user turn before
the character speaks, so the model never learns to narrate. At inference the user's prompt is
bare, as in the single-turn records.

Each window takes the train/valid split of its character turns' dialogue records: a window is cut
where the split changes, so no text is in both.
"""

from __future__ import annotations

import re

from wonderland.data.turns import Turn, clean_chat_text, turns_of

CHARS_PER_TOKEN = 3.0  # conservative for English BPE (~4): windows stay under the token budget
TURN_OVERHEAD = 6  # tokens the chat template adds per message
NARRATION_WORDS = (5, 30)  # narration kept when it has this many words left after the speech tag
SPEECH_TAG = re.compile(r"\b(said|says|asked|replied|cried|added|went on|remarked|continued|"
                        r"interrupted|exclaimed|began|the|a|an|he|she|it|they|to|in|and|again|"
                        r"angrily|hastily|gravely|timidly|at last|at once)\b", re.I)


def _tokens(text: str) -> int:
    return int(len(text) / CHARS_PER_TOKEN) + TURN_OVERHEAD


def narration(an, turn: Turn) -> str:
    """The turn's paragraph without its quotes, when it says more than who spoke; else ''."""
    start, end = an.blocks[turn.spans[0].block]
    text, cut = an.book.text[start:end], 0
    parts = []
    for s in (s for s in an.spans if s.block == turn.spans[0].block):
        parts.append(an.book.text[start + cut: s.start - 1 if s.start > start else s.start])
        cut = s.end + 1 - start
    parts.append(text[cut:])
    rest = re.sub(r"\s+", " ", " ".join(parts)).strip(" ,.;:-'`\"")
    left = [w for w in re.findall(r"[A-Za-z']+", SPEECH_TAG.sub(" ", rest)) if w.lower() not in {"hatter", "alice"}]
    lo, hi = NARRATION_WORDS
    return clean_chat_text(rest) if lo <= len(left) and len(rest.split()) <= hi else ""


def _message(an, turn: Turn, targets: set[str]) -> dict:
    if turn.speaker in targets:
        return {"role": "assistant", "content": clean_chat_text(turn.text)}
    who = an.display_name(turn.speaker) if turn.speaker and turn.speaker != "<group>" else "Someone"
    return {"role": "user", "content": f"{who[:1].upper() + who[1:]}: {clean_chat_text(turn.text)}"}


def _conversation(an, turns: list[Turn], targets: set[str]) -> list[dict]:
    """Messages of consecutive turns: users merged into one turn, narration before the character."""
    out: list[dict] = []
    for t in turns:
        m = {**_message(an, t, targets), "_lines": list(t.lines)}
        if len(m["content"]) < 2 and m["role"] == "assistant":
            continue
        if m["role"] == "assistant":
            note = narration(an, t)
            if note and out and out[-1]["role"] == "user":
                out[-1]["content"] += f"\n[{note}]"
        if out and out[-1]["role"] == m["role"]:
            out[-1]["content"] += ("\n" if m["role"] == "user" else " ") + m["content"]
            out[-1]["_lines"] += m["_lines"]
        else:
            out.append(m)
    return out


def _windows(messages: list[dict], max_tokens: int, system_tokens: int) -> list[list[dict]]:
    """Cut at most ``max_tokens`` windows that start with a user turn and end on an assistant turn."""
    while messages and messages[0]["role"] != "user":
        messages = messages[1:]
    windows, current, used = [], [], system_tokens
    for m in messages:
        cost = _tokens(m["content"])
        if current and used + cost > max_tokens:
            windows.append(current)
            current, used = [], system_tokens
        if not current and m["role"] != "user":
            continue  # a window opens on someone else's line
        current.append(m)
        used += cost
    windows.append(current)
    out = []
    for w in windows:
        while w and w[-1]["role"] != "assistant":
            w = w[:-1]
        if sum(m["role"] == "assistant" for m in w) >= 2:
            out.append(w)
    return out


def scene_records(an, targets: set[str], system: str, split_of: dict[int, str], max_tokens: int) -> list[dict]:
    """Multi-turn records of every scene of the character; ``split_of`` maps a character turn's
    first line to its dialogue record's split."""
    by_exchange: dict[int, list[Turn]] = {}
    for t in turns_of(an):
        by_exchange.setdefault(t.exchange, []).append(t)
    records = []
    for exchange, turns in by_exchange.items():
        speakers = {t.speaker for t in turns}
        if not speakers & targets or not speakers - targets or sum(t.speaker in targets for t in turns) < 2:
            continue
        for part, split in _split_runs(turns, targets, split_of):
            for w in _windows(_conversation(an, part, targets), max_tokens, _tokens(system)):
                mine = sorted({ln for m in w if m["role"] == "assistant" for ln in m["_lines"]})
                theirs = sorted({ln for m in w if m["role"] == "user" for ln in m["_lines"]})
                for m in w:
                    del m["_lines"]
                records.append({"messages": [{"role": "system", "content": system}, *w],
                                "source": {"kind": "scene", "exchange": exchange, "lines": mine,
                                           "context_lines": theirs, "turns": len(w)}, "_split": split})
    return records


def _split_runs(turns: list[Turn], targets: set[str], split_of: dict[int, str]):
    """Runs of turns whose character turns share one split (other speakers go with the next run)."""
    runs, current, split = [], [], None
    for t in turns:
        s = split_of.get(t.lines[0], "train") if t.speaker in targets else split
        if split is not None and s != split:
            runs.append((current, split))
            current = []  # the next window opens on the next line of someone else: no text in both splits
        current.append(t)
        split = s
    if current:
        runs.append((current, split or "train"))
    return runs
