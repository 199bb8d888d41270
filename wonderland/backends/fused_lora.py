"""LoRA Llama decoder layers with a hand-written backward: the CUDA training fast path.

Autograd on the Hugging Face + PEFT modules keeps every intermediate it might need (PEFT's float32
copies of each projection's input, the normed inputs, RoPE's inputs and outputs, SiLU's output...):
16.7 GiB for Llama-3.2-1B at 8 x 1024 tokens even under torch.compile. Here one
``torch.autograd.Function`` per decoder layer runs the same maths and keeps only what its backward
cannot cheaply recompute, per token and layer (bf16 elements, 1B shapes):

    xhat (normed input, before the norm weight)  H      for RMSNorm's and LoRA A's gradients (x2)
    q (after RoPE), k (after RoPE), v             H + 2*KV   for the attention backward
    o (attention output) + its log-sum-exp        H      for the attention and o_proj backward
    gate | up (pre-activation)                    2*I    SwiGLU is recomputed from them
    x @ A^T of each LoRA                          r each for LoRA B's gradient

~25.7k elements = 51 KB/token/layer for 1B (8192 tokens x 16 layers: 6.3 GiB), about half of what
autograd keeps. The weights of q|k|v and gate|up are concatenated (the modules' weights become views
of the concatenation: no extra memory) so each group is one matmul; a LoRA is one small matmul for
its A (all of a group's A at once) and an in-place ``addmm_`` for its B, in the compute dtype.
Attention is FlashAttention-2 through ``torch.ops.aten._flash_attention_forward`` in its
variable-length form: packed records never attend across their boundaries and padding costs nothing.
The pointwise work (RMSNorm, RoPE, SwiGLU and their backwards) is one Triton kernel each on CUDA
(triton_kernels.py), plain PyTorch elsewhere.

Applies to ``llama``/``mistral``-style layers (no biases, SiLU MLP, no sliding window) whose LoRA
modules are plain PEFT ``lora.Linear`` with dropout 0; anything else keeps the PEFT modules
(``prepare`` returns the reason). Numerics: the same operations as transformers' Llama in the same
dtype, except that LoRA runs in the compute dtype (PEFT upcasts its input to float32); the CPU tests
check loss and every LoRA gradient against the plain PEFT model in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
PROJECTIONS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


# ----------------------------------------------------------------------------- pointwise maths
def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # float32 maths for bf16, float64 stays float64


def rms_fwd(x, w, eps: float):
    """transformers' LlamaRMSNorm: xhat = x / rms(x) rounded to x's dtype, y = w * xhat.
    x (N, H) -> y (N, H), xhat (N, H), rstd (N, 1) in float32."""
    xf = x.to(_acc(x.dtype))
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = (xf * rstd).to(x.dtype)
    return w * xhat, xhat, rstd


def rms_bwd(dy, xhat, rstd, w, dres):
    """Gradient of x through y = w * x * rstd(x), plus the residual branch's gradient ``dres``."""
    acc = _acc(dy.dtype)
    g = dy.to(acc) * w.to(acc)
    xh = xhat.to(acc)
    dx = rstd * (g - xh * (g * xh).mean(-1, keepdim=True))
    return (dx if dres is None else dx + dres.to(acc)).to(dy.dtype)


def _rotate(x, cos, sin):  # x (N, heads, D); transformers' rotate_half convention
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat((-x2, x1), -1) * sin


def _rotate_bwd(g, cos, sin):  # the transpose of _rotate
    u1, u2 = (g * sin).chunk(2, -1)
    return g * cos + torch.cat((u2, -u1), -1)


def rope_fwd(qkv, cos, sin, nh: int, nkv: int, hd: int):
    """qkv (N, (nh + 2 nkv) hd) -> q (N, nh, hd), k (N, nkv, hd) rotated, v (N, nkv, hd): three new
    tensors, so that attention keeps them and not the whole qkv."""
    n = qkv.shape[0]
    q = qkv[:, : nh * hd].view(n, nh, hd)
    k = qkv[:, nh * hd : (nh + nkv) * hd].view(n, nkv, hd)
    v = qkv[:, (nh + nkv) * hd :].view(n, nkv, hd)
    c, s = cos[:, None, :], sin[:, None, :]
    return _rotate(q, c, s), _rotate(k, c, s), v.clone()


