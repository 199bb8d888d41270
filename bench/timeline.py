"""Where a training step's GPU time goes idle: a PyTorch profiler trace, summarised.

``bench/train_throughput.py --timeline`` profiles two steps of each trainer (CPU and CUDA activities,
Python stacks) and adds this summary to its JSON line:

* ``step_ms``: profiled wall time per step (the profiler slows the CPU side down: compare with the
  unprofiled ``step_ms`` of the same line), ``busy_ms``: time with at least one kernel, memcpy or
  memset running, ``idle_ms``: the rest, ``kernels``: GPU activities per step.
* ``idle_by_cause``: each gap before a GPU activity is ``cpu_late`` when that activity was launched
  after the previous one had finished (the GPU waited for the host) and ``gpu`` otherwise (launch
  latency between queued kernels).
* ``idle_top``: the host code that launched the activities after the largest gaps, as
  "innermost Python frame of this repository or Liger | innermost aten op", with idle ms per step.
* ``copies_top``: GPU time of copies, memsets and elementwise kernels by the host code that
  launched them.
* ``syncs``: host calls that wait for the GPU (stream/device/event synchronise, device-to-host
  copies), with the Python frame they came from and ms per step spent waiting.

    python bench/timeline.py TRACE.json     # summarise a trace written by torch.profiler
"""

from __future__ import annotations

import bisect
import json
import sys
from collections import defaultdict

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")  # blocking calls
OUR_FILES = ("wonderland/", "bench/", "liger_kernel/", "peft/", "transformers/", "torch/optim", "torch/autograd")


def _frame(stack: list[dict]) -> str:
    """The innermost Python frame from our files (or a library we call), then the innermost aten op."""
    py = next((e["name"] for e in reversed(stack) if e.get("cat") == "python_function"
               and any(f in e["name"] for f in OUR_FILES)), "?")
    op = next((e["name"] for e in reversed(stack) if e.get("cat") == "cpu_op"), "?")
    py = py.split("site-packages/")[-1].split("/work/main/")[-1]
    return f"{py[:90]} | {op[:40]}"


def summarise(trace: dict, steps: int, top: int = 15) -> dict:
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    runtime = {e["args"]["correlation"]: e for e in events
               if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    # every host event's ancestors (per thread, by nesting of [ts, ts + dur])
    host = defaultdict(list)
    for e in events:
        if e.get("cat") in ("cpu_op", "python_function", "cuda_runtime", "cuda_driver", "user_annotation"):
            host[e["tid"]].append(e)
    ancestors: dict[int, list] = {}
    for evs in host.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[dict] = []
        for e in evs:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            if e.get("cat") in ("cuda_runtime", "cuda_driver"):
                ancestors[id(e)] = list(stack)
            stack.append(e)
    idle = {"cpu_late": 0.0, "gpu": 0.0}
    by_frame: dict[str, float] = defaultdict(float)
    busy, end = 0.0, None
    t_first = gpu[0]["ts"] if gpu else 0.0
    for e in gpu:  # the union of the GPU activities' intervals, and the gaps between them
        s, t = e["ts"], e["ts"] + e["dur"]
        if end is not None and s > end:
            gap = s - end
            launch = runtime.get(e.get("args", {}).get("correlation"))
            late = launch is not None and launch["ts"] + launch["dur"] >= end
            idle["cpu_late" if late else "gpu"] += gap
            if launch is not None:
                by_frame[_frame(ancestors.get(id(launch), []))] += gap
        busy += t - s if end is None or s >= end else max(0.0, t - end)
        end = t if end is None else max(end, t)
    small: dict[str, float] = defaultdict(float)  # copies and elementwise kernels, by who launched them
    for e in gpu:
        name = e["name"]
        if name.startswith(("Memcpy", "Memset")) or "elementwise" in name or "copy" in name.lower():
            launch = runtime.get(e.get("args", {}).get("correlation"))
            where = _frame(ancestors.get(id(launch), [])) if launch is not None else "?"
            small[f"{name[:40]} <- {where}"] += e["dur"]
    syncs: dict[str, float] = defaultdict(float)
    for e in runtime.values():
        if e["name"] in SYNC_NAMES and e["dur"] > 5:  # (cudaMemcpyAsync does not block: a D2H copy is followed by a sync)
            syncs[f"{e['name']} <- {_frame(ancestors.get(id(e), []))}"] += e["dur"]
    span = (end - t_first) if gpu else 0.0
    ms = lambda us: round(us / 1000 / steps, 2)  # noqa: E731
    return {"step_ms": ms(span), "busy_ms": ms(busy), "idle_ms": ms(span - busy), "kernels": round(len(gpu) / steps),
            "idle_by_cause": {k: ms(v) for k, v in idle.items()},
            "idle_top": [[k, ms(v)] for k, v in sorted(by_frame.items(), key=lambda kv: -kv[1])[:top]],
            "syncs": [[k, ms(v)] for k, v in sorted(syncs.items(), key=lambda kv: -kv[1])[:8]],
            "copies_top": [[k, ms(v)] for k, v in sorted(small.items(), key=lambda kv: -kv[1])[:12]]}


def profile_steps(run_step, batches, top: int = 15) -> dict:
    """Profile ``run_step(batch)`` over ``batches`` and summarise the trace."""
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []), with_stack=True) as prof:
        for b in batches:
            run_step(b)
        sync()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as fh:
            trace = json.load(fh)
    return summarise(trace, len(batches), top)


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        print(json.dumps(summarise(json.load(fh), int(sys.argv[2]) if len(sys.argv) > 2 else 1), indent=1))
