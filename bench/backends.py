"""Training and decoding speed of the two backends (PyTorch+PEFT, MLX) on the same data and model.

Each backend runs in its own subprocess (fair peak-memory numbers, and MLX's OpenBLAS preload must
happen before mlx is imported) through ``wonderland.train.train`` with identical settings: the
embedded SmolLM2-135M-Instruct, the Hatter dataset, TrainConfig's defaults (see ``settings()``) with
warmup 2 and validation only at the end. Prints one JSON object.

    python bench/backends.py                                  # both backends, 20 steps each
    python bench/backends.py --backends mlx --iters 30
    python bench/backends.py --backends mlx,mlx:4 --iters 40  # + MLX on the base quantized to 4 bits (issue 18)
    python bench/backends.py --backends mlx,mlx:none:on,mlx:4,mlx:4:off --iters 40 --threads 1
                                                              # BACKEND:QUANTIZE:GRAD_CHECKPOINT (auto/on/off)
    python bench/backends.py --backends mlx,mlx:4 --iters 3 --long-records   # every batch 4 x 256 tokens
    python bench/backends.py --data DIR --model PATH          # any dataset / HF folder
    python bench/backends.py --mlx-bundled-blas               # + MLX with the wheel's own BLAS (slow)
    python bench/backends.py --blas-probe                     # Linux: MLX matmul GFLOP/s per BLAS setup

On Apple Silicon (MLX on Metal, torch on MPS), from a checkout set up with ``make setup``:

    .venv/bin/python bench/backends.py --backends torch,mlx

Numbers per backend: ``train_tokens_per_s`` (real, non-padding tokens per second of step time,
median over steps 2..N: step 1 includes compilation / warm-up), ``first_step_s``, ``train_wall_s``
(setup + all steps + final eval), ``peak_rss_gb`` after training (process maximum resident set),
``framework_peak_gb`` (torch CUDA allocator / MLX allocator peak as the Step events report it; on
CPU torch reports RSS there), ``decode_tokens_per_s`` (greedy, 64 new tokens with the adapter on,
prompt processing included), final ``loss`` / ``val_loss``, ``loss_last5`` (the mean of the last 5 steps'
losses: less noisy than the last one), and the pre-flight estimate of the run (``estimate_gb``, less its
runtime term on MLX, whose peak counts only its allocations) with ``estimate_ratio`` = estimate / framework peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _spec(text: str) -> tuple[str, str, str]:
    """``BACKEND[:QUANTIZE[:GRAD_CHECKPOINT]]`` -> (backend, quantize, grad_checkpoint), defaults none / auto."""
    parts = text.split(":", 2)
    return tuple(parts + ["none", "auto"][len(parts) - 1:])  # type: ignore[return-value]


def child(backend: str, data: str, model: str, iters: int, out: str, threads: int, quantize: str = "none",
          grad_checkpoint: str = "auto", shape: tuple[int, int] | None = None) -> dict:
    """Train and decode with one backend (its base quantized as ``quantize``, ``grad_checkpoint`` as given,
    ``shape`` = (batch, max_seq_len) or TrainConfig's) in this process; return the measurements."""
    from wonderland import preflight
    from wonderland.config import GenerationConfig, TrainConfig
    from wonderland.events import read_metrics
    from wonderland.models import resolve_model
    from wonderland.train import train

    if threads and backend == "torch":
        import torch

        torch.set_num_threads(threads)  # for decoding too (TrainConfig.threads covers training)
    cfg = TrainConfig(model=model, backend=backend, iters=iters, val_every=0, save_every=0, warmup=2, threads=threads,
                      quantize=quantize, grad_checkpoint=grad_checkpoint,
                      **(dict(batch_size=shape[0], max_seq_len=shape[1]) if shape else {}))
    est = preflight.estimate(cfg, resolve_model(model, log=lambda m: None), backend)
    estimated = est.total - (est.runtime if backend == "mlx" else 0.0)
    t0 = time.perf_counter()
    run = train(cfg, data, out=out, log=lambda m: None)
    wall = time.perf_counter() - t0
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB (Linux); bytes on macOS
    if sys.platform == "darwin":
        rss_gb /= 1024
    records = read_metrics(run.metrics)
    steps = [r for r in records if r["event"] == "step"]
    started = next(r for r in records if r["event"] == "started")
    info = run.read()

    from wonderland.generate import load_run

    loaded = load_run(run)
    messages = loaded.messages_for("trained", [{"role": "user", "content": "What time is it?"}])
    gen = GenerationConfig(temperature=0, max_tokens=64, repetition_penalty=1.0)
    "".join(loaded.model.stream(messages, GenerationConfig(temperature=0, max_tokens=4)))  # warm-up
    t1 = time.perf_counter()
    text = "".join(loaded.model.stream(messages, gen))
    decode_s = time.perf_counter() - t1
    from transformers import AutoTokenizer

    n_new = len(AutoTokenizer.from_pretrained(info["model"]["path"])(text, add_special_tokens=False)["input_ids"])
    peak = max(r["peak_memory_gb"] for r in steps)
    return {
        "backend": backend,
        "quantize": quantize,
        "grad_checkpoint": info["result"].get("grad_checkpoint", grad_checkpoint),
        "device": started["device"],
        "steps": len(steps),
        "train_tokens_per_s": round(statistics.median(r["tokens_per_second"] for r in steps[1:]), 1),
        "first_step_s": round(steps[0]["elapsed_s"], 2),
        "train_wall_s": round(wall, 1),
        "peak_rss_gb": round(rss_gb, 2),
        "framework_peak_gb": round(peak, 3),
        "estimate_gb": round(estimated / 1e9, 3),
        "estimate_ratio": round(estimated / 1e9 / peak, 3),
        "tokens_per_step_max": max(r["tokens"] for r in steps),
        "decode_tokens_per_s": round(n_new / decode_s, 1),
        "decode_new_tokens": n_new,
        "loss": round(info["result"]["loss"], 3),
        "val_loss": round(info["result"]["val_loss"], 3) if info["result"].get("val_loss") is not None else None,
        "loss_last5": round(statistics.mean(r["loss"] for r in steps[-5:]), 4),
    }


PROBE = """
import ctypes, sys, time
if sys.argv[1] == "ctypes":  # what wonderland.backends.mlx_lora.backend does before importing mlx
    ctypes.CDLL("libopenblas.so.0", mode=ctypes.RTLD_GLOBAL)
import mlx.core as mx
a, b = mx.random.normal((1024, 1024)), mx.random.normal((1024, 1024))
mx.eval(a @ b)
t = time.perf_counter()
for _ in range(10):
    mx.eval(a @ b)
print(2 * 1024**3 * 10 / (time.perf_counter() - t) / 1e9)
"""


def blas_probe() -> dict:
    """float32 1024x1024 matmul GFLOP/s in MLX: bundled BLAS, OpenBLAS loaded in-process with
    RTLD_GLOBAL before mlx (our way), and OpenBLAS through LD_PRELOAD (the NOTES.md way)."""
    out = {}
    for mode, env in [("bundled", {}), ("ctypes_rtld_global", {}), ("ld_preload", {"LD_PRELOAD": "libopenblas.so.0"})]:
        proc = subprocess.run([sys.executable, "-c", PROBE, "ctypes" if mode.startswith("ctypes") else mode],
                              capture_output=True, text=True, env={**os.environ, **env}, check=True)
        out[mode] = round(float(proc.stdout.strip()), 1)
    return out


def settings() -> str:
    """What every run trains with: TrainConfig's defaults, warmup 2, no validation points."""
    from wonderland.config import TrainConfig

    d = TrainConfig()
    return (f"TrainConfig defaults: LoRA r={d.rank} alpha={d.alpha:g} on {d.targets}, all layers, batch {d.batch_size}, "
            f"max_seq_len {d.max_seq_len}, lr {d.lr:g} {d.schedule}, replay {d.replay:g}, KL {d.kl:g} (torch only); "
            f"warmup 2, validation only at the end")


def long_records(folder: Path) -> Path:
    """bench/preflight.py's records, long enough to be cut at any --max-seq-len up to ~500 tokens."""
    sys.path.insert(0, str(REPO / "bench"))
    from preflight import long_dataset

    return long_dataset(folder)


def hatter_dataset(folder: Path) -> Path:
    from wonderland.data import build_dataset

    build_dataset(None, "Hatter", folder)
    return folder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="torch,mlx",
                   help="comma-separated; BACKEND:Q trains on the base quantized as --quantize Q (mlx:4, mlx:8, torch:nf4), "
                        "BACKEND:Q:G also with --grad-checkpoint G (auto, on, off)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--data", help="dataset folder (default: the Hatter dataset built from the default book)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--mlx-bundled-blas", action="store_true", help="also run MLX without the OpenBLAS preload")
    p.add_argument("--bundled-iters", type=int, default=5, help="steps for the (slow) bundled-BLAS run")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per backend: torch.set_num_threads / OPENBLAS_NUM_THREADS (0 = library default)")
    p.add_argument("--blas-probe", action="store_true", help="only measure MLX matmul GFLOP/s per BLAS setup")
    p.add_argument("--long-records", action="store_true",
                   help="train on bench/preflight.py's long records: every batch --batch-size x --max-seq-len tokens")
    p.add_argument("--batch-size", type=int, default=0, help="with --max-seq-len: this shape (default TrainConfig's)")
    p.add_argument("--max-seq-len", type=int, default=0)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--quantize", default="none", help=argparse.SUPPRESS)
    p.add_argument("--grad-checkpoint", default="auto", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        shape = (args.batch_size, args.max_seq_len) if args.batch_size and args.max_seq_len else None
        print(json.dumps(child(args.child, args.data, args.model, args.iters, args.out, args.threads, args.quantize,
                               args.grad_checkpoint, shape)))
        return 0
    if args.blas_probe:
        print(json.dumps({"mlx_matmul_gflops_float32_1024": blas_probe()}, indent=2))
        return 0

    with tempfile.TemporaryDirectory(prefix="wl-bench-") as tmp:
        data = args.data or str(long_records(Path(tmp) / "data") if args.long_records else hatter_dataset(Path(tmp) / "data"))
        runs = [(*_spec(b), args.iters, {}) for b in args.backends.split(",")]
        if args.mlx_bundled_blas:
            runs.append(("mlx", "none", "auto", args.bundled_iters, {"WONDERLAND_MLX_BLAS": "bundled"}))
        results = []
        for backend, quantize, grad_checkpoint, iters, env in runs:
            out = Path(tmp) / f"run-{len(results)}"
            cmd = [sys.executable, __file__, "--child", backend, "--data", data, "--model", args.model,
                   "--iters", str(iters), "--out", str(out), "--threads", str(args.threads), "--quantize", quantize,
                   "--grad-checkpoint", grad_checkpoint, "--batch-size", str(args.batch_size),
                   "--max-seq-len", str(args.max_seq_len)]
            if args.threads:
                env = {**env, "OPENBLAS_NUM_THREADS": str(args.threads)}
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, cwd=REPO)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-3000:])
                return proc.returncode
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            if "WONDERLAND_MLX_BLAS" in env:
                result["variant"] = "bundled BLAS (no OpenBLAS preload)"
            results.append(result)
            print(json.dumps(result), file=sys.stderr)
        from wonderland.data import load_chat_jsonl

        n_train = len(load_chat_jsonl(Path(data) / "train.jsonl"))
    report = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "model": args.model,
        "train_records": n_train,
        "settings": settings(),
        "shape": f"batch {args.batch_size} x max_seq_len {args.max_seq_len}" if args.batch_size and args.max_seq_len else "defaults",
        "data": "bench/preflight.py long records" if args.long_records else (args.data or "Hatter dataset"),
        "threads": args.threads or "library default",
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "results": results,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
