"""``Batch``: one rollout made ready for the loss.

A ``Batch`` is what the mu passes of updates consume: token ids, masks, advantages, and the pi_old / pi_ref
log-probs recorded once at rollout time. It is immutable: each step of the rollout pipeline returns a new one
(``dataclasses.replace``). Slicing it (``batch[i:j]``) gives the mini- and micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from grpokit.rollout import select_rows


@dataclass(frozen=True)
class Batch:
    """N completions of one rollout, ready for ``grpo_loss``. P = prompt width, C = completion width."""

    prompt_ids: torch.Tensor
    """(N, P) long, left-padded."""
    prompt_mask: torch.Tensor
    """(N, P) long, 1 on prompt tokens."""
    completion_ids: torch.Tensor
    """(N, C) long, right-padded after the first EOS."""
    completion_mask: torch.Tensor
    """(N, C) long, 1 through the first EOS: the attention mask of the completion part."""
    loss_mask: torch.Tensor
    """(N, C) long, the tokens the loss sees: ``completion_mask``, with truncated completions zeroed when
    ``mask_truncated_completions`` is on."""
    advantages: torch.Tensor
    """(N,) float, A_i of each completion (the same for all its tokens; DeepSeekMath 4.1.2); or (N, C), one per
    token (process supervision, 4.1.3, and/or the KL reward-to-go of ``kl_in_reward``)."""
    old_logps: torch.Tensor | None = None
    """(N, C) log pi_old of the sampled tokens, recorded before any update of this rollout; ``None`` when the
    rollout feeds a single optimizer step (then pi_old = sg(pi_theta))."""
    ref_logps: torch.Tensor | None = None
    """(N, C) log pi_ref of the sampled tokens; ``None`` when beta = 0."""
    tis_weights: torch.Tensor | None = None
    """(N, C) or (N, 1) truncated importance weights min(pi_old / pi_sampler, tis_cap), constants multiplying
    each token's surrogate (``grpokit.mismatch``); ``None`` when ``tis`` is off."""
    sampling_logps: torch.Tensor | None = None
    """(N, C) log-probs of the sampled tokens as the rollout engine recorded them (``Rollout.sampling_logps``),
    for the logged sampler/trainer mismatch."""
    sampling_entropy: torch.Tensor | None = None
    """(N, C) the policy's entropy at each completion token as the sampler recorded it; set only when the
    rollout feeds a single optimizer step (the sampler's weights are then the updated policy's), for the rows
    that need no training forward (``GRPOTrainer.micro_batches``)."""

    def __len__(self) -> int:
        return self.prompt_ids.size(0)

    def __getitem__(self, rows: slice | torch.Tensor) -> Batch:
        """The rows ``rows``: a slice (views) or a (k,) long index (copies, in that order)."""
        return select_rows(self, rows)

    def split(self, size: int) -> list[Batch]:
        """Consecutive slices of ``size`` rows (the last may be shorter)."""
        return [self[i:i + size] for i in range(0, len(self), size)]

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