def rope_bwd(dq, dk, dv, cos, sin):
    """(dq, dk, dv) of the rotated q, k and of v -> the gradient of qkv (N, (nh + 2 nkv) hd)."""
    n = dq.shape[0]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((_rotate_bwd(dq, c, s).reshape(n, -1), _rotate_bwd(dk, c, s).reshape(n, -1), dv.reshape(n, -1)), 1)


def swiglu_fwd(gu):
    """gate | up (N, 2I) -> silu(gate) * up (N, I)."""
    g, u = gu.to(_acc(gu.dtype)).chunk(2, -1)
    return (g * torch.sigmoid(g) * u).to(gu.dtype)


def swiglu_bwd(dh, gu):
    """dh (N, I) -> d(gate | up) (N, 2I)."""
    acc = _acc(gu.dtype)
    g, u = gu.to(acc).chunk(2, -1)
    d = dh.to(acc)
    sig = torch.sigmoid(g)
    silu = g * sig
    return torch.cat((d * u * sig * (1 + g * (1 - sig)), d * silu), -1).to(gu.dtype)


class Kernels:
    """The pointwise functions above, in plain PyTorch (CPU, MPS, and the reference on CUDA).
    ``make_kernels`` picks the Triton versions (triton_kernels.py) on CUDA."""

    def __init__(self, eps: float, nh: int, nkv: int, hd: int):
        self.rms_fwd = partial(rms_fwd, eps=eps)
        self.rope_fwd = partial(rope_fwd, nh=nh, nkv=nkv, hd=hd)
        self.rms_bwd, self.rope_bwd, self.swiglu_fwd = rms_bwd, rope_bwd, swiglu_fwd

    @staticmethod
    def swiglu_bwd_(dh, gu):
        """(d(gate | up), h): the Triton version writes them over gu and dh, this one allocates."""
        return swiglu_bwd(dh, gu), swiglu_fwd(gu)


def make_kernels(eps: float, nh: int, nkv: int, hd: int, cuda: bool):
    if cuda:
        try:
            from wonderland.backends.triton_kernels import TritonKernels

            return TritonKernels(eps, nh, nkv, hd)
        except (ImportError, ValueError):  # no Triton, or a head size its kernels do not take
            pass
    return Kernels(eps, nh, nkv, hd)


# ----------------------------------------------------------------------------- LoRA groups
@dataclass
class Member:
    """One projection of a fused group: its output columns and its LoRA (indices into the layer's params)."""

    cols: tuple[int, int]
    a: int = -1  # index of lora_A.weight (r, in) in the layer's params, -1 = no LoRA
    b: int = -1  # index of lora_B.weight (out, r)
    scale: float = 1.0


@dataclass
class Group:
    weight: torch.Tensor  # (sum of outs, in): the members' frozen weights, concatenated
    members: list[Member]

    @property
    def lora(self) -> list[Member]:
        return [m for m in self.members if m.a >= 0]


def lora_fwd(y, x, group: Group, P, dtype):
    """y += scale * (x @ A^T) @ B^T for each member with a LoRA, in place. Returns x @ A^T of all of
    them side by side (N, sum r), the one thing their backward needs beyond x; None without LoRA."""
    ms = group.lora
    if not ms:
        return None
    a = x @ torch.cat([P[m.a].to(dtype) for m in ms]).t()
    r0 = 0
    for m in ms:
        r = P[m.a].shape[0]
        y[:, m.cols[0] : m.cols[1]].addmm_(a[:, r0 : r0 + r], P[m.b].to(dtype).t(), alpha=m.scale)
        r0 += r
    return a


