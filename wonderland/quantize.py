"""Quantized bases (QLoRA): which ``--quantize`` value each backend trains, checked before anything is written.

* ``none``: the base as it is (float32 on CPU, bf16 on CUDA; an already-quantized MLX folder stays quantized);
* ``4`` / ``8``: MLX only, mlx-lm's own affine quantization of the frozen base on load (group size 64,
  every Linear and Embedding whose input size the group divides, as ``mlx_lm.convert -q`` does);
* ``nf4``: torch on CUDA only, bitsandbytes 4-bit NF4 with double quantization and bf16 compute
  (the plain PEFT + bitsandbytes path; the CUDA fast path is not used for it).

The LoRA weights themselves always train in full precision. Framework-free: torch is imported only
to check for CUDA when ``nf4`` is asked for on the torch backend.
"""

from __future__ import annotations

import importlib.util

from wonderland.errors import UserError

CHOICES = ("none", "4", "8", "nf4")
MLX_BITS = {"4": 4, "8": 8}  # --quantize value -> bits of mlx-lm's affine quantization
GROUP_SIZE = 64  # mlx-lm's default group size for affine quantization
NF4_NEEDS = "--quantize nf4 needs a CUDA GPU and bitsandbytes (pip install bitsandbytes)"


def check(quantize: str, backend_name: str, device: str = "auto") -> None:
    """A one-line UserError (exit 2) when ``backend_name`` cannot train on a base quantized as ``quantize``."""
    if quantize == "none":
        return
    if backend_name == "mlx":
        if quantize not in MLX_BITS:
            raise UserError(f"--quantize {quantize} is not available on the mlx backend; use --quantize 4 or 8 there "
                            f"(nf4 is bitsandbytes: --backend torch on a CUDA GPU)")
        return
    if quantize != "nf4":
        raise UserError(f"--quantize {quantize} is MLX's quantization (--backend mlx); on the torch backend use "
                        f"--quantize nf4 (a CUDA GPU and bitsandbytes)")
    if not cuda_available(device) or importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(NF4_NEEDS)


def cuda_available(device: str = "auto") -> bool:
    """Whether the torch backend would train on a CUDA GPU with ``--device device``."""
    if device != "auto" and not device.startswith("cuda"):
        return False
    import torch

    return torch.cuda.is_available()
