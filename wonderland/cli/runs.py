"""``wonderland runs``: the training runs under $WONDERLAND_HOME/runs, newest first."""

from __future__ import annotations

import argparse
import json

from wonderland.errors import UserError
from wonderland.runs import list_runs, runs_root

HELP = "list training runs (status, steps, losses); --json for scripts"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object per run")


def _fmt(x) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "-"


def run(args: argparse.Namespace) -> int:
    runs = list_runs()
    if not runs:
        print(f"No runs in {runs_root()}; train one with `wonderland train` or `wonderland demo`.")
        return 0
    rows = []
    for r in runs:
        try:
            info = r.read()
        except UserError as e:  # a corrupt run.json must not hide the other runs
            info = {"status": f"unreadable ({e})"}
        result = info.get("result") or {}
        rows.append({"name": r.name, "status": info.get("status"), "character": info.get("character"),
                     "step": result.get("step"), "iters": (info.get("config") or {}).get("iters"),
                     "loss": result.get("loss"), "val_loss": result.get("val_loss"), "best_step": result.get("best_step"),
                     "created": info.get("created"), "path": str(r.path)})
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'NAME':<32} {'STATUS':<11} {'STEPS':>9} {'BEST':>6} {'LOSS':>7} {'VAL':>7}  CREATED")
    for row in rows:
        steps = f"{row['step'] or 0}/{row['iters'] or '?'}"
        best = str(row["best_step"]) if row["best_step"] is not None else "-"
        print(f"{row['name']:<32} {str(row['status']):<11} {steps:>9} {best:>6} {_fmt(row['loss']):>7} {_fmt(row['val_loss']):>7}  "
              f"{row['created'] or ''}")
    return 0
