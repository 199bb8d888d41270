"""The book's speech as turns: consecutive spans of one speaker in a paragraph, grouped into
exchanges (runs of consecutive paragraphs that hold speech), and book text made into chat text."""

from __future__ import annotations

import re
from dataclasses import dataclass

from wonderland.data.attribution import Analysis, Span


@dataclass
class Turn:
    exchange: int
    speaker: str | None
    spans: list[Span]

    @property
    def text(self) -> str:
        return join_spans([s.text for s in self.spans])

    @property
    def lines(self) -> list[int]:
        return sorted({s.line for s in self.spans})


def join_spans(texts: list[str]) -> str:
    """One speaker's spans interrupted by narration, as one utterance: `` `A,' said X, `b' `` is
    "A, b"; `` `A,' said X. `B' `` is "A. B"; `` `A--' (…) `--b' `` is "A--b"; "I" starts no new sentence."""
    out = ""
    for t in texts:
        if not out:
            out = t
        elif t.startswith("-"):
            out = out.rstrip(",;:- ") + "--" + t.lstrip("-")
        elif out[-1] in ",;:" and t[:1].isupper() and not re.match(r"I\b", t):
            out = out[:-1] + ". " + t
        else:
            out = out + " " + t
    return out


def turns_of(an: Analysis) -> list[Turn]:
    """Spans grouped into turns: consecutive spans of one speaker within a paragraph; exchanges are
    runs of consecutive paragraphs that hold speech."""
    turns: list[Turn] = []
    exchange = -1
    last_block = None
    for s in an.spans:
        if last_block is None or s.block != last_block + 1 and s.block != last_block:
            exchange += 1
        who = s.speaker if not s.group else "<group>"
        if turns and turns[-1].exchange == exchange and turns[-1].spans[-1].block == s.block \
                and turns[-1].speaker == who:
            turns[-1].spans.append(s)
        else:
            turns.append(Turn(exchange, who, [s]))
        last_block = s.block
    return turns


_CAPS = re.compile(r"\b[A-Z][A-Z']+\b")


def clean_chat_text(text: str) -> str:
    """Book text → chat text: ASCII quotes, em dashes, no SHOUTING emphasis or _underscores_."""
    t = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    t = re.sub(r"_(\w+)_", r"\1", t)
    t = t.replace("--", "\u2014")

    def fix(m: re.Match) -> str:
        w = m.group(0)
        if w in ("I", "O", "A") or (len(w.replace("'", "")) < 2):
            return w
        low = w.lower()
        if low == "i" or low.startswith("i'"):
            return "I" + low[1:]
        before = t[: m.start()].rstrip(' "\u2014')
        if not before or before[-1] in ".!?":
            return low[:1].upper() + low[1:]
        return low

    t = _CAPS.sub(fix, t)
    t = re.sub(r"\s+", " ", t).strip()
    if t[-1:] in ",;:":  # `…,' said the Hatter: the comma belonged to the narration
        t = t[:-1].rstrip() + "."
    return t
