"""Streamed generation and teacher-forced loss with an mlx-lm model, adapter on or off per step."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator, Sequence

import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.sample_utils import apply_top_p, make_logits_processors
from mlx_lm.tuner.lora import LoRALinear

from wonderland.backends.mlx_lora.batching import collate, summed_nll
from wonderland.chat_format import encode_chat, prompt_ids
from wonderland.config import GenerationConfig

class MLXChatModel:
    """Generation via ``mlx_lm.stream_generate``. The adapter is switched per decode step by
    setting every LoRA layer's scale (0 = pure base model) under a lock: mlx bakes the scale into
    the graph when a step is built, and ``stream_generate`` builds each step inside ``next()``, so
    interleaved streams (Base / Prompted / Trained columns) never see each other's setting."""

    def __init__(self, model, tokenizer, model_path: Path) -> None:
        self.model, self.tokenizer, self.model_path = model, tokenizer, model_path
        self._lora = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
        self._scales = [m.scale for m in self._lora]
        self.has_adapter = bool(self._lora)
        self._lock = threading.Lock()

    def _set_adapter(self, on: bool) -> None:
        for m, s in zip(self._lora, self._scales):
            m.scale = s if on else 0.0

    def stream(self, messages: Sequence[dict], gen: GenerationConfig, adapter: bool = True) -> Iterator[str]:
        ids = prompt_ids(self.tokenizer._tokenizer, messages)
        processors = make_logits_processors(repetition_penalty=gen.repetition_penalty,
                                            repetition_context_size=len(ids) + gen.max_tokens) \
            if gen.repetition_penalty != 1.0 else None
        steps = stream_generate(self.model, self.tokenizer, ids, max_tokens=gen.max_tokens,
                                sampler=make_sampler(gen), logits_processors=processors)
        while True:
            with self._lock:
                self._set_adapter(adapter)
                try:
                    response = next(steps)
                except StopIteration:
                    return
                finally:
                    self._set_adapter(True)
            if response.text:
                yield response.text

    def loss(self, records: Sequence[dict], adapter: bool = True, max_seq_len: int = 512) -> tuple[float, int]:
        total, count = 0.0, 0
        for r in records:
            batch = collate([encode_chat(self.tokenizer._tokenizer, r["messages"], max_seq_len)])
            with self._lock:
                self._set_adapter(adapter)
                try:
                    nll, n = summed_nll(self.model, *batch)
                    mx.eval(nll, n)
                finally:
                    self._set_adapter(True)
            total, count = total + nll.item(), count + n.item()
        return total, count


def make_sampler(gen: GenerationConfig):
    """Temperature + top-p sampling with the stream's own seeded key (interleaved streams stay
    reproducible); greedy at temperature 0. Same order as the torch backend: temperature first."""
    if gen.temperature == 0:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)
    key = [mx.random.key(gen.seed)]

    def sample(logprobs: mx.array) -> mx.array:
        key[0], sub = mx.random.split(key[0])
        scaled = logprobs / gen.temperature
        if gen.top_p < 1.0:
            scaled = apply_top_p(scaled - mx.logsumexp(scaled, axis=-1, keepdims=True), gen.top_p)
        return mx.random.categorical(scaled, key=sub)

    return sample
