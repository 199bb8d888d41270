"""Take a trained run anywhere: PEFT, mlx-lm, a merged HF model, GGUF (llama.cpp) and Ollama.

``export(run, format, out=None, ...)`` writes one folder (default ``<run>/exports/<format>``)
through a staging folder renamed into place at the end, so a failure (bad input, disk full,
Ctrl-C) leaves nothing partial behind. Before writing it checks the architecture and that the
disk has room for the estimated output. ``export_many(run, "all", verify=True)`` writes every
format and checks each artefact against the live adapter (:mod:`wonderland.export.verify`,
``verify.json``).

=========  ==================================================================================
peft       adapter_config.json + adapter_model.safetensors (PEFT / transformers / vLLM)
mlx        adapters.safetensors + adapter_config.json (``mlx_lm.generate --adapter-path``)
merged     base + adapter merged: HF safetensors folder with tokenizer and chat template
gguf       the merged model as ``<run>.<type>.gguf`` (f16, q8_0 or f32) + the adapter alone as
           ``<run>.lora.gguf`` (llama.cpp ``--lora``) with its base ``<base>.base.f16.gguf``;
           llama architecture only
ollama     Modelfile (system prompt, ChatML template, parameters) + ``<run>.<type>.gguf`` (FROM the
           merged GGUF, the default) or ``adapter/`` (FROM base + ADAPTER, ``--ollama-from adapter``)
all        every format above (GGUF as f16 and q8_0), each in its own folder
=========  ==================================================================================
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from wonderland.errors import UserError
from wonderland.export.gguf_writer import (
    GGUF_TYPES,
    LLAMA_MODEL_TYPES,
    check_llama_config,
    model_gguf_bytes,
)
from wonderland.export.merge import (
    RunSource,
    merged_model,
    packaged_base_gguf,
    peft_adapter,
    use_dequantized_base,
    run_source,
    save_merged,
)
from wonderland.export.ollama import (
    ADAPTER_MODEL_TYPES,
    parse_modelfile,
    render_modelfile,
    write_ollama_adapter,
)
from wonderland.fileio import atomic_replace_dir, atomic_write_json, staging_dir
from wonderland.runs import RunDir, resolve_run

FORMATS = ("peft", "mlx", "merged", "gguf", "ollama")
OLLAMA_ROUTES = ("auto", "adapter", "gguf")
DISK_MARGIN = 1.1  # estimated size x this, plus 64 MiB, must be free
DISK_SLACK = 64 << 20


@dataclass
class ExportResult:
    format: str
    path: Path
    files: list[str]
    commands: list[str] = field(default_factory=list)  # what the user runs next
    notes: list[str] = field(default_factory=list)


def exports_root(run: RunDir, checkpoint: int | None = None) -> Path:
    """``<run>/exports`` (the served adapter's) or ``<run>/exports/step-NNNNNN`` (a chosen checkpoint's)."""
    return run.path / "exports" / (f"step-{checkpoint:06d}" if checkpoint is not None else "")


def default_out(run: RunDir, fmt: str, gguf_type: str, checkpoint: int | None = None) -> Path:
    return exports_root(run, checkpoint) / (f"gguf-{gguf_type}" if fmt == "gguf" else fmt)


@dataclass
class Plan:
    """One export to write, checked before anything is written."""

    src: RunSource
    fmt: str
    final: Path
    gguf_type: str
    route: str  # ollama: "adapter" or "gguf"; "" otherwise


def plan(src: RunSource, fmt: str, out: str | Path | None = None, *, gguf_type: str = "f16",
         ollama_from: str = "auto", overwrite: bool = False) -> Plan:
    """Check one export of ``src`` (format, output folder, architecture, disk) without writing."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}, all")
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)} (got {gguf_type!r})")
    if ollama_from not in OLLAMA_ROUTES:
        raise UserError(f"--ollama-from must be one of {', '.join(OLLAMA_ROUTES)} (got {ollama_from!r})")
    final = Path(out).expanduser().resolve() if out else default_out(src.run, fmt, gguf_type, src.checkpoint)
    _check_out(final, src, overwrite)
    route = _ollama_route(src, ollama_from) if fmt == "ollama" else ""
    if fmt == "gguf" or route == "gguf":
        check_llama_config(src.base_config)
    _check_disk(final, _estimate_bytes(src, fmt, gguf_type, route))
    return Plan(src, fmt, final, gguf_type, route)