def lora_bwd(dy, dx, a, group: Group, P, grads):
    """Backward of lora_fwd for the group's output gradient dy (N, out), first part: the B gradients
    into ``grads`` and dx += scale * (dy B) A in place (unless dx is None). Returns g = scale * dy B
    (N, sum r) for lora_grad_a, or None without LoRA."""
    ms = group.lora
    if not ms:
        return None
    gs, r0 = [], 0
    for m in ms:
        r, B = P[m.a].shape[0], P[m.b]
        dy_m = dy[:, m.cols[0] : m.cols[1]]
        grads[m.b] = (dy_m.t() @ a[:, r0 : r0 + r]).to(B.dtype).mul_(m.scale)  # (out, r)
        gs.append((dy_m @ B.to(dy.dtype)).mul_(m.scale))  # (N, r)
        r0 += r
    g = torch.cat(gs, 1) if len(gs) > 1 else gs[0]
    if dx is not None:
        dx.addmm_(g, torch.cat([P[m.a].to(dy.dtype) for m in ms]))
    return g


def lora_grad_a(g, x, group: Group, P, grads, col_scale=None):
    """Second part: the A gradients g^T (x * col_scale), for the LoRA input x (col_scale = the RMSNorm
    weight when x is the saved xhat)."""
    if g is None:
        return
    ms = group.lora
    da = (g.t() @ x).to(P[ms[0].a].dtype)  # (sum r, in)
    if col_scale is not None:
        da.mul_(col_scale.to(da.dtype))
    r0 = 0
    for m in ms:
        r = P[m.a].shape[0]
        grads[m.a] = da[r0 : r0 + r]
        r0 += r


# ----------------------------------------------------------------------------- attention
class FlashAttention:
    """Causal FlashAttention-2 (torch's own build, CUDA, fp16/bf16) over packed sequences: q (N, nh, D),
    k and v (N, nkv, D) with grouped-query heads, sequence i = tokens cu[i]:cu[i+1]."""

    def __init__(self, cu: torch.Tensor, max_len: int, scale: float):
        self.cu, self.max_len, self.scale = cu.to(torch.int32), max_len, scale

    def forward(self, q, k, v):
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, self.cu, self.cu, self.max_len, self.max_len, 0.0, True, False, scale=self.scale)
        return out, (lse, rng, unused)

    def backward(self, do, q, k, v, out, state):
        lse, rng, unused = state
        return torch.ops.aten._flash_attention_backward(
            do.contiguous(), q, k, v, out, lse, self.cu, self.cu, self.max_len, self.max_len, 0.0, True, rng, unused,
            scale=self.scale)


class SDPAttention:
    """Causal attention over B rows of T tokens through ``F.scaled_dot_product_attention``, which picks
    the fastest kernel it has (cuDNN's on Hopper). Its own autograd graph is kept from the forward
    to the backward (it saves q, k, v, the output and the log-sum-exp: nothing more than we would)."""

    def __init__(self, B: int, T: int, scale: float):
        self.B, self.T, self.scale = B, T, scale

    def _4d(self, t):  # (N, h, D) -> (B, h, T, D), a view
        return t.view(self.B, self.T, t.shape[1], t.shape[2]).transpose(1, 2)

    def forward(self, q, k, v):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        with torch.enable_grad():
            out = torch.nn.functional.scaled_dot_product_attention(self._4d(q), self._4d(k), self._4d(v), is_causal=True,
                                                                   scale=self.scale, enable_gqa=q.shape[1] != k.shape[1])
        flat = out.detach().transpose(1, 2).reshape(q.shape)  # a view when the kernel wrote (B, T, h, D)
        return flat, (out, q, k, v)

    def backward(self, do, q, k, v, o, state):
        out, q, k, v = state
        return torch.autograd.grad(out, (q, k, v), self._4d(do))


