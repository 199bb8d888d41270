"""Gradient checkpointing of the decoder layers (``--grad-checkpoint``, issue 18), the QLoRA recipe.

On a small model the activations, not the weights, are most of a training step's peak: quantizing the
base alone does not halve it. Checkpointed, each decoder layer keeps only its input for the backward
pass and rebuilds its own activations there, one layer at a time (``mx.checkpoint``, as mlx-lm's
``--grad-checkpoint`` does), and the loss goes through the LM head in chunks (:mod:`.batching`): about
one more forward pass of compute for a fraction of the memory. ``auto`` (the default) checkpoints a
quantized run (``--quantize 4|8`` or an already-quantized folder), whose point is memory, and not a
float one.

mlx-lm's own ``grad_checkpoint`` replaces ``__call__`` on the layer *class*, for every model of the
process (a server that trains, then chats, would keep it); here only the training model's layers
change class, to a subclass that checkpoints while training and calls the layer plainly otherwise
(sampling with a KV cache during training, evaluation).
"""

from __future__ import annotations

import mlx.core as mx

_CLASSES: dict[type, type] = {}


def wanted(setting: str, quantized: bool) -> bool:
    """Whether a run checkpoints: ``on``, ``off``, or ``auto`` (on for a quantized base)."""
    return setting == "on" or (setting == "auto" and quantized)


def _checkpointed(cls: type) -> type:
    """``cls`` with a ``__call__`` that runs under ``mx.checkpoint`` while training without a cache."""
    if cls in _CLASSES:
        return _CLASSES[cls]
    plain = cls.__call__

    def __call__(self, x, *args, **kwargs):
        if not self.training or kwargs.get("cache") is not None:
            return plain(self, x, *args, **kwargs)

        def inner(params, h):  # the trainable (LoRA) weights are inputs, so their gradients flow through
            self.update(params)
            return plain(self, h, *args, **kwargs)

        return mx.checkpoint(inner)(self.trainable_parameters(), x)

    _CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__})
    return _CLASSES[cls]


def checkpoint_layers(model) -> None:
    """Make every decoder layer of ``model`` (this model only) checkpoint its activations."""
    for layer in model.layers:
        layer.__class__ = _checkpointed(type(layer))
