"""The fast training path (wonderland.backends.torch_peft.fast.training) computes what the plain path computes.

CI has no GPU: these run the pure-PyTorch pieces on the CPU (packing laid out on the host, fused
AdamW, the backend's wiring through ``WONDERLAND_TORCH_FAST=1``; the fused loss itself is
tests/test_fused_ce.py). `bench/train_throughput.py --check` compares the CUDA kernels with the
plain path on the GPU (results in bench/README.md).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from wonderland.backends.torch_peft.fast import training as tf
from wonderland.backends.torch_peft.backend import load_base, lora_config
from wonderland.backends.torch_peft.batching import collate, summed_loss
from wonderland.chat_format import IGNORE, Encoded
from wonderland.config import TrainConfig

from tests.helpers import chat_records as records

CPU = torch.device("cpu")


def test_pack_rows_keeps_every_record_once_within_capacity():
    lengths = [30, 5, 17, 29, 1, 12, 30, 8]
    rows = tf.pack_rows(lengths, 30)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 30 for row in rows)
    assert len(rows) == -(-sum(lengths) // 30) + 0  # first-fit-decreasing is optimal here: 132 tokens -> 5 rows


def test_pack_layout_restarts_positions_and_masks_boundaries():
    recs = records(7, seed=1)
    p = tf.pack(recs, pad_id=0, device=CPU)
    assert p.tokens == sum(len(r.input_ids) for r in recs)
    assert p.input_ids.shape[0] < len(recs)  # short records share rows
    assert (p.position_ids == 0).sum() >= len(recs)  # one start per record (plus padding tails)
    # every labelled token of every record is still labelled, nothing else is
    assert int((p.labels != IGNORE).sum()) == sum(sum(t != IGNORE for t in r.labels[1:]) for r in recs)


@pytest.fixture(scope="module")
def tiny_peft(tiny_model):
    from peft import get_peft_model

    torch.manual_seed(0)
    _, base = load_base(tiny_model, CPU, torch.float32)
    model = get_peft_model(base, lora_config(TrainConfig(rank=4, alpha=8, targets="q_proj,v_proj,gate_proj,down_proj"), 2))
    for n, p in model.named_parameters():  # non-zero B: every LoRA weight gets a gradient
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss, n = fn()
    (loss / n).backward()
    return float(loss.detach() / n), n, [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_fused_loss_equals_plain_loss_and_lora_gradients(tiny_peft):
    recs = records(5, seed=2)
    ids, labels, mask = collate(recs, 0, CPU)
    ref, n_ref, ref_g = _loss_and_grads(tiny_peft, lambda: summed_loss(tiny_peft, ids, labels, mask))
    got, n, g = _loss_and_grads(tiny_peft, lambda: tf.summed_loss(tiny_peft, ids, labels, mask))
    assert n == n_ref and got == pytest.approx(ref, rel=1e-5)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_packed_batch_gives_the_padded_batch_loss_and_gradients(tiny_peft):
    recs = records(9, seed=3)
    ref, n_ref, ref_g = _loss_and_grads(tiny_peft, lambda: summed_loss(tiny_peft, *collate(recs, 0, CPU)))
    p = tf.pack(recs, 0, CPU)
    assert p.input_ids.shape[0] < len(recs)
    got, n, g = _loss_and_grads(tiny_peft, lambda: tf.summed_loss(tiny_peft, p.input_ids, p.labels, None, p.position_ids))
    assert n == n_ref and got == pytest.approx(ref, rel=1e-5)
    for a, b in zip(g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # and packing really isolates records: the same rows without position resets would differ
    leaky, _ = summed_loss(tiny_peft, p.input_ids, p.labels, torch.ones_like(p.input_ids))
    assert float(leaky / n) != pytest.approx(ref, rel=1e-4)


def _chat_dataset(path, n: int = 12) -> None:
    path.mkdir()
    lines = []
    for i in range(n):
        lines.append(json.dumps({"messages": [
            {"role": "system", "content": "You are the Hatter."},
            {"role": "user", "content": f"Why is a raven like a writing-desk? ({i})" + " Tell me." * (i % 4)},
            {"role": "assistant", "content": "I haven't the slightest idea" + ", none at all" * (i % 5) + "."}]}))
    (path / "train.jsonl").write_text("\n".join(lines) + "\n")


def test_backend_fast_path_trains_the_same_adapter_as_the_plain_path(tiny_model, tmp_path, monkeypatch):
    from wonderland.train import train

    _chat_dataset(tmp_path / "data")
    cfg = dict(model=str(tiny_model), backend="torch", device="cpu", iters=4, batch_size=4, lr=1e-3, warmup=1,
               val_every=0, save_every=0, rank=4, alpha=8, targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    adapters, losses, speedups = [], [], []
    for mode in ("0", "1"):
        monkeypatch.setenv(tf.ENV, mode)
        run = train(TrainConfig(**cfg), tmp_path / "data", out=str(tmp_path / f"run-{mode}"), log=lambda m: None)
        adapters.append(load_file(str(run.adapter / "adapter_model.safetensors")))
        events = [json.loads(line) for line in run.metrics.read_text().splitlines()]
        losses.append([e["loss"] for e in events if e["event"] == "step"])
        speedups.append(next(e for e in events if e["event"] == "started")["speedups"])
    plain, fast = adapters
    assert speedups[0] == [] and "fused_layers" in speedups[1]  # the hand-written LoRA layers ran (fused_lora.py)
    assert plain.keys() == fast.keys() and len(plain) == 2 * 7 * 2
    # float32 on CPU: the packed rows and the fused loss change only summation order. After 4
    # AdamW steps (lr 1e-3) weights agree to ~1e-6 absolute; 1e-5 is the stated tolerance.
    for k in plain:
        torch.testing.assert_close(fast[k], plain[k], rtol=0, atol=1e-5)
    assert any(float((plain[k] != 0).float().mean()) > 0 for k in plain if "lora_B" in k)  # training moved B
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_pack_works_out_labels_and_sequences_on_the_host(tiny_peft):
    """What the GPU would otherwise be asked for mid-step (and waited for) comes with the batch."""
    recs = records(6, seed=5)
    p = tf.pack(recs, 0, CPU, capacity=sum(len(r.input_ids) for r in recs))  # one row, as on the fused layers
    assert p.lengths.tolist()[: len(recs)] == sorted((len(r.input_ids) for r in recs), reverse=True)
    assert int(p.lengths.sum()) == p.input_ids.numel()
    shifted = p.labels[:, 1:].reshape(-1)
    assert p.keep.tolist() == (shifted != IGNORE).nonzero().squeeze(1).tolist() and p.n == len(p.keep)
    assert p.targets.tolist() == shifted[p.keep].tolist()
    with_host, n1 = tf.summed_loss(tiny_peft, p.input_ids, p.labels, None, p.position_ids, packed=p)
    on_device, n2 = tf.summed_loss(tiny_peft, p.input_ids, p.labels, None, p.position_ids)
    assert n1 == n2 and float(with_host) == pytest.approx(float(on_device), rel=1e-6)


def test_equal_length_records_become_plain_rows_on_the_fused_layers(tiny_peft):
    opts = tf.FastOptions()
    opts.applied = ["fused_layers", "fused_ce", "pack"]
    recs = records(4, seed=6)
    same = [Encoded(r.input_ids[:9], r.labels[:9]) for r in recs]
    p = tf.prepare_batch(same, 0, CPU, opts)
    assert p.input_ids.shape == (4, 9) and p.position_ids is None  # causal rows: no segments, cuDNN attention on CUDA
    mixed = tf.prepare_batch(recs[:4], 0, CPU, opts)
    assert mixed.input_ids.shape[0] == 1 and mixed.position_ids is not None  # one packed row, attended per record


def test_unpacked_batches_are_the_padded_collate_with_host_side_labels(tiny_peft):
    """``pack=False``: one record per row as ``collate`` lays it out, labelled positions counted on the host."""
    recs = records(5, seed=7)
    opts = tf.FastOptions(pack=False)
    opts.applied = ["fused_ce"]
    p = tf.prepare_batch(recs, 0, CPU, opts)
    ids, labels, mask = collate(recs, 0, CPU)
    assert torch.equal(p.input_ids, ids) and torch.equal(p.labels, labels) and torch.equal(p.attention_mask, mask)
    assert p.position_ids is None and p.tokens == sum(len(r.input_ids) for r in recs)
    ref, n_ref = summed_loss(tiny_peft, ids, labels, mask)
    loss, n, _ = tf.prepared_loss(tiny_peft, p, opts)
    assert n == n_ref == p.n and float(loss) == pytest.approx(float(ref), rel=1e-5)
