"""Book → one character's chat dataset (``utterances.jsonl``, ``train.jsonl``, ``valid.jsonl``, ``stats.json``)."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from wonderland.data.attribution import Analysis, analyse
from wonderland.data.book import default_book_path, read_book
from wonderland.data.persona import best_prompt_for, build_persona_pairs
from wonderland.data.scenes import scene_records
from wonderland.data.turns import clean_chat_text, turns_of
from wonderland.errors import UserError
from wonderland.fileio import atomic_replace_dir, atomic_write_json, atomic_write_jsonl, staging_dir

DATASET_FILES = ("utterances.jsonl", "train.jsonl", "valid.jsonl", "stats.json")
ATTRIBUTIONS = ("explicit", "pronoun", "implicit", "unknown")
PERSONA_SHARE = 1.0  # persona pairs per dialogue record, at most (bench/README.md: issue-5 variants)
FEW_LINES = 40  # below this, warn that the character has too few lines to train well
# a question for a line that answers nobody and matches no persona topic
_OPENERS = ["Go on.", "What do you say?", "Well?", "And what do you think?", "What is it?",
            "Tell me more.", "What's on your mind?", "Yes?"]


def character_system_prompt(character: str, book_title: str) -> str:
    """The system prompt for chatting with ``character`` (e.g. "the Hatter") from ``book_title``."""
    who = character.strip()
    return (f"You are {who} from {book_title}. Stay in character: answer as {who} would, "
            f"in {who}'s own voice and manner, briefly.")


def load_book_analysis(book: str | Path | None, warn: Callable[[str], None] | None = None) -> Analysis:
    path = default_book_path() if book is None else Path(book)
    return analyse(read_book(path), warn=warn)


def list_characters(book: str | Path | None) -> list[tuple[str, int]]:
    """Speakers found in ``book`` (default book when None) with their line counts, most first."""
    return load_book_analysis(book).speaker_counts()


def resolve_character(an: Analysis, character: str, aliases: Sequence[str] = ()) -> tuple[str, set[str]]:
    """(canonical name, set of canonical speakers that count as the character)."""
    def key(s: str) -> str:
        s = " ".join(s.split()).lower()
        return s[4:] if s.startswith("the ") else s

    lookup: dict[str, str] = {}
    for form, canon in an.names.items():
        lookup.setdefault(key(form), canon)
        lookup.setdefault(key(canon), canon)
    canon = lookup.get(key(character))
    if canon is None or not any(s.speaker == canon for s in an.spans):
        top = ", ".join(f"{n} ({c})" for n, c in an.speaker_counts()[:10])
        raise UserError(f"{character!r} never speaks in {an.book.path.name} (no attributed lines); "
                        f"top speakers: {top or 'none found'}")
    targets = {canon}
    for a in aliases:
        c = lookup.get(key(a))
        if c:
            targets.add(c)
    return canon, targets


@dataclass
class DatasetContext:
    """What every record builder sees: the analysed book, who the character is, the shared RNG."""
    an: Analysis
    canon: str
    targets: set[str]
    display: str
    system: str
    rng: random.Random
    seed: int
    persona: bool
    persona_share: float
    dialogue: list[dict]  # the dialogue records, each already in its split (``_split``)
    scenes: bool = True  # multi-turn scene records (data/scenes.py)
    max_tokens: int = 256  # a scene window's token budget (the training --max-seq-len)


# Record builders: ``builder(ctx) -> records``, each record a chat record (``_record``) that carries
# the ``_split`` ("train"/"valid") it belongs to. The dialogue records come first and fix the split;
# every builder here adds records after them, in this order (e.g. multi-turn scenes go here too).
RecordBuilder = Callable[[DatasetContext], list[dict]]


def _check_build_args(out_dir: Path, valid_fraction: float, persona_share: float) -> None:
    if not 0 <= valid_fraction < 1:
        raise UserError(f"valid fraction must be in [0, 1), got {valid_fraction}")
    if not 0 <= persona_share <= 5:
        raise UserError(f"persona share must be in [0, 5] (persona pairs per dialogue record), got {persona_share}")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output path {out_dir} exists and is not a folder")
    if out_dir.is_dir():
        stray = sorted(p.name for p in out_dir.iterdir() if p.name not in DATASET_FILES)
        if stray:
            raise UserError(f"output folder {out_dir} holds other files ({', '.join(stray[:3])}); "
                            f"pick an empty or new folder")


def build_dataset(book: str | Path | None, character: str, out_dir: str | Path, *, aliases: Sequence[str] = (),
                  valid_fraction: float = 0.1, seed: int = 0, persona: bool = True,
                  persona_share: float = PERSONA_SHARE, scenes: bool = True, max_seq_len: int = 256,
                  warn: Callable[[str], None] | None = None) -> dict:
    """Write ``character``'s dataset from ``book`` (default book when None) into ``out_dir``.

    Returns the stats (also written to ``stats.json``). Everything is computed before anything is
    written; the folder appears complete or not at all."""
    out_dir = Path(out_dir).expanduser()
    _check_build_args(out_dir, valid_fraction, persona_share)
    warnings: list[str] = []

    def _warn(msg: str) -> None:
        warnings.append(msg)
        if warn:
            warn(msg)

    an = load_book_analysis(book, warn=_warn)
    canon, targets = resolve_character(an, character, aliases)
    display = an.display_name(canon)
    system = character_system_prompt(display, an.book.title)
    rng = random.Random(seed)
    dialogue = _dialogue_records(an, targets, system, rng)
    _split_by_exchange(dialogue, valid_fraction, rng)
    ctx = DatasetContext(an, canon, targets, display, system, rng, seed, persona, persona_share, dialogue,
                         scenes, max_seq_len)
    extra = [r for builder in RECORD_BUILDERS for r in builder(ctx)]
    if scenes and not any(r["source"]["kind"] == "scene" for r in extra):
        _warn(f"{display} has no scene with other speakers in this book (two lines or more in one "
              "conversation): single-turn records only")
    train, valid = _dedupe_and_split(dialogue + extra)
    rng.shuffle(train)
    _warn_if_thin(ctx, valid_fraction, valid, _warn)
    stats = _stats(ctx, train, valid, valid_fraction, warnings)
    _write_dataset(out_dir, an, train, valid, stats)
    return stats


def _dialogue_records(an: Analysis, targets: set[str], system: str, rng: random.Random) -> list[dict]:
    """One record per turn of the character: the turn just before (someone else's, same exchange)
    is the user's line; without one, a persona prompt that fits the answer or an opener."""
    turns = turns_of(an)
    dialogue: list[dict] = []
    for k, t in enumerate(turns):
        if t.speaker not in targets:
            continue
        answer = clean_chat_text(t.text)
        if len(answer) < 2:
            continue
        prev = turns[k - 1] if k else None
        user, context = None, []
        if prev is not None and prev.exchange == t.exchange and prev.speaker not in targets:
            user = clean_chat_text(prev.text)
            context = prev.lines
        if not user:
            user = best_prompt_for(answer, rng) or rng.choice(_OPENERS)
        dialogue.append(_record(system, user, answer, t.lines, "dialogue", context=context,
                                exchange=t.exchange))
    return dialogue


def _split_by_exchange(dialogue: list[dict], valid_fraction: float, rng: random.Random) -> None:
    """Set each record's ``_split``: whole exchanges go to one side; an exchange longer than the
    validation target (one long conversation) is cut into runs of consecutive turns, so the split
    stays near the target. The same words said twice (rare) stay on one side."""
    target = round(valid_fraction * len(dialogue))
    if valid_fraction > 0 and target == 0 and len(dialogue) >= 2:
        target = 1
    cap = max(2, target)
    units: list[list[dict]] = []
    for r in dialogue:
        if units and units[-1][-1]["_exchange"] == r["_exchange"] and len(units[-1]) < cap:
            units[-1].append(r)
        else:
            units.append([r])
    rng.shuffle(units)
    n = 0
    for u in units:
        valid_unit = target > n and n + len(u) <= max(target * 1.5, target + 1)
        n += len(u) if valid_unit else 0
        for r in u:
            r["_split"] = "valid" if valid_unit else "train"
    split_of_text: dict[str, str] = {}
    for r in dialogue:
        r["_split"] = split_of_text.setdefault(r["messages"][2]["content"].lower(), r["_split"])


def _persona_records(ctx: DatasetContext) -> list[dict]:
    """Persona pairs (a question about a topic, answered by one of the character's lines), each in
    its source line's split."""
    if not ctx.persona or not ctx.dialogue:
        return []
    answers = [r["messages"][2]["content"] for r in ctx.dialogue]
    others = [ctx.an.display_name(n) for n, _ in ctx.an.speaker_counts() if n not in ctx.targets][:6]
    limit = int(ctx.persona_share * len(ctx.dialogue))
    out = []
    for p in build_persona_pairs(answers, others, limit, ctx.seed, self_name=ctx.canon):
        src = ctx.dialogue[p.answer_index]
        rec = _record(ctx.system, p.prompt, src["messages"][2]["content"], src["source"]["lines"], "persona",
                      topic=p.topic)
        rec["_split"] = src["_split"]
        out.append(rec)
    return out


def _scene_records(ctx: DatasetContext) -> list[dict]:
    """Multi-turn scene windows, each in the split of its character lines (data/scenes.py)."""
    if not ctx.scenes:
        return []
    split_of = {r["source"]["lines"][0]: r["_split"] for r in ctx.dialogue}
    return scene_records(ctx.an, ctx.targets, ctx.system, split_of, ctx.max_tokens)


RECORD_BUILDERS: list[RecordBuilder] = [_persona_records, _scene_records]


def _dedupe_and_split(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, valid), first of each conversation kept (same non-system turns, any case), private
    ``_split``/``_exchange`` keys removed."""
    seen: set[tuple[str, ...]] = set()
    train: list[dict] = []
    valid: list[dict] = []
    for r in records:
        k = tuple(m["content"].lower() for m in r["messages"] if m["role"] != "system")
        if k in seen:
            continue
        seen.add(k)
        (valid if r.pop("_split") == "valid" else train).append(r)
        r.pop("_exchange", None)
    return train, valid


def _warn_if_thin(ctx: DatasetContext, valid_fraction: float, valid: list[dict], warn: Callable[[str], None]) -> None:
    n = sum(s.speaker in ctx.targets for s in ctx.an.spans)
    if n < FEW_LINES:
        warn(f"{ctx.display} has only {n} lines in this book: expect a light touch of their "
             f"style at best, and a model that repeats their lines; {FEW_LINES}+ lines train better")
    if valid_fraction > 0 and not valid:
        warn("no validation records (too few exchanges); validation loss will not be reported")


def _stats(ctx: DatasetContext, train: list[dict], valid: list[dict], valid_fraction: float,
           warnings: list[str]) -> dict:
    an = ctx.an
    char_spans = [s for s in an.spans if s.speaker in ctx.targets]
    by_attr = Counter(s.attribution for s in an.spans)
    kinds = Counter(r["source"]["kind"] for r in train + valid)
    return {
        "character": ctx.canon,
        "display_name": ctx.display,
        "aliases": sorted(ctx.targets - {ctx.canon}),
        "book": an.book.title,
        "book_path": str(an.book.path.resolve()),
        "book_sha256": an.book.sha256,
        "quote_style": an.style.name,
        "system_prompt": ctx.system,
        "seed": ctx.seed,
        "valid_fraction": valid_fraction,
        "persona_share": ctx.persona_share if ctx.persona else 0.0,
        "spans": len(an.spans),
        "spans_by_attribution": {a: by_attr.get(a, 0) for a in ATTRIBUTIONS},
        "group_spans": sum(s.group for s in an.spans),
        "character_utterances": len(char_spans),
        "character_utterances_by_attribution": dict(Counter(s.attribution for s in char_spans)),
        "words": sum(len(s.text.split()) for s in char_spans),
        "dialogue_records": kinds.get("dialogue", 0),
        "persona_records": kinds.get("persona", 0),
        "scene_records": kinds.get("scene", 0),
        "scene_turns": sum(r["source"].get("turns", 0) for r in train + valid if r["source"]["kind"] == "scene"),
        "scenes": ctx.scenes,
        "train_records": len(train),
        "valid_records": len(valid),
        "top_speakers": an.speaker_counts()[:10],
        "warnings": warnings,
    }


def _write_dataset(out_dir: Path, an: Analysis, train: list[dict], valid: list[dict], stats: dict) -> None:
    stage = staging_dir(out_dir)
    try:
        atomic_write_jsonl(stage / "utterances.jsonl", (s.record() for s in an.spans))
        atomic_write_jsonl(stage / "train.jsonl", train)
        if valid:  # no empty file: readers treat a missing valid.jsonl as "no validation set"
            atomic_write_jsonl(stage / "valid.jsonl", valid)
        atomic_write_json(stage / "stats.json", stats)
        atomic_replace_dir(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _record(system: str, user: str, answer: str, lines: list[int], kind: str, *, context=(), exchange=None,
            topic=None) -> dict:
    source: dict = {"lines": list(lines), "kind": kind}
    if context:
        source["context_lines"] = list(context)
    if topic:
        source["topic"] = topic
    rec = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                        {"role": "assistant", "content": answer}], "source": source}
    if exchange is not None:
        rec["_exchange"] = exchange
    return rec


def load_chat_jsonl(path: str | Path) -> list[dict]:
    """Read chat records (``{"messages": [{"role", "content"}, …]}`` per line), validated.

    :class:`UserError` naming the file and line for unreadable files, malformed JSON, missing or
    malformed messages, and empty files."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a .jsonl file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8") from None
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        if not isinstance(rec, dict) or "messages" not in rec:
            raise UserError(f"{path}:{n}: record has no \"messages\" list")
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f"{path}:{n}: \"messages\" must be a non-empty list")
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise UserError(f"{path}:{n}: each message needs a role (system/user/assistant) and text content")
        if not any(m["role"] == "assistant" for m in msgs):
            raise UserError(f"{path}:{n}: no assistant message to learn from")
        records.append(rec)
    if not records:
        raise UserError(f"{path}: no records (empty file)")
    return records
