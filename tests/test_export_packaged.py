"""End to end on the packaged SmolLM2-135M-Instruct: train briefly, export GGUF f16, reload, compare.

The tiny-model tests cover every format; this one checks what only the real model has: 30
layers, 9 query / 3 key-value heads (the q/k permutation with GQA at head_dim 64), RoPE theta
100000, and the metadata keys llama.cpp's own converter wrote into the packaged GGUF.
"""

from __future__ import annotations

import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM

from tests.export_helpers import PROMPTS, SYSTEM, train_tiny_run
from wonderland.backends.torch_peft.chat import TorchChatModel
from wonderland.chat_format import prompt_ids, with_system
from wonderland.config import DEFAULT_MODEL, GenerationConfig
from wonderland.export import export
from wonderland.generate import generate, load_run
from wonderland.models import embedded_gguf_path, gguf_parsed_once


@pytest.mark.slow
def test_packaged_model_gguf_round_trip(embedded_model, tmp_path):
    run = train_tiny_run(tmp_path, embedded_model, model=DEFAULT_MODEL, iters=2, lr=2e-3, batch_size=2, max_seq_len=96)
    loaded = load_run(run, device="cpu")
    greedy = GenerationConfig(temperature=0.0, max_tokens=16, repetition_penalty=1.0)
    chats = [with_system([{"role": "user", "content": p}], SYSTEM) for p in PROMPTS[:2]]
    want = [generate(loaded.model, c, greedy) for c in chats]

    exported = export(run, "gguf", tmp_path / "gguf", gguf_type="f16", log=lambda m: None)
    out = exported.path
    name = f"{run.name}.f16.gguf"
    ours = GGUFReader(out / name)
    packaged_file = embedded_gguf_path()
    packaged = GGUFReader(packaged_file)
    ours_keys, their_keys = set(ours.fields), set(packaged.fields)
    descriptive = {"general.organization", "general.finetune", "general.basename", "general.size_label",
                   "general.license", "general.languages"}
    quantized_only = {"general.quantization_version"}  # the packaged file is Q4_1, ours f16
    assert their_keys - descriptive - quantized_only <= ours_keys  # every functional key llama.cpp wrote, we write too
    for key in ("llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.rope.dimension_count", "llama.context_length", "tokenizer.ggml.merges",
                "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.eos_token_id",
                "tokenizer.chat_template"):
        assert ours.fields[key].contents() == packaged.fields[key].contents(), key

    # the embedded base's own GGUF holds the trained-on weights: Ollama's ADAPTER route starts from it
    result = export(run, "ollama", tmp_path / "ollama", ollama_from="adapter", log=lambda m: None)
    modelfile = (result.path / "Modelfile").read_text()
    assert f"FROM {packaged_file}\nADAPTER ./adapter\n" in modelfile
    base_gguf = out / f"{embedded_model.name}.base.f16.gguf"  # --lora on an f16 base: see docs/export.md
    assert base_gguf.is_file() and any(c.startswith(f"llama-cli -m {base_gguf} --lora ") for c in exported.commands)

    with gguf_parsed_once():  # transformers reads the file three times otherwise
        model = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32).eval()
    chat = TorchChatModel(model, loaded.model.tokenizer, out, torch.device("cpu"))
    assert [generate(chat, c, greedy) for c in chats] == want
    for c in chats:
        ids = torch.tensor([prompt_ids(loaded.model.tokenizer, c)])
        with torch.no_grad():
            diff = (model(input_ids=ids).logits - loaded.model.model(input_ids=ids).logits).abs().max()
        assert float(diff) < 0.1  # f16 weights through 30 layers (measured 0.04); logits span ~30
