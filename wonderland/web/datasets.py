"""Dataset API: build a character dataset from the default book or an uploaded one, browse, download.

Datasets live in ``$WONDERLAND_HOME/data/<name>/`` (train.jsonl, valid.jsonl, stats.json) as
written by :func:`wonderland.data.build_dataset`; uploaded books in ``$WONDERLAND_HOME/books/``.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from pathlib import Path
from typing import Any

from flask import Blueprint, jsonify, request, send_file

from wonderland.errors import UserError
from wonderland.fileio import atomic_write_text, iter_jsonl
from wonderland.runs import home
from wonderland.web.common import ApiError, valid_name

bp = Blueprint("data_api", __name__)

MAX_BOOK_BYTES = 16 * 1024 * 1024  # the longest novels are ~3-5 MB of plain text
MIN_BOOK_CHARS = 2_000  # below this there is no dialogue to learn from
SPLITS = ("train", "valid")
_build_lock = threading.Lock()  # one build at a time: builds are CPU-bound and share the output folders


def data_root() -> Path:
    return home() / "data"


def dataset_dir(name: str) -> Path:
    path = data_root() / valid_name(name, "dataset")
    if not path.is_dir():
        raise ApiError(404, f"no dataset named {name!r}; build one on the Dataset page")
    return path


def _stats(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "stats.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _summary(path: Path) -> dict[str, Any]:
    stats = _stats(path)
    return {"name": path.name, "character": stats.get("character"), "book": stats.get("book"),
            "train_records": stats.get("train_records"), "valid_records": stats.get("valid_records"),
            "scene_records": stats.get("scene_records"), "built": (path / "train.jsonl").stat().st_mtime}


@bp.get("/api/datasets")
def list_datasets():
    root = data_root()
    items = [_summary(p) for p in root.iterdir() if (p / "train.jsonl").exists()] if root.is_dir() else []
    return jsonify(datasets=sorted(items, key=lambda d: d["built"], reverse=True))


def validate_book(raw: bytes, filename: str) -> str:
    """Plain UTF-8 text of a sensible size, or a 400 saying what is wrong."""
    if len(raw) > MAX_BOOK_BYTES:
        raise ApiError(413, f"{filename}: {len(raw) / 2**20:.1f} MiB is larger than the {MAX_BOOK_BYTES // 2**20} MiB limit for a book")
    if b"\x00" in raw[:65536]:
        raise ApiError(400, f"{filename}: this is a binary file; upload the book as plain text (.txt, UTF-8)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"{filename}: not UTF-8 text (bad byte at offset {e.start}); save the book as UTF-8 plain text") from None
    if len(text.strip()) < MIN_BOOK_CHARS:
        raise ApiError(400, f"{filename}: only {len(text.strip())} characters; a book needs at least {MIN_BOOK_CHARS}")
    return text


def _save_book(text: str, filename: str) -> tuple[Path, bool]:
    """The uploaded book in books/ (content-addressed) and whether this call wrote it."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(filename).stem)[:60].strip("-") or "book"
    path = home() / "books" / f"{stem}-{digest}.txt"
    if path.exists():
        return path, False
    atomic_write_text(path, text)
    return path, True


def _build_from(upload, character: str, out: Path, **options: Any) -> tuple[dict, list[str]]:
    """build_dataset on the uploaded book (or the default one); a book this request saved is removed
    again when the build is refused, so a refused upload leaves nothing in books/."""
    from wonderland.data import build_dataset

    book, saved = None, False  # None: the default book (Alice's Adventures in Wonderland)
    if upload is not None and upload.filename:
        book, saved = _save_book(validate_book(upload.read(MAX_BOOK_BYTES + 1), upload.filename), upload.filename)
    warnings: list[str] = []
    built = False
    try:
        if not _build_lock.acquire(blocking=False):
            raise ApiError(409, "another dataset is being built right now; try again when it is done")
        try:
            stats = build_dataset(book, character, out, warn=warnings.append, **options)
        except UserError as e:
            raise ApiError(400, str(e)) from None
        finally:
            _build_lock.release()
        built = True
    finally:
        if saved and not built:
            book.unlink(missing_ok=True)
    return stats, warnings


