"""The fast training path of the PyTorch backend (CUDA and CPU): same maths, less work.

What it changes, and why each pays (measured numbers: bench/README.md, "GPU training speed"):

* **Loss without the vocabulary logits.** The plain path builds (B, T, V) logits (V = 128k for
  Llama-3: 4 GiB in float32 for 8 x 1024 tokens) and their gradient. Here the loss is taken only
  at labelled positions (prompt and padding tokens never reach the LM head) and through a fused
  linear cross-entropy that works on 256 MiB of logits at a time and computes the gradient of
  the hidden states in the forward pass, so the logits never exist in full (``fused_ce.py``: a
  Triton kernel on CUDA, the same maths in PyTorch elsewhere). Nothing in a step waits for the
  GPU: labelled positions, counts and sequence lengths are worked out on the host when the batch
  is laid out (:func:`pack`), and the trainer reads the loss once, after launching the step.
* **Hand-written LoRA decoder layers** (``fused_lora.py``; Llama/Mistral-style models with LoRA
  dropout 0): one autograd Function per layer that keeps about half the activations autograd
  would, q|k|v and gate|up as single matmuls with the LoRA folded in, cuDNN / FlashAttention-2,
  Triton kernels for the pointwise work, no compilation. Measured on an H200 at 8 x 1024 tokens
  (bench/README.md): Llama-3.2-1B shapes 90-92k tokens/s at 9.4 GiB against 64-78k at 11.0 GiB for
  Unsloth in the same invocations, 3B 37.2-37.7k at 20.6 GiB against 33.3-33.9k at 24.4 GiB.
* **Otherwise** (other architectures, dropout > 0, ``fused_layers=False``): regional
  ``torch.compile`` of the Hugging Face + PEFT decoder layers (one graph reused by every layer,
  dynamic shapes so that chat batches of a new size do not recompile; a one-time compilation of
  60-90 s), or Liger's layer kernels (``liger_kernels``).
* **Packing.** Short chat records are packed first-fit-decreasing into rows, with position ids
  restarting at 0 for each record (on the fused layers: all records in one row, attended per
  record by variable-length attention). transformers builds a block-diagonal causal mask from
  the position ids (``attention_mask=None``), so no record attends across its neighbours and the
  loss is that of the padded batch, with no compute spent on padding.
* **A shared system prompt once** (CPU): the records of a character's batch all begin with the
  same system turn (about half their tokens); it is laid out once and every record attends to it
  (:func:`pack_shared`). The KL term's records join the step's batch (``guard.joint_batch``).
* **Fused AdamW** (one kernel for all LoRA tensors) over the trainable LoRA parameters only.

Gradient checkpointing stays off: LoRA on 1B/3B models at 8 x 1024 tokens needs 9 / 20 GiB here.
Set ``WONDERLAND_TORCH_FAST=0`` to force the plain path (for comparisons or debugging), ``=1``
to use it on any device, ``auto`` (default) uses it on CUDA and on the CPU (there the fused layers
run in plain PyTorch: 1.45x the plain path's tokens/s on the embedded model, as README.md says;
bench/README.md "CPU path", second pass), not on MPS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import torch

from wonderland.backends.torch_peft.batching import collate, shifted_nll_sum
from wonderland.chat_format import IGNORE, Encoded

ENV = "WONDERLAND_TORCH_FAST"
FAST_LOSS_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # plain lm_head, no logit scaling/softcap


@dataclass
class FastOptions:
    """Levers of the fast path. Defaults: the fastest combination measured (H200, bench/README.md)."""

    fused_layers: bool = True  # hand-written LoRA decoder layers (fused_lora.py): llama/mistral, dropout 0
    dense_attention: str = "sdpa"  # fused layers, unpacked rows: "sdpa" (cuDNN on Hopper), "sdpa_head_major", "flash" (FA2)
    liger_kernels: bool = False  # Liger RMSNorm/SwiGLU/RoPE (CUDA + liger-kernel installed)
    compile_layers: bool = True  # regional torch.compile of decoder layers (CUDA only)
    compile_dynamic: bool = True  # one graph for every batch shape (chat batches vary every step)
    fused_loss: bool = True  # loss at labelled positions only, without materialising logits (fused_ce.py)
    liger_loss: bool = False  # Liger's fused linear cross-entropy for that loss instead (CUDA, if installed)
    pack: bool = True  # pack short records into rows (position ids reset per record)
    pack_capacity: int = 0  # tokens per packed row (0 = the batch's longest record)
    fused_adamw: bool = True  # torch's fused AdamW (CUDA and CPU)
    applied: list[str] = field(default_factory=list)  # what prepare_model actually turned on
    fused_reason: str = ""  # why fused_layers did not apply (empty when it did or was not asked for)


def enabled(device: torch.device) -> bool:
    """Whether TorchBackend.train takes the fast path on ``device`` (see ``WONDERLAND_TORCH_FAST``)."""
    mode = os.environ.get(ENV, "auto").strip().lower()
    if mode in ("0", "false", "off", "no"):
        return False
    if mode in ("1", "true", "on", "yes"):
        return True
    return device.type in ("cuda", "cpu")  # MPS: not measured, so the plain path


def liger_available() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def _base(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def prepare_model(model, device: torch.device, opts: FastOptions | None = None) -> FastOptions:
    """Turn on the kernel levers of ``opts`` that this model and device support, in place."""
    opts = opts or FastOptions()
    base = _base(model)
    cuda = device.type == "cuda"
    if opts.fused_layers:
        from wonderland.backends.torch_peft.fast import fused_lora

        fused, why = fused_lora.prepare(model, cuda=cuda, dense_attention=opts.dense_attention)
        if fused is not None:
            base._wonderland_fused = fused  # summed_loss runs the decoder through it
            opts.applied.append("fused_layers")
        else:
            opts.fused_reason = why
    hf_layers = "fused_layers" not in opts.applied  # else the HF layers do not run in training: leave them be
    if hf_layers and cuda and opts.liger_kernels and base.config.model_type == "llama" and liger_available():
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        # Patches this instance's norms and MLPs (LoRA-wrapped projections still run inside them)
        # and transformers' llama RoPE function; the causal-LM forward is untouched (we never call it).
        apply_liger_kernel_to_llama(rope=True, swiglu=True, rms_norm=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False, model=base)
        opts.applied.append("liger_kernels")
    if hf_layers and cuda and opts.compile_layers:
        for layer in base.model.layers:
            # Same code in every layer: compiled once, reused. Static shapes recompile for every new
            # (rows, length) of a packed batch: measured 2.6k tokens/s on chat data vs 12.5k eager.
            layer.compile(dynamic=opts.compile_dynamic)
        opts.applied.append("compile_layers")
    if opts.fused_loss and fused_loss_supported(model):
        opts.applied.append("liger_loss" if cuda and opts.liger_loss and liger_available() else "fused_ce")
    if opts.pack:
        opts.applied.append("pack")
    if opts.fused_adamw:
        opts.applied.append("fused_adamw")
    return opts


def make_optimizer(params: Sequence[torch.nn.Parameter], lr: float, weight_decay: float, opts: FastOptions):
    fused = "fused_adamw" in opts.applied
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


# ----------------------------------------------------------------------------- fused loss
def linear_cross_entropy_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, use_liger: bool = False) -> torch.Tensor:
    """sum_i CE(h_i @ weight.T, targets_i) for (N, H) rows, without the (N, V) logits (fused_ce.py;
    ``use_liger``: Liger's kernel instead, which waits for the GPU twice a step)."""
    if use_liger:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(h, weight, targets, ignore_index=IGNORE, reduction="sum")
    from wonderland.backends.torch_peft.fast.fused_ce import linear_cross_entropy_sum as fused

    return fused(h, weight, targets)


def fused_loss_supported(model) -> bool:
    """The fused loss needs a plain ``lm_head`` Linear (no bias, no adapter) and unscaled logits."""
    base = _base(model)
    head = getattr(base, "lm_head", None)
    return (base.config.model_type in FAST_LOSS_MODEL_TYPES and type(head) is torch.nn.Linear
            and head.bias is None and not getattr(base.config, "final_logit_softcapping", None))


def summed_loss(model, ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, use_liger: bool = False,
                packed: "Packed | None" = None) -> tuple[torch.Tensor, int]:
    """Like ``batching.summed_loss`` (sum of next-token NLLs at labelled positions, and their
    count) but the LM head runs only on labelled positions and its logits are never stored.
    ``packed`` (from :func:`pack`) brings what the host already knows (labelled positions, their
    count, sequence lengths), so nothing here waits for the GPU."""
    base = _base(model)
    fused = getattr(base, "_wonderland_fused", None)
    if fused is not None:
        # right padding needs no mask under causal attention: real tokens never see later positions
        hidden = fused.hidden_states(ids, position_ids, lengths=packed.lengths if packed is not None else None,
                                     prefix=packed.prefix if packed is not None else 0)
    else:
        hidden = base.model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state
    if packed is not None:
        keep, targets, n = packed.keep, packed.targets, packed.n
    else:  # the labelled positions, found on the device (one wait for the GPU)
        shifted = labels[:, 1:].reshape(-1)
        keep = (shifted != IGNORE).nonzero().squeeze(1)
        targets, n = shifted.index_select(0, keep), int(keep.numel())
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, keep)
    return linear_cross_entropy_sum(h, base.lm_head.weight, targets, use_liger=use_liger), n


