"""Fused linear cross-entropy for the training fast path: no (N, V) logits, no host sync.

The LM head's logits are the largest tensor of a training step (N rows x V = 128256 columns:
2 GiB of bf16 for 8192 tokens), and the loss needs only one number per row from them. So the rows
go through in chunks: one (chunk, V) buffer receives ``h_chunk @ weight.T``, a Triton kernel turns
it *in place* into the gradient of the chunk's cross-entropy (softmax minus one-hot) and writes the
per-row losses, and the gradient is multiplied back at once (``grad_h = g @ weight``,
``grad_w += g.T @ h``). Backward then only scales those by the incoming gradient.

Liger's ``liger_fused_linear_cross_entropy`` does the same but calls ``.item()`` in its forward and
synchronises in its backward, which stalls the CPU that should be queueing the next kernels. Here
nothing reads a tensor value on the host: ignored targets (``ignore_index``) are handled inside the
kernel (loss 0, gradient row 0), the loss is one on-device sum, and chunk sizes depend on shapes only.

On CUDA the kernel is Triton (imported lazily, so CPU-only installs never need it); elsewhere
``_ce_rows_torch`` does the same maths in plain PyTorch. ``tests/test_fused_ce.py`` checks both
against ``torch.nn.functional.cross_entropy`` (the kernel through Triton's interpreter).
"""

from __future__ import annotations

import functools

import torch

IGNORE_INDEX = -100
CE_CHUNK_BYTES = 256 * 2**20  # one logits chunk: 256 MiB, e.g. 1024 rows x 128256 bf16 (see default_chunk_rows)
# Columns a program handles per step (capped at next_power_of_2(V)), with 16 warps. On an H200,
# 1024 bf16 rows of V = 128256 (3 passes, 788 MB): 0.217 ms, 3.6 TB/s; BLOCK 4096-32768 with 4-32
# warps all gave 0.21-0.24 ms. The chunk's logits matmul (H = 2048) takes 0.83 ms next to it.
CE_BLOCK = 16384


@functools.cache
def _have_triton() -> bool:
    """Triton comes with torch's CUDA wheels on Linux; elsewhere (e.g. Windows) the PyTorch maths runs."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel():
    """The Triton kernel, compiled on first use (Triton is a CUDA-only dependency)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _ce_rows(LOGITS, TARGETS, LOSS, stride, V, ignore_index, BLOCK: tl.constexpr):
        """One program per row of LOGITS (n, V; row stride ``stride`` elements): LOSS[row] (float32)
        = logsumexp(x) - x[target], then the row is overwritten with softmax(x) - onehot(target) in
        its own dtype. Three passes over the row (read, read, write): memory-bound, ~0.77 MB/row in bf16."""
        row = tl.program_id(0).to(tl.int64)
        base = LOGITS + row * stride
        target = tl.load(TARGETS + row)
        cols = tl.arange(0, BLOCK)
        if target == ignore_index:  # device-side branch: ignored rows are never read
            zero = tl.zeros((BLOCK,), dtype=tl.float32)
            for off in range(0, V, BLOCK):
                tl.store(base + off + cols, zero.to(LOGITS.dtype.element_ty), mask=off + cols < V)
            tl.store(LOSS + row, 0.0)
        else:
            # pass 1: online max m and sum d of exp(x - m), one block at a time (float32 scalars;
            # one exp per element: a per-lane running max would cost two and outrun the SFUs)
            m = float("-inf")
            d = 0.0
            for off in range(0, V, BLOCK):
                x = tl.load(base + off + cols, mask=off + cols < V, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, 0))  # finite from the first block on (off < V)
                d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
                m = m_new
            lse = m + tl.log(d)
            x_t = tl.load(base + target).to(tl.float32)
            tl.store(LOSS + row, lse - x_t)
            # pass 2: gradient, in place
            for off in range(0, V, BLOCK):
                c = off + cols
                x = tl.load(base + c, mask=c < V, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) - tl.where(c == target, 1.0, 0.0)
                tl.store(base + c, g.to(LOGITS.dtype.element_ty), mask=c < V)

    return _ce_rows


