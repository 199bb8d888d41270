"""Text metrics that catch a model that parrots, loops or recites instead of talking.

* distinct-n (Li et al. 2016): unique word n-grams / all word n-grams over all replies of an arm.
  One reply given to every prompt scores ~1/len(prompts).
* repetition rate: share of a reply's word trigrams that already occurred earlier in the same
  reply (a loop such as "I am nothing, and I am nothing" scores high), averaged over replies.
* shared-opening rate: share of replies whose first ``OPENING_N`` words open another reply of the
  same arm too. A verbal tic ("The same old thing, I suppose!" to every prompt) scores high even
  when the rest of each reply differs enough to keep distinct-n up.
* copy rate: share of replies that reproduce a book line verbatim, i.e. share at least
  ``COPY_N`` consecutive words with some line of the book (short catch-phrases are allowed,
  recitation is not).
* retention: plain factual/arithmetic prompts with expected substrings, to report (not hide) any
  damage the adapter did to what the base model knew.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from wonderland.errors import UserError
from wonderland.eval.persona import words

COPY_N = 8  # words in a row shared with a book line that count as reciting it
REPEAT_N = 3
OPENING_N = 3  # words that make a reply's opening
RETENTION_FILE = Path(__file__).with_name("retention.txt")


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(replies: Sequence[str], n: int) -> float:
    """Unique n-grams / total n-grams across ``replies`` (0 when there are none)."""
    grams = [g for r in replies for g in ngrams(words(r), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(reply: str, n: int = REPEAT_N) -> float:
    """Share of the reply's n-grams that repeat an earlier n-gram of the same reply."""
    grams = ngrams(words(reply), n)
    if not grams:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


def shared_opening_rate(replies: Sequence[str], n: int = OPENING_N) -> float:
    """Share of replies (of at least ``n`` words) whose first ``n`` words also open another reply."""
    openings = [tuple(words(r)[:n]) for r in replies]
    counts = Counter(o for o in openings if len(o) == n)
    return sum(counts[o] > 1 for o in openings if len(o) == n) / len(replies) if replies else 0.0


class CopyDetector:
    """Finds replies that contain ``n`` consecutive words of some book line."""

    def __init__(self, book_lines: Iterable[str], n: int = COPY_N) -> None:
        self.n = n
        self._grams = {g for line in book_lines for g in ngrams(words(line), n)}

    def copied(self, reply: str) -> bool:
        return any(g in self._grams for g in ngrams(words(reply), self.n))

    def rate(self, replies: Sequence[str]) -> float:
        return sum(map(self.copied, replies)) / len(replies) if replies else 0.0


@dataclass(frozen=True)
class RetentionItem:
    prompt: str
    expected: tuple[str, ...]  # any of these, case-insensitive

    def passed(self, reply: str) -> bool:
        """An expected answer stands in the reply as a word start ("4" is not found in "24", "ice"
        not in "nice"; "butterfl" finds "butterflies"), and a number is not part of a longer one."""
        low = reply.lower()
        return any(re.search(r"(?<![a-z0-9])" + re.escape(e.lower()) + (r"(?![0-9])" if e[-1:].isdigit() else ""), low)
                   for e in self.expected)


def load_retention(path: str | Path = RETENTION_FILE) -> list[RetentionItem]:
    """``prompt | expected | expected ...`` per line; ``#`` starts a comment line."""
    path, items = Path(path).expanduser(), []
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError) as e:
        raise UserError(f"retention file {path}: cannot be read ({type(e).__name__}); give a UTF-8 text file "
                        "of 'prompt | answer | answer' lines") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        prompt, *expected = [p.strip() for p in line.split(" | ")]
        if not prompt or not expected or not all(expected):
            raise UserError(f"{path}:{n}: expected 'prompt | answer | answer ...' (answers separated by ' | '), got {line.strip()!r}")
        items.append(RetentionItem(prompt, tuple(expected)))
    return items


def reply_stats(replies: Sequence[str], copies: CopyDetector) -> dict[str, float]:
    """Distinctness, repetition, copying and length of one arm's replies."""
    n = max(len(replies), 1)
    return {
        "distinct_1": round(distinct_n(replies, 1), 4),
        "distinct_2": round(distinct_n(replies, 2), 4),
        "repetition_rate": round(sum(repetition_rate(r) for r in replies) / n, 4),
        "shared_opening_rate": round(shared_opening_rate(replies), 4),
        "copy_rate": round(copies.rate(replies), 4),
        "mean_words": round(sum(len(words(r)) for r in replies) / n, 2),
        "empty_rate": round(sum(not words(r) for r in replies) / n, 4),
    }


# --- the character's own world: things of the book that the character's scenes talk about
WORLD_MIN_LINES = 3  # a chapter is the character's when they speak at least this often in it
WORLD_TERMS = 30
NOT_THINGS = frozenset("""said says added remarked replied interrupted exclaimed shouted spoke asked cried
answered continued began shook went looked thought felt tried called turned may might must shall same take
done mean suppose place stand read makes left used since among perfectly easily""".split())


def world_terms(utterances: Sequence[dict], who: set[str], book_lines: Sequence[str] = (),
                limit: int = WORLD_TERMS) -> dict[str, float]:
    """The distinctive words of the chapters the character speaks in against the rest of the book
    (the chapters' whole text when ``book_lines`` is given, else their quoted lines): log-odds z as
    for the style markers, speech verbs and other non-things left out. For the Hatter: the March
    Hare, the Dormouse, his watch, tea, Time, the court... The rule was fixed before any issue-14
    training run."""
    from wonderland.eval.persona import style_markers

    per_chapter = Counter(u.get("chapter") for u in utterances if u.get("speaker") in who)
    mine = {c for c, n in per_chapter.items() if n >= WORLD_MIN_LINES}
    spans: dict = {}
    for u in utterances:  # each chapter's first and last quoted line: its stretch of the book
        lo, hi = spans.get(u.get("chapter"), (u["line"], u["line"]))
        spans[u.get("chapter")] = (min(lo, u["line"]), max(hi, u["line"]))

    def text(chapters_in: bool) -> list[str]:
        if book_lines:
            return [ln for c, (lo, hi) in spans.items() if (c in mine) == chapters_in for ln in book_lines[lo - 1:hi]]
        return [u["text"] for u in utterances if (u.get("chapter") in mine) == chapters_in]

    found = style_markers(text(True), text(False), limit=limit + len(NOT_THINGS))
    return dict([(w, z) for w, z in found.items() if w not in NOT_THINGS][:limit])
def world_mention_rate(replies: Sequence[str], prompts: Sequence[str], terms: Iterable[str]) -> float:
    """Share of replies that name a thing of the character's world (a world term) which their
    prompt did not name."""
    terms = set(terms)
    if not replies:
        return 0.0
    hits = sum(bool((set(words(r)) & terms) - set(words(p))) for r, p in zip(replies, prompts))
    return round(hits / len(replies), 4)
