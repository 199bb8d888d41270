"""Bad input for `wonderland export`: a clear one-line error and nothing partial left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import wonderland.export as export_mod
from tests.export_helpers import shared_tiny_run, train_tiny_run
from wonderland.cli import main
from wonderland.errors import UserError
from wonderland.export import export
from wonderland.export.ollama import parse_modelfile, render_modelfile


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model):
    return shared_tiny_run(tmp_path_factory, tiny_model)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_unknown_run_and_unknown_format(run, tmp_path):
    with pytest.raises(UserError, match="no run named or found at 'no-such-run'"):
        export("no-such-run", "peft", tmp_path / "x")
    with pytest.raises(UserError, match="unknown export format 'onnx'"):
        export(run, "onnx", tmp_path / "x")
    with pytest.raises(UserError, match="--gguf-type must be one of f16, q8_0, f32"):
        export(run, "gguf", tmp_path / "x", gguf_type="q4_k")
    assert _leftovers(tmp_path) == []


def test_unfinished_run_is_refused(run, tmp_path):
    copy = tmp_path / "stopped-run"
    shutil.copytree(run.path, copy)
    info = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({**info, "status": "stopped"}))
    with pytest.raises(UserError, match="has no finished adapter .status: stopped."):
        export(copy, "merged", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_for_gguf(run, tmp_path):
    """Only the base's config.json is read before refusing, so a config-only folder stands in for
    a Gemma-3 base (its weights would never be touched)."""
    base = tmp_path / "gemma3-base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}))
    copy = tmp_path / "gemma-run"
    shutil.copytree(run.path, copy)
    info = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({**info, "model": {**info["model"], "path": str(base)}}))
    out = tmp_path / "exports"
    for fmt, kw, message in [("gguf", {}, "GGUF export supports llama-architecture models"),
                             ("ollama", {}, "neither an adapter-importable base"),
                             ("ollama", {"ollama_from": "adapter"}, "llama-family and Gemma-2 bases only")]:
        with pytest.raises(UserError, match=message):
            export(copy, fmt, out / fmt, **kw)
    assert _leftovers(out) == []


def test_not_enough_disk_writes_nothing(run, tmp_path, monkeypatch):
    """A full disk cannot be arranged here: shutil.disk_usage is replaced to report 1 MiB free."""
    real = shutil.disk_usage
    monkeypatch.setattr(export_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    with pytest.raises(UserError, match=r"not enough disk space .* about \d+ MiB needed, 1 MiB free"):
        export(run, "merged", tmp_path / "merged")
    assert _leftovers(tmp_path) == []


def test_a_failure_mid_write_leaves_nothing(run, tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        Path(args[3]).write_bytes(b"GGUF half a file")  # out_file: a partial write, then a crash
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("wonderland.export.gguf_writer.write_model_gguf", explode)
    with pytest.raises(OSError, match="No space left"):
        export(run, "gguf", tmp_path / "g")
    assert _leftovers(tmp_path) == []


def test_existing_output_needs_overwrite(run, tmp_path):
    out = tmp_path / "peft"
    export(run, "peft", out, log=lambda m: None)
    (out / "marker").write_text("old")
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        export(run, "peft", out)
    export(run, "peft", out, overwrite=True, log=lambda m: None)
    assert not (out / "marker").exists() and (out / "adapter_model.safetensors").exists()
    assert _leftovers(tmp_path) == ["peft"]


def test_outputs_that_would_destroy_the_run_or_base_are_refused(run, tmp_path):
    base = Path(run.read()["model"]["path"])
    for out, message in [(run.path, "would overwrite the run"), (run.path.parent, "would overwrite the run"),
                         (run.adapter, "inside the run.s adapter"), (run.adapter / "x", "inside the run.s adapter"),
                         (base, "would overwrite the base model"), (base / "merged", "would overwrite the base model")]:
        with pytest.raises(UserError, match=message):
            export(run, "merged", out, overwrite=True)
    assert (run.adapter / "adapter_model.safetensors").exists() and (base / "config.json").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file; give a folder"):
        export(run, "peft", tmp_path / "file", overwrite=True)


def test_cli(run, tmp_path, capsys):
    out = tmp_path / "ollama"
    assert main(["export", "--run", str(run.path), "--format", "ollama", "--ollama-from", "adapter", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"cd {out} && ollama create hatter -f Modelfile" in printed
    assert "lora_alpha 16 for r 8 reproduces the trained scale 2" in printed
    assert main(["export", "--run", "missing", "--format", "peft"]) == 2
    assert "wonderland export: error: no run named or found at 'missing'" in capsys.readouterr().err


def test_default_output_folder_is_inside_the_run(run):
    result = export(run, "peft", log=lambda m: None)
    assert result.path == run.path / "exports" / "peft"
    shutil.rmtree(result.path.parent)


def test_a_chosen_checkpoint_is_exported_and_a_missing_one_is_refused(tmp_path, tiny_model, capsys):
    run = train_tiny_run(tmp_path, tiny_model, name="ckpt", save_every=2)
    assert run.kept_steps() == [2, 4]  # the final step is the served adapter itself
    result = export(run, "peft", checkpoint=2, log=lambda m: None)
    assert result.path == run.path / "exports" / "step-000002" / "peft"
    chosen = (run.checkpoints / "step-000002" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (result.path / "adapter_model.safetensors").read_bytes() == chosen
    assert chosen != (run.adapter / "adapter_model.safetensors").read_bytes()  # not the served adapter
    assert json.loads((result.path / "wonderland-export.json").read_text())["checkpoint"] == 2
    assert main(["export", "--run", str(run.path), "--format", "peft", "--checkpoint", "3"]) == 2
    assert "has no checkpoint at step 3 (kept: 2, 4)" in capsys.readouterr().err
    assert not (run.path / "exports" / "step-000003").exists()


def test_modelfile_parser_rejects_what_ollama_rejects():
    good = render_modelfile("./model.gguf", "You are the Hatter.", "<|im_start|>{{ x }}<|im_end|>")
    assert [x.command for x in parse_modelfile(good)][:2] == ["FROM", "TEMPLATE"]
    bad = {
        "FROM a\nFROM b\n": "exactly one FROM",
        "PARAMETER temperature 0.7\n": "exactly one FROM",
        "FROM a\nTEMPERATURE 1\n": "unknown instruction 'TEMPERATURE'",
        "FROM a\nPARAMETER temprature 1\n": "unknown PARAMETER 'temprature'",
        "FROM a\nPARAMETER num_ctx lots\n": "num_ctx must be int",
        'FROM a\nSYSTEM """never closed\n': "unterminated",
        'FROM a\nTEMPLATE """{{ if .System }}x"""\n': "not closed with",
        'FROM a\nTEMPLATE """{{ .System }"""\n': "unbalanced",
        "FROM a\nADAPTER\n": "ADAPTER needs an argument",
    }
    for text, message in bad.items():
        with pytest.raises(UserError, match=message):
            parse_modelfile(text)
    with pytest.raises(UserError, match='contains """'):
        render_modelfile("./model.gguf", 'He said """hello"""', None)