class MathAttention:
    """The same function in plain PyTorch, one sequence at a time (CPU, MPS, float32/float64): what the
    CPU tests run. Saves nothing extra: the softmax is recomputed in the backward."""

    def __init__(self, cu: torch.Tensor, max_len: int, scale: float):
        self.bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
        self.scale = scale

    def _probs(self, q, k):  # q (nh, n, D), k (nh, n, D) -> causal softmax (nh, n, n) in q's dtype
        n = q.shape[1]
        s = (q @ k.transpose(1, 2)).to(_acc(q.dtype)) * self.scale
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        return torch.softmax(s, -1).to(q.dtype)

    @staticmethod
    def _heads(t, s, e, rep):  # (N, h, D) slice -> (h * rep, n, D)
        return t[s:e].transpose(0, 1).repeat_interleave(rep, 0)

    def forward(self, q, k, v):
        out, rep = torch.empty_like(q), q.shape[1] // k.shape[1]
        for s, e in self.bounds:
            qs, ks, vs = q[s:e].transpose(0, 1), self._heads(k, s, e, rep), self._heads(v, s, e, rep)
            out[s:e] = (self._probs(qs, ks) @ vs).transpose(0, 1)
        return out, ()

    def backward(self, do, q, k, v, out, state):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        nkv, rep = k.shape[1], q.shape[1] // k.shape[1]
        for s, e in self.bounds:
            qs, ks, vs = q[s:e].transpose(0, 1), self._heads(k, s, e, rep), self._heads(v, s, e, rep)
            p, dos = self._probs(qs, ks), do[s:e].transpose(0, 1)
            dvs = p.transpose(1, 2) @ dos
            dp = dos @ vs.transpose(1, 2)
            ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * self.scale
            dq[s:e] = (ds @ ks).transpose(0, 1)
            n = e - s  # grouped heads: sum the gradients of the query heads that share a k/v head
            dk[s:e] = (ds.transpose(1, 2) @ qs).view(nkv, rep, n, -1).sum(1).transpose(0, 1)
            dv[s:e] = dvs.view(nkv, rep, n, -1).sum(1).transpose(0, 1)
        return dq, dk, dv


# ----------------------------------------------------------------------------- the decoder layer
@dataclass
class Layer:
    qkv: Group
    o: Group
    gate_up: Group
    down: Group
    w_in: torch.Tensor  # input_layernorm.weight
    w_post: torch.Tensor  # post_attention_layernorm.weight
    params: list[torch.nn.Parameter] = field(default_factory=list)  # this layer's LoRA A/B, in Member order