# ----------------------------------------------------------------------------- packing
@dataclass
class Packed:
    """One batch, laid out on the host and uploaded without waiting for the GPU."""

    input_ids: torch.Tensor  # (R, L)
    labels: torch.Tensor  # (R, L), IGNORE on padding and on each record's first token
    position_ids: torch.Tensor | None  # (R, L), restarting at 0 for each record (and for the padding tail);
    # None when every row is exactly one record (``dense``): attention then needs no segments
    tokens: int  # real (non-padding) tokens of the records (a shared prefix counted once per record)
    lengths: torch.Tensor  # CPU int64: the sequences over the flattened rows (records and padding tails)
    keep: torch.Tensor  # (n,) labelled positions among the R * (L - 1) shifted positions
    targets: torch.Tensor  # (n,) their labels
    n: int  # labelled tokens
    attention_mask: torch.Tensor | None = None  # (R, L), only for padded rows (packing off)
    prefix: int = 0  # tokens of a prefix every record shares, laid out once (:func:`pack_shared`)
    order: list[int] = field(default_factory=list)  # the records (indices into the batch) in layout order


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``; to CUDA through pinned memory, so the host does not wait."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing: record indices grouped into rows of at most ``capacity`` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def pack(batch: Sequence[Encoded], pad_id: int, device: torch.device, capacity: int | None = None, multiple: int = 8,
         dense: bool = False) -> Packed:
    """Pack records into rows of ``capacity`` tokens (default: the longest record, rounded up to
    ``multiple``), so attention costs at most what the padded batch's would and padding is gone.
    ``dense``: when every row is then exactly one record, give no position ids (plain causal rows).

    A record's first label is set to IGNORE: its target position is the previous record's last
    token, which must not predict across the boundary (chat records start with a prompt token
    that carries no label anyway, so the loss equals the padded batch's)."""
    lengths = [len(e.input_ids) for e in batch]
    cap = capacity or -(-max(lengths) // multiple) * multiple
    rows = pack_rows(lengths, cap)
    L = max(sum(lengths[i] for i in row) for row in rows)
    L = -(-L // multiple) * multiple
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), L), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), L), dtype=torch.long)
    segments: list[int] = []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = _lay(ids, labels, pos, r, at, batch[i])
            at += n
            segments.append(n)
        pos[r, at:] = torch.arange(L - at)  # the padding tail is a segment of its own
        if at < L:
            segments.append(L - at)
    one_per_row = dense and len(segments) == len(rows)
    return _upload(ids, labels, None if one_per_row else pos, sum(lengths), torch.tensor(segments, dtype=torch.int64), device,
                   order=[i for row in rows for i in row])


