"""What early stopping (``--patience K``) would have served on the runs measured so far.

    python bench/patience.py [--results bench/results] [--patience 1 2 3]

Every result file of ``bench/results`` that carries a run's probe ledger (``checkpoints``: one row
per validation point of a run trained to its end) is replayed point by point: the run would have
stopped at the first point where ``Ledger.stalled(K)`` holds, serving the best of the points so
far. Prints one JSON line per distinct ledger (the full run's served step, and per K the stop
step and the step served) and a summary line: how many ledgers each K would have served
differently, and the steps it saves.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wonderland.probe import Ledger, best  # noqa: E402


def ledgers(root: Path):
    """(file, rows) for each distinct probe ledger under ``root``."""
    seen: set[str] = set()
    for f in sorted(root.glob("*/*.json")):
        try:
            found = _find(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
        key = json.dumps(found)
        if found and key not in seen:
            seen.add(key)
            yield f, found


def _find(obj):
    if isinstance(obj, dict):
        rows = obj.get("checkpoints")
        if isinstance(rows, list) and rows and isinstance(rows[0], dict) and "persona_margin" in rows[0]:
            return rows
        for v in obj.values():
            if (hit := _find(v)) is not None:
                return hit
    return None


def replay(rows: list[dict], patience: int) -> tuple[int, int]:
    """(stop step, served step) of the run under ``patience``."""
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(Path(tmp))
        for r in rows:
            ledger.add(r["step"], {k: v for k, v in r.items() if k != "step"})
            if ledger.stalled(patience):
                break
        return r["step"], ledger.best_step()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--patience", type=int, nargs="+", default=[1, 2, 3])
    args = p.parse_args()
    changed = {k: 0 for k in args.patience}
    saved = {k: 0 for k in args.patience}
    total = n = 0
    for f, rows in ledgers(args.results):
        full, last = best(rows)["step"], rows[-1]["step"]
        line = {"file": str(f.relative_to(args.results)), "served": full, "steps": last}
        for k in args.patience:
            stop, served = replay(rows, k)
            line[f"patience_{k}"] = {"stop": stop, "served": served}
            changed[k] += served != full
            saved[k] += last - stop
        print(json.dumps(line))
        total, n = total + last, n + 1
    print(json.dumps({"ledgers": n, "steps": total, **{f"patience_{k}": {"served_differently": changed[k],
                      "steps_saved": saved[k]} for k in args.patience}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
