"""Batching and loss primitives of the PyTorch backend, shared by the plain and the fast path.

A batch of :class:`~wonderland.chat_format.Encoded` records becomes right-padded (B, T) tensors;
the loss is the sum of next-token NLLs at labelled (assistant) positions, and their count.
"""

from __future__ import annotations

from typing import Sequence

import torch

from wonderland.chat_format import IGNORE, Encoded


def collate(batch: Sequence[Encoded], pad_id: int, device: torch.device):
    """Right-pad to the longest record: input_ids/labels/attention_mask of shape (B, T)."""
    T = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
    return ids.to(device), labels.to(device), mask.to(device)


def summed_loss(model, ids, labels, mask) -> tuple[torch.Tensor, int]:
    """Sum of token NLLs over labelled positions (next-token shift), and how many there were."""
    logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    return shifted_nll_sum(logits, labels), int((labels[:, 1:] != IGNORE).sum())


def shifted_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of NLLs of token t+1 given logits at t, over labelled positions: (B, T, V), (B, T) -> ()."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                             labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum")


def batch_loss(model, batch: Sequence[Encoded], pad_id: int, device: torch.device) -> tuple[torch.Tensor, int, int]:
    """The plain path: padded batch, full logits. Summed loss, labelled tokens, real tokens."""
    ids, labels, mask = collate(batch, pad_id, device)
    loss, n = summed_loss(model, ids, labels, mask)
    return loss, n, int(mask.sum())
