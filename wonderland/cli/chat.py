"""``wonderland chat``: talk to a trained character, or compare Base / Prompted / Trained."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from wonderland.cli.options import add_generation_options, generation_config
from wonderland.config import GenerationConfig
from wonderland.generate import ARMS, LoadedRun, load_run

HELP = "talk to a trained run (streamed); --compare shows Base, Prompted and Trained side by side"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="NAME_OR_DIR", help="run name or folder")
    p.add_argument("--checkpoint", type=int, metavar="STEP",
                   help="use this checkpoint's adapter (default: the best checkpoint, what the run serves)")
    p.add_argument("--prompt", action="append", help="one message (repeatable); without it, an interactive chat")
    p.add_argument("--compare", action="store_true", help="answer with each arm: base, prompted, trained")
    p.add_argument("--device", default="auto", help="torch device (auto, cpu, cuda, mps)")
    add_generation_options(p)


def print_comparisons(loaded: LoadedRun, prompts: Sequence[str], gens: Sequence[GenerationConfig], out=None) -> list[dict[str, str]]:
    """Each arm's reply to each prompt (``gens[i]`` for prompt i), decoded as one batch, printed under
    labels; returns them per prompt."""
    out = out or sys.stdout
    requests = [(arm, [{"role": "user", "content": p}], g) for p, g in zip(prompts, gens) for arm in ARMS]
    texts = iter(loaded.replies(requests))
    replies = []
    for prompt in prompts:
        print(f"\n>>> {prompt}", file=out)
        replies.append({arm.name: next(texts) for arm in ARMS})
        for arm in ARMS:
            print(f"  [{arm.name:>8}] {replies[-1][arm.name].replace(chr(10), ' ')}", file=out)
    return replies


def run(args: argparse.Namespace) -> int:
    gen = generation_config(args)
    loaded = load_run(args.run, device=args.device, checkpoint=args.checkpoint)
    if args.compare:
        print(f"Run {loaded.run.name}: " + "; ".join(f"{a.name} = {a.description}" for a in ARMS))
        prompts = args.prompt or ["What time is it?", "Tell me a riddle.", "Who are you?"]
        print_comparisons(loaded, prompts, [gen] * len(prompts))
        return 0
    history: list[dict] = []
    prompts = args.prompt
    interactive = prompts is None
    while True:
        if interactive:
            try:
                text = input("you> ").strip()
            except EOFError:
                print()
                return 0
            if not text:
                continue
        else:
            if not prompts:
                return 0
            text = prompts.pop(0)
        history.append({"role": "user", "content": text})
        print(f"{loaded.info.get('character') or 'model'}> ", end="", flush=True)
        parts = []
        for piece in loaded.stream("trained", history, gen):
            parts.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(parts).strip()})
