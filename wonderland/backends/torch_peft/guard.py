"""The retention guard on the torch backend: the ``--kl`` loss term and the checkpoint probe's scorer."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from wonderland.backends.common import batch_indices
from wonderland.backends.torch_peft.batching import collate
from wonderland.backends.torch_peft.fast import training as torch_fast
from wonderland.chat_format import IGNORE, Encoded, encode_chat

PROBE_BATCH = 32  # records per forward pass when the probe scores a set (its sets are 9-20 records: one pass
# each, and on the CPU fast path one pass lays their shared system prompt out once)


def adapter_off(model, off: bool):
    """PEFT's context that runs the pure base model (a no-op when ``off`` is False)."""
    return model.disable_adapter() if off else nullcontext()


TEACHER_CACHE_BYTES = 256 << 20  # keep the adapter-off log-probs of the KL records when they fit in this


def labelled_logits(model, ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Float32 logits at the ``keep`` positions (B, T-1), rows in (record, position) order: the LM
    head runs only on positions some record needs (``logits_to_keep``), not on every token."""
    pos = keep.any(0).nonzero().squeeze(1)  # (P,) positions where any record has a label
    return model(input_ids=ids, attention_mask=mask, logits_to_keep=pos).logits[keep[:, pos]].float()  # (N, V)


def labelled_rows(p, batch: Sequence[Encoded]) -> list[torch.Tensor]:
    """For each record of ``batch`` (in batch order), which rows of ``p.keep`` / ``p.targets`` are its
    labelled positions (``p``: the batch packed by ``torch_fast.prepare_batch``, whose layout order is
    ``p.order``). Counted as packing counts them: a record's first token never has a label."""
    counts = [sum(x != IGNORE for x in e.labels[1:]) for e in batch]
    rows, at = [None] * len(batch), 0
    for i in p.order:
        rows[i] = torch.arange(at, at + counts[i])
        at += counts[i]
    return rows


def fused_hidden(model, p) -> torch.Tensor:
    """(n, H) final hidden states at the labelled positions of the packed batch ``p`` (layout order),
    through the fast path's fused layers (adapter on)."""
    hidden = model.get_base_model()._wonderland_fused.hidden_states(p.input_ids, p.position_ids, lengths=p.lengths,
                                                                     prefix=p.prefix)  # (R, L, H)
    return hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, p.keep)


