"""The checkpoint probe and the best checkpoint: recorded per validation point, never pruned, served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import train_tiny_run
from wonderland.cli import main
from wonderland.probe import BEST_FILE, best


@pytest.fixture(scope="module")
def probed_run(tiny_model, tmp_path_factory) -> Path:
    return train_tiny_run(tiny_model, tmp_path_factory.mktemp("best"), "--iters", "8", "--val-every", "2",
                          "--lr", "3e-3", "--threads", "1")


def test_every_validation_point_is_scored_and_the_rule_picks_the_best(probed_run):
    info = json.loads((probed_run / "run.json").read_text())
    rows = info["result"]["checkpoints"]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    for r in rows:
        assert set(r) == {"step", "val_loss", "persona_margin", "retention_drift"}
        assert all(isinstance(r[k], float) for k in ("val_loss", "persona_margin", "retention_drift"))
    assert info["result"]["best_step"] == best(rows)["step"]
    assert json.loads((probed_run / "checkpoints" / BEST_FILE).read_text())["step"] == best(rows)["step"]
    evals = [json.loads(ln) for ln in (probed_run / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e["event"] == "eval"]
    assert [(e["step"], e["persona_margin"]) for e in evals] == [(r["step"], r["persona_margin"]) for r in rows]


def test_the_best_checkpoint_is_kept_and_served(probed_run):
    info = json.loads((probed_run / "run.json").read_text())
    top = info["result"]["best_step"]
    kept = sorted(p.name for p in (probed_run / "checkpoints").glob("step-*"))
    assert f"step-{top:06d}" in kept and "step-000008" in kept and len(kept) <= 3
    served = (probed_run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert served == (probed_run / "checkpoints" / f"step-{top:06d}" / "adapter" / "adapter_model.safetensors").read_bytes()


def test_a_picked_checkpoint_is_loaded_and_a_missing_one_is_refused(probed_run, capsys):
    from wonderland.generate import load_run

    info = json.loads((probed_run / "run.json").read_text())
    top = info["result"]["best_step"]
    other = next(s for s in (6, 8, 4, 2) if s != top and (probed_run / "checkpoints" / f"step-{s:06d}").is_dir())
    records = [{"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "What time is it?"},
                             {"role": "assistant", "content": "Always tea-time."}]}]
    served = load_run(probed_run, device="cpu").model.loss(records)
    picked = load_run(probed_run, device="cpu", checkpoint=other).model.loss(records)
    assert served[1] == picked[1] and served[0] != picked[0]
    assert main(["chat", "--run", str(probed_run), "--checkpoint", "99", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at step 99" in err and "kept:" in err and "Traceback" not in err


def test_pruning_never_removes_the_recorded_best(tmp_path):
    from types import SimpleNamespace

    from wonderland.backends.common import KEEP_CHECKPOINTS, finish_checkpoint
    from wonderland.config import TrainConfig
    from wonderland.runs import RunDir

    run = RunDir(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    (run.checkpoints / BEST_FILE).write_text(json.dumps({"step": 1}))
    job = SimpleNamespace(run=run, config=TrainConfig(), emit=lambda e: None)
    for step in range(1, 6):
        tmp = run.checkpoints / f".tmp{step}"
        tmp.mkdir()
        finish_checkpoint(job, tmp, run.checkpoints / f"step-{step:06d}", step)
    assert sorted(p.name for p in run.checkpoints.glob("step-*")) == \
        ["step-000001"] + [f"step-{s:06d}" for s in range(6 - KEEP_CHECKPOINTS, 6)]


def test_kl_term_is_zero_at_the_base_and_grows_when_the_adapter_moves(tiny_model):
    import torch
    from peft import get_peft_model

    from tests.helpers import chat_records
    from wonderland.backends.torch_peft.backend import load_base, lora_config
    from wonderland.backends.torch_peft.guard import kl_sum, with_kl
    from wonderland.config import TrainConfig

    tok, base = load_base(tiny_model, torch.device("cpu"), torch.float64)
    model = get_peft_model(base, lora_config(TrainConfig(), base.config.num_hidden_layers))
    batch = chat_records(3, seed=1)
    kl, n = kl_sum(model, batch, tok.pad_token_id, torch.device("cpu"))
    assert n == sum(e.n_target_tokens - (e.labels[0] != -100) for e in batch) and abs(float(kl.detach())) < 1e-9  # B = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    kl, _ = kl_sum(model, batch, tok.pad_token_id, torch.device("cpu"))
    assert float(kl.detach()) > 1e-4
    kl.backward()  # the gradient reaches the LoRA weights only
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n_, p in model.named_parameters() if "lora_" in n_)
    plain = lambda b: (torch.tensor(2.0), 4, 10)  # noqa: E731
    combined = with_kl(plain, model, batch, 0.5, 3, 0, tok.pad_token_id, torch.device("cpu"))
    total, count, tokens = combined(batch)
    assert (count, tokens) == (4, 10) and float(total.detach()) == pytest.approx(2.0 + 0.5 * float(kl.detach()) * 4 / n)


def test_kl_on_labelled_logits_and_the_teacher_cache_equal_the_full_computation(tiny_model):
    """The fast KL (LM head only where labels are, teacher log-probs kept per record) is the same
    number and the same gradient as KL over every position's full logits."""
    import torch
    from peft import get_peft_model

    from tests.helpers import chat_records
    from wonderland.backends.torch_peft.backend import load_base, lora_config
    from wonderland.backends.torch_peft.batching import collate
    from wonderland.backends.torch_peft.guard import Teacher, kl_sum
    from wonderland.config import TrainConfig

    cpu = torch.device("cpu")
    tok, base = load_base(tiny_model, cpu, torch.float64)
    model = get_peft_model(base, lora_config(TrainConfig(), base.config.num_hidden_layers))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = chat_records(4, seed=2)

    def full_kl():
        ids, labels, mask = collate(batch, tok.pad_token_id, cpu)
        keep = labels[:, 1:] != -100
        with torch.no_grad(), model.disable_adapter():
            ref = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep].float(), -1)
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep].float(), -1)
        return torch.nn.functional.kl_div(logp, ref, log_target=True, reduction="sum")

    def grads(kl):
        model.zero_grad()
        kl.backward()
        return torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.grad is not None])

    want = full_kl()
    g_want = grads(want)
    teacher = Teacher(model, batch)
    assert teacher.keep_cache
    for _ in range(2):  # first call fills the cache, the second reads it
        got, _ = kl_sum(model, batch, tok.pad_token_id, cpu, teacher, [0, 1, 2, 3])
        assert float(got.detach()) == pytest.approx(float(want), rel=1e-9) and torch.allclose(grads(got), g_want, atol=1e-12)
    assert sorted(teacher.cache) == [0, 1, 2, 3]
    got, _ = kl_sum(model, batch[2:], tok.pad_token_id, cpu, teacher, [2, 3])  # cached rows, another batch
    fresh, _ = kl_sum(model, batch[2:], tok.pad_token_id, cpu)
    assert float(got) == pytest.approx(float(fresh), rel=1e-9) and float(fresh) > 1e-6


