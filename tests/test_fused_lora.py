"""The hand-written LoRA decoder layers (wonderland.backends.torch_peft.fast.fused_lora) compute the PEFT model's
loss and LoRA gradients exactly.

CI has no GPU: these run the layers on the CPU in float64 with the plain-PyTorch attention
(MathAttention) and eager pointwise functions, against the unmodified transformers + PEFT model.
On CUDA the same layers run FlashAttention and torch.compile'd pointwise kernels;
``bench/train_throughput.py --check`` compares those with the plain path in bf16 on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from wonderland.backends.torch_peft.fast import fused_lora, fused_ops
from wonderland.backends.torch_peft.fast import training as tf
from wonderland.backends.torch_peft.batching import collate, summed_loss

from tests.helpers import chat_records

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny(targets=ALL, layers=None, rank=4, alpha=8, dtype=torch.float64, seed=0, dropout=0.0, **lora):
    """A random 3-layer llama with grouped-query attention (4 query heads, 2 k/v heads) and a LoRA
    whose B is non-zero, so every LoRA weight has a non-trivial gradient."""
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, rope_theta=10000.0,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(cfg).to(dtype)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                                            layers_to_transform=layers, task_type="CAUSAL_LM", **lora))
    for n, p in model.named_parameters():
        if "lora_" in n:
            torch.nn.init.normal_(p, std=0.2)
    return model


def records(n: int, seed: int) -> list:
    return chat_records(n, seed, lo=5, hi=30, vocab=97)  # the tiny model's vocabulary


def loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss, n = fn()
    (loss / n).backward()
    return float(loss.detach() / n), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def assert_same(got, ref, rtol=1e-5):  # the plain loss takes its softmax in float32
    (loss, grads), (ref_loss, ref_grads) = got, ref
    assert loss == pytest.approx(ref_loss, rel=rtol)
    assert grads.keys() == ref_grads.keys() and grads
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=rtol, atol=rtol * float(ref_grads[k].abs().max()), msg=k)


@pytest.mark.parametrize("targets,layers,lora", [
    (ALL, None, {}), (["q_proj", "v_proj"], None, {}), (["k_proj", "o_proj", "down_proj"], [2], {}),
    (["gate_proj", "up_proj"], [0, 1], {}),
    (ALL, None, dict(rank_pattern={"k_proj": 2, "up_proj": 6}, alpha_pattern={"v_proj": 3, "gate_proj": 5}))])  # mixed scales
def test_fused_layers_match_peft_loss_and_every_lora_gradient(targets, layers, lora):
    model = tiny(targets, layers, **lora)
    recs = records(4, seed=1)
    ids, labels, mask = collate(recs, 0, torch.device("cpu"))
    ref = loss_and_grads(model, lambda: summed_loss(model, ids, labels, mask))
    opts = tf.prepare_model(model, torch.device("cpu"), tf.FastOptions())
    assert "fused_layers" in opts.applied, opts.fused_reason
    got = loss_and_grads(model, lambda: tf.summed_loss(model, ids, labels, mask))  # right padding, no mask needed
    assert_same(got, ref)
    # the module weights are views of the concatenated groups: the plain forward still gives the same loss
    again = loss_and_grads(model, lambda: summed_loss(model, ids, labels, mask))
    assert_same(again, ref)


def test_packed_records_never_attend_across_boundaries():
    model = tiny()
    recs = records(7, seed=2)
    cpu = torch.device("cpu")
    ref = loss_and_grads(model, lambda: summed_loss(model, *collate(recs, 0, cpu)))
    opts = tf.prepare_model(model, cpu, tf.FastOptions())
    p = tf.pack(recs, 0, cpu, capacity=sum(len(r.input_ids) for r in recs))  # all records in one row
    assert p.input_ids.shape[0] == 1
    got = loss_and_grads(model, lambda: tf.summed_loss(model, p.input_ids, p.labels, None, p.position_ids))
    assert_same(got, ref)
    # batch_loss packs the same way on this path
    loss, n, tokens = tf.batch_loss(model, recs, 0, cpu, opts)
    assert float(loss / n) == pytest.approx(ref[0], rel=1e-5) and tokens == sum(len(r.input_ids) for r in recs)


def with_prefix(recs, n: int = 12) -> list:
    """``recs`` behind one unlabelled prefix of ``n`` tokens: a system prompt every record shares."""
    from wonderland.chat_format import IGNORE, Encoded

    head = list(range(10, 10 + n))
    return [Encoded(head + r.input_ids, [IGNORE] * n + r.labels) for r in recs]


def test_a_shared_prefix_is_computed_once_with_the_loss_and_gradients_of_whole_records():
    model = tiny()
    cpu = torch.device("cpu")
    recs = with_prefix(records(5, seed=4))
    ref = loss_and_grads(model, lambda: summed_loss(model, *collate(recs, 0, cpu)))
    opts = tf.prepare_model(model, cpu, tf.FastOptions())
    p = tf.prepare_batch(recs, 0, cpu, opts)
    assert p.prefix == 12 and p.lengths.tolist()[0] == 12  # laid out once, as the first sequence
    assert p.input_ids.shape == (1, 8 * -(-(12 + sum(len(r.input_ids) - 12 for r in recs)) // 8))
    assert p.tokens == sum(len(r.input_ids) for r in recs)  # the records' tokens, as the loss sees them
    assert_same(loss_and_grads(model, lambda: tf.prepared_loss(model, p, opts)[:2]), ref)


def test_the_shared_prefix_stops_before_any_label_and_where_records_differ():
    from wonderland.chat_format import IGNORE, Encoded

    recs = with_prefix(records(3, seed=5), n=12)
    assert tf.shared_prefix(recs) == 12  # the records' own prompts are random tokens: they differ at once
    labelled = Encoded(recs[0].input_ids, recs[0].labels[:9] + recs[0].input_ids[9:])  # a label at position 9
    assert tf.shared_prefix([labelled, *recs[1:]]) == 8  # position 8 predicts it: it stays in the record
    assert tf.shared_prefix(with_prefix(records(3, seed=5), n=7)) == 0  # shorter than MIN_SHARED_PREFIX (8)
    assert tf.shared_prefix(recs[:1]) == 0  # one record: nothing to share


def test_pointwise_backwards_are_the_gradients_of_their_forwards():
    g = torch.Generator().manual_seed(3)
    N, nh, nkv, hd, H, inter = 6, 4, 2, 8, 16, 10

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x, w = rand(N, H).requires_grad_(), rand(H)
    y, xhat, rstd = fused_ops.rms_fwd(x, w, 1e-6)
    dy, dres = rand(N, H), rand(N, H)
    (ref,) = torch.autograd.grad(y, x, dy)
    torch.testing.assert_close(fused_ops.rms_bwd(dy, xhat.detach(), rstd.detach(), w, dres), ref + dres)

    qkv = rand(N, (nh + 2 * nkv) * hd).requires_grad_()
    ang = rand(N, hd // 2)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    q, k, v = fused_ops.rope_fwd(qkv, cos, sin, nh, nkv, hd)
    dq, dk, dv = rand(*q.shape), rand(*k.shape), rand(*v.shape)
    (ref,) = torch.autograd.grad((q, k, v), qkv, (dq, dk, dv))
    torch.testing.assert_close(fused_ops.rope_bwd(dq, dk, dv, cos, sin), ref)

    gu = rand(N, 2 * inter).requires_grad_()
    h = fused_ops.swiglu_fwd(gu)
    torch.testing.assert_close(h, torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:])
    dh = rand(N, inter)
    (ref,) = torch.autograd.grad(h, gu, dh)
    torch.testing.assert_close(fused_ops.swiglu_bwd(dh, gu.detach()), ref)


def test_math_attention_backward_matches_autograd_with_grouped_heads():
    g = torch.Generator().manual_seed(4)
    cu = torch.tensor([0, 5, 6, 13])
    q = torch.randn(13, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(13, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(13, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    attn = fused_ops.MathAttention(cu, 7, 8 ** -0.5)
    out, state = attn.forward(q.detach(), k.detach(), v.detach(), torch.empty(13, 32, dtype=torch.float64))
    ref = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), is_causal=True, enable_gqa=True).transpose(0, 1)
        for s, e in ((0, 5), (5, 6), (6, 13))])
    torch.testing.assert_close(out, ref.detach().reshape(13, 32))
    torch.testing.assert_close(attn.output(state), out)
    do = torch.randn(13, 32, generator=g, dtype=torch.float64)
    refs = torch.autograd.grad(ref, (q, k, v), do.view(13, 4, 8))
    for a, b in zip(attn.backward(do, state), refs):
        torch.testing.assert_close(a, b)


def test_rope_writes_the_layout_attention_asks_for():
    g = torch.Generator().manual_seed(5)
    B, T, nh, nkv, hd = 2, 3, 4, 2, 8
    qkv = torch.randn(B * T, (nh + 2 * nkv) * hd, generator=g, dtype=torch.float64)
    ang = torch.randn(B * T, hd // 2, generator=g, dtype=torch.float64)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    flat = fused_ops.rope_fwd(qkv, cos, sin, nh, nkv, hd)
    heads = fused_ops.rope_fwd(qkv, cos, sin, nh, nkv, hd, T=T)
    for f, h in zip(flat, heads):
        assert h.shape == (B, f.shape[1], T, hd) and h.is_contiguous()
        torch.testing.assert_close(h.transpose(1, 2).reshape(f.shape), f)
    grads = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in heads]
    torch.testing.assert_close(fused_ops.rope_bwd(*grads, cos, sin, T=T),
                               fused_ops.rope_bwd(*(t.transpose(1, 2).reshape(f.shape) for t, f in zip(grads, flat)), cos, sin))


def test_lora_is_folded_into_the_group_matmul():
    model = tiny(["q_proj", "v_proj"])
    layer = model.get_base_model().model.layers[0].self_attn
    x = torch.randn(5, 32, dtype=torch.float64)
    ref = torch.cat([layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)], 1)
    fused, why = fused_lora.prepare(model, cuda=False)
    assert fused is not None, why
    L = fused.layers[0]
    group, params = L.qkv, L.params
    assert group.aug.shape == (32 + 16 + 16, 32 + 4 + 4) and len(params) == 4  # k has no LoRA
    assert layer.k_proj.weight.data_ptr() == group.aug.data_ptr() + 32 * group.aug.stride(0) * 8  # a view, no copy
    assert group.aug.data_ptr() >= L.arena.data_ptr() and group.acat.data_ptr() >= L.arena.data_ptr()  # one arena
    assert all(p.data_ptr() >= fused.master.data_ptr() for p in params)  # the LoRA weights are views of the master
    fused.sync_lora()
    q_a, q_b, v_a, v_b = (p.detach() for p in params)
    torch.testing.assert_close(group.acat, 2.0 * torch.cat([q_a, v_a]))  # alpha / r = 2
    torch.testing.assert_close(group.aug[:, 32:], torch.block_diag(q_b, torch.zeros(16, 0, dtype=q_b.dtype), v_b))
    xa = group.input_buffer(5, x)
    xa[:, :32] = x
    y, a = group.forward(xa)
    torch.testing.assert_close(y, ref.detach())
    torch.testing.assert_close(a, 2.0 * torch.cat([x @ q_a.t(), x @ v_a.t()], 1))
    torch.testing.assert_close(torch.cat([layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)], 1), ref)  # PEFT unchanged


@pytest.mark.parametrize("lora,reason", [(dict(dropout=0.1), "dropout"), (dict(modules_to_save=["lm_head"]), "trainable")])
def test_unsupported_models_keep_the_peft_modules(lora, reason):
    model = tiny(**lora)
    opts = tf.prepare_model(model, torch.device("cpu"), tf.FastOptions())
    assert "fused_layers" not in opts.applied and reason in opts.fused_reason
    assert not hasattr(model.get_base_model(), "_wonderland_fused")
