"""pi_ref over a run: iterative RL's resets and Polyak refreshes (DeepSeekMath 4.1.4), and the exact KL to it.

**Iterative RL.** DeepSeekMath's iterative GRPO resets the reference model to the current policy at every
iteration, so the KL penalty anchors to a recent policy rather than to the initial one. ``ref_reset_steps: K``
does that every K optimizer steps (``pi_ref <- pi_theta``); ``ref_sync_alpha: a`` with ``ref_sync_steps: K``
moves it part of the way instead, ``pi_ref <- a * pi_theta + (1 - a) * pi_ref`` (Polyak averaging; TRL's
``sync_ref_model`` / open-instruct's refresh). Both act at rollout boundaries, so a rollout's recorded pi_ref
log-probs always come from one reference.

**The exact KL, live.** The ``kl`` metric is the estimator's mean over sampled tokens. ``exact_kl_metrics``
logs beside it the exact per-token KL(pi_theta||pi_ref) and KL(pi_ref||pi_theta) over the full vocabulary
(mean over loss tokens), from both models' hidden states and LM heads, chunked (``token_kl_exact``).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from grpokit.logprobs import hidden_states, lm_head_of, token_kl_exact
from grpokit.models.loading import load_model
from grpokit.models.lora import is_peft_model
from grpokit.rollout import position_ids_from_mask
from grpokit.training.batch import Batch


@torch.no_grad()
def sync_reference(ref: torch.nn.Module, policy: torch.nn.Module, alpha: float = 1.0) -> None:
    """``ref <- alpha * policy + (1 - alpha) * ref``, parameter by parameter (alpha = 1: a hard reset).

    Buffers are copied. Needs the same architecture: every parameter name and shape must match."""
    ref_params = dict(ref.named_parameters())
    policy_params = dict(policy.named_parameters())
    if ref_params.keys() != policy_params.keys() or any(
        ref_params[k].shape != policy_params[k].shape for k in ref_params
    ):
        raise ValueError("ref_reset_steps / ref_sync_alpha need a reference model with the policy's architecture "
                         "(the same parameter names and shapes); leave ref_model unset to use a copy of the policy")
    for name, p in ref_params.items():
        src = policy_params[name].detach().to(p.dtype)
        if alpha == 1.0:
            p.copy_(src)
        else:
            p.lerp_(src, alpha)  # p + alpha * (src - p)
    ref_buffers = dict(ref.named_buffers())
    for name, b in policy.named_buffers():
        if name in ref_buffers and ref_buffers[name].shape == b.shape:
            ref_buffers[name].copy_(b)


def sync_alpha(step: int, *, reset_steps: int, sync_steps: int, alpha: float | None) -> float | None:
    """The alpha to apply after optimizer step ``step`` (1.0 for a reset), or None when nothing is due."""
    if reset_steps and step % reset_steps == 0:
        return 1.0
    if alpha is not None and sync_steps and step % sync_steps == 0:
        return alpha
    return None


@torch.no_grad()
def exact_kl_metrics(policy: torch.nn.Module, ref: torch.nn.Module, batch: Batch, *, temperature: float,
                     micro_batch: int, chunk_size: int | None = None) -> dict[str, float]:
    """``kl_exact_reverse`` = mean KL(pi_theta||pi_ref) and ``kl_exact_forward`` = mean KL(pi_ref||pi_theta)
    per completion token of the loss, over the full vocabulary, for the models as they are now."""
    total_reverse = total_forward = 0.0
    tokens = 0.0
    for micro in batch.split(micro_batch):
        P = micro.prompt_ids.size(1)
        ids = torch.cat([micro.prompt_ids, micro.completion_ids], dim=1)  # (n, P + C)
        mask = torch.cat([micro.prompt_mask, micro.completion_mask], dim=1)
        positions = position_ids_from_mask(mask)
        h_p = hidden_states(policy, ids, mask, position_ids=positions)[:, P - 1:-1]  # (n, C, H)
        h_q = hidden_states(ref, ids, mask, position_ids=positions)[:, P - 1:-1]
        w_p, b_p = lm_head_of(policy)
        w_q, b_q = lm_head_of(ref)
        reverse, forward = token_kl_exact(h_p, w_p, h_q, w_q, temperature=temperature, bias_p=b_p, bias_q=b_q,
                                          chunk_size=chunk_size)  # (n, C) each
        m = micro.loss_mask.to(reverse.dtype)
        total_reverse += float((reverse * m).sum())
        total_forward += float((forward * m).sum())
        tokens += float(m.sum())
    tokens = max(tokens, 1.0)
    return {"kl_exact_reverse": total_reverse / tokens, "kl_exact_forward": total_forward / tokens}


def make_reference(model: torch.nn.Module, ref_model, beta: float, dtype: torch.dtype,
                   keep: bool = False) -> torch.nn.Module | None:
    """pi_ref: the given model, or a deep copy of the initial policy when beta > 0 (or ``keep``: wanted with
    beta = 0, for ``log_exact_kl``); frozen, in eval mode."""
    if ref_model is None and beta == 0 and not keep:
        return None
    if ref_model is None and is_peft_model(model):  # LoRA: pi_ref is the base model, adapters disabled
        return None
    if ref_model is None:
        ref = copy.deepcopy(model)
    elif isinstance(ref_model, (str, Path)):
        ref = load_model(str(ref_model), dtype).to(next(model.parameters()).device)
    else:
        ref = ref_model.to(dtype)
    if beta == 0 and not keep:
        warnings.warn("ref_model is given but beta = 0: the reference model is not used", stacklevel=3)
    ref.eval()
    ref.requires_grad_(False)
    return ref


