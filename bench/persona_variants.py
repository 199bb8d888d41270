"""Choose the training settings on the SELECTION prompts: many variants side by side. Prints JSON.

Two steps, so the generation can run where there are many cores (or a GPU) and the scoring (which
needs the packaged sentence-embedding model) where it is installed:

    python bench/persona_variants.py run --variants V.json --out DIR [--workers 8 --threads 2 --device cpu]
    python bench/persona_variants.py score DIR            # a table of every variant, JSON

``V.json`` is a list of ``{"name": ..., "data": {build_dataset options}, "train": {TrainConfig options}}``,
optionally with ``"checkpoint": STEP`` to answer with that checkpoint instead of the served (best) one.
Each variant builds its dataset, trains, and answers the selection prompts
(``wonderland/eval/prompts-selection.txt``, 3 samples each, seed + index as in ``wonderland eval``) and
the selection retention set with the trained arm; the base and prompted arms are answered once (they
do not depend on training). ``--set report`` answers the report prompts (``prompts.txt``,
``retention.txt``) instead: only for a setting already chosen on the selection prompts (the report of
a default on the GPU, as ``bench/persona.py`` does on the CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

EVAL = Path(__file__).resolve().parents[1] / "wonderland" / "eval"
SAMPLES = 3
# --set: the prompts settings are chosen on, and the report prompts (only to report a chosen setting)
PROMPT_SETS = {"selection": ("prompts-selection.txt", "retention-selection.txt"), "report": ("prompts.txt", "retention.txt")}


def _answer(loaded, arms: list[str], prompts: list[str], retention: list, samples: int) -> dict:
    from wonderland.config import GenerationConfig, seeded_for
    from wonderland.eval.evaluate import RETENTION_MAX_TOKENS, default_generation

    gen = default_generation()
    ret_gen = GenerationConfig(**{**gen.to_dict(), "max_tokens": RETENTION_MAX_TOKENS})
    out = {"asks": [p for _ in range(samples) for p in prompts], "replies": {}, "retention": {}}
    for arm in arms:
        out["replies"][arm] = ["".join(loaded.stream(arm, [{"role": "user", "content": p}],
                                                     seeded_for(gen, k * len(prompts) + i))).strip()
                               for k in range(samples) for i, p in enumerate(prompts)]
        out["retention"][arm] = [{"prompt": it.prompt, "passed": it.passed(r), "reply": r} for it, r in
                                 ((it, "".join(loaded.stream(arm, [{"role": "user", "content": it.prompt}],
                                                             seeded_for(ret_gen, i))).strip())
                                  for i, it in enumerate(retention))]
    return out


def _float32_everywhere(device: str) -> None:
    """On CUDA, generate in float32 as the CPU does (the backend would pick bf16 there)."""
    import torch

    if device.startswith("cuda"):
        from wonderland.backends.torch_peft import backend

        backend.pick_dtype = lambda name, dev: torch.float32


def prepare_replay(device: str) -> None:
    """The embedded model's replay answers, made once here when this machine has none yet."""
    from wonderland import replay
    from wonderland.backends import get_backend
    from wonderland.config import DEFAULT_MODEL
    from wonderland.models import resolve_model, weights_sha256

    _float32_everywhere(device)
    path = resolve_model(DEFAULT_MODEL)
    replay.answers_for(DEFAULT_MODEL, path, weights_sha256(path), lambda: get_backend("torch").load(path, device=device),
                       log=lambda m: print(m, file=sys.stderr))


def run_variant(variant: dict, out: str, book: str | None, threads: int, device: str, arms: list[str],
                prompt_set: str = "selection") -> str:
    import torch

    from wonderland.config import TrainConfig, merge_config
    from wonderland.data import build_dataset
    from wonderland.eval.evaluate import load_prompts
    from wonderland.eval.metrics import load_retention
    from wonderland.generate import ARMS, load_run
    from wonderland.train import train

    torch.set_num_threads(threads)
    _float32_everywhere(device)
    if variant.get("checkpoint"):  # a chosen checkpoint, not the served one: keep every checkpoint
        from wonderland.backends import common

        common.KEEP_CHECKPOINTS = 1 << 20
    work = Path(out) / variant["name"]
    t0 = time.time()
    build_dataset(book, "Hatter", work / "data", **variant.get("data", {}))
    config = merge_config(TrainConfig, {"threads": threads, "device": device, **variant.get("train", {})})
    run = train(config, work / "data", out=str(work / "run"), log=lambda m: None)
    train_s = time.time() - t0
    loaded = load_run(run.path, device=device, checkpoint=variant.get("checkpoint"))
    valid = [json.loads(ln) for ln in (work / "data" / "valid.jsonl").read_text().splitlines()]
    held_out = {}
    for arm in ARMS:
        if arm.name in arms:
            nll, n = loaded.model.loss([{"messages": loaded.messages_for(arm, r["messages"])} for r in valid], adapter=arm.adapter)
            held_out[arm.name] = nll / n
    prompts, retention = PROMPT_SETS[prompt_set]
    answers = _answer(loaded, arms, load_prompts(EVAL / prompts), load_retention(EVAL / retention), SAMPLES)
    info = run.read()
    result = {"name": variant["name"], "variant": variant, "train_s": round(train_s, 1), "eval_s": round(time.time() - t0 - train_s, 1),
              "held_out_loss": held_out, "result": info.get("result", {}), **answers}
    (Path(out) / f"{variant['name']}.json").write_text(json.dumps(result, indent=1))
    return variant["name"]


