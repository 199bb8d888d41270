"""Benchmark: does the default demo reach the issue-5 target? Prints JSON.

Builds the character's dataset from the book (``wonderland.data.build_dataset``), trains a run with a
preset (default ``quick``, the demo's) plus any overrides, evaluates it with ``wonderland.eval.evaluate``
and prints base / prompted / trained metrics, the target checks and timings.

    python bench/persona.py                                  # the default demo settings
    python bench/persona.py --iters 90 --lr 1e-3             # a variant (preset + overrides)
    python bench/persona.py --run RUN_DIR                    # re-evaluate an existing run, no training
    python bench/persona.py --calibrate                      # the in-character rule on reference texts
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

KEYS = ("perplexity", "in_character_rate", "persona_score", "marker_rate", "distinct_2", "repetition_rate",
        "shared_opening_rate", "copy_rate", "retention_rate", "mean_words", "world_mention_rate")


def calibrate(book: str | None, character: str, other: str, workdir: Path) -> dict:
    """The fixed in-character rule applied to texts whose answer is known, no model involved: the
    character's real lines (each scored against all the *other* lines, markers re-derived without it),
    the generic-assistant replies (each against the others) and a second character's lines."""
    import torch

    from wonderland.data import build_dataset
    from wonderland.eval.persona import (PersonaScore, PersonaScorer, load_embedder, load_generic_replies,
                                         style_markers, words)

    stats = build_dataset(book, character, workdir / "calib-data")
    utter = [json.loads(ln) for ln in (workdir / "calib-data" / "utterances.jsonl").read_text().splitlines()]
    who = {stats["character"], *stats["aliases"]}
    mine = [u["text"] for u in utter if u["speaker"] in who]
    rest = [u["text"] for u in utter if u["speaker"] not in who]
    theirs = [u["text"] for u in utter if u["speaker"] == other]
    generic = load_generic_replies()
    emb = load_embedder()
    e_mine, e_gen, e_theirs = emb.encode(mine), emb.encode(generic), emb.encode(theirs)
    k = 3

    def near(sims):
        return sims.topk(k, dim=1).values.mean(1).tolist()

    def own(e):  # similarity to the others of the same set, never to itself
        s = e @ e.T
        s.fill_diagonal_(-2.0)
        return s

    markers = style_markers(mine, rest)
    out = {}
    for name, texts, sim_c, sim_g, loo_markers in (
            ("character_lines", mine, near(own(e_mine)), near(e_mine @ e_gen.T), True),
            ("generic_replies", generic, near(e_gen @ e_mine.T), near(own(e_gen)), False),
            (f"{other}_lines", theirs, near(e_theirs @ e_mine.T), near(e_theirs @ e_gen.T), False)):
        judged = []
        for i, (t, c, g) in enumerate(zip(texts, sim_c, sim_g)):
            mk = style_markers(mine[:i] + mine[i + 1:], rest) if loo_markers else markers
            judged.append(PersonaScorer.judge(PersonaScore(c, g, c - g, sorted(set(words(t)) & mk.keys())), t))
        out[name] = {"n": len(texts), "in_character_rate": round(sum(judged) / len(texts), 3),
                     "mean_margin": round(float(torch.tensor(sim_c).sub(torch.tensor(sim_g)).mean()), 4)}
    return {"character": stats["character"], "markers": markers, **out}


def main(argv: list[str] | None = None) -> int:
    from wonderland.cli.options import add_train_options, dataclass_overrides
    from wonderland.config import PRESET_NAMES, TrainConfig, merge_config, preset

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--book", help="book text (default: the default book lookup)")
    p.add_argument("--character", default="Hatter")
    p.add_argument("--preset", default="default", choices=PRESET_NAMES)
    p.add_argument("--run", help="evaluate this existing run instead of training one")
    p.add_argument("--workdir", help="where data and run go (default: a new temp folder)")
    p.add_argument("--samples", type=int, default=3,
                   help="replies per prompt and arm, each its own seed (default: 3; one sample of 24 prompts "
                        "moves ~10 points from seed to seed)")
    p.add_argument("--calibrate", action="store_true", help="only apply the in-character rule to reference texts")
    p.add_argument("--other", default="Alice", help="the second character for --calibrate")
    add_train_options(p)
    args = p.parse_args(argv)

    from wonderland.eval.evaluate import evaluate

    work = Path(args.workdir or tempfile.mkdtemp(prefix="wl-persona-"))
    if args.calibrate:
        print(json.dumps(calibrate(args.book, args.character, args.other, work), indent=2))
        return 0
    timings = {}
    setting = None
    if args.run:
        run_ref = args.run
    else:
        from wonderland.data import build_dataset
        from wonderland.train import train

        t = time.perf_counter()
        stats = build_dataset(args.book, args.character, work / "data", warn=lambda m: print(f"warning: {m}", file=sys.stderr))
        timings["data_s"] = round(time.perf_counter() - t, 2)
        config = merge_config(TrainConfig, preset(args.preset), dataclass_overrides(args, TrainConfig))
        setting = {"preset": args.preset, **{k: v for k, v in config.to_dict().items()
                                              if k in ("iters", "lr", "rank", "alpha", "targets", "layers", "batch_size",
                                                       "schedule", "warmup", "threads")}}
        print(f"training {setting} on {stats['train_records']} records ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        run = train(config, work / "data", out=str(work / "run"), log=lambda m: print(m, file=sys.stderr))
        timings["train_s"] = round(time.perf_counter() - t, 2)
        run_ref = run.path
    if args.threads:  # the same CPU thread count for generation as for training
        import torch

        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    result = evaluate(run_ref, samples=args.samples, log=lambda m: print(m, file=sys.stderr, flush=True))
    timings["eval_s"] = round(time.perf_counter() - t, 2)
    arms = {a: {k: result[a][k] for k in KEYS} for a in ("base", "prompted", "trained")}
    print(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()}: {platform.system()} {platform.machine()}, "
                   f"{len(os.sched_getaffinity(0))} CPUs, load average {os.getloadavg()[0]:.1f}",
        "command": "python bench/persona.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "setting": setting or result["config"]["train"],
        **arms,
        "ppl_drop": result["target"]["ppl_drop"],
        "target_passed": result["target"]["passed"],
        "checks": {c["name"]: [c["passed"], c["measured"]] for c in result["target"]["checks"]},
        "markers": list(result["config"]["persona"]["markers"]),
        "timings": {**timings, **result["timings"]},
        "report": f"{result['out']}/report.html",
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
