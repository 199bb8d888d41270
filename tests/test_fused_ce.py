"""The fused linear cross-entropy (``wonderland.backends.torch_peft.fast.fused_ce``) equals ``F.cross_entropy``.

The CPU path (plain PyTorch, chunked) is checked in float64 to rounding; the Triton kernel, which
the CUDA path runs, through Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, see
conftest.py), on its own and inside the whole autograd Function.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from wonderland.backends.torch_peft.fast import fused_ce
from wonderland.backends.torch_peft.fast.fused_ce import FusedLinearCrossEntropy, default_chunk_rows, linear_cross_entropy_sum

IGNORE = -100
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Triton has no wheels for this platform")


def problem(dtype, N=37, H=24, V=50, seed=0):
    """h (N, H), weight (V, H), targets (N,) with scattered ignored rows and rows 16-31 all ignored."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t[[0, 5, 36]] = IGNORE
    t[16:32] = IGNORE  # with chunk_rows=16, the second chunk has no real target at all
    return h, w, t


def reference(h, w, t):
    """Loss and gradients of h and w through the plain, materialised logits."""
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = F.cross_entropy((h @ w.T).to(torch.promote_types(h.dtype, torch.float32)), t, ignore_index=IGNORE, reduction="sum")
    loss.backward()
    return loss.detach(), h.grad, w.grad


def fused(h, w, t, chunk_rows, scale=0.5, **kw):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = linear_cross_entropy_sum(h, w, t, chunk_rows=chunk_rows, **kw)
    (loss * scale).backward()  # the incoming gradient scales both
    return loss.detach(), h.grad / scale, w.grad / scale


def test_cpu_float64_matches_cross_entropy_with_ignored_rows_and_a_ragged_last_chunk():
    h, w, t = problem(torch.float64)
    want = reference(h, w, t)
    got = fused(h, w, t, chunk_rows=16)  # chunks of 16, 16 (all ignored), 5
    assert got[0].shape == () and got[0].dtype == torch.float64
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert (got[1][16:32] == 0).all() and (got[1][[0, 5, 36]] == 0).all()  # ignored rows get no gradient


def test_cpu_float32_frozen_weight_and_no_grad():
    h, w, t = problem(torch.float32)
    loss, gh, _ = reference(h, w, t)
    hh = h.clone().requires_grad_()
    got = linear_cross_entropy_sum(hh, w, t, chunk_rows=8)  # w frozen: no grad_w accumulated
    got.backward()
    assert got.dtype == torch.float32 and w.grad is None
    torch.testing.assert_close(got, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hh.grad, gh, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        nograd = linear_cross_entropy_sum(hh, w, t)
    assert not nograd.requires_grad
    torch.testing.assert_close(nograd, loss, rtol=1e-5, atol=1e-5)


def test_default_chunk_rows():
    assert default_chunk_rows(8192, 128256, torch.bfloat16) == 1024  # 256 MiB // (128256 x 2 B) = 1046
    assert default_chunk_rows(8192, 128256, torch.float32) == 512  # 523 -> 512
    assert default_chunk_rows(8192, 10**7, torch.float32) == 128  # at least 128 ...
    assert default_chunk_rows(37, 50, torch.float32) == 37  # ... and never more than N


# ----------------------------------------------------------------------------- Triton (interpreter)
def triton_interpreted():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest sets it for the session (see there)
    import triton

    kernel = fused_ce._kernel()
    assert os.environ["TRITON_INTERPRET"] == "1" and isinstance(kernel, triton.runtime.interpreter.InterpretedFunction), \
        "Triton was imported before TRITON_INTERPRET=1 was set: its kernels would need a GPU"


def row_reference(logits, t):
    """Per-row CE and d(CE_row)/d(logits) in float32, zero for ignored rows."""
    x = logits.float().requires_grad_()
    loss = F.cross_entropy(x, t, ignore_index=IGNORE, reduction="none")
    loss.sum().backward()
    return loss.detach(), x.grad


@linux_only
@pytest.mark.parametrize("V,block", [(1000, 256), (200, None), (77, 128)])  # 4 blocks, the last ragged; V < BLOCK
def test_triton_kernel_rows_in_place(V, block):
    triton_interpreted()
    g = torch.Generator().manual_seed(V)
    n = 6
    buf = torch.randn(n, V + 16, generator=g) * 4
    logits = buf[:, :V]  # a strided view: the kernel is given the row stride
    t = torch.randint(0, V, (n,), generator=g)
    t[[1, 4]] = IGNORE
    want_loss, want_grad = row_reference(logits, t)
    pad = buf[:, V:].clone()
    loss = torch.full((n,), float("nan"))
    fused_ce.ce_rows_(logits, t, loss, block=block)
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(logits, want_grad)
    assert (loss[[1, 4]] == 0).all() and (logits[[1, 4]] == 0).all()
    assert torch.equal(buf[:, V:], pad)  # the columns past V are left alone


@linux_only
def test_triton_kernel_bf16():
    triton_interpreted()
    g = torch.Generator().manual_seed(3)
    n, V = 4, 600
    logits = (torch.randn(n, V, generator=g) * 4).bfloat16()
    t = torch.tensor([3, IGNORE, 599, 0])
    want_loss, want_grad = row_reference(logits, t)
    loss = torch.empty(n)
    fused_ce.ce_rows_(logits, t, loss, block=256)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=1e-4)  # float32 maths on bf16 inputs
    torch.testing.assert_close(logits.float(), want_grad, rtol=2e-2, atol=2e-3)  # the gradient rounded to bf16
    assert (logits[1] == 0).all()


@linux_only
def test_triton_path_of_the_function_matches_cross_entropy():
    """The CUDA path (chunked matmuls around the kernel) on CPU tensors, the kernel interpreted."""
    triton_interpreted()
    h, w, t = problem(torch.float32)
    want = reference(h, w, t)
    got = fused(h, w, t, chunk_rows=16, use_triton=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the Function called directly, gradients not asked for
        loss = FusedLinearCrossEntropy.apply(h, w, t, 128, True, IGNORE, False)
    torch.testing.assert_close(loss, want[0], rtol=1e-5, atol=1e-5)
