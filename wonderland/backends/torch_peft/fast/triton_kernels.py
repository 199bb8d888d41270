"""Triton kernels for the pointwise work of the fused LoRA layers (CUDA only).

Each is one pass over its tensors: memory-bound, so what counts is reading and writing every byte
once with wide, coalesced accesses (one program per token row, or per row and column block). The
same functions through ``torch.compile(dynamic=True)`` ran 3-20x under the memory bandwidth on an
H200 (SwiGLU backward 0.73 ms a layer for 670 MB, RoPE backward 0.69 ms for 100 MB); these take
0.20 and 0.03 ms (bench/README.md, "How the step time came down"). The reference definitions, and
what the CPU runs, are the plain-PyTorch functions in ``fused_ops``; ``bench/train_throughput.py
--check`` compares both on the GPU, ``tests/test_triton_kernels.py`` in Triton's interpreter on the CPU.

Layouts (row-major, one row per token): x, xhat (N, H); qkv (N, (nh + 2 nkv) D); q (N, nh, D);
k, v (N, nkv, D); cos, sin (N, D); gate | up (N, 2I); h (N, I). Rows are indexed in int64. The
buffers the LoRA matmuls read or write (gate | up, the norm outputs, the qkv and residual
gradients) may be views of wider buffers: their row stride is an argument.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _pow2(n: int) -> int:
    return triton.next_power_of_2(n)


@triton.jit
def _rms_fwd(X, W, Y, XHAT, RSTD, H, y_stride, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < H
    x = tl.load(X + row * H + cols, mask=m, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / H + eps)
    xhat = (x * rstd).to(XHAT.dtype.element_ty)  # rounded like transformers' hidden.to(input_dtype)
    w = tl.load(W + cols, mask=m, other=0.0)
    tl.store(XHAT + row * H + cols, xhat, mask=m)
    tl.store(Y + row * y_stride + cols, (w.to(tl.float32) * xhat.to(tl.float32)).to(Y.dtype.element_ty), mask=m)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_bwd(DY, XHAT, RSTD, W, DRES, DX, H, res_stride, dx_stride, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < H
    g = tl.load(DY + row * H + cols, mask=m, other=0.0).to(tl.float32) * tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    xh = tl.load(XHAT + row * H + cols, mask=m, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row)
    dx = rstd * (g - xh * (tl.sum(g * xh, 0) / H))
    if HAS_RES:
        dx += tl.load(DRES + row * res_stride + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(DX + row * dx_stride + cols, dx.to(DX.dtype.element_ty), mask=m)


@triton.jit
def _qkv_addr(row, T, NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr, HM: tl.constexpr):
    """Where token ``row``'s head 0 of q and of k/v starts, and the stride between heads:
    token-major (N, h, D), or head-major (B, h, T, D) when HM."""
    if HM:
        b = row // T
        t = row - b * T
        return b * NH * T * D + t * D, b * NKV * T * D + t * D, T * D
    else:
        return row * NH * D, row * NKV * D, D


@triton.jit
def _rope_fwd(QKV, COS, SIN, Q, K, V, T, NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr,
              BH: tl.constexpr, BKV: tl.constexpr, HM: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    half = tl.arange(0, D // 2)
    c1 = tl.load(COS + row * D + half).to(tl.float32)
    c2 = tl.load(COS + row * D + D // 2 + half).to(tl.float32)
    s1 = tl.load(SIN + row * D + half).to(tl.float32)
    s2 = tl.load(SIN + row * D + D // 2 + half).to(tl.float32)
    src = QKV + row * (NH + 2 * NKV) * D
    qo, ko, hs = _qkv_addr(row, T, NH, NKV, D, HM)
    # q: heads x half-dims, rotate_half convention: out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2
    hq = tl.arange(0, BH)[:, None]
    mq = hq < NH
    off = hq * D + half[None, :]
    dst = qo + hq * hs + half[None, :]
    x1 = tl.load(src + off, mask=mq, other=0.0).to(tl.float32)
    x2 = tl.load(src + off + D // 2, mask=mq, other=0.0).to(tl.float32)
    tl.store(Q + dst, (x1 * c1 - x2 * s1).to(Q.dtype.element_ty), mask=mq)
    tl.store(Q + dst + D // 2, (x2 * c2 + x1 * s2).to(Q.dtype.element_ty), mask=mq)
    hk = tl.arange(0, BKV)[:, None]
    mk = hk < NKV
    off = hk * D + half[None, :]
    dst = ko + hk * hs + half[None, :]
    x1 = tl.load(src + NH * D + off, mask=mk, other=0.0).to(tl.float32)
    x2 = tl.load(src + NH * D + off + D // 2, mask=mk, other=0.0).to(tl.float32)
    tl.store(K + dst, (x1 * c1 - x2 * s1).to(K.dtype.element_ty), mask=mk)
    tl.store(K + dst + D // 2, (x2 * c2 + x1 * s2).to(K.dtype.element_ty), mask=mk)
    d = tl.arange(0, D)[None, :]
    tl.store(V + ko + hk * hs + d, tl.load(src + (NH + NKV) * D + hk * D + d, mask=mk, other=0.0), mask=mk)


@triton.jit
def _rope_bwd(DQ, DK, DV, COS, SIN, DQKV, T, out_stride, NH: tl.constexpr, NKV: tl.constexpr, D: tl.constexpr,
              BH: tl.constexpr, BKV: tl.constexpr, HM: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    half = tl.arange(0, D // 2)
    c1 = tl.load(COS + row * D + half).to(tl.float32)
    c2 = tl.load(COS + row * D + D // 2 + half).to(tl.float32)
    s1 = tl.load(SIN + row * D + half).to(tl.float32)
    s2 = tl.load(SIN + row * D + D // 2 + half).to(tl.float32)
    dst = DQKV + row * out_stride
    qo, ko, hs = _qkv_addr(row, T, NH, NKV, D, HM)
    # transpose of the rotation: dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1
    hq = tl.arange(0, BH)[:, None]
    mq = hq < NH
    off = hq * D + half[None, :]
    src = qo + hq * hs + half[None, :]
    g1 = tl.load(DQ + src, mask=mq, other=0.0).to(tl.float32)
    g2 = tl.load(DQ + src + D // 2, mask=mq, other=0.0).to(tl.float32)
    tl.store(dst + off, (g1 * c1 + g2 * s2).to(DQKV.dtype.element_ty), mask=mq)
    tl.store(dst + off + D // 2, (g2 * c2 - g1 * s1).to(DQKV.dtype.element_ty), mask=mq)
    hk = tl.arange(0, BKV)[:, None]
    mk = hk < NKV
    off = hk * D + half[None, :]
    src = ko + hk * hs + half[None, :]
    g1 = tl.load(DK + src, mask=mk, other=0.0).to(tl.float32)
    g2 = tl.load(DK + src + D // 2, mask=mk, other=0.0).to(tl.float32)
    tl.store(dst + NH * D + off, (g1 * c1 + g2 * s2).to(DQKV.dtype.element_ty), mask=mk)
    tl.store(dst + NH * D + off + D // 2, (g2 * c2 - g1 * s1).to(DQKV.dtype.element_ty), mask=mk)
    d = tl.arange(0, D)[None, :]
    tl.store(dst + (NH + NKV) * D + hk * D + d, tl.load(DV + ko + hk * hs + d, mask=mk, other=0.0), mask=mk)


@triton.jit
def _swiglu_fwd(GU, Hout, I, gu_stride, h_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # grid (N, cdiv(I, BLOCK)): contiguous columns, 16-byte accesses
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < I
    g = tl.load(GU + row * gu_stride + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(GU + row * gu_stride + I + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(Hout + row * h_stride + cols, (g * tl.sigmoid(g) * u).to(Hout.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd(GU, DH, I, gu_stride, BLOCK: tl.constexpr):
    """In place: GU <- d(gate | up), DH <- h = silu(gate) * up (the down LoRA's input)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < I
    g = tl.load(GU + row * gu_stride + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(GU + row * gu_stride + I + cols, mask=m, other=0.0).to(tl.float32)
    d = tl.load(DH + row * I + cols, mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(GU + row * gu_stride + cols, (d * u * sig * (1 + g * (1 - sig))).to(GU.dtype.element_ty), mask=m)
    tl.store(GU + row * gu_stride + I + cols, (d * silu).to(GU.dtype.element_ty), mask=m)
    tl.store(DH + row * I + cols, (silu * u).to(DH.dtype.element_ty), mask=m)


@triton.jit
def _copy_rows(SRC, DST, C, src_stride, dst_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # grid (N, cdiv(C, BLOCK)): wide, coalesced accesses
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < C
    tl.store(DST + row * dst_stride + cols, tl.load(SRC + row * src_stride + cols, mask=m), mask=m)


@triton.jit
def _dequant_nf4(P, ABSMAX, CODE, NABS, NCODE, OUT, cols, out_stride, offset,
                 BLOCKSIZE: tl.constexpr, NESTED_BLOCK: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr):
    """Row ``program_id(0)``, bytes ``program_id(1) * BLOCK ..`` of a packed NF4 weight -> 2 * BLOCK
    elements of that row of ``OUT`` (see nf4.py): one coalesced load of bytes, one contiguous store."""
    row = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # byte within the row
    m = k < cols // 2
    j = row * (cols // 2) + k  # byte within the weight
    byte = tl.load(P + j, mask=m, other=0).to(tl.int32)
    b = (2 * j) // BLOCKSIZE  # both nibbles of a byte are in one block (even block size)
    if NESTED:
        a = tl.load(ABSMAX + b, mask=m, other=0).to(tl.int32)
        amax = tl.load(NCODE + a, mask=m, other=0.0) * tl.load(NABS + b // NESTED_BLOCK, mask=m, other=0.0) + offset
    else:
        amax = tl.load(ABSMAX + b, mask=m, other=0.0)
    hi = tl.load(CODE + (byte >> 4), mask=m, other=0.0) * amax  # the high nibble is the first element
    lo = tl.load(CODE + (byte & 15), mask=m, other=0.0) * amax
    c = tl.program_id(1) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)  # column
    tl.store(OUT + row * out_stride + c, tl.interleave(hi, lo).to(OUT.dtype.element_ty), mask=c < cols)

def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


class TritonKernels:
    """The same interface as fused_lora.Kernels, on Triton."""

    SWIGLU_BLOCK = 1024

    def __init__(self, eps: float, nh: int, nkv: int, hd: int):
        if hd % 2 or hd & (hd - 1):
            raise ValueError(f"head_dim {hd} is not a power of two")
        self.eps, self.nh, self.nkv, self.hd = eps, nh, nkv, hd

    def rms_fwd(self, x, w, out=None):
        """out: where y goes, (N, H) with unit column stride (a view of a matmul's input buffer)."""
        N, H = x.shape
        y = torch.empty_like(x) if out is None else out
        assert y.stride(1) == 1 and x.is_contiguous()
        xhat = torch.empty_like(x)
        rstd = torch.empty((N, 1), dtype=torch.float32, device=x.device)
        block = _pow2(H)
        _rms_fwd[(N,)](x, w, y, xhat, rstd, H, y.stride(0), self.eps, BLOCK=block, num_warps=_warps(block))
        return y, xhat, rstd

    def rms_bwd(self, dy, xhat, rstd, w, dres, out=None):
        """dres, out: (N, H) with unit column stride (views of wider buffers allowed)."""
        N, H = dy.shape
        dx = torch.empty_like(dy) if out is None else out
        block = _pow2(H)
        has_res = dres is not None and dres.dim() == 2
        res = dres if has_res else dy
        assert dy.is_contiguous() and xhat.is_contiguous() and res.stride(1) == 1 and dx.stride(1) == 1
        _rms_bwd[(N,)](dy, xhat, rstd, w, res, dx, H, res.stride(0), dx.stride(0), HAS_RES=has_res, BLOCK=block,
                       num_warps=_warps(block))
        return dx

    def rope_fwd(self, qkv, cos, sin, T: int = 0):
        """q, k rotated and v: token-major (N, h, D), or head-major (B, h, T, D) when T > 0."""
        N, (nh, nkv, hd) = qkv.shape[0], (self.nh, self.nkv, self.hd)
        shape = (lambda h: (N // T, h, T, hd)) if T else (lambda h: (N, h, hd))
        q = torch.empty(shape(nh), dtype=qkv.dtype, device=qkv.device)
        k = torch.empty(shape(nkv), dtype=qkv.dtype, device=qkv.device)
        v = torch.empty_like(k)
        assert qkv.is_contiguous()
        _rope_fwd[(N,)](qkv, cos.contiguous(), sin.contiguous(), q, k, v, max(T, 1), NH=nh, NKV=nkv, D=hd,
                        BH=_pow2(nh), BKV=_pow2(nkv), HM=bool(T), num_warps=4)
        return q, k, v

    def rope_bwd(self, dq, dk, dv, cos, sin, T: int = 0, out=None):
        """out: (N, (nh + 2 nkv) D) with unit column stride (a view of a wider buffer allowed)."""
        N, (nh, nkv, hd) = cos.shape[0], (self.nh, self.nkv, self.hd)
        dqkv = torch.empty((N, (nh + 2 * nkv) * hd), dtype=dq.dtype, device=dq.device) if out is None else out
        assert dqkv.stride(1) == 1
        _rope_bwd[(N,)](dq.contiguous(), dk.contiguous(), dv.contiguous(), cos.contiguous(), sin.contiguous(), dqkv,
                        max(T, 1), dqkv.stride(0), NH=nh, NKV=nkv, D=hd, BH=_pow2(nh), BKV=_pow2(nkv), HM=bool(T), num_warps=4)
        return dqkv

    @staticmethod
    def dequant_nf4(w, out):
        """nf4.dequantize on the GPU: the NF4Weight ``w`` into ``out`` (out, in) (unit column stride,
        rows may be strided: a view of a group's [W | B] buffer)."""
        rows, cols = w.shape
        assert out.shape == w.shape and out.stride(1) == 1 and w.packed.numel() * 2 == out.numel()
        nested, block = w.nested, min(1024, _pow2(cols // 2))
        _dequant_nf4[(rows, triton.cdiv(cols // 2, block))](
            w.packed, w.absmax, w.code, w.nested_absmax if nested else w.code, w.nested_code if nested else w.code, out,
            cols, out.stride(0), w.offset, BLOCKSIZE=w.blocksize, NESTED_BLOCK=w.nested_blocksize,
            NESTED=nested, BLOCK=block, num_warps=4)
        return out

    @staticmethod
    def copy_rows(dst, src):
        """dst <- src, both (N, C) with unit column stride: PyTorch's copy between row-strided views
        runs its generic strided kernel at about a third of the memory bandwidth."""
        N, C = src.shape
        assert dst.shape == src.shape and src.stride(1) == 1 and dst.stride(1) == 1
        block = min(2048, _pow2(C))
        _copy_rows[(N, triton.cdiv(C, block))](src, dst, C, src.stride(0), dst.stride(0), BLOCK=block, num_warps=4)
        return dst

    def swiglu_fwd(self, gu, out=None):
        N, I = gu.shape[0], gu.shape[1] // 2
        h = torch.empty((N, I), dtype=gu.dtype, device=gu.device) if out is None else out
        assert h.stride(1) == 1 and gu.stride(1) == 1
        _swiglu_fwd[(N, triton.cdiv(I, self.SWIGLU_BLOCK))](gu, h, I, gu.stride(0), h.stride(0), BLOCK=self.SWIGLU_BLOCK,
                                                            num_warps=4)
        return h

    def swiglu_bwd_(self, dh, gu):
        """In place: gu becomes d(gate | up), dh becomes h. Returns (dgu, h)."""
        N, I = gu.shape[0], gu.shape[1] // 2
        assert gu.stride(1) == 1 and dh.is_contiguous()
        _swiglu_bwd[(N, triton.cdiv(I, self.SWIGLU_BLOCK))](gu, dh, I, gu.stride(0), BLOCK=self.SWIGLU_BLOCK, num_warps=4)
        return gu, dh
