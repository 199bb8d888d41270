"""Pre-flight memory estimate: will this training run fit on the device, before it starts?

``estimate(config, model_path, backend_name)`` adds up, from the model folder alone (config.json and the
safetensors headers, no weights read):

* **weights**: every tensor at the dtype it trains in (float32 on CPU, bf16 on CUDA), quantized ones
  (``--quantize 4|8``: mlx-lm's packed ints + a scale and a bias per 64 weights; ``nf4``: half a byte +
  bitsandbytes' double-quantized absmax; an already-quantized MLX folder as stored) at their size;
* **LoRA**: rank x (in + out) float32 weights per adapted matrix;
* **optimizer**: their gradients and AdamW's two moments (3 x 4 bytes per LoRA weight);
* **activations**: what backpropagation keeps for the step's batch (``batch_size x max_seq_len``
  tokens: the peak comes with the longest batch) per decoder layer (:func:`layer_elements`), the
  attention scores where the backend materialises them, and the logits where they are built;
* **runtime**: the framework itself (torch + transformers in the process, a CUDA context).

``free_memory`` is the device's: ``torch.cuda.mem_get_info`` on CUDA, MLX's recommended working set
on Metal, the available RAM elsewhere. :meth:`Estimate.warning` is a one-line warning with the change
that makes it fit (a smaller ``--batch-size``, ``--quantize``) when it will not. Calibrated against
measured peaks (bench/README.md, "QLoRA, issue 18"); a guide, not a guarantee: it warns, it never refuses.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from wonderland.config import TrainConfig
from wonderland.quantize import GROUP_SIZE, MLX_BITS

GB = 1e9
DTYPE_BYTES = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "U32": 4, "BF16": 2, "F16": 2, "I16": 2, "U16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits + an 8-bit absmax per 64 + a float32 per 256 absmax blocks
FIT_SHARE = 0.9  # warn when the estimate is above this share of the free memory
REPLAY_TOKENS = 128  # the retention guard's records are short: a question and a sentence
LAYER_RE = re.compile(r"layers\.(\d+)\.(?:.*\.)?(\w+)\.weight$")


@dataclass(frozen=True)
class Profile:
    """How one backend on one device spends activation memory (calibrated, see the module docstring)."""

    elem_bytes: int  # bytes of an activation element
    layer: float  # x layer_elements() kept per token and layer
    attention: float  # x heads x sequence length kept per token and layer (materialised scores)
    logits: float  # float32 copies of the (tokens x vocab) logits alive at the peak
    runtime: float  # bytes of the framework itself
    checkpointed: bool = False  # gradient checkpointing: one layer's activations + every layer's input
    logit_rows: int = 0  # rows of the logits alive at once when the loss chunks them (0 = every token)
    dequant: float = 0.0  # x (vocab x hidden) elements: de-quantized weights alive at once (MLX CPU, quantized)
    layer_buffer: float = 0.0  # x one decoder layer's weight elements: the fused layers' shared nf4 buffer


@dataclass
class Estimate:
    weights: float
    lora: float
    optimizer: float
    activations: float
    runtime: float
    free: float | None  # bytes free on the device; None when unknown
    where: str  # what ``free`` is, in words ("CPU RAM available", "cuda:0 free", ...)
    suggestions: list[dict] = dataclasses.field(default_factory=list)  # [{field, value, total}] that fit

    @property
    def total(self) -> float:
        return self.weights + self.lora + self.optimizer + self.activations + self.runtime

    @property
    def fits(self) -> bool:
        return self.free is None or self.total <= FIT_SHARE * self.free

    def summary(self) -> str:
        parts = ", ".join(f"{k} {getattr(self, k) / GB:.2f}" for k in ("weights", "lora", "optimizer", "activations", "runtime"))
        free = f" of {self.free / GB:.1f} GB {self.where}" if self.free is not None else f" ({self.where})"
        return f"memory estimate: ~{self.total / GB:.2f} GB ({parts}){free}"

    def warning(self, naming=lambda name: "--" + name.replace("_", "-")) -> str | None:
        """One line when the run will not fit, naming the changes that make it fit (``naming``: the caller's words)."""
        if self.fits:
            return None
        fixes = " or ".join(f"{naming(s['field'])} {s['value']} (~{s['total'] / GB:.1f} GB)" for s in self.suggestions)
        hint = f"; try {fixes}" if fixes else "; try a smaller --batch-size or --max-seq-len, --quantize, or a smaller model"
        return (f"warning: this run needs ~{self.total / GB:.1f} GB but {self.where} has {self.free / GB:.1f} GB; "
                f"it will probably run out of memory{hint}")

    def to_dict(self) -> dict:
        out = {k: round(getattr(self, k) / GB, 3) for k in ("weights", "lora", "optimizer", "activations", "runtime", "total")}
        return {"gb": out, "free_gb": None if self.free is None else round(self.free / GB, 2), "where": self.where,
                "fits": self.fits, "suggestions": [{**s, "total_gb": round(s["total"] / GB, 2)} for s in self.suggestions],
                "summary": self.summary(), "warning": self.warning()}


# ----------------------------------------------------------------------------- the model folder
def tensors(model_path: Path) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, safetensors dtype) of the model's weights, from the file headers alone."""
    out = {}
    for f in sorted(Path(model_path).glob("model*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        out.update({k: (v["shape"], v["dtype"]) for k, v in header.items() if k != "__metadata__"})
    return out


def model_config(model_path: Path) -> dict:
    cfg = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    return {**cfg, **cfg.get("text_config", {})}


def dims(cfg: dict) -> dict[str, int]:
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return {"hidden": cfg["hidden_size"], "inter": cfg["intermediate_size"], "layers": cfg["num_hidden_layers"],
            "heads": heads, "kv": cfg.get("num_key_value_heads") or heads, "head_dim": head_dim, "vocab": cfg["vocab_size"]}


def layer_elements(d: dict[str, int]) -> int:
    """Activation elements one decoder layer keeps per token for the backward pass (llama family):
    the two norms' inputs and outputs, the residuals and the attention output (8 x hidden), q, k, v
    before and after RoPE, and the MLP's gate, up, activation and product (4 x intermediate)."""
    q, kv = d["heads"] * d["head_dim"], d["kv"] * d["head_dim"]
    return 8 * d["hidden"] + 2 * (q + 2 * kv) + 4 * d["inter"]


# ----------------------------------------------------------------------------- the terms
def weight_bytes(named: dict, cfg: dict, quantize: str, elem: int, fused: bool = False) -> float:
    """Bytes of the base's weights as they train: float tensors at ``elem`` bytes, quantized ones packed
    (``nf4``: the other tensors float32 off the fused layers, PEFT's k-bit preparation; ``elem`` on them)."""
    if "quantization" in cfg:  # an MLX folder quantized already: packed ints as stored, floats cast
        return sum(_numel(s) * (DTYPE_BYTES[t] if t in ("U32", "I32", "U8", "I8") else elem) for s, t in named.values())
    total = 0.0
    for name, (shape, _) in named.items():
        n = _numel(shape)
        matrix = len(shape) == 2 and name.endswith(".weight")
        if quantize in MLX_BITS and matrix and shape[-1] % GROUP_SIZE == 0:  # Linear and Embedding
            total += n * MLX_BITS[quantize] / 8 + n / GROUP_SIZE * 2 * elem  # + a scale and a bias per group
        elif quantize == "nf4":  # the decoder's Linear layers (not the LM head)
            total += n * (NF4_BYTES if matrix and LAYER_RE.search(name) else elem if fused else 4)
        else:
            total += n * elem
    return total


def lora_weights(named: dict, cfg: dict, config: TrainConfig) -> int:
    """LoRA weights: rank x (in + out) for every adapted matrix of the adapted layers."""
    n_layers, bits = dims(cfg)["layers"], (cfg.get("quantization") or {}).get("bits")
    first = n_layers - config.layers if 0 < config.layers < n_layers else 0
    total = 0
    for name, (shape, _) in named.items():
        m = LAYER_RE.search(name)
        if m and len(shape) == 2 and int(m.group(1)) >= first and m.group(2) in config.target_modules:
            inputs = shape[1] * 32 // bits if bits else shape[1]  # an MLX-quantized matrix is packed into uint32
            total += config.rank * (inputs + shape[0])
    return total


def activation_bytes(d: dict[str, int], config: TrainConfig, p: Profile, kl: bool = False) -> float:
    """What the step keeps for backpropagation at its longest batch (batch_size x max_seq_len tokens;
    ``kl``: plus the --kl term's forward pass on as many replay records, short answers of at most
    :data:`REPLAY_TOKENS` tokens, in the same graph)."""
    seq = config.max_seq_len
    tokens = config.batch_size * (seq + (min(seq, REPLAY_TOKENS) if kl else 0))
    per_layer = p.layer * layer_elements(d) + p.attention * d["heads"] * seq
    if p.checkpointed:  # each layer's input is kept; one layer's activations are rebuilt at a time
        layers = d["layers"] * d["hidden"] + per_layer
    else:
        layers = d["layers"] * per_layer
    rows = min(tokens, p.logit_rows) if p.logit_rows else tokens
    # de-quantized weights (MLX on the CPU): the tied head; checkpointed, every layer's too (its backward
    # re-de-quantizes each layer and MLX keeps those buffers to the step's end: measured, bench/README.md)
    dequant = d["vocab"] * d["hidden"] + (d["layers"] * layer_weights(d) if p.checkpointed else 0)
    buffers = p.dequant * dequant + p.layer_buffer * layer_weights(d)
    return tokens * layers * p.elem_bytes + p.logits * rows * d["vocab"] * 4 + buffers * p.elem_bytes


def layer_weights(d: dict[str, int]) -> int:
    """Weight elements of one decoder layer's projections (q, k, v, o and the MLP's gate, up, down)."""
    q, kv = d["heads"] * d["head_dim"], d["kv"] * d["head_dim"]
    return d["hidden"] * (2 * q + 2 * kv) + 3 * d["hidden"] * d["inter"]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ----------------------------------------------------------------------------- backends and devices
def device_kind(config: TrainConfig, backend_name: str) -> str:
    """Where the run trains: ``metal`` or ``cpu`` (MLX); ``cuda``, ``mps`` or ``cpu`` (torch)."""
    if backend_name == "mlx":
        import wonderland.backends.mlx_lora  # noqa: F401  (OpenBLAS before mlx, on Linux)
        import mlx.core as mx

        return "metal" if mx.metal.is_available() else "cpu"
    import torch  # the torch backend's pick_device, by device type (importing it here would be a cycle)

    if config.device != "auto":
        return torch.device(config.device).type
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps and mps.is_available() else "cpu"


def elem_bytes(config: TrainConfig, backend_name: str, kind: str, named: dict) -> int:
    """Bytes per element of the weights and activations: the --dtype, else the backend's choice
    (float32 on CPU, MPS and MLX on CPU; bf16 on CUDA; MLX on Metal keeps the folder's dtype)."""
    explicit = {"float32": 4, "bfloat16": 2, "float16": 2}.get(config.dtype)
    if explicit:
        return explicit
    if backend_name == "mlx" and kind == "metal":
        floats = [DTYPE_BYTES[t] for _, t in named.values() if t in ("F32", "BF16", "F16")]
        return max(set(floats), key=floats.count) if floats else 2
    return 2 if kind == "cuda" else 4


def nf4_fused(config: TrainConfig, cfg: dict, kind: str) -> bool:
    """Whether a --quantize nf4 run trains on the fused layers (quantized.with_lora), from the configs."""
    if config.quantize != "nf4" or kind != "cuda" or config.dropout:
        return False
    from wonderland.backends.torch_peft.fast.fused_lora import config_reason
    from wonderland.backends.torch_peft.fast.training import enabled

    return enabled(_torch_device(kind)) and not config_reason(cfg)


def profile(config: TrainConfig, backend_name: str, kind: str, elem: int, quantized: bool = False,
            fused_nf4: bool = False) -> Profile:
    """The activation profile of this backend / device / path (numbers: bench/README.md, "QLoRA, issue 18")."""
    if backend_name == "mlx":
        return _mlx_profile(config, kind, elem, quantized)
    if fused_nf4:  # the bf16 fast path's profile, plus the shared buffer one layer's weights are de-quantized into
        return Profile(2, layer=0.5, attention=0.0, logits=0.0, runtime=0.5 * GB, layer_buffer=1.0)
    if kind == "cuda" and config.quantize == "nf4":  # plain PEFT + bitsandbytes, gradient checkpointing, HF logits
        return Profile(2, layer=1.0, attention=0.0, logits=2.5, runtime=0.5 * GB, checkpointed=True)
    from wonderland.backends.torch_peft.fast.training import enabled

    fast = enabled(_torch_device(kind))
    if kind == "cuda":  # fast: half the activations kept, a fused loss that never builds the logits
        return Profile(elem, layer=0.5, attention=0.0, logits=0.0, runtime=0.5 * GB) if fast else \
            Profile(elem, layer=1.0, attention=0.0, logits=2.5, runtime=0.5 * GB)
    # CPU (RSS) and MPS: SDPA's fused CPU kernel keeps no attention scores (measured: bench/README.md)
    return Profile(elem, layer=1.0, attention=0.0, logits=3.0, runtime=0.5 * GB)


def _mlx_profile(config: TrainConfig, kind: str, elem: int, quantized: bool) -> Profile:
    """mlx-lm's model code (attention scores materialised), the LM head on the labelled tokens only
    (the estimate counts every token: its worst case); checkpointed (``--grad-checkpoint``, ``auto``: a
    quantized base), each layer's input kept, one layer rebuilt at a time and the head in chunks. On the
    CPU a quantized layer multiplies by its de-quantized weight (the widest: the tied head)."""
    from wonderland.backends.mlx_lora.memory import wanted

    dequant = 1.0 if quantized and kind == "cpu" else 0.0
    if wanted(config.grad_checkpoint, quantized):
        # the chunked head does not lower MLX's peak (measured: the chunks' logits stay alive to the backward)
        return Profile(elem, layer=1.0, attention=2.0, logits=3.0, runtime=0.1 * GB, checkpointed=True, dequant=dequant)
    return Profile(elem, layer=1.0, attention=2.0, logits=3.0, runtime=0.1 * GB, dequant=dequant)


def _torch_device(kind: str):
    import torch

    return torch.device(kind)


def free_memory(kind: str) -> tuple[float | None, str]:
    """(free bytes, what they are) on the device the run trains on; None when it cannot be told."""
    if kind == "cuda":
        import torch

        return float(torch.cuda.mem_get_info()[0]), f"cuda:{torch.cuda.current_device()} free"
    if kind == "metal":
        import mlx.core as mx

        info = mx.metal.device_info()
        limit = info.get("max_recommended_working_set_size") or info.get("memory_size")
        return (float(limit) - mx.get_active_memory(), "Metal working set") if limit else (None, "Metal")
    return _available_ram(), "RAM available"


def _available_ram() -> float | None:
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------- the estimate
def estimate(config: TrainConfig, model_path: Path, backend_name: str) -> Estimate:
    """The run's memory estimate against the device's free memory, with the changes that would make it
    fit when it does not (half the batch, down to 1; ``--quantize 4`` on MLX, ``nf4`` on CUDA)."""
    named, cfg = tensors(model_path), model_config(model_path)
    kind = device_kind(config, backend_name)
    free, where = free_memory(kind)
    est = _terms(config, backend_name, kind, named, cfg, free, where)
    if est.fits:
        return est
    for field, value in _alternatives(config, backend_name, kind, cfg):
        other = _terms(dataclasses.replace(config, **{field: value}), backend_name, kind, named, cfg, free, where)
        if other.fits:
            est.suggestions.append({"field": field, "value": value, "total": other.total})
    return est


def _terms(config: TrainConfig, backend_name: str, kind: str, named: dict, cfg: dict, free, where: str) -> Estimate:
    elem = elem_bytes(config, backend_name, kind, named)
    fused = backend_name == "torch" and nf4_fused(config, cfg, kind)
    p = profile(config, backend_name, kind, elem, quantized="quantization" in cfg or config.quantize in MLX_BITS,
                fused_nf4=fused)
    lora = lora_weights(named, cfg, config)
    return Estimate(weights=weight_bytes(named, cfg, config.quantize, elem, fused), lora=4.0 * lora, optimizer=12.0 * lora,
                    activations=activation_bytes(dims(cfg), config, p, kl=backend_name == "torch" and config.kl > 0),
                    runtime=p.runtime, free=free, where=where)


def _alternatives(config: TrainConfig, backend_name: str, kind: str, cfg: dict) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    batch = config.batch_size // 2
    while batch >= 1 and len(out) < 8:
        out.append(("batch_size", batch))
        batch //= 2
    if config.quantize == "none" and "quantization" not in cfg:
        if backend_name == "mlx":
            out.insert(0, ("quantize", "4"))
        elif kind == "cuda":
            out.insert(0, ("quantize", "nf4"))
    return out


# ----------------------------------------------------------------------------- callers
def report(config: TrainConfig, model_path: Path, backend_name: str, log) -> Estimate | None:
    """``wonderland train``'s pre-flight lines: the estimate, and the warning when it will not fit."""
    try:
        est = estimate(config, model_path, backend_name)
    except (OSError, KeyError, ValueError, TypeError) as e:  # an unusual folder: say so, train anyway
        log(f"memory estimate unavailable ({type(e).__name__}: {e})")
        return None
    log(est.summary())
    if est.warning():
        log(est.warning())
    return est


def cached_model(model: str) -> Path | None:
    """The local folder of ``model`` when it is here already (never downloads or converts): the web
    form asks for an estimate at every change."""
    from wonderland.models import EMBEDDED, models_root

    if model in EMBEDDED:
        target = models_root() / model
        return target if (target / "config.json").exists() else None
    path = Path(model).expanduser()
    if path.is_dir():
        return path if (path / "config.json").exists() else None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
    except Exception:  # not cached, not a hub id, no huggingface_hub: no estimate yet
        return None
