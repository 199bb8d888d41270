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
autograd keeps.

Matmuls: the projections of one input are one *group* (q|k|v, o, gate|up, down) and each group is
one matmul with its LoRA folded in: the group's input x and its LoRA activations a = x (sA)^T sit
side by side in one buffer [x | a] (N, in + R), multiplied by [W | B] (out, in + R), B placed
block-diagonally per projection. So the base matmul also adds the LoRA term, and the residual for
o_proj and down_proj (in place), in one pass with one rounding. The backward does the same the
other way round: the output gradient dy and g = dy B sit side by side, and one matmul with
[W ; sA] (out + R, in) gives dx = dy W + g sA. The modules' frozen weights become views of the W
part: no extra memory, and PEFT's own forward (evaluation, sampling) is unchanged. The LoRA
weights themselves become views of one float32 master tensor, copied (scaled, in the compute
dtype) into the groups' buffers once per step in L + 1 launches; their gradients are computed in
float32 straight away. Attention: see fused_ops (cuDNN through SDPA for unpacked rows,
FlashAttention-2 variable-length for packed records). Pointwise work: one Triton kernel each on
CUDA (triton_kernels.py).

``--quantize nf4`` (QLoRA): the frozen projections are bitsandbytes NF4 ``Linear4bit`` layers. Their
4-bit weights stay as they are; every layer's groups are views of one arena *shared* by all layers,
which ``Layer.materialize`` fills right before the layer's forward and again before its backward
(the weights de-quantized by ``Kernels.dequant_nf4``, see nf4.py, then the step's LoRA weights). So
one layer's weights exist in the compute dtype at a time, and the rest of the path is unchanged.

Applies to ``llama``/``mistral``-style layers (no biases, SiLU MLP, no sliding window) whose LoRA
modules are plain PEFT ``lora.Linear`` with dropout 0; anything else keeps the PEFT modules
(``prepare`` returns the reason). Numerics: the same operations as transformers' Llama in the same
dtype, except that LoRA runs in the compute dtype (PEFT upcasts its input to float32); the CPU tests
check loss and every LoRA gradient against the plain PEFT model in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from wonderland.backends.torch_peft.fast import nf4
from wonderland.backends.torch_peft.fast.fused_ops import FlashAttention, Kernels, MathAttention, SDPAttention, _acc, make_kernels

SUPPORTED_MODEL_TYPES = ("llama", "mistral")


# ----------------------------------------------------------------------------- LoRA groups
@dataclass
class Member:
    """One projection of a group: its output rows, its LoRA (indices into the layer's params) and
    where its rank sits among the group's LoRA columns."""

    rows: tuple[int, int]
    a: int = -1  # index of lora_A.weight (r, in) in the layer's params, -1 = no LoRA
    b: int = -1  # index of lora_B.weight (out, r)
    scale: float = 1.0
    r: tuple[int, int] = (0, 0)


@dataclass
class Group:
    """Projections that share an input, with their LoRA folded into two matmuls. One buffer ``ext``
    (out + R, in + R) holds

        [ W       | B ]   out rows: frozen weights, block-diagonal B (each member's B in its rows
        [ scale A | 0 ]   R rows:   and rank columns), then scale * A of every member stacked

    so that the forward is y = [x | a] @ [W | B]^T with a = x (sA)^T, and the backward's input
    gradient is dx = [dy | g] @ [W ; sA] with g = dy B: the LoRA's dx term rides along in the
    frozen weights' matmul (K = out + R) instead of a separate read-modify-write of dx.
    ``sync_lora`` writes B and scale * A into ``ext`` every step, in the compute dtype."""

    ext: torch.Tensor  # (out + R, in + R), see above
    n_in: int
    n_out: int
    members: list[Member]
    da_scale: torch.Tensor | float = 1.0  # A's gradient factor per input column (norm weight x scale)

    @property
    def aug(self) -> torch.Tensor:  # (out, in + R): [W | B]
        return self.ext[: self.n_out]

    @property
    def weight(self) -> torch.Tensor:  # the frozen (out, in) part, a view
        return self.ext[: self.n_out, : self.n_in]

    @property
    def acat(self) -> torch.Tensor:  # (R, in): scale * A of each member, stacked
        return self.ext[self.n_out :, : self.n_in]

    @property
    def R(self) -> int:
        return self.ext.shape[1] - self.n_in

    @property
    def lora(self) -> list[Member]:
        return [m for m in self.members if m.a >= 0]

    def input_buffer(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """(n, in + R): the caller writes the group's input into [:, :in]."""
        return torch.empty((n, self.n_in + self.R), dtype=like.dtype, device=like.device)

    def grad_buffer(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """(n, out + R): the caller writes the group's output gradient dy into [:, :out]."""
        return torch.empty((n, self.n_out + self.R), dtype=like.dtype, device=like.device)

    def forward(self, xa: torch.Tensor, residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
                copy_rows=torch.Tensor.copy_):
        """xa holds x in [:, :in]. Returns x W^T + sum scale * (x A^T) B^T (added into ``residual``
        in place, or written into ``out``, when given), and a = x (scale A)^T (N, R), saved for B's
        gradient (None without LoRA). ``copy_rows(dst, src)``: Kernels.copy_rows."""
        a = None
        if self.R:
            a = xa[:, : self.n_in] @ self.acat.t()
            copy_rows(xa[:, self.n_in :], a)
        w = self.aug.t()
        if residual is not None:
            return residual.addmm_(xa, w), a
        return (xa @ w if out is None else torch.mm(xa, w, out=out)), a

    def backward(self, dyg, a, grads, need_dx: bool = True):
        """dyg (N, out + R) holds the output gradient dy in [:, :out]. Each member's B gradient
        dy_m^T a_m (out_m, r_m) goes into ``grads`` in float32 (no rounding to bf16, no cast),
        g = dy B into dyg[:, out:], and then dx = dyg @ [W ; sA] = dy W + g sA (None unless
        ``need_dx``). Returns (dx, g); g is None without LoRA."""
        dy, g = dyg[:, : self.n_out], None
        if self.R:
            for m in self.lora:
                grads[m.b] = _mm_acc(dy[:, m.rows[0] : m.rows[1]].t(), a[:, m.r[0] : m.r[1]])
            g = torch.mm(dy, self.aug[:, self.n_in :], out=dyg[:, self.n_out :])  # block-diagonal B
        return (dyg @ self.ext[:, : self.n_in] if need_dx else None), g

    def grad_a(self, g, x, grads):
        """The A gradients scale * g^T (x * norm weight) for the group's input x (the saved xhat for
        the norm-fed groups, whose norm weight is folded into ``da_scale``)."""
        if g is None:
            return
        da = _mm_acc(g.t(), x).mul_(self.da_scale)  # (R, in), float32
        for m in self.lora:
            grads[m.a] = da[m.r[0] : m.r[1]]


_MM_OUT_DTYPE = True  # torch.mm(..., out_dtype=) exists (CUDA, torch >= 2.8)


def _mm_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in the accumulation dtype (float32 for bf16 inputs): cuBLAS accumulates in float32
    anyway, so asking for a float32 result skips a rounding to bf16 and a cast kernel."""
    global _MM_OUT_DTYPE
    acc = _acc(a.dtype)
    if acc != a.dtype and a.is_cuda and _MM_OUT_DTYPE:
        try:
            return torch.mm(a, b, out_dtype=acc)
        except (TypeError, RuntimeError, NotImplementedError):  # an older torch
            _MM_OUT_DTYPE = False
    return (a @ b).to(acc)


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
    arena: torch.Tensor | None = None  # flat buffer holding every group's ext (views)
    index: torch.Tensor | None = None  # where each element of params (flattened, in order) goes in arena
    scales: torch.Tensor | None = None  # and its factor there (the LoRA scale for A, 1 for B)
    # --quantize nf4: the frozen weights stay 4-bit; (where in the arena, the NF4 weight) per projection.
    # The arena is then shared by every layer and filled before each layer's forward and backward.
    quant: list[tuple[torch.Tensor, nf4.NF4Weight]] = field(default_factory=list)
    lora_flat: torch.Tensor | None = None  # quantized layers: this layer's span of the step's scaled LoRA copy

    def materialize(self, K: Kernels) -> None:
        """A quantized layer's weights into its (shared) arena: the frozen weights de-quantized, then
        this step's LoRA weights (scale * A, B). Nothing for a layer that owns its arena."""
        if not self.quant:
            return
        for dst, w in self.quant:
            K.dequant_nf4(w, dst)
        if self.lora_flat is not None and self.index.numel():
            self.arena.index_copy_(0, self.index, self.lora_flat)


class LayerFn(torch.autograd.Function):
    """x (N, H) -> the decoder layer's output (N, H), for one layer with its LoRA parameters ``P``."""

    @staticmethod
    def forward(ctx, x, L: Layer, K: Kernels, rot, attn, *P):
        N = x.shape[0]
        L.materialize(K)
        cos, sin, T = rot  # (the LoRA weights P are used through their per-step copies in the groups)
        # attention block: x2 = x + o_proj(attn(rope(qkv(norm(x)))))
        xa = L.qkv.input_buffer(N, x)
        _, xhat1, rstd1 = K.rms_fwd(x, L.w_in, out=xa[:, : L.qkv.n_in])
        qkv, a1 = L.qkv.forward(xa, copy_rows=K.copy_rows)  # (N, (nh + 2 nkv) D)
        q, k, v = K.rope_fwd(qkv, cos, sin, T=T if attn.head_major else 0)
        del xa, qkv
        xa = L.o.input_buffer(N, x)
        _, attn_state = attn.forward(q, k, v, out=xa[:, : L.o.n_in])
        del q, k, v  # attention keeps them
        # the residual stream x is not needed after the norm: the two residual adds go into it in place
        x2, a_o = L.o.forward(xa, residual=x, copy_rows=K.copy_rows)
        # MLP block: x3 = x2 + down(silu(gate) * up), gate | up = gate_up(norm(x2))
        xa = L.gate_up.input_buffer(N, x)
        _, xhat2, rstd2 = K.rms_fwd(x2, L.w_post, out=xa[:, : L.gate_up.n_in])
        gu = L.gate_up.grad_buffer(N, x)  # (N, 2I + R): the backward writes d(gate | up) and g over it
        _, a2 = L.gate_up.forward(xa, out=gu[:, : L.gate_up.n_out], copy_rows=K.copy_rows)
        xa = L.down.input_buffer(N, x)
        K.swiglu_fwd(gu[:, : L.gate_up.n_out], out=xa[:, : L.down.n_in])
        x3, a3 = L.down.forward(xa, residual=x2, copy_rows=K.copy_rows)
        ctx.save_for_backward(xhat1, rstd1, a1, a_o, xhat2, rstd2, a2, gu, a3)
        ctx.mark_dirty(x)  # x3 is x, updated
        ctx.layer, ctx.kernels, ctx.rot, ctx.attn = L, K, rot, attn
        ctx.param_dtypes = [p.dtype for p in P]
        ctx.attn_state = attn_state  # q, k, v, out, log-sum-exp (SDPA: its own graph, kept whole)
        return x3

    @staticmethod
    def backward(ctx, d3):
        xhat1, rstd1, a1, a_o, xhat2, rstd2, a2, gu, a3 = ctx.saved_tensors
        L, K, (cos, sin, T), attn = ctx.layer, ctx.kernels, ctx.rot, ctx.attn
        L.materialize(K)  # nf4: other layers have used the shared arena since this one's forward
        attn_state, ctx.attn_state = ctx.attn_state, None  # ctx outlives the backward: let go
        grads: list = [None] * len(ctx.param_dtypes)
        # Each group's output gradient is written into a buffer with R spare columns, where its
        # backward puts g = dy B: see Group. d3 comes from autograd (which hands custom Functions
        # contiguous gradients): copied into such a buffer when down has a LoRA.
        N, H = d3.shape
        d3 = dyg = d3.contiguous()
        if L.down.R:
            dyg = L.down.grad_buffer(N, d3)
            d3 = K.copy_rows(dyg[:, :H], d3)
        # MLP block
        dh, g = L.down.backward(dyg, a3, grads)
        del dyg
        dgu, h = K.swiglu_bwd_(dh, gu[:, : L.gate_up.n_out])  # in place; h recomputed: cheaper than keeping it
        L.down.grad_a(g, h, grads)
        del dh, h, dgu
        dy, g = L.gate_up.backward(gu, a2, grads)  # gu now holds d(gate | up)
        L.gate_up.grad_a(g, xhat2, grads)
        del gu
        d2g = L.o.grad_buffer(dy.shape[0], dy)
        d2 = K.rms_bwd(dy, xhat2, rstd2, L.w_post, d3, out=d2g[:, : L.o.n_out])  # + the residual's gradient
        del dy
        # attention block
        do, g = L.o.backward(d2g, a_o, grads)
        L.o.grad_a(g, attn.output(attn_state), grads)
        dq, dk, dv = attn.backward(do, attn_state)
        del do, attn_state
        dqkv = L.qkv.grad_buffer(d2.shape[0], d2)
        K.rope_bwd(dq, dk, dv, cos, sin, T=T if attn.head_major else 0, out=dqkv[:, : L.qkv.n_out])
        del dq, dk, dv
        need_dx = ctx.needs_input_grad[0]  # False for the first layer (its input is an embedding)
        dy, g = L.qkv.backward(dqkv, a1, grads, need_dx)
        L.qkv.grad_a(g, xhat1, grads)
        dx = K.rms_bwd(dy, xhat1, rstd1, L.w_in, d2) if need_dx else None
        return (dx, None, None, None, None, *(g.to(t) for g, t in zip(grads, ctx.param_dtypes)))


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
        self.dense_attention = dense_attention  # unpacked rows: "sdpa" (cuDNN), "sdpa_head_major", "flash" (FA2)
        # Every LoRA weight becomes a view of one flat master tensor (layer by layer, in Member order),
        # so that the per-step copy in the compute dtype is one cast plus one scatter per layer.
        params = [p for L in layers for p in L.params]
        self.master = self._flat = self._scales = None
        self._spans: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
        if params:
            with torch.no_grad():
                self.master = torch.cat([p.detach().reshape(-1) for p in params])
            self._scales = torch.cat([L.scales for L in layers]).to(self.master.dtype)
            self._flat = torch.empty_like(self.master, dtype=layers[0].arena.dtype)
            at = 0
            for L in layers:
                lo = at
                for p in L.params:
                    p.data = self.master[at : at + p.numel()].view_as(p)
                    at += p.numel()
                if L.quant:  # its LoRA goes into the shared arena with its weights (Layer.materialize)
                    L.lora_flat = self._flat[lo:at]
                else:
                    self._spans.append((lo, at, L.arena, L.index))

    def sync_lora(self) -> None:
        """This step's LoRA weights into the groups' ``ext`` buffers, in the compute dtype: scale * A
        and B. One scaled cast of the master tensor and one ``index_copy_`` per layer: L + 1
        launches, not a few per LoRA weight."""
        if self.master is None:
            return
        with torch.no_grad():
            torch.mul(self.master, self._scales, out=self._flat)
            for lo, hi, arena, index in self._spans:
                if hi > lo:
                    arena.index_copy_(0, index, self._flat[lo:hi])

    def hidden_states(self, ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      lengths: torch.Tensor | None = None, prefix: int = 0) -> torch.Tensor:
        """ids (B, T) -> final hidden states (B, T, H). Without position_ids each row is one
        sequence. With them (packed rows) the sequences are ``lengths`` (a CPU int tensor, in
        order over the flattened rows, summing to B * T); if not given they are found on the
        device where the position is 0, which waits for the GPU (torch_fast.pack gives them).
        ``prefix`` > 0: the first sequence is a prefix every other one attends to (one row;
        ``training.pack_shared``; the plain-PyTorch attention only, i.e. not half precision on CUDA)."""
        B, T = ids.shape
        self.sync_lora()
        x = self.inner.embed_tokens(ids)
        dense = position_ids is None
        if dense:
            position_ids = torch.arange(T, device=ids.device).expand(B, T)
            lengths = torch.full((B,), T, dtype=torch.int64)
        elif lengths is None:
            starts = (position_ids.reshape(-1) == 0).nonzero().squeeze(1).cpu()
            lengths = torch.diff(starts, append=torch.tensor([B * T]))
        cos, sin = self.inner.rotary_emb(x, position_ids)  # (B, T, D), rope scaling included
        half = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
        if half and dense and self.dense_attention in ("sdpa", "sdpa_head_major"):
            attn = SDPAttention(B, T, self.scale, head_major=self.dense_attention == "sdpa_head_major",
                                copy_rows=self.kernels.copy_rows)
        else:
            cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, pin_memory=x.is_cuda)
            cu[1:] = torch.cumsum(lengths, 0)
            cu, longest = cu.to(ids.device, non_blocking=True), int(lengths.max())
            assert not (half and prefix), "a shared prefix needs the plain attention (see training.prepare_batch)"
            attn = (FlashAttention(cu, longest, self.scale, self.kernels.copy_rows) if half
                    else MathAttention(cu, longest, self.scale, prefix))
        rot = (cos.reshape(B * T, -1), sin.reshape(B * T, -1), T)
        x = x.reshape(B * T, -1)
        for L in self.layers:
            x = LayerFn.apply(x, L, self.kernels, rot, attn, *L.params)
        return RMSNormFn.apply(x, self.inner.norm.weight, self.kernels).view(B, T, -1)


def _frozen(module) -> bool:
    """Whether ``module`` is a frozen projection this path reads: a plain Linear or a bitsandbytes
    Linear4bit (``--quantize nf4``; nf4.from_bnb checks its format), without a bias."""
    if type(module) is not torch.nn.Linear and not nf4.is_bnb_4bit(module):
        return False
    if module.bias is not None:
        raise ValueError("a projection has a bias")
    return True


def _lora_parts(module, adapter: str | None):
    """(base Linear, lora_A weight, lora_B weight, scale) of a PEFT lora.Linear (or its bitsandbytes
    Linear4bit twin), (module, None, None, 0) of a frozen projection without LoRA; raises ValueError for
    anything this path cannot run exactly."""
    if _frozen(module):
        return module, None, None, 0.0
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError as e:  # pragma: no cover - peft is a dependency
        raise ValueError("peft is missing") from e
    peft_4bit = type(module).__name__ == "Linear4bit" and type(module).__module__ == "peft.tuners.lora.bnb"
    if not (isinstance(module, LoraLinear) or peft_4bit) or not _frozen(module.base_layer):
        raise ValueError(f"unsupported projection {type(module).__name__}")
    if module.merged or module.disable_adapters or list(module.active_adapters) != [adapter]:
        raise ValueError("the adapter is merged, disabled or not the only active one")
    if module.use_dora.get(adapter) or getattr(module, "lora_bias", {}).get(adapter) or module.base_layer.bias is not None:
        raise ValueError("DoRA or a LoRA bias")
    if not isinstance(module.lora_dropout[adapter], torch.nn.Identity):
        raise ValueError("LoRA dropout > 0 (the fused path computes dropout 0)")
    return module.base_layer, module.lora_A[adapter].weight, module.lora_B[adapter].weight, float(module.scaling[adapter])


_ALIGN = 64  # elements: every view of a layer's arena starts 128-byte aligned (bf16) for the matmuls


def _compute_dtype(base) -> torch.dtype:
    """The dtype a frozen projection computes in: its weight's, or a 4-bit weight's compute dtype."""
    if base.weight.is_floating_point():
        return base.weight.dtype
    return getattr(base, "compute_dtype", None) or base.weight.quant_state.dtype


def _place(ext: torch.Tensor, row: int, base, quant: list) -> int:
    """A frozen projection's weight into rows ``row``.. of its group's ``ext``: copied (the module's
    weight becomes a view, so the arena is the only copy), or, for an NF4 weight, recorded in
    ``quant`` for Layer.materialize. Returns its row count."""
    rows, n_in = base.out_features, base.in_features
    if nf4.is_bnb_4bit(base):
        quant.append((ext[row : row + rows, :n_in], nf4.from_bnb(base)))
    else:
        ext[row : row + rows, :n_in] = base.weight.detach()
        base.weight.data = ext[row : row + rows, :n_in]
    return rows


def _layer(layer, adapter: str | None, shared: dict) -> Layer:
    """One decoder layer's groups. The frozen weights go into the ``ext`` buffers (see Group) of one
    flat *arena* per layer (or, NF4 weights, of an arena ``shared`` by every layer, filled before each
    use: Layer.materialize); ``index`` maps every element of the layer's LoRA weights, flattened in
    order, to its place in the arena (A into the scale-A rows, B into the block-diagonal columns),
    ``scales`` is each element's factor (the LoRA scale for A, 1 for B)."""
    at, mlp = layer.self_attn, layer.mlp
    specs = [([at.q_proj, at.k_proj, at.v_proj], layer.input_layernorm.weight), ([at.o_proj], None),
             ([mlp.gate_proj, mlp.up_proj], layer.post_attention_layernorm.weight), ([mlp.down_proj], None)]
    parts = [[_lora_parts(m, adapter) for m in mods] for mods, _ in specs]
    first = parts[0][0][0]
    dtype, device = _compute_dtype(first), first.weight.device
    acc = _acc(dtype)
    shapes, total = [], 0  # per group: (offset, out, in, R)
    for ps in parts:
        n_in, R = ps[0][0].in_features, sum(A.shape[0] for _, A, _, _ in ps if A is not None)
        out = sum(base.out_features for base, *_ in ps)
        shapes.append((total, out, n_in, R))
        total += -(-((out + R) * (n_in + R)) // _ALIGN) * _ALIGN
    quantized, key = nf4.is_bnb_4bit(first), (total, dtype, device)
    arena = shared.get(key) if quantized else None
    if arena is None:  # zeros: the [sA | 0] block and B's off-diagonal blocks are never written
        arena = torch.zeros(total, dtype=dtype, device=device)
        if quantized:
            shared[key] = arena
    params, index, scales, groups, quant = [], [], [], [], []
    for ps, (_, norm_weight), (off, out, n_in, R) in zip(parts, specs, shapes):
        width = n_in + R
        ext = arena[off : off + (out + R) * width].view(out + R, width)
        members, row, r0 = [], 0, 0
        for base, A, B, scale in ps:
            rows = _place(ext, row, base, quant)
            m = Member((row, row + rows))
            if A is not None:
                r = A.shape[0]
                m.a, m.b, m.scale, m.r = len(params), len(params) + 1, scale, (r0, r0 + r)
                params += [A, B]
                a_at = off + (out + r0 + torch.arange(r))[:, None] * width + torch.arange(n_in)[None, :]
                b_at = off + (row + torch.arange(rows))[:, None] * width + n_in + r0 + torch.arange(r)[None, :]
                index += [a_at.reshape(-1), b_at.reshape(-1)]  # A (r, in) -> rows out+r0..; B (rows, r) -> cols in+r0..
                scales += [torch.full((r * n_in,), scale), torch.ones(rows * r)]
                r0 += r
            members.append(m)
            row += rows
        group = Group(ext, n_in, out, members)
        if R:
            col = torch.tensor([m.scale for m in group.lora for _ in range(m.r[1] - m.r[0])], dtype=acc, device=device)
            group.da_scale = col[:, None] * (norm_weight.detach().to(acc)[None, :] if norm_weight is not None else 1.0)
        groups.append(group)
    cat = (lambda ts, dt: torch.cat(ts).to(device, dt)) if index else (lambda ts, dt: torch.zeros(0, dtype=dt, device=device))
    return Layer(*groups, layer.input_layernorm.weight, layer.post_attention_layernorm.weight, params, arena,
                 cat(index, torch.int64), cat(scales, acc), quant)


def config_reason(cfg) -> str:
    """Why the fused layers cannot run a model of this config (a transformers config or the dict of a
    config.json), or "" when they can (the modules are checked by :func:`prepare`)."""
    get = cfg.get if isinstance(cfg, dict) else (lambda key, default=None: getattr(cfg, key, default))
    if get("model_type") not in SUPPORTED_MODEL_TYPES:
        return f"model type {get('model_type')!r}"
    if get("attention_bias", False) or get("mlp_bias", False):
        return "biases in attention or MLP"
    if get("hidden_act", "silu") not in ("silu", "swish") or get("sliding_window", None):
        return "not a SiLU MLP with full attention"
    if (get("pretraining_tp", 1) or 1) != 1:
        return "pretraining_tp > 1"
    return ""


def prepare(model, cuda: bool, dense_attention: str = "sdpa") -> tuple[FusedModel | None, str]:
    """The fused decoder of a PEFT-wrapped (or plain) causal LM, or None and why it does not apply.
    ``dense_attention``: see FusedModel."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    if why := config_reason(cfg):
        return None, why
    adapter = getattr(model, "active_adapter", None) if hasattr(model, "get_base_model") else None
    inner = base.model
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    lora, kinds = set(), set()
    try:
        for layer in inner.layers:  # check every module before changing any
            for module in (*(getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
                           *(getattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))):
                base, A, B, _ = _lora_parts(module, adapter)
                lora |= {id(A), id(B)} if A is not None else set()
                if nf4.is_bnb_4bit(base):
                    nf4.check(base)  # a ValueError unless it is NF4 that the kernel reads
                    kinds.add("nf4")
                else:
                    kinds.add(_compute_dtype(base))
    except ValueError as e:
        return None, str(e)
    if len(kinds) > 1:
        return None, "4-bit and float projections (or several dtypes) in one model"
    extra = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in lora]
    if extra:  # e.g. modules_to_save, trainable norms or embeddings: the fused backward would skip them
        return None, f"trainable parameters besides the decoder's LoRA ({extra[0]})"
    dtypes = {p.dtype for n, p in model.named_parameters() if id(p) in lora}
    if len(dtypes) > 1:
        return None, f"LoRA weights of several dtypes ({sorted(map(str, dtypes))})"
    shared: dict = {}  # NF4 layers' arena (one layer's weights in the compute dtype)
    layers = [_layer(layer, adapter, shared) for layer in inner.layers]
    eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
    return FusedModel(inner, layers, make_kernels(eps, nh, nkv, hd, cuda), 1.0 / math.sqrt(hd), dense_attention), "ok"