def fused_labelled_logits(model, batch: Sequence[Encoded], pad_id: int, device: torch.device, fast) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, V) float32, their targets (N,)) at the labelled positions of ``batch``, in the
    order :func:`labelled_logits` gives them, through the fast path's fused layers (adapter on):
    packed records, no padding, no PEFT upcasts (on 2 CPU cores ~2x faster than PEFT's modules)."""
    p = torch_fast.prepare_batch(batch, pad_id, device, fast)
    rows = torch.cat(labelled_rows(p, batch)).to(device)
    return model.get_base_model().lm_head(fused_hidden(model, p)[rows]).float(), p.targets[rows]


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

    def logprobs(self, idx: Sequence[int], batch: Sequence[Encoded], pad_id: int, device: torch.device) -> torch.Tensor:
        """(N, V) log-probs at the labelled positions of the records ``batch`` (named ``idx``), in
        (record, position) order."""
        if not all(i in self.cache for i in idx):
            ids, labels, mask = collate(batch, pad_id, device)
            keep = labels[:, 1:] != IGNORE
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
    teacher = teacher or Teacher(model, [])
    ref = teacher.logprobs(list(idx) if idx is not None else [-1 - i for i in range(len(batch))], batch, pad_id, device)
    logp = torch.log_softmax(student_logits(model, batch, pad_id, device, fast)[0], -1)
    return torch.nn.functional.kl_div(logp, ref, log_target=True, reduction="sum"), int(ref.shape[0])


def kl_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """The replay records of step ``step``'s KL term (0-based; it follows the step, as the data order
    does, so a resume continues it)."""
    return batch_indices(step, n, min(batch_size, n), seed + 1)


def with_kl(loss: Callable, model, replay_set: list[Encoded], weight: float, batch_size: int, seed: int,
            pad_id: int, device: torch.device, start: int = 0, fast=None) -> Callable:
    """``loss`` plus ``weight`` x the mean KL per replay token of one replay batch per step. The
    trainer divides the returned sum by the step's target tokens, so the KL sum is scaled by
    n / n_kl to stay a per-token mean; the reported step loss includes it."""
    step = [start]
    teacher = Teacher(model, replay_set)

    def combined(batch):
        loss_sum, n, tokens = loss(batch)
        idx = kl_indices(step[0], len(replay_set), batch_size, seed)
        step[0] += 1
        kl, n_kl = kl_sum(model, [replay_set[i] for i in idx], pad_id, device, teacher, idx, fast)
        return loss_sum + weight * kl * (max(n, 1) / max(n_kl, 1)), n, tokens
    return combined


# --- the fused layers: a step's records and its KL records in one forward pass
def joint_ok(fast) -> bool:
    """Whether a step's loss and KL term can share one pass: the fused layers and the fused loss."""
    return uses_fused(fast) and bool({"fused_ce", "liger_loss"} & set(fast.applied))


@dataclass
class Joint:
    """One step's records and its KL records, packed together (:func:`joint_batch`)."""

    packed: object  # torch_fast.Packed of [*records, *KL records]
    own: torch.Tensor  # rows of packed.keep / targets that are the step's own records' labels
    kl: torch.Tensor  # rows that are the KL records' labels, in (KL record, position) order
    kl_idx: list[int]  # the KL records (indices into the replay set)
    kl_batch: list[Encoded]
    tokens: int  # real tokens of the step's own records (what a step reports)


def joint_batch(records: Sequence[Encoded], replay_set: Sequence[Encoded], kl_idx: Sequence[int], pad_id: int,
                device: torch.device, fast) -> Joint:
    """The step's records and its KL records laid out as one batch (on the CPU one shared system
    prompt for all of them), so the decoder runs once a step instead of twice."""
    kl = [replay_set[i] for i in kl_idx]
    batch = [*records, *kl]
    p = torch_fast.prepare_batch(batch, pad_id, device, fast)
    rows = labelled_rows(p, batch)
    cat = lambda rs: torch.cat(rs).to(device)  # noqa: E731
    return Joint(p, cat(rows[: len(records)]), cat(rows[len(records):]), list(kl_idx), kl,
                 sum(len(e.input_ids) for e in records))


def joint_loss(model, replay_set: list[Encoded], weight: float, pad_id: int, device: torch.device, fast) -> Callable:
    """``loss(joint) -> (summed loss, target tokens, real tokens)``: what :func:`with_kl` computes
    (the step's summed NLL plus ``weight`` x its KL sum scaled to a per-token mean), from one pass
    over a :func:`joint_batch`: the NLL through the fused loss, the KL from the LM head's logits at
    the KL records' labelled positions only."""
    teacher, use_liger = Teacher(model, replay_set), "liger_loss" in fast.applied
    head = model.get_base_model().lm_head

    def loss(j: Joint):
        h = fused_hidden(model, j.packed)  # (n_own + n_kl, H)
        n = int(j.own.numel())
        nll = torch_fast.linear_cross_entropy_sum(h[j.own], head.weight, j.packed.targets[j.own], use_liger=use_liger)
        ref = teacher.logprobs(j.kl_idx, j.kl_batch, pad_id, device)  # (n_kl, V)
        logp = torch.log_softmax(head(h[j.kl]).float(), -1)
        kl = torch.nn.functional.kl_div(logp, ref, log_target=True, reduction="sum")
        return nll + weight * kl * (max(n, 1) / max(int(ref.shape[0]), 1)), n, j.tokens
    return loss


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
