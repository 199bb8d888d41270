"""``wonderland export``: a trained run as PEFT, mlx-lm, merged HF, GGUF (llama.cpp) or Ollama."""

from __future__ import annotations

import argparse
import sys

from wonderland.export import FORMATS, GGUF_TYPES, OLLAMA_ROUTES, describe, export

HELP = "export a run for other tools: peft, mlx, merged (HF), gguf (llama.cpp), ollama"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="NAME_OR_DIR", help="run name or folder")
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write (see docs/export.md)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: <run>/exports/<format>)")
    p.add_argument("--gguf-type", default="f16", choices=GGUF_TYPES,
                   help="GGUF weight type for --format gguf and --ollama-from gguf (default: f16)")
    p.add_argument("--ollama-from", default="auto", choices=OLLAMA_ROUTES,
                   help="ollama: 'adapter' = FROM the base model + ADAPTER (llama/gemma2 bases), 'gguf' = FROM the "
                        "merged GGUF; auto = adapter where Ollama supports it (default: auto)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export folder")


def run(args: argparse.Namespace) -> int:
    result = export(args.run, args.format, args.out, gguf_type=args.gguf_type, ollama_from=args.ollama_from,
                    overwrite=args.overwrite, log=lambda m: print(m, file=sys.stderr))
    print(describe(result))
    return 0