def _lay(ids: torch.Tensor, labels: torch.Tensor, pos: torch.Tensor, r: int, at: int, e: Encoded, start: int = 0) -> int:
    """Record ``e`` from its token ``start`` on into row ``r`` at column ``at``, at positions ``start,
    start + 1, ...``; its first token there gets no label (see :func:`pack`). Returns how many tokens."""
    n = len(e.input_ids) - start
    ids[r, at : at + n] = torch.tensor(e.input_ids[start:])
    labels[r, at + 1 : at + n] = torch.tensor(e.labels[start + 1 :])
    pos[r, at : at + n] = torch.arange(start, start + n)
    return n


MIN_SHARED_PREFIX = 8  # tokens: a shorter common prefix is not worth a sequence of its own


def shared_prefix(batch: Sequence[Encoded]) -> int:
    """How many leading tokens every record of ``batch`` has in common and takes no loss on (the chat
    template's system turn, the same in every record of a character's data): 0 below
    :data:`MIN_SHARED_PREFIX` or for a single record. Every record keeps at least one token of its
    own, and no record has a label at or before the prefix's end (the first label of a record's own
    part is predicted from the prefix's last token, which a packed layout does not place before it)."""
    if len(batch) < 2:
        return 0
    first, n = batch[0].input_ids, min(len(e.input_ids) for e in batch) - 1
    for e in batch:
        ids = e.input_ids
        n = next((i for i in range(n) if ids[i] != first[i]), n)
        n = min(n, next((i for i, t in enumerate(e.labels) if t != IGNORE), len(e.labels)) - 1)
    return n if n >= MIN_SHARED_PREFIX else 0


