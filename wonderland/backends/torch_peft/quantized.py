"""``--quantize nf4`` (QLoRA on CUDA): the base in bitsandbytes 4-bit NF4, LoRA through plain PEFT.

The recipe of the QLoRA paper as transformers + PEFT ship it: ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bfloat16)``, then
``peft.prepare_model_for_kbit_training`` (the non-quantized weights in float32, gradient
checkpointing, input gradients) before ``get_peft_model``. The CUDA fast path
(:mod:`wonderland.backends.torch_peft.fast`) is not used for nf4: its fused layers read plain weight
matrices, so an nf4 run trains at plain PEFT + bitsandbytes speed.

bitsandbytes is imported only here, and only for nf4, with an actionable message when it is missing.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from wonderland.errors import UserError
from wonderland.quantize import NF4_NEEDS

FAST_PATH_NOTE = "not the fast path: --quantize nf4 trains through plain PEFT + bitsandbytes"


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
    """PEFT's k-bit preparation: float32 norms and embeddings, gradient checkpointing, input gradients."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)


def serving_quantize(quantize: str, device: torch.device) -> str:
    """What chat / compare / eval load an nf4 run on: NF4 on CUDA, the float base elsewhere (NF4 needs
    CUDA; the adapter then runs on the float base, off by the NF4 rounding)."""
    return quantize if quantize == "nf4" and device.type == "cuda" else "none"
