"""Finding quoted spans in a book, in either common quote style.

* Gutenberg/Canterbury style: a backtick opens, an apostrophe closes (`` `Your hair wants cutting,' ``),
  nested quotes are ``"…"``; apostrophes inside words (don't, Hatter's) are not closing quotes.
* Curly style: ``“…”`` with nested ``‘…’`` (or ``‘…’`` outside with nested ``“…”``).
* Straight double quotes ``"…"``.

A span may cross line breaks and blank lines: a stanza that reopens the quote without closing the
previous one continues the span, and so does a block (an indented verse) after which the quote is
closed. An unclosed quote is reported (line numbers) and closed at the end of its paragraph.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from wonderland.errors import UserError


@dataclass(frozen=True)
class QuoteStyle:
    name: str
    open: str
    close: str
    ambiguous: bool  # the closing mark is also the apostrophe

    def closes_at(self, text: str, i: int) -> bool:
        """Is ``text[i]`` (a closing mark) really a closing quote, not an apostrophe?"""
        if text[i] != self.close:
            return False
        if not self.ambiguous:
            return True
        nxt = text[i + 1] if i + 1 < len(text) else " "
        return not nxt.isalnum()


STYLES = {
    "gutenberg": QuoteStyle("gutenberg", "`", "'", True),
    "curly": QuoteStyle("curly", "\u201c", "\u201d", False),
    "curly-single": QuoteStyle("curly-single", "\u2018", "\u2019", True),
    "straight": QuoteStyle("straight", '"', '"', False),
}


def detect_style(text: str) -> QuoteStyle:
    counts = {
        "gutenberg": text.count("`"),
        "curly": min(text.count("\u201c"), text.count("\u201d")),
        # an opening single curly quote is one not inside a word
        "curly-single": len(re.findall(r"(?<![A-Za-z])\u2018", text)),
        "straight": text.count('"') // 2,
    }
    name, n = max(counts.items(), key=lambda kv: kv[1])
    if n < 2:
        raise UserError("no quoted dialogue found in the book (looked for `…', “…”, ‘…’ and \"…\" quotes)")
    return STYLES[name]


@dataclass
class RawSpan:
    start: int  # offset of the opening mark
    end: int  # offset of the closing mark (or where the span was cut, if unclosed)
    text: str  # span text, no quote marks, whitespace collapsed
    closed: bool


_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_WS = re.compile(r"\s+")
_LINE_HYPHEN = re.compile(r"(?<=[A-Za-z])-[ \t]*\n\s*(?=[A-Za-z])")  # bread-\nand-butter


def find_spans(text: str, start: int, end: int, style: QuoteStyle, line_of=None,
               warn=None) -> list[RawSpan]:
    """All quoted spans in ``text[start:end]`` in order. ``warn`` gets one message per unclosed quote."""
    spans: list[RawSpan] = []
    o, c = style.open, style.close
    same = o == c
    i = start
    while True:
        i = text.find(o, i, end)
        if i < 0:
            break
        span_start = i
        pieces: list[str] = []
        j = i + 1
        piece_start = j
        closed = False
        cut = None
        while j < end:
            ch = text[j]
            if ch == c and style.closes_at(text, j):
                closed = True
                break
            if ch == "\n":
                m = _BLANK_LINE.match(text, j)
                if m:  # paragraph break inside an open quote
                    k = m.end()
                    while k < end and text[k] in " \t\n":
                        k += 1
                    if k < end and text[k] == o:  # the next stanza reopens the quote: same span
                        pieces.append(text[piece_start:j])
                        j = piece_start = k + 1
                        continue
                    if not _inner_quote_open(text[span_start + 1: j], style) and \
                            not _closes_before_opening(text, k, end, style):
                        cut = j
                        break
                    j = m.end()
                    continue
            elif ch == o and not same:  # a new opening inside an unclosed quote
                cut = j
                break
            j += 1
        stop = j if closed else (cut if cut is not None else end)
        pieces.append(text[piece_start:stop])
        if not closed and warn is not None:
            where = f"line {line_of(span_start)}" if line_of else f"offset {span_start}"
            warn(f"unbalanced quote: the quote opened at {where} is not closed; closed at its paragraph end")
        body = _WS.sub(" ", _LINE_HYPHEN.sub("-", " ".join(pieces))).strip()
        spans.append(RawSpan(span_start, stop, body, closed))
        i = stop + 1 if closed else stop
    return spans


_INNER = {"gutenberg": ('"', '"'), "curly": ("\u2018", "\u2019"), "curly-single": ("\u201c", "\u201d")}


def _inner_quote_open(body: str, style: QuoteStyle) -> bool:
    """Is a nested quote still open at the end of ``body``? (A poem quoted inside speech, whose
    stanzas do not reopen the outer quote: the speech goes on.)"""
    marks = _INNER.get(style.name)
    if marks is None:
        return False
    io, ic = marks
    if io == ic:
        return body.count(io) % 2 == 1
    opens = len(re.findall(f"(?<![A-Za-z]){io}", body))
    closes = len(re.findall(f"{ic}(?![A-Za-z])", body))
    return opens > closes


def _closes_before_opening(text: str, k: int, end: int, style: QuoteStyle, max_lines: int = 80) -> bool:
    """After a paragraph break inside an open quote: does a closing mark come before any opening
    mark, within ``max_lines``? (A verse block quoted inside speech, then the speech goes on.)"""
    limit = k
    for _ in range(max_lines):
        nl = text.find("\n", limit, end)
        if nl < 0:
            limit = end
            break
        limit = nl + 1
    j = k
    while j < limit:
        ch = text[j]
        if ch == style.close and style.closes_at(text, j):
            return True
        if ch == style.open:
            return False
        j += 1
    return False


def gutenberg_to_curly(text: str) -> str:
    """Convert a Gutenberg-style book (`` `…' `` outside, ``"…"`` inside) to curly quotes
    (``“…”`` outside, ``‘…’`` inside, ’ for apostrophes). Independent of :func:`find_spans`: a plain
    left-to-right pass, used to prove the extractor on both styles. Offsets and lines are kept."""
    out = []
    inside = False
    inner_open = False
    n = len(text)
    for i, ch in enumerate(text):
        if ch == "`":
            out.append("\u201c")
            inside = True
        elif ch == "'":
            prev = text[i - 1] if i else " "
            nxt = text[i + 1] if i + 1 < n else " "
            if inside and not nxt.isalpha() and not (prev.isspace() and nxt.isalnum()):
                out.append("\u201d")
                inside = False
                inner_open = False
            else:
                out.append("\u2019")
        elif ch == '"':
            out.append("\u2019" if inner_open else "\u2018")
            inner_open = not inner_open
        else:
            out.append(ch)
    return "".join(out)
