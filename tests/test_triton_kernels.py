"""The Triton kernels of the fused LoRA layers compute their plain-PyTorch definitions.

CI has no GPU: Triton's interpreter (``TRITON_INTERPRET=1``) runs the same kernel code on the CPU,
program by program, so the index arithmetic, masks, layouts and in-place writes are checked here in
float32 against ``fused_ops``. Speed and bf16 rounding are the GPU's business:
``bench/train_throughput.py --check`` compares the compiled kernels there (bench/README.md).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not sys.platform.startswith("linux"):  # Triton ships wheels for Linux only; CI runs on Linux
    pytest.skip("Triton has no wheels for this platform", allow_module_level=True)
os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest sets it for the session (see there)

import triton  # noqa: E402,F401 - a test dependency on Linux (pyproject's test extra)

from wonderland.backends.torch_peft.fast import fused_ops, triton_kernels  # noqa: E402

assert os.environ["TRITON_INTERPRET"] == "1" and isinstance(triton_kernels._rms_fwd, triton.runtime.interpreter.InterpretedFunction), \
    "Triton was imported before TRITON_INTERPRET=1 was set: its kernels would need a GPU"


def rand(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float32)


@pytest.mark.parametrize("nh,nkv,hd", [(4, 2, 16), (3, 1, 8)])  # the second: head counts that need masks
def test_rope_both_layouts_and_its_transpose(nh, nkv, hd):
    g = torch.Generator().manual_seed(0)
    B, T = 2, 5
    N = B * T
    tk, ref = triton_kernels.TritonKernels(1e-5, nh, nkv, hd), fused_ops.Kernels(1e-5, nh, nkv, hd)
    qkv, ang = rand(g, N, (nh + 2 * nkv) * hd), rand(g, N, hd // 2)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    for layout in (0, T):  # token-major, head-major
        for got, want in zip(tk.rope_fwd(qkv, cos, sin, T=layout), ref.rope_fwd(qkv, cos, sin, T=layout)):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want)
        grads = [rand(g, *t.shape) for t in ref.rope_fwd(qkv, cos, sin, T=layout)]
        torch.testing.assert_close(tk.rope_bwd(*grads, cos, sin, T=layout), ref.rope_bwd(*grads, cos, sin, T=layout))


def test_rms_norm_forward_into_a_strided_buffer_and_backward():
    g = torch.Generator().manual_seed(1)
    N, H = 7, 48  # H not a power of two: the row block is masked
    tk, ref = triton_kernels.TritonKernels(1e-5, 4, 2, 16), fused_ops.Kernels(1e-5, 4, 2, 16)
    x, w = rand(g, N, H), rand(g, H)
    buf = torch.full((N, H + 8), float("nan"))
    y, xhat, rstd = tk.rms_fwd(x, w, out=buf[:, :H])
    want = ref.rms_fwd(x, w)
    for got, exp in zip((y, xhat, rstd), want):
        torch.testing.assert_close(got, exp)
    assert torch.isnan(buf[:, H:]).all()  # the LoRA columns of the buffer are left alone
    dy, dres = rand(g, N, H), rand(g, N, H)
    for res in (dres, None):
        torch.testing.assert_close(tk.rms_bwd(dy, xhat, rstd, w, res), ref.rms_bwd(dy, xhat, rstd, w, res))


def test_swiglu_forward_into_a_strided_buffer_and_backward_in_place():
    g = torch.Generator().manual_seed(2)
    N, inter, R = 5, 40, 3  # not a multiple of the kernel's column block
    tk = triton_kernels.TritonKernels(1e-5, 4, 2, 16)
    gu_buf, dh = rand(g, N, 2 * inter + R), rand(g, N, inter)  # gate | up with R spare columns, as the layers keep it
    gu = gu_buf[:, : 2 * inter]
    buf = torch.full((N, inter + 4), float("nan"))
    tk.swiglu_fwd(gu, out=buf[:, :inter])
    torch.testing.assert_close(buf[:, :inter], fused_ops.swiglu_fwd(gu))
    assert torch.isnan(buf[:, inter:]).all()
    want_dgu, want_h = fused_ops.Kernels.swiglu_bwd_(dh.clone(), gu.clone())
    spare = gu_buf[:, 2 * inter :].clone()
    dh2 = dh.clone()
    dgu, h = tk.swiglu_bwd_(dh2, gu)
    assert dgu.data_ptr() == gu_buf.data_ptr() and h.data_ptr() == dh2.data_ptr()  # in place: no new (N, 2I)
    torch.testing.assert_close(dgu, want_dgu)
    torch.testing.assert_close(h, want_h)
    torch.testing.assert_close(gu_buf[:, 2 * inter :], spare)  # the spare columns are left alone


def test_backward_kernels_write_into_views_of_wider_buffers():
    """The layers hand rms_bwd and rope_bwd a view of a buffer with the LoRA's spare columns."""
    g = torch.Generator().manual_seed(7)
    N, H, nh, nkv, hd, R = 6, 48, 4, 2, 16, 5
    tk, ref = triton_kernels.TritonKernels(1e-5, nh, nkv, hd), fused_ops.Kernels(1e-5, nh, nkv, hd)
    x, w, dy = rand(g, N, H), rand(g, H), rand(g, N, H)
    _, xhat, rstd = ref.rms_fwd(x, w)
    res_buf = rand(g, N, H + R)
    out_buf = torch.full((N, H + R), float("nan"))
    tk.rms_bwd(dy, xhat, rstd, w, res_buf[:, :H], out=out_buf[:, :H])
    torch.testing.assert_close(out_buf[:, :H], ref.rms_bwd(dy, xhat, rstd, w, res_buf[:, :H].clone()))
    assert torch.isnan(out_buf[:, H:]).all()
    ang = rand(g, N, hd // 2)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    dq, dk, dv = rand(g, N, nh, hd), rand(g, N, nkv, hd), rand(g, N, nkv, hd)
    width = (nh + 2 * nkv) * hd
    qkv_buf = torch.full((N, width + R), float("nan"))
    tk.rope_bwd(dq, dk, dv, cos, sin, out=qkv_buf[:, :width])
    torch.testing.assert_close(qkv_buf[:, :width], ref.rope_bwd(dq, dk, dv, cos, sin))
    assert torch.isnan(qkv_buf[:, width:]).all()


def test_copy_rows_between_row_strided_views():
    g = torch.Generator().manual_seed(8)
    src_buf, dst_buf = rand(g, 9, 70), torch.full((9, 75), float("nan"))
    tk = triton_kernels.TritonKernels(1e-5, 4, 2, 16)
    tk.copy_rows(dst_buf[:, :67], src_buf[:, 3:])  # 67 columns: not a multiple of the block
    torch.testing.assert_close(dst_buf[:, :67], src_buf[:, 3:])
    assert torch.isnan(dst_buf[:, 67:]).all()


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("rows,cols", [(30, 40), (3, 2100)])  # blocks straddling rows; rows of 2 column programs
def test_nf4_dequantization_into_a_row_strided_view(nested, rows, cols):
    """The NF4 kernel writes nf4.dequantize's values (bitsandbytes' layout, see nf4.py) into a view of
    a wider buffer: 64-element blocks that straddle rows, rows not a multiple of the kernel's block."""
    from wonderland.backends.torch_peft.fast import nf4

    g = torch.Generator().manual_seed(9)
    blocks = -(-rows * cols // 64)
    w = nf4.NF4Weight(torch.randint(0, 256, (rows * cols // 2,), generator=g, dtype=torch.uint8),
                      rand(g, blocks).abs(), torch.linspace(-1, 1, 16), (rows, cols))
    if nested:
        w.absmax = torch.randint(0, 256, (blocks,), generator=g, dtype=torch.uint8)
        w.nested_absmax, w.nested_code, w.nested_blocksize, w.offset = rand(g, -(-blocks // 16)).abs(), rand(g, 256), 16, 0.25
    buf = torch.full((rows, cols + 6), float("nan"))
    triton_kernels.TritonKernels.dequant_nf4(w, buf[:, :cols])
    torch.testing.assert_close(buf[:, :cols], nf4.dequantize(w, torch.empty(rows, cols)), rtol=0, atol=0)
    assert torch.isnan(buf[:, cols:]).all()
