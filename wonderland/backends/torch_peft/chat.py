"""Streamed generation and teacher-forced loss with a PyTorch model, adapter on or off per step."""

from __future__ import annotations

import copy
import inspect
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator, Sequence

import torch
from peft import PeftModel

from wonderland.backends.torch_peft.batching import collate, summed_loss
from wonderland.chat_format import encode_chat, prompt_ids
from wonderland.config import GenerationConfig


Request = tuple[Sequence[dict], GenerationConfig, bool]  # (messages, sampling settings, adapter on?)


class TorchChatModel:
    """Token-by-token decoding with a KV cache. Each forward step holds a lock and sets the
    adapter on or off for that step only, so several streams (Base / Prompted / Trained columns)
    can interleave on one model and the Base column can never run with the adapter active."""

    def __init__(self, model, tokenizer, model_path: Path, device: torch.device) -> None:
        self.model, self.tokenizer, self.model_path, self.device = model, tokenizer, model_path, device
        self.has_adapter = isinstance(model, PeftModel)
        self._lock = threading.Lock()
        # transformers >= 5.2x renamed past_key_values -> cache (the GPU machine has an older 5.x)
        forward = type(model.get_base_model() if self.has_adapter else model).forward
        self._cache_kw = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
        self.eos_ids = {i for i in [tokenizer.eos_token_id, *_as_list(getattr(model.generation_config, "eos_token_id", None))] if i is not None}

    adapter_name: str | None = None  # set on a view made by with_adapter: the named adapter it runs

    @property
    def model(self):
        """The model, with this view's adapter the active one: code that calls it directly (export's
        verify, tests) gets this run's weights even when other runs' adapters share the base."""
        model = self._model
        if self.adapter_name is not None and model.active_adapter != self.adapter_name:
            model.set_adapter(self.adapter_name)
        return model

    @model.setter
    def model(self, value) -> None:
        self._model = value

    def _switch(self, on: bool) -> None:
        """This view's adapter on, or every adapter off (a base shared by several runs' adapters is a
        PeftModel too: its own view runs none of them). The LoRA layers are switched only when
        their state is not already the one asked for: switching walks every LoRA module (~50 ms a
        token on the embedded model when done at every step), and a reply of one column is mostly
        steps in a row with the same state. The state is read from a LoRA layer itself, so a switch
        made elsewhere (PEFT's ``disable_adapter()`` context) is seen. :meth:`stream` and :meth:`loss`
        switch them back on when they end (:meth:`_restore`), as PEFT's context does."""
        model = self._model
        if not isinstance(model, PeftModel):
            return
        off = not (on and (self.adapter_name is not None or self.has_adapter))
        if not off and self.adapter_name is not None and model.active_adapter != self.adapter_name:
            model.set_adapter(self.adapter_name)
        if self._lora_layer is None:
            from peft.tuners.lora import LoraLayer

            self._lora_layer = next((m for m in model.modules() if isinstance(m, LoraLayer)), False)
        if self._lora_layer is not False and self._lora_layer.disable_adapters != off:
            (model.base_model.disable_adapter_layers if off else model.base_model.enable_adapter_layers)()

    _lora_layer = None  # the first LoRA layer of the model (False: none), to read the adapters' state

    def _restore(self) -> None:
        """The LoRA layers on again, the state the model is in outside a reply (after a Base reply)."""
        if self._lora_layer and self._lora_layer.disable_adapters:
            with self._lock:
                self._model.base_model.enable_adapter_layers()

    def _adapter(self, on: bool):
        """Called under the lock, per forward step (see :meth:`_switch`); a context for ``with``."""
        self._switch(on)
        return nullcontext()

    def with_adapter(self, name: str, adapter_path: Path) -> "TorchChatModel":
        """A view of this (base) model with the PEFT adapter at ``adapter_path`` attached as ``name``
        (PEFT multi-adapter): one copy of the base weights serves every run trained on it. The view
        shares the weights, tokenizer and lock; each of its steps switches to its adapter."""
        with self._lock:
            if not isinstance(self._model, PeftModel):
                self._model = PeftModel.from_pretrained(self._model, str(adapter_path), adapter_name=name).eval()
            elif name not in self._model.peft_config:
                self._model.load_adapter(str(adapter_path), adapter_name=name)
                self._model.eval()
        view = copy.copy(self)
        view.adapter_name, view.has_adapter = name, True
        return view

    def detach(self) -> None:
        """Remove this view's adapter from the shared model (the cache evicted it)."""
        with self._lock:
            model = self._model
            if self.adapter_name is not None and self.adapter_name in model.peft_config and len(model.peft_config) > 1:
                if model.active_adapter == self.adapter_name:  # PEFT cannot delete the active adapter cleanly
                    model.set_adapter(next(n for n in model.peft_config if n != self.adapter_name))
                model.delete_adapter(self.adapter_name)

    def stream(self, messages: Sequence[dict], gen: GenerationConfig, adapter: bool = True) -> Iterator[str]:
        """The reply to ``messages``, piece by piece as its tokens come (a batch of one, :meth:`_steps`)."""
        out_ids, emitted = [], ""
        try:
            for tokens in self._steps([(messages, gen, adapter)]):
                out_ids.append(tokens[0])
                text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                    continue
                if len(text) > len(emitted):
                    yield text[len(emitted):]
                    emitted = text
        finally:
            self._restore()

    def generate_batch(self, requests: Sequence[Request]) -> list[str]:
        """The replies to several ``(messages, gen, adapter on?)`` requests, decoded together: one
        forward pass a token for all of them (on the CPU, 12 rows cost about 2.5x one row)."""
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in self.decode_ids(requests)]
        return [t[:-1] if t.endswith("\ufffd") else t for t in texts]

    def decode_ids(self, requests: Sequence[Request]) -> list[list[int]]:
        """Each request's reply token ids (EOS not included), decoded as one batch."""
        out: list[list[int]] = [[] for _ in requests]
        try:
            for tokens in self._steps(requests):
                for row, token in zip(out, tokens):
                    if token is not None:
                        row.append(token)
        finally:
            self._restore()
        return out

    def _steps(self, requests: Sequence[Request]) -> Iterator[list[int | None]]:
        """Each decode step's new token per request; None once a request has ended (its EOS, or its
        ``gen.max_tokens``). The prompts are left-padded rows of one KV cache (positions count real
        tokens only); every row samples with its own settings and a generator seeded by its
        ``gen.seed``, so a request gets the tokens it would get alone, up to float rounding."""
        prompts = [prompt_ids(self.tokenizer, messages) for messages, _, _ in requests]
        gens, kw = [g for _, g, _ in requests], self._rows([on for _, _, on in requests])
        pad, width = self.tokenizer.pad_token_id or 0, max(map(len, prompts))
        cur = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)  # (B, T)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        seen = [torch.tensor(p) for p in prompts]  # for the repetition penalty
        rngs = [torch.Generator().manual_seed(g.seed) for g in gens]
        left, past = [g.max_tokens for g in gens], None
        while any(left):
            with self._lock, torch.no_grad():
                self._switch(kw is not None)
                out = self._model(input_ids=cur, attention_mask=mask, position_ids=pos, use_cache=True,
                                  **{self._cache_kw: past}, **(kw or {}))
            past, logits = getattr(out, self._cache_kw), out.logits[:, -1].float().cpu()  # (B, V)
            tokens: list[int | None] = [sample_token(logits[i], seen[i], g, rngs[i]) if left[i] else None
                                        for i, g in enumerate(gens)]
            for i, token in enumerate(tokens):
                if token in self.eos_ids:
                    tokens[i], left[i] = None, 0
                elif token is not None:
                    left[i] -= 1
                    seen[i] = torch.cat([seen[i], torch.tensor([token])])
            if all(t is None for t in tokens):
                return
            yield tokens
            cur = torch.tensor([[pad if t is None else t] for t in tokens], device=self.device)
            mask, pos = torch.cat([mask, torch.ones_like(mask[:, :1])], 1), pos[:, -1:] + 1

    def _rows(self, on: Sequence[bool]) -> dict | None:
        """How each forward step of a batch runs its rows: None = the adapter off for all of them;
        {} = this view's adapter on for all; with rows of both kinds, the adapter stays on and
        PEFT's mixed-batch forward runs the others without it (``adapter_names``, "__base__")."""
        adapts = isinstance(self._model, PeftModel) and (self.adapter_name is not None or self.has_adapter)
        rows = [bool(a and adapts) for a in on]
        if not any(rows):
            return None
        if all(rows):
            return {}
        name = self.adapter_name or self._model.active_adapter
        return {"adapter_names": [name if r else "__base__" for r in rows]}

    def loss(self, records: Sequence[dict], adapter: bool = True, max_seq_len: int = 512) -> tuple[float, int]:
        total, count = 0.0, 0
        pad = self.tokenizer.pad_token_id
        try:
            for r in records:
                enc = encode_chat(self.tokenizer, r["messages"], max_seq_len)
                with self._lock, torch.no_grad(), self._adapter(adapter):
                    loss, n = summed_loss(self._model, *collate([enc], pad, self.device))
                total, count = total + float(loss), count + n
        finally:
            self._restore()
        return total, count


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def sample_token(logits: torch.Tensor, seen: torch.Tensor, gen: GenerationConfig, rng: torch.Generator) -> int:
    """Pick the next token from (V,) logits: repetition penalty, temperature, top-p."""
    logits = logits.clone()
    if gen.repetition_penalty != 1.0 and len(seen):
        prev = logits[seen]
        logits[seen] = torch.where(prev > 0, prev / gen.repetition_penalty, prev * gen.repetition_penalty)
    if gen.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / gen.temperature, dim=-1)
    if gen.top_p < 1.0:
        probs = _nucleus(probs, gen.top_p)
    return int(torch.multinomial(probs, 1, generator=rng))


def _nucleus(probs: torch.Tensor, top_p: float, k: int = 64) -> torch.Tensor:
    """``probs`` with only the most likely tokens whose mass before each is below ``top_p`` (always
    the top one); multinomial normalises. The set is looked for among the top ``k`` first, then
    8x more: sorting the whole vocabulary costs ~7 ms a token on the CPU, and the set is the
    same (the same descending prefix, summed in the same order)."""
    while True:
        k = min(k, probs.numel())
        top, order = probs.topk(k)
        keep = top.cumsum(0) - top < top_p
        if not keep[-1] or k == probs.numel():
            return torch.zeros_like(probs).scatter(0, order[keep], top[keep])
        k *= 8
