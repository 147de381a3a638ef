import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpokit.cli.verify import expected_kl_gradient, kl_gradient
from grpokit.kl import exact_kl, kl_penalty

F64 = torch.float64


def test_values_hand_computed():
    logp = torch.log(torch.tensor([0.5], dtype=F64))
    ref = torch.log(torch.tensor([0.25], dtype=F64))  # pi_ref / pi_theta = 0.5
    log2 = torch.log(torch.tensor(2.0, dtype=F64)).item()
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(log2)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * log2**2)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 + log2 - 1)  # eq. 4: r - log r - 1
    old = torch.log(torch.tensor([0.25], dtype=F64))  # pi_theta / pi_old = 2
    assert kl_penalty(logp, ref, "k3_is", old_logps=old).item() == pytest.approx(2 * (0.5 + log2 - 1))
    assert kl_penalty(logp, ref, "k3_is").item() == pytest.approx(0.5 + log2 - 1)


def test_each_estimator_is_unbiased_for_the_reverse_kl_value_on_policy_where_claimed():
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(11, generator=g, dtype=F64), -1)
    ref = torch.log_softmax(torch.randn(11, generator=g, dtype=F64), -1)
    reverse = exact_kl(logp, ref).item()
    for est in ("k1", "k3"):  # E_{pi_theta}[k1] = E_{pi_theta}[k3] = KL(pi_theta||pi_ref)
        assert (logp.exp() * kl_penalty(logp, ref, est)).sum().item() == pytest.approx(reverse, abs=1e-12)


# The table of kl.py: which divergence's gradient each estimator gives in expectation, by exact enumeration.
TABLE = [
    ("k1", False, "zero"),
    ("k2", False, "reverse"),
    ("k3", False, "forward"),
    ("k3_is", False, "reverse"),
    ("k3_is", True, "reverse"),
]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 100_000), V=st.integers(2, 9))
def test_expected_gradients_by_exact_enumeration(seed, V):
    g = torch.Generator().manual_seed(seed)
    theta, ref = torch.randn(V, generator=g, dtype=F64), torch.randn(V, generator=g, dtype=F64)
    old = theta + torch.randn(V, generator=g, dtype=F64)
    for estimator, off_policy, target in TABLE:
        got = expected_kl_gradient(estimator, theta, ref, old if off_policy else None)
        want = torch.zeros(V, dtype=F64) if target == "zero" else kl_gradient(theta, ref, target)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=f"{estimator} off={off_policy}")


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_plain_estimators_are_biased_off_policy(estimator):
    g = torch.Generator().manual_seed(1)
    theta, ref = torch.randn(6, generator=g, dtype=F64), torch.randn(6, generator=g, dtype=F64)
    old = theta + torch.randn(6, generator=g, dtype=F64)
    got = expected_kl_gradient(estimator, theta, ref, old)
    for direction in ("reverse", "forward"):
        assert (got - kl_gradient(theta, ref, direction)).abs().max() > 1e-3


def test_k3_is_not_the_reverse_kl_gradient():
    # the paper's estimator differentiates the forward KL: a check that would catch swapping the two
    g = torch.Generator().manual_seed(2)
    theta, ref = torch.randn(5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    got = expected_kl_gradient("k3", theta, ref)
    assert (got - kl_gradient(theta, ref, "reverse")).abs().max() > 1e-3


def test_unknown_estimator():
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")


def test_kl_reward_to_go_hand_computed():
    from grpokit.kl import kl_reward_to_go

    logps = torch.tensor([[-1.0, -2.0, -0.5]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0, -0.5]], dtype=F64)  # k1 = 0.5, -1.0, 0.0 (last token masked)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=F64)
    got = kl_reward_to_go(logps, ref, mask, beta=0.1)
    torch.testing.assert_close(got, torch.tensor([[0.05, 0.1, 0.0]], dtype=F64), rtol=0, atol=1e-15)


def test_kl_in_reward_is_the_sequence_kl_gradient_and_per_token_k2_is_not():
    from grpokit.cli.verify import sequence_kl_gradient

    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        assert sequence_kl_gradient("kl_in_reward")(g) < 1e-12
        assert sequence_kl_gradient("k2_loss")(g) == 0.0  # 0 = clearly differs from the sequence KL gradient
