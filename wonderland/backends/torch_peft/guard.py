"""The retention guard on the torch backend: the ``--kl`` loss term and the checkpoint probe's scorer."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Sequence

import torch

from wonderland.backends.common import batch_indices
from wonderland.backends.torch_peft.batching import collate
from wonderland.backends.torch_peft.fast import training as torch_fast
from wonderland.chat_format import IGNORE, Encoded, encode_chat

PROBE_BATCH = 8  # records per forward pass when the probe scores a set


def adapter_off(model, off: bool):
    """PEFT's context that runs the pure base model (a no-op when ``off`` is False)."""
    return model.disable_adapter() if off else nullcontext()


TEACHER_CACHE_BYTES = 256 << 20  # keep the adapter-off log-probs of the KL records when they fit in this


def labelled_logits(model, ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Float32 logits at the ``keep`` positions (B, T-1), rows in (record, position) order: the LM
    head runs only on positions some record needs (``logits_to_keep``), not on every token."""
    pos = keep.any(0).nonzero().squeeze(1)  # (P,) positions where any record has a label
    return model(input_ids=ids, attention_mask=mask, logits_to_keep=pos).logits[keep[:, pos]].float()  # (N, V)


def fused_labelled_logits(model, batch: Sequence[Encoded], pad_id: int, device: torch.device, fast) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, V) float32, their targets (N,)) at the labelled positions of ``batch``, in the
    order :func:`labelled_logits` gives them, through the fast path's fused layers (adapter on):
    packed records, no padding, no PEFT upcasts (on 2 CPU cores ~2x faster than PEFT's modules).
    Packing lays records out longest first, so they go in in that order and come back re-ordered."""
    order = sorted(range(len(batch)), key=lambda i: -len(batch[i].input_ids))  # what packing does, stably
    p = torch_fast.prepare_batch([batch[i] for i in order], pad_id, device, fast)
    base = model.get_base_model()
    hidden = base._wonderland_fused.hidden_states(p.input_ids, p.position_ids, lengths=p.lengths, prefix=p.prefix)  # (R, L, H)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, p.keep)  # (N, H), packed order
    counts = [sum(x != IGNORE for x in batch[i].labels[1:]) for i in order]
    back = dict(zip(order, range(len(order))))
    logits, targets = base.lm_head(h).float().split(counts), p.targets.split(counts)
    return (torch.cat([logits[back[i]] for i in range(len(batch))]),
            torch.cat([targets[back[i]] for i in range(len(batch))]))


def uses_fused(fast) -> bool:
    """Whether the fast path's fused layers run this model (``fast``: its FastOptions, or None)."""
    return fast is not None and "fused_layers" in fast.applied


def student_logits(model, batch: Sequence[Encoded], pad_id: int, device: torch.device, fast=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, V) float32, targets (N,)) of the adapted model at the labelled positions of
    ``batch``, rows in (record, position) order: the fused layers when they run the model, else PEFT's."""
    if uses_fused(fast):
        return fused_labelled_logits(model, batch, pad_id, device, fast)
    ids, labels, mask = collate(batch, pad_id, device)
    keep = labels[:, 1:] != IGNORE
    if not keep.any():
        return torch.zeros((0, model.get_output_embeddings().weight.shape[0]), device=device), labels[:, 1:][keep]
    return labelled_logits(model, ids, mask, keep), labels[:, 1:][keep]


def summed_nll(model, batch: Sequence[Encoded], pad_id: int, device: torch.device, fast=None) -> tuple[torch.Tensor, int]:
    """(summed NLL of the labelled next tokens of ``batch``, their count) of the model as it is (adapter
    on, unless the caller turned it off): the fused layers and loss when they run the model (packed, no
    padding; callers pass ``fast`` only with the adapter on), else PEFT's modules (:func:`labelled_nll`)."""
    if uses_fused(fast):
        loss, n, _ = torch_fast.batch_loss(model, batch, pad_id, device, fast)
        return loss, n
    return labelled_nll(model, *collate(batch, pad_id, device))


