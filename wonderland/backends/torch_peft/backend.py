"""PyTorch + PEFT backend: LoRA training on CUDA, MPS and CPU, and streamed generation.

The adapter is saved in PEFT's own format (``adapter_config.json`` +
``adapter_model.safetensors``), so ``PeftModel.from_pretrained(base, run/adapter)`` loads it.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from wonderland.backends.base import TrainJob, TrainResult
from wonderland.backends.common import DivergenceGuard, batch_indices, check_keys, finish_checkpoint, lr_at, serve_best
from wonderland.backends.torch_peft import distributed, guard, quantized, trainer
from wonderland.backends.torch_peft.batching import batch_loss, collate
from wonderland.backends.torch_peft.chat import TorchChatModel
from wonderland.backends.torch_peft.fast import training as torch_fast
from wonderland.chat_format import encode_chat
from wonderland.config import GenerationConfig, TrainConfig
from wonderland.errors import UserError
from wonderland.events import Eval, Resumed, Sample, Started, Step, Stopped
from wonderland.fileio import staging_dir
from wonderland.probe import Ledger


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


def load_base(model_path: Path, device: torch.device, dtype: torch.dtype, quantize: str = "none"):
    """Tokenizer and base model on ``device``; ``quantize="nf4"``: bitsandbytes NF4 (:mod:`.quantized`)."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if quantize == "nf4":
        return tokenizer, quantized.load_nf4(model_path, device)
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
        import sys

        per_gb = 1e9 if sys.platform == "darwin" else 1e6  # ru_maxrss is bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_gb
    except Exception:
        return 0.0


# ----------------------------------------------------------------------------- the backend
@dataclass
class _Session:
    """What setup builds and the loop, validation and checkpoints use (litgpt's ``fabric``/state)."""

    cfg: TrainConfig
    world: distributed.World
    device: torch.device
    tokenizer: object
    model: object
    params: list
    fast: object | None
    optimizer: object
    train_set: list
    valid_set: list
    replay_set: list  # encoded replay records for the --kl term (empty without it)

    @property
    def pad(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def joint(self) -> bool:
        """Whether a step's KL records join its batch (one pass: guard.joint_batch / joint_loss)."""
        return bool(self.replay_set) and guard.joint_ok(self.fast)


def setup(job: TrainJob) -> _Session:
    """Seed, devices, the base model with LoRA layers, the optimizer and the encoded records."""
    cfg = job.config
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    world, device = distributed.setup(pick_device(cfg.device))  # one process per GPU under torchrun
    if cfg.batch_size < world.size:
        raise UserError(f"--batch-size {cfg.batch_size} is the global batch and must be at least the process count ({world.size})")
    tokenizer, base = load_base(job.model_path, device, pick_dtype(cfg.dtype, device), cfg.quantize)
    lora = lora_config(cfg, base.config.num_hidden_layers)
    if cfg.quantize == "nf4":  # the fused layers de-quantize, else plain PEFT + bitsandbytes (see .quantized)
        model, fast = quantized.with_lora(base, lora, device, torch_fast.enabled(device))
    else:
        model = get_peft_model(base, lora)
        fast = torch_fast.prepare_model(model, device) if torch_fast.enabled(device) else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (torch_fast.make_optimizer(params, cfg.lr, cfg.weight_decay, fast) if fast
                 else torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay))
    train_set = [encode_chat(tokenizer, r["messages"], cfg.max_seq_len) for r in job.train_records]
    valid_set = [encode_chat(tokenizer, r["messages"], cfg.max_seq_len) for r in job.valid_records]
    kl = _kl_on(cfg, world)
    replay_set = [encode_chat(tokenizer, r["messages"], cfg.max_seq_len) for r in job.replay_records] if kl else []
    return _Session(cfg, world, device, tokenizer, model, params, fast, optimizer, train_set, valid_set, replay_set)


def _kl_on(cfg: TrainConfig, world) -> bool:
    """The KL term runs in one process (its gradients are not all-reduced): under torchrun the default
    weight is dropped with a note, a weight the user chose is an error."""
    if not cfg.kl or world.size == 1:
        return bool(cfg.kl)
    if cfg.kl != TrainConfig().kl:
        raise UserError("--kl runs on one process only (its gradients are not all-reduced); drop --num-gpus or use --replay")
    if world.is_main:
        print("note: no KL term with several processes; training without it (--replay is the retention guard there)")
    return False


