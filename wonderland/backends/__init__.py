"""Training/generation backends behind one interface (see :mod:`wonderland.backends.base`).

``get_backend("auto")`` picks MLX on Apple Silicon when mlx-lm is installed, else PyTorch
(CUDA when a GPU is present, then MPS, then CPU). Backends are imported lazily: importing
wonderland never imports torch or mlx.
"""

from __future__ import annotations

import importlib
import platform
import sys

from wonderland.backends.base import Backend, ChatModel, TrainJob, TrainResult
from wonderland.errors import UserError

__all__ = ["Backend", "ChatModel", "TrainJob", "TrainResult", "get_backend", "resolve_backend_name"]

_MODULES = {"torch": "wonderland.backends.torch_peft.backend", "mlx": "wonderland.backends.mlx_lora.backend"}
_INSTALL = {"torch": "pip install torch", "mlx": "pip install 'wonderland[mlx]'"}


def _is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def resolve_backend_name(name: str, log=print) -> str:
    if name != "auto":
        return name
    if _is_apple_silicon():
        if importlib.util.find_spec("mlx_lm") is not None:
            return "mlx"
        log("MLX is not installed, falling back to PyTorch (MPS); for faster training: pip install 'wonderland[mlx]'")
    return "torch"


def get_backend(name: str = "auto", log=print) -> Backend:
    name = resolve_backend_name(name, log=log)
    if name not in _MODULES:
        raise UserError(f"unknown backend {name!r}; choose one of auto, {', '.join(_MODULES)}")
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as e:
        if e.name and e.name.split(".")[0] in ("torch", "mlx", "mlx_lm", "peft", "transformers"):
            raise UserError(f"the {name} backend needs {e.name!r}, which is not installed: {_INSTALL[name]}") from None
        raise
    return module.BACKEND