def labelled_nll(model, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """What :func:`~wonderland.backends.torch_peft.batching.summed_loss` gives (summed NLL of the
    labelled next tokens, their count) with the LM head run only where some record has a label
    (:func:`labelled_logits`): scoring needs no logits of the prompts, and on a large vocabulary
    they are most of the work."""
    keep = labels[:, 1:] != IGNORE
    n = int(keep.sum())
    if not n:
        return torch.zeros((), device=ids.device), 0
    logits = labelled_logits(model, ids, mask, keep)
    return torch.nn.functional.cross_entropy(logits, labels[:, 1:][keep], reduction="sum"), n


class Teacher:
    """The adapter-off model's next-token log-probs on the KL records. They never change during a
    run, so each record's are computed once and kept when the whole set fits in
    :data:`TEACHER_CACHE_BYTES` (else recomputed every step, as the arithmetic is the same)."""

    def __init__(self, model, records: Sequence[Encoded]) -> None:
        labelled = sum(sum(x != IGNORE for x in e.labels[1:]) for e in records)
        vocab = model.get_output_embeddings().weight.shape[0]
        self.model, self.keep_cache = model, labelled * vocab * 4 <= TEACHER_CACHE_BYTES
        self.cache: dict[int, torch.Tensor] = {}

    def logprobs(self, idx: Sequence[int], ids, mask, keep) -> torch.Tensor:
        """(N, V) log-probs for the batch of records ``idx`` (collated as ``ids``/``mask``/``keep``)."""
        if not all(i in self.cache for i in idx):
            with torch.no_grad(), self.model.disable_adapter():
                ref = torch.log_softmax(labelled_logits(self.model, ids, mask, keep), -1)
            if not self.keep_cache:
                return ref
            self.cache.update(zip(idx, ref.split(keep.sum(1).tolist())))
        return torch.cat([self.cache[i] for i in idx])


def kl_sum(model, batch: Sequence[Encoded], pad_id: int, device: torch.device, teacher: Teacher | None = None,
           idx: Sequence[int] | None = None, fast=None) -> tuple[torch.Tensor, int]:
    """Summed KL(base || adapted) of the next-token distributions at the labelled positions of
    ``batch`` (the base = the same model with the adapter off, no gradient; from ``teacher``'s
    cache when given, ``idx`` naming the records), and their count. The adapted side runs through
    the fused layers when ``fast`` says they run the model (:func:`student_logits`)."""
    ids, labels, mask = collate(batch, pad_id, device)
    keep = labels[:, 1:] != IGNORE  # (B, T-1): the answer tokens
    teacher = teacher or Teacher(model, [])
    ref = teacher.logprobs(list(idx) if idx is not None else [-1 - i for i in range(len(batch))], ids, mask, keep)
    logp = torch.log_softmax(student_logits(model, batch, pad_id, device, fast)[0], -1)
    return torch.nn.functional.kl_div(logp, ref, log_target=True, reduction="sum"), int(keep.sum())


def with_kl(loss: Callable, model, replay_set: list[Encoded], weight: float, batch_size: int, seed: int,
            pad_id: int, device: torch.device, start: int = 0, fast=None) -> Callable:
    """``loss`` plus ``weight`` x the mean KL per replay token of one replay batch per step. The
    trainer divides the returned sum by the step's target tokens, so the KL sum is scaled by
    n / n_kl to stay a per-token mean; the reported step loss includes it."""
    step = [start]  # the KL batch follows the step, as the data order does (a resume continues it)
    teacher = Teacher(model, replay_set)

    def combined(batch):
        loss_sum, n, tokens = loss(batch)
        idx = batch_indices(step[0], len(replay_set), min(batch_size, len(replay_set)), seed + 1)
        step[0] += 1
        kl, n_kl = kl_sum(model, [replay_set[i] for i in idx], pad_id, device, teacher, idx, fast)
        return loss_sum + weight * kl * (max(n, 1) / max(n_kl, 1)), n, tokens
    return combined


def scorer(model, tokenizer, max_seq_len: int, device: torch.device, fast=None) -> Callable:
    """``nll(records, adapter) -> (summed NLL, tokens)`` over the assistant tokens, in batches, no
    gradient; encodings are cached per record list (the probe sets are fixed for a run). With the
    adapter on, through the fused layers when they run the model (``fast``, :func:`summed_nll`)."""
    cache: dict[int, list[Encoded]] = {}
    pad = tokenizer.pad_token_id

    def nll(records: Sequence[dict], adapter: bool) -> tuple[float, int]:
        if id(records) not in cache:
            cache[id(records)] = [encode_chat(tokenizer, r["messages"], max_seq_len) for r in records]
        encs = cache[id(records)]
        total, count = 0.0, 0
        was_training = model.training
        model.eval()
        with torch.no_grad(), adapter_off(model, not adapter):
            for i in range(0, len(encs), PROBE_BATCH):
                loss, n = summed_nll(model, encs[i : i + PROBE_BATCH], pad, device, fast if adapter else None)
                total, count = total + float(loss), count + n
        model.train(was_training)
        return total, count
    return nll