def step_loss(s: _Session, start: int = 0):
    """``loss(batch) -> (summed loss, target tokens, real tokens)``; DDP all-reduces LoRA gradients
    when several processes train (the loss function is its module). ``start``: the first step's
    index, so a resumed run's KL batches continue where they left off."""
    if s.fast:
        loss = distributed.wrap_loss(s.model, lambda m, p: torch_fast.prepared_loss(m, p, s.fast), s.world, s.device)
    else:
        loss = distributed.wrap_loss(s.model, lambda m, b: batch_loss(m, b, s.pad, s.device), s.world, s.device)
    if not s.replay_set:
        return loss
    if s.joint:  # one pass for the step's records and its KL records (see batches)
        return guard.joint_loss(s.model, s.replay_set, s.cfg.kl, s.pad, s.device, s.fast)
    return guard.with_kl(loss, s.model, s.replay_set, s.cfg.kl, s.cfg.batch_size, s.cfg.seed, s.pad, s.device, start, s.fast)


def batches(s: _Session):
    """``iterate_batches(step) -> batch``: this rank's share of the step's records, laid out on the
    host (``prepare_batch`` on the fast path) before its loss is computed on the device."""
    cfg = s.cfg

    def prepare(b):
        return torch_fast.prepare_batch(b, s.pad, s.device, s.fast) if s.fast else b

    def batch_at(i: int):
        idx = distributed.shard(batch_indices(i, len(s.train_set), cfg.batch_size, cfg.seed), s.world)
        if s.joint:  # the step's KL records join its batch
            kl = guard.kl_indices(i, len(s.replay_set), cfg.batch_size, cfg.seed)
            return guard.joint_batch([s.train_set[j] for j in idx], s.replay_set, kl, s.pad, s.device, s.fast)
        return prepare([s.train_set[j] for j in idx])
    return batch_at


def validate(s: _Session) -> float:
    """Mean loss per assistant token over the valid set (its first ``val_batches`` batches)."""
    cfg, model = s.cfg, s.model
    model.eval()
    total, count = 0.0, 0
    # the whole set in passes of PROBE_BATCH records (the sum is the same; fewer, larger passes)
    size = cfg.batch_size if cfg.val_batches else max(cfg.batch_size, guard.PROBE_BATCH)
    batches_ = range(0, len(s.valid_set), size)
    if cfg.val_batches:
        batches_ = list(batches_)[: cfg.val_batches]
    with torch.no_grad():
        for i in batches_:
            loss, n = guard.summed_nll(model, s.valid_set[i : i + size], s.pad, s.device, s.fast)
            total, count = total + float(loss), count + n
    model.train()
    return total / max(count, 1)


class _Reporter(trainer.TrainingCallback):
    """After each step, in this order: the Step event, validation, a sample, a checkpoint."""

    def __init__(self, backend: "TorchBackend", job: TrainJob, s: _Session, start: int) -> None:
        self.backend, self.job, self.s, self.start = backend, job, s, start
        self.loss: float | None = None
        self.val_loss: float | None = None
        self.t_start = time.perf_counter()
        self.ledger = Ledger.resumed(job.run, start)
        self.nll = guard.scorer(s.model, s.tokenizer, job.config.max_seq_len, s.device, s.fast)
        self.divergence = DivergenceGuard()  # non-finite or diverging loss: the run fails, good checkpoints stay
        self.saved: tuple[int, Path] | None = None  # the last checkpoint written: (step, folder)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def check_weights(self, step: int) -> None:
        finite = bool(torch.stack([p.detach().isfinite().all() for p in self.s.params]).all())
        self.divergence.check_weights(step, finite)

    def save(self, step: int) -> Path:
        """A checkpoint, only of finite weights; once per step (a stop on a save step reuses it)."""
        if self.saved is not None and self.saved[0] == step:
            return self.saved[1]
        self.check_weights(step)
        self.saved = (step, self.backend._save_checkpoint(self.job, self.s.model, self.s.optimizer, step))
        return self.saved[1]

    def on_step(self, r: trainer.StepReport) -> None:
        cfg, step = self.job.config, r.step
        self.divergence.check(step, r.loss)  # before the Step event: no NaN in metrics.jsonl
        self.loss, elapsed = r.loss, self.elapsed()
        self.job.emit(Step(step=step, total_steps=cfg.iters, loss=r.loss, learning_rate=r.learning_rate, tokens=r.tokens,
                           tokens_per_second=r.tokens / r.seconds, elapsed_s=elapsed,
                           eta_s=elapsed / (step - self.start) * (cfg.iters - step),
                           peak_memory_gb=peak_memory_gb(self.s.device)))
        scored = self.s.valid_set and cfg.val_every and step % cfg.val_every == 0 and step < cfg.iters
        if scored:
            self.validate(step)
        if cfg.sample_every and step % cfg.sample_every == 0:
            self.backend._sample(self.job, self.s.model, self.s.tokenizer, self.s.device, step)
        # every probed point gets a checkpoint: the best one is served
        if (cfg.save_every and step % cfg.save_every == 0 or scored and self.job.probe) and step < cfg.iters \
                and self.divergence.healthy:  # no checkpoint while the loss is above the divergence limit
            self.save(step)

    def validate(self, step: int) -> float:
        t0 = time.perf_counter()
        self.val_loss = validate(self.s)
        self.divergence.check_val(step, self.val_loss)
        t1 = time.perf_counter()
        whole = not self.job.config.val_batches  # validation scored the whole valid set: the probe's val_loss
        row = self.job.probe.score(self.nll, self.val_loss if whole else None) if self.job.probe else {}
        if row:
            self.ledger.add(step, row)
            self.done = step < self.job.config.iters and self.ledger.stalled(self.job.config.patience)
        self.job.emit(Eval(step=step, total_steps=self.job.config.iters, val_loss=self.val_loss,
                           val_time_s=time.perf_counter() - t0, persona_margin=row.get("persona_margin"),
                           retention_drift=row.get("retention_drift"), probe_time_s=time.perf_counter() - t1))
        return self.val_loss


