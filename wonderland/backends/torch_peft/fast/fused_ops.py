"""The non-matmul pieces of the fused LoRA layers (fused_lora.py): pointwise maths and attention.

The plain-PyTorch functions here are the definitions: the CPU (and MPS) runs them, the CPU tests
check them against autograd, and on CUDA the Triton kernels of ``triton_kernels`` replace them
(``bench/train_throughput.py --check`` compares the two there).

Layouts: one row per token. q is (N, nh, D) "token-major", or (B, nh, T, D) "head-major" when the
attention kernel wants it (cuDNN's, through SDPA): ``rope_fwd`` writes whichever the attention asks
for, so no copy is made between them.
"""

from __future__ import annotations

from functools import partial

import torch

from wonderland.backends.torch_peft.fast import nf4


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # float32 maths for bf16, float64 stays float64


# ----------------------------------------------------------------------------- pointwise maths
def rms_fwd(x, w, eps: float, out=None):
    """transformers' LlamaRMSNorm: xhat = x / rms(x) rounded to x's dtype, y = w * xhat.
    x (N, H) -> y (N, H) (written into ``out`` when given), xhat (N, H), rstd (N, 1) float32."""
    xf = x.to(_acc(x.dtype))
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = (xf * rstd).to(x.dtype)
    y = w * xhat
    return (y if out is None else out.copy_(y)), xhat, rstd


def rms_bwd(dy, xhat, rstd, w, dres, out=None):
    """Gradient of x through y = w * x * rstd(x), plus the residual branch's gradient ``dres``
    (written into ``out`` when given)."""
    acc = _acc(dy.dtype)
    g = dy.to(acc) * w.to(acc)
    xh = xhat.to(acc)
    dx = rstd * (g - xh * (g * xh).mean(-1, keepdim=True))
    dx = (dx if dres is None else dx + dres.to(acc)).to(dy.dtype)
    return dx if out is None else out.copy_(dx)


def _rotate(x, cos, sin):  # x (..., heads, D); transformers' rotate_half convention
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat((-x2, x1), -1) * sin


def _rotate_bwd(g, cos, sin):  # the transpose of _rotate
    u1, u2 = (g * sin).chunk(2, -1)
    return g * cos + torch.cat((u2, -u1), -1)


def _head_major(t, T: int):  # (N, h, D) -> (B, h, T, D) contiguous
    return t.view(-1, T, t.shape[1], t.shape[2]).transpose(1, 2).contiguous()


def _token_major(t):  # (B, h, T, D) -> (N, h, D)
    return t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])


def rope_fwd(qkv, cos, sin, nh: int, nkv: int, hd: int, T: int = 0):
    """qkv (N, (nh + 2 nkv) hd) -> q, k rotated and v, three new tensors (so that attention keeps
    them, not qkv): token-major (N, h, hd), or head-major (B, h, T, hd) when T > 0."""
    n = qkv.shape[0]
    q = qkv[:, : nh * hd].view(n, nh, hd)
    k = qkv[:, nh * hd : (nh + nkv) * hd].view(n, nkv, hd)
    v = qkv[:, (nh + nkv) * hd :].view(n, nkv, hd)
    c, s = cos[:, None, :], sin[:, None, :]
    q, k, v = _rotate(q, c, s), _rotate(k, c, s), v.clone()
    return tuple(_head_major(t, T) for t in (q, k, v)) if T else (q, k, v)


def rope_bwd(dq, dk, dv, cos, sin, T: int = 0, out=None):
    """(dq, dk, dv) of rope_fwd's outputs (same layout) -> the gradient of qkv (N, (nh + 2 nkv) hd),
    written into ``out`` when given."""
    if T:
        dq, dk, dv = _token_major(dq), _token_major(dk), _token_major(dv)
    n = dq.shape[0]
    c, s = cos[:, None, :], sin[:, None, :]
    d = torch.cat((_rotate_bwd(dq, c, s).reshape(n, -1), _rotate_bwd(dk, c, s).reshape(n, -1), dv.reshape(n, -1)), 1)
    return d if out is None else out.copy_(d)


def swiglu_fwd(gu, out=None):
    """gate | up (N, 2I; rows may be strided) -> silu(gate) * up (N, I), written into ``out`` when given."""
    g, u = gu.to(_acc(gu.dtype)).chunk(2, -1)
    h = (g * torch.sigmoid(g) * u).to(gu.dtype)
    return h if out is None else out.copy_(h)


