"""``wonderland train``: LoRA fine-tuning of a chat model on a character dataset."""

from __future__ import annotations

import argparse
import signal
import sys

from wonderland.cli.options import add_train_options, dataclass_overrides
from wonderland.config import PRESET_NAMES, TrainConfig, load_yaml, merge_config, preset
from wonderland.errors import UserError
from wonderland.events import StopFlag

HELP = "fine-tune a LoRA adapter on a dataset (resumable, Ctrl-C stops cleanly)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="dataset folder from `wonderland data` (train.jsonl, valid.jsonl, stats.json)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--name", help="run name under $WONDERLAND_HOME/runs (default: <character>-<UTC time>)")
    where.add_argument("--out", help="run folder anywhere on disk")
    p.add_argument("--config", help="YAML file of training options (command line wins over it)")
    p.add_argument("--preset", choices=PRESET_NAMES, help="a named set of options (YAML and command line win over it)")
    p.add_argument("--resume", metavar="NAME_OR_DIR", help="continue a stopped run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    p.add_argument("--allow-config-change", action="store_true",
                   help="let --resume change what is learned (seed, data, model, LoRA shape, dropout, batch size, "
                        "max sequence length); lr, schedule, warmup, a larger --iters and cadences may always change")
    p.add_argument("--num-gpus", type=int, default=1, metavar="N",
                   help="data-parallel processes, one per GPU (torchrun + DDP; gloo processes on CPU); --batch-size stays the global batch")
    add_train_options(p)


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """defaults < run.json of a resumed run < preset < YAML < command line."""
    layers = []
    if args.resume:
        from wonderland.runs import resolve_run

        layers.append(resolve_run(args.resume).read()["config"])
    if args.preset:
        layers.append(preset(args.preset))
    if args.config:
        layers.append(load_yaml(args.config))
    layers.append(dataclass_overrides(args, TrainConfig))
    return merge_config(TrainConfig, *layers, source=args.config or "options")


class ProgressBar:
    """tqdm bar fed by training events: step, loss, val loss, tokens/s, ETA."""

    def __init__(self) -> None:
        self.bar = None
        self.val_loss = None

    def __call__(self, r: dict) -> None:
        from tqdm import tqdm

        kind = r["event"]
        if kind == "started" and self.bar is None:
            print(f"Training {r['run']} on {r['device']} ({r['backend']}): {r['train_records']} train / "
                  f"{r['valid_records']} valid records, {r['trainable_params']:,} trainable parameters", file=sys.stderr)
            self.bar = tqdm(total=r["total_steps"], initial=r["step"], unit="step", dynamic_ncols=True, file=sys.stderr)
        elif kind == "step" and self.bar is not None:
            self.bar.n = r["step"]
            post = {"loss": f"{r['loss']:.3f}", "tok/s": f"{r['tokens_per_second']:.0f}"}
            if self.val_loss is not None:
                post["val"] = f"{self.val_loss:.3f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.refresh()
        elif kind == "eval":
            self.val_loss = r["val_loss"]
            if self.bar is not None:
                self.bar.write(f"step {r['step']}: val loss {r['val_loss']:.3f}")
        elif kind == "sample" and self.bar is not None:
            self.bar.write(f"step {r['step']} sample: {r['prompt']!r} -> {r['reply']!r}")
        elif kind in ("finished", "stopped", "failed") and self.bar is not None:
            self.bar.close()


def run_training(config: TrainConfig, args: argparse.Namespace, quiet: bool = False):
    from wonderland.train import train

    stop = StopFlag()

    def on_sigint(signum, frame):
        if stop():
            raise KeyboardInterrupt  # second Ctrl-C: give up at once
        stop.set("interrupted")
        print("\nStopping after this step (checkpoint will be saved); Ctrl-C again to abort.", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        return train(config, args.data, name=args.name, out=args.out, resume=args.resume, overwrite=args.overwrite,
                     allow_config_change=args.allow_config_change,
                     subscribers=[] if quiet else [ProgressBar()], should_stop=stop,
                     log=lambda m: print(m, file=sys.stderr))
    finally:
        signal.signal(signal.SIGINT, previous)


def run(args: argparse.Namespace) -> int:
    if not args.data and not args.resume:
        raise UserError("--data is required (a folder from `wonderland data`), or --resume NAME to continue a run")
    config = resolve_config(args)
    from wonderland.backends.torch_peft import distributed

    if args.num_gpus < 1:
        raise UserError(f"--num-gpus must be >= 1 (got {args.num_gpus})")
    if args.num_gpus > 1 and not distributed.launched():
        return distributed.launch_train(args.num_gpus, config, args)
    if not distributed.world().is_main:  # ranks > 0 under torchrun: train, write nothing
        distributed.run_worker(config, args.data, args.resume)
        return 0
    try:
        run_dir = run_training(config, args)
    finally:
        distributed.shutdown()
    info = run_dir.read()
    if info["status"] == "stopped":
        print(f"Stopped at step {info['result']['step']}; resume with: wonderland train --resume {run_dir.path}")
        return 0
    res = info["result"]
    val = f", val loss {res['val_loss']:.3f}" if res.get("val_loss") is not None else ""
    print(f"Finished {res['step']} steps: loss {res['loss']:.3f}{val}")
    print(f"Adapter saved to {run_dir.adapter}")
    print(f"Talk to it: wonderland chat --run {run_dir.name} --compare")
    return 0
