"""bitsandbytes NF4 weights as the fused LoRA layers read them (``--quantize nf4`` on the fast path).

A bitsandbytes 4-bit weight (``bnb.nn.Params4bit``, QLoRA's format) of shape (out, in) is stored as

    packed   uint8 (out * in / 2,)   two 4-bit codes a byte, the first element in the high nibble
    absmax   per block of ``blocksize`` (64) elements: float32, or, with double quantization, a
             uint8 code into ``nested_code`` (256 float32) times ``nested_absmax`` (float32, one per
             ``nested_blocksize`` = 256 blocks) plus ``offset``
    code     the 16 NF4 values (float32)

so that w[i] = code[nibble(i)] * absmax[i // blocksize], computed in float32 and rounded once to the
compute dtype (what bitsandbytes' own CUDA kernel does). The fused layers de-quantize a layer's
weights into one shared buffer just before its forward and again before its backward (one layer's
bf16 weights live at a time; on an 8B model 0.44 GB instead of 15 GB): :func:`dequantize` here is the
definition and what the CPU runs, ``triton_kernels.TritonKernels.dequant_nf4`` the CUDA kernel that
writes straight into the row-strided ``[W | B]`` buffer (tests/test_triton_kernels.py checks the two
agree; ``bench/train_throughput.py --check`` checks the kernel against bitsandbytes' on the GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class NF4Weight:
    packed: torch.Tensor  # uint8 (out * in / 2,)
    absmax: torch.Tensor  # (blocks,): float32, or uint8 codes into nested_code when nested
    code: torch.Tensor  # float32 (16,)
    shape: tuple[int, int]  # (out, in)
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None  # float32 (ceil(blocks / nested_blocksize),)
    nested_code: torch.Tensor | None = None  # float32 (256,)
    nested_blocksize: int = 256
    offset: float = 0.0

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None


def is_bnb_4bit(module) -> bool:
    """A bitsandbytes ``Linear4bit`` (checked by name: bitsandbytes is imported only for nf4)."""
    return type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes")


def check(module) -> None:
    """A ValueError unless a bitsandbytes ``Linear4bit``'s weight is one :func:`from_bnb` takes."""
    _check(module.weight.data, getattr(module.weight, "quant_state", None))


def from_bnb(module) -> NF4Weight:
    """The NF4Weight of a bitsandbytes ``Linear4bit``'s weight; ValueError when it is not NF4 (FP4,
    or not quantized yet)."""
    return from_state(module.weight.data, getattr(module.weight, "quant_state", None))


def _check(packed: torch.Tensor, qs) -> None:
    if qs is None or qs.quant_type != "nf4" or packed.dtype != torch.uint8:
        raise ValueError(f"a 4-bit weight that is not NF4 in uint8 ({getattr(qs, 'quant_type', 'not quantized')})")
    if qs.shape[1] % 2 or qs.blocksize % 2:
        raise ValueError("an NF4 weight with an odd row length or block size")


def from_state(packed: torch.Tensor, qs) -> NF4Weight:
    """The NF4Weight of bitsandbytes' packed uint8 data and its ``QuantState``."""
    _check(packed, qs)
    out, n_in = tuple(qs.shape)
    w = NF4Weight(packed.reshape(-1), qs.absmax.reshape(-1), qs.code.float(), (out, n_in), qs.blocksize)
    if qs.nested:
        w.nested_absmax, w.nested_code = qs.state2.absmax.reshape(-1).float(), qs.state2.code.float()
        w.nested_blocksize, w.offset = qs.state2.blocksize, float(qs.offset)
    return w


def block_absmax(w: NF4Weight) -> torch.Tensor:
    """float32 (blocks,): each block's scale, double quantization undone."""
    if not w.nested:
        return w.absmax.float()
    outer = torch.arange(w.absmax.numel(), device=w.absmax.device) // w.nested_blocksize
    return w.nested_code[w.absmax.long()] * w.nested_absmax[outer] + w.offset


def dequantize(w: NF4Weight, out: torch.Tensor) -> torch.Tensor:
    """The (out, in) weight written into ``out`` (rows may be strided: a view of a wider buffer),
    in ``out``'s dtype."""
    codes = torch.stack((w.packed >> 4, w.packed & 15), 1).reshape(-1).long()  # high nibble first
    values = w.code[codes] * block_absmax(w).repeat_interleave(w.blocksize)[: codes.numel()]  # float32
    return out.copy_(values.view(w.shape))
