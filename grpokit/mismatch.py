"""Rollout/training mismatch: truncated importance sampling (TIS) of the sampler's tokens.

When completions come from another engine or precision (vLLM, a bf16 sampler, a fused decode path), the
distribution that drew token ``o_t``, ``pi_sampler``, differs slightly from the trainer's ``pi_old`` even
at the same weights. The policy-gradient estimate then needs the weight ``pi_old(o_t) / pi_sampler(o_t)``;
unbounded, that weight has a heavy tail, so it is capped (Yao et al. 2025, "Your efficient RL framework
secretly brings you off-policy RL training"; TRL's ``vllm_importance_sampling_correction``, OpenRLHF's and
open-instruct's TIS):

    token:     w_t = min(exp(log pi_old(o_t) - log pi_sampler(o_t)), cap)                (B, T)
    sequence:  w   = min(exp(sum_t (log pi_old(o_t) - log pi_sampler(o_t))), cap)        (B, 1)

The weight is a constant (detached) factor on each token's surrogate loss, applied before the KL term is
added (``grpo_loss(..., token_weights=w)``), as TRL's ``token_truncate`` / ``sequence_truncate`` modes do.
``log pi_sampler`` is ``Rollout.sampling_logps`` (the tempered distribution the sampler drew from, before
top-k/top-p filtering), so TIS corrects numerical mismatch, not filtering.

``mismatch_metrics`` measures the gap every rollout, whatever the engine: the largest and mean absolute
difference of the two log-probs over the loss tokens, and a k3 estimate of KL(pi_sampler || pi_trainer) from
the sampled tokens (with r = pi_trainer / pi_sampler, ``(r - 1) - log r``: unbiased, never negative).
"""

from __future__ import annotations

import torch

from grpokit.util import check_choice

TIS_LEVELS = ("token", "sequence")


def tis_weights(old_logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor, *, level: str = "token",
                cap: float = 2.0) -> torch.Tensor:
    """Truncated importance weights ``min(pi_old / pi_sampler, cap)``: (B, T) for ``token``, (B, 1) for
    ``sequence`` (exp of the summed log-ratio over the completion's tokens, as TRL). Padding (mask 0) counts
    as log-ratio 0, so it weighs 1 and adds nothing to a sequence's ratio; so does a NaN sampler log-prob."""
    check_choice("tis", level, TIS_LEVELS)
    if old_logps.shape != sampling_logps.shape or old_logps.shape != mask.shape:
        raise ValueError(f"old_logps {tuple(old_logps.shape)}, sampling_logps {tuple(sampling_logps.shape)} and "
                         f"mask {tuple(mask.shape)} must have the same (B, T) shape")
    log_ratio = torch.nan_to_num((old_logps - sampling_logps.to(old_logps.dtype)) * mask, nan=0.0)  # (B, T)
    if level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True)  # (B, 1)
    return torch.exp(log_ratio).clamp(max=cap).detach()


def mean_weight(weights: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean TIS weight over the loss tokens (``token``) or over the completions with any (``sequence``)."""
    if weights.size(-1) == 1 and mask.size(-1) != 1:
        rows = mask.sum(-1) > 0
        return float(weights.squeeze(-1)[rows].mean()) if rows.any() else 1.0
    return float((weights * mask).sum() / mask.sum().clamp(min=1))


def mismatch_totals(trainer_logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Sums behind ``mismatch_metrics`` over the tokens where ``mask`` (B, T) is 1, from the trainer's and the
    sampler's log-probs (B, T) of the same sampled tokens: ``abs_max``, ``abs_sum``, ``k3_sum``, ``count``.
    Totals of several parts (micro-batches, processes) add up (``abs_max``: the largest)."""
    where = mask.bool()
    log_ratio = (trainer_logps.detach().double() - sampling_logps.detach().double())[where]  # (M,) log t / s
    gap = log_ratio.abs()
    k3 = torch.expm1(log_ratio) - log_ratio  # (r - 1) - log r with r = pi_trainer / pi_sampler, no cancellation
    return {"abs_max": float(gap.max()) if gap.numel() else 0.0, "abs_sum": float(gap.sum()),
            "k3_sum": float(k3.sum()), "count": float(gap.numel())}


def add_totals(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Two ``mismatch_totals`` as one."""
    return {"abs_max": max(a["abs_max"], b["abs_max"]), "abs_sum": a["abs_sum"] + b["abs_sum"],
            "k3_sum": a["k3_sum"] + b["k3_sum"], "count": a["count"] + b["count"]}


def mismatch_metrics(totals: dict[str, float]) -> dict[str, float]:
    """``mismatch/logp_abs_max``, ``mismatch/logp_abs_mean`` and ``mismatch/kl`` (the k3 estimate of
    KL(pi_sampler || pi_trainer)) from ``mismatch_totals``."""
    count = max(totals["count"], 1.0)
    return {"mismatch/logp_abs_max": totals["abs_max"], "mismatch/logp_abs_mean": totals["abs_sum"] / count,
            "mismatch/kl": totals["k3_sum"] / count}
