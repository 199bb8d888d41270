"""Quantized MLX bases (QLoRA, issue 18): mlx-lm's affine quantization on load, and its exact de-quantization.

``--quantize 4|8`` quantizes the frozen base right after a lazy load, the way ``mlx_lm.convert -q``
does (:func:`mlx_lm.utils.quantize_model`): ``nn.quantize`` with group size 64 on every layer that has
``to_quantized`` (Linear, Embedding: a tied LM head is the quantized embedding) whose input size the
group divides, and that the model's own ``quant_predicate`` (when it has one) accepts. Loaded lazily,
the float weights are never all in memory at once. A folder that is already quantized (an
``mlx-community/...-4bit`` model) loads as it is. LoRA goes on the quantized layers as mlx-lm puts it
there (``LoRALinear.from_base`` takes a ``QuantizedLinear``); the LoRA weights train in float.

:func:`dequantized_weights` is mlx-lm fuse's ``--dequantize`` (``dequantize_model``): the weights the
quantized base really computes with, as float arrays under their Hugging Face names, for a merged export.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from wonderland.errors import UserError
from wonderland.quantize import GROUP_SIZE, MLX_BITS

QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def quantized_bits(model) -> int | None:
    """The bits of the model's quantized layers (the widest, if they differ); None for a float model."""
    bits = [m.bits for _, m in model.named_modules() if isinstance(m, QUANTIZED)]
    return max(bits) if bits else None


def quantize_base(model, quantize: str, where: Path) -> None:
    """Quantize ``model`` in place for ``--quantize quantize`` (nothing for ``none``); a model already
    quantized stays as it is, unless it has other bits than asked (a one-line UserError)."""
    if quantize == "none":
        return
    bits, have = MLX_BITS[quantize], quantized_bits(model)
    if have is not None:
        if have != bits:
            raise UserError(f"{where} is already quantized to {have} bits; pass --quantize {have} or none "
                            f"(it loads as it is), or give its float weights")
        return
    own = getattr(model, "quant_predicate", None)

    def predicate(path: str, module) -> bool | dict:  # mlx_lm.utils.quantize_model's rule
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % GROUP_SIZE != 0:
            return False
        return own(path, module) if own is not None else True

    nn.quantize(model, GROUP_SIZE, bits, class_predicate=predicate)


# ----------------------------------------------------------------------------- CPU compute
# mlx's quantized matmul has no fast CPU kernel: measured here (2-core x86_64, OpenBLAS), a 300 x 576
# by 576 x 1536 product took 462 ms quantized against 14 ms in float32, and the tied LM head 15.9 s
# against 0.55 s, so a training step of the embedded model took ~180 s instead of a few. On the CPU
# the quantized layers therefore multiply by their de-quantized weight (mx.dequantize, then BLAS),
# one layer at a time inside a custom function whose backward de-quantizes again instead of keeping
# the float weight: the float weights are never all alive at once, only the packed ones are.
_MATMULS: dict = {}


def _dequantized_matmul(group_size: int, bits: int):
    """``f(x, w, scales, biases) = x @ dequantize(w).T``, with a backward that recomputes the weight."""
    if (group_size, bits) in _MATMULS:
        return _MATMULS[group_size, bits]

    @mx.custom_function
    def f(x, w, scales, biases):
        return x @ mx.dequantize(w, scales, biases, group_size, bits).astype(x.dtype).T

    @f.vjp
    def f_vjp(primals, cotangent, output):
        x, w, scales, biases = primals
        dx = cotangent @ mx.dequantize(w, scales, biases, group_size, bits).astype(cotangent.dtype)
        return dx, mx.zeros_like(w), mx.zeros_like(scales), mx.zeros_like(biases)  # the base is frozen

    _MATMULS[group_size, bits] = f
    return f


class CPUQuantizedLinear(nn.QuantizedLinear):
    """mlx's QuantizedLinear (same packed weights, same format, same ``isinstance``) computing through
    :func:`_dequantized_matmul`."""

    def __call__(self, x):
        y = _dequantized_matmul(self.group_size, self.bits)(x, self["weight"], self["scales"], self["biases"])
        return y + self["bias"] if "bias" in self else y


class CPUQuantizedEmbedding(nn.QuantizedEmbedding):
    """mlx's QuantizedEmbedding whose ``as_linear`` (a tied LM head) computes through :func:`_dequantized_matmul`."""

    def as_linear(self, x):
        return _dequantized_matmul(self.group_size, self.bits)(x, self["weight"], self["scales"], self["biases"])


def use_cpu_kernels(model) -> None:
    """On a machine without Metal, switch the affine quantized layers to their de-quantizing CPU form."""
    if mx.metal.is_available():
        return
    swap = {nn.QuantizedLinear: CPUQuantizedLinear, nn.QuantizedEmbedding: CPUQuantizedEmbedding}
    for _, m in model.named_modules():
        if type(m) in swap and m.mode == "affine":
            m.__class__ = swap[type(m)]


def for_inference(model) -> None:
    """Chat, compare and eval on the CPU: the quantized base de-quantized once (mlx-lm fuse's
    ``dequantize_model``): the same weights the run trained on, at float speed (and float memory).
    On Metal the quantized layers stay, its quantized kernels are fast."""
    if not mx.metal.is_available() and quantized_bits(model) is not None:
        from mlx_lm.utils import dequantize_model

        dequantize_model(model)


def quantization_config(model) -> dict | None:
    """``{"group_size", "bits"}`` of a quantized model (for adapter_config.json), None for a float one."""
    layers = [m for _, m in model.named_modules() if isinstance(m, QUANTIZED)]
    return {"group_size": layers[0].group_size, "bits": quantized_bits(model)} if layers else None


def dequantized_weights(model) -> dict:
    """The de-quantized weights (float32 numpy arrays) of every quantized layer of ``model``, keyed by
    parameter name (mlx-lm's names are the Hugging Face ones for the llama family): what the quantized
    base computes with, for a merged export to build on. ``model`` is de-quantized in place."""
    import numpy as np
    from mlx_lm.utils import dequantize_model

    names = [name for name, m in model.named_modules() if isinstance(m, QUANTIZED)]
    dequantize_model(model)
    params = dict(tree_flatten(model.parameters()))
    return {f"{n}.weight": np.array(params[f"{n}.weight"].astype(mx.float32)) for n in names}
