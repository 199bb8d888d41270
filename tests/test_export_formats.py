"""Each export format reloads and reproduces the trained run (tiny llama, real training, real files).

Reference = the run as wonderland serves it: base + PEFT adapter, float32. Tolerances (max
absolute logit difference over every position of 4 chat prompts; the tiny model's logits have a
spread of ~0.2 and the adapter moves them by ~1.4):

* peft / merged / GGUF f32: 1e-4, greedy text equal;
* GGUF f16: 2e-3 (measured 1.9e-4), greedy text equal;
* GGUF q8_0: top-1 agreement >= 95 % (measured 98 %), logits within 5e-2 (measured 4.9e-3).

No llama.cpp or Ollama binary can run here: GGUF files are checked with the ``gguf`` reader and
transformers' GGUF loader, Modelfiles with the documented grammar (wonderland.export.ollama).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.export_helpers import PROMPTS, SYSTEM, shared_tiny_run
from wonderland.backends.torch_peft.chat import TorchChatModel
from wonderland.chat_format import prompt_ids, with_system
from wonderland.config import GenerationConfig
from wonderland.export import export
from wonderland.export.ollama import parse_modelfile
from wonderland.generate import load_run

GREEDY = GenerationConfig(temperature=0.0, max_tokens=12, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    """The run, its prompts' token ids, and reference logits / greedy replies (adapter on and off)."""
    run = shared_tiny_run(tmp_path_factory, tiny_model)
    loaded = load_run(run, device="cpu")
    tok = loaded.model.tokenizer
    chats = [with_system([{"role": "user", "content": p}], SYSTEM) for p in PROMPTS]
    ids = [prompt_ids(tok, c) for c in chats]
    ref = {"logits": [_logits(loaded.model.model, i) for i in ids],
           # greedy token ids, not text: the random tiny model's text can be all newlines either way
           "reply_ids": loaded.model.decode_ids([(c, GREEDY, True) for c in chats])}
    with loaded.model.model.disable_adapter():
        ref["base_logits"] = [_logits(loaded.model.model, i) for i in ids]
    return {"run": run, "tok": tok, "chats": chats, "ids": ids, **ref}


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def _compare(model, tokenizer, trained) -> tuple[float, float, list[list[int]]]:
    """(max |logit diff|, top-1 agreement, greedy reply token ids) of ``model`` against the trained run."""
    out = [_logits(model, i) for i in trained["ids"]]
    diff = max(float((o - r).abs().max()) for o, r in zip(out, trained["logits"]))
    agree = sum(int((o.argmax(-1) == r.argmax(-1)).sum()) for o, r in zip(out, trained["logits"]))
    chat = TorchChatModel(model, tokenizer, Path("."), torch.device("cpu"))
    replies = chat.decode_ids([(c, GREEDY, True) for c in trained["chats"]])  # adapter=True: a no-op on plain models
    return diff, agree / sum(len(i) for i in trained["ids"]), replies


def test_the_adapter_really_changes_the_model(trained):
    effect = max(float((a - b).abs().max()) for a, b in zip(trained["logits"], trained["base_logits"]))
    assert effect > 0.5  # on logits: greedy text of the random tiny model can be all newlines either way


