"""A real llama.cpp for verifying GGUF exports: the prebuilt binaries of the npm package
``node-llama-cpp`` (pinned :data:`NODE_LLAMA_CPP`), driven by ``llamacpp_probe.mjs``.

Found at ``$WONDERLAND_NODE_LLAMA_CPP`` (a ``node_modules/node-llama-cpp`` folder), else in
``node_modules/`` at the repository root (``make llama-cpp``, part of ``make test``'s set-up) or
in the current folder.
node-llama-cpp loads the GGUF with llama.cpp's own loader (``llama_model_load``), applies a LoRA
GGUF the way ``llama-cli --lora`` does (``llama_adapter_lora_init``) and decodes on the CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from wonderland.errors import UserError

NODE_LLAMA_CPP = "3.21.1"
INSTALL = f"npm i -E --no-save --no-package-lock node-llama-cpp@{NODE_LLAMA_CPP}"
PROBE = Path(__file__).with_name("llamacpp_probe.mjs")
REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 1800


@dataclass
class LlamaCpp:
    node: str
    package: Path  # node_modules/node-llama-cpp

    def run(self, request: dict) -> dict:
        """One probe request (see llamacpp_probe.mjs); a UserError naming the model on failure."""
        request = {"nlc": str(self.package), "threads": 1, **request}
        proc = subprocess.run([self.node, str(PROBE)], input=json.dumps(request), capture_output=True, text=True,
                              timeout=TIMEOUT_S, check=False)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or ["(no output)"]
            errors = [ln for ln in lines if "error" in ln.lower()]
            cpp = [ln for ln in errors if ln.startswith("[node-llama-cpp]")]  # llama.cpp's own reason first
            last = (cpp or errors or lines)[-1].removeprefix("[node-llama-cpp]").strip()
            raise UserError(f"llama.cpp could not run {request.get('model')}: {last}")
        return json.loads(proc.stdout)


def find_llama_cpp() -> LlamaCpp:
    """node + node-llama-cpp, or a one-line UserError saying how to install them."""
    env = os.environ.get("WONDERLAND_NODE_LLAMA_CPP")
    found = [p for p in (REPO, Path.cwd()) if (p / "node_modules" / "node-llama-cpp" / "dist" / "index.js").is_file()]
    package = Path(env).expanduser() if env else (found[0] if found else REPO) / "node_modules" / "node-llama-cpp"
    node = shutil.which("node")
    if node is None:
        raise UserError("--verify needs llama.cpp through Node.js, and `node` is not on PATH; install Node.js >= 20 "
                        f"(Debian: apt-get install nodejs npm), then `{INSTALL}` in {REPO}")
    if not (package / "dist" / "index.js").is_file():
        raise UserError(f"--verify needs llama.cpp: node-llama-cpp not found at {package}; run `make llama-cpp` "
                        f"(or `{INSTALL}` in {REPO}), or set WONDERLAND_NODE_LLAMA_CPP to its folder")
    return LlamaCpp(node, package)