def test_the_probe_and_validation_loss_on_labelled_logits_equal_the_full_loss(tiny_model):
    """Validation and the probe's scorer run the LM head only where labels are: the same summed NLL
    and token count as the plain loss over every position's logits, adapter on and off."""
    import torch
    from peft import get_peft_model

    from tests.helpers import chat_records
    from wonderland.backends.torch_peft.backend import load_base, lora_config
    from wonderland.backends.torch_peft.batching import collate, summed_loss
    from wonderland.backends.torch_peft.guard import adapter_off, labelled_nll
    from wonderland.config import TrainConfig

    cpu = torch.device("cpu")
    tok, base = load_base(tiny_model, cpu, torch.float64)
    model = get_peft_model(base, lora_config(TrainConfig(), base.config.num_hidden_layers)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = collate(chat_records(5, seed=4), tok.pad_token_id, cpu)
    results = []
    for off in (False, True):
        with torch.no_grad(), adapter_off(model, off):
            want, got = summed_loss(model, *batch), labelled_nll(model, *batch)
        assert got[1] == want[1] > 0 and float(got[0]) == pytest.approx(float(want[0]), rel=1e-6)  # logits cast to float32
        results.append(float(got[0]))
    assert results[0] != results[1]  # the adapter was on, then off
    unlabelled = (batch[0], torch.full_like(batch[1], -100), batch[2])
    loss, n = labelled_nll(model, *unlabelled)
    assert float(loss) == 0.0 and n == 0


def test_the_api_serves_a_checkpoint_as_run_at_step(probed_run, wl_home):
    import shutil

    from wonderland.web import create_app

    runs = wl_home / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    shutil.copytree(probed_run, runs / "hat")
    client = create_app().test_client()
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    kept = sorted(int(p.name[5:]) for p in (runs / "hat" / "checkpoints").glob("step-*"))
    ok = client.post("/v1/chat/completions", json={**body, "model": f"hat@{kept[0]}"})
    assert ok.status_code == 200 and ok.get_json()["model"] == f"hat@{kept[0]}"
    missing = client.post("/v1/chat/completions", json={**body, "model": "hat@99"})
    assert missing.status_code == 404 and "no checkpoint at step 99" in missing.get_json()["error"]["message"]
    bad = client.post("/v1/chat/completions", json={**body, "model": "hat@best"})
    assert bad.status_code == 400 and bad.get_json()["error"]["param"] == "model"


def test_the_kl_and_the_nll_through_the_fused_layers_equal_peft_s(tiny_model):
    """On the fast path the adapted side of the KL runs through the fused layers (packed records,
    longest first): the same logits, in the same (record, position) order, and the same KL and LoRA
    gradients as PEFT's modules; and the same summed NLL (validation and the probe, adapter on)."""
    import torch
    from peft import get_peft_model

    from tests.helpers import chat_records
    from wonderland.backends.torch_peft.backend import load_base, lora_config
    from wonderland.backends.torch_peft.fast import training as torch_fast
    from wonderland.backends.torch_peft.guard import kl_sum, student_logits
    from wonderland.config import TrainConfig

    cpu = torch.device("cpu")
    tok, base = load_base(tiny_model, cpu, torch.float32)
    model = get_peft_model(base, lora_config(TrainConfig(), base.config.num_hidden_layers))
    fast = torch_fast.prepare_model(model, cpu)
    assert "fused_layers" in fast.applied
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = chat_records(5, seed=3, lo=10, hi=60)  # lengths differ: packing re-orders the records
    assert sorted(map(len, (r.input_ids for r in batch)), reverse=True) != [len(r.input_ids) for r in batch]

    (fused, t_fused), (plain, t_plain) = (student_logits(model, batch, tok.pad_token_id, cpu, f) for f in (fast, None))
    assert torch.equal(t_fused, t_plain) and fused.shape == plain.shape
    assert (fused - plain).abs().max() < 1e-4 * plain.abs().max()

    def kl_and_grads(f):
        model.zero_grad()
        kl, n = kl_sum(model, batch, tok.pad_token_id, cpu, fast=f)
        kl.backward()
        return float(kl), n, torch.cat([p.grad.flatten() for n_, p in model.named_parameters() if "lora_" in n_])

    (kl_f, n_f, g_f), (kl_p, n_p, g_p) = kl_and_grads(fast), kl_and_grads(None)
    assert n_f == n_p == len(t_plain) and kl_p > 1e-4
    assert kl_f == pytest.approx(kl_p, rel=1e-3) and torch.allclose(g_f, g_p, rtol=1e-2, atol=1e-5 * g_p.abs().max())
    from wonderland.backends.torch_peft.guard import summed_nll

    with torch.no_grad():
        (nll_f, n_f), (nll_p, n_p) = (summed_nll(model, batch, tok.pad_token_id, cpu, f) for f in (fast, None))
    assert n_f == n_p == len(t_plain) and float(nll_f) == pytest.approx(float(nll_p), rel=1e-4)  # validation, probe


def test_one_pass_for_a_step_and_its_kl_records_equals_two(tiny_model):
    """On the fused layers a step's records and its KL records run as one batch (``joint_batch`` /
    ``joint_loss``; on the CPU behind one shared system prompt): the same loss and LoRA gradients as
    the step's loss plus ``with_kl``'s separate KL pass, both through PEFT's modules."""
    import torch
    from peft import get_peft_model

    from wonderland.backends.torch_peft import guard
    from wonderland.backends.torch_peft.backend import load_base, lora_config
    from wonderland.backends.torch_peft.batching import batch_loss
    from wonderland.backends.torch_peft.fast import training as torch_fast
    from wonderland.chat_format import encode_chat
    from wonderland.config import TrainConfig

    cpu = torch.device("cpu")
    tok, base = load_base(tiny_model, cpu, torch.float64)
    model = get_peft_model(base, lora_config(TrainConfig(), base.config.num_hidden_layers))
    fast = torch_fast.prepare_model(model, cpu)
    assert guard.joint_ok(fast)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    system = {"role": "system", "content": "You are the Hatter. Stay in character: answer as the Hatter would."}

    def rec(user, reply):
        return encode_chat(tok, [system, {"role": "user", "content": user}, {"role": "assistant", "content": reply}], 256)
    own = [rec("What time is it?", "Always six o'clock, and always tea-time."), rec("Tea?", "No room! No room!"),
           rec("Why is a raven like a writing-desk?", "I haven't the slightest idea.")]
    replay = [rec("What is 2 + 2?", "4."), rec("What is the capital of France?", "Paris is the capital of France."),
              rec("At what temperature does water boil?", "At 100 degrees Celsius at sea level.")]
    pad, idx = tok.pad_token_id, guard.kl_indices(0, len(replay), 2, 0)

    def loss_and_grads(fn):
        model.zero_grad(set_to_none=True)
        total, n, tokens = fn()
        (total / n).backward()
        return float(total.detach() / n), n, tokens, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    j = guard.joint_batch(own, replay, idx, pad, cpu, fast)
    assert j.packed.prefix > 10 and len(j.packed.order) == len(own) + len(idx)  # one system prompt for all five
    got = loss_and_grads(lambda: guard.joint_loss(model, replay, 0.5, pad, cpu, fast)(j))
    separate = guard.with_kl(lambda b: batch_loss(model, b, pad, cpu), model, replay, 0.5, 2, 0, pad, cpu)
    want = loss_and_grads(lambda: separate(own))
    assert got[1:3] == want[1:3] == (sum(e.n_target_tokens for e in own), sum(len(e.input_ids) for e in own))
    assert got[0] == pytest.approx(want[0], rel=1e-6)  # the plain loss takes its softmax in float32
    for g, w in zip(got[3], want[3]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))
