"""Runs TRL 1.16's own ``GRPOTrainer._compute_loss`` on given per-token log-probs (test-only).

TRL computes the log-probs from a model inside ``_compute_loss``; here a stand-in ``self`` hands it ours, so
the loss, gradient and metrics come from TRL's unmodified code. TRL (a test dependency) is imported when a
parity test calls it, not when this module is imported: the hand-computed tests beside the parity tests run
without it, and a parity test without TRL fails rather than skips.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch


class _Accelerator:
    num_processes = 1
    process_index = 0

    @staticmethod
    def reduce(x, reduction="sum"):
        return x

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def trl_compute_loss(
    logps, advantages, mask, *, old_logps=None, ref_logps=None, loss_type="grpo", beta=0.0,
    epsilon_low=0.2, epsilon_high=None, delta=None, importance_sampling_level="token", kl_estimator="k3",
    max_completion_length=None, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, num_items_in_batch=None,
):
    """Returns (loss, metrics) from TRL's code for one micro-batch, no gradient accumulation, one process."""
    B, T = logps.shape
    args = SimpleNamespace(
        use_bias_correction_kl=(kl_estimator == "k3_is"), delta=delta, steps_per_generation=1,
        sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
    )
    fake = SimpleNamespace(
        args=args, loss_type=loss_type, beta=beta, epsilon_low=epsilon_low,
        epsilon_high=epsilon_low if epsilon_high is None else epsilon_high,
        importance_sampling_level=importance_sampling_level, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, use_vllm=False, vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=T if max_completion_length is None else max_completion_length,
        accelerator=_Accelerator(), _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 0, dtype=torch.long), "prompt_mask": torch.zeros(B, 0, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
        "advantages": advantages, "old_per_token_logps": old_logps, "ref_per_token_logps": ref_logps,
        "num_items_in_batch": torch.as_tensor(mask.sum() if num_items_in_batch is None else num_items_in_batch),
    }
    from trl.trainer.grpo_trainer import GRPOTrainer as TRLGRPOTrainer

    loss = TRLGRPOTrainer._compute_loss(fake, None, inputs)
    metrics = {k: v[-1] for k, v in fake._metrics["train"].items()}
    return loss, metrics