class LayerFn(torch.autograd.Function):
    """x (N, H) -> the decoder layer's output (N, H), for one layer with its LoRA parameters ``P``."""

    @staticmethod
    def forward(ctx, x, L: Layer, K: Kernels, rot, attn, *P):
        dt = x.dtype
        cos, sin = rot
        # attention block: x2 = x + o_proj(attn(rope(qkv(norm(x)))))
        y, xhat1, rstd1 = K.rms_fwd(x, L.w_in)
        qkv = y @ L.qkv.weight.t()  # (N, (nh + 2 nkv) D)
        a1 = lora_fwd(qkv, y, L.qkv, P, dt)
        del y
        q, k, v = K.rope_fwd(qkv, cos, sin)
        del qkv
        o, attn_state = attn.forward(q, k, v)  # (N, nh, D)
        o2 = o.view(o.shape[0], -1)
        x2 = torch.addmm(x, o2, L.o.weight.t())  # residual added in the matmul's epilogue
        a_o = lora_fwd(x2, o2, L.o, P, dt)
        # MLP block: x3 = x2 + down(silu(gate) * up), gate | up = gate_up(norm(x2))
        y, xhat2, rstd2 = K.rms_fwd(x2, L.w_post)
        gu = y @ L.gate_up.weight.t()  # (N, 2I)
        a2 = lora_fwd(gu, y, L.gate_up, P, dt)
        del y
        h = K.swiglu_fwd(gu)
        x3 = torch.addmm(x2, h, L.down.weight.t())
        a3 = lora_fwd(x3, h, L.down, P, dt)
        ctx.save_for_backward(xhat1, rstd1, a1, q, k, v, o, a_o, xhat2, rstd2, a2, gu, a3)
        ctx.layer, ctx.kernels, ctx.rot, ctx.attn, ctx.P = L, K, rot, attn, P
        ctx.attn_state = attn_state  # log-sum-exp etc. (SDPA: its own graph, which must keep its grad_fn)
        return x3

    @staticmethod
    def backward(ctx, d3):
        xhat1, rstd1, a1, q, k, v, o, a_o, xhat2, rstd2, a2, gu, a3 = ctx.saved_tensors
        attn_state = ctx.attn_state
        L, K, (cos, sin), attn, P = ctx.layer, ctx.kernels, ctx.rot, ctx.attn, ctx.P
        grads: list = [None] * len(P)
        d3 = d3.contiguous()
        # MLP block
        dh = d3 @ L.down.weight
        g = lora_bwd(d3, dh, a3, L.down, P, grads)
        dgu, h = K.swiglu_bwd_(dh, gu)  # h recomputed here: cheaper than keeping (N, I) a layer
        lora_grad_a(g, h, L.down, P, grads)
        del dh, h
        dy = dgu @ L.gate_up.weight
        lora_grad_a(lora_bwd(dgu, dy, a2, L.gate_up, P, grads), xhat2, L.gate_up, P, grads, col_scale=L.w_post)
        del dgu
        d2 = K.rms_bwd(dy, xhat2, rstd2, L.w_post, d3)  # + the residual's gradient
        del dy
        # attention block
        o2 = o.view(o.shape[0], -1)
        do = d2 @ L.o.weight
        lora_grad_a(lora_bwd(d2, do, a_o, L.o, P, grads), o2, L.o, P, grads)
        dq, dk, dv = attn.backward(do.view_as(o), q, k, v, o, attn_state)
        del do
        dqkv = K.rope_bwd(dq, dk, dv, cos, sin)
        del dq, dk, dv
        need_dx = ctx.needs_input_grad[0]  # False for the first layer (its input is an embedding)
        dy = dqkv @ L.qkv.weight if need_dx else None
        lora_grad_a(lora_bwd(dqkv, dy, a1, L.qkv, P, grads), xhat1, L.qkv, P, grads, col_scale=L.w_in)
        dx = K.rms_bwd(dy, xhat1, rstd1, L.w_in, d2) if need_dx else None
        return (dx, None, None, None, None, *grads)


class RMSNormFn(torch.autograd.Function):
    """The final norm, keeping xhat and rstd (not x and the float32 intermediates)."""

    @staticmethod
    def forward(ctx, x, w, K: Kernels):
        y, xhat, rstd = K.rms_fwd(x, w)
        ctx.save_for_backward(xhat, rstd, w)
        ctx.kernels = K
        return y

    @staticmethod
    def backward(ctx, dy):
        xhat, rstd, w = ctx.saved_tensors
        return ctx.kernels.rms_bwd(dy.contiguous(), xhat, rstd, w, None), None, None