def test_peft_export_reloads_with_peft(trained, tmp_path):
    from peft import PeftModel

    result = export(trained["run"], "peft", tmp_path / "peft", log=lambda m: None)
    assert {"adapter_config.json", "adapter_model.safetensors", "wonderland-export.json"} <= set(result.files)
    info = json.loads((tmp_path / "peft" / "wonderland-export.json").read_text())
    assert info["system_prompt"] == SYSTEM and info["format"] == "peft"
    base = AutoModelForCausalLM.from_pretrained(trained["run"].read()["model"]["path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    diff, agree, replies = _compare(model, trained["tok"], trained)
    assert diff < 1e-6 and agree == 1.0
    assert replies == trained["reply_ids"]


def test_merged_export_equals_base_plus_adapter(trained, tmp_path):
    export(trained["run"], "merged", tmp_path / "merged", log=lambda m: None)
    out = tmp_path / "merged"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == trained["tok"].chat_template
    assert json.loads((out / "config.json").read_text())["rope_theta"] > 0  # top-level key for mlx-lm
    assert not any("lora" in k for k in model.state_dict())
    diff, agree, replies = _compare(model, tokenizer, trained)
    assert diff < 1e-4 and agree == 1.0
    assert replies == trained["reply_ids"]


@pytest.fixture(scope="module")
def gguf_exports(trained, tmp_path_factory) -> dict[str, Path]:
    """The run exported once per GGUF type: {type: folder}."""
    base = tmp_path_factory.mktemp("gguf")
    return {t: export(trained["run"], "gguf", base / t, gguf_type=t, log=lambda m: None).path for t in ("f16", "f32", "q8_0")}


def _matrix_bytes_delta(gguf_exports, trained, gguf_type: str) -> tuple[int, int]:
    """(file size - f16 file size, the same predicted from the 2-D weight count): the KV metadata
    is identical, so only the matrices' bytes per weight differ (plus <= 32 bytes of alignment
    padding per tensor)."""
    from safetensors import safe_open

    with safe_open(str(Path(trained["run"].read()["model"]["path"]) / "model.safetensors"), "np") as st:
        f16_in_q8_0 = {k for k in st.keys()  # noqa: SIM118
                       if k == "model.embed_tokens.weight" or k.endswith(("self_attn.v_proj.weight", "mlp.down_proj.weight", "mlp.up_proj.weight"))}
        kept = {"lm_head.weight"} | (f16_in_q8_0 if gguf_type == "q8_0" else set())
        shapes = [st.get_slice(k).get_shape() for k in st.keys() if k not in kept]  # noqa: SIM118
    n2d = sum(a * b for a, b in (s for s in shapes if len(s) == 2))
    size = {t: (gguf_exports[t] / f"hatter.{t}.gguf").stat().st_size for t in ("f16", gguf_type)}
    per_weight = {"f32": 4.0, "q8_0": 34 / 32}[gguf_type]
    return size[gguf_type] - size["f16"], int(n2d * (per_weight - 2.0))


def test_the_disk_estimate_is_the_files_tensor_bytes(trained, gguf_exports):
    """export checks free space against model_gguf_bytes: per type it must be the written file's
    size less its metadata, which every type's file shares (plus <= 32 bytes of padding a tensor)."""
    from wonderland.export import _shapes
    from wonderland.export.gguf_writer import model_gguf_bytes

    model_dir = Path(trained["run"].read()["model"]["path"])
    shapes, config = _shapes(model_dir), json.loads((model_dir / "config.json").read_text())
    rest = {t: (gguf_exports[t] / f"hatter.{t}.gguf").stat().st_size - model_gguf_bytes(shapes, config, t)
            for t in ("f16", "f32", "q8_0")}
    assert all(abs(rest[t] - rest["f16"]) < 32 * len(shapes) for t in rest), rest
    assert 0 < rest["f16"] < 4 << 20, rest  # the tokenizer and the chat template: a few MB


def test_gguf_f16_reproduces_the_trained_model(trained, gguf_exports):
    out = gguf_exports["f16"]
    base = f"{trained['run'].read()['model']['path'].rstrip('/').rsplit('/', 1)[-1]}.base.f16.gguf"  # --lora's base
    assert {p.name for p in out.iterdir()} == {"hatter.f16.gguf", "hatter.lora.gguf", base, "wonderland-export.json"}
    reader = GGUFReader(out / "hatter.f16.gguf")
    _check_gguf_metadata(reader, trained["tok"])
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2} == {"F16"}
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 1} == {"F32"}  # norms stay f32

    model = AutoModelForCausalLM.from_pretrained(out, gguf_file="hatter.f16.gguf", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file="hatter.f16.gguf")
    for ids in trained["ids"]:  # the GGUF tokenizer encodes the chat text exactly as ours
        assert tokenizer(trained["tok"].decode(ids), add_special_tokens=False)["input_ids"] == ids
    assert tokenizer.chat_template == trained["tok"].chat_template
    diff, agree, replies = _compare(model, tokenizer, trained)
    assert diff < 2e-3 and agree == 1.0
    assert replies == trained["reply_ids"]


def test_gguf_f32_is_exact(trained, gguf_exports):
    out = gguf_exports["f32"]
    delta, predicted = _matrix_bytes_delta(gguf_exports, trained, "f32")  # 4 bytes per weight, not 2
    assert abs(delta - predicted) < 32 * 20
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file="hatter.f32.gguf", dtype=torch.float32).eval()
    diff, agree, replies = _compare(model, trained["tok"], trained)
    assert diff < 1e-4 and agree == 1.0
    assert replies == trained["reply_ids"]


def test_gguf_q8_0_keeps_the_top_token(trained, gguf_exports):
    out = gguf_exports["q8_0"]
    delta, predicted = _matrix_bytes_delta(gguf_exports, trained, "q8_0")  # 34 bytes per 32 weights, not 64 (the f16 ones: 64)
    assert abs(delta - predicted) < 32 * 20
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file="hatter.q8_0.gguf", dtype=torch.float32).eval()
    diff, agree, _ = _compare(model, trained["tok"], trained)
    assert agree >= 0.95 and diff < 5e-2


