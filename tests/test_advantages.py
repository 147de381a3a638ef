import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpokit.advantages import group_advantages, nanstd, process_advantages

F64 = torch.float64


def test_group_hand_computed():
    # group 1: rewards 1, 0 -> mean 0.5, sample std sqrt(0.5)
    adv = group_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0], dtype=F64), 2)
    s = math.sqrt(0.5)
    assert adv.tolist() == pytest.approx([0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.0, 0.0], abs=1e-12)


def test_scales():
    r = torch.tensor([1.0, 0.0, 3.0, 1.0], dtype=F64)
    none = group_advantages(r, 2, "none")
    assert none.tolist() == [0.5, -0.5, 1.0, -1.0]
    batch = group_advantages(r, 2, "batch")
    torch.testing.assert_close(batch, none / (r.std() + 1e-4), rtol=0, atol=1e-12)


def test_zero_variance_groups_are_exactly_zero():
    r = torch.tensor([0.1] * 3 + [0.7] * 3, dtype=torch.float32)
    for scale in ("group", "batch", "none"):
        assert group_advantages(r, 3, scale).tolist() == [0.0] * 6


def test_nan_rewards_are_ignored_and_get_zero():
    r = torch.tensor([1.0, float("nan"), 0.0, 0.5], dtype=F64)
    adv = group_advantages(r, 4)
    valid = torch.tensor([1.0, 0.0, 0.5], dtype=F64)
    assert adv[1].item() == 0.0
    assert adv[0].item() == pytest.approx((1.0 - 0.5) / (valid.std().item() + 1e-4))
    all_nan = group_advantages(torch.full((4,), float("nan")), 2)
    assert all_nan.tolist() == [0.0] * 4
    single = group_advantages(torch.tensor([1.0, float("nan")]), 2)  # one valid reward: no statistics
    assert single.tolist() == [0.0, 0.0]


@settings(max_examples=50, deadline=None)
@given(rewards=st.lists(st.floats(-5, 5), min_size=12, max_size=12), G=st.sampled_from([2, 3, 4, 6]))
def test_group_properties(rewards, G):
    r = torch.tensor(rewards, dtype=F64)
    adv = group_advantages(r, G).view(-1, G)
    assert torch.isfinite(adv).all()
    assert adv.sum(1).abs().max() < 1e-9  # centred within each group
    grouped = r.view(-1, G)
    # the ordering of advantages within a group follows the rewards
    for row_r, row_a in zip(grouped, adv):
        for i in range(G):
            for j in range(G):
                if row_r[i] > row_r[j] + 1e-9 and row_r.std() > 1e-3:
                    assert row_a[i] > row_a[j]


def test_nanstd_matches_torch_std():
    x = torch.randn(4, 5, dtype=F64)
    torch.testing.assert_close(nanstd(x, dim=1), x.std(dim=1), rtol=0, atol=1e-12)


def test_bad_group_shapes():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, "global")


def test_process_hand_computed():
    # one group of two completions; steps: c0 = [(1, ends at 1), (0, ends at 3)], c1 = [(1, ends at 2)]
    adv = process_advantages([[1.0, 0.0], [1.0]], [[1, 3], [2]], group_size=2, seq_len=5, dtype=F64)
    pool = torch.tensor([1.0, 0.0, 1.0], dtype=F64)
    hi = (1 - pool.mean()) / pool.std()
    lo = (0 - pool.mean()) / pool.std()
    expected = torch.tensor([[hi + lo, hi + lo, lo, lo, 0.0], [hi, hi, hi, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)


def test_process_groups_are_normalised_separately():
    adv = process_advantages([[1.0], [0.0], [5.0], [3.0]], [[0], [0], [0], [0]], group_size=2, seq_len=1,
                             dtype=F64)
    s = math.sqrt(0.5)
    assert adv[:, 0].tolist() == pytest.approx([0.5 / s, -0.5 / s, 1 / math.sqrt(2), -1 / math.sqrt(2)])


def test_process_constant_group_is_zero_and_bad_input_is_named():
    adv = process_advantages([[1.0], [1.0]], [[0], [1]], 2, 3)
    assert adv.abs().sum().item() == 0.0
    with pytest.raises(ValueError, match="completion 0"):
        process_advantages([[1.0]], [[7]], 1, 3)
    with pytest.raises(ValueError, match="step ends"):
        process_advantages([[1.0, 2.0]], [[1]], 1, 3)


def test_rloo_hand_computed_and_identity():
    from grpokit.advantages import outcome_advantages, rloo_advantages

    r = torch.tensor([1.0, 0.0, 0.0, 3.0, 1.0, 2.0], dtype=F64)
    adv = rloo_advantages(r, 3)
    assert adv.tolist() == pytest.approx([1.0, -0.5, -0.5, 1.5, -1.5, 0.0])
    # RLOO = G/(G-1) * mean-centred reward
    torch.testing.assert_close(adv, 1.5 * group_advantages(r, 3, "none"), rtol=0, atol=1e-12)
    with_nan = rloo_advantages(torch.tensor([1.0, float("nan"), 0.0], dtype=F64), 3)
    assert with_nan.tolist() == [1.0, 0.0, -1.0]
    assert outcome_advantages(r, 3, "dr_grpo").tolist() == group_advantages(r, 3, "none").tolist()
    with pytest.raises(ValueError, match="advantage_estimator"):
        outcome_advantages(r, 3, "ppo")
