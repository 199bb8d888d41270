"""PyTorch + PEFT backend: LoRA training on CUDA, MPS and CPU, and streamed generation.

The adapter is saved in PEFT's own format (``adapter_config.json`` +
``adapter_model.safetensors``), so ``PeftModel.from_pretrained(base, run/adapter)`` loads it.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from wonderland.backends.base import TrainJob, TrainResult
from wonderland.backends.common import batch_indices, finish_checkpoint, lr_at
from wonderland.backends.torch_peft import distributed
from wonderland.backends.torch_peft.batching import batch_loss, collate, summed_loss
from wonderland.backends.torch_peft.chat import TorchChatModel
from wonderland.backends.torch_peft.fast import training as torch_fast
from wonderland.chat_format import encode_chat
from wonderland.config import GenerationConfig, TrainConfig
from wonderland.errors import UserError
from wonderland.events import Eval, Resumed, Sample, Started, Step, Stopped
from wonderland.fileio import atomic_replace_dir, staging_dir


hf_logging.disable_progress_bar()  # our own events report progress; keep the terminal clean
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)


# ----------------------------------------------------------------------------- setup helpers
def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16/fp16 matmuls are slow on CPU; float32 there, bf16 on GPUs that have it.
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_base(model_path: Path, device: torch.device, dtype: torch.dtype):
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
    return tokenizer, model


def lora_config(cfg: TrainConfig, n_layers: int) -> LoraConfig:
    layers = list(range(n_layers - cfg.layers, n_layers)) if 0 < cfg.layers < n_layers else None
    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        layers_to_transform=layers,
        bias="none",
        task_type="CAUSAL_LM",
    )


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB
    except Exception:
        return 0.0


# ----------------------------------------------------------------------------- the backend
class TorchBackend:
    name = "torch"

    def train(self, job: TrainJob) -> TrainResult:
        cfg, emit = job.config, job.emit
        # --- setup
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        world, device = distributed.setup(pick_device(cfg.device))  # one process per GPU under torchrun
        if cfg.batch_size < world.size:
            raise UserError(f"--batch-size {cfg.batch_size} is the global batch and must be at least the process count ({world.size})")
        tokenizer, base = load_base(job.model_path, device, pick_dtype(cfg.dtype, device))
        n_layers = base.config.num_hidden_layers
        model = get_peft_model(base, lora_config(cfg, n_layers))
        params = [p for p in model.parameters() if p.requires_grad]
        fast = torch_fast.prepare_model(model, device) if torch_fast.enabled(device) else None  # CUDA levers
        optimizer = (torch_fast.make_optimizer(params, cfg.lr, cfg.weight_decay, fast) if fast
                     else torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
        train_set = [encode_chat(tokenizer, r["messages"], cfg.max_seq_len) for r in job.train_records]
        valid_set = [encode_chat(tokenizer, r["messages"], cfg.max_seq_len) for r in job.valid_records]
        pad = tokenizer.pad_token_id
        # A batch is laid out on the host (``prepare``) before its loss is computed on the device; DDP
        # all-reduces LoRA gradients when several processes train (the loss function is its module).
        prepare = (lambda b: torch_fast.prepare_batch(b, pad, device, fast)) if fast else (lambda b: b)
        step_loss = distributed.wrap_loss(model, (lambda m, p: torch_fast.prepared_loss(m, p, fast)) if fast
                                          else (lambda m, b: batch_loss(m, b, pad, device)), world, device)

        def batch_at(i: int):
            return prepare([train_set[j] for j in distributed.shard(batch_indices(i, len(train_set), cfg.batch_size, cfg.seed), world)])
        step = 0
        if job.resume_from:
            step = self._load_checkpoint(job.resume_from, model, optimizer, device)
            emit(Resumed(step=step, total_steps=cfg.iters, checkpoint=str(job.resume_from)))
        emit(Started(step=step, total_steps=cfg.iters, run=job.run.name, backend=self.name, model=str(job.model_path),
                     device=str(device), train_records=len(train_set), valid_records=len(valid_set),
                     trainable_params=sum(p.numel() for p in params),
                     speedups=(fast.applied + ([f"not fused_layers: {fast.fused_reason}"] if fast.fused_reason else [])) if fast else []))

        def evaluate() -> float:
            t0 = time.perf_counter()
            model.eval()
            total, count = 0.0, 0
            batches = range(0, len(valid_set), cfg.batch_size)
            if cfg.val_batches:
                batches = list(batches)[: cfg.val_batches]
            with torch.no_grad():
                for i in batches:
                    loss, n = summed_loss(model, *collate(valid_set[i : i + cfg.batch_size], pad, device))
                    total, count = total + float(loss), count + n
            model.train()
            val = total / max(count, 1)
            emit(Eval(step=step, total_steps=cfg.iters, val_loss=val, val_time_s=time.perf_counter() - t0))
            return val

        # --- train
        model.train()
        loss_value, val_loss = None, None
        t_start, steps_done, upcoming = time.perf_counter(), 0, None
        while step < cfg.iters:
            if distributed.any_rank(job.should_stop(), world, device):
                ckpt = self._save_checkpoint(job, model, optimizer, step)
                emit(Stopped(step=step, total_steps=cfg.iters, checkpoint=str(ckpt), elapsed_s=time.perf_counter() - t_start))
                return TrainResult("stopped", step, loss_value, val_loss)
            t0 = time.perf_counter()
            batch = upcoming if upcoming is not None else batch_at(step)
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, n, tokens = step_loss(batch)
            n, tokens = distributed.global_counts(n, tokens, world, device)  # all ranks together
            # mean NLL per assistant token of the global batch (x world size: DDP averages gradients)
            (loss_sum * (world.size / max(n, 1))).backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # the next batch's host work while the GPU runs this step, then the step's one wait for it
            upcoming = batch_at(step + 1) if step + 1 < cfg.iters else None
            total = distributed.global_sum(loss_sum, world)
            step, steps_done, loss_value = step + 1, steps_done + 1, total / max(n, 1)
            dt, elapsed = time.perf_counter() - t0, time.perf_counter() - t_start
            emit(Step(step=step, total_steps=cfg.iters, loss=loss_value, learning_rate=lr, tokens=tokens,
                      tokens_per_second=tokens / dt, elapsed_s=elapsed,
                      eta_s=elapsed / steps_done * (cfg.iters - step), peak_memory_gb=peak_memory_gb(device)))
            if valid_set and cfg.val_every and step % cfg.val_every == 0 and step < cfg.iters:
                val_loss = evaluate()
            if cfg.sample_every and step % cfg.sample_every == 0:
                self._sample(job, model, tokenizer, device, step)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.iters:
                self._save_checkpoint(job, model, optimizer, step)
        if valid_set:
            val_loss = evaluate()
        # --- save (rank 0 only: the adapter is the same on every rank)
        if world.is_main:
            tmp = staging_dir(job.run.adapter)
            model.save_pretrained(tmp)
            atomic_replace_dir(tmp, job.run.adapter)
        return TrainResult("finished", step, loss_value, val_loss, extra={"device": str(device)})

    # --- checkpoints: adapter + optimizer + RNG; the data position is the step number
    def _save_checkpoint(self, job: TrainJob, model, optimizer, step: int) -> Path:
        final = job.run.checkpoints / f"step-{step:06d}"
        if not distributed.world().is_main:
            return final  # rank 0 writes it
        tmp = staging_dir(final)
        model.save_pretrained(tmp / "adapter")
        torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   tmp / "trainer.pt")
        return finish_checkpoint(job, tmp, final, step)

    def _load_checkpoint(self, ckpt: Path, model, optimizer, device) -> int:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"), device=str(device))
        set_peft_model_state_dict(model, state)
        extra = torch.load(ckpt / "trainer.pt", map_location=device, weights_only=False)
        optimizer.load_state_dict(extra["optimizer"])
        torch.set_rng_state(extra["torch_rng"])
        if extra.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(extra["cuda_rng"])
        return int(json.loads((ckpt / "trainer_state.json").read_text())["step"])

    def _sample(self, job: TrainJob, model, tokenizer, device, step: int) -> None:
        chat = TorchChatModel(model, tokenizer, job.model_path, device)
        messages = [{"role": "system", "content": job.system_prompt}, {"role": "user", "content": job.config.sample_prompt}]
        reply = "".join(chat.stream(messages, GenerationConfig(temperature=0.0, max_tokens=48)))
        model.train()
        job.emit(Sample(step=step, total_steps=job.config.iters, prompt=job.config.sample_prompt, reply=reply))

    def load(self, model_path: Path, adapter_path: Path | None = None, device: str = "auto") -> "TorchChatModel":
        dev = pick_device(device)
        tokenizer, model = load_base(Path(model_path), dev, pick_dtype("auto", dev))
        if adapter_path is not None:
            model = PeftModel.from_pretrained(model, str(adapter_path))
        model.eval()
        return TorchChatModel(model, tokenizer, Path(model_path), dev)


BACKEND = TorchBackend()