def pack_shared(batch: Sequence[Encoded], prefix: int, pad_id: int, device: torch.device, multiple: int = 8) -> Packed:
    """All records in one row, their common first ``prefix`` tokens (:func:`shared_prefix`) laid out
    once: ``[prefix | record 1's rest | record 2's rest | ... | padding]``, the rests longest first
    (as :func:`pack` orders records), each at positions ``prefix, prefix + 1, ...``. The fused
    layers' attention lets every rest attend to the prefix and to itself (``MathAttention(prefix=)``):
    the same activations, loss and gradients as the records laid out whole (the prefix's activations
    are the same in each record), with the prefix computed once instead of once per record."""
    rests = [len(e.input_ids) - prefix for e in batch]
    order = sorted(range(len(batch)), key=lambda i: -rests[i])
    L = -(-(prefix + sum(rests)) // multiple) * multiple
    ids = torch.full((1, L), pad_id, dtype=torch.long)
    labels = torch.full((1, L), IGNORE, dtype=torch.long)
    pos = torch.zeros((1, L), dtype=torch.long)
    ids[0, :prefix], pos[0, :prefix] = torch.tensor(batch[0].input_ids[:prefix]), torch.arange(prefix)
    at, segments = prefix, [prefix]
    for i in order:
        n = _lay(ids, labels, pos, 0, at, batch[i], start=prefix)
        at += n
        segments.append(n)
    if at < L:
        segments.append(L - at)  # the padding tail: a sequence of its own (it attends to the prefix; unused)
    tokens = sum(len(e.input_ids) for e in batch)
    return _upload(ids, labels, pos, tokens, torch.tensor(segments, dtype=torch.int64), device, order=order, prefix=prefix)


def padded(batch: Sequence[Encoded], pad_id: int, device: torch.device) -> Packed:
    """The unpacked layout: one record per row, right-padded to the longest, with an attention mask."""
    ids, labels, mask = collate(batch, pad_id, torch.device("cpu"))
    return _upload(ids, labels, None, int(mask.sum()), torch.full((len(batch),), ids.shape[1]), device,
                   order=list(range(len(batch))), mask=mask)


def _upload(ids, labels, pos, tokens: int, lengths: torch.Tensor, device: torch.device, order: list[int],
            mask=None, prefix: int = 0) -> Packed:
    """A batch laid out on the host (CPU tensors) -> Packed on ``device``, with its labelled
    positions and their count worked out here, on the host."""
    shifted = labels[:, 1:].reshape(-1)
    keep = (shifted != IGNORE).nonzero().squeeze(1)
    up = lambda t: None if t is None else to_device(t, device)  # noqa: E731
    return Packed(up(ids), up(labels), up(pos), tokens, lengths, up(keep), up(shifted[keep]), int(keep.numel()), up(mask),
                  prefix, order)


def prepare_batch(batch: Sequence[Encoded], pad_id: int, device: torch.device, opts: FastOptions) -> Packed:
    """One batch laid out on the host and sent to ``device`` (see :func:`pack`): the part of a step
    that the trainer does for the next step while the GPU still runs this one."""
    if "pack" not in opts.applied:
        return padded(batch, pad_id, device)
    lengths = [len(e.input_ids) for e in batch]
    layers = "fused_layers" in opts.applied
    # a common system prompt computed once (CPU, MPS: the plain attention; on CUDA FlashAttention
    # takes no shared keys, and the tokens are cheap there)
    prefix = shared_prefix(batch) if layers and device.type != "cuda" else 0
    if prefix:
        return pack_shared(batch, prefix, pad_id, device)
    if layers and len(set(lengths)) == 1:  # equal records: one per row, plain causal rows (cuDNN attention)
        return pack(batch, pad_id, device, capacity=lengths[0], multiple=1, dense=True)
    # the fused layers attend per record (variable-length attention): one row holds them all
    return pack(batch, pad_id, device, capacity=sum(lengths) if layers else max(opts.pack_capacity, max(lengths)))


def prepared_loss(model, p: Packed, opts: FastOptions) -> tuple[torch.Tensor, int, int]:
    """Summed loss, labelled-token count and real-token count of a prepared batch."""
    use_liger = "liger_loss" in opts.applied
    if use_liger or "fused_ce" in opts.applied:
        loss, n = summed_loss(model, p.input_ids, p.labels, p.attention_mask, p.position_ids, use_liger=use_liger, packed=p)
        return loss, n, p.tokens
    logits = model(input_ids=p.input_ids, attention_mask=p.attention_mask, position_ids=p.position_ids, use_cache=False).logits
    return shifted_nll_sum(logits, p.labels), p.n, p.tokens


def batch_loss(model, batch: Sequence[Encoded], pad_id: int, device: torch.device, opts: FastOptions) -> tuple[torch.Tensor, int, int]:
    """Summed loss, labelled-token count and real-token count of one batch on the fast path."""
    return prepared_loss(model, prepare_batch(batch, pad_id, device, opts), opts)
