"""LoRA training throughput on one GPU: plain HF+PEFT vs Liger vs Unsloth vs wonderland's fast path (and QLoRA).

Every trainer runs in its own subprocess (Liger and torch.compile patch transformers globally)
on the same random-initialised Llama-shaped model (``1b``, ``3b``: Llama-3.2 shapes, tied
embeddings; ``8b``: Llama-3.1-8B shapes, hidden 4096, MLP 14336, 32 layers, 32 heads, 8 KV heads,
head_dim 128, untied embeddings; vocab 128256 for all; issue 18 runs 8b at ``--batch 4``), the
same LoRA (r=16, alpha=32, dropout 0, q,k,v,o,gate,up,down), the same data and AdamW lr 1e-4, no
gradient checkpointing (except ``wl_nf4_peft``, below). Each prints one JSON line; the parent adds
ratios to the plain baseline.

    python bench/train_throughput.py                       # 1B and 3B, default trainers
    python bench/train_throughput.py --sizes 1b --trainers hf,wl --steps 10
    python bench/train_throughput.py --sizes 1b --trainers unsloth,wl,hf --logdir $OUT  # Unsloth on PYTHONPATH
    python bench/train_throughput.py --sizes 8b --batch 4 --trainers wl_nf4,unsloth_4bit,wl,unsloth  # QLoRA rows
    python bench/train_throughput.py --check-nf4           # NF4 kernel and fused layers vs bitsandbytes/PEFT
    python bench/train_throughput.py --chat .benchdata/hatter_tokens.json   # + packed chat data
    python bench/train_throughput.py --prepare-chat DATA_DIR OUT.json       # tokenize (CPU, here)
    python bench/train_throughput.py --check               # fused loss/grad vs plain on the GPU

Trainers: ``hf`` (the bare loop ``model(ids, labels=ids).loss.backward(); opt.step()``, SDPA),
``hf_compile`` (the same, ``torch.compile(model)``), ``liger`` (the same after
``apply_liger_kernel_to_llama()``), ``unsloth`` (``FastLanguageModel.from_pretrained`` of the same
random-init model saved to a temporary folder with a stand-in tokenizer of the right vocab size, bf16,
no 4-bit, then ``FastLanguageModel.get_peft_model`` with the same LoRA, no gradient checkpointing, and
the same bare loop), ``wl`` (wonderland's default fast path, torch_fast.FastOptions(), through the
trainer's own per-step code: ``prepare_batch`` lays the records out on the host, ``prepared_loss``
computes the loss) and its variants in WL_VARIANTS (one lever changed each).

QLoRA (4-bit NF4 base): ``wl_nf4`` is wonderland's ``--quantize nf4`` path through the product's
own functions (wonderland/backends/torch_peft/quantized.py): ``load_nf4`` of the random init saved
to a folder (BitsAndBytesConfig nf4, double quantization, bf16 compute), then ``with_lora``, as
TorchBackend's setup calls it: the same LoRA through PEFT and the fast path's fused layers, which
keep the weights 4-bit and de-quantize each layer's into one shared bf16 buffer before its forward
and its backward (fast/nf4.py; no gradient checkpointing). ``wl_nf4_peft`` is the fallback for models
the fused layers do not take: ``prepare_for_training`` (peft.prepare_model_for_kbit_training:
float32 norms and embeddings, gradient checkpointing ON), the trainer's plain loss
(``batching.batch_loss``: padded batch, full logits). ``unsloth_4bit`` is the
``unsloth`` trainer with ``load_in_4bit=True`` (Unsloth's own NF4 load and kernels; no gradient
checkpointing, like ``unsloth``). The random init is saved once per size (``--model-cache``) and
reused by unsloth, unsloth_4bit and the wl_nf4 trainers, whose processes get the bundle's
bitsandbytes alone on their PYTHONPATH. MFU counts a 4-bit weight by its unpacked shape, and no
recomputation. ``--check-nf4``: the NF4 kernel against bitsandbytes' and the fused layers' loss
and gradients against PEFT's on bitsandbytes' layers, on the GPU.

``--timeline`` adds where the GPU idles and who launched the copies (bench/timeline.py) to each line.

Tokens are counted the same way for every trainer: real (non-padding) input tokens per step.
MFU counts 4 FLOPs per frozen weight per token (forward + input gradient; frozen weights get no
weight gradient), 6 per LoRA weight, and causal attention (6 * T * d_attn per token per layer),
over the H100 SXM dense bf16 peak of 989 TFLOP/s. Peak memory is torch.cuda.max_memory_allocated()
from just before the first training step (the model's weights included, loading transients not).

When ``unsloth`` ran in the same invocation, every line of that size gets ``vs_unsloth`` and
``peak_vs_unsloth`` (measured; for wl_nf4 against ``unsloth_4bit`` when that ran, ``vs_unsloth_of``
says which), when ``unsloth_4bit`` ran also ``vs_unsloth_4bit``, and a last ``summary`` line repeats
them; only when Unsloth was not measured (not asked for, or it failed) is the issue's reference
number used (bf16 trainers only), as
``vs_unsloth_reference_not_measured``. Unsloth is not installed by the project: bench/unsloth_bundle.sh
unpacks it (and what it imports that the GPU machine lacks) into .wheels/unsloth/ for PYTHONPATH.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEAK_FLOPS = 989e12  # H100 SXM bf16 dense, datasheet
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {  # Llama-3.2 1B / 3B (tied embeddings), Llama-3.1 8B (untied)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),  # smoke test of this script on a CPU
}
QUANTIZED = {"wl_nf4", "wl_nf4_peft", "unsloth_4bit"}  # 4-bit NF4 base (QLoRA): compared with each other
# Issue 7's reference numbers (H100 80GB, torch 2.11, transformers 5.17): NOT measured by this script.
UNSLOTH_REFERENCE = {"1b": {"tokens_per_s": 73_550, "peak_gib": 11.0}, "3b": {"tokens_per_s": 31_800, "peak_gib": 24.5}}


WL_VARIANTS = {  # wonderland's fast path: the default, and one lever changed at a time
    "wl": {},  # hand-written LoRA layers (fused_lora.py) + fused linear CE (fused_ce.py) + fused AdamW
    "wl_flash": dict(dense_attention="flash"),  # FlashAttention-2 (varlen) instead of SDPA's choice
    "wl_sdpa_hm": dict(dense_attention="sdpa_head_major"),  # SDPA on head-major q/k/v written by RoPE
    "wl_compile": dict(fused_layers=False),  # the previous default: regional torch.compile of the HF+PEFT layers
    "wl_liger": dict(liger_kernels=True, compile_layers=False),
    "wl_liger_compile": dict(liger_kernels=True),
    "wl_nopack": dict(pack=False),
    "wl_pack1024": dict(pack_capacity=1024),
    "wl_liger_loss": dict(liger_loss=True),  # Liger's fused linear cross-entropy instead of fused_ce.py
    "wl_static": dict(compile_dynamic=False),
    "wl_graph": {},  # experiment: forward + backward captured once as a CUDA graph (no host overhead at all)
}


# Llama-3.2's special token ids (the stand-in tokenizer puts them at the same places)
BOS_ID, EOS_ID, PAD_ID = 128000, 128001, 128004


def base_model(size: str, device: str = "cuda", seed: int = 0):
    """The random-initialised Llama-3.2-shaped model every trainer starts from (bf16 on CUDA)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                      bos_token_id=BOS_ID, eos_token_id=EOS_ID,  # no pad_token_id: it would zero an embedding row
                      **{"tie_word_embeddings": True, **SHAPES[size]})
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if device == "cuda" else torch.float32)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    model.config.use_cache = False
    return model