def cmd_run(args) -> int:
    variants = json.loads(Path(args.variants).read_text())
    Path(args.out).mkdir(parents=True, exist_ok=True)
    # the untrained arms once each, beside the first variant's run (they do not depend on training)
    jobs = [] if args.trained_only else [({**variants[0], "name": f"{variants[0]['name']}-{arm}"}, [arm])
                                         for arm in ("base", "prompted")]
    jobs += [(v, ["trained"]) for v in variants]
    prepare_replay(args.device)
    import multiprocessing

    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_variant, v, args.out, args.book, args.threads, args.device, arms, args.set) for v, arms in jobs]
        for f in futures:
            print(f"done {f.result()}", file=sys.stderr, flush=True)
    return 0


def score_arm(replies: list[str], asks: list[str], retention: list[dict], loss: float | None, scorer, copies, terms) -> dict:
    from wonderland.eval.metrics import reply_stats, world_mention_rate

    scores = scorer.score(replies)
    inside = [s.in_character and not copies.copied(r) for s, r in zip(scores, replies)]
    return {"perplexity": round(math.exp(loss), 2) if loss is not None else None,
            "in_character_rate": round(sum(inside) / len(replies), 4),
            "persona_score": round(sum(s.margin for s in scores) / len(scores), 4),
            "marker_rate": round(sum(bool(s.markers) for s in scores) / len(scores), 4),
            "world_mention_rate": world_mention_rate(replies, asks, terms),
            **{k: v for k, v in reply_stats(replies, copies).items() if k in ("distinct_2", "shared_opening_rate",
                                                                              "copy_rate", "mean_words")},
            "retention_rate": round(sum(x["passed"] for x in retention) / len(retention), 4)}


def cmd_score(args) -> int:
    from wonderland.data import build_dataset
    from wonderland.eval.evaluate import _split_lines, _world
    from wonderland.eval.metrics import CopyDetector
    from wonderland.eval.persona import PersonaScorer

    import tempfile
    data = Path(tempfile.mkdtemp()) / "data"
    stats = build_dataset(args.book, "Hatter", data)
    utter = [json.loads(ln) for ln in (data / "utterances.jsonl").read_text().splitlines()]
    scorer = PersonaScorer.from_lines(*_split_lines(utter, stats, "Hatter"))
    copies, terms = CopyDetector(u["text"] for u in utter), _world(utter, stats, "Hatter")
    files = sorted(Path(args.dir).glob("*.json"))
    rows = [json.loads(f.read_text()) for f in files]
    table = {}
    for r in rows:
        for arm, replies in r["replies"].items():
            key = r["name"] if arm == "trained" else arm
            table[key] = {**score_arm(replies, r["asks"], r["retention"][arm], r["held_out_loss"].get(arm),
                                      scorer, copies, terms),
                          "best_step": r["result"].get("best_step"), "train_s": r["train_s"] if arm == "trained" else None,
                          "setting": r["variant"] if arm == "trained" else None}
    print(json.dumps(table, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--variants", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--book")
    r.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--device", default="cpu")
    r.add_argument("--set", default="selection", choices=sorted(PROMPT_SETS),
                   help="selection (choose settings here) or report (the held-out prompts, for a chosen setting only)")
    r.add_argument("--trained-only", action="store_true", help="skip the base and prompted arms (answered before)")
    s = sub.add_parser("score")
    s.add_argument("dir")
    s.add_argument("--book")
    args = p.parse_args(argv)
    return cmd_run(args) if args.cmd == "run" else cmd_score(args)


if __name__ == "__main__":
    sys.exit(main())
