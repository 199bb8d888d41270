"""The pre-flight memory estimate (wonderland/preflight.py) against the measured peak of real training runs.

Each case trains in its own subprocess through ``wonderland.train.train`` on records long enough to be cut
at ``--max-seq-len`` (every batch is batch x max_seq_len tokens, the estimate's worst case), then compares
``preflight.estimate(...)`` with the largest ``peak_memory_gb`` of its Step events: MLX's allocator peak
on MLX (the estimate without its runtime term), the process's peak RSS for torch on CPU (with it).
Prints one JSON object.

    python bench/preflight.py                                   # embedded model, mlx / mlx:4 / torch, 3 steps each
    python bench/preflight.py --cases mlx,mlx:4 --model PATH --batch-size 2 --max-seq-len 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("tea time riddle raven writing desk butter watch hare dormouse treacle well clean cup move down "
         "the table why is a like because it was best you know").split()


def long_dataset(folder: Path, n: int = 8, words: int = 400) -> Path:
    """``n`` train / 2 valid records whose replies run past any max_seq_len up to ~500 tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    system = "You are the Hatter from Alice's Adventures in Wonderland."

    def record(i: int) -> dict:
        reply = " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(words))
        return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}?"},
                             {"role": "assistant", "content": reply}]}
    (folder / "train.jsonl").write_text("".join(json.dumps(record(i)) + "\n" for i in range(n)))
    (folder / "valid.jsonl").write_text("".join(json.dumps(record(n + i)) + "\n" for i in range(2)))
    (folder / "stats.json").write_text(json.dumps({"character": "Hatter", "system_prompt": system}))
    return folder


def child(case: str, data: str, model: str, out: str, iters: int, batch: int, seq: int) -> dict:
    from wonderland import preflight
    from wonderland.config import TrainConfig
    from wonderland.events import read_metrics
    from wonderland.models import resolve_model
    from wonderland.train import train

    backend, quantize = (case + ":none").split(":")[:2]
    cfg = TrainConfig(model=model, backend=backend, quantize=quantize, iters=iters, batch_size=batch, max_seq_len=seq,
                      val_every=0, save_every=0, warmup=0, replay=0, kl=0)
    est = preflight.estimate(cfg, resolve_model(model, log=lambda m: None), backend)
    run = train(cfg, data, out=out, log=lambda m: None)
    steps = [r for r in read_metrics(run.metrics) if r["event"] == "step"]
    measured = max(r["peak_memory_gb"] for r in steps) * 1e9
    estimated = est.total - (est.runtime if backend == "mlx" else 0.0)  # MLX's peak counts only its allocations
    return {"case": case, "measured_gb": round(measured / 1e9, 3), "estimated_gb": round(estimated / 1e9, 3),
            "ratio": round(estimated / measured, 3), "terms_gb": est.to_dict()["gb"],
            "what_is_measured": "MLX allocator peak" if backend == "mlx" else "process peak RSS",
            "tokens_per_step": [r["tokens"] for r in steps]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="mlx,mlx:4,torch", help="BACKEND or BACKEND:QUANTIZE, comma-separated")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.data, args.model, args.out, args.iters, args.batch_size, args.max_seq_len)))
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="wl-preflight-") as tmp:
        data = long_dataset(Path(tmp) / "data")
        for i, case in enumerate(args.cases.split(",")):
            cmd = [sys.executable, __file__, "--child", case, "--data", str(data), "--model", args.model,
                   "--out", str(Path(tmp) / f"run-{i}"), "--iters", str(args.iters), "--batch-size", str(args.batch_size),
                   "--max-seq-len", str(args.max_seq_len)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-3000:])
                return proc.returncode
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), file=sys.stderr)
    print(json.dumps({"date": time.strftime("%Y-%m-%d", time.gmtime()),
                      "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                      "model": args.model, "batch_size": args.batch_size, "max_seq_len": args.max_seq_len,
                      "iters": args.iters, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
