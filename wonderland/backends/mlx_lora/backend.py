"""MLX backend (mlx-lm): LoRA training and streamed generation on Apple Silicon, and on Linux CPU.

Training is mlx-lm's own loop (:func:`mlx_lm.tuner.train` with :class:`TrainingArgs`), LoRA
layers come from :func:`mlx_lm.tuner.linear_to_lora_layers`, and a :class:`TrainingCallback`
turns mlx-lm's per-step reports into our events. We plug three things into that loop through
its documented hooks: the batches (``iterate_batches``: the same seeded per-epoch shuffle as the
torch backend, so a checkpoint's data position is its step number), the loss (``loss``: the
assistant tokens of :func:`wonderland.chat_format.encode_chat`, exactly the tokens the torch
backend trains on), and the optimizer (AdamW with the torch backend's warmup/cosine schedule and
gradient clipping). The final adapter is what mlx-lm writes (``adapters.safetensors`` +
``adapter_config.json``): ``mlx_lm.load(model, adapter_path=run/adapter)`` loads it unchanged.

On Linux CPU the package loads OpenBLAS first (:mod:`.blas`); bf16/fp16 are slow on CPU, so
weights are cast to float32 there.
``--quantize 4|8`` quantizes the frozen base on load with mlx-lm's own quantization (:mod:`.quantized`);
``--grad-checkpoint`` (``auto``: on for a quantized base) checkpoints the decoder layers and chunks the
loss's LM head (:mod:`.memory`, :mod:`.batching`).
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm import load as mlx_load
from mlx_lm.tuner import TrainingArgs, evaluate, linear_to_lora_layers
from mlx_lm.tuner import train as mlx_train
from mlx_lm.tuner.callbacks import TrainingCallback

from wonderland.backends.base import TrainJob, TrainResult
from wonderland.backends.common import DivergenceGuard, batch_indices, check_keys, finish_checkpoint
from wonderland.backends.mlx_lora.batching import CHUNK, collate, mean_loss
from wonderland.backends.mlx_lora.blas import BLAS
from wonderland.backends.mlx_lora.chat import MLXChatModel
from wonderland.backends.mlx_lora.memory import checkpoint_layers, wanted
from wonderland.backends.mlx_lora.quantized import (for_inference, quantization_config, quantize_base, quantized_bits,
                                                    use_cpu_kernels)
from wonderland.chat_format import encode_chat
from wonderland.config import GenerationConfig, TrainConfig
from wonderland.errors import UserError
from wonderland.events import Eval, Resumed, Sample, Started, Step, Stopped
from wonderland.fileio import atomic_replace_dir, atomic_write_json, staging_dir

ADAPTER_WEIGHTS = "adapters.safetensors"  # mlx-lm's file names
ADAPTER_CONFIG = "adapter_config.json"


# ----------------------------------------------------------------------------- setup helpers
def device_name() -> str:
    if mx.metal.is_available():
        return "gpu (metal)"
    return f"cpu ({'OpenBLAS' if BLAS else 'bundled reference BLAS'})"


def _config_overrides(model_path: Path) -> dict:
    """Keys mlx-lm reads at the top level of config.json that transformers 5 nests in
    ``rope_parameters`` (mlx-lm silently defaults rope_theta to 10000 otherwise)."""
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{model_path}: cannot read config.json ({e}); give a Hugging Face model folder") from None
    rope = cfg.get("rope_parameters") or {}
    out = {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    if cfg.get("rope_scaling") is None and rope.get("rope_type", "default") != "default":
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return out


def load_base(model_path: Path, dtype: str = "auto", quantize: str = "none"):
    """mlx-lm model + TokenizerWrapper, float32 on CPU (bf16/fp16 matmuls are slow there), quantized
    for ``--quantize 4|8`` (:mod:`.quantized`). Loaded lazily and evaluated once at the end, so a
    base quantized on load never holds all its float weights at once."""
    try:
        model, tokenizer = mlx_load(str(model_path), model_config=_config_overrides(model_path), lazy=True)
    except ValueError as e:  # e.g. "Model type x not supported."
        raise UserError(f"mlx-lm cannot load {model_path}: {e}; use --backend torch for this model") from None
    target = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}.get(dtype)
    if dtype == "auto" and not mx.metal.is_available():
        target = mx.float32
    if target is not None:
        model.set_dtype(target)
    quantize_base(model, quantize, model_path)
    use_cpu_kernels(model)
    mx.eval(model.parameters())
    return model, tokenizer


def lora_parameters(cfg: TrainConfig, model) -> dict:
    """mlx-lm's ``lora_parameters``: our target names (PEFT style, ``q_proj``) -> layer-relative
    keys (``self_attn.q_proj``), and ``scale = alpha / rank``."""
    linears = [name for name, m in model.layers[0].named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    keys = sorted(n for n in linears if n.rsplit(".", 1)[-1] in cfg.target_modules or n in cfg.target_modules)
    found = {k.rsplit(".", 1)[-1] for k in keys} | set(keys)
    missing = [t for t in cfg.target_modules if t not in found]
    if missing:
        raise UserError(f"--targets {','.join(missing)} not found in the model's layers; choose from "
                        f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in linears}))}")
    return {"rank": cfg.rank, "scale": cfg.scale, "dropout": cfg.dropout, "keys": keys}


def adapter_config(cfg: TrainConfig, model, model_path: Path) -> dict:
    """The adapter_config.json mlx-lm writes (the fields ``mlx_lm.load(adapter_path=)`` reads,
    plus the training settings, as ``mlx_lm.lora`` records them)."""
    n_layers = len(model.layers)
    quantization = quantization_config(model)  # the base's, when quantized (mlx-lm's config.json key)
    return {
        "model": str(model_path),
        **({"quantization": quantization} if quantization else {}),
        "fine_tune_type": "lora",
        "num_layers": cfg.layers if 0 < cfg.layers < n_layers else n_layers,
        "lora_parameters": lora_parameters(cfg, model),
        "batch_size": cfg.batch_size,
        "iters": cfg.iters,
        "learning_rate": cfg.lr,
        "lr_schedule": {"name": cfg.schedule, "warmup": cfg.warmup},
        "optimizer": "adamw",
        "optimizer_config": {"adamw": {"weight_decay": cfg.weight_decay}},
        "grad_clip": cfg.grad_clip,
        "max_seq_length": cfg.max_seq_len,
        "mask_prompt": True,
        "seed": cfg.seed,
    }


def training_model(cfg: TrainConfig, model_path: Path):
    """The base (frozen, quantized for ``--quantize``) with LoRA layers, its adapter config, and whether its
    decoder layers checkpoint (``--grad-checkpoint``; ``auto``: a quantized base does)."""
    model, tokenizer = load_base(model_path, cfg.dtype, cfg.quantize)
    model.freeze()
    acfg = adapter_config(cfg, model, model_path)
    linear_to_lora_layers(model, acfg["num_layers"], acfg["lora_parameters"])
    checkpointed = wanted(cfg.grad_checkpoint, quantized_bits(model) is not None)
    if checkpointed:
        checkpoint_layers(model)
    return model, tokenizer, acfg, checkpointed


def lr_schedule(cfg: TrainConfig):
    """mlx schedule equal to the torch backend's ``lr_at``: warmup lr*(s+1)/w for s < w, then
    constant or cosine from lr down to 10 % of lr at the last step."""
    w = cfg.warmup
    if cfg.schedule == "cosine":
        main = optim.cosine_decay(cfg.lr, max(1, cfg.iters - w), 0.1 * cfg.lr)
    else:
        main = lambda step: mx.array(cfg.lr, mx.float32)  # noqa: E731
    if w == 0:
        return main
    warm = optim.linear_schedule(cfg.lr / w, cfg.lr, w - 1) if w > 1 else (lambda step: mx.array(cfg.lr, mx.float32))
    return optim.join_schedules([warm, main], [w])


class ClippedAdamW(optim.AdamW):
    """AdamW that clips the global gradient norm first (the torch backend's ``--grad-clip``)."""

    def __init__(self, max_grad_norm: float = 0.0, **kw) -> None:
        super().__init__(**kw)
        self.max_grad_norm = max_grad_norm

    def update(self, model, gradients: dict) -> None:
        if self.max_grad_norm:
            gradients, _ = optim.clip_grad_norm(gradients, self.max_grad_norm)
        super().update(model, gradients)


class Batches:
    """mlx-lm's ``iterate_batches`` hook. Training (``loop=True``): the batch of each step from
    ``start_step`` on, remembering its real token count for the Step event. Evaluation: the
    dataset in order, the last batch possibly smaller (as the torch backend evaluates)."""

    def __init__(self, start_step: int, seed: int) -> None:
        self.step, self.seed = start_step, seed
        self.tokens: dict[int, int] = {}  # step (1-based, after it runs) -> real tokens

    def __call__(self, dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
        if not loop:
            for i in range(0, len(dataset), batch_size):
                yield collate(dataset[i : i + batch_size])
            return
        while True:
            batch = [dataset[i] for i in batch_indices(self.step, len(dataset), batch_size, self.seed)]
            self.step += 1
            self.tokens[self.step] = sum(len(e.input_ids) for e in batch)
            yield collate(batch)


class _StopRequested(Exception):
    """Raised from the callback to leave mlx-lm's loop after a step when a stop was asked for."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"stopped at step {step}")
        self.step, self.checkpoint = step, checkpoint


class _Reporter(TrainingCallback):
    """mlx-lm reports every step (``steps_per_report=1``), synchronously inside its loop. Each
    report becomes our Step event, followed by the torch backend's per-step order: eval, sample,
    checkpoint, stop check."""

    def __init__(self, backend: "MLXBackend", job: TrainJob, model, tokenizer, optimizer, acfg: dict,
                 batches: Batches, start: int, valid_set: list) -> None:
        self.backend, self.job, self.model, self.tokenizer, self.optimizer = backend, job, model, tokenizer, optimizer
        self.acfg, self.batches, self.start, self.valid_set = acfg, batches, start, valid_set
        self.loss: float | None = None
        self.val_loss: float | None = None
        self.divergence = DivergenceGuard()  # non-finite or diverging loss: the run fails, good checkpoints stay
        self.t_start = time.perf_counter()

    def validate(self, step: int) -> None:
        cfg, t0 = self.job.config, time.perf_counter()
        val = evaluate(self.model, self.valid_set, batch_size=cfg.batch_size, num_batches=cfg.val_batches or -1,
                       max_seq_length=cfg.max_seq_len, loss=mean_loss, iterate_batches=self.batches)
        self.model.train()
        self.divergence.check_val(step, val)
        self.val_loss = val
        self.job.emit(Eval(step=step, total_steps=cfg.iters, val_loss=val, val_time_s=time.perf_counter() - t0))

    def check_weights(self, step: int) -> None:
        finite = all(mx.isfinite(v).all().item() for _, v in tree_flatten(self.model.trainable_parameters()))
        self.divergence.check_weights(step, finite)

    def save(self, step: int) -> Path:
        self.check_weights(step)
        return self.backend._save_checkpoint(self.job, self.model, self.optimizer, self.acfg, step)

    def on_train_loss_report(self, info: dict) -> None:
        job, cfg = self.job, self.job.config
        step = self.start + info["iteration"]
        elapsed = time.perf_counter() - self.t_start
        tokens = self.batches.tokens.pop(step, 0)
        self.divergence.check(step, info["train_loss"])  # before the Step event: no NaN in metrics.jsonl
        self.loss = info["train_loss"]
        job.emit(Step(step=step, total_steps=cfg.iters, loss=self.loss, learning_rate=info["learning_rate"],
                      tokens=tokens, tokens_per_second=tokens * info["iterations_per_second"], elapsed_s=elapsed,
                      eta_s=elapsed / info["iteration"] * (cfg.iters - step), peak_memory_gb=peak_memory_gb()))
        if job.valid_records and cfg.val_every and step % cfg.val_every == 0 and step < cfg.iters:
            self.validate(step)
        if cfg.sample_every and step % cfg.sample_every == 0:
            self.backend._sample(job, self.model, self.tokenizer, step)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.iters and self.divergence.healthy:
            self.save(step)
        if step < cfg.iters and job.should_stop():
            raise _StopRequested(step, self.save(step))


# ----------------------------------------------------------------------------- the backend
class MLXBackend:
    name = "mlx"

    def train(self, job: TrainJob) -> TrainResult:
        cfg, emit = job.config, job.emit
        mx.random.seed(cfg.seed)
        mx.reset_peak_memory()  # the Step events' peak is this run's, not the process's (a server trains many)
        model, tokenizer, acfg, checkpointed = training_model(cfg, job.model_path)
        hf_tok = tokenizer._tokenizer
        train_set = [encode_chat(hf_tok, r["messages"], cfg.max_seq_len) for r in job.train_records]
        valid_set = [encode_chat(hf_tok, r["messages"], cfg.max_seq_len) for r in job.valid_records]
        optimizer = ClippedAdamW(max_grad_norm=cfg.grad_clip, learning_rate=lr_schedule(cfg),
                                 weight_decay=cfg.weight_decay)
        start = 0
        if job.resume_from:
            start = self._load_checkpoint(job.resume_from, model, optimizer)
            emit(Resumed(step=start, total_steps=cfg.iters, checkpoint=str(job.resume_from)))
        trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        emit(Started(step=start, total_steps=cfg.iters, run=job.run.name, backend=self.name, model=str(job.model_path),
                     device=device_name(), train_records=len(train_set), valid_records=len(valid_set),
                     trainable_params=trainable))
        batches = Batches(start, cfg.seed)
        if job.should_stop():  # asked before the first step: nothing to train, keep the position
            ckpt = self._save_checkpoint(job, model, optimizer, acfg, start)
            emit(Stopped(step=start, total_steps=cfg.iters, checkpoint=str(ckpt), elapsed_s=0.0))
            return TrainResult("stopped", start)
        tmp = staging_dir(job.run.adapter)
        args = TrainingArgs(batch_size=cfg.batch_size, iters=cfg.iters - start, val_batches=cfg.val_batches or -1,
                            steps_per_report=1, steps_per_eval=cfg.iters + 1, steps_per_save=cfg.iters + 1,
                            max_seq_length=cfg.max_seq_len, adapter_file=str(tmp / ADAPTER_WEIGHTS))
        reporter = _Reporter(self, job, model, tokenizer, optimizer, acfg, batches, start, valid_set)
        try:
            with _quiet_mlx_console():
                # val_dataset=None: mlx-lm would evaluate at its own cadence (step 1, every K, before
                # the last step); the callback evaluates at ours instead.
                mlx_train(model=model, optimizer=optimizer, train_dataset=train_set, val_dataset=None, args=args,
                          loss=functools.partial(mean_loss, chunk=CHUNK if checkpointed else 0),
                          iterate_batches=batches, training_callback=reporter)
            if valid_set:
                reporter.validate(cfg.iters)
            reporter.check_weights(cfg.iters)  # a non-finite final adapter is never written
        except _StopRequested as stop:
            shutil.rmtree(tmp, ignore_errors=True)
            emit(Stopped(step=stop.step, total_steps=cfg.iters, checkpoint=str(stop.checkpoint),
                         elapsed_s=time.perf_counter() - reporter.t_start))
            return TrainResult("stopped", stop.step, reporter.loss, reporter.val_loss)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_json(tmp / ADAPTER_CONFIG, acfg)  # mlx-lm already wrote adapters.safetensors
        atomic_replace_dir(tmp, job.run.adapter)
        return TrainResult("finished", cfg.iters, reporter.loss, reporter.val_loss, extra={"device": device_name(), "grad_checkpoint": checkpointed})

    # --- checkpoints: the adapter as mlx-lm writes it + optimizer state; data position = step
    def _save_checkpoint(self, job: TrainJob, model, optimizer, acfg: dict, step: int) -> Path:
        final = job.run.checkpoints / f"step-{step:06d}"
        tmp = staging_dir(final)
        (tmp / "adapter").mkdir()
        mx.save_safetensors(str(tmp / "adapter" / ADAPTER_WEIGHTS), dict(tree_flatten(model.trainable_parameters())))
        atomic_write_json(tmp / "adapter" / ADAPTER_CONFIG, acfg)
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        return finish_checkpoint(job, tmp, final, step)

    def _load_checkpoint(self, ckpt: Path, model, optimizer) -> int:
        if not (ckpt / "adapter" / ADAPTER_WEIGHTS).exists():
            raise UserError(f"{ckpt} is not an MLX checkpoint (no adapter/{ADAPTER_WEIGHTS}); resume it with the backend that wrote it")
        saved = mx.load(str(ckpt / "adapter" / ADAPTER_WEIGHTS))
        expected = {k for k, _ in tree_flatten(model.trainable_parameters())}
        check_keys(ckpt, sorted(expected - saved.keys()), sorted(saved.keys() - expected))
        model.load_weights(list(saved.items()), strict=False)  # strict=False: the frozen base is not in it
        # AdamW moments + step count (hence the schedule position). mlx's global RNG key cannot be
        # set back, so with --dropout > 0 a resumed run draws different dropout masks.
        optimizer.state = tree_unflatten(list(mx.load(str(ckpt / "optimizer.safetensors")).items()))
        mx.eval(model.parameters(), optimizer.state)
        return int(json.loads((ckpt / "trainer_state.json").read_text())["step"])

    def _sample(self, job: TrainJob, model, tokenizer, step: int) -> None:
        model.eval()  # no dropout while sampling
        chat = MLXChatModel(model, tokenizer, job.model_path)
        messages = [{"role": "system", "content": job.system_prompt}, {"role": "user", "content": job.config.sample_prompt}]
        reply = "".join(chat.stream(messages, GenerationConfig(temperature=0.0, max_tokens=48)))
        model.train()
        job.emit(Sample(step=step, total_steps=job.config.iters, prompt=job.config.sample_prompt, reply=reply))

    def load(self, model_path: Path, adapter_path: Path | None = None, device: str = "auto",
             quantize: str = "none") -> "MLXChatModel":
        """``device`` is accepted for the protocol; MLX runs on its default device (Metal, else CPU).
        ``quantize``: the run's ``--quantize``, so its adapter sits on the base it was trained on."""
        model, tokenizer = load_base(Path(model_path), quantize=quantize)
        for_inference(model)  # CPU: the quantized base de-quantized once (see .quantized)
        if adapter_path is not None:
            from mlx_lm.tuner.utils import load_adapters

            load_adapters(model, str(adapter_path))
        model.eval()
        return MLXChatModel(model, tokenizer, Path(model_path))


def peak_memory_gb() -> float:
    """MLX allocator peak (GB); on CPU add nothing else, torch's figure is RSS (see bench/)."""
    return mx.get_peak_memory() / 1e9


class _quiet_mlx_console:
    """mlx-lm's trainer draws its own progress table on stdout; our events drive the UI."""

    def __enter__(self):
        from mlx_lm.cli_ui import make_console

        self.console = make_console()
        self.previous, self.console.quiet = self.console.quiet, True

    def __exit__(self, *exc):
        self.console.quiet = self.previous


BACKEND = MLXBackend()