def write(p: Plan, log: Callable[[str], None] = print) -> ExportResult:
    """Write a planned export through a staging folder renamed into place at the end."""
    src, tmp = p.src, staging_dir(p.final)
    try:
        result = _WRITERS[p.fmt](src, tmp, gguf_type=p.gguf_type, route=p.route, final=p.final, log=log)
        uses_gguf = p.fmt == "gguf" or p.route == "gguf"
        atomic_write_json(tmp / "wonderland-export.json", {
            "run": src.run.name, "checkpoint": src.checkpoint, "format": p.fmt, "gguf_type": p.gguf_type if uses_gguf else None,
            "ollama_from": p.route or None, "character": src.info.get("character"), "system_prompt": src.system_prompt,
            "base_model": src.info["model"], "adapter_format": src.adapter_format,
        })
        atomic_replace_dir(tmp, p.final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.path = p.final
    result.files = sorted(str(f.relative_to(p.final)) for f in p.final.rglob("*") if f.is_file())
    return result


def export(run_ref: str | Path | RunDir, fmt: str, out: str | Path | None = None, *, gguf_type: str = "f16",
           ollama_from: str = "auto", overwrite: bool = False, checkpoint: int | None = None,
           log: Callable[[str], None] = print) -> ExportResult:
    """Export a finished run (its served adapter, or checkpoint ``checkpoint``'s) in ``fmt`` to
    ``out``; returns what was written and what to run next."""
    run = run_ref if isinstance(run_ref, RunDir) else resolve_run(run_ref)
    src = run_source(run, checkpoint)
    return write(plan(src, fmt, out, gguf_type=gguf_type, ollama_from=ollama_from, overwrite=overwrite), log)


def export_many(run_ref: str | Path | RunDir, fmt: str, out: str | Path | None = None, *, gguf_type: str = "f16",
                ollama_from: str = "auto", overwrite: bool = False, verify: bool = False,
                checkpoint: int | None = None,
                log: Callable[[str], None] = print) -> tuple[list[ExportResult], dict | None, Path | None]:
    """``fmt`` or ``all`` (every format, GGUF as f16 and q8_0, each in its own folder under ``out``
    or ``<run>/exports``), then with ``verify`` every artefact checked against the live adapter:
    (results, report, verify.json path). All outputs are checked before the first is written; a
    report below the Target raises a UserError naming the artefacts after verify.json is written."""
    run = run_ref if isinstance(run_ref, RunDir) else resolve_run(run_ref)
    src = run_source(run, checkpoint)
    jobs = ALL if fmt == "all" else [(fmt, gguf_type)]
    plans = [plan(src, f, _out_for(run, fmt == "all", f, t, out), gguf_type=t, ollama_from=ollama_from,
                  overwrite=overwrite) for f, t in jobs]
    if verify:
        _check_verifiable(plans)
    results = [write(p, log) for p in plans]
    if not verify:
        return results, None, None
    return (results, *_verify(src, results, plans, fmt, out, log))


def _out_for(run: RunDir, many: bool, fmt: str, gguf_type: str, out) -> str | Path | None:
    if not many:
        return out
    return Path(out) / default_out(run, fmt, gguf_type).name if out else None


ALL = [("peft", "f16"), ("mlx", "f16"), ("merged", "f16"), ("gguf", "f16"), ("gguf", "q8_0"), ("ollama", "f16")]


def _check_verifiable(plans: list[Plan]) -> None:
    """--verify's tools must be there before anything is written."""
    if any(p.fmt == "gguf" or p.route == "gguf" for p in plans):
        from wonderland.export.llamacpp import find_llama_cpp

        find_llama_cpp()
    if any(p.fmt == "mlx" for p in plans):
        try:
            import mlx_lm  # noqa: F401
        except ImportError:
            raise UserError("--verify of the mlx export needs mlx-lm: pip install 'wonderland[mlx]' "
                            "(or export another --format)") from None


def _verify(src: RunSource, results: list[ExportResult], plans: list[Plan], fmt: str, out, log) -> tuple[dict, Path]:
    from wonderland.export.artefacts import artefact_scorers
    from wonderland.export.verify import check, table, verify_exports

    report = verify_exports(src, lambda scratch: artefact_scorers(src, results, scratch), log)
    where = (Path(out).expanduser().resolve() if out else exports_root(src.run, src.checkpoint)) if fmt == "all" else plans[0].final
    atomic_write_json(where / "verify.json", report)
    log(table(report))
    check(report, where / "verify.json")
    return report, where / "verify.json"


# ----------------------------------------------------------------------------- checks
def _check_out(final: Path, src: RunSource, overwrite: bool) -> None:
    """Refuse outputs that would replace the run, its adapter or the base model (--overwrite
    replaces the whole output folder)."""
    for protected, what in ((src.run.path, "the run"), (src.base_path.resolve(), "the base model")):
        if final == protected or final in protected.parents or (protected in final.parents and what == "the base model"):
            raise UserError(f"--out {final} would overwrite {what}; choose a folder outside it")
    if final == src.run.adapter or src.run.adapter in final.parents or final == src.adapter or src.run.checkpoints in final.parents:
        raise UserError(f"--out {final} is inside the run's adapter or checkpoints; choose another folder")
    if final.exists() and not final.is_dir():
        raise UserError(f"--out {final} is a file; give a folder")
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise UserError(f"{final} already exists; pass --overwrite to replace it, or choose another --out")


def _ollama_route(src: RunSource, requested: str) -> str:
    model_type = src.base_config.get("model_type")
    if requested == "adapter" and model_type in ADAPTER_MODEL_TYPES:
        return "adapter"
    if requested == "auto" and model_type not in LLAMA_MODEL_TYPES and model_type in ADAPTER_MODEL_TYPES:
        return "adapter"  # gemma2: our GGUF writer cannot, Ollama's adapter import can
    if requested == "adapter":
        raise UserError(f"Ollama imports safetensors adapters for llama-family and Gemma-2 bases only, not "
                        f"{model_type!r}; use --ollama-from gguf")
    if model_type not in LLAMA_MODEL_TYPES:
        raise UserError(f"Ollama export: {model_type!r} is neither an adapter-importable base (llama, gemma2) nor "
                        f"a llama architecture our GGUF writer supports; export --format merged and import that")
    return "gguf"


def _shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the safetensors headers (no weights are read)."""
    from safetensors import safe_open

    shapes = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "np") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open is not iterable
                shapes[k] = tuple(st.get_slice(k).get_shape())
    return shapes


def _estimate_bytes(src: RunSource, fmt: str, gguf_type: str, route: str) -> int:
    adapter = sum(p.stat().st_size for p in src.adapter.rglob("*") if p.is_file())
    if fmt in ("peft", "mlx") or route == "adapter":
        return 2 * adapter
    shapes = _shapes(src.base_path)
    if fmt == "merged":
        return 4 * sum(math.prod(s) for s in shapes.values())  # float32 safetensors
    config = json.loads((src.base_path / "config.json").read_text())
    base = model_gguf_bytes(shapes, config, "f16") if fmt == "gguf" else 0  # the f16 base for --lora
    return model_gguf_bytes(shapes, config, gguf_type) + base + 2 * adapter


def _check_disk(final: Path, need: int) -> None:
    probe = final
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need * DISK_MARGIN + DISK_SLACK:
        raise UserError(f"not enough disk space for this export at {probe}: about {need / 2**20:.0f} MiB needed, "
                        f"{free / 2**20:.0f} MiB free; free some space or choose another --out")


# ----------------------------------------------------------------------------- writers
def _write_peft(src: RunSource, tmp: Path, final: Path, **_) -> ExportResult:
    with peft_adapter(src, tmp / ".convert") as adapter:
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(adapter / f, tmp / f)
    return ExportResult("peft", tmp, [], [f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{src.base_path}'), '{final}')"])


def _write_mlx(src: RunSource, tmp: Path, final: Path, **_) -> ExportResult:
    if src.adapter_format == "mlx-lm":
        for f in src.adapter.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
    else:
        from wonderland.backends.torch_peft.adapters import peft_to_mlx

        peft_to_mlx(src.adapter, tmp, base_model_path=src.base_path)
    return ExportResult("mlx", tmp, [], [f"mlx_lm.generate --model {src.base_path} --adapter-path {final} --prompt 'Who are you?'"])


def _write_merged(src: RunSource, tmp: Path, final: Path, log, **_) -> ExportResult:
    log(f"Merging the adapter into {src.base_path.name} (float32) ...")
    with peft_adapter(src, tmp / ".convert") as adapter:
        model, tokenizer = merged_model(src, adapter)
    save_merged(model, tokenizer, tmp)
    return ExportResult("merged", tmp, [], [f"AutoModelForCausalLM.from_pretrained('{final}')"])


def _gguf_name(src: RunSource, gguf_type: str) -> str:
    return f"{src.run.name}.{gguf_type}.gguf"


BASE_GGUF_SUFFIX = ".base.f16.gguf"  # the base model for --lora, written beside the adapter


def _write_gguf(src: RunSource, tmp: Path, gguf_type: str, final: Path, log, **_) -> ExportResult:
    import torch
    from transformers import AutoModelForCausalLM

    from wonderland.export.gguf_writer import write_lora_gguf, write_model_gguf

    log(f"Merging the adapter and writing {gguf_type} GGUF ...")
    with peft_adapter(src, tmp / ".convert") as adapter:
        model, _ = merged_model(src, adapter)
        write_lora_gguf(adapter, src.base_config, tmp / f"{src.run.name}.lora.gguf", f"{src.run.name} LoRA")
    write_model_gguf(model.state_dict(), src.base_config, src.base_path, tmp / _gguf_name(src, gguf_type),
                     gguf_type, src.run.name)
    # the base for --lora in f16: llama.cpp's quantised matmuls (the packaged Q4_1 file) move the
    # adapter's replies off the live ones (exact match 73 % vs 95 % on the demo run, docs/export.md)
    base_name = f"{src.base_path.name}{BASE_GGUF_SUFFIX}"
    base = AutoModelForCausalLM.from_pretrained(src.base_path, dtype=torch.float32)
    use_dequantized_base(src, base)  # a --quantize 4|8 run: the base it trained on, de-quantized
    write_model_gguf(base.state_dict(), src.base_config, src.base_path, tmp / base_name, "f16", src.base_path.name)
    model_file, lora_file = final / _gguf_name(src, gguf_type), final / f"{src.run.name}.lora.gguf"
    q, system = shlex.quote, shlex.quote(src.system_prompt)
    return ExportResult("gguf", tmp, [], [
        f"llama-cli -m {q(str(model_file))} -cnv -sys {system}",
        f"llama-server -m {q(str(model_file))} --port 8080",
        f"llama-cli -m {q(str(final / base_name))} --lora {q(str(lora_file))} -cnv -sys {system}",
    ], [f"{lora_file.name}: the adapter alone (llama.cpp LoRA GGUF) for the base model {src.info['model']['id']}, "
        f"whose f16 GGUF is {base_name}"])


def _write_ollama(src: RunSource, tmp: Path, gguf_type: str, route: str, final: Path, log, **_) -> ExportResult:
    from transformers import AutoTokenizer

    chat_template = AutoTokenizer.from_pretrained(src.base_path).chat_template
    notes = []
    if route == "adapter":
        with peft_adapter(src, tmp / ".convert") as adapter:
            info = write_ollama_adapter(adapter, tmp / "adapter")
        # the embedded model's own GGUF holds exactly the trained-on weights and spares Ollama
        # converting the ~520 MB float32 folder; other bases: their HF folder
        from_, adapter_ref = str(packaged_base_gguf(src) or src.base_path), "./adapter"
        notes.append(f"adapter/adapter_config.json: lora_alpha {info['lora_alpha']} for r {info['r']} reproduces the "
                     f"trained scale {info['scale']:g} (Ollama reads lora_alpha and ignores mlx-lm's scale)")
    else:
        from wonderland.export.gguf_writer import write_model_gguf

        log(f"Merging the adapter and writing {gguf_type} GGUF for Ollama ...")
        with peft_adapter(src, tmp / ".convert") as adapter:
            model, _ = merged_model(src, adapter)
        name = _gguf_name(src, gguf_type)
        write_model_gguf(model.state_dict(), src.base_config, src.base_path, tmp / name, gguf_type, src.run.name)
        from_, adapter_ref = f"./{name}", None
    text = render_modelfile(from_, src.system_prompt, chat_template, adapter_ref,
                            character=src.info.get("character") or src.run.name)
    parse_modelfile(text)  # our own output must pass the documented grammar
    (tmp / "Modelfile").write_text(text, encoding="utf-8")
    name = _ollama_name(src.run.name)
    return ExportResult("ollama", tmp, [], [f"cd {shlex.quote(str(final))} && ollama create {name} -f Modelfile",
                                            f"ollama run {name}"], notes)


def _ollama_name(run_name: str) -> str:
    return run_name.lower()  # Ollama model names are lower case


_WRITERS = {"peft": _write_peft, "mlx": _write_mlx, "merged": _write_merged, "gguf": _write_gguf,
            "ollama": _write_ollama}


def describe(result: ExportResult) -> str:
    lines = [f"Exported {result.format} to {result.path}:"] + [f"  {f}" for f in result.files]
    lines += [f"note: {n}" for n in result.notes]
    if result.commands:
        lines += ["Next:"] + [f"  {c}" for c in result.commands]
    return "\n".join(lines)


__all__ = ["FORMATS", "GGUF_TYPES", "ExportResult", "Plan", "default_out", "describe", "export", "export_many", "plan", "write"]
