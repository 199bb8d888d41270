"""Micro-benchmarks of the pieces of one fused LoRA decoder layer (Llama-3.2-1B shapes, 8 x 1024
tokens, bf16) on the GPU: which attention kernel, and how LoRA's extra matmuls are best laid out.
Prints one JSON line per variant (median ms over 20 runs, peak extra MiB); errors are reported,
not raised, so one unsupported variant does not hide the others.

    python3 bench/layer_probe.py
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench

B, T, NH, NKV, D, H, I, R = 8, 1024, 32, 8, 64, 2048, 8192, 16
N = B * T
dev, dt = "cuda", torch.bfloat16
g = torch.Generator(device=dev).manual_seed(0)


def rnd(*shape, scale=1.0):
    return (torch.randn(*shape, generator=g, device=dev, dtype=torch.float32) * scale).to(dt)


def report(name, fn, **extra):
    try:
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        print(json.dumps({"variant": name, "ms": round(ms, 3), "peak_extra_mib": round(peak), **extra}), flush=True)
    except Exception as e:  # noqa: BLE001 - a probe: report and go on
        print(json.dumps({"variant": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}), flush=True)


# ---------------------------------------------------------------- attention, forward + backward
q_tok, k_tok, v_tok = rnd(N, NH, D), rnd(N, NKV, D), rnd(N, NKV, D)
do_tok = rnd(N, NH, D)
cu = torch.arange(0, N + 1, T, device=dev, dtype=torch.int32)


def fa2_varlen():
    out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(q_tok, k_tok, v_tok, cu, cu, T, T, 0.0, True, False, scale=D ** -0.5)
    torch.ops.aten._flash_attention_backward(do_tok, q_tok, k_tok, v_tok, out, lse, cu, cu, T, T, 0.0, True, rng, unused, scale=D ** -0.5)


report("attn fa2 varlen token-major", fa2_varlen)


def sdpa(q, k, v, do, **kw):
    def run():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, **kw)
        torch.autograd.grad(out, (qq, kk, vv), do)
    return run


from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

hm = lambda t, h: t.view(B, T, h, D).transpose(1, 2).contiguous()  # noqa: E731 - head-major copies
qh, kh, vh, doh = hm(q_tok, NH), hm(k_tok, NKV), hm(v_tok, NKV), hm(do_tok, NH)
qt, kt, vt, dot = (t.view(B, T, -1, D).transpose(1, 2) for t in (q_tok, k_tok, v_tok, do_tok))  # token-major views
for layout, (q, k, v, do) in {"head-major": (qh, kh, vh, doh), "token-major": (qt, kt, vt, dot)}.items():
    for backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION", None):
        def run(q=q, k=k, v=v, do=do, backend=backend):
            ctx = sdpa_kernel([getattr(SDPBackend, backend)]) if backend else sdpa_kernel(list(SDPBackend))
            with ctx:
                sdpa(q, k, v, do, enable_gqa=True)()
        report(f"attn sdpa gqa {backend or 'auto'} {layout}", run)
    ke = kh.repeat_interleave(NH // NKV, 1)
    ve = vh.repeat_interleave(NH // NKV, 1)
with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
    report("attn sdpa cudnn expanded-kv head-major", sdpa(qh, ke, ve, doh))
try:
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(qh, kh, vh, None, True, 0.0, True, False, scale=D ** -0.5)
    print(json.dumps({"variant": "cudnn op gqa forward", "out_shape": list(out[0].shape), "out_stride": list(out[0].stride())}))
except Exception as e:  # noqa: BLE001
    print(json.dumps({"variant": "cudnn op gqa forward", "error": str(e)[:300]}))

# ---------------------------------------------------------------- LoRA on gate|up (N x 2048 -> N x 16384)
x, W = rnd(N, H), rnd(2 * I, H, scale=0.02)
A, Bm = rnd(2 * R, H, scale=0.02), rnd(2 * I, R, scale=0.02)


def lora_separate():  # what fused_lora does: base matmul, A matmul, in-place B addmm per member
    y = x @ W.t()
    a = x @ A.t()
    y[:, :I].addmm_(a[:, :R], Bm[:I].t(), alpha=2.0)
    y[:, I:].addmm_(a[:, R:], Bm[I:].t(), alpha=2.0)
    return y


Waug = torch.zeros(2 * I, H + 2 * R, device=dev, dtype=dt)
Waug[:, :H] = W
Waug[:I, H : H + R] = Bm[:I] * 2
Waug[I:, H + R :] = Bm[I:] * 2
Xaug = torch.empty(N, H + 2 * R, device=dev, dtype=dt)


def lora_kaug():  # x and x A^T side by side, one matmul against [W | block-diagonal s B]
    Xaug[:, :H] = x  # (the RMSNorm kernel would write it there directly)
    torch.mm(x, A.t(), out=Xaug[:, H:])
    return Xaug @ Waug.t()


report("lora fwd gate_up base matmul only", lambda: x @ W.t())
report("lora fwd gate_up separate (A mm + 2 addmm_)", lora_separate)
report("lora fwd gate_up K-augmented", lora_kaug)
torch.testing.assert_close(lora_kaug(), lora_separate(), rtol=2e-2, atol=2e-2)

dy = rnd(N, 2 * I)
a = x @ A.t()


def bwd_separate():  # dx = dy W + s (dy_m B_m) A_m ; dB_m = s dy_m^T a_m ; dA = g^T x
    dx = dy @ W
    gs = [dy[:, :I] @ Bm[:I], dy[:, I:] @ Bm[I:]]
    dB = [dy[:, :I].t() @ a[:, :R], dy[:, I:].t() @ a[:, R:]]
    gg = torch.cat(gs, 1)
    dx.addmm_(gg, A)
    dA = gg.t() @ x
    return dx, dB, dA


def bwd_naug():  # [dx | g] = dy [W | s B_blk] in one matmul
    out = dy @ Waug
    dx, gg = out[:, :H], out[:, H:]
    dB = [dy[:, :I].t() @ a[:, :R], dy[:, I:].t() @ a[:, R:]]
    dx.addmm_(gg, A)
    dA = gg.t() @ x
    return dx, dB, dA


report("lora bwd gate_up input matmul only", lambda: dy @ W)
report("lora bwd gate_up separate", bwd_separate)
report("lora bwd gate_up N-augmented", bwd_naug)
report("lora bwd dB one member (dy^T a, splitK shape)", lambda: dy[:, :I].t() @ a[:, :R])
report("lora bwd dB via a^T dy (transposed)", lambda: a[:, :R].t() @ dy[:, :I])
report("lora bwd g one member (dy B)", lambda: dy[:, :I] @ Bm[:I])
report("lora bwd dA (g^T x)", lambda: a.t() @ x)


# ---------------------------------------------------------------- fused cross-entropy: rows per chunk
def ce_chunks():
    """wonderland.backends.torch_peft.fast.fused_ce forward + backward over 8184 rows of V = 128256 (the frozen LM
    head), for the 1B and 3B hidden sizes and a few chunk sizes (the default: 256 MiB of logits)."""
    from wonderland.backends.torch_peft.fast.fused_ce import FusedLinearCrossEntropy, default_chunk_rows

    V, rows = 128256, N - B
    for hidden in (2048, 3072):
        h = rnd(rows, hidden).requires_grad_()
        w = rnd(V, hidden, scale=0.02)
        t = torch.randint(0, V, (rows,), generator=g, device=dev)
        default = default_chunk_rows(rows, V, dt)
        for chunk in (512, 1024, 2048, 4096):
            report(f"fused CE fwd+bwd H={hidden} chunk={chunk}",
                   lambda: FusedLinearCrossEntropy.apply(h, w, t, chunk).backward(), default=chunk == default)


ce_chunks()
