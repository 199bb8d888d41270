"""GGUF files for llama.cpp and Ollama: a whole llama-architecture model, or a LoRA adapter alone.

Written with the ``gguf`` package's :class:`gguf.GGUFWriter`, following the conventions of
llama.cpp's ``convert_hf_to_gguf.py`` / ``convert_lora_to_gguf.py``:

* tensor names from ``gguf.get_tensor_name_map`` (``blk.N.attn_q.weight`` ...);
* q/k projection rows permuted from Hugging Face's rotate-half RoPE layout to llama.cpp's
  interleaved layout (transformers' GGUF loader undoes exactly this permutation);
* 1-D tensors (norms) always float32; ``q8_0`` falls back to f16 for rows not divisible by 32 and
  keeps the embedding / output matrices and each layer's attn_v / ffn_down / ffn_up at f16 (:data:`Q8_0_KEEP_F16`);
* a byte-level BPE tokenizer (``tokenizer.ggml.model = gpt2``) with tokens, token types, merges,
  special token ids and the chat template: the pieces mlx-lm's own GGUF export leaves out
  (``mlx_lm fuse --export-gguf`` writes no merges and no chat template for this model);
* LoRA: ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, tensors
  ``<base tensor>.lora_a`` (torch shape (r, in)) and ``.lora_b`` (torch shape (out, r)); llama.cpp
  adds ``alpha / r * B @ A`` to the base weight.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from wonderland.errors import UserError

GGUF_TYPES = ("f16", "q8_0", "f32")
# bytes per weight, for disk estimates: q8_0 stores 32 int8 + one f16 scale per block
BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}  # what stored_type says a tensor is
LLAMA_MODEL_TYPES = ("llama", "mistral")  # HF model_type values llama.cpp writes as architecture "llama"
_PROJ_RE = re.compile(r"^(?:base_model\.model\.)?(model\.layers\.\d+\.(?:self_attn|mlp)\.\w+)\.lora_([AB])\.weight$")


def _gguf():
    try:
        import gguf
    except ImportError:  # a core dependency, but say what to do if it went missing
        raise UserError("GGUF export needs the 'gguf' package: pip install gguf") from None
    return gguf


def check_llama_config(config: Mapping[str, Any], what: str = "GGUF export") -> None:
    """Refuse what this writer cannot express faithfully, before anything is written."""
    model_type = config.get("model_type")
    if model_type not in LLAMA_MODEL_TYPES:
        raise UserError(f"{what} supports llama-architecture models ({', '.join(LLAMA_MODEL_TYPES)}), not "
                        f"{model_type!r}; use --format merged and llama.cpp's convert_hf_to_gguf.py")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"{what}: RoPE scaling {rope.get('rope_type')!r} is not supported; use --format merged "
                        f"and llama.cpp's convert_hf_to_gguf.py")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise UserError(f"{what}: llama models with bias terms are not supported; use --format merged")


def rope_theta(config: Mapping[str, Any]) -> float:
    return float((config.get("rope_parameters") or {}).get("rope_theta") or config.get("rope_theta") or 10000.0)


def head_dim(config: Mapping[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF (rotate-half) -> llama.cpp (interleaved) row order of a q or k projection.

    Rows are grouped per head as [first halves | second halves]; llama.cpp wants pairs
    (x0, x_{d/2}), (x1, x_{d/2+1}) ... next to each other. Works on (out, in) weights and on
    LoRA B (out, r) alike, since only the output rows move."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _qk_heads(gguf_name: str, config: Mapping[str, Any]) -> int | None:
    if ".attn_q." in gguf_name:
        return int(config["num_attention_heads"])
    if ".attn_k." in gguf_name:
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


# ----------------------------------------------------------------------------- tokenizer
def tokenizer_pre(tokenizer_json: Mapping[str, Any]) -> str:
    """llama.cpp's pre-tokenizer name for the tokenizer we trained with.

    llama.cpp identifies pre-tokenizers by name (``llama-vocab.cpp``); we recognise the two byte-level
    layouts the supported models use. ``gpt-2``: a plain ByteLevel split with GPT-2's regex (what
    the embedded model's converted tokenizer does); ``smollm``: digits split one by one, then
    ByteLevel (original SmolLM/StarCoder). (``gpt2`` without the dash is the tokenizer *model* name;
    llama.cpp refuses it as a pre-tokenizer: "unknown pre-tokenizer type".)"""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        kinds = [(p.get("type"), p.get("individual_digits"), p.get("use_regex", True)) for p in pre.get("pretokenizers", [])]
        if kinds == [("Digits", True, True), ("ByteLevel", None, True)]:
            return "smollm"
    raise UserError("GGUF export: this tokenizer's pre-tokenizer is not one llama.cpp knows by name here; "
                    "export --format merged and convert it with llama.cpp's convert_hf_to_gguf.py")


def add_tokenizer(writer, model_dir: Path, vocab_size: int) -> None:
    """Byte-level BPE vocabulary, merges, special tokens and chat template from the HF folder."""
    gguf = _gguf()
    from transformers import AutoTokenizer

    tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    if (tj.get("model") or {}).get("type") != "BPE":
        raise UserError("GGUF export supports byte-level BPE tokenizers only; use --format merged")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    by_id: dict[int, str] = {i: t for t, i in tj["model"]["vocab"].items()}
    types: dict[int, int] = {i: gguf.TokenType.NORMAL for i in by_id}
    for added in tj.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    n = max(vocab_size, max(by_id) + 1)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    token_types = [int(types.get(i, gguf.TokenType.UNUSED)) for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre(tj))
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    for key, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                     ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if tid is not None:
            getattr(writer, f"add_{key}_token_id")(int(tid))
    probe = tokenizer("a")["input_ids"]  # does the HF tokenizer add BOS/EOS around plain text?
    writer.add_add_bos_token(bool(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]))
    writer.add_add_eos_token(bool(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id] and len(probe) > 1))
    writer.add_add_space_prefix(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


# ----------------------------------------------------------------------------- the model
# q8_0 keeps these at f16 (llama-quantize's --token-embedding-type / --output-tensor-type f16): on a
# model with tied embeddings token_embd is also the LM head, whose rounding moves every logit
Q8_0_KEEP_F16 = ("token_embd.weight", "output.weight")
# ... and every layer's attn_v and ffn_down, the tensors llama.cpp's own mixes give more bits
# (llama-quant.cpp, use_more_bits), and ffn_up: measured on 8 SmolLM2-135M runs in llama.cpp
# (docs/export.md, 2026-12-04), attn_v + ffn_down alone met the q8_0 Target on 6 of them, with
# ffn_up on all 8 (mean |dlogit| 0.065 -> 0.048; the file 199 -> 224 MB, f16's is 270 MB)
Q8_0_KEEP_F16_SUFFIXES = (".attn_v.weight", ".ffn_down.weight", ".ffn_up.weight")


def stored_type(name: str, shape: tuple[int, ...], gguf_type: str) -> str:
    """What a tensor (llama.cpp name, shape) is stored as in a ``gguf_type`` file: f32, f16 or q8_0."""
    if len(shape) == 1 or gguf_type == "f32":
        return "f32"
    if gguf_type == "q8_0" and shape[-1] % 32 == 0 and name not in Q8_0_KEEP_F16 \
            and not name.endswith(Q8_0_KEEP_F16_SUFFIXES):
        return "q8_0"
    return "f16"


def _tensor_data(gguf, name: str, data: np.ndarray, gguf_type: str) -> tuple[np.ndarray, Any]:
    """(payload, raw_dtype) for one tensor in the requested file type."""
    q = gguf.GGMLQuantizationType
    kind = stored_type(name, data.shape, gguf_type)
    if kind == "q8_0":
        return gguf.quants.quantize(data.astype(np.float32), q.Q8_0), q.Q8_0
    return (data.astype(np.float32), q.F32) if kind == "f32" else (data.astype(np.float16), q.F16)


def model_gguf_bytes(shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any], gguf_type: str) -> int:
    """The tensor bytes of :func:`write_model_gguf`'s file for a model of these HF tensor shapes
    (the metadata, a few MB, not included): for disk-space checks before writing."""
    gguf = _gguf()
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config["num_hidden_layers"]))
    total = 0.0
    for hf_name, shape in shapes.items():
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias")) or hf_name
        total += math.prod(shape) * BYTES_PER_WEIGHT[stored_type(name, shape, gguf_type)]
    return int(total)


def write_model_gguf(state: Mapping[str, Any], config: Mapping[str, Any], model_dir: Path, out_file: Path,
                     gguf_type: str, name: str) -> None:
    """Write a llama model (``state``: HF parameter name -> torch tensor) as one GGUF file."""
    gguf = _gguf()
    check_llama_config(config)
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)} (got {gguf_type!r})")
    n_layers = int(config["num_hidden_layers"])
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]

    writer = gguf.GGUFWriter(str(out_file), arch="llama")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(n_layers)
    writer.add_context_length(int(config.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) * int(config["num_attention_heads"]) != int(config["hidden_size"]):
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_file_type(file_type)
    if gguf_type == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, model_dir, int(config["vocab_size"]))

    tied = bool(config.get("tie_word_embeddings"))
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd.weight when output.weight is absent
        gname = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise UserError(f"GGUF export: no llama.cpp name for tensor {hf_name!r}; use --format merged")
        data = tensor.detach().float().cpu().numpy()
        heads = _qk_heads(gname, config)
        if heads:
            data = permute_qk(data, heads)
        payload, raw_dtype = _tensor_data(gguf, gname, data, gguf_type)
        writer.add_tensor(gname, payload, raw_dtype=raw_dtype)
    _finish(writer)


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ----------------------------------------------------------------------------- LoRA adapter
def write_lora_gguf(adapter_dir: Path, config: Mapping[str, Any], out_file: Path, name: str) -> float:
    """A PEFT LoRA adapter as a llama.cpp LoRA GGUF (float32 tensors); returns the alpha written.

    llama.cpp scales by ``adapter.lora.alpha / r`` (r = rows of lora_a), so we write the alpha
    that reproduces PEFT's effective scale (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with
    rsLoRA)."""
    gguf = _gguf()
    from safetensors.numpy import load_file

    check_llama_config(config, "GGUF LoRA export")
    acfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if acfg.get("peft_type", "LORA") != "LORA" or acfg.get("use_dora"):
        raise UserError("GGUF LoRA export supports plain LoRA adapters only (no DoRA)")
    if acfg.get("rank_pattern") or acfg.get("alpha_pattern"):
        raise UserError("GGUF LoRA export: per-module ranks/alphas are not supported; use --format merged")
    r = int(acfg["r"])
    scale = float(acfg["lora_alpha"]) / (math.sqrt(r) if acfg.get("use_rslora") else r)
    alpha = scale * r
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    n_layers = int(config["num_hidden_layers"])
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)

    writer = gguf.GGUFWriter(str(out_file), arch="llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for key in sorted(tensors):
        m = _PROJ_RE.match(key)
        base = tmap.get_name(m.group(1) + ".weight", try_suffixes=(".weight",)) if m else None
        if base is None:
            raise UserError(f"GGUF LoRA export: cannot map adapter tensor {key!r} to a llama.cpp tensor "
                            f"(only attention/MLP projections are supported); use --format merged")
        data = tensors[key].astype(np.float32)
        heads = _qk_heads(base, config)
        if m.group(2) == "B" and heads:
            data = permute_qk(data, heads)  # B's rows are the projection's output rows
        writer.add_tensor(f"{base}.lora_{m.group(2).lower()}", data, raw_dtype=gguf.GGMLQuantizationType.F32)
    _finish(writer)
    return alpha
