import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpokit.losses import AGGREGATIONS, LOSS_TYPES, SURROGATES, BatchTotals, LossConfig, grpo_loss
from tests.trl_reference import trl_compute_loss

F64 = torch.float64


def random_batch(seed, B=4, T=6, off_policy=True, spread=0.3, token_adv=False):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(B, T, generator=g, dtype=F64) * 3).requires_grad_()
    old = (logps.detach() + spread * torch.randn(B, T, generator=g, dtype=F64)) if off_policy else None
    ref = logps.detach() + 0.5 * torch.randn(B, T, generator=g, dtype=F64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(F64)
    adv = torch.randn((B, T) if token_adv else (B,), generator=g, dtype=F64)
    return logps, adv, mask, old, ref


# ---------------------------------------------------------------------------------------------- hand cases


def test_hand_computed_clipped_loss_off_policy():
    # two completions of lengths 2 and 1, eps = 0.2
    logps = torch.log(torch.tensor([[0.5, 0.6], [0.3, 0.9]], dtype=F64)).requires_grad_()
    old = torch.log(torch.tensor([[0.25, 0.6], [0.5, 0.9]], dtype=F64))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=F64)
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    out = grpo_loss(logps, adv, mask, old_logps=old, config=LossConfig(loss_type="grpo"))
    # row 0: ratios 2.0 (clipped to 1.2, A>0 -> min picks 1.2) and 1.0 -> per-token -1.2, -1.0 -> mean -1.1
    # row 1: ratio 0.6 (A<0: min(-0.6, -0.8) = -0.8) -> loss 0.8
    assert out.loss.item() == pytest.approx((-1.1 + 0.8) / 2, abs=1e-12)
    out.loss.backward()
    # clipped tokens get no gradient; the unclipped one gets -A * r / (B * |o|) = -1 * 1 / 4
    expected = torch.tensor([[0.0, -0.25], [0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(logps.grad, expected, rtol=0, atol=1e-12)
    assert out.metrics["clip_ratio_high"] == pytest.approx(1 / 3)
    assert out.metrics["clip_ratio_low"] == pytest.approx(1 / 3)
    assert out.metrics["clip_ratio"] == pytest.approx(2 / 3)


def test_hand_computed_normalisers():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=F64)
    cfg, none = LossConfig(), BatchTotals()
    assert AGGREGATIONS["grpo"](per_token, mask, cfg, none).item() == pytest.approx((2.0 + 4.0) / 2)
    assert AGGREGATIONS["bnpo"](per_token, mask, cfg, none).item() == pytest.approx(10.0 / 4)
    assert AGGREGATIONS["dapo"](per_token, mask, cfg, none).item() == pytest.approx(10.0 / 4)
    assert AGGREGATIONS["dapo"](per_token, mask, cfg, BatchTotals(num_items_in_batch=8)).item() == 10.0 / 8
    assert AGGREGATIONS["bnpo"](per_token, mask, cfg, BatchTotals(num_items_in_batch=8)).item() == 10.0 / 4
    assert AGGREGATIONS["dr_grpo"](per_token, mask, cfg, none).item() == pytest.approx(10.0 / (2 * 3))
    cfg_len = LossConfig(loss_type="dr_grpo", max_completion_length=5)
    assert AGGREGATIONS["dr_grpo"](per_token, mask, cfg_len, none).item() == pytest.approx(10.0 / (2 * 5))


def test_every_loss_type_has_a_surrogate_and_an_aggregation():
    assert set(SURROGATES) == set(LOSS_TYPES) == set(AGGREGATIONS)


# ------------------------------------------------------------------------------------ eq. 20/21 gradient


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), beta=st.sampled_from([0.0, 0.01, 0.04, 0.5, 2.0]),
       token_adv=st.booleans())
