"""Loading a plain-text book: validation, decoding, Gutenberg header/footer, title, chapters.

Also the default book lookup (:func:`default_book_path`). Standard library only.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path

from wonderland.errors import UserError
from wonderland.fileio import atomic_write_text
from wonderland.runs import home

ALICE_SHA256 = "7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0"
ALICE_SDIST = "brotli==1.2.1"
ALICE_MEMBER = "tests/testdata/alice29.txt"

_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_CHAPTER = re.compile(r"^[ \t]*CHAPTER[ \t]+([IVXLC]+|\d+)\b[^\n]*$", re.M | re.I)
_ROMAN = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100}
_SMALL_WORDS = {"a", "an", "and", "as", "at", "but", "by", "for", "in", "of", "on", "or", "the", "to", "with"}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def default_book_path() -> Path:
    """The default book (*Alice's Adventures in Wonderland*), found in this order:

    1. ``$WONDERLAND_BOOK`` (any plain-text book; must exist);
    2. ``$WONDERLAND_HOME/books/alice.txt`` (``WONDERLAND_HOME`` defaults to ``~/.cache/wonderland``);
    3. downloaded once: ``pip download --no-deps --no-binary :all: brotli==1.2.1`` (its source
       distribution ships the Canterbury corpus copy ``tests/testdata/alice29.txt``), checked against
       sha256 ``7467306e…``, and cached at the path of step 2.

    Raises :class:`UserError` with the fix when none of these works.
    """
    env = os.environ.get("WONDERLAND_BOOK")
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise UserError(f"$WONDERLAND_BOOK points to {p}, which is not a file: fix or unset it")
        return p
    cached = home() / "books" / "alice.txt"
    if cached.is_file():
        return cached
    try:
        data = _download_alice()
    except (OSError, subprocess.SubprocessError, tarfile.TarError) as e:  # network, pip, disk, a bad archive
        raise UserError(_no_book_message(f"{type(e).__name__}: {e}")) from e
    # The book is plain ASCII (checked by its sha256), so the text writer stores the same bytes.
    atomic_write_text(cached, data.decode("ascii"))
    return cached


def _no_book_message(why: str) -> str:
    return (
        f"no default book available ({why.strip().splitlines()[-1] if why.strip() else 'unknown error'}); "
        "pass --book PATH, set $WONDERLAND_BOOK, or put alice.txt in $WONDERLAND_HOME/books/"
    )


def _download_alice() -> bytes:
    with tempfile.TemporaryDirectory(prefix="wonderland-book-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", tmp, ALICE_SDIST]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise UserError(_no_book_message(f"pip download {ALICE_SDIST} failed: {proc.stderr or proc.stdout}"))
        archives = sorted(Path(tmp).glob("*.tar.gz"))
        if not archives:
            raise UserError(_no_book_message(f"pip download {ALICE_SDIST} gave no source archive"))
        with tarfile.open(archives[0]) as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("/" + ALICE_MEMBER)), None)
            if member is None:
                raise UserError(_no_book_message(f"{ALICE_MEMBER} not found in {archives[0].name}"))
            data = tar.extractfile(member).read()
    if sha256_bytes(data) != ALICE_SHA256:
        raise UserError(_no_book_message(f"downloaded {ALICE_MEMBER} has the wrong sha256"))
    return data


@dataclass
class Book:
    path: Path
    sha256: str
    text: str  # the whole file, LF line endings
    start: int  # body (after any Gutenberg header) as offsets into text
    end: int
    title: str
    line_starts: list[int] = field(repr=False)
    chapter_starts: list[tuple[int, int]] = field(repr=False)  # (offset, chapter number), sorted

    def line_of(self, offset: int) -> int:
        """1-based line number of a character offset."""
        return bisect_right(self.line_starts, offset)

    def chapter_of(self, offset: int) -> int:
        i = bisect_right([o for o, _ in self.chapter_starts], offset) - 1
        return self.chapter_starts[i][1] if i >= 0 else 0


def read_book(path: str | Path) -> Book:
    """Read and validate a book file; :class:`UserError` for anything that is not a text book."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"book not found: {path}")
    if path.is_dir():
        raise UserError(f"book path is a folder, not a text file: {path}")
    data = path.read_bytes()
    return parse_book(data, path)


def parse_book(data: bytes, path: str | Path = "<book>") -> Book:
    path = Path(path)
    if not data.strip():
        raise UserError(f"{path}: the file is empty")
    if b"\x00" in data[:65536]:
        raise UserError(f"{path}: looks like a binary file, not a plain-text book")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(
            f"{path}: not valid UTF-8 (byte {e.start}, line {line}); convert it, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name} > book.txt`"
        ) from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if sum(c.isprintable() or c in "\n\t" for c in text[:20000]) < 0.95 * len(text[:20000]):
        raise UserError(f"{path}: looks like a binary file, not a plain-text book")
    start, end = 0, len(text)
    header_title = None
    m = _GUTENBERG_START.search(text)
    if m:
        t = re.search(r"^Title:\s*(.+)$", text[: m.start()], re.M)
        header_title = t.group(1).strip() if t else None
        start = m.end()
    m = _GUTENBERG_END.search(text, start)
    if m:
        end = m.start()
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
    chapters = []
    for m in _CHAPTER.finditer(text, start, end):
        chapters.append((m.start(), _chapter_number(m.group(1), len(chapters) + 1)))
    title = header_title or _guess_title(text[start: chapters[0][0] if chapters else end]) or path.stem
    return Book(path=path, sha256=sha256_bytes(data), text=text, start=start, end=end, title=title,
                line_starts=line_starts, chapter_starts=chapters)


def _chapter_number(token: str, fallback: int) -> int:
    if token.isdigit():
        return int(token)
    total, prev = 0, 0
    for ch in reversed(token.upper()):
        v = _ROMAN.get(ch, 0)
        total += -v if v < prev else v
        prev = max(prev, v)
    return total or fallback


def _guess_title(front: str) -> str | None:
    for line in front.splitlines()[:40]:
        line = line.strip()
        if len(line) < 3 or not re.search(r"[A-Za-z]{3}", line) or line.lower().startswith(("by ", "produced")):
            continue
        if len(line) > 80:
            return None
        return _smart_title(line) if line.isupper() else line
    return None


def _smart_title(line: str) -> str:
    words = line.lower().split()
    out = []
    for i, w in enumerate(words):
        if i and w in _SMALL_WORDS:
            out.append(w)
        else:
            out.append(w[:1].upper() + w[1:])
    return " ".join(out)