def _field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def _check_gguf_metadata(reader: GGUFReader, tok) -> None:
    """The keys llama.cpp needs for a llama model with a byte-level BPE tokenizer."""
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "general.type") == "model"
    assert _field(reader, "llama.block_count") == 2
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"  # a plain ByteLevel split, as the model was trained
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == len(tok) and tokens[1] == "<|im_start|>" and tokens[100] == tok.convert_ids_to_tokens(100)
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[1] == 3 and types[100] == 1  # CONTROL, NORMAL
    assert len(_field(reader, "tokenizer.ggml.merges")) > 40000
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    assert _field(reader, "tokenizer.chat_template") == tok.chat_template
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied embeddings


def test_gguf_lora_adapter_applies_like_llama_cpp(trained, gguf_exports):
    """llama.cpp adds alpha / r * B @ A (GGUF layout) to each base tensor; doing that to the
    base weights and undoing the q/k permutation with transformers' own code gives the merged
    model's weights."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    reader = GGUFReader(gguf_exports["f16"] / "hatter.lora.gguf")
    assert _field(reader, "general.type") == "adapter"
    assert _field(reader, "adapter.type") == "lora"
    assert _field(reader, "general.architecture") == "llama"
    alpha = _field(reader, "adapter.lora.alpha")
    assert alpha == pytest.approx(16.0)
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    expected = {f"blk.{i}.attn_{p}.weight.lora_{ab}" for i in range(2) for p in "qkv" for ab in "ab"}
    expected |= {f"blk.{i}.attn_output.weight.lora_{ab}" for i in range(2) for ab in "ab"}
    assert set(tensors) == expected

    from peft import PeftModel

    base_path = trained["run"].read()["model"]["path"]
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).state_dict()
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32),
                                       str(trained["run"].adapter)).merge_and_unload().state_dict()
    config = json.loads((Path(base_path) / "config.json").read_text())
    unpermute = LlamaTensorProcessor(config={"num_attention_heads": config["num_attention_heads"],
                                             "num_key_value_heads": config["num_key_value_heads"]})
    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj"}
    for name in {n.rsplit(".lora_", 1)[0] for n in tensors}:
        a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        assert a.shape[0] == 8 and b.shape[1] == 8  # torch order (r, in) and (out, r)
        block, kind = name.split(".")[1], name.split(".")[2]
        key = f"model.layers.{block}.{hf[kind]}.weight"
        w_base = base[key].numpy()
        w_gguf = _perm(w_base, kind, config) if kind in ("attn_q", "attn_k") else w_base  # the base tensor in GGUF
        adapted = w_gguf + alpha / a.shape[0] * (b @ a)  # what llama.cpp computes
        np.testing.assert_allclose(unpermute.process(adapted, name).weights, merged[key].numpy(), atol=1e-5)


def _perm(w: np.ndarray, kind: str, config: dict) -> np.ndarray:
    from wonderland.export.gguf_writer import permute_qk

    return permute_qk(w, config["num_attention_heads"] if kind == "attn_q" else config["num_key_value_heads"])


def test_ollama_adapter_export(trained, tmp_path):
    from peft import PeftModel

    result = export(trained["run"], "ollama", tmp_path / "o", ollama_from="adapter", log=lambda m: None)
    out = tmp_path / "o"
    text = (out / "Modelfile").read_text()
    parsed = {x.command: x.args for x in parse_modelfile(text)}
    base_path = trained["run"].read()["model"]["path"]
    assert parsed["FROM"] == base_path and parsed["ADAPTER"] == "./adapter"
    assert parsed["SYSTEM"] == SYSTEM
    assert "<|im_start|>assistant" in parsed["TEMPLATE"]
    assert "PARAMETER stop <|im_end|>" in text and "PARAMETER temperature 0.7" in text
    assert result.commands[0] == f"cd {out} && ollama create hatter -f Modelfile"
    # Ollama unmarshals lora_alpha into a uint32: it must be a JSON integer
    assert '"lora_alpha": 16,' in (out / "adapter" / "adapter_config.json").read_text()
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    diff, _, replies = _compare(PeftModel.from_pretrained(base, str(out / "adapter")).eval(), trained["tok"], trained)
    assert diff < 1e-6 and replies == trained["reply_ids"]


def test_ollama_gguf_route(trained, gguf_exports, tmp_path):
    export(trained["run"], "ollama", tmp_path / "o", ollama_from="gguf", gguf_type="q8_0", log=lambda m: None)
    parsed = parse_modelfile((tmp_path / "o" / "Modelfile").read_text())
    assert [x.args for x in parsed if x.command == "FROM"] == ["./hatter.q8_0.gguf"]
    assert not [x for x in parsed if x.command == "ADAPTER"]
    assert [x.args for x in parsed if x.command == "SYSTEM"] == [SYSTEM]
    # the very file the gguf export wrote (and the q8_0 test loaded): the writer is deterministic
    assert (tmp_path / "o" / "hatter.q8_0.gguf").read_bytes() == (gguf_exports["q8_0"] / "hatter.q8_0.gguf").read_bytes()


def test_ollama_default_is_from_the_merged_gguf(trained, tmp_path):
    """Current Ollama fails to create models from safetensors ADAPTERs (ollama #13314, #7781):
    the default Modelfile loads the merged GGUF instead."""
    result = export(trained["run"], "ollama", tmp_path / "o", log=lambda m: None)
    parsed = parse_modelfile((tmp_path / "o" / "Modelfile").read_text())
    assert [x.args for x in parsed if x.command == "FROM"] == ["./hatter.f16.gguf"]
    assert not [x for x in parsed if x.command == "ADAPTER"] and "hatter.f16.gguf" in result.files


def test_ollama_alpha_reproduces_a_fractional_or_mlx_scale(trained, tmp_path):
    """lora_alpha 12.5 (scale 1.5625) cannot be an integer: the remainder moves into lora_B."""
    from peft import PeftModel

    from wonderland.export.ollama import ollama_alpha, write_ollama_adapter

    assert ollama_alpha(8, 20.0) == (160, 1.0)  # mlx-lm's default scale 20 at rank 8
    src = tmp_path / "frac"
    shutil.copytree(trained["run"].adapter, src)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 12.5
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    info = write_ollama_adapter(src, tmp_path / "ollama-adapter")
    written = json.loads((tmp_path / "ollama-adapter" / "adapter_config.json").read_text())
    assert isinstance(written["lora_alpha"], int) and info["lora_b_factor"] != 1.0
    base_path = trained["run"].read()["model"]["path"]
    want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(src)).eval()
    got = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(tmp_path / "ollama-adapter")).eval()
    for ids in trained["ids"]:
        torch.testing.assert_close(_logits(got, ids), _logits(want, ids), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def mlx_run(trained, tmp_path_factory):
    """The same run as if trained by the MLX backend: its adapter in mlx-lm format (converted
    exactly by wonderland.backends.torch_peft.adapters.peft_to_mlx), run.json saying backend mlx."""
    from wonderland.backends.torch_peft.adapters import peft_to_mlx
    from wonderland.runs import RunDir

    path = tmp_path_factory.mktemp("mlx-run") / "hatter"
    shutil.copytree(trained["run"].path, path)
    shutil.rmtree(path / "adapter")
    info = json.loads((path / "run.json").read_text())
    peft_to_mlx(trained["run"].adapter, path / "adapter", base_model_path=info["model"]["path"])
    (path / "run.json").write_text(json.dumps({**info, "backend": "mlx", "adapter_format": "mlx-lm"}))
    return RunDir(path)


def test_mlx_run_exports_through_peft(trained, mlx_run, tmp_path):
    assert (mlx_run.adapter / "adapters.safetensors").exists()
    export(mlx_run, "merged", tmp_path / "merged", log=lambda m: None)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    diff, _, replies = _compare(model, trained["tok"], trained)
    assert diff < 1e-4 and replies == trained["reply_ids"]
    export(mlx_run, "ollama", tmp_path / "ollama", ollama_from="adapter", log=lambda m: None)
    # mlx-lm stores scale 2.0; Ollama ignores it and needs the integer alpha that gives it back
    written = json.loads((tmp_path / "ollama" / "adapter" / "adapter_config.json").read_text())
    assert written["lora_alpha"] == 16 and written["r"] == 8 and "lora_parameters" not in written
    export(mlx_run, "mlx", tmp_path / "mlx", log=lambda m: None)
    assert (tmp_path / "mlx" / "adapters.safetensors").read_bytes() == (mlx_run.adapter / "adapters.safetensors").read_bytes()
    assert not list(tmp_path.glob(".*"))  # no staging or conversion folders left


def test_mlx_export_of_a_torch_run(trained, tmp_path):
    result = export(trained["run"], "mlx", tmp_path / "mlx", log=lambda m: None)
    assert {"adapters.safetensors", "adapter_config.json"} <= set(result.files)
    cfg = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert cfg["lora_parameters"]["scale"] == pytest.approx(2.0) and cfg["lora_parameters"]["rank"] == 8
    assert "mlx_lm.generate" in result.commands[0]