def swiglu_bwd(dh, gu):
    """dh (N, I) -> d(gate | up) (N, 2I)."""
    acc = _acc(gu.dtype)
    g, u = gu.to(acc).chunk(2, -1)
    d = dh.to(acc)
    sig = torch.sigmoid(g)
    silu = g * sig
    return torch.cat((d * u * sig * (1 + g * (1 - sig)), d * silu), -1).to(gu.dtype)


class Kernels:
    """The pointwise functions above (CPU, MPS, and the reference on CUDA). ``make_kernels`` picks
    the Triton versions (triton_kernels.py) on CUDA; both have this interface."""

    def __init__(self, eps: float, nh: int, nkv: int, hd: int):
        self.rms_fwd = partial(rms_fwd, eps=eps)
        self.rope_fwd = partial(rope_fwd, nh=nh, nkv=nkv, hd=hd)
        self.rms_bwd, self.rope_bwd, self.swiglu_fwd = rms_bwd, rope_bwd, swiglu_fwd

    @staticmethod
    def copy_rows(dst, src):
        """dst <- src, both (N, C) with unit column stride (rows may be strided)."""
        return dst.copy_(src)

    @staticmethod
    def dequant_nf4(w, out):
        """A bitsandbytes NF4 weight (nf4.NF4Weight) into ``out`` (rows may be strided)."""
        return nf4.dequantize(w, out)

    @staticmethod
    def swiglu_bwd_(dh, gu):
        """(d(gate | up), h), d(gate | up) written over gu (the Triton version writes h over dh too)."""
        h = swiglu_fwd(gu)
        return gu.copy_(swiglu_bwd(dh, gu)), h


def make_kernels(eps: float, nh: int, nkv: int, hd: int, cuda: bool):
    if cuda:
        try:
            from wonderland.backends.torch_peft.fast.triton_kernels import TritonKernels

            return TritonKernels(eps, nh, nkv, hd)
        except (ImportError, ValueError):  # no Triton, or a head size its kernels do not take
            pass
    return Kernels(eps, nh, nkv, hd)


# ----------------------------------------------------------------------------- attention
# Each: forward(q, k, v, out) writes the output as o2 (N, nh*D) into ``out`` (a view of o_proj's input
# buffer) and returns (out, state); output(state) -> o2 again (for the o_proj LoRA's gradient);
# backward(do2, state) -> (dq, dk, dv) in the layout of q, k, v.
# ``head_major``: which layout rope_fwd must write. All are causal with grouped-query heads.
class FlashAttention:
    """FlashAttention-2 (torch's own build; CUDA, fp16/bf16) in its variable-length form over
    token-major q (N, nh, D): sequence i = tokens cu[i]:cu[i+1], so packed records never attend
    across their boundaries and no padding is computed."""

    head_major = False

    def __init__(self, cu: torch.Tensor, max_len: int, scale: float, copy_rows=Kernels.copy_rows):
        self.cu, self.max_len, self.scale, self.copy_rows = cu.to(torch.int32), max_len, scale, copy_rows

    def forward(self, q, k, v, out):
        o, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, self.cu, self.cu, self.max_len, self.max_len, 0.0, True, False, scale=self.scale)
        return self.copy_rows(out, o.view(o.shape[0], -1)), (q, k, v, o, lse, rng, unused)

    @staticmethod
    def output(state):
        return state[3].view(state[3].shape[0], -1)

    def backward(self, do2, state):
        q, k, v, out, lse, rng, unused = state
        return torch.ops.aten._flash_attention_backward(
            do2.view_as(out), q, k, v, out, lse, self.cu, self.cu, self.max_len, self.max_len, 0.0, True, rng, unused,
            scale=self.scale)


