"""``wonderland export``: a run as PEFT, mlx-lm, merged HF, GGUF (llama.cpp) or Ollama; ``--verify``
checks every artefact against the live adapter in the tool that loads it (llama.cpp for GGUF)."""

from __future__ import annotations

import argparse
import sys

from wonderland.export import FORMATS, GGUF_TYPES, OLLAMA_ROUTES, describe, export_many

HELP = "export a run for other tools: peft, mlx, merged (HF), gguf (llama.cpp), ollama, all; --verify checks them"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, metavar="NAME_OR_DIR", help="run name or folder")
    p.add_argument("--format", required=True, choices=(*FORMATS, "all"),
                   help="what to write; all = every format, GGUF as f16 and q8_0 (see docs/export.md)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: <run>/exports/<format>; with all: the "
                                                "folder that gets one subfolder per format)")
    p.add_argument("--gguf-type", default="f16", choices=GGUF_TYPES,
                   help="GGUF weight type for --format gguf and ollama (default: f16)")
    p.add_argument("--ollama-from", default="auto", choices=OLLAMA_ROUTES,
                   help="ollama: 'gguf' = FROM the merged GGUF (auto for llama architectures), 'adapter' = FROM the "
                        "base model + ADAPTER (safetensors; unreliable in current Ollama) (default: auto)")
    p.add_argument("--checkpoint", type=int, metavar="STEP",
                   help="export this checkpoint's adapter (default: the served one, the probe's best)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    p.add_argument("--verify", action="store_true",
                   help="load every artefact (llama.cpp for GGUF) and compare its greedy replies and logits with the "
                        "live adapter on fixed probe prompts; writes verify.json; exit 2 if one is below target")


def run(args: argparse.Namespace) -> int:
    results, _, verify_json = export_many(args.run, args.format, args.out, gguf_type=args.gguf_type,
                                          ollama_from=args.ollama_from, overwrite=args.overwrite,
                                          verify=args.verify, checkpoint=args.checkpoint, log=lambda m: print(m, file=sys.stderr))
    print("\n\n".join(describe(r) for r in results))
    if verify_json:
        print(f"Verified: every artefact meets the target ({verify_json})")
    return 0
