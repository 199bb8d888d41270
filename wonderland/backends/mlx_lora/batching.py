"""Batching and loss primitives of the MLX backend: the same labelled tokens as the torch backend.

The loss puts only the labelled positions through the LM head: the backbone's (B, T, H) hidden states
are gathered at the targets the host found labelled (``collate``), so the (B, T, V) logits of every
position (4 x 256 x 49152 float32 = 201 MB per copy for the embedded model) are never built; prompt
tokens cost no head compute. With ``chunk`` (gradient checkpointing, :mod:`.memory`) the labelled
positions also go through the head ``chunk`` at a time, each chunk under ``mx.checkpoint``: its
logits are rebuilt in the backward pass instead of being kept, so one chunk's logits are alive at once.
"""

from __future__ import annotations

import math
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from wonderland.chat_format import IGNORE, Encoded

PAD_TO = 32  # pad batches to multiples of 32 tokens, as mlx-lm does: few shapes, few recompiles
LABELS_PAD_TO = 64  # the labelled positions likewise (a padded one has weight 0)
CHUNK = 256  # labelled positions per LM-head chunk when checkpointing (256 x 49152 float32 = 50 MB)
HEAD_LAYOUT = ("llama", "mistral", "qwen2", "qwen3")  # mlx-lm models whose logits are head(self.model(x))


def collate(batch: Sequence[Encoded]) -> tuple[mx.array, mx.array, mx.array]:
    """(B, T) token ids (T - 1 a multiple of 32), the flat indices into the (B, T - 1) targets of the
    labelled ones, and their weights (1; 0 for the padding that makes their count a multiple of 64)."""
    longest = max(len(e.input_ids) for e in batch)
    width = 1 + PAD_TO * max(1, math.ceil((longest - 1) / PAD_TO))
    ids = np.zeros((len(batch), width), np.int32)
    mask = np.zeros((len(batch), width), bool)
    for row, e in enumerate(batch):
        ids[row, : len(e.input_ids)] = e.input_ids
        mask[row, : len(e.labels)] = [t != IGNORE for t in e.labels]
    positions = np.flatnonzero(mask[:, 1:]).astype(np.int32)
    n = LABELS_PAD_TO * max(1, math.ceil(len(positions) / LABELS_PAD_TO))
    weights = np.zeros(n, np.float32)
    weights[: len(positions)] = 1.0
    return mx.array(ids), mx.array(np.pad(positions, (0, n - len(positions)))), mx.array(weights)


def _backbone_and_head(model):
    """(hidden states of the inputs, head) for the llama-style mlx-lm models; None for any other model."""
    inner, args = getattr(model, "model", None), getattr(model, "args", None)
    if inner is None or getattr(model, "model_type", None) not in HEAD_LAYOUT:
        return None
    if getattr(args, "tie_word_embeddings", False):
        return inner, inner.embed_tokens.as_linear
    return (inner, model.lm_head) if hasattr(model, "lm_head") else None


def _nll(head, h: mx.array, targets: mx.array, weights: mx.array) -> mx.array:
    # stop_gradient: under mx.checkpoint every input is differentiated, and the targets are indices
    logits = head(h).astype(mx.float32)
    return (nn.losses.cross_entropy(logits, mx.stop_gradient(targets)) * mx.stop_gradient(weights)).sum()


def summed_nll(model, ids: mx.array, positions: mx.array, weights: mx.array, chunk: int = 0) -> tuple[mx.array, mx.array]:
    """Sum of next-token NLLs at the labelled positions, and their count (``chunk``: see the module docstring)."""
    targets = ids[:, 1:].reshape(-1)[positions]
    parts = _backbone_and_head(model)
    if parts is None:  # another layout (softcapped or scaled logits...): the model's own logits, then gathered
        logits = model(ids[:, :-1])
        total = _nll(lambda h: h, logits.reshape(-1, logits.shape[-1])[positions], targets, weights)
        return total, weights.sum().astype(mx.int32)
    backbone, head = parts
    hidden = backbone(ids[:, :-1])
    h = hidden.reshape(-1, hidden.shape[-1])[positions]
    if not chunk or h.shape[0] <= chunk:
        total = _nll(head, h, targets, weights)
    else:
        piece = mx.checkpoint(lambda h_, t_, w_: _nll(head, h_, t_, w_))
        total = sum(piece(h[s : s + chunk], targets[s : s + chunk], weights[s : s + chunk])
                    for s in range(0, h.shape[0], chunk))
    return total, weights.sum().astype(mx.int32)


def mean_loss(model, ids: mx.array, positions: mx.array, weights: mx.array, chunk: int = 0) -> tuple[mx.array, mx.array]:
    """mlx-lm's loss contract: (mean loss, token count)."""
    total, n = summed_nll(model, ids, positions, weights, chunk)
    return total / mx.maximum(n, 1), n
