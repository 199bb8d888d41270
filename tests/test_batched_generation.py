"""Batched decoding (``TorchChatModel.decode_ids`` / ``generate_batch``, what the demo and
``chat --compare`` use): every request of a batch gets the token ids it gets alone, whatever the
other rows' prompt lengths, reply lengths and adapter states. Float64, so float rounding cannot
flip a sampled token; judged on token ids, never on the text of a random model."""

from __future__ import annotations

import pytest

from wonderland.config import GenerationConfig


@pytest.fixture(scope="module")
def chat(tiny_model):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wonderland.backends.torch_peft.chat import TorchChatModel

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64)
    # init_lora_weights=False: B is random too, so the adapter changes what is sampled
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    return TorchChatModel(peft, AutoTokenizer.from_pretrained(tiny_model), tiny_model, torch.device("cpu"))


def _requests() -> list:
    prompts = ["Hi", "What time is it at the tea-party, Hatter?", "Tea?"]  # different lengths: left padding
    gens = [GenerationConfig(temperature=1.0, top_p=0.9, repetition_penalty=1.1, max_tokens=n, seed=s)
            for n, s in ((5, 1), (12, 2), (9, 3))]
    return [([{"role": "user", "content": p}], g, on) for p, g in zip(prompts, gens) for on in (False, True)]


def test_each_request_of_a_batch_decodes_as_it_would_alone(chat):
    requests = _requests()
    alone = [chat.decode_ids([r])[0] for r in requests]
    assert chat.decode_ids(requests) == alone
    assert chat.decode_ids(requests[::-1]) == alone[::-1]
    assert all(len(ids) <= gen.max_tokens for ids, (_, gen, _) in zip(alone, requests))
    assert any(off != on for off, on in zip(alone[::2], alone[1::2])), "the adapter changed nothing: mixing untested"
    assert len({len(ids) for ids in alone}) > 1, "every reply has the same length: rows that end early untested"


def test_a_stream_is_a_batch_of_one_and_the_adapter_is_back_on_after_a_batch(chat):
    requests = _requests()
    for (messages, gen, on), ids in zip(requests, chat.decode_ids(requests)):
        assert "".join(chat.stream(messages, gen, adapter=on)) == chat.tokenizer.decode(ids, skip_special_tokens=True)
    chat.decode_ids(requests[:1])  # adapter off only
    assert not chat._lora_layer.disable_adapters
