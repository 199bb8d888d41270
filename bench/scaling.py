"""Data-parallel scaling of wonderland's trainer: tokens/s on 1, 2, 4, 8 GPUs (what the machine has).

Each point launches ``torchrun --nproc-per-node N`` running this file's worker: the Llama-3.2
shapes of bench/train_throughput.py, LoRA r=16 on all seven projections, wonderland's fast path
(torch_fast defaults) under DDP exactly as ``wonderland train --num-gpus N`` runs it
(wonderland.backends.torch_peft.distributed.wrap_loss, global-token loss accounting), 8 x 1024 random tokens per GPU
per step (weak scaling). Rank 0 prints one JSON line; the parent adds the speed-up over 1 GPU.

    python bench/scaling.py                    # 1b and 3b on 1, 2, 4, 8 GPUs (those present)
    python bench/scaling.py --gpus 1,2 --sizes 1b
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))


def worker(args) -> None:
    import torch

    from train_throughput import PEAK_FLOPS, build_model, flops_per_step, random_batches
    from wonderland.backends.torch_peft import distributed
    from wonderland.backends.torch_peft.fast import training as tf

    w, dev = distributed.setup(torch.device("cuda"))
    model = build_model(args.size, "cuda")  # same seed on every rank; DDP broadcasts rank 0's anyway
    opts = tf.prepare_model(model, dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = tf.make_optimizer(params, 1e-4, 0.0, opts)
    use_liger = "liger_loss" in opts.applied
    step_loss = distributed.wrap_loss(model, lambda m, ids: tf.summed_loss(m, ids, ids, use_liger=use_liger), w, dev)
    data = random_batches(args.warmup + args.steps, args.batch, args.seq, model.config.vocab_size, seed=1 + w.rank)
    tokens = 0
    for i, b in enumerate(data):
        if i == args.warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        ids = b.to(dev, non_blocking=True)
        loss_sum, n = step_loss(ids)
        n_all, tok_all = distributed.global_counts(n, ids.numel(), w, dev)
        (loss_sum * (w.size / n_all)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            tokens += tok_all
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    total = distributed.global_sum(loss_sum, w)
    if w.is_main:
        flops = flops_per_step(model, [args.seq] * args.batch) * args.steps * w.size
        print(json.dumps({"size": args.size, "gpus": w.size, "tokens_per_s": round(tokens / dt),
                          "mfu_per_gpu": round(flops / dt / PEAK_FLOPS / w.size, 4), "step_ms": round(1000 * dt / args.steps, 1),
                          "global_batch": f"{args.batch * w.size}x{args.seq}", "loss_last": round(total / n_all, 4),
                          "peak_gib_rank0": round(torch.cuda.max_memory_allocated() / 2**30, 2), "levers": opts.applied}), flush=True)
    distributed.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", default="1,2,4,8", help="process counts to try (those above the GPU count are skipped)")
    p.add_argument("--sizes", default="1b,3b")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8, help="sequences per GPU per step")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--timeout", type=int, default=300)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    import torch

    have = torch.cuda.device_count()
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "PYTHONPATH": os.pathsep.join([str(BENCH.parent), os.environ.get("PYTHONPATH", "")])}
    for size in args.sizes.split(","):
        one = None
        for n in (int(x) for x in args.gpus.split(",")):
            if n > have:
                print(json.dumps({"size": size, "gpus": n, "skipped": f"this machine has {have} GPU(s)"}), flush=True)
                continue
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", __file__,
                   "--worker", "--size", size, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--batch", str(args.batch), "--seq", str(args.seq)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
                r = json.loads(lines[-1]) if proc.returncode == 0 and lines else {
                    "size": size, "gpus": n, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
            except subprocess.TimeoutExpired:
                r = {"size": size, "gpus": n, "error": f"timeout after {args.timeout}s"}
            if "tokens_per_s" in r:
                one = one or (r["tokens_per_s"] if n == 1 else None)
                if one:
                    r["speedup_vs_1"] = round(r["tokens_per_s"] / one, 2)
            print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
