"""``wonderland demo``: book -> Hatter dataset -> LoRA training -> Base vs Trained, in one go."""

from __future__ import annotations

import argparse
import sys
import time

from wonderland.cli.options import add_train_options, dataclass_overrides
from wonderland.config import PRESET_NAMES, GenerationConfig, TrainConfig, merge_config, preset, seeded_for

HELP = "the whole loop with good defaults: build the dataset, train, compare Base vs Trained"

DEMO_PROMPTS = ["What time is it?", "Tell me a riddle.", "Who are you?", "Would you like some tea?"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--book", help="book text file (default: Alice's Adventures in Wonderland, see README)")
    p.add_argument("--character", default="Hatter", help="who to become (default: Hatter)")
    p.add_argument("--name", help="run name (default: <character>-<UTC time>)")
    p.add_argument("--preset", default="default", choices=PRESET_NAMES,
                   help="training preset (default: 'default', what `wonderland train` and the web form train)")
    add_train_options(p)


def run(args: argparse.Namespace) -> int:
    from wonderland.cli.chat import print_comparisons
    from wonderland.data import build_dataset
    from wonderland.generate import load_run
    from wonderland.runs import home
    from wonderland.train import train
    from wonderland.cli.train import ProgressBar

    timings = {}
    t0 = time.perf_counter()
    data_dir = home() / "data" / f"demo-{args.character.lower()}"
    print(f"[1/3] Building the {args.character} dataset ...", flush=True)
    stats = build_dataset(args.book, args.character, data_dir, warn=lambda m: print(f"  warning: {m}", file=sys.stderr))
    print(f"  {stats['character_utterances']} lines by {args.character}: {stats['train_records']} train / "
          f"{stats['valid_records']} valid records in {data_dir}")
    timings["data_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    config = merge_config(TrainConfig, preset(args.preset), dataclass_overrides(args, TrainConfig))
    print(f"[2/3] Training ({config.iters} steps, lr {config.lr}, rank {config.rank}) ...", flush=True)
    run_dir = train(config, data_dir, name=args.name, subscribers=[ProgressBar()], log=lambda m: print(f"  {m}"))
    timings["train_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    print("[3/3] Base vs Prompted vs Trained (same sampling settings; seed 0 + prompt index, the same for "
          "every arm):", flush=True)
    loaded = load_run(run_dir)
    gen = GenerationConfig(max_tokens=60)
    print_comparisons(loaded, DEMO_PROMPTS, [seeded_for(gen, i) for i in range(len(DEMO_PROMPTS))])
    timings["compare_s"] = time.perf_counter() - t2
    print(f"\nAdapter saved to {run_dir.adapter}")
    print(f"Chat with it: wonderland chat --run {run_dir.name}")
    print("Timings: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in timings.items()) + f", total {time.perf_counter() - t0:.0f} s")
    return 0
