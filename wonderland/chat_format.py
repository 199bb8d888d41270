"""Chat records -> token ids with a loss mask on the assistant turns only.

A record is ``{"messages": [{"role", "content"}, ...]}`` (the format mlx-lm and TRL read). We
render prefixes with the tokenizer's own chat template: the tokens between
``template(messages[:i], add_generation_prompt=True)`` and ``template(messages[:i+1])`` are the
i-th (assistant) turn, end-of-turn marker included, so the model learns when to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

NEUTRAL_SYSTEM_PROMPT = "You are a helpful assistant."
IGNORE = -100  # label value skipped by the loss


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken

    @property
    def n_target_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def _ids(tokenizer: Any, messages: Sequence[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_chat(tokenizer: Any, messages: Sequence[dict], max_len: int) -> Encoded:
    """Token ids of the whole conversation; labels only on assistant turns; truncated to max_len."""
    ids = _ids(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_ids(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(_ids(tokenizer, messages[: i + 1], add_generation_prompt=False))
        labels[start:end] = ids[start:end]
    return Encoded(ids[:max_len], labels[:max_len])


def prompt_ids(tokenizer: Any, messages: Sequence[dict]) -> list[int]:
    """Token ids that prompt the model for the next assistant turn."""
    return _ids(tokenizer, messages, add_generation_prompt=True)


def with_system(messages: Sequence[dict], system_prompt: str | None) -> list[dict]:
    """``messages`` with their system turn replaced by ``system_prompt`` (added when missing).

    Always pass a system prompt: SmolLM2's template otherwise injects its own assistant persona.
    """
    rest = [m for m in messages if m["role"] != "system"]
    return [{"role": "system", "content": system_prompt or NEUTRAL_SYSTEM_PROMPT}, *rest]