def test_on_policy_gradient_is_deepseekmath_eq21(seed, beta, token_adv):
    logps, adv, mask, _, ref = random_batch(seed, token_adv=token_adv)
    out = grpo_loss(logps, adv, mask, ref_logps=ref, config=LossConfig(loss_type="grpo", beta=beta))
    out.loss.backward()
    A = adv if token_adv else adv[:, None]
    B = logps.size(0)
    gc = A + beta * (torch.exp(ref - logps.detach()) - 1)  # eq. 21 gradient coefficient
    expected = -(1 / B) * gc * mask / mask.sum(-1, keepdim=True)
    torch.testing.assert_close(logps.grad, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_on_policy_clipping_never_binds(loss_type):
    logps, adv, mask, _, _ = random_batch(3)
    grads = []
    for eps in (0.01, 0.2, 0.9):
        lp = logps.detach().clone().requires_grad_()
        out = grpo_loss(lp, adv, mask, config=LossConfig(loss_type=loss_type, epsilon_low=eps))
        out.loss.backward()
        assert out.metrics["clip_ratio"] == 0.0 and out.metrics["ratio_mean"] == 1.0
        grads.append(lp.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[2], rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.05, 0.5))
def test_off_policy_clipped_surrogate_gradient(seed, eps):
    # PPO clip: a token contributes -A * r * grad logp / (B |o|) unless it sits in the clipped region
    logps, adv, mask, old, _ = random_batch(seed, spread=0.4)
    out = grpo_loss(logps, adv, mask, old_logps=old, config=LossConfig(epsilon_low=eps))
    out.loss.backward()
    r = torch.exp(logps.detach() - old)
    A = adv[:, None]
    clipped = ((r > 1 + eps) & (A > 0)) | ((r < 1 - eps) & (A < 0))
    expected = torch.where(clipped, 0.0, -A * r) * mask / mask.sum(-1, keepdim=True) / logps.size(0)
    torch.testing.assert_close(logps.grad, expected, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------- TRL 1.16 parity

GRID = [
    (lt, lvl, beta, off, delta, kl)
    for lt, lvl, beta, off, delta, kl in itertools.product(
        LOSS_TYPES, ["token", "sequence"], [0.0, 0.04], [False, True], [None, 1.5], ["k3", "k3_is"]
    )
    if not (delta is not None and lt in ("cispo", "sapo")) and not (beta == 0.0 and kl == "k3_is")
]


@pytest.mark.parametrize("loss_type,level,beta,off_policy,delta,kl", GRID)
@pytest.mark.parametrize("seed", [0, 1])
def test_parity_with_trl(loss_type, level, beta, off_policy, delta, kl, seed):
    eps_high = 5.0 if loss_type == "cispo" else 0.28
    logps, adv, mask, old, ref = random_batch(seed + 17, B=5, T=7, off_policy=off_policy)
    kw = dict(loss_type=loss_type, beta=beta, epsilon_high=eps_high, delta=delta,
              importance_sampling_level=level, kl_estimator=kl)
    ours = grpo_loss(logps, adv, mask, old_logps=old, ref_logps=ref, config=LossConfig(**kw),
                     num_items_in_batch=23.0)
    (g_ours,) = torch.autograd.grad(ours.loss, logps)
    theirs, metrics = trl_compute_loss(logps, adv, mask, old_logps=old, ref_logps=ref, num_items_in_batch=23.0,
                                       **kw)
    (g_theirs,) = torch.autograd.grad(theirs, logps)
    assert abs(ours.loss.item() - theirs.item()) <= 1e-9
    torch.testing.assert_close(g_ours, g_theirs, rtol=0, atol=1e-9)
    if beta:
        assert ours.metrics["kl"] == pytest.approx(metrics["kl"], abs=1e-9)
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        assert ours.metrics["clip_ratio_low"] == pytest.approx(metrics["clip_ratio/low_mean"], abs=1e-9)
        assert ours.metrics["clip_ratio_high"] == pytest.approx(metrics["clip_ratio/high_mean"], abs=1e-9)
        assert ours.metrics["clip_ratio"] == pytest.approx(metrics["clip_ratio/region_mean"], abs=1e-9)
    if loss_type == "cispo":
        assert ours.metrics["clip_ratio_high"] == pytest.approx(metrics["cispo_clip_ratio"], abs=1e-9)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_parity_with_trl_token_level_advantages(loss_type):
    logps, adv, mask, old, ref = random_batch(5, token_adv=True)
    kw = dict(loss_type=loss_type, beta=0.1, epsilon_high=3.0 if loss_type == "cispo" else None)
    ours = grpo_loss(logps, adv, mask, old_logps=old, ref_logps=ref, config=LossConfig(**kw))
    theirs, _ = trl_compute_loss(logps, adv, mask, old_logps=old, ref_logps=ref, **kw)
    assert abs(ours.loss.item() - theirs.item()) <= 1e-9


# ----------------------------------------------------------------------------- micro-batch accumulation


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batches_sum_to_the_full_batch(loss_type):
    logps, adv, mask, old, ref = random_batch(9, B=6, T=5)
    cfg = LossConfig(loss_type=loss_type, beta=0.04, epsilon_high=4.0 if loss_type == "cispo" else None)
    full = grpo_loss(logps, adv, mask, old_logps=old, ref_logps=ref, config=cfg)
    (g_full,) = torch.autograd.grad(full.loss, logps)
    tokens = mask.sum()
    parts = [
        grpo_loss(logps[s], adv[s], mask[s], old_logps=old[s], ref_logps=ref[s], config=cfg,
                  totals=BatchTotals(num_sequences=6, num_tokens=tokens, num_items_in_batch=tokens)).loss
        for s in (slice(0, 2), slice(2, 5), slice(5, 6))
    ]
    total = sum(parts)
    (g_parts,) = torch.autograd.grad(total, logps)
    assert total.item() == pytest.approx(full.loss.item(), abs=1e-12)
    torch.testing.assert_close(g_parts, g_full, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------- numerics


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.sampled_from([1.0, 10.0, 30.0]),
       loss_type=st.sampled_from(LOSS_TYPES), level=st.sampled_from(["token", "sequence"]))
def test_loss_is_finite_for_large_log_ratios(seed, scale, loss_type, level):
    logps, adv, mask, old, ref = random_batch(seed, spread=scale)
    cfg = LossConfig(loss_type=loss_type, importance_sampling_level=level, beta=0.0,
                     epsilon_high=5.0 if loss_type == "cispo" else None)
    out = grpo_loss(logps, adv, mask, old_logps=old, config=cfg)
    (g,) = torch.autograd.grad(out.loss, logps)
    assert math.isfinite(out.loss.item()) and torch.isfinite(g).all()


def test_empty_completions_give_a_finite_zero_loss():
    logps = torch.zeros(2, 3, dtype=F64, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=F64)
    for lt in LOSS_TYPES:
        cfg = LossConfig(loss_type=lt, epsilon_high=5.0 if lt == "cispo" else None)
        out = grpo_loss(logps, torch.ones(2, dtype=F64), mask, config=cfg)
        assert out.loss.item() == 0.0


# ------------------------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("field,value", [
    ("loss_type", "ppo"), ("importance_sampling_level", "tokens"), ("kl_estimator", "k4"), ("beta", -0.1),
    ("beta", float("nan")), ("epsilon_low", -0.2), ("epsilon_low", 1.0), ("epsilon_high", -1.0),
    ("delta", 1.1), ("max_completion_length", 0), ("max_completion_length", 2.5),
    ("sapo_temperature_pos", 0.0), ("sapo_temperature_neg", -1.0), ("beta", "0.1"),
])
def test_bad_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        LossConfig(**{field: value})


def test_missing_ref_logps_is_an_error():
    logps, adv, mask, _, _ = random_batch(0)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, adv, mask, config=LossConfig(beta=0.1))
