"""The retention guard on the torch backend: the ``--kl`` loss term and the checkpoint probe's scorer."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Sequence

import torch

from wonderland.backends.common import batch_indices
from wonderland.backends.torch_peft.batching import collate, summed_loss
from wonderland.chat_format import IGNORE, Encoded, encode_chat

PROBE_BATCH = 8  # records per forward pass when the probe scores a set


def adapter_off(model, off: bool):
    """PEFT's context that runs the pure base model (a no-op when ``off`` is False)."""
    return model.disable_adapter() if off else nullcontext()


def kl_sum(model, batch: Sequence[Encoded], pad_id: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Summed KL(base || adapted) of the next-token distributions at the labelled positions of
    ``batch`` (the base = the same model with the adapter off, no gradient), and their count."""
    ids, labels, mask = collate(batch, pad_id, device)
    keep = labels[:, 1:] != IGNORE  # (B, T-1): the answer tokens
    with torch.no_grad(), model.disable_adapter():
        ref = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep].float(), -1)
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep].float(), -1)
    return torch.nn.functional.kl_div(logp, ref, log_target=True, reduction="sum"), int(keep.sum())


def with_kl(loss: Callable, model, replay_set: list[Encoded], weight: float, batch_size: int, seed: int,
            pad_id: int, device: torch.device, start: int = 0) -> Callable:
    """``loss`` plus ``weight`` x the mean KL per replay token of one replay batch per step. The
    trainer divides the returned sum by the step's target tokens, so the KL sum is scaled by
    n / n_kl to stay a per-token mean; the reported step loss includes it."""
    step = [start]  # the KL batch follows the step, as the data order does (a resume continues it)

    def combined(batch):
        loss_sum, n, tokens = loss(batch)
        idx = batch_indices(step[0], len(replay_set), min(batch_size, len(replay_set)), seed + 1)
        step[0] += 1
        kl, n_kl = kl_sum(model, [replay_set[i] for i in idx], pad_id, device)
        return loss_sum + weight * kl * (max(n, 1) / max(n_kl, 1)), n, tokens
    return combined


def scorer(model, tokenizer, max_seq_len: int, device: torch.device) -> Callable:
    """``nll(records, adapter) -> (summed NLL, tokens)`` over the assistant tokens, in batches, no
    gradient; encodings are cached per record list (the probe sets are fixed for a run)."""
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
                loss, n = summed_loss(model, *collate(encs[i : i + PROBE_BATCH], pad, device))
                total, count = total + float(loss), count + n
        model.train(was_training)
        return total, count
    return nll
