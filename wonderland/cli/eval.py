"""``wonderland eval``: Base vs Prompted vs Trained on held-out data, with an HTML report."""

from __future__ import annotations

import argparse
import sys

from wonderland.cli.options import add_generation_options, dataclass_overrides
from wonderland.config import GenerationConfig
from wonderland.eval.evaluate import EVAL_MAX_TOKENS

HELP = "measure a run: held-out perplexity, persona score, distinctness, copying; writes an HTML report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="NAME_OR_DIR", help="run name or folder")
    p.add_argument("--checkpoint", type=int, metavar="STEP",
                   help="use this checkpoint's adapter (default: the best checkpoint, what the run serves)")
    p.add_argument("--prompts", metavar="FILE", help="held-out prompts, one per line (default: the packaged set)")
    p.add_argument("--out", metavar="DIR", help="report folder (default: RUN_DIR/eval)")
    p.add_argument("--device", default="auto", help="torch device (auto, cpu, cuda, mps)")
    p.add_argument("--samples", type=int, default=1, metavar="K",
                   help="replies per prompt and arm, each its own seed: steadier rates, K times the time (default: 1)")
    p.add_argument("--no-retention", action="store_true", help="skip the factual/arithmetic sanity prompts")
    p.add_argument("--retention", metavar="FILE",
                   help="retention prompts to use instead of the packaged set: 'prompt | answer | answer' per line")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_generation_options(p)
    for action in p._actions:  # eval's replies are shorter than chat's: keep it to a few minutes on a CPU
        if action.dest == "max_tokens":
            action.help = f"maximum new tokens per reply (default for eval: {EVAL_MAX_TOKENS})"
    p.epilog = ("Every arm (base, prompted, trained) uses the same generation settings, and the same seed for a "
                "given reply (seed + reply index).")


def _progress(event: dict) -> None:
    if event["phase"] in ("generate", "retention"):
        reply = event["reply"].replace("\n", " ")
        print(f"[{event['done']:>3}/{event['total']}] {event['arm']:>8} | {event['prompt'][:40]:<40} | {reply[:70]}",
              file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from wonderland.eval.evaluate import default_generation, evaluate

    gen = GenerationConfig(**{**default_generation().to_dict(), **dataclass_overrides(args, GenerationConfig)})
    result = evaluate(args.run, prompts=args.prompts, out=args.out, gen=gen, device=args.device, checkpoint=args.checkpoint,
                      retention=False if args.no_retention else (args.retention or True), samples=args.samples,
                      progress=None if args.quiet else _progress,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
    arms = ("base", "prompted", "trained")
    rows = [("perplexity", "{:.2f}"), ("in_character_rate", "{:.0%}"), ("persona_score", "{:+.3f}"),
            ("distinct_2", "{:.3f}"), ("repetition_rate", "{:.3f}"), ("shared_opening_rate", "{:.0%}"),
            ("copy_rate", "{:.0%}"),
            ("retention_rate", "{:.0%}")]
    print(f"{'':<20}" + "".join(f"{a:>10}" for a in arms))
    for key, fmt in rows:
        cells = "".join(f"{fmt.format(result[a][key]) if result[a][key] is not None else '-':>10}" for a in arms)
        print(f"{key:<20}{cells}")
    for c in result["target"]["checks"]:
        print(f"{'PASS' if c['passed'] else 'FAIL'}  {c['description']}: {c['measured']}")
    print(f"report: {result['out']}/report.html")
    return 0