class TorchBackend:
    name = "torch"

    def train(self, job: TrainJob) -> TrainResult:
        """setup, resume, fit, save: :func:`setup`, then :func:`trainer.train` with this backend's
        loss, batches and callback."""
        cfg, s = job.config, setup(job)
        start = self._resume(job, s)
        self._announce(job, s, start)
        reporter = _Reporter(self, job, s, start)
        s.model.train()
        result = trainer.train(optimizer=s.optimizer, params=s.params, start_step=start, iters=cfg.iters,
                               loss=step_loss(s, start), iterate_batches=batches(s), lr_at=lambda i: lr_at(i, cfg),
                               grad_clip=cfg.grad_clip, world=s.world, device=s.device,
                               should_stop=job.should_stop, training_callback=reporter)
        if result.status == "stopped":
            ckpt = reporter.save(result.step)
            job.emit(Stopped(step=result.step, total_steps=cfg.iters, checkpoint=str(ckpt), elapsed_s=reporter.elapsed()))
            return TrainResult("stopped", result.step, reporter.loss, reporter.val_loss)
        early = result.step < cfg.iters  # the probe stopped it (--patience): that step is probed and saved
        if s.valid_set and not early:
            reporter.validate(result.step)
        reporter.check_weights(result.step)  # a non-finite final adapter is never written
        if job.probe and len(reporter.ledger.rows) > 1:  # the last step is a candidate too: its checkpoint
            reporter.save(result.step)
        if s.world.is_main:  # rank 0 only: the adapter is the same on every rank
            serve_best(job.run, reporter.ledger.best_step(), result.step, s.model.save_pretrained)
        extra = {"device": str(s.device), **reporter.ledger.summary()}
        if early:
            extra["stopped_early"] = {"step": result.step, "patience": cfg.patience}
        return TrainResult("finished", result.step, reporter.loss, reporter.val_loss, extra=extra)

    def _resume(self, job: TrainJob, s: _Session) -> int:
        if not job.resume_from:
            return 0
        step = self._load_checkpoint(job.resume_from, s.model, s.optimizer, s.device)
        job.emit(Resumed(step=step, total_steps=job.config.iters, checkpoint=str(job.resume_from)))
        return step

    def _announce(self, job: TrainJob, s: _Session, start: int) -> None:
        fast = s.fast
        speedups = (fast.applied + ([f"not fused_layers: {fast.fused_reason}"] if fast.fused_reason else [])) if fast else []
        if job.config.quantize == "nf4":
            speedups = speedups + [quantized.FUSED_NOTE] if fast else [quantized.PLAIN_PATH_NOTE]
        job.emit(Started(step=start, total_steps=job.config.iters, run=job.run.name, backend=self.name,
                         model=str(job.model_path), device=str(s.device), train_records=len(s.train_set),
                         valid_records=len(s.valid_set), trainable_params=sum(p.numel() for p in s.params),
                         speedups=speedups))

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
        loaded = set_peft_model_state_dict(model, state)
        missing = [k for k in loaded.missing_keys if "lora_" in k]  # the frozen base is never in a checkpoint
        check_keys(ckpt, missing, list(loaded.unexpected_keys))
        extra = torch.load(ckpt / "trainer.pt", map_location=device, weights_only=False)
        try:
            optimizer.load_state_dict(extra["optimizer"])
        except ValueError as e:  # torch: "loaded state dict contains a parameter group that doesn't match ..."
            raise UserError(f"{ckpt}: the optimizer state does not fit this model ({e}); resume with the settings "
                            f"that wrote it") from None
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

    def load(self, model_path: Path, adapter_path: Path | None = None, device: str = "auto",
             quantize: str = "none") -> "TorchChatModel":
        dev = pick_device(device)
        tokenizer, model = load_base(Path(model_path), dev, pick_dtype("auto", dev), quantized.serving_quantize(quantize, dev))
        if adapter_path is not None:
            model = PeftModel.from_pretrained(model, str(adapter_path))
        model.eval()
        return TorchChatModel(model, tokenizer, Path(model_path), dev)


BACKEND = TorchBackend()
