"""The ``wonderland`` command line.

Each subcommand lives in its own module of this package and exposes three names:

* ``HELP``: the one-line description shown by ``wonderland --help``;
* ``add_arguments(parser)``: declares its options on an ``argparse`` parser;
* ``run(args) -> int``: does the work and returns the exit code.

User errors (:class:`wonderland.errors.UserError`) are printed as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from wonderland import __version__
from wonderland.errors import UserError

# Order is the order shown in --help. Add a command by adding its module name here.
COMMANDS = ["demo", "data", "train", "chat", "runs", "eval", "serve", "export"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wonderland",
        description="Teach a small language model to be a character from a book, by LoRA fine-tuning.",
    )
    parser.add_argument("--version", action="version", version=f"wonderland {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"wonderland.cli.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"wonderland {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"wonderland {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