def ce_rows_(logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor, ignore_index: int = IGNORE_INDEX,
             block: int | None = None) -> None:
    """Triton: loss (n,) float32 <- per-row CE of logits (n, V); logits <- d(loss_row)/d(logits), in place.

    ``logits`` needs unit column stride (a row slice of the chunk buffer is fine); ``block`` is for
    tests (a small one makes the kernel loop over several column blocks)."""
    import triton

    n, V = logits.shape
    assert logits.stride(1) == 1 and targets.shape == (n,) and loss.shape == (n,) and loss.dtype == torch.float32
    if n == 0:
        return
    block = block or min(CE_BLOCK, triton.next_power_of_2(V))
    # 16 warps x 32 lanes = 512 threads for 16384 columns: 32 per thread, 4 16-byte loads of bf16
    num_warps = max(1, min(16, block // 1024))
    _kernel()[(n,)](logits, targets, loss, logits.stride(0), V, ignore_index, BLOCK=block, num_warps=num_warps)


def _ce_rows_torch(logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> None:
    """What ``ce_rows_`` computes, in plain PyTorch (CPU and other devices): softmax in float32
    (float64 stays float64), ignored rows masked to loss 0 and gradient 0, no host sync."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))  # (n, V)
    ignored = targets == ignore_index  # (n,)
    t = targets.masked_fill(ignored, 0)[:, None]  # (n, 1), a valid index for every row
    lse = torch.logsumexp(x, dim=1, keepdim=True)  # (n, 1)
    loss.copy_((lse - x.gather(1, t)).squeeze(1).masked_fill(ignored, 0.0))
    g = x.sub_(lse).exp_()  # softmax, in place (x may be logits itself: they are overwritten anyway)
    g.scatter_add_(1, t, torch.full_like(t, -1, dtype=g.dtype))  # - onehot(target)
    g.masked_fill_(ignored[:, None], 0.0)
    if g is not logits:
        logits.copy_(g)


def default_chunk_rows(n: int, vocab: int, dtype: torch.dtype) -> int:
    """Rows per logits chunk: CE_CHUNK_BYTES of ``dtype``, a multiple of 128, at least 128, at most n.
    V = 128256 in bf16: 268435456 // 256512 = 1046 -> 1024 rows (250.5 MiB)."""
    rows = CE_CHUNK_BYTES // (vocab * torch.empty((), dtype=dtype).element_size())
    return max(1, min(n, max(128, rows // 128 * 128)))


class FusedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ weight.T, targets_i), skipping rows whose target is ``ignore_index``.

    h (N, H) and weight (V, H) in one dtype; targets (N,) int64. The gradients are computed in the
    forward pass, chunk by chunk, so only one (chunk_rows, V) logits buffer ever exists; backward
    scales them by the incoming gradient. ``use_triton`` defaults to CUDA with Triton installed (tests pass True
    on CPU tensors to run the kernel in Triton's interpreter); ``need_grad=False`` (what
    ``linear_cross_entropy_sum`` passes under ``torch.no_grad()``) skips the gradient matmuls."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                use_triton: bool | None = None, ignore_index: int = IGNORE_INDEX, need_grad: bool = True):
        N, V = h.shape[0], weight.shape[0]
        use_triton = (h.is_cuda and _have_triton()) if use_triton is None else use_triton
        ce = ce_rows_ if use_triton else _ce_rows_torch
        acc = torch.promote_types(h.dtype, torch.float32)  # float32 (float64 for float64 inputs)
        # needs_input_grad is requires_grad, also under no_grad (forward itself always runs under it)
        need_h, need_w = (need_grad and ctx.needs_input_grad[0]), (need_grad and ctx.needs_input_grad[1])
        losses = torch.empty(N, dtype=torch.float32 if use_triton else acc, device=h.device)  # (N,)
        logits_buf = torch.empty(min(chunk_rows, N), V, dtype=h.dtype, device=h.device)  # reused by every chunk
        grad_h = torch.empty_like(h) if need_h else None  # (N, H), h's dtype
        grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None  # (V, H), accumulated
        for s in range(0, N, chunk_rows):
            e = min(s + chunk_rows, N)
            hc, g = h[s:e], logits_buf[: e - s]
            torch.mm(hc, weight.t(), out=g)  # (n, V) logits
            ce(g, targets[s:e], losses[s:e], ignore_index=ignore_index)  # g is now d(loss)/d(logits)
            if need_h:
                torch.mm(g, weight, out=grad_h[s:e])  # (n, H)
            if need_w:
                grad_w.addmm_(g.t().to(acc), hc.to(acc))  # (V, H) += (V, n) @ (n, H)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return losses.sum()  # 0-dim, on device

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None


def linear_cross_entropy_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             chunk_rows: int | None = None, use_triton: bool | None = None,
                             ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum over rows of CE(h @ weight.T, targets), rows with ``ignore_index`` targets adding 0.

    h (N, H), weight (V, H) (the LM head, usually frozen), targets (N,) int64. Returns a 0-dim
    float32 tensor (float64 for float64 inputs) without synchronising the host with the GPU."""
    chunk_rows = chunk_rows or default_chunk_rows(h.shape[0], weight.shape[0], h.dtype)
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return FusedLinearCrossEntropy.apply(h, weight, targets, chunk_rows, use_triton, ignore_index, need_grad)
