"""The GRPO objective (DeepSeekMath eq. 3) and its published variants, as pure tensor functions.

``grpo_loss`` is the *negated* objective, so minimising it ascends eq. 3. It is built from three
interchangeable pieces, each a small function chosen by name from a table:

1. the importance weight ``r = pi_theta / pi_old`` per token or per sequence (``importance_weights``);
2. the per-token surrogate, one entry of ``SURROGATES`` per ``loss_type``;
3. the aggregation over tokens and sequences, one entry of ``AGGREGATIONS`` per ``loss_type``.

With ``old_logps=None`` (one optimizer step per rollout) ``pi_old = sg(pi_theta)``: the ratio is
``exp(logp - sg(logp)) = 1`` in value, clipping cannot bind, and the gradient of ``-r*A`` is ``-A * grad logp``
— DeepSeekMath eq. 20/21; with ``beta>0`` and k3 the per-token coefficient becomes
``A + beta * (pi_ref/pi_theta - 1)``. ``docs/theory.md`` derives it; ``grpokit verify`` checks it.

Every per-token loss and every normaliser matches TRL 1.16's ``GRPOTrainer._compute_loss`` for the same
inputs (``tests/test_losses.py`` runs TRL's own code side by side).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch

from grpokit.kl import KL_ESTIMATORS, kl_penalty
from grpokit.util import check_choice, check_real

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


@dataclass
class LossConfig:
    """How the per-token objective is formed and normalised. ``GRPOConfig`` inherits these fields: each is
    declared, documented and checked here only."""

    loss_type: str = "grpo"
    """Surrogate and normaliser. ``grpo``: PPO clip, mean over each completion's tokens then over completions
    (DeepSeekMath eq. 3); ``bnpo``: sum over tokens / tokens in the batch; ``dr_grpo``: sum / (B *
    max_completion_length) (Dr. GRPO, no length bias); ``dapo``: sum / tokens of the whole global batch;
    ``cispo``: clipped, detached IS weight times ``A * logp``, normalised as dapo; ``sapo``: soft sigmoid gate,
    normalised as grpo. TRL defaults to ``dapo``; grpokit defaults to the paper's ``grpo``."""
    beta: float = 0.0
    """KL coefficient (paper: 0.04; TRL: 0). 0 builds no reference model at all."""
    epsilon_low: float = 0.2
    """Lower clip range: the ratio is clipped below at ``1 - epsilon_low``."""
    epsilon_high: float | None = None
    """Upper clip range (``1 + epsilon_high``); ``None`` means ``epsilon_low``. For ``cispo`` it is the cap on
    the ratio itself (MiniMax-M1 uses values like 5.0)."""
    delta: float | None = None
    """Two-sided clipping: also cap the unclipped ratio at ``delta`` (> 1 + epsilon_high). ``None``: off."""
    importance_sampling_level: str = "token"
    """``token``: one ratio per token (GRPO); ``sequence``: exp of the mean log-ratio of the sequence (GSPO)."""
    kl_estimator: str = "k3"
    """Per-token KL penalty: ``k3`` (paper eq. 4), ``k1``, ``k2`` or ``k3_is`` (see ``grpokit.kl``)."""
    max_completion_length: int | None = None
    """Constant denominator of ``dr_grpo``; ``None`` uses the padded completion length T of the batch."""
    sapo_temperature_pos: float = 1.0
    """SAPO gate temperature for positive advantages."""
    sapo_temperature_neg: float = 1.05
    """SAPO gate temperature for zero or negative advantages."""

    def __post_init__(self) -> None:
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_choice("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_real("beta", self.beta, low=0.0)
        check_real("epsilon_low", self.epsilon_low, low=0.0)
        if self.epsilon_low >= 1.0 and self.loss_type != "cispo":
            raise ValueError(f"epsilon_low must be < 1 (the lower clip bound 1 - epsilon_low must stay positive), "
                             f"got {self.epsilon_low}")
        if self.epsilon_high is not None:
            check_real("epsilon_high", self.epsilon_high, low=0.0)
        if self.delta is not None:
            check_real("delta", self.delta, low=0.0)
            if self.delta <= 1.0 + self.eps_high:
                raise ValueError(f"delta must be > 1 + epsilon_high = {1 + self.eps_high}, got {self.delta}")
        if self.max_completion_length is not None and (
            isinstance(self.max_completion_length, bool) or not isinstance(self.max_completion_length, int)
            or self.max_completion_length < 1
        ):
            raise ValueError(f"max_completion_length must be a positive integer, got {self.max_completion_length!r}")
        check_real("sapo_temperature_pos", self.sapo_temperature_pos, low=0.0, strict=True)
        check_real("sapo_temperature_neg", self.sapo_temperature_neg, low=0.0, strict=True)
        if self.loss_type == "cispo" and self.eps_high < 1.0:
            warnings.warn(f"cispo caps the ratio itself at epsilon_high={self.eps_high} (< 1); values such as 5.0 "
                          "are usual", stacklevel=3)

    @property
    def eps_high(self) -> float:
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high


@dataclass
class LossOutput:
    loss: torch.Tensor
    """Scalar to minimise."""
    metrics: dict[str, float] = field(default_factory=dict)
    """``clip_ratio_low``, ``clip_ratio_high``, ``clip_ratio`` (region), ``ratio_mean``, ``kl`` (when beta > 0):
    token-weighted means over the unmasked tokens (per sequence for sequence-level ratios)."""
    per_token_loss: torch.Tensor | None = None
    """(B, T) or (B, 1) before masking and aggregation, for inspection."""


# ----------------------------------------------------------------------------------------------------------
# 1. importance weight


def importance_weights(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """r = pi_theta / pi_old: (B, T) at ``token`` level, (B, 1) at ``sequence`` level (GSPO: exp of the
    length-normalised sequence log-ratio). DeepSeekMath eq. 3's ratio."""
    log_ratio = logps - old_logps  # (B, T)
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # (B, 1)
    return torch.exp(log_ratio)


# ----------------------------------------------------------------------------------------------------------
# 2. per-token surrogates: (ratio, advantages, logps, config) -> (loss, low_clipped, high_clipped)
#    ratio (B, T) or (B, 1); advantages (B, 1) or (B, T); the loss is the NEGATED surrogate.

Surrogate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, LossConfig], tuple]


