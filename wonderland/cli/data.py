"""``wonderland data``: turn a book into one character's chat dataset."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from wonderland.data.dataset import PERSONA_SHARE
from wonderland.errors import UserError

HELP = "turn a book into a character's chat dataset (speaker attribution, train/valid split)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--book", metavar="PATH",
                        help="plain-text book (default: $WONDERLAND_BOOK, else the cached or downloaded "
                             "Alice's Adventures in Wonderland)")
    parser.add_argument("--character", default="Hatter", metavar="NAME",
                        help="character to imitate, as the book names them (default: Hatter)")
    parser.add_argument("--alias", action="append", default=[], metavar="NAME",
                        help="another name the character goes by (repeatable)")
    parser.add_argument("--out", metavar="DIR",
                        help="output folder (default: $WONDERLAND_HOME/data/<character>)")
    parser.add_argument("--valid-fraction", type=float, default=0.1, metavar="F",
                        help="share of dialogue records held out for validation (default: 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split and persona pairs (default: 0)")
    parser.add_argument("--no-persona", action="store_true", help="dialogue records only, no persona pairs")
    parser.add_argument("--persona-share", type=float, default=PERSONA_SHARE, metavar="F",
                        help="persona pairs per dialogue record, at most (default: "
                             f"{PERSONA_SHARE}; fewer when the character has few lines on everyday topics)")
    parser.add_argument("--scenes", action=argparse.BooleanOptionalAction, default=True,
                        help="also write multi-turn scene records: the character's conversations in the book, other "
                             "speakers' lines as user turns ('Alice: ...'), cut to --max-seq-len tokens (default: on)")
    parser.add_argument("--max-seq-len", type=int, default=256, metavar="L",
                        help="token budget of a scene window; use the training --max-seq-len (default: 256)")
    parser.add_argument("--list-characters", action="store_true",
                        help="print the speakers found in the book with their line counts, and exit")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")


def run(args: argparse.Namespace) -> int:
    from wonderland.data import build_dataset, list_characters
    from wonderland.runs import home
    from wonderland.data.dataset import DATASET_FILES

    if args.list_characters:
        rows = list_characters(args.book)
        if not rows:
            raise UserError("no speakers found in the book")
        width = max(len(n) for n, _ in rows)
        for name, count in rows:
            print(f"{name:<{width}}  {count}")
        return 0

    name = "-".join(re.sub(r"^the\s+", "", args.character.strip().lower()).split()) or "character"
    out = Path(args.out).expanduser() if args.out else home() / "data" / name
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not any((out / f).exists() for f in DATASET_FILES):
            raise UserError(f"--out {out} is not empty and holds no dataset; pick an empty or new folder")
        if not args.overwrite:
            raise UserError(f"{out} already holds a dataset; pass --overwrite to replace it")

    def warn(msg: str) -> None:
        print(f"warning: {msg}", file=sys.stderr)

    stats = build_dataset(args.book, args.character, out, aliases=args.alias, valid_fraction=args.valid_fraction,
                          seed=args.seed, persona=not args.no_persona,
                          persona_share=args.persona_share, scenes=args.scenes, max_seq_len=args.max_seq_len,
                          warn=warn)
    by = stats["spans_by_attribution"]
    mine = stats["character_utterances_by_attribution"]
    print(f"wrote {out}")
    print(f"  book       {stats['book']} ({stats['quote_style']} quotes) {stats['book_path']}")
    print(f"  spans      {stats['spans']} quoted spans: " + ", ".join(f"{by[k]} {k}" for k in by))
    print(f"  {stats['display_name']:<10} {stats['character_utterances']} lines, {stats['words']} words ("
          + ", ".join(f"{v} {k}" for k, v in sorted(mine.items())) + ")")
    print(f"  records    {stats['train_records']} train, {stats['valid_records']} valid "
          f"({stats['dialogue_records']} dialogue, {stats['persona_records']} persona, {stats['scene_records']} scene)")
    print(f"  system     {stats['system_prompt']}")
    return 0
