"""Chunked log-probs/entropy (grpokit.logprobs) against the materialised (B, T, V) computation.

float64 cases are held to 1e-10: the chunked path reorders no reduction within a row, so any error in the
gradient formulas (onehot - p, -p (logp + H), the 1/T factor, the bias sum) shows up many orders above it."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpokit import logprobs
from grpokit.logprobs import (
    LateWeightGrad,
    default_chunk_size,
    hidden_states,
    late_weight_grad,
    lm_head_of,
    materialized_token_logprobs,
    token_logprobs,
)

TOL = 1e-10


def _problem(B, T, H, V, *, bias, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, H, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    # random upstream gradients, so every row's weight in the loss differs
    g_lp = torch.randn(B, T, generator=g, dtype=torch.float64)
    g_ent = torch.randn(B, T, generator=g, dtype=torch.float64)
    return hidden, weight, b, targets, g_lp, g_ent


def _values_and_grads(fn, hidden, weight, bias, targets, g_lp, g_ent, **kw):
    """(logps, entropy, grad_hidden, grad_weight, grad_bias) of loss = <g_lp, logps> + <g_ent, entropy>."""
    logps, entropy = fn(hidden, weight, targets, bias=bias, return_entropy=True, **kw)
    inputs = [hidden, weight] + ([bias] if bias is not None else [])
    loss = (logps * g_lp.to(logps.dtype)).sum() + (entropy * g_ent.to(entropy.dtype)).sum()
    grads = torch.autograd.grad(loss, inputs)
    return (logps.detach(), entropy.detach(), *grads)


def _assert_all_close(got, want, atol, rtol=0.0):
    names = ("logps", "entropy", "grad_hidden", "grad_weight", "grad_bias")
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 15, 16, 1000, None])  # 15 rows: 4 and 7 do not divide it
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.9])
@pytest.mark.parametrize("block_rows", [None, 3])  # elementwise row blocks inside a chunk (default: 1 block)
def test_matches_materialised_float64(bias, chunk_size, temperature, block_rows, monkeypatch):
    if block_rows is not None:
        monkeypatch.setattr(logprobs, "_BLOCK_BYTES", block_rows * 13 * 8)
    problem = _problem(3, 5, 6, 13, bias=bias)
    got = _values_and_grads(token_logprobs, *problem, temperature=temperature, chunk_size=chunk_size)
    want = _values_and_grads(materialized_token_logprobs, *problem, temperature=temperature)
    _assert_all_close(got, want, atol=TOL)


def test_hand_case_uniform_and_peaked():
    # weight 0 -> uniform over V: logp = -log V, H = log V, whatever the hidden state and temperature
    V = 5
    hidden = torch.randn(2, 3, 4, dtype=torch.float64)
    targets = torch.tensor([[0, 1, 2], [3, 4, 0]])
    logps, entropy = token_logprobs(hidden, torch.zeros(V, 4, dtype=torch.float64), targets,
                                    temperature=0.3, chunk_size=4, return_entropy=True)
    assert torch.allclose(logps, torch.full_like(logps, -math.log(V)), atol=1e-15, rtol=0)
    assert torch.allclose(entropy, torch.full_like(entropy, math.log(V)), atol=1e-15, rtol=0)

    # two tokens, logits (0, log 3): p = (1/4, 3/4), H = -(1/4 log 1/4 + 3/4 log 3/4)
    hidden = torch.tensor([[[1.0]]], dtype=torch.float64)
    weight = torch.tensor([[0.0], [math.log(3.0)]], dtype=torch.float64)
    logp, ent = token_logprobs(hidden, weight, torch.tensor([[1]]), return_entropy=True)
    assert abs(logp.item() - math.log(0.75)) < 1e-15
    assert abs(ent.item() + 0.25 * math.log(0.25) + 0.75 * math.log(0.75)) < 1e-15


def test_large_logits_are_stable(monkeypatch):
    monkeypatch.setattr(logprobs, "_BLOCK_BYTES", 2 * 17 * 8)  # 2-row blocks in 3-row chunks
    # logits of order 1e3 overflow a naive exp; the max-shift must keep everything finite and exact
    problem = _problem(2, 4, 8, 17, bias=True, scale=300.0)
    got = _values_and_grads(token_logprobs, *problem, chunk_size=3, temperature=0.5)
    want = _values_and_grads(materialized_token_logprobs, *problem, temperature=0.5)
    assert all(torch.isfinite(x).all() for x in got)
    _assert_all_close(got, want, atol=1e-8, rtol=1e-12)


def test_only_one_output_in_the_loss():
    hidden, weight, bias, targets, g_lp, g_ent = _problem(2, 3, 5, 9, bias=True, seed=1)
    inputs = [hidden, weight, bias]
    for use in ("logps", "entropy"):
        grads = []
        for fn, kw in ((token_logprobs, {"chunk_size": 4}), (materialized_token_logprobs, {})):
            logps, entropy = fn(hidden, weight, targets, bias=bias, temperature=1.3, return_entropy=True,
                                **kw)
            loss = (logps * g_lp).sum() if use == "logps" else (entropy * g_ent).sum()
            grads.append(torch.autograd.grad(loss, inputs))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, atol=TOL, rtol=0)


def test_without_entropy_returns_one_tensor():
    hidden, weight, bias, targets, g_lp, _ = _problem(2, 3, 5, 9, bias=False, seed=2)
    logps = token_logprobs(hidden, weight, targets, chunk_size=2)
    assert isinstance(logps, torch.Tensor) and logps.shape == targets.shape and logps.dtype == torch.float64
    want = materialized_token_logprobs(hidden, weight, targets)
    torch.testing.assert_close(logps, want, atol=TOL, rtol=0)
    got_g = torch.autograd.grad((logps * g_lp).sum(), [hidden, weight])
    want_g = torch.autograd.grad((want * g_lp).sum(), [hidden, weight])
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)


def test_frozen_weight_and_no_grad():
    hidden, weight, bias, targets, g_lp, _ = _problem(2, 3, 5, 9, bias=True, seed=3)
    weight = weight.detach()
    logps = token_logprobs(hidden, weight, targets, bias=bias, chunk_size=4)
    (gh,) = torch.autograd.grad(logps.sum(), [hidden])
    want = materialized_token_logprobs(hidden, weight, targets, bias=bias)
    (want,) = torch.autograd.grad(want.sum(), [hidden])
    torch.testing.assert_close(gh, want, atol=TOL, rtol=0)
    with torch.no_grad():
        assert not token_logprobs(hidden, weight, targets, bias=bias).requires_grad


def test_bf16_inputs_give_fp32_outputs_close_to_the_exact_values(monkeypatch):
    monkeypatch.setattr(logprobs, "_BLOCK_BYTES", 2 * 301 * 4)  # 2-row blocks in 5-row chunks
    problem = _problem(4, 8, 32, 301, bias=True, dtype=torch.bfloat16, seed=4)
    hidden, weight, bias, targets, g_lp, g_ent = problem
    got = _values_and_grads(token_logprobs, hidden, weight, bias, targets, g_lp, g_ent, chunk_size=5,
                            temperature=0.8)
    assert got[0].dtype == got[1].dtype == torch.float32
    assert got[2].dtype == got[3].dtype == got[4].dtype == torch.bfloat16
    # same bf16 logits, fp32 softmax: equal to the materialised bf16 path up to fp32 reduction order
    mat = _values_and_grads(materialized_token_logprobs, hidden, weight, bias, targets, g_lp, g_ent,
                            temperature=0.8)
    torch.testing.assert_close(got[0], mat[0], atol=2e-5, rtol=0)
    torch.testing.assert_close(got[1], mat[1], atol=2e-5, rtol=0)
    # gradients: ours accumulates grad_weight/bias in fp32, so compare both to the fp64 truth of these inputs
    exact = [x.detach().double().requires_grad_() if x is not None else None for x in (hidden, weight, bias)]
    truth = _values_and_grads(materialized_token_logprobs, *exact, targets, g_lp, g_ent, temperature=0.8)
    for i, (a, t) in enumerate(zip(got, truth)):
        err = (a.double() - t).abs().max().item()
        scale = t.abs().max().item()
        assert err <= 0.02 * scale + 0.05, (i, err, scale)  # bf16 logits: ~2^-8 relative rounding
    for a, m in zip(got[2:], mat[2:]):  # and close to what autograd through the bf16 head gives
        torch.testing.assert_close(a.float(), m.float(), atol=0.05 * m.float().abs().max().item(), rtol=0.0)


@settings(max_examples=25, deadline=None)
@given(
    n_rows=st.integers(1, 20),
    hidden_size=st.integers(1, 9),
    vocab=st.integers(1, 40),
    chunk_size=st.integers(1, 25),
    temperature=st.floats(0.25, 4.0),
    bias=st.booleans(),
    block_rows=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_property_chunked_equals_materialised(n_rows, hidden_size, vocab, chunk_size, temperature, bias,
                                              block_rows, seed):
    problem = _problem(1, n_rows, hidden_size, vocab, bias=bias, seed=seed)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(logprobs, "_BLOCK_BYTES", block_rows * vocab * 8)
        got = _values_and_grads(token_logprobs, *problem, temperature=temperature, chunk_size=chunk_size)
    want = _values_and_grads(materialized_token_logprobs, *problem, temperature=temperature)
    _assert_all_close(got, want, atol=1e-9)
    assert (got[1] >= -1e-12).all() and (got[1] <= math.log(vocab) + 1e-9).all()  # 0 <= H <= log V


def test_saves_no_vocab_sized_activation():
    # what autograd keeps between forward and backward: inputs and O(rows) stats, never (rows, V)
    N, H, V = 64, 8, 512
    hidden, weight, bias, targets, _, _ = _problem(1, N, H, V, bias=True, seed=5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        token_logprobs(hidden, weight, targets, bias=bias, chunk_size=16, return_entropy=True)
    assert saved and max(saved) == V * H  # the weight itself; the largest new one is (N,) or (N, H)
    assert sorted(saved)[-2] <= N * H


def test_default_chunk_size_bounds_the_chunk():
    rows = default_chunk_size(151_936)
    assert rows % 8 == 0 and 32 * 2**20 <= rows * 151_936 * 4 <= 64 * 2**20
    assert default_chunk_size(10**9) == 1


@pytest.mark.parametrize("bias", [False, True])
def test_a_float32_master_head_in_bf16_equals_passing_its_bf16_cast(monkeypatch, bias):
    """``compute_dtype=bfloat16`` with the float32 weight: the same log-probs, entropies and gradients, to the
    bit, as the differentiable ``weight.to(bfloat16)`` passed in (whose gradient autograd casts back), with the
    head gradient rounded in several blocks."""
    import grpokit.logprobs as lp

    monkeypatch.setattr(lp, "_ROUND_BLOCK_ROWS", 4)
    torch.manual_seed(0)
    N, H, V = 6, 8, 11
    weight = torch.randn(V, H, requires_grad=True)
    b = torch.randn(V, requires_grad=True) if bias else None
    hidden = torch.randn(N, H).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V, (N,))

    def run(cast: bool):
        for t in (weight, b, hidden):
            if t is not None:
                t.grad = None
        if cast:
            out = token_logprobs(hidden, weight.to(torch.bfloat16), targets, temperature=0.7, chunk_size=4,
                                 bias=None if b is None else b.to(torch.bfloat16), return_entropy=True)
        else:
            out = token_logprobs(hidden, weight, targets, temperature=0.7, chunk_size=4, bias=b,
                                 return_entropy=True, compute_dtype=torch.bfloat16)
        (out[0].sum() + 0.3 * out[1].sum()).backward()
        grads = [t.grad.clone() for t in (weight, b, hidden) if t is not None]
        return [o.detach() for o in out], grads

    (want_out, want_grads), (got_out, got_grads) = run(cast=True), run(cast=False)
    assert got_grads[0].dtype == torch.float32 and got_out[0].dtype == torch.float32
    for got, want in zip(got_out + got_grads, want_out + want_grads):
        assert torch.equal(got, want)


def _late(hidden, weight, targets, **kw):
    alias, handle = late_weight_grad(weight)
    return token_logprobs(hidden, alias, targets, late_weight_grad=handle, **kw)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows,chunk_size", [(6, 4), (6, None), (20, 7)])  # 20 rows >= H: made at once
def test_a_late_weight_gradient_equals_the_one_made_at_once(monkeypatch, rows, chunk_size, bias):
    """``late_weight_grad``: the same values and gradients in float64, the dlogits kept (and the gradient
    formed late) only while they take less memory than the gradient (N < H in float64)."""
    kept = []
    keep = LateWeightGrad.keep
    monkeypatch.setattr(LateWeightGrad, "keep", lambda self, *a: (kept.append(1), keep(self, *a)))
    problem = _problem(2, rows // 2, 16, 13, bias=bias)
    want = _values_and_grads(token_logprobs, *problem, temperature=0.7, chunk_size=chunk_size)
    got = _values_and_grads(_late, *problem, temperature=0.7, chunk_size=chunk_size)
    _assert_all_close(got, want, atol=TOL)
    assert len(kept) == (rows < 16)


def test_a_late_bf16_weight_gradient_follows_the_one_made_at_once():
    """bf16 compute on a float32 master: the late gradient is the (V, N) x (N, H) product of the bf16 dlogits
    (autograd's rounding through a bf16 head), against float32 dlogits at once: equal up to bf16 rounding."""
    hidden, weight, bias, targets, g_lp, g_ent = _problem(2, 5, 64, 40, bias=False, dtype=torch.float32)
    hidden = hidden.detach().to(torch.bfloat16).requires_grad_()
    problem = (hidden, weight, None, targets, g_lp, g_ent)
    want = _values_and_grads(token_logprobs, *problem, compute_dtype=torch.bfloat16)
    got = _values_and_grads(_late, *problem, compute_dtype=torch.bfloat16)
    assert got[3].dtype == torch.float32
    for a, b in zip(got[:3], want[:3]):
        assert torch.equal(a, b)  # values and the hidden gradient do not depend on when the weight's is made
    assert (got[3] - want[3]).norm() <= 1e-2 * want[3].norm() and not torch.equal(got[3], want[3])


def test_the_late_weight_gradient_is_made_after_the_body_backward(monkeypatch):
    """The head's weight gradient is formed once autograd has gone through the body (so not beside its
    activations), when the weight is taken through ``late_weight_grad`` before the body runs."""
    order = []
    take = LateWeightGrad.take
    monkeypatch.setattr(LateWeightGrad, "take", lambda self: (order.append("head"), take(self))[1])
    body = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
    body[0].weight.register_post_accumulate_grad_hook(lambda p: order.append("body"))
    weight = torch.randn(11, 8, requires_grad=True)
    alias, handle = late_weight_grad(weight)
    logps = token_logprobs(body(torch.randn(3, 8)), alias, torch.tensor([1, 2, 3]), late_weight_grad=handle)
    logps.sum().backward()
    assert order == ["body", "head"] and weight.grad is not None and weight.grad.abs().sum() > 0


def test_rejects_bad_inputs():
    hidden, weight, bias, targets, _, _ = _problem(2, 3, 5, 9, bias=True)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(hidden, weight, targets[:, :2])
    with pytest.raises(ValueError, match="dtype"):
        token_logprobs(hidden.float(), weight, targets)
    with pytest.raises(ValueError, match="hidden must be in the compute dtype torch.bfloat16, got torch.float64"):
        token_logprobs(hidden, weight, targets, compute_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(hidden, weight, targets, chunk_size=0)


# ----------------------------------------------------------------------------------------------------------
# Hugging Face models: body + chunked head == log_softmax(model(...).logits), shifted by one


def _tiny_model(kind: str, tied: bool):
    import transformers
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    torch.manual_seed(0)
    return model_cls(config_cls(**common)).double()


@pytest.mark.parametrize("kind,tied", [("llama", False), ("qwen2", True), ("qwen2", False)])
def test_hf_body_plus_chunked_head_equals_model_logits(kind, tied):
    model = _tiny_model(kind, tied)
    weight, bias = lm_head_of(model)
    assert (weight is model.get_input_embeddings().weight) == tied
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding, as in a GRPO batch of prompts
    mask[2, :1] = 0

    hidden = hidden_states(model, ids, mask)  # (B, T, H), final norm included
    logps, entropy = token_logprobs(hidden[:, :-1], weight, ids[:, 1:], bias=bias, temperature=0.9,
                                    chunk_size=7, return_entropy=True)
    loss = (logps * mask[:, 1:]).sum() + 0.1 * entropy.sum()
    got_grads = torch.autograd.grad(loss, list(model.parameters()))

    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # position t predicts token t+1
    logp_all = torch.log_softmax(logits / 0.9, dim=-1)
    want = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
    want_ent = -(logp_all.exp() * logp_all).sum(-1)
    torch.testing.assert_close(logps, want, atol=TOL, rtol=0)
    torch.testing.assert_close(entropy, want_ent, atol=TOL, rtol=0)
    want_loss = (want * mask[:, 1:]).sum() + 0.1 * want_ent.sum()
    want_grads = torch.autograd.grad(want_loss, list(model.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_lm_head_of_rejects_scaled_heads():
    from types import SimpleNamespace

    for field, value in (("final_logit_softcapping", 30.0), ("logit_scale", 0.0625), ("logits_scaling", 8.0)):
        fake = SimpleNamespace(config=SimpleNamespace(**{field: value}))
        with pytest.raises(ValueError, match=field):
            lm_head_of(fake)
