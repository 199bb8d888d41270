"""CPU training speed of the torch backend now vs an older revision, in one run (alternating).

    python bench/cpu_path.py --data DATA_DIR --old-rev abad063^ [--iters 8] [--rounds 2] [--fast]

Extracts the old revision's ``wonderland`` package with ``git archive`` into a temporary folder,
then trains the embedded model (float32, one thread) with each version in turn, in fresh
processes, and prints each run's tokens/s (median of the steps after the first two) and the ratio.
``--fast`` adds a third version: this revision with ``WONDERLAND_TORCH_FAST=1`` (the fast path,
fused LoRA layers included, which is otherwise CUDA-only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN = """
import json, sys
from wonderland.config import TrainConfig
from wonderland.train import train
run = train(TrainConfig(backend="torch", device="cpu", iters={iters}, batch_size=4, val_every=0, save_every=0, threads=1),
            sys.argv[1], out=sys.argv[2], log=lambda m: None)
print(json.dumps([json.loads(l)["tokens_per_second"] for l in run.metrics.read_text().splitlines() if '"event": "step"' in l]))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--old-rev", required=True)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--fast", action="store_true", help="also this revision with WONDERLAND_TORCH_FAST=1")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        old.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.old_rev, "wonderland"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        versions = [("old", old, {}), ("new", REPO, {})] + ([("new_fast", REPO, {"WONDERLAND_TORCH_FAST": "1"})] if args.fast else [])
        speeds: dict[str, list[float]] = {label: [] for label, _, _ in versions}
        for r in range(args.rounds):
            for label, path, extra in versions:
                env = {**os.environ, "PYTHONPATH": str(path), "WONDERLAND_HOME": str(Path(tmp) / "home"), **extra}
                out = subprocess.run([sys.executable, "-c", RUN.format(iters=args.iters), args.data, str(Path(tmp) / f"{label}-{r}")],
                                     capture_output=True, text=True, env=env, cwd=tmp, check=True)
                tps = json.loads(out.stdout.strip().splitlines()[-1])
                speeds[label].append(statistics.median(tps[2:]))
                print(json.dumps({"version": label, "round": r, "tokens_per_s": round(speeds[label][-1], 1)}), flush=True)
        med = {label: statistics.median(v) for label, v in speeds.items()}
        print(json.dumps({"old_rev": args.old_rev, **{f"{k}_median": round(v, 1) for k, v in med.items()},
                          **{f"{k}_vs_old": round(v / med["old"], 3) for k, v in med.items() if k != "old"}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
