"""``token_kl_exact``: the chunked full-vocabulary KL against the materialised (B, T, V) computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from grpokit.kl import exact_kl
from grpokit.logprobs import token_kl_exact


def materialised(hp, wp, hq, wq, temperature, bp=None, bq=None):
    logp = torch.log_softmax(F.linear(hp, wp, bp).double() / temperature, dim=-1)  # (B, T, V)
    logq = torch.log_softmax(F.linear(hq, wq, bq).double() / temperature, dim=-1)
    return exact_kl(logp, logq), exact_kl(logq, logp)


def problem(B=3, T=5, Hp=6, Hq=4, V=11, *, dtype=torch.float64, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    return dict(hidden_p=rand(B, T, Hp), weight_p=rand(V, Hp), hidden_q=rand(B, T, Hq), weight_q=rand(V, Hq),
                bias_p=rand(V) if bias else None, bias_q=rand(V) if bias else None)


@pytest.mark.parametrize("chunk_size", [1, 4, 15, None])  # 15 rows; 4 does not divide them
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_the_materialised_kl_in_float64(chunk_size, temperature, bias):
    x = problem(bias=bias)
    kl_pq, kl_qp = token_kl_exact(**x, temperature=temperature, chunk_size=chunk_size)
    want_pq, want_qp = materialised(x["hidden_p"], x["weight_p"], x["hidden_q"], x["weight_q"], temperature,
                                    x["bias_p"], x["bias_q"])
    assert kl_pq.shape == kl_qp.shape == (3, 5)
    torch.testing.assert_close(kl_pq, want_pq, rtol=0, atol=1e-12)
    torch.testing.assert_close(kl_qp, want_qp, rtol=0, atol=1e-12)
    assert (kl_pq > 0).all() and (kl_qp > 0).all() and not torch.allclose(kl_pq, kl_qp)  # asymmetric


def test_float32_and_bfloat16_heads_and_no_gradient():
    x = problem(V=300, dtype=torch.float32)
    x["hidden_p"].requires_grad_()
    kl_pq, kl_qp = token_kl_exact(**x, chunk_size=4)
    assert kl_pq.dtype == torch.float32 and not kl_pq.requires_grad
    want_pq, want_qp = materialised(x["hidden_p"].detach(), x["weight_p"], x["hidden_q"], x["weight_q"], 1.0)
    torch.testing.assert_close(kl_pq.double(), want_pq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl_qp.double(), want_qp, rtol=1e-5, atol=1e-5)
    b = {k: v if v is None else v.detach().bfloat16() for k, v in x.items()}
    got = token_kl_exact(**b, chunk_size=7)
    want = materialised(b["hidden_p"], b["weight_p"], b["hidden_q"], b["weight_q"], 1.0)  # bf16 logits, then fp
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=1e-5)


def test_identical_distributions_give_zero_and_errors_are_named():
    x = problem(Hq=6)
    kl_pq, kl_qp = token_kl_exact(x["hidden_p"], x["weight_p"], x["hidden_p"], x["weight_p"])
    assert kl_pq.abs().max() < 1e-14 and kl_qp.abs().max() < 1e-14
    with pytest.raises(ValueError, match="different vocabularies"):
        token_kl_exact(x["hidden_p"], x["weight_p"], x["hidden_q"], x["weight_q"][:5])
    with pytest.raises(ValueError, match="leading"):
        token_kl_exact(x["hidden_p"], x["weight_p"], x["hidden_q"][:1], x["weight_q"])
