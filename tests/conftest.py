"""Shared fixtures.

* Every test gets its own empty ``$WONDERLAND_HOME`` (runs, data, books), but converted models
  are shared through ``$WONDERLAND_MODELS`` so the embedded model is converted once per machine.
* ``tiny_model``: a random-initialised 2-layer llama with the embedded model's tokenizer, for
  plumbing tests that need real training steps but not real learning.
* ``TRITON_INTERPRET=1`` for the whole session: Triton reads it when its own library functions
  (``tl.sum``, ``tl.sigmoid``...) are decorated, i.e. at its first import, which some other test's
  imports (transformers) may trigger before tests/test_triton_kernels.py runs. No GPU here anyway.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
SHARED_MODELS = Path(os.environ.get("WONDERLAND_MODELS") or Path.home() / ".cache" / "wonderland" / "models")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def wl_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "wl-home"
    monkeypatch.setenv("WONDERLAND_HOME", str(home))
    monkeypatch.setenv("WONDERLAND_MODELS", str(SHARED_MODELS))
    return home


@pytest.fixture(scope="session")
def alice_path() -> Path:
    """The test book (Canterbury alice29.txt): ../shared/corpus/alice.txt beside the checkout when
    there, else wonderland's default-book lookup ($WONDERLAND_BOOK, cache, checksummed download)."""
    from wonderland.data import default_book_path

    shared = REPO.parent / "shared" / "corpus" / "alice.txt"
    if not os.environ.get("WONDERLAND_BOOK") and shared.is_file():
        return shared
    return default_book_path()


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    """The packaged SmolLM2-135M-Instruct as a HF folder (converted once, then cached)."""
    os.environ.setdefault("WONDERLAND_MODELS", str(SHARED_MODELS))
    from wonderland.models import embedded_model_path

    return embedded_model_path(log=lambda m: None)


@pytest.fixture(scope="session")
def tiny_model(embedded_model, tmp_path_factory) -> Path:
    """A tiny random llama (2 layers, hidden 64) with the packaged model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