def build_model(size: str, device: str = "cuda", seed: int = 0):
    return with_lora(base_model(size, device, seed))


def lora_config():
    """The benchmark's LoRA: r 16, alpha 32, dropout 0, the seven projections."""
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, bias="none", task_type="CAUSAL_LM")


def with_lora(model):
    """The benchmark's LoRA through plain PEFT."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config())


# Unsloth must not reach the network (the GPU machine has none) nor send statistics.
UNSLOTH_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "UNSLOTH_OFFLINE": "1",
               "UNSLOTH_DISABLE_STATISTICS": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
               "UNSLOTH_COMPILE_LOCATION": "/tmp/unsloth_compiled_cache"}  # not the checkout
UNSLOTH_BUNDLE = REPO / ".wheels" / "unsloth"  # bench/unsloth_bundle.sh


def standin_tokenizer(vocab_size: int = 128256):
    """A word-level tokenizer with exactly vocab_size entries and Llama-3.2's special tokens at their
    ids: Unsloth loads a tokenizer with the model, and a wrong size would make it resize the embeddings."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = {BOS_ID: "<|begin_of_text|>", EOS_ID: "<|end_of_text|>", PAD_ID: "<|finetune_right_pad_id|>"}
    tk = Tokenizer(models.WordLevel({special.get(i, f"t{i}"): i for i in range(vocab_size)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=special[BOS_ID], eos_token=special[EOS_ID],
                                   pad_token=special[PAD_ID], unk_token="t0", model_max_length=131072)


def save_random_model(size: str, folder: Path, device: str = "cuda") -> Path:
    """The same random-init model as base_model() (same seed), saved as a Hugging Face folder with a
    stand-in tokenizer, for trainers that only load from a folder (Unsloth)."""
    model = base_model(size, device)
    model.save_pretrained(folder)
    vocab = model.config.vocab_size
    del model
    standin_tokenizer(vocab).save_pretrained(folder)
    return folder


@contextlib.contextmanager
def model_folder(args):
    """The shared random init as a Hugging Face folder: the parent's per-size --model-cache folder
    (saved by the first trainer that needs it, reused by the next), else a temporary one."""
    import torch

    cache = Path(args.model_cache) if args.model_cache else None
    folder = cache or Path(tempfile.mkdtemp(prefix="wl-model-"))
    try:
        if not (folder / SAVED).exists():
            save_random_model(args.size, folder, args.device)
            (folder / SAVED).write_text("ok")
        if args.device == "cuda":
            torch.cuda.empty_cache()
        yield folder
    finally:
        if cache is None:
            shutil.rmtree(folder, ignore_errors=True)


SAVED = ".saved"  # written last: the folder holds the whole model


def unsloth_model(args, load_in_4bit: bool = False):
    """Unsloth's LoRA model of the shared random init: FastLanguageModel.from_pretrained (bf16, or
    load_in_4bit: Unsloth's own bitsandbytes NF4 load; no gradient checkpointing) +
    FastLanguageModel.get_peft_model with the same LoRA."""
    import torch
    from unsloth import FastLanguageModel

    with model_folder(args) as folder:
        model, _ = FastLanguageModel.from_pretrained(
            str(folder), max_seq_length=args.seq, dtype=torch.bfloat16, load_in_4bit=load_in_4bit, load_in_8bit=False,
            full_finetuning=False, fix_tokenizer=False, use_gradient_checkpointing=False,
            **({} if args.device == "cuda" else {"device_map": {"": args.device}}))
    return FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, lora_dropout=0, target_modules=TARGETS, bias="none",
        use_gradient_checkpointing=False, random_state=0)


def nf4_model(args, fused: bool = True):
    """(model, fast-path options or None): wonderland's ``--quantize nf4`` model of the shared random
    init, through the product's own code (wonderland/backends/torch_peft/quantized.py, as
    TorchBackend's setup calls it): load_nf4 (NF4, double quantization, bf16 compute), then
    ``with_lora`` (the fused layers, de-quantizing NF4 inside them), or, ``fused=False`` (wl_nf4_peft),
    its fallback: prepare_for_training (peft.prepare_model_for_kbit_training: float32
    norms/embeddings, gradient checkpointing ON, input gradients) and the same LoRA through PEFT."""
    import torch

    from wonderland.backends.torch_peft import quantized

    with model_folder(args) as folder:
        base = quantized.load_nf4(folder, torch.device(args.device))
    return quantized.with_lora(base, lora_config(), torch.device(args.device), fast_enabled=fused)


def preflight_estimate(args, quantize: str) -> dict | None:
    """wonderland's pre-flight estimate (wonderland/preflight.py) of this shape, batch and LoRA, from the
    saved random init (None when no trainer of this size saved it); ``without_runtime_gib`` compares with
    ``peak_gib`` (torch's allocator: no CUDA context)."""
    folder = Path(args.model_cache) if args.model_cache else None
    if folder is None or not (folder / SAVED).exists():
        return None
    from wonderland import preflight
    from wonderland.config import TrainConfig

    config = TrainConfig(batch_size=args.batch, max_seq_len=args.seq, rank=16, alpha=32.0, dropout=0.0,
                         quantize=quantize, kl=0.0, device=args.device)
    est = preflight.estimate(config, folder, "torch")
    return {"total_gib": round(est.total / 2**30, 2), "without_runtime_gib": round((est.total - est.runtime) / 2**30, 2)}


def weight_numel(p) -> int:
    """Elements of a weight matrix; a bitsandbytes 4-bit weight counts its unpacked shape."""
    qs = getattr(p, "quant_state", None)
    return qs.shape.numel() if qs is not None else p.numel()


def flops_per_step(model, lengths: list[int]) -> float:
    cfg = model.get_base_model().config
    frozen = sum(weight_numel(p) for n, p in model.named_parameters() if not p.requires_grad and p.dim() == 2)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    d_attn = cfg.num_attention_heads * cfg.head_dim
    tokens = sum(lengths)
    return (4 * frozen + 6 * lora) * tokens + 6 * d_attn * cfg.num_hidden_layers * sum(t * t for t in lengths)


def random_batches(steps: int, batch: int, seq: int, vocab: int, seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(steps)]


def chat_batches(path: str, steps: int, batch: int, seed: int = 1):
    """Lists of Encoded records: a seeded shuffle of the tokenized chat data, cycled."""
    import random

    from wonderland.chat_format import Encoded

    recs = [Encoded(r["input_ids"], r["labels"]) for r in json.loads(Path(path).read_text())]
    rng, out, pool = random.Random(seed), [], []
    for _ in range(steps):
        step = []
        while len(step) < batch:
            if not pool:
                pool = recs[:]
                rng.shuffle(pool)
            step.append(pool.pop())
        out.append(step)
    return out


def worker(args) -> dict:
    if args.trainer.startswith("unsloth"):  # before transformers/peft are imported: Unsloth patches them on import
        for k, v in UNSLOTH_ENV.items():
            os.environ.setdefault(k, v)
        import unsloth  # noqa: F401
    import torch

    from wonderland.backends.torch_peft.fast import training as tf
    from wonderland.backends.torch_peft.batching import collate

    torch.backends.cuda.matmul.allow_tf32 = True
    trainer, dev = args.trainer, torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if trainer == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()  # rope, rms_norm, swiglu, fused linear CE (class-wide patch)
    t_load = time.perf_counter()
    if trainer.startswith("unsloth"):
        model = unsloth_model(args, load_in_4bit=trainer == "unsloth_4bit")
    elif trainer in ("wl_nf4", "wl_nf4_peft"):
        model, nf4_fast = nf4_model(args, fused=trainer == "wl_nf4")
    else:
        model = build_model(args.size, args.device)
    load_s = time.perf_counter() - t_load
    params = [p for p in model.parameters() if p.requires_grad]
    steps = args.warmup + args.steps
    if args.chat:
        data = chat_batches(args.chat, steps, args.chat_batch)
    else:
        data = random_batches(steps, args.batch, args.seq, model.config.vocab_size)

    if trainer == "wl_nf4_peft":  # what TorchBackend.train does per step for --quantize nf4 off the fast path
        from wonderland.backends.torch_peft.batching import batch_loss
        from wonderland.chat_format import Encoded

        opt = torch.optim.AdamW(params, lr=1e-4)
        if not args.chat:
            data = [[Encoded(row.tolist(), row.tolist()) for row in b] for b in data]

        def step_fn(b):  # padded batch, full logits (batching.batch_loss): summed loss, labelled, real tokens
            loss, n, tokens = batch_loss(model, b, PAD_ID, dev)
            return loss / n, tokens, [len(e.input_ids) for e in b]
        levers = ["nf4", "double_quant", "bf16_compute", "prepare_model_for_kbit_training", "gradient_checkpointing"]
    elif trainer.startswith("wl"):
        if trainer == "wl_nf4":  # with_lora prepared it (the fused layers on NF4 weights)
            opts = nf4_fast
        else:
            opts = tf.FastOptions(**WL_VARIANTS[trainer])
            tf.prepare_model(model, dev, opts)
        opt = tf.make_optimizer(params, 1e-4, 0.0, opts)

        if not args.chat and trainer != "wl_graph":  # the trainer's own data path: records, laid out on the host
            from wonderland.chat_format import Encoded

            data = [[Encoded(row.tolist(), row.tolist()) for row in b] for b in data]

        def step_fn(b):  # what TorchBackend.train does per step (its prepare_batch + prepared_loss)
            loss, n, tokens = tf.prepared_loss(model, tf.prepare_batch(b, 0, dev, opts), opts)
            return loss / n, tokens, [len(e.input_ids) for e in b]
        levers = opts.applied + (["nf4", "double_quant", "dequantized_in_fused_layers"] if trainer == "wl_nf4" else [])
    else:
        if trainer == "hf_compile":
            model = torch.compile(model)
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step_fn(b):
            if args.chat:
                ids, labels, mask = collate(b, 0, dev)
                out = model(input_ids=ids, attention_mask=mask, labels=labels)
                return out.loss, int(mask.sum()), [len(e.input_ids) for e in b]
            ids = b.to(dev, non_blocking=True)
            return model(input_ids=ids, labels=ids).loss, ids.numel(), [ids.shape[1]] * ids.shape[0]
        levers = [trainer]

    def train_step(b):
        loss, tokens, lengths = step_fn(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), tokens, lengths

    model.train()
    sync()
    if dev.type == "cuda":  # from here: weights + training, not loading transients (Unsloth loads from disk)
        torch.cuda.reset_peak_memory_stats()
    if trainer == "wl_graph":
        train_step = graphed_step(model, opt, params, data[0].to(dev), args.warmup)
    losses, tok, flops, t0 = [], 0, 0.0, 0.0
    t_first = time.perf_counter()
    for i, b in enumerate(data):
        if i == args.warmup:
            sync()
            t0 = time.perf_counter()
            warm_s = t0 - t_first
        loss, tokens, lengths = train_step(b)
        if i >= args.warmup:
            tok += tokens
            flops += flops_per_step(model if trainer != "hf_compile" else model._orig_mod, lengths)
        losses.append(loss)
    sync()
    dt = time.perf_counter() - t0
    prof = profile_top(train_step, data[-2:], args.profile_top) if args.profile else None
    timeline = None
    if args.timeline:
        sys.path.insert(0, str(REPO / "bench"))
        from timeline import profile_steps

        timeline = profile_steps(train_step, data[-2:])
    if trainer.startswith("unsloth"):
        from importlib import metadata

        levers = [f"unsloth {metadata.version('unsloth')}"] + (["load_in_4bit"] if trainer == "unsloth_4bit" else [])
    levers = levers + [f"load {load_s:.1f}s"]
    estimate = preflight_estimate(args, "nf4" if trainer == "wl_nf4" else "none") if trainer in ("wl", "wl_nf4") else None
    return {"preflight": estimate, "profile_ms_per_step": prof, "timeline": timeline, "trainer": trainer, "size": args.size, "data": "chat" if args.chat else f"random {args.batch}x{args.seq}",
            "tokens_per_s": round(tok / dt), "mfu": round(flops / dt / PEAK_FLOPS, 4),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev.type == "cuda" else None,
            "reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if dev.type == "cuda" else None, "steps": args.steps,
            "step_ms": round(1000 * dt / args.steps, 1), "warmup_s": round(warm_s, 1),
            "loss_first": round(float(losses[0]), 4), "loss_last": round(float(losses[-1]), 4), "levers": levers,
            "lora_params": sum(p.numel() for p in params)}


def graphed_step(model, opt, params, static_ids, warmup: int):
    """Experiment (wl_graph): forward + backward of the fused path captured once as a CUDA graph and
    replayed every step (the optimizer runs eagerly). Random 8 x 1024 data only: every target is
    a real label, so the loss needs no host-side count."""
    import torch

    from wonderland.backends.torch_peft.fast import training as tf

    base = tf._base(model)
    n = static_ids.shape[0] * (static_ids.shape[1] - 1)

    def fwd_bwd():
        hidden = base._wonderland_fused.hidden_states(static_ids)
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        loss = tf.linear_cross_entropy_sum(h, base.lm_head.weight, static_ids[:, 1:].reshape(-1)) / n
        loss.backward()
        return loss.detach()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (kernel selection, workspaces) outside the capture
        for _ in range(max(1, warmup)):
            fwd_bwd()
            opt.zero_grad(set_to_none=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = fwd_bwd()
    grads = [p.grad for p in params]

    def train_step(b):
        static_ids.copy_(b, non_blocking=True)
        graph.replay()
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)
        return static_loss.clone(), b.numel(), [b.shape[1]] * b.shape[0]
    return train_step


def profile_top(train_step, batches, top: int = 10) -> dict:
    """GPU time per step: the kernels that take the most, and totals by kind of kernel (ms)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for b in batches:
            train_step(b)
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    kinds: dict[str, float] = {}
    for e in events:
        k = e.key.lower()
        kind = ("attention" if any(w in k for w in ("flash", "sdpa", "fmha", "attention")) else
                "matmul" if any(w in k for w in ("gemm", "nvjet", "cutlass", "xmma", "cublas")) else
                "triton" if k.startswith(("triton", "_")) else "other")
        kinds[kind] = kinds.get(kind, 0.0) + e.device_time_total / 1000 / len(batches)
    events.sort(key=lambda e: -e.device_time_total)
    return {"total": round(sum(kinds.values()), 1), "by_kind": {k: round(v, 1) for k, v in kinds.items()},
            "top": [[e.key[:60], round(e.device_time_total / 1000 / len(batches), 2)] for e in events[:top]]}


def check_kernels() -> dict:
    """Each Triton kernel of the fused layers vs its plain-PyTorch definition (float32 maths in both),
    on fresh random bf16 inputs for 1B, 3B and SmolLM2-135M head layouts: max |diff| / max |ref|."""
    import torch

    from wonderland.backends.torch_peft.fast import fused_ops as fl
    from wonderland.backends.torch_peft.fast.triton_kernels import TritonKernels

    g = torch.Generator(device="cuda").manual_seed(5)
    out = {}
    for name, (H, I, nh, nkv, hd) in {"1b": (2048, 8192, 32, 8, 64), "3b": (3072, 8192, 24, 8, 128),
                                      "smollm2": (576, 1536, 9, 3, 64)}.items():
        def r(*shape):
            return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32).to(torch.bfloat16)
        N, tk, ref = 1000, TritonKernels(1e-5, nh, nkv, hd), fl.Kernels(1e-5, nh, nkv, hd)
        errs = {}

        def cmp(key, a, b):
            for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                e = float((x.float() - y.float()).abs().max() / y.float().abs().max())
                errs[key] = max(errs.get(key, 0.0), e)
        x, w, dy, dres = r(N, H), r(H), r(N, H), r(N, H)
        cmp("rms_fwd", tk.rms_fwd(x, w), ref.rms_fwd(x, w))
        _, xhat, rstd = ref.rms_fwd(x, w)
        cmp("rms_bwd", tk.rms_bwd(dy, xhat, rstd, w, dres), ref.rms_bwd(dy, xhat, rstd, w, dres))
        qkv, ang = r(N, (nh + 2 * nkv) * hd), r(N, hd // 2).float() * 3
        cos, sin = (torch.cat([f(ang)] * 2, -1).to(torch.bfloat16) for f in (torch.cos, torch.sin))
        cmp("rope_fwd", tk.rope_fwd(qkv, cos, sin), ref.rope_fwd(qkv, cos, sin))
        cmp("rope_fwd_head_major", tk.rope_fwd(qkv, cos, sin, T=250), ref.rope_fwd(qkv, cos, sin, T=250))
        dq, dk, dv = r(N, nh, hd), r(N, nkv, hd), r(N, nkv, hd)
        cmp("rope_bwd", tk.rope_bwd(dq, dk, dv, cos, sin), ref.rope_bwd(dq, dk, dv, cos, sin))
        hm = [t.view(4, 250, t.shape[1], hd).transpose(1, 2).contiguous() for t in (dq, dk, dv)]
        cmp("rope_bwd_head_major", tk.rope_bwd(*hm, cos, sin, T=250), ref.rope_bwd(dq, dk, dv, cos, sin))
        buf = torch.full((N, H + 48), float("nan"), device="cuda", dtype=torch.bfloat16)
        cmp("rms_fwd_strided_out", tk.rms_fwd(x, w, out=buf[:, :H])[0], ref.rms_fwd(x, w)[0])
        gu, dh = r(N, 2 * I), r(N, I)
        cmp("swiglu_fwd", tk.swiglu_fwd(gu), ref.swiglu_fwd(gu))
        buf = torch.full((N, I + 16), float("nan"), device="cuda", dtype=torch.bfloat16)
        cmp("swiglu_fwd_strided_out", tk.swiglu_fwd(gu, out=buf[:, :I]), ref.swiglu_fwd(gu))
        expect = ref.swiglu_bwd_(dh.clone(), gu.clone())  # both write d(gate | up) over gu
        cmp("swiglu_bwd", tk.swiglu_bwd_(dh.clone(), gu.clone()), expect)
        wide = torch.cat([gu, r(N, 32)], 1)  # gate | up with spare columns, as the layers keep it
        cmp("swiglu_bwd_strided", tk.swiglu_bwd_(dh.clone(), wide[:, : 2 * I]), expect)
        buf = torch.full((N, H + 48), float("nan"), device="cuda", dtype=torch.bfloat16)
        res = torch.cat([dres, r(N, 48)], 1)
        cmp("rms_bwd_strided", tk.rms_bwd(dy, xhat, rstd, w, res[:, :H], out=buf[:, :H]), ref.rms_bwd(dy, xhat, rstd, w, dres))
        buf = torch.full((N, qkv.shape[1] + 48), float("nan"), device="cuda", dtype=torch.bfloat16)
        cmp("rope_bwd_strided_out", tk.rope_bwd(dq, dk, dv, cos, sin, out=buf[:, : qkv.shape[1]]), ref.rope_bwd(dq, dk, dv, cos, sin))
        out[name] = {k: round(v, 5) for k, v in errs.items()}
    return out


def check(args) -> dict:
    """Fused loss and LoRA gradients vs the plain path on the GPU, bf16, one batch (1B shapes, real
    model width; random tokens). Also packed vs padded loss on variable-length records."""
    import torch

    from wonderland.backends.torch_peft.fast import training as tf
    from wonderland.backends.torch_peft.batching import collate, summed_loss
    from wonderland.chat_format import Encoded

    dev = torch.device("cuda")
    model = build_model("1b")
    for n, p in model.named_parameters():  # non-zero LoRA B so every LoRA gradient is non-trivial
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, 128256, (4, 1024), generator=torch.Generator().manual_seed(3)).to(dev)

    def grads(fn):
        model.zero_grad(set_to_none=True)
        loss, n = fn()
        (loss / n).backward()
        return float(loss / n), torch.cat([p.grad.float().flatten() for p in params])

    mask = torch.ones_like(ids)
    # float32 reference: the same (bf16-valued) weights upcast, the plain path
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    model.float()
    ref32_loss, ref32_g = grads(lambda: summed_loss(model, ids, ids, mask))
    for n, p in model.named_parameters():
        p.data = p.data.to(dtypes[n])
    ref_loss, ref_g = grads(lambda: summed_loss(model, ids, ids, mask))
    out = {"check": "gpu-equivalence", "loss_fp32_ref": round(ref32_loss, 5), "loss_plain": round(ref_loss, 5),
           "grad_rel_err_plain_vs_fp32": float((ref_g - ref32_g).norm() / ref32_g.norm())}

    def record(name, loss, g):
        out[f"loss_{name}"] = round(loss, 5)
        out[f"grad_rel_err_{name}_vs_plain"] = float((g - ref_g).norm() / ref_g.norm())
        out[f"grad_rel_err_{name}_vs_fp32"] = float((g - ref32_g).norm() / ref32_g.norm())

    for name, kw in (("fused_ce", dict(use_liger=False)), ("liger", dict(use_liger=True))):
        record(name, *grads(lambda: tf.summed_loss(model, ids, ids, **kw)))
    out["kernels_max_rel_err"] = check_kernels()
    opts = tf.prepare_model(model, dev, tf.FastOptions())
    recs = [Encoded(row.tolist(), row.tolist()) for row in ids.cpu()]
    record("fast_default", *grads(lambda: tf.prepared_loss(model, tf.prepare_batch(recs, 0, dev, opts), opts)[:2]))
    out["levers"] = opts.applied
    g = torch.Generator().manual_seed(4)
    recs = [Encoded(t := torch.randint(0, 49152, (n,), generator=g).tolist(), [-100] * 5 + t[5:])
            for n in (300, 120, 77, 500, 41, 260)]
    with torch.no_grad():
        padded, n_pad = summed_loss(model, *collate(recs, 0, dev))
        p = tf.pack(recs, 0, dev)
        packed, n_pack = tf.summed_loss(model, p.input_ids, p.labels, None, p.position_ids, packed=p)
    out.update(pack_rows=list(p.input_ids.shape), loss_padded=float(padded / n_pad), loss_packed=float(packed / n_pack),
               pack_rel_err=abs(float(packed / n_pack) / float(padded / n_pad) - 1), labelled=[n_pad, n_pack])
    return out


def check_nf4() -> dict:
    """--quantize nf4 on the GPU: the fused layers' NF4 kernel vs bitsandbytes' own de-quantization
    (bit-exact expected, and the time of each), and the fused layers' loss and LoRA gradients on an
    NF4 1B model vs PEFT's forward on bitsandbytes' layers (both bf16), one batch of random tokens."""
    import torch

    try:
        import bitsandbytes.functional as bf
    except ImportError:
        bundle = bitsandbytes_only(str(UNSLOTH_BUNDLE), Path(tempfile.mkdtemp(prefix="wl-bnb-")))
        if bundle is None:
            return {"skipped": "no bitsandbytes (bench/unsloth_bundle.sh bundles it)"}
        sys.path.insert(0, str(bundle))
        import bitsandbytes.functional as bf
    from wonderland.backends.torch_peft.fast import nf4
    from wonderland.backends.torch_peft.fast import training as tf
    from wonderland.backends.torch_peft.fast.triton_kernels import TritonKernels
    from wonderland.backends.torch_peft import quantized
    from wonderland.backends.torch_peft.batching import summed_loss

    out: dict = {"check": "nf4", "kernel": {}}
    g = torch.Generator(device="cuda").manual_seed(6)
    for shape in ((6144, 4096), (28672, 4096), (4096, 14336)):  # 8B's q|k|v, gate|up, down
        w = torch.randn(*shape, generator=g, device="cuda").to(torch.bfloat16)
        packed, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        ref = bf.dequantize_4bit(packed, state)
        buf = torch.empty(shape[0], shape[1] + 64, device="cuda", dtype=torch.bfloat16)
        got = TritonKernels.dequant_nf4(nf4.from_state(packed, state), buf[:, : shape[1]])
        ms = {}
        for name, fn in (("wl", lambda: TritonKernels.dequant_nf4(nf4.from_state(packed, state), buf[:, : shape[1]])),
                         ("bnb", lambda: bf.dequantize_4bit(packed, state))):
            fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            ms[name] = round(1000 * (time.perf_counter() - t) / 20, 3)
        out["kernel"]["x".join(map(str, shape))] = {"bit_exact": bool(torch.equal(got, ref)),
                                                    "max_abs_diff": float((got.float() - ref.float()).abs().max()),
                                                    "ms_wl_strided": ms["wl"], "ms_bitsandbytes": ms["bnb"]}
    folder = save_random_model("1b", Path(tempfile.mkdtemp(prefix="wl-nf4-check-")))
    model = with_lora(quantized.load_nf4(folder, torch.device("cuda")))
    shutil.rmtree(folder, ignore_errors=True)
    for n, p in model.named_parameters():  # non-zero LoRA B so every LoRA gradient is non-trivial
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, 128256, (4, 1024), generator=torch.Generator().manual_seed(3)).cuda()

    def grads(fn):
        model.zero_grad(set_to_none=True)
        loss, n = fn()
        (loss / n).backward()
        return float(loss.detach() / n), torch.cat([p.grad.float().flatten() for p in params])
    mask = torch.ones_like(ids)
    # float32 reference: the same NF4 weights (bf16-exact when de-quantized) computed in float32
    floats = {n: p.dtype for n, p in model.named_parameters() if p.is_floating_point()}
    bnb_layers = [m for m in model.modules() if nf4.is_bnb_4bit(m)]
    for n, p in model.named_parameters():
        if n in floats:
            p.data = p.data.float()
    for m in bnb_layers:
        m.compute_dtype = torch.float32
    ref32_loss, ref32_g = grads(lambda: summed_loss(model, ids, ids, mask))
    for n, p in model.named_parameters():
        if n in floats:
            p.data = p.data.to(floats[n])
    for m in bnb_layers:
        m.compute_dtype = torch.bfloat16
    ref_loss, ref_g = grads(lambda: summed_loss(model, ids, ids, mask))
    opts = tf.prepare_model(model, torch.device("cuda"), tf.FastOptions(compile_layers=False))
    loss, g_fused = grads(lambda: tf.summed_loss(model, ids, ids))
    err = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    out.update(levers=opts.applied, loss_fp32_ref=round(ref32_loss, 5), loss_peft_bnb=round(ref_loss, 5),
               loss_fused=round(loss, 5), grad_rel_err_peft_bnb_vs_fp32=err(ref_g, ref32_g),
               grad_rel_err_fused_vs_fp32=err(g_fused, ref32_g), grad_rel_err_fused_vs_peft_bnb=err(g_fused, ref_g))
    return out


def e2e(args) -> list[dict]:
    """The real trainer (wonderland.train.train -> TorchBackend.train) on a chat dataset, plain path
    (twice: the run-to-run noise floor) and fast path, on a random-init model of the first size's
    shapes with the given tokenizer: tokens/s and peak memory from metrics.jsonl, and how far the
    adapters of the runs are apart."""
    import shutil
    import statistics
    import tempfile

    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from wonderland.backends.torch_peft.fast import training as tf
    from wonderland.config import TrainConfig
    from wonderland.train import train

    tok_dir, data_dir = args.e2e
    work = Path(tempfile.mkdtemp(prefix="wl-e2e-"))
    os.environ["WONDERLAND_HOME"] = str(work / "home")
    size = args.sizes.split(",")[0]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(vocab_size=len(tok), rope_theta=500000.0, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      **{"tie_word_embeddings": True, **SHAPES[size]})
    torch.manual_seed(0)
    with torch.device(args.device):
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(work / "model")
    for f in Path(tok_dir).iterdir():
        shutil.copy(f, work / "model" / f.name)
    train_cfg = dict(model=str(work / "model"), backend="torch", device=args.device, iters=args.e2e_iters,
                     batch_size=args.chat_batch, lr=1e-4, warmup=2, rank=16, alpha=32, max_seq_len=1024, val_every=0,
                     save_every=0, targets=",".join(TARGETS), dtype="bfloat16")
    out, adapters = [], {}
    for label, mode in (("plain", "0"), ("plain_again", "0"), ("fast", "1")):
        os.environ[tf.ENV] = mode
        t0 = time.perf_counter()
        run = train(TrainConfig(**train_cfg), data_dir, out=str(work / label), log=lambda m: None)
        wall = time.perf_counter() - t0
        steps = [json.loads(line) for line in run.metrics.read_text().splitlines() if '"event": "step"' in line]
        adapters[label] = load_file(str(run.adapter / "adapter_model.safetensors"))
        timed = steps[3:]  # after compilation / autotuning
        out.append({"e2e": label, "size": size, "iters": len(steps), "records_per_step": args.chat_batch,
                    "tokens_per_s": round(sum(s["tokens"] for s in timed) / sum(s["tokens"] / s["tokens_per_second"] for s in timed)),
                    "median_step_tokens": statistics.median(s["tokens"] for s in steps), "wall_s": round(wall, 1),
                    "peak_gib": round(steps[-1]["peak_memory_gb"] * 1e9 / 2**30, 2),
                    "loss_first": round(steps[0]["loss"], 4), "loss_last": round(steps[-1]["loss"], 4)})
        torch.cuda.empty_cache() if args.device == "cuda" else None
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def dist(a, b):  # relative distance of the LoRA B matrices (zero at init), and max abs diff of all
        keys = sorted(adapters[a])
        bs = [k for k in keys if "lora_B" in k]
        num = sum(float((adapters[a][k].float() - adapters[b][k].float()).norm() ** 2) for k in bs) ** 0.5
        den = sum(float(adapters[b][k].float().norm() ** 2) for k in bs) ** 0.5
        return {"lora_B_rel_diff": num / den, "max_abs_diff": max(float((adapters[a][k].float() - adapters[b][k].float()).abs().max()) for k in keys)}

    out.append({"e2e": "adapter_distance", "plain_again_vs_plain": dist("plain_again", "plain"), "fast_vs_plain": dist("fast", "plain")})
    shutil.rmtree(work, ignore_errors=True)
    return out


def prepare_chat(data_dir: str, out: str) -> None:
    """Tokenize a chat dataset's train.jsonl with the embedded model's tokenizer (here, on the CPU)."""
    from transformers import AutoTokenizer

    from wonderland.chat_format import encode_chat
    from wonderland.data import load_chat_jsonl
    from wonderland.models import embedded_model_path

    tok = AutoTokenizer.from_pretrained(embedded_model_path())
    recs = [encode_chat(tok, r["messages"], 1024) for r in load_chat_jsonl(Path(data_dir) / "train.jsonl")]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps([{"input_ids": e.input_ids, "labels": e.labels} for e in recs]))
    lens = sorted(len(e.input_ids) for e in recs)
    print(json.dumps({"records": len(recs), "tokens_min": lens[0], "tokens_median": lens[len(lens) // 2], "tokens_max": lens[-1]}))


def bitsandbytes_only(bundle: str, folder: Path) -> Path | None:
    """A PYTHONPATH folder holding only the bundle's bitsandbytes (package + dist-info, as links), for
    wl_nf4: wonderland's nf4 path needs bitsandbytes but nothing else of Unsloth's bundle."""
    found = [p for p in Path(bundle).glob("bitsandbytes*") if p.name == "bitsandbytes" or p.name.endswith(".dist-info")]
    if not found:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    for p in found:
        if not (folder / p.name).exists():
            (folder / p.name).symlink_to(p.resolve())
    return folder


def versions(unsloth_path: str | None = None) -> dict:
    from importlib import metadata

    import torch

    out = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for pkg in ("torch", "transformers", "peft", "liger-kernel", "triton"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    if unsloth_path:  # what the unsloth worker gets on its PYTHONPATH
        found = {d.metadata["Name"].lower().replace("-", "_"): d.version for d in metadata.distributions(path=[unsloth_path])}
        for pkg in ("unsloth", "unsloth_zoo", "bitsandbytes", "torchao", "trl", "datasets"):
            out[pkg] = found.get(pkg)
    return out


def add_ratios(r: dict, results: dict, runs: list, size: str, chat) -> None:
    """Ratios to the plain HF baseline and to Unsloth measured in this invocation (``vs_unsloth``:
    to ``unsloth_4bit`` for wl_nf4 when that ran, else to bf16 ``unsloth``; ``vs_unsloth_of`` names
    which; ``vs_unsloth_4bit`` on every line when Unsloth's QLoRA ran); the issue's reference
    Unsloth number only for bf16 trainers when Unsloth was not measured here (not asked for, or it failed)."""
    if "tokens_per_s" not in r:
        return

    def measured(name):
        base = results.get((size, name, chat))
        return base if name != r["trainer"] and base and "tokens_per_s" in base else None
    unsloth = "unsloth_4bit" if r["trainer"] in QUANTIZED and measured("unsloth_4bit") else "unsloth"
    for name, key in (("hf", "vs_hf"), (unsloth, "vs_unsloth"), ("unsloth_4bit", "vs_unsloth_4bit")):
        if base := measured(name):
            r[key] = round(r["tokens_per_s"] / base["tokens_per_s"], 2)
            if r.get("peak_gib") and base.get("peak_gib"):
                r["peak_" + key] = round(r["peak_gib"] / base["peak_gib"], 2)
            if key == "vs_unsloth":
                r["vs_unsloth_of"] = name
    unsloth_pending = (size, "unsloth", chat) in {(s, t, c) for s, t, c in runs} and (size, "unsloth", chat) not in results
    if (not chat and "vs_unsloth" not in r and not unsloth_pending and not r["trainer"].startswith("unsloth")
            and r["trainer"] not in QUANTIZED and size in UNSLOTH_REFERENCE):
        r["vs_unsloth_reference_not_measured"] = round(r["tokens_per_s"] / UNSLOTH_REFERENCE[size]["tokens_per_s"], 2)
    elif "vs_unsloth" in r:
        r.pop("vs_unsloth_reference_not_measured", None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1b,3b")
    p.add_argument("--trainers", default="hf,liger,wl")
    p.add_argument("--steps", type=int, default=15, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--chat", help="tokenized chat records (from --prepare-chat): also bench --chat-trainers on them (first size)")
    p.add_argument("--chat-trainers", default="hf,wl")
    p.add_argument("--chat-batch", type=int, default=64, help="records per step on chat data")
    p.add_argument("--profile", action="store_true", help="add the top GPU kernels per step to each trainer's line")
    p.add_argument("--profile-top", type=int, default=10, help="kernels listed by --profile")
    p.add_argument("--timeline", action="store_true", help="add where the GPU idles (bench/timeline.py) to each trainer's line")
    p.add_argument("--check", action="store_true", help="only the GPU equivalence check")
    p.add_argument("--check-nf4", action="store_true", help="only the GPU check of --quantize nf4's fused layers")
    p.add_argument("--e2e", nargs=2, metavar=("TOKENIZER_DIR", "DATA_DIR"),
                   help="only the end-to-end run of `wonderland train` (plain twice, fast once) on a chat dataset")
    p.add_argument("--e2e-iters", type=int, default=20)
    p.add_argument("--prepare-chat", nargs=2, metavar=("DATA_DIR", "OUT"))
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test with --sizes tiny)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per trainer subprocess")
    p.add_argument("--deadline", type=int, default=0, help="seconds for the whole invocation: later trainers get what is left")
    p.add_argument("--unsloth-path", help="folder put first on PYTHONPATH for the unsloth trainer only (default .wheels/unsloth if present)")
    p.add_argument("--logdir", help="write each trainer subprocess's command, stdout and stderr to LOGDIR/SIZE-TRAINER.log")
    p.add_argument("--model-cache", help="folder for the random init saved once per size for the trainers that load "
                   "from disk (unsloth, unsloth_4bit, wl_nf4); deleted after the size (default: a temporary folder)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--trainer", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.prepare_chat:
        prepare_chat(*args.prepare_chat)
        return 0
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return 0
    if args.e2e:
        for line in e2e(args):
            print(json.dumps(line), flush=True)
        return 0
    if args.check:
        print(json.dumps(check(args)), flush=True)
        return 0
    if args.check_nf4:
        print(json.dumps(check_nf4()), flush=True)
        return 0
    unsloth_path = args.unsloth_path or (str(UNSLOTH_BUNDLE) if UNSLOTH_BUNDLE.is_dir() else None)
    print(json.dumps({"versions": versions(unsloth_path), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}), flush=True)
    runs = [(s, t, None) for s in args.sizes.split(",") for t in args.trainers.split(",") if t]
    if args.chat:
        runs += [(args.sizes.split(",")[0], t, args.chat) for t in args.chat_trainers.split(",") if t]
    results: dict[tuple, dict] = {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    # Only Unsloth's process sees its bundle (datasets, trl, bitsandbytes...: peft would import bitsandbytes too);
    # wl_nf4's sees bitsandbytes alone from it (links in a temporary folder).
    env_unsloth = {**env, "PYTHONPATH": os.pathsep.join([unsloth_path, env["PYTHONPATH"]]) if unsloth_path else env["PYTHONPATH"]}
    cache_root = Path(args.model_cache or tempfile.mkdtemp(prefix="wl-bench-models-"))
    bnb = bitsandbytes_only(unsloth_path, cache_root / "bnb-path") if unsloth_path else None
    env_nf4 = {**env, "PYTHONPATH": os.pathsep.join([str(bnb), env["PYTHONPATH"]]) if bnb else env["PYTHONPATH"]}
    envs = {"unsloth": env_unsloth, "unsloth_4bit": env_unsloth, "wl_nf4": env_nf4, "wl_nf4_peft": env_nf4, "check": env_nf4}
    logdir = Path(args.logdir) if args.logdir else None
    if logdir:
        logdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    for i, (size, trainer, chat) in enumerate(runs):
        if i and runs[i - 1][0] != size:  # the previous size's saved model is not needed any more
            shutil.rmtree(cache_root / runs[i - 1][0], ignore_errors=True)
        cmd = [sys.executable, __file__, "--worker", "--trainer", trainer, "--size", size, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq),
               "--chat-batch", str(args.chat_batch), "--device", args.device] + (["--profile", "--profile-top", str(args.profile_top)] if args.profile else []) + (["--timeline"] if args.timeline else []) + (["--chat", chat] if chat else []) + ["--model-cache", str(cache_root / size)]
        timeout = args.timeout
        if args.deadline:  # what is left of the whole invocation's time
            timeout = min(timeout, int(args.deadline - (time.perf_counter() - t_start)))
        if timeout < 10:
            r = {"trainer": trainer, "size": size, "error": f"not run: --deadline {args.deadline}s reached"}
            results[(size, trainer, chat)] = r
            print(json.dumps(r), flush=True)
            continue
        t0 = time.perf_counter()
        # with --logdir the worker writes straight to its log (stdout and stderr together), so a log
        # survives even if this whole command is killed
        log = (logdir / f"{size}-{trainer}{'-chat' if chat else ''}.log") if logdir else None
        sink = open(log, "w") if log else None  # noqa: SIM115
        try:
            if sink:
                sink.write(f"$ {' '.join(cmd)}\n")
                sink.flush()
            proc = subprocess.run(cmd, text=True, timeout=timeout, env=envs.get(trainer, env),
                                  stdout=sink or subprocess.PIPE, stderr=subprocess.STDOUT if sink else subprocess.PIPE)
            rc, timed_out = proc.returncode, False
        except subprocess.TimeoutExpired as e:
            proc, rc, timed_out = e, None, True
        finally:
            if sink:
                sink.close()
        if log:
            out = err = log.read_text(errors="replace")
        else:
            out, err = (x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (proc.stdout, proc.stderr))
        lines = [line for line in out.splitlines() if line.startswith('{"')]
        if rc == 0 and lines:
            r = json.loads(lines[-1])
        else:
            tail = err.strip().splitlines()[-25:]
            r = {"trainer": trainer, "size": size, "stderr_tail": tail,
                 "error": f"timeout after {timeout}s" if timed_out else (tail or ["?"])[-1][:300]}
        r["process_s"] = round(time.perf_counter() - t0, 1)
        results[(size, trainer, chat)] = r
        add_ratios(r, results, runs, size, chat)
        print(json.dumps(r), flush=True)
    if runs:
        shutil.rmtree(cache_root / runs[-1][0], ignore_errors=True)
    if not args.model_cache:
        shutil.rmtree(cache_root, ignore_errors=True)
    for size in dict.fromkeys(s for s, _, _ in runs):  # one summary per size (random data), all ratios known now
        rs = {t: results[(s, t, c)] for s, t, c in runs if s == size and c is None}
        for r in rs.values():
            add_ratios(r, results, runs, size, None)
        measured = "tokens_per_s" in rs.get("unsloth", {})
        measured_4bit = "tokens_per_s" in rs.get("unsloth_4bit", {})
        key = "vs_unsloth" if measured or measured_4bit else "vs_unsloth_reference_not_measured"
        line = {"summary": size, "unsloth_measured_same_run": measured, "unsloth_4bit_measured_same_run": measured_4bit,
                "tokens_per_s": {t: r.get("tokens_per_s", r.get("error")) for t, r in rs.items()},
                "peak_gib": {t: r.get("peak_gib") for t, r in rs.items()},
                key: {t: r.get(key) for t, r in rs.items()}, "vs_unsloth_of": {t: r.get("vs_unsloth_of") for t, r in rs.items()},
                "peak_vs_unsloth": {t: r.get("peak_vs_unsloth") for t, r in rs.items()} if key == "vs_unsloth" else None}
        if measured_4bit:
            line["vs_unsloth_4bit"] = {t: r.get("vs_unsloth_4bit") for t, r in rs.items()}
            line["peak_vs_unsloth_4bit"] = {t: r.get("peak_vs_unsloth_4bit") for t, r in rs.items()}
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
