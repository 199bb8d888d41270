"""`wonderland export --verify`: every artefact checked in the tool that loads it, llama.cpp included.

llama.cpp is real: the prebuilt binaries of node-llama-cpp (``make llama-cpp``, part of
``make test``'s set-up), loading our GGUF files with llama.cpp's own loader and applying the LoRA
GGUF as ``llama-cli --lora`` does. The tiny run's adapter moves logits far (tests/export_helpers.py),
so an artefact that dropped, mis-scaled or mis-permuted it fails.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from gguf import GGUFReader

from tests.export_helpers import shared_tiny_run, train_tiny_run
from wonderland.cli import main
from wonderland.errors import UserError
from wonderland.export import export_many
from wonderland.export.merge import run_source
from wonderland.export.verify import (
    THRESHOLDS,
    compare,
    llamacpp_scorer,
    make_probe,
    reference,
    live_scorer,
    verify_exports,
)

ARTEFACTS = {"peft", "mlx", "merged", "gguf-f16", "gguf-q8_0", "lora-gguf", "ollama-gguf"}
# mean |log-softmax difference| over the live top-16 tokens (measured on the tiny run, 2026-12-02)
LOGIT_BOUNDS = {"peft": 1e-5, "mlx": 1e-4, "merged": 1e-5, "gguf-f16": 1e-3, "lora-gguf": 1e-3,
                "ollama-gguf": 1e-3, "gguf-q8_0": 1e-2}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model):
    return shared_tiny_run(tmp_path_factory, tiny_model)


@pytest.fixture(scope="module")
def verified(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("verified") / "exports"
    results, report, where = export_many(run, "all", out, verify=True, log=lambda m: None)
    return {"results": results, "report": report, "where": where, "out": out}


def test_every_artefact_answers_like_the_live_adapter(verified):
    report = verified["report"]
    assert set(report["artefacts"]) == ARTEFACTS
    assert len(report["prompts"]) >= 20 and report["n_tokens"] == 32
    assert json.loads(verified["where"].read_text()) == report
    assert verified["where"] == verified["out"] / "verify.json"
    for name, m in report["artefacts"].items():
        first, exact = THRESHOLDS["q8_0" if "q8_0" in name else "default"]
        assert m["first_token_agreement"] >= first and m["exact_match"] >= exact, (name, m)
        assert m["mean_abs_logit_diff"] < LOGIT_BOUNDS[name], (name, m)
    assert report["below_target"] == []


def test_llama_cpp_applies_the_lora_gguf(run, verified, tmp_path):
    """Without --lora the same base GGUF in llama.cpp is far from the live adapter: the LoRA GGUF's
    agreement comes from llama.cpp applying it, at the trained scale."""
    src = run_source(run)
    probe = make_probe(src)
    ref, want = reference(live_scorer(src), probe)
    [base_gguf] = (verified["out"] / "gguf-f16").glob("*.base.f16.gguf")  # the base the export wrote for --lora
    without = compare(ref, [c for c, _ in llamacpp_scorer(base_gguf)(probe, want)])
    with_lora = verified["report"]["artefacts"]["lora-gguf"]
    assert without["mean_abs_logit_diff"] > 100 * with_lora["mean_abs_logit_diff"]  # on logits, not greedy text


def test_llama_cpp_tokenizes_the_probe_prompts_like_transformers(run, verified):
    from transformers import AutoTokenizer

    from wonderland.chat_format import with_system
    from wonderland.export.llamacpp import find_llama_cpp
    from wonderland.export.verify import probe_texts

    src = run_source(run)
    tok = AutoTokenizer.from_pretrained(src.base_path)
    texts = [tok.apply_chat_template(with_system([{"role": "user", "content": t}], src.system_prompt),
                                     tokenize=False, add_generation_prompt=True) for t in probe_texts()]
    texts += ["Twinkle, twinkle, little bat! 1234 + 5678 = 6912 ... ¿Qué? 茶", "  leading spaces\n\ttabs"]
    gguf = verified["out"] / "gguf-f16" / "hatter.f16.gguf"
    got = find_llama_cpp().run({"model": str(gguf), "texts": texts})["tokens"]
    assert got == [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert make_probe(src).prompts == got[:len(probe_texts())]  # the very ids verify feeds to both


def test_template_stop_tokens_and_scale_travel_with_every_gguf(run, verified):
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(run_source(run).base_path).chat_template
    models = [p for p in verified["out"].glob("**/*.gguf") if not p.name.endswith(".lora.gguf")]
    assert len(models) == 5  # f16, q8_0, the Ollama folder's f16, the f16 base beside each LoRA GGUF
    for path in models:
        fields = GGUFReader(path).fields
        assert fields["tokenizer.chat_template"].contents() == template, path
        assert fields["tokenizer.ggml.eos_token_id"].contents() == 2, path
    lora = GGUFReader(verified["out"] / "gguf-f16" / "hatter.lora.gguf").fields
    assert lora["general.type"].contents() == "adapter" and lora["adapter.type"].contents() == "lora"
    assert lora["adapter.lora.alpha"].contents() == pytest.approx(16.0)  # r 8, alpha 16: scale 2 exactly
    modelfile = (verified["out"] / "ollama" / "Modelfile").read_text()
    assert "FROM ./hatter.f16.gguf\n" in modelfile and "PARAMETER stop <|im_end|>" in modelfile


def test_a_diverging_artefact_is_named(run, verified, tmp_path):
    """A LoRA GGUF whose B matrices were negated (a sign or permutation bug) must fail verify."""
    import gguf

    src = run_source(run)
    folder = tmp_path / "bad"
    folder.mkdir()
    reader = GGUFReader(verified["out"] / "gguf-f16" / "hatter.lora.gguf")
    writer = gguf.GGUFWriter(str(folder / "hatter.lora.gguf"), arch="llama")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 16.0)
    for t in reader.tensors:
        data = np.array(t.data, dtype=np.float32)
        writer.add_tensor(t.name, -data if t.name.endswith(".lora_b") else data, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from wonderland.export import ExportResult
    from wonderland.export.artefacts import artefact_scorers
    from wonderland.export.verify import check

    bad = [ExportResult("gguf", folder, [])]
    report = verify_exports(src, lambda scratch: artefact_scorers(src, bad, scratch), log=lambda m: None)
    assert set(report["artefacts"]) == {"lora-gguf"} and report["below_target"][0].startswith("lora-gguf ")
    with pytest.raises(UserError, match=r"^verify: lora-gguf \((first token agreement|exact match) .* diverge from the live adapter"):
        check(report, folder / "verify.json")


def test_verify_on_an_unfinished_run_writes_nothing(run, tmp_path, capsys):
    copy = tmp_path / "stopped-run"
    shutil.copytree(run.path, copy)
    info = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({**info, "status": "stopped"}))
    assert main(["export", "--run", str(copy), "--format", "all", "--verify"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no finished adapter (status: stopped)" in err
    assert not (copy / "exports").exists()


def test_verify_without_llama_cpp_writes_nothing(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WONDERLAND_NODE_LLAMA_CPP", str(tmp_path / "no-such-node-llama-cpp"))
    out = tmp_path / "out"
    assert main(["export", "--run", str(run.path), "--format", "gguf", "--out", str(out), "--verify"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--verify needs llama.cpp: node-llama-cpp not found" in err
    assert "make llama-cpp" in err and not out.exists() and not list(tmp_path.glob(".*"))


def test_cli_verify_prints_the_table(run, tmp_path, capsys):
    out = tmp_path / "peft"
    assert main(["export", "--run", str(run.path), "--format", "peft", "--out", str(out), "--verify"]) == 0
    captured = capsys.readouterr()
    assert "peft" in captured.err and "first token" in captured.err
    assert json.loads((out / "verify.json").read_text())["artefacts"]["peft"]["exact_match"] == 1.0
    assert f"every artefact meets the target ({out / 'verify.json'})" in captured.out


@pytest.mark.slow
def test_packaged_model_exports_meet_the_target(embedded_model, tmp_path):
    """The Target of issue 16 on SmolLM2-135M-Instruct (a short real run) for the artefacts it
    names: PEFT, merged, GGUF f16, base GGUF + LoRA GGUF in llama.cpp; GGUF q8_0 close to the live run (mlx and the
    Ollama folder's copy of the f16 GGUF are covered on the tiny model, to keep `make test` short)."""
    from wonderland.config import DEFAULT_MODEL
    from wonderland.export import export
    from wonderland.export.artefacts import artefact_scorers

    run = train_tiny_run(tmp_path, embedded_model, model=DEFAULT_MODEL, iters=4, lr=2e-3, batch_size=2, max_seq_len=96)
    results = [export(run, fmt, tmp_path / f"{fmt}-{t}", gguf_type=t, log=lambda m: None)
               for fmt, t in (("peft", "f16"), ("merged", "f16"), ("gguf", "f16"), ("gguf", "q8_0"))]
    src = run_source(run)
    report = verify_exports(src, lambda scratch: artefact_scorers(src, results, scratch), log=lambda m: None)
    (tmp_path / "verify.json").write_text(json.dumps(report, indent=1))  # kept for the numbers in docs/export.md
    assert set(report["artefacts"]) == {"peft", "merged", "gguf-f16", "lora-gguf", "gguf-q8_0"}
    assert [b for b in report["below_target"] if not b.startswith("gguf-q8_0")] == [], report["artefacts"]
    # q8_0 meets its Target on the 8 runs measured here (docs/export.md, 2026-12-04: exact match 82-95 %),
    # but llama.cpp's kernels differ per CPU and one prompt is 4.5 points (the previous mix gave 82 % and 91 %
    # on this run on two days of this VM): the test checks that it is a faithful q8_0 of the adapted model (a
    # broken quantization puts first tokens and logits far off); `--verify` checks the Target.
    q8 = report["artefacts"]["gguf-q8_0"]
    assert q8["first_token_agreement"] >= 0.85 and q8["exact_match"] >= 0.5 and q8["mean_abs_logit_diff"] < 0.2, q8


def test_replies_that_end_at_eos_end_there_in_llama_cpp(tiny_model, run, tmp_path):
    """node-llama-cpp ends a reply at an end-of-generation token without yielding it unless told to
    (yieldEogToken): on a model that often picks EOS, llama.cpp's replies must still carry it, at
    the same step as transformers'."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wonderland.export.gguf_writer import write_model_gguf
    from wonderland.export.verify import Probe, pad_id, torch_scorer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    probe = Probe(make_probe(run_source(run)).prompts, [2])
    score = torch_scorer(model, pad_id(AutoTokenizer.from_pretrained(tiny_model)))
    before = [c.tokens for c, _ in score(probe, None)]
    common = max({t for c in before for t in c[1:]}, key=lambda t: sum(c[1:].count(t) for c in before))
    with torch.no_grad():  # tied embeddings: EOS now wins wherever the most picked token would
        model.model.embed_tokens.weight[2] = 1.5 * model.model.embed_tokens.weight[common]
    config = json.loads((tiny_model / "config.json").read_text())
    write_model_gguf(model.state_dict(), config, tiny_model, tmp_path / "eos.gguf", "f32", "eos")
    ours = [c.tokens for c, _ in score(probe, None)]
    cpp = [c.tokens for c, _ in llamacpp_scorer(tmp_path / "eos.gguf")(probe, None)]
    ended = [t for t in ours if len(t) < 32]
    assert ended and all(t[-1] == 2 for t in ended)  # the model does stop early on several prompts
    assert cpp == ours
