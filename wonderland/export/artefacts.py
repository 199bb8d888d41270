"""What each export folder holds to verify, and how to load it (see :mod:`wonderland.export.verify`).

``artefact_scorers`` maps a finished export to ``(name, make_scorer)`` pairs; models load only
when ``make_scorer()`` is called, one artefact at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from wonderland.errors import UserError
from wonderland.export.merge import RunSource, mlx_quantize, use_dequantized_base
from wonderland.export.verify import Scorer, base_gguf_for, llamacpp_scorer, mlx_scorer, pad_id, torch_scorer


def _torch(model_dir: Path, adapter: Path | None = None, src: RunSource | None = None) -> Callable[[], Scorer]:
    """transformers (+ PEFT) on ``model_dir``; ``src``: the adapter alone goes on the base the run
    trained on (a --quantize 4|8 run's de-quantized base, as its merge uses)."""
    def make() -> Scorer:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if src is not None:
            use_dequantized_base(src, model)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter))
        return torch_scorer(model.eval(), pad_id(AutoTokenizer.from_pretrained(model_dir)))
    return make


def _mlx(model_dir: Path, adapter: Path, quantize: str = "none") -> Callable[[], Scorer]:
    """mlx-lm: the base (quantized as the run's was, the way ``mlx_lm convert -q`` does) + the adapter."""
    def make() -> Scorer:
        try:
            from mlx_lm import load
        except ImportError:
            raise UserError("--verify of the mlx export needs mlx-lm: pip install 'wonderland[mlx]' "
                            "(or export another --format)") from None
        if quantize == "none":
            return mlx_scorer(load(str(model_dir), adapter_path=str(adapter))[0])
        from mlx_lm.tuner.utils import load_adapters

        from wonderland.backends.mlx_lora.quantized import for_inference, quantize_base

        model = load(str(model_dir))[0]
        quantize_base(model, quantize, model_dir)
        model = load_adapters(model, str(adapter))
        for_inference(model)  # on the CPU, as the live run serves: the quantized weights de-quantized
        return mlx_scorer(model)
    return make


def _cpp(gguf: Path, lora: Path | None = None) -> Callable[[], Scorer]:
    return lambda: llamacpp_scorer(gguf, lora)


def _model_ggufs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.gguf") if not p.name.endswith((".lora.gguf", ".base.f16.gguf")))


def _gguf_artefacts(src: RunSource, folder: Path, scratch: Path) -> list[tuple[str, Callable[[], Scorer]]]:
    out = [(f"gguf-{p.name.rsplit('.', 2)[-2]}", _cpp(p)) for p in _model_ggufs(folder)]
    bases = sorted(folder.glob("*.base.f16.gguf"))  # the base the export wrote for --lora
    for lora in sorted(folder.glob("*.lora.gguf")):
        out.append(("lora-gguf", lambda lora=lora: llamacpp_scorer(bases[0] if bases else base_gguf_for(src, scratch),
                                                                    lora)))
    return out


def artefact_scorers(src: RunSource, results, scratch: Path) -> list[tuple[str, Callable[[], Scorer]]]:
    """(name, make_scorer) for every artefact the exports in ``results`` wrote (each name once)."""
    pairs: list[tuple[str, Callable[[], Scorer]]] = []
    for r in results:
        folder = Path(r.path)
        if r.format == "peft":
            pairs.append(("peft", _torch(src.base_path, folder, src)))
        elif r.format == "mlx":
            pairs.append(("mlx", _mlx(src.base_path, folder, mlx_quantize(src))))
        elif r.format == "merged":
            pairs.append(("merged", _torch(folder)))
        elif r.format == "gguf":
            pairs += _gguf_artefacts(src, folder, scratch)
        elif r.format == "ollama":
            route = json.loads((folder / "wonderland-export.json").read_text(encoding="utf-8")).get("ollama_from")
            if route == "adapter":  # no Ollama here: the folder it converts, reloaded with PEFT
                pairs.append(("ollama-adapter", _torch(src.base_path, folder / "adapter", src)))
            else:
                pairs += [("ollama-gguf", _cpp(p)) for p in _model_ggufs(folder)]
    seen: set[str] = set()
    return [(n, m) for n, m in pairs if not (n in seen or seen.add(n))]
