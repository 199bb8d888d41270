"""``--quantize nf4`` on the fused LoRA layers: bitsandbytes' own NF4 weights, de-quantized inside the
layers (wonderland.backends.torch_peft.fast.nf4), give the loss and LoRA gradients of PEFT's model on
bitsandbytes' own 4-bit layers.

bitsandbytes' CPU build runs here (a test dependency on Linux): its quantizer makes the weights and
its Linear4bit layers are the reference. The CUDA kernel that de-quantizes on the GPU is checked
against ``nf4.dequantize`` in Triton's interpreter (tests/test_triton_kernels.py) and against
bitsandbytes' CUDA kernel by ``bench/train_throughput.py --check`` on the GPU.
"""

from __future__ import annotations

import sys

import pytest
import torch

if not sys.platform.startswith("linux"):  # bitsandbytes' CPU wheels: Linux (CI runs there)
    pytest.skip("bitsandbytes' CPU build is a test dependency on Linux only", allow_module_level=True)

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from tests.helpers import chat_records  # noqa: E402
from tests.test_fused_lora import ALL, assert_same, loss_and_grads  # noqa: E402
from wonderland.backends.torch_peft import quantized  # noqa: E402
from wonderland.backends.torch_peft.batching import collate, summed_loss  # noqa: E402
from wonderland.backends.torch_peft.fast import nf4  # noqa: E402
from wonderland.backends.torch_peft.fast import training as tf  # noqa: E402

PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nested", [True, False])  # double quantization (QLoRA's, --quantize nf4's) or not
def test_the_reference_dequantization_is_bitsandbytes_own(dtype, nested):
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(0)).to(dtype)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
    buf = torch.full((96, 136), float("nan"), dtype=dtype)  # a row-strided view, as the layers' [W | B] buffers
    got = nf4.dequantize(nf4.from_state(packed, state), buf[:, :128])
    assert torch.equal(got, F.dequantize_4bit(packed, state))  # bit for bit: same float32 maths, one rounding
    assert torch.isnan(buf[:, 128:]).all()


def test_fp4_weights_are_refused_with_the_reason():
    packed, state = F.quantize_4bit(torch.randn(8, 64), quant_type="fp4")
    with pytest.raises(ValueError, match="not NF4"):
        nf4.from_state(packed, state)


def nf4_base(peft_wrapper: bool = True, seed: int = 0):
    """A random 2-layer llama (in-features multiples of the block size, 64) whose seven projections
    are bitsandbytes NF4 Linear4bit layers (double quantization, float32 compute). ``peft_wrapper``:
    PEFT will wrap them in its bitsandbytes LoRA layer (what a model loaded with a BitsAndBytesConfig
    gets), else in its plain lora.Linear."""
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(cfg)
    for layer in base.model.layers:
        for part, names in PROJECTIONS.items():
            for name in names:
                lin = getattr(getattr(layer, part), name)
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32,
                                      compress_statistics=True, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                             quant_type="nf4")
                setattr(getattr(layer, part), name, q.to("cpu"))  # .to quantizes
    base.is_loaded_in_4bit = peft_wrapper  # what transformers sets; PEFT then picks its bnb.Linear4bit
    return base


def lora(dropout: float = 0.0) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=ALL, task_type="CAUSAL_LM")


def nf4_tiny(peft_wrapper: bool, seed: int = 0):
    """nf4_base with a LoRA whose B is non-zero (every LoRA weight gets a non-trivial gradient)."""
    model = get_peft_model(nf4_base(peft_wrapper, seed), lora())
    for n, p in model.named_parameters():
        if "lora_" in n:
            torch.nn.init.normal_(p, std=0.2)
    return model


@pytest.mark.parametrize("peft_wrapper", [True, False])
def test_fused_layers_on_nf4_weights_match_peft_on_bitsandbytes(peft_wrapper):
    model = nf4_tiny(peft_wrapper)
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert (type(q_proj).__module__ == "peft.tuners.lora.bnb") == peft_wrapper and nf4.is_bnb_4bit(q_proj.base_layer)
    ids, labels, mask = collate(chat_records(4, 1, lo=5, hi=30, vocab=97), 0, torch.device("cpu"))
    ref = loss_and_grads(model, lambda: summed_loss(model, ids, labels, mask))
    opts = tf.prepare_model(model, torch.device("cpu"), tf.FastOptions())
    assert "fused_layers" in opts.applied, opts.fused_reason
    got = loss_and_grads(model, lambda: tf.summed_loss(model, ids, labels, mask))
    assert_same(got, ref, rtol=1e-4)  # float32: PEFT's LoRA and bitsandbytes' matmul round differently
    fused = model.get_base_model()._wonderland_fused
    # the frozen weights stay 4-bit; one arena, a layer's worth, is shared by both layers
    assert q_proj.base_layer.weight.dtype == torch.uint8
    assert len({L.arena.data_ptr() for L in fused.layers}) == 1 and all(len(L.quant) == 7 for L in fused.layers)
    # and PEFT's own forward (evaluation, sampling) still runs on bitsandbytes' layers: same loss again
    assert_same(loss_and_grads(model, lambda: summed_loss(model, ids, labels, mask)), ref)


def test_a_model_with_4_bit_and_float_projections_keeps_the_peft_modules():
    model = nf4_tiny(peft_wrapper=True)
    layer = model.get_base_model().model.layers[1]
    layer.mlp.down_proj.base_layer = torch.nn.Linear(128, 64, bias=False)
    opts = tf.prepare_model(model, torch.device("cpu"), tf.FastOptions())
    assert "fused_layers" not in opts.applied and "4-bit and float" in opts.fused_reason


def test_training_setup_takes_the_fused_layers_else_peft_s_k_bit_recipe():
    """quantized.with_lora, what TorchBackend's setup calls for --quantize nf4."""
    model, fast = quantized.with_lora(nf4_base(), lora(), torch.device("cpu"), fast_enabled=True)
    assert "fused_layers" in fast.applied and "compile_layers" not in fast.applied
    assert not model.get_base_model().is_gradient_checkpointing  # the fused layers keep less than a checkpointed model
    # LoRA dropout > 0: the fused layers do not apply; plain PEFT + bitsandbytes, checkpointed, input gradients on
    model, fast = quantized.with_lora(nf4_base(), lora(dropout=0.1), torch.device("cpu"), fast_enabled=True)
    base = model.get_base_model()
    assert fast is None and base.is_gradient_checkpointing and not hasattr(base, "_wonderland_fused")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert base.get_input_embeddings()(torch.tensor([[1]])).requires_grad  # the input-gradient hook of k-bit preparation
    assert nf4.is_bnb_4bit(base.model.layers[0].mlp.up_proj.base_layer)