@bp.post("/api/datasets")
def build():
    """Build a dataset. Form fields (multipart, with an optional ``book`` file) or JSON:
    ``character`` (required), ``name`` (default: the character, lower-case), ``aliases``
    (comma-separated), ``valid_fraction``, ``seed``."""
    form: dict[str, Any] = dict(request.form) if request.form or request.files else (request.get_json(silent=True) or {})
    if not isinstance(form, dict):
        raise ApiError(400, "expected form fields or a JSON object")
    character = str(form.get("character") or "").strip()
    if not character or len(character) > 80:
        raise ApiError(400, "character is required (the name as the book spells it, e.g. Hatter), at most 80 characters")
    default_name = "".join(c if c.isalnum() else "-" for c in character.lower()).strip("-") or "dataset"
    name = valid_name(str(form.get("name") or default_name), "dataset")
    aliases = tuple(a.strip() for a in str(form.get("aliases") or "").split(",") if a.strip())
    try:
        valid_fraction = float(form.get("valid_fraction") or 0.1)
        seed = int(form.get("seed") or 0)
    except ValueError:
        raise ApiError(400, "valid_fraction must be a number and seed an integer") from None
    if not 0 < valid_fraction < 0.5:
        raise ApiError(400, f"valid_fraction must be between 0 and 0.5 (got {valid_fraction})")
    stats, warnings = _build_from(request.files.get("book"), character, data_root() / name, aliases=aliases,
                                  valid_fraction=valid_fraction, seed=seed)
    return jsonify(name=name, stats=stats, warnings=warnings), 201


@bp.get("/api/characters")
def characters():
    """Who speaks in the default book, most lines first (the page's character suggestions)."""
    from wonderland.data import list_characters

    try:
        found = list_characters(None)
    except UserError as e:
        raise ApiError(400, str(e)) from None
    return jsonify(characters=[{"name": n, "lines": c} for n, c in found[:40]])


@bp.get("/api/datasets/<name>")
def stats(name: str):
    path = dataset_dir(name)
    return jsonify(name=path.name, stats=_stats(path))


def _attributions(path: Path) -> dict[int, str]:
    """Book line -> how its speaker was identified (explicit, pronoun, implicit, ...), from the
    attributed utterances.jsonl written beside the dataset (absent: no attribution column)."""
    out: dict[int, str] = {}
    for item in iter_jsonl(path / "utterances.jsonl"):
        if item.get("speaker") and isinstance(item.get("line"), int):
            out.setdefault(item["line"], item.get("attribution") or "")
    return out


def _record_row(rec: dict, attributions: dict[int, str]) -> dict[str, Any]:
    """A chat record as a preview row: the conversation (every turn after the system prompt, role and
    text: a scene record has several, its user turns one ``Speaker: ...`` line per speaker), the last
    user line and the character's last reply, where it came from (``kind``: dialogue, persona,
    scene, ...) and how its speaker was attributed."""
    msgs = rec.get("messages", [])
    turns = [{"role": m.get("role"), "content": m.get("content", "")} for m in msgs if m.get("role") != "system"]
    user = next((m["content"] for m in reversed(turns) if m["role"] == "user"), "")
    reply = next((m["content"] for m in reversed(turns) if m["role"] == "assistant"), "")
    source = rec.get("source") or {}
    lines = [n for n in source.get("lines") or [] if isinstance(n, int)]
    found = sorted({attributions[n] for n in lines if attributions.get(n)})
    return {"user": user, "reply": reply, "kind": source.get("kind"), "attribution": ", ".join(found) or None,
            "lines": lines, "turns": len(msgs), "messages": turns, "scene": source.get("kind") == "scene"}


@bp.get("/api/datasets/<name>/records")
def records(name: str):
    """One page of records: ``?split=train|valid&page=1&per_page=20`` (per_page at most 200)."""
    path = dataset_dir(name)
    split = request.args.get("split", "train")
    if split not in SPLITS:
        raise ApiError(400, f"split must be one of {', '.join(SPLITS)}")
    try:
        page = int(request.args.get("page", 1))
        per_page = int(request.args.get("per_page", 20))
    except ValueError:
        raise ApiError(400, "page and per_page must be integers") from None
    if page < 1 or not 1 <= per_page <= 200:
        raise ApiError(400, "page must be >= 1 and per_page between 1 and 200")
    from wonderland.data import load_chat_jsonl

    file = path / f"{split}.jsonl"
    rows = load_chat_jsonl(file) if file.exists() else []
    attributions = _attributions(path)
    start = (page - 1) * per_page
    return jsonify(split=split, page=page, per_page=per_page, total=len(rows),
                   pages=max(1, math.ceil(len(rows) / per_page)), records=[_record_row(r, attributions) for r in rows[start:start + per_page]])


@bp.get("/api/datasets/<name>/download/<split>")
def download(name: str, split: str):
    if split not in SPLITS:
        raise ApiError(400, f"split must be one of {', '.join(SPLITS)}")
    file = dataset_dir(name) / f"{split}.jsonl"
    if not file.exists():
        raise ApiError(404, f"dataset {name!r} has no {split}.jsonl")
    return send_file(file, mimetype="application/x-ndjson", as_attachment=True, download_name=f"{name}-{split}.jsonl")
