"""Triton kernels for the pointwise work of the fused LoRA layers (CUDA only).

Each is one pass over its tensors: memory-bound, so what counts is reading and writing every byte
once with wide, coalesced accesses. torch.compile with dynamic shapes generated these as flat loops
with run-time index arithmetic that ran 3-20x under the memory bandwidth on an H200 (swiglu backward
0.73 ms a layer for 670 MB, RoPE backward 0.69 ms for 100 MB; bench/README.md). The reference
definitions, and what the CPU runs, are the plain-PyTorch functions in ``fused_lora``;
``bench/train_throughput.py --check`` compares both on the GPU.

Layouts (row-major, one row per token): x, xhat (N, H); qkv (N, (nh + 2 nkv) D); q (N, nh, D);
k, v (N, nkv, D); cos, sin (N, D); gate | up (N, 2I); h (N, I). Rows are indexed in int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _pow2(n: int) -> int:
    return triton.next_power_of_2(n)


@triton.jit
def _rms_fwd(X, W, Y, XHAT, RSTD, H, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < H
    x = tl.load(X + row * H + cols, mask=m, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / H + eps)
    xhat = (x * rstd).to(XHAT.dtype.element_ty)  # rounded like transformers' hidden.to(input_dtype)
    w = tl.load(W + cols, mask=m, other=0.0)
    tl.store(XHAT + row * H + cols, xhat, mask=m)
    tl.store(Y + row * H + cols, (w.to(tl.float32) * xhat.to(tl.float32)).to(Y.dtype.element_ty), mask=m)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_bwd(DY, XHAT, RSTD, W, DRES, DX, H, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < H
    g = tl.load(DY + row * H + cols, mask=m, other=0.0).to(tl.float32) * tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    xh = tl.load(XHAT + row * H + cols, mask=m, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row)
    dx = rstd * (g - xh * (tl.sum(g * xh, 0) / H))
    if HAS_RES:
        dx += tl.load(DRES + row * H + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(DX + row * H + cols, dx.to(DX.dtype.element_ty), mask=m)


@triton.jit
def _rope_fwd(QKV, COS, SIN, Q, K, V, NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr,
              BH: tl.constexpr, BKV: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    half = tl.arange(0, D // 2)
    c1 = tl.load(COS + row * D + half).to(tl.float32)
    c2 = tl.load(COS + row * D + D // 2 + half).to(tl.float32)
    s1 = tl.load(SIN + row * D + half).to(tl.float32)
    s2 = tl.load(SIN + row * D + D // 2 + half).to(tl.float32)
    width = (NH + 2 * NKV) * D
    src = QKV + row * width
    # q: heads x half-dims, rotate_half convention: out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2
    hq = tl.arange(0, BH)[:, None]
    mq = hq < NH
    off = hq * D + half[None, :]
    x1 = tl.load(src + off, mask=mq, other=0.0).to(tl.float32)
    x2 = tl.load(src + off + D // 2, mask=mq, other=0.0).to(tl.float32)
    tl.store(Q + row * NH * D + off, (x1 * c1 - x2 * s1).to(Q.dtype.element_ty), mask=mq)
    tl.store(Q + row * NH * D + off + D // 2, (x2 * c2 + x1 * s2).to(Q.dtype.element_ty), mask=mq)
    hk = tl.arange(0, BKV)[:, None]
    mk = hk < NKV
    off = hk * D + half[None, :]
    x1 = tl.load(src + NH * D + off, mask=mk, other=0.0).to(tl.float32)
    x2 = tl.load(src + NH * D + off + D // 2, mask=mk, other=0.0).to(tl.float32)
    tl.store(K + row * NKV * D + off, (x1 * c1 - x2 * s1).to(K.dtype.element_ty), mask=mk)
    tl.store(K + row * NKV * D + off + D // 2, (x2 * c2 + x1 * s2).to(K.dtype.element_ty), mask=mk)
    full = hk * D + tl.arange(0, D)[None, :]
    tl.store(V + row * NKV * D + full, tl.load(src + (NH + NKV) * D + full, mask=mk, other=0.0), mask=mk)


@triton.jit
def _rope_bwd(DQ, DK, DV, COS, SIN, DQKV, NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr,
              BH: tl.constexpr, BKV: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    half = tl.arange(0, D // 2)
    c1 = tl.load(COS + row * D + half).to(tl.float32)
    c2 = tl.load(COS + row * D + D // 2 + half).to(tl.float32)
    s1 = tl.load(SIN + row * D + half).to(tl.float32)
    s2 = tl.load(SIN + row * D + D // 2 + half).to(tl.float32)
    width = (NH + 2 * NKV) * D
    dst = DQKV + row * width
    # transpose of the rotation: dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1
    hq = tl.arange(0, BH)[:, None]
    mq = hq < NH
    off = hq * D + half[None, :]
    g1 = tl.load(DQ + row * NH * D + off, mask=mq, other=0.0).to(tl.float32)
    g2 = tl.load(DQ + row * NH * D + off + D // 2, mask=mq, other=0.0).to(tl.float32)
    tl.store(dst + off, (g1 * c1 + g2 * s2).to(DQKV.dtype.element_ty), mask=mq)
    tl.store(dst + off + D // 2, (g2 * c2 - g1 * s1).to(DQKV.dtype.element_ty), mask=mq)
    hk = tl.arange(0, BKV)[:, None]
    mk = hk < NKV
    off = hk * D + half[None, :]
    g1 = tl.load(DK + row * NKV * D + off, mask=mk, other=0.0).to(tl.float32)
    g2 = tl.load(DK + row * NKV * D + off + D // 2, mask=mk, other=0.0).to(tl.float32)
    tl.store(dst + NH * D + off, (g1 * c1 + g2 * s2).to(DQKV.dtype.element_ty), mask=mk)
    tl.store(dst + NH * D + off + D // 2, (g2 * c2 - g1 * s1).to(DQKV.dtype.element_ty), mask=mk)
    full = hk * D + tl.arange(0, D)[None, :]
    tl.store(dst + (NH + NKV) * D + full, tl.load(DV + row * NKV * D + full, mask=mk, other=0.0), mask=mk)


@triton.jit
def _swiglu_fwd(GU, Hout, I, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # grid (N, cdiv(I, BLOCK)): contiguous columns, 16-byte accesses
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < I
    g = tl.load(GU + row * 2 * I + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(GU + row * 2 * I + I + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(Hout + row * I + cols, (g * tl.sigmoid(g) * u).to(Hout.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd(GU, DH, I, BLOCK: tl.constexpr):
    """In place: GU <- d(gate | up), DH <- h = silu(gate) * up (the down LoRA's input)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < I
    g = tl.load(GU + row * 2 * I + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(GU + row * 2 * I + I + cols, mask=m, other=0.0).to(tl.float32)
    d = tl.load(DH + row * I + cols, mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(GU + row * 2 * I + cols, (d * u * sig * (1 + g * (1 - sig))).to(GU.dtype.element_ty), mask=m)
    tl.store(GU + row * 2 * I + I + cols, (d * silu).to(GU.dtype.element_ty), mask=m)
    tl.store(DH + row * I + cols, (silu * u).to(DH.dtype.element_ty), mask=m)


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


class TritonKernels:
    """The same interface as fused_lora.Kernels, on Triton."""

    SWIGLU_BLOCK = 1024

    def __init__(self, eps: float, nh: int, nkv: int, hd: int):
        if hd % 2 or hd & (hd - 1):
            raise ValueError(f"head_dim {hd} is not a power of two")
        self.eps, self.nh, self.nkv, self.hd = eps, nh, nkv, hd
        self.in_place_swiglu_bwd = True

    def rms_fwd(self, x, w):
        N, H = x.shape
        y, xhat = torch.empty_like(x), torch.empty_like(x)
        rstd = torch.empty((N, 1), dtype=torch.float32, device=x.device)
        block = _pow2(H)
        _rms_fwd[(N,)](x, w, y, xhat, rstd, H, self.eps, BLOCK=block, num_warps=_warps(block))
        return y, xhat, rstd

    def rms_bwd(self, dy, xhat, rstd, w, dres):
        N, H = dy.shape
        dx = torch.empty_like(dy)
        block = _pow2(H)
        has_res = dres is not None and dres.dim() == 2
        _rms_bwd[(N,)](dy, xhat, rstd, w, dres if has_res else dy, dx, H, HAS_RES=has_res, BLOCK=block,
                       num_warps=_warps(block))
        return dx

    def rope_fwd(self, qkv, cos, sin):
        N, (nh, nkv, hd) = qkv.shape[0], (self.nh, self.nkv, self.hd)
        q = torch.empty((N, nh, hd), dtype=qkv.dtype, device=qkv.device)
        k = torch.empty((N, nkv, hd), dtype=qkv.dtype, device=qkv.device)
        v = torch.empty_like(k)
        _rope_fwd[(N,)](qkv, cos.contiguous(), sin.contiguous(), q, k, v, NH=nh, NKV=nkv, D=hd, BH=_pow2(nh),
                        BKV=_pow2(nkv), num_warps=4)
        return q, k, v

    def rope_bwd(self, dq, dk, dv, cos, sin):
        N, (nh, nkv, hd) = dq.shape[0], (self.nh, self.nkv, self.hd)
        dqkv = torch.empty((N, (nh + 2 * nkv) * hd), dtype=dq.dtype, device=dq.device)
        _rope_bwd[(N,)](dq.contiguous(), dk.contiguous(), dv.contiguous(), cos.contiguous(), sin.contiguous(), dqkv,
                        NH=nh, NKV=nkv, D=hd, BH=_pow2(nh), BKV=_pow2(nkv), num_warps=4)
        return dqkv

    def swiglu_fwd(self, gu):
        N, I = gu.shape[0], gu.shape[1] // 2
        h = torch.empty((N, I), dtype=gu.dtype, device=gu.device)
        _swiglu_fwd[(N, triton.cdiv(I, self.SWIGLU_BLOCK))](gu, h, I, BLOCK=self.SWIGLU_BLOCK, num_warps=4)
        return h

    def swiglu_bwd_(self, dh, gu):
        """In place: gu becomes d(gate | up), dh becomes h. Returns (dgu, h)."""
        N, I = gu.shape[0], gu.shape[1] // 2
        _swiglu_bwd[(N, triton.cdiv(I, self.SWIGLU_BLOCK))](gu, dh, I, BLOCK=self.SWIGLU_BLOCK, num_warps=4)
        return gu, dh
