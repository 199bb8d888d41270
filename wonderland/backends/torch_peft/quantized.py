"""``--quantize nf4`` (QLoRA on CUDA): the base in bitsandbytes 4-bit NF4, LoRA on top.

The base is quantized on load with the QLoRA paper's recipe as transformers ships it:
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
bnb_4bit_compute_dtype=bfloat16)``. Then, as TorchBackend's setup does it (:func:`with_lora`):

* **the fast path** (:mod:`wonderland.backends.torch_peft.fast`) when its fused layers apply (Llama-style
  models, LoRA dropout 0): the 4-bit weights stay 4-bit and each layer de-quantizes them into one
  shared bf16 buffer right before its forward and its backward (``fast/nf4.py``, a Triton kernel),
  with everything else of the bf16 fast path (bf16 activations and embeddings, the fused loss without
  logits, packing, no gradient checkpointing);
* otherwise **plain PEFT + bitsandbytes**: ``peft.prepare_model_for_kbit_training`` (the non-quantized
  weights in float32, gradient checkpointing, input gradients) before ``get_peft_model``.

bitsandbytes is imported only here, and only for nf4, with an actionable message when it is missing.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from wonderland.errors import UserError
from wonderland.quantize import NF4_NEEDS

PLAIN_PATH_NOTE = "not the fast path: --quantize nf4 trains through plain PEFT + bitsandbytes"
FUSED_NOTE = "nf4 de-quantized in the fused layers"


def nf4_config():
    """The BitsAndBytesConfig of ``--quantize nf4``; a UserError when bitsandbytes is not installed."""
    try:
        importlib.import_module("bitsandbytes")
    except ImportError:
        raise UserError(NF4_NEEDS) from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def load_nf4(model_path: Path, device: torch.device):
    """The base model quantized to NF4 on load, on ``device`` (a CUDA device; anything else: UserError)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise UserError(NF4_NEEDS)
    from transformers import AutoModelForCausalLM

    config = nf4_config()
    index = device.index if device.index is not None else torch.cuda.current_device()
    return AutoModelForCausalLM.from_pretrained(model_path, quantization_config=config, dtype=torch.bfloat16,
                                                device_map={"": index})


def prepare_for_training(model):
    """PEFT's k-bit preparation: float32 norms and embeddings, gradient checkpointing (non-reentrant,
    as PyTorch asks), input gradients."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


def with_lora(base, lora_config, device: torch.device, fast_enabled: bool):
    """(LoRA model, fast-path options or None) for an NF4 ``base``: the fused layers when they apply,
    else plain PEFT + bitsandbytes (see the module's docstring). The fast path's other fallbacks
    (compiled or Liger-patched Hugging Face layers) are not tried on 4-bit layers."""
    from peft import get_peft_model

    from wonderland.backends.torch_peft.fast import training as torch_fast

    model = get_peft_model(base, lora_config)
    if fast_enabled:
        opts = torch_fast.FastOptions(compile_layers=False, liger_kernels=False)
        fast = torch_fast.prepare_model(model, device, opts)
        if "fused_layers" in fast.applied:
            return model, fast
    # the fused layers' check changed nothing: take the LoRA off again, prepare the base PEFT's way
    return get_peft_model(prepare_for_training(model.unload()), lora_config), None


def serving_quantize(quantize: str, device: torch.device) -> str:
    """What chat / compare / eval load an nf4 run on: NF4 on CUDA, the float base elsewhere (NF4 needs
    CUDA; the adapter then runs on the float base, off by the NF4 rounding)."""
    return quantize if quantize == "nf4" and device.type == "cuda" else "none"
