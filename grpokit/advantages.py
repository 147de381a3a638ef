"""Advantages from rewards: outcome supervision (DeepSeekMath 4.1.2) and process supervision (4.1.3).

Completions arrive grouped: the G completions of one prompt are consecutive, so ``rewards.view(-1, G)`` is
(prompts, G). A reward of NaN means "no reward function could score this sample": it is left out of every
statistic and its advantage is 0, so it neither moves the baseline nor the policy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from grpokit.util import check_choice

SCALES = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL 1.16 adds this to the std; it keeps near-constant groups from exploding


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Sample standard deviation (Bessel's correction) ignoring NaNs; NaN when fewer than 2 values."""
    if dim is None:
        x, dim = x.reshape(-1), 0
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    sq = torch.nansum((x - mean) ** 2, dim=dim, keepdim=True)
    var = torch.where(count > 1, sq / (count - 1).clamp(min=1), torch.full_like(sq, float("nan")))
    std = var.sqrt()
    return std if keepdim else std.squeeze(dim)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """Outcome-supervised GRPO advantages, (N,) -> (N,), N = prompts * group_size.

    ``A_i = (r_i - mean(group)) / (std + 1e-4)`` (DeepSeekMath 4.1.2; TRL's epsilon). ``scale``:
    ``group`` divides by the group's std (the paper), ``batch`` by the std of all rewards in the batch (more
    robust to easy/hard prompts; Lite PPO), ``none`` only centres (Dr. GRPO: no difficulty bias). A group
    whose rewards are all equal gives exactly 0; a NaN reward gives 0.
    """
    check_choice("scale_rewards", scale, SCALES)
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards cannot be split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)  # (P, G)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)  # (P, 1)
    adv = grouped - mean
    if scale == "group":
        adv = adv / (nanstd(grouped, dim=1, keepdim=True) + STD_EPS)
    elif scale == "batch":
        adv = adv / (nanstd(rewards) + STD_EPS)
    # all-equal groups: force an exact 0 (the mean of equal floats can differ from them in the last bit)
    finite = torch.where(torch.isnan(grouped), mean, grouped)
    constant = (finite.amax(dim=1, keepdim=True) == finite.amin(dim=1, keepdim=True))
    adv = torch.where(constant, torch.zeros_like(adv), adv)
    return torch.nan_to_num(adv, nan=0.0).view(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (REINFORCE leave-one-out): ``A_i = r_i - mean_{j != i} r_j``, (N,) -> (N,).

    Each sample's baseline excludes itself, so the baseline is independent of the sample and the gradient
    estimate is unbiased. Equals ``G/(G-1) * (r_i - mean(group))`` (with G the group's valid rewards); NaN
    rewards are left out and get 0, as in ``group_advantages``."""
    grouped = rewards.view(-1, group_size)  # (P, G)
    valid = ~torch.isnan(grouped)
    count = valid.sum(1, keepdim=True)  # (P, 1)
    total = torch.nansum(grouped, dim=1, keepdim=True)
    loo_mean = (total - torch.nan_to_num(grouped)) / (count - 1).clamp(min=1)
    adv = torch.where(valid & (count > 1), grouped - loo_mean, torch.zeros_like(grouped))
    return adv.view(-1)


def dr_grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO: ``A_i = r_i - mean(group)``, centred but not divided by the std (no question-difficulty bias)."""
    return group_advantages(rewards, group_size, "none")


ADVANTAGE_ESTIMATORS = {
    "grpo": group_advantages,  # (rewards, group_size, scale) — DeepSeekMath 4.1.2, scale from scale_rewards
    "dr_grpo": dr_grpo_advantages,  # (rewards, group_size)
    "rloo": rloo_advantages,  # (rewards, group_size)
}
"""Outcome advantage estimators by name; only ``grpo`` takes ``scale_rewards``."""


def outcome_advantages(rewards: torch.Tensor, group_size: int, estimator: str = "grpo",
                       scale: str = "group") -> torch.Tensor:
    """Dispatches to ``ADVANTAGE_ESTIMATORS[estimator]``: (N,) rewards -> (N,) advantages."""
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage_estimator must be one of {', '.join(ADVANTAGE_ESTIMATORS)}; got {estimator!r}")
    if estimator == "grpo":
        return group_advantages(rewards, group_size, scale)
    return ADVANTAGE_ESTIMATORS[estimator](rewards, group_size)


def process_advantages(
    step_rewards: Sequence[Sequence[float]],
    step_ends: Sequence[Sequence[int]],
    group_size: int,
    seq_len: int,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Process-supervised GRPO advantages (DeepSeekMath 4.1.3), -> (B, seq_len).

    ``step_rewards[i][j]`` is the reward of step j of completion i, ``step_ends[i][j]`` the index of the token
    that ends it. All step rewards of a group are normalised together, ``(r - mean) / std`` with the sample std
    (a group with fewer than two step rewards, or a constant one, normalises to 0). The advantage of token t is
    the sum of the normalised rewards of the steps that end at or after t; tokens after the last step get 0.
    """
    if len(step_rewards) != len(step_ends):
        raise ValueError(f"{len(step_rewards)} reward lists but {len(step_ends)} step-end lists")
    if group_size < 1 or len(step_rewards) % group_size:
        raise ValueError(f"{len(step_rewards)} completions cannot be split into groups of {group_size}")
    out = torch.zeros(len(step_rewards), seq_len, dtype=torch.float64)
    for g in range(0, len(step_rewards), group_size):
        members = range(g, g + group_size)
        for i in members:
            if len(step_rewards[i]) != len(step_ends[i]):
                raise ValueError(f"completion {i}: {len(step_rewards[i])} step rewards but "
                                 f"{len(step_ends[i])} step ends")
        flat = torch.tensor([float(r) for i in members for r in step_rewards[i]], dtype=torch.float64)
        mean = flat.mean() if flat.numel() else torch.tensor(0.0, dtype=torch.float64)
        std = flat.std() if flat.numel() > 1 and flat.max() > flat.min() else torch.tensor(0.0, dtype=torch.float64)
        for i in members:
            for r, end in zip(step_rewards[i], step_ends[i]):
                if not 0 <= int(end) < seq_len:
                    raise ValueError(f"completion {i}: step end {end} outside [0, {seq_len})")
                norm = (float(r) - mean) / std if std > 0 else torch.tensor(0.0, dtype=torch.float64)
                out[i, : int(end) + 1] += norm  # every token t <= end sees this step's reward
    return out.to(dtype)
