"""Per-token KL penalties between the policy pi_theta and the frozen reference pi_ref.

Each estimator is a function of the sampled token's log-probabilities only (no full-vocabulary sums), so its
*value* estimates a KL divergence and its *gradient*, once averaged over tokens sampled from some policy,
estimates the gradient of some (possibly other) divergence. Which one is what matters for training; the
table below is exact for a single token position and is proved by enumeration in ``tests/test_kl.py`` and
re-checked by ``grpokit verify``.

Notation: ``log r = log pi_ref(o) - log pi_theta(o)`` for the sampled token ``o``; ``sg`` is stop-gradient.

===========  ====================================  ==========================  ===========================
estimator    per-token value                       E_{o~pi_theta}[grad]        E_{o~pi_old}[grad], old != theta
===========  ====================================  ==========================  ===========================
``k1``       ``-log r``                            0 (pure noise)              biased (neither KL)
``k2``       ``0.5 * (log r)**2``                  grad KL(pi_theta||pi_ref)   biased
``k3``       ``exp(log r) - log r - 1`` (eq. 4)    grad KL(pi_ref||pi_theta)   biased
``k3_is``    ``(pi_theta/pi_old) * k3``            grad KL(pi_theta||pi_ref)   grad KL(pi_theta||pi_ref)
===========  ====================================  ==========================  ===========================

So the paper's choice, k3 in the loss (DeepSeekMath eq. 4), differentiates the *forward* KL
KL(pi_ref||pi_theta) although eq. 3 names the reverse one; that forward-KL gradient is exactly the
``beta * (pi_ref/pi_theta - 1)`` term of eq. 21. ``k2`` (on-policy) and ``k3_is`` (any sampler, the ratio
kept differentiable; DeepSeek-V3.2, TRL's ``use_bias_correction_kl``) give the reverse KL's gradient.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3", "k3_is")


def kl_penalty(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    estimator: str = "k3",
    old_logps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token KL penalty, shape (B, T) like ``logps``.

    Args:
        logps: log pi_theta of the sampled tokens, (B, T), differentiable.
        ref_logps: log pi_ref of the same tokens, (B, T), constant.
        estimator: one of ``KL_ESTIMATORS`` (see the module docstring for each one's gradient).
        old_logps: log pi_old (the sampler), (B, T); used by ``k3_is`` only. ``None`` means the tokens were
            sampled from pi_theta itself, i.e. pi_old = sg(pi_theta): the ratio is 1 in value but keeps its
            gradient.
    """
    log_r = ref_logps - logps  # log(pi_ref / pi_theta), (B, T)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    k3 = torch.exp(log_r) - log_r - 1  # DeepSeekMath eq. 4
    if estimator == "k3":
        return k3
    if estimator == "k3_is":
        old = logps.detach() if old_logps is None else old_logps
        return torch.exp(logps - old) * k3  # ratio NOT detached: that is what debiases the gradient
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def exact_kl(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """KL(a||b) = sum_v a(v) (log a(v) - log b(v)) over the last (vocabulary) axis: (..., V) -> (...)."""
    return (logp_a.exp() * (logp_a - logp_b)).sum(-1)


def kl_reward_to_go(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """KL in the reward (``kl_in_reward``): per-token advantage term ``-beta * sum_{s>=t} sg(k1_s)``, (B, T).

    Each token is charged ``k1 = log pi_theta/pi_ref`` of itself *and of every later token* of its completion
    (the reward-to-go), treated as a constant reward. Then ``E[sum_t A_t grad log pi_theta(o_t)]`` is exactly
    ``-beta * grad KL(pi_theta||pi_ref)`` of the whole *sequence* distribution (REINFORCE with the KL as a
    reward; Tang & Munos 2025), which per-token KL losses only approximate: they drop the terms that link a
    token to the KL of what it leads to. Valid for samples from pi_theta (on-policy)."""
    k1 = (logps - ref_logps).detach() * mask  # (B, T)
    rtg = k1.flip(-1).cumsum(-1).flip(-1)  # sum over s >= t
    return -beta * rtg * mask
