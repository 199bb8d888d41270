"""Speaker-attribution benchmark: precision / recall / F1 against the gold spans in bench/gold/.

    python bench/attribution.py [--book PATH] [--repeat N]

Prints one JSON object: for each quote style (the book as is, and a curly-quote copy made by
``gutenberg_to_curly``) and each gold character, overall and per-attribution-type scores, plus timings
(parse + attribute the whole book; whole ``build_dataset`` run). Per type T: ``precision`` =
correct spans attributed by T / spans attributed by T; ``recall`` = correct spans attributed by T /
all gold spans (the share of the gold that T finds; the types' recalls add up to the overall recall).
Gold files marked ``held_out`` were annotated after the rules were written, on chapters not looked at
while writing them: they are the honest estimate; the others (Hatter, King) are the development set.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wonderland.data import build_dataset, default_book_path  # noqa: E402
from wonderland.data.attribution import analyse  # noqa: E402
from wonderland.data.book import parse_book  # noqa: E402
from wonderland.data.quotes import gutenberg_to_curly  # noqa: E402

GOLD_DIR = Path(__file__).resolve().parent / "gold"
TYPES = ("explicit", "pronoun", "implicit")


def span_key(line: int, text: str) -> tuple[int, str]:
    """Identify a span by its opening line and first words (quote-style independent)."""
    words = re.findall(r"[a-z0-9]+", text.lower())[:4]
    return line, " ".join(words)


def load_gold() -> list[dict]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(GOLD_DIR.glob("*.json"))]


def _prf(correct: int, predicted: int, gold: int) -> dict:
    p = correct / predicted if predicted else 1.0
    r = correct / gold if gold else 1.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4), "predicted": predicted,
            "correct": correct, "gold": gold}


def score(analysis, gold: dict) -> dict:
    chapters = set(gold["chapters"])
    want = Counter(span_key(s["line"], s["text"]) for s in gold["spans"])
    name = gold["character"]
    pred = [s for s in analysis.spans if s.chapter in chapters and s.speaker == name]
    correct_by: Counter = Counter()
    pred_by: Counter = Counter()
    left = Counter(want)
    wrong = []
    for s in pred:
        k = span_key(s.line, s.text)
        pred_by[s.attribution] += 1
        if left[k] > 0:
            left[k] -= 1
            correct_by[s.attribution] += 1
        else:
            wrong.append({"line": s.line, "text": s.text[:60], "attribution": s.attribution})
    n_gold = sum(want.values())
    out = {"held_out": bool(gold.get("held_out")), "overall": _prf(sum(correct_by.values()), len(pred), n_gold)}
    for t in TYPES:
        out[t] = _prf(correct_by[t], pred_by[t], n_gold)
    out["false_positives"] = wrong
    out["missed"] = [{"line": k[0], "start": k[1]} for k, v in left.items() for _ in range(v)]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--book", help="the Canterbury alice29.txt (default: wonderland's default book)")
    ap.add_argument("--repeat", type=int, default=5, help="timing repeats; the best is reported")
    args = ap.parse_args(argv)
    path = Path(args.book) if args.book else default_book_path()
    data = path.read_bytes()
    gold = load_gold()
    result: dict = {"book": str(path), "machine": f"{platform.machine()}, {platform.processor() or '?'}, "
                    f"python {platform.python_version()}", "styles": {}}
    curly = gutenberg_to_curly(data.decode("utf-8").replace("\r\n", "\n")).encode("utf-8")
    for style, raw in (("gutenberg", data), ("curly", curly)):
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            an = analyse(parse_book(raw, path))
            best = min(best, time.perf_counter() - t0)
        entry = {"quote_style_detected": an.style.name, "spans": len(an.spans),
                 "parse_and_attribute_s": round(best, 4), "characters": {}}
        for g in gold:
            entry["characters"][g["character"]] = score(an, g)
        result["styles"][style] = entry
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        build_dataset(path, "Hatter", Path(tmp) / "hatter")
        result["build_dataset_hatter_s"] = round(time.perf_counter() - t0, 4)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
