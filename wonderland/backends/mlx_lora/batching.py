"""Batching and loss primitives of the MLX backend: the same labelled tokens as the torch backend."""

from __future__ import annotations

import math
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn

from wonderland.chat_format import IGNORE, Encoded

PAD_TO = 32  # pad batches to multiples of 32 tokens, as mlx-lm does: few shapes, few recompiles


def collate(batch: Sequence[Encoded]) -> tuple[mx.array, mx.array]:
    """(B, T) token ids and a (B, T) 0/1 mask of the label positions; T - 1 is a multiple of 32."""
    longest = max(len(e.input_ids) for e in batch)
    width = 1 + PAD_TO * max(1, math.ceil((longest - 1) / PAD_TO))
    ids = [[0] * width for _ in batch]
    mask = [[0] * width for _ in batch]
    for row, e in enumerate(batch):
        ids[row][: len(e.input_ids)] = e.input_ids
        mask[row][: len(e.labels)] = [int(t != IGNORE) for t in e.labels]
    return mx.array(ids, mx.int32), mx.array(mask, mx.int32)


def summed_nll(model, ids: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """Sum of next-token NLLs at label positions, and their count."""
    logits = model(ids[:, :-1]).astype(mx.float32)
    targets, m = ids[:, 1:], mask[:, 1:]
    return (nn.losses.cross_entropy(logits, targets) * m).sum(), m.sum()


def mean_loss(model, ids: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """mlx-lm's loss contract: (mean loss, token count)."""
    total, n = summed_nll(model, ids, mask)
    return total / mx.maximum(n, 1), n