class SDPAttention:
    """Causal attention over B rows of T tokens through ``F.scaled_dot_product_attention``, which picks
    the fastest kernel it has (cuDNN's on Hopper: 0.49 ms a layer forward and backward for 1B shapes
    vs 0.78 for FlashAttention-2, bench/README.md). Its own autograd graph is kept from forward to
    backward; it saves q, k, v, the output and the log-sum-exp, as we would. q, k, v token-major
    (passed as (B, h, T, D) views), or head-major copies when ``head_major``."""

    def __init__(self, B: int, T: int, scale: float, head_major: bool = False, copy_rows=Kernels.copy_rows):
        self.B, self.T, self.scale, self.head_major, self.copy_rows = B, T, scale, head_major, copy_rows

    def _4d(self, t):  # token-major (N, h, D) -> a (B, h, T, D) view
        return t.view(self.B, self.T, t.shape[1], t.shape[2]).transpose(1, 2)

    def forward(self, q, k, v, out):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        with torch.enable_grad():
            qq, kk, vv = (q, k, v) if self.head_major else (self._4d(q), self._4d(k), self._4d(v))
            o = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=self.scale,
                                                                 enable_gqa=q.shape[1] != k.shape[1])
        tm = o.detach().transpose(1, 2)  # (B, T, nh, D)
        if tm.stride(2) == o.shape[3] and tm.stride(1) == o.shape[1] * o.shape[3] and tm.stride(3) == 1:
            self.copy_rows(out, tm.reshape(out.shape))  # the kernel wrote token-major: rows of nh * D
        else:
            out.view(self.B, self.T, o.shape[1], o.shape[3]).copy_(tm)
        return out, (o, q, k, v)

    @staticmethod
    def output(state):  # (B, nh, T, D) -> (N, nh*D): a view when the kernel wrote token-major
        out = state[0].detach()
        return out.transpose(1, 2).reshape(-1, out.shape[1] * out.shape[3])

    def backward(self, do2, state):
        out, q, k, v = state
        return torch.autograd.grad(out, (q, k, v), do2.view(self.B, self.T, out.shape[1], -1).transpose(1, 2))


class MathAttention:
    """The same function in plain PyTorch, one sequence at a time (CPU, MPS, float32/float64): what
    the CPU tests run. The softmax is recomputed in the backward.

    ``prefix`` > 0: the first sequence (tokens 0..prefix-1) is a prefix that every later sequence
    also attends to, as if each of them began with it (a system prompt that every record of a batch
    shares: its activations are the same in every record, so they are computed once; see
    ``training.pack_shared``). Its keys and values collect the gradients of every sequence."""

    head_major = False

    def __init__(self, cu: torch.Tensor, max_len: int, scale: float, prefix: int = 0):
        self.bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
        self.scale, self.prefix = scale, prefix
        assert not prefix or self.bounds[0] == (0, prefix), "the shared prefix must be the first sequence"

    def _probs(self, q, k):  # q (nh, n, D), k (nh, m, D), m >= n -> causal softmax (nh, n, m) in q's dtype
        n, m = q.shape[1], k.shape[1]  # the first m - n keys (a shared prefix) are seen by every query
        s = (q @ k.transpose(1, 2)).to(_acc(q.dtype)) * self.scale
        s = s.masked_fill(torch.ones(n, m, dtype=torch.bool, device=q.device).triu(m - n + 1), float("-inf"))
        return torch.softmax(s, -1).to(q.dtype)

    def _keys(self, t, s, e, rep):  # (N, h, D) -> (h * rep, m, D): the sequence's keys (or values), prefix first
        own = t[s:e]
        if self.prefix and s >= self.prefix:
            own = torch.cat([t[: self.prefix], own])
        return own.transpose(0, 1).repeat_interleave(rep, 0)

    def forward(self, q, k, v, out):
        o, rep = torch.empty_like(q), q.shape[1] // k.shape[1]
        for s, e in self.bounds:
            qs, ks, vs = q[s:e].transpose(0, 1), self._keys(k, s, e, rep), self._keys(v, s, e, rep)
            o[s:e] = (self._probs(qs, ks) @ vs).transpose(0, 1)
        return out.copy_(o.view(o.shape[0], -1)), (q, k, v, o)

    @staticmethod
    def output(state):
        return state[3].view(state[3].shape[0], -1)

    def backward(self, do2, state):
        q, k, v, out = state
        do = do2.view_as(out)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        nkv, rep, P = k.shape[1], q.shape[1] // k.shape[1], self.prefix
        for s, e in self.bounds:  # the prefix (if any) first: later sequences add to its dk, dv
            qs, ks, vs = q[s:e].transpose(0, 1), self._keys(k, s, e, rep), self._keys(v, s, e, rep)
            p, dos = self._probs(qs, ks), do[s:e].transpose(0, 1)
            dvs = p.transpose(1, 2) @ dos
            dp = dos @ vs.transpose(1, 2)
            ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * self.scale
            dq[s:e] = (ds @ ks).transpose(0, 1)
            m = ks.shape[1]  # grouped heads: sum the gradients of the query heads that share a k/v head
            dks = (ds.transpose(1, 2) @ qs).view(nkv, rep, m, -1).sum(1).transpose(0, 1)  # (m, nkv, D)
            dvs = dvs.view(nkv, rep, m, -1).sum(1).transpose(0, 1)
            if m > e - s:  # the shared prefix's part
                dk[:P] += dks[:P]
                dv[:P] += dvs[:P]
                dks, dvs = dks[P:], dvs[P:]
            dk[s:e], dv[s:e] = dks, dvs
        return dq, dk, dv