# ----------------------------------------------------------------------------- the model
class FusedModel:
    """The decoder of a PEFT LoRA Llama model, run through LayerFn. Same parameters, same results."""

    def __init__(self, inner, layers: list[Layer], kernels: Kernels, scale: float, dense_attention: str = "sdpa"):
        self.inner, self.layers, self.kernels, self.scale = inner, layers, kernels, scale
        self.dense_attention = dense_attention  # rows without packing: "sdpa" (cuDNN/flash) or "flash" (varlen FA2)

    def hidden_states(self, ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, T) -> final hidden states (B, T, H). With position_ids (packed rows), a sequence
        starts wherever the position is 0; without them each row is one sequence."""
        B, T = ids.shape
        x = self.inner.embed_tokens(ids)
        dense = position_ids is None
        if dense:
            position_ids = torch.arange(T, device=ids.device).expand(B, T)
            lengths = torch.full((B,), T, dtype=torch.int64)
        else:
            starts = (position_ids.reshape(-1) == 0).nonzero().squeeze(1).cpu()
            lengths = torch.diff(starts, append=torch.tensor([B * T]))
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lengths, 0)
        cos, sin = self.inner.rotary_emb(x, position_ids)  # (B, T, D), rope scaling included
        rot = (cos.reshape(B * T, -1), sin.reshape(B * T, -1))
        half = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
        if half and dense and self.dense_attention == "sdpa":
            attn = SDPAttention(B, T, self.scale)
        else:
            attn = (FlashAttention if half else MathAttention)(cu.to(ids.device), int(lengths.max()), self.scale)
        x = x.reshape(B * T, -1)
        for L in self.layers:
            x = LayerFn.apply(x, L, self.kernels, rot, attn, *L.params)
        return RMSNormFn.apply(x, self.inner.norm.weight, self.kernels).view(B, T, -1)


def _lora_parts(module, adapter: str | None):
    """(base Linear, lora_A weight, lora_B weight, scale) of a PEFT lora.Linear, (module, None, None, 0)
    of a plain Linear; raises ValueError for anything this path cannot run exactly."""
    if type(module) is torch.nn.Linear:
        if module.bias is not None:
            raise ValueError("a projection has a bias")
        return module, None, None, 0.0
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError as e:  # pragma: no cover - peft is a dependency
        raise ValueError("peft is missing") from e
    if not isinstance(module, LoraLinear) or type(module.base_layer) is not torch.nn.Linear:
        raise ValueError(f"unsupported projection {type(module).__name__}")
    if module.merged or module.disable_adapters or list(module.active_adapters) != [adapter]:
        raise ValueError("the adapter is merged, disabled or not the only active one")
    if module.use_dora.get(adapter) or getattr(module, "lora_bias", {}).get(adapter) or module.base_layer.bias is not None:
        raise ValueError("DoRA or a LoRA bias")
    if not isinstance(module.lora_dropout[adapter], torch.nn.Identity):
        raise ValueError("LoRA dropout > 0 (the fused path computes dropout 0)")
    return module.base_layer, module.lora_A[adapter].weight, module.lora_B[adapter].weight, float(module.scaling[adapter])


def _group(modules: list, adapter: str | None, params: list) -> Group:
    """Concatenate the frozen weights of ``modules`` (their own weights become views of it) and
    register their LoRA parameters in ``params``."""
    parts = [_lora_parts(m, adapter) for m in modules]
    weight = torch.cat([base.weight.detach() for base, *_ in parts])
    members, row = [], 0
    for base, A, B, scale in parts:
        out = base.weight.shape[0]
        base.weight.data = weight[row : row + out]  # a view: the concatenation is the only copy
        m = Member((row, row + out))
        if A is not None:
            m.a, m.b, m.scale = len(params), len(params) + 1, scale
            params += [A, B]
        members.append(m)
        row += out
    return Group(weight, members)


def prepare(model, cuda: bool) -> tuple[FusedModel | None, str]:
    """The fused decoder of a PEFT-wrapped (or plain) causal LM, or None and why it does not apply."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        return None, f"model type {cfg.model_type!r}"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return None, "biases in attention or MLP"
    if getattr(cfg, "hidden_act", "silu") not in ("silu", "swish") or getattr(cfg, "sliding_window", None):
        return None, "not a SiLU MLP with full attention"
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return None, "pretraining_tp > 1"
    adapter = getattr(model, "active_adapter", None) if hasattr(model, "get_base_model") else None
    inner = base.model
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    layers = []
    try:
        for layer in inner.layers:
            at, mlp, params = layer.self_attn, layer.mlp, []
            qkv = _group([at.q_proj, at.k_proj, at.v_proj], adapter, params)
            o = _group([at.o_proj], adapter, params)
            gu = _group([mlp.gate_proj, mlp.up_proj], adapter, params)
            down = _group([mlp.down_proj], adapter, params)
            layers.append(Layer(qkv, o, gu, down, layer.input_layernorm.weight, layer.post_attention_layernorm.weight, params))
    except ValueError as e:
        return None, str(e)
    eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
    kernels = make_kernels(eps, nh, nkv, hd, cuda)
    return FusedModel(inner, layers, kernels, 1.0 / math.sqrt(hd)), "ok"