def clipped_surrogate(ratio, advantages, logps, cfg: LossConfig):
    """PPO clip (DeepSeekMath eq. 3): ``-min(r*A, clip(r, 1-eps_low, 1+eps_high)*A)``; with ``delta`` the
    unclipped branch is also capped at delta (two-sided clipping)."""
    clipped = torch.clamp(ratio, 1 - cfg.epsilon_low, 1 + cfg.eps_high)
    if cfg.delta is not None:
        ratio = torch.clamp(ratio, max=cfg.delta)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    low = (ratio < 1 - cfg.epsilon_low) & (advantages < 0)  # the clip is active (gradient 0) on these
    high = (ratio > 1 + cfg.eps_high) & (advantages > 0)
    return loss, low, high


def cispo_surrogate(ratio, advantages, logps, cfg: LossConfig):
    """CISPO (MiniMax-M1): REINFORCE weighted by the detached, capped IS ratio: ``-sg(min(r, eps_high))*A*logp``."""
    weight = torch.clamp(ratio, max=cfg.eps_high).detach()
    loss = -weight * advantages * logps
    high = (ratio > cfg.eps_high) & (advantages > 0)
    return loss, torch.zeros_like(high), high


def sapo_surrogate(ratio, advantages, logps, cfg: LossConfig):
    """SAPO: soft gate ``-sigmoid(tau*(r-1)) * 4/tau * A`` (value A and gradient A*grad logp at r = 1)."""
    tau = torch.where(advantages > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
    loss = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * advantages
    none = torch.zeros(loss.shape, dtype=torch.bool, device=loss.device)
    return loss, none, none


SURROGATES: dict[str, Surrogate] = {
    "grpo": clipped_surrogate,
    "bnpo": clipped_surrogate,
    "dr_grpo": clipped_surrogate,
    "dapo": clipped_surrogate,
    "cispo": cispo_surrogate,
    "sapo": sapo_surrogate,
}


# ----------------------------------------------------------------------------------------------------------
# 3. aggregations: (per_token_loss (B, T), mask (B, T), cfg, totals) -> scalar
#    ``totals`` carries the denominators of the whole batch when this call sees one micro-batch of it.


@dataclass(frozen=True)
class BatchTotals:
    """Denominators of the batch a micro-batch belongs to; ``None`` fields fall back to the micro-batch's own.

    Summing the losses of micro-batches built with the full batch's totals gives exactly the full-batch loss,
    so gradient accumulation does not change the update."""

    num_sequences: int | None = None
    """Completions in the optimizer step's batch (grpo, sapo, dr_grpo divide by it)."""
    num_tokens: float | torch.Tensor | None = None
    """Unmasked tokens in the optimizer step's batch (bnpo divides by it)."""
    num_items_in_batch: float | torch.Tensor | None = None
    """Unmasked tokens in the whole global batch, all processes (dapo, cispo divide by it, as TRL)."""


def sequence_mean(loss, mask, cfg, totals: BatchTotals):
    """DeepSeekMath eq. 3: (1/G) sum_i (1/|o_i|) sum_t."""
    per_seq = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # (B,)
    return per_seq.sum() / (per_seq.numel() if totals.num_sequences is None else totals.num_sequences)


def _token_total(mask, *candidates):
    for c in candidates:
        if c is not None:
            return torch.as_tensor(c, dtype=mask.dtype, device=mask.device)
    return mask.sum()


def batch_token_mean(loss, mask, cfg, totals: BatchTotals):
    """BNPO: sum over the batch's tokens / number of tokens in the batch."""
    return (loss * mask).sum() / _token_total(mask, totals.num_tokens).clamp(min=1.0)


def global_token_mean(loss, mask, cfg, totals: BatchTotals):
    """DAPO / CISPO: sum over tokens / tokens of the whole global batch (``num_items_in_batch``)."""
    return (loss * mask).sum() / _token_total(mask, totals.num_items_in_batch, totals.num_tokens).clamp(min=1.0)


def constant_normaliser(loss, mask, cfg, totals: BatchTotals):
    """Dr. GRPO: sum over tokens / (B * max_completion_length), a constant: no length bias."""
    length = mask.size(1) if cfg.max_completion_length is None else cfg.max_completion_length
    batch = loss.size(0) if totals.num_sequences is None else totals.num_sequences
    return (loss * mask).sum() / (batch * length)


AGGREGATIONS = {
    "grpo": sequence_mean,
    "sapo": sequence_mean,
    "bnpo": batch_token_mean,
    "dapo": global_token_mean,
    "cispo": global_token_mean,
    "dr_grpo": constant_normaliser,
}


# ----------------------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of x over unmasked tokens; a (B, 1) per-sequence x is averaged over sequences."""
    if x.dim() == 2 and x.size(1) == 1 and mask.size(1) != 1:
        return x.float().mean().item()
    return ((x * mask).sum() / mask.sum().clamp(min=1.0)).item()


def grpo_loss(
    logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    config: LossConfig,
    num_items_in_batch: float | torch.Tensor | None = None,
    totals: BatchTotals | None = None,
    token_weights: torch.Tensor | None = None,
) -> LossOutput:
    """Negated GRPO objective (DeepSeekMath eq. 3) for one batch of completions.

    Args:
        logps: log pi_theta(o_t | q, o_<t), (B, T), differentiable.
        advantages: (B,) outcome advantages or (B, T) per-token (process supervision) advantages.
        mask: (B, T), 1 on completion tokens (through EOS), 0 on padding.
        old_logps: log pi_old, (B, T), recorded at rollout time. ``None``: one update per rollout, so
            pi_old = sg(pi_theta) (ratio 1 in value, clipping inactive, eq. 20/21).
        ref_logps: log pi_ref, (B, T); required when ``config.beta > 0``.
        config: the ``LossConfig``.
        num_items_in_batch: token count of the whole global batch, the denominator of dapo/cispo (TRL's
            argument); ``None`` uses this batch's own token count.
        totals: the optimizer-step batch's sequence and token counts when this call sees one micro-batch of
            it (``BatchTotals``); summing the micro-batch losses then reproduces the full-batch loss.
        token_weights: (B, T) or (B, 1) constant weights multiplying the per-token surrogate before the KL term
            is added (truncated importance sampling for a sampler/trainer mismatch, as TRL's
            ``vllm_importance_sampling_correction``); ``None``: all 1.
    """
    if logps.shape != mask.shape:
        raise ValueError(f"logps {tuple(logps.shape)} and mask {tuple(mask.shape)} must have the same shape")
    mask = mask.to(logps.dtype)
    advantages = advantages.to(logps.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # (B, 1)
    old = logps.detach() if old_logps is None else old_logps
    ratio = importance_weights(logps, old, mask, config.importance_sampling_level)  # (B, T) or (B, 1)

    per_token_loss, low, high = SURROGATES[config.loss_type](ratio, advantages, logps, config)
    if token_weights is not None:
        per_token_loss = per_token_loss * token_weights.detach().to(logps.dtype)

    metrics = {}
    if config.beta != 0.0:
        if ref_logps is None:
            raise ValueError("ref_logps is required when beta > 0")
        if config.kl_estimator == "k3_is":
            # k3 weighted by the (differentiable) importance weight, at the configured level as TRL does
            kl = kl_penalty(logps, ref_logps, "k3") * ratio
        else:
            kl = kl_penalty(logps, ref_logps, config.kl_estimator)
        per_token_loss = per_token_loss + config.beta * kl
        metrics["kl"] = masked_mean(kl.detach(), mask)

    totals = totals or BatchTotals()
    if num_items_in_batch is not None:
        totals = replace(totals, num_items_in_batch=num_items_in_batch)
    loss = AGGREGATIONS[config.loss_type](per_token_loss, mask, config, totals)
    metrics.update(
        clip_ratio_low=masked_mean(low.to(logps.dtype), mask),
        clip_ratio_high=masked_mean(high.to(logps.dtype), mask),
        clip_ratio=masked_mean((low | high).to(logps.dtype), mask),
        ratio_mean=masked_mean(ratio.detach(), mask),
    )
    return LossOutput(loss=loss, metrics=metrics, per_token_loss=per_token_loss)


def loss_config_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(LossConfig))
