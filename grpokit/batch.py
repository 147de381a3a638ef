"""``Batch``: one rollout made ready for the loss; and the training forward that scores its completions.

A ``Batch`` is what the mu passes of updates consume: token ids, masks, advantages, and the pi_old / pi_ref
log-probs recorded once at rollout time. Slicing it (``batch[i:j]``) gives the mini- and micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from grpokit import packed
from grpokit.logprobs import hidden_states, lm_head_of, token_logprobs
from grpokit.rollout import position_ids_from_mask


@dataclass
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
    sampling_entropy: torch.Tensor | None = None
    """(N, C) the policy's entropy at each completion token as the sampler recorded it; set only when the
    rollout feeds a single optimizer step (the sampler's weights are then the updated policy's), for the rows
    that need no training forward (``GRPOTrainer.micro_batches``)."""

    def __len__(self) -> int:
        return self.prompt_ids.size(0)

    def __getitem__(self, rows: slice | torch.Tensor) -> Batch:
        """The rows ``rows``: a slice (views) or a (k,) long index (copies, in that order)."""
        return Batch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows]
                        for f in fields(self)})

    def split(self, size: int) -> list[Batch]:
        """Consecutive slices of ``size`` rows (the last may be shorter)."""
        return [self[i:i + size] for i in range(0, len(self), size)]

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def completion_logps(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
    padding_free: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log pi(o_t | q, o_<t) of every completion token under log_softmax(logits / temperature): (N, C).

    The prompt and completion run through the model body together (position ids from the attention mask,
    as when sampling); only the C hidden states that predict completion tokens go through the LM head, in
    chunks (``grpokit.logprobs``), so no (N, P + C, V) logits exist. With ``return_entropy``, also the
    entropy (N, C) of each of those distributions. ``padding_free`` (and a Llama-family model): through
    ``grpokit.packed``, real tokens only, padded completion slots 0.
    """
    P = prompt_ids.size(1)
    if padding_free and packed.supports(model, P + completion_ids.size(1)):  # no padding, each group's prompt once
        return packed_completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                       temperature=temperature, chunk_size=chunk_size, return_entropy=return_entropy)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (N, P + C)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # (N, P + C)
    hidden = hidden_states(model, input_ids, attention_mask,
                           position_ids=position_ids_from_mask(attention_mask))  # (N, P + C, H)
    hidden = hidden[:, P - 1:-1]  # (N, C, H): the state at t - 1 predicts completion token t
    weight, bias = lm_head_of(model)
    return token_logprobs(hidden, weight, completion_ids, temperature=temperature, bias=bias,
                          chunk_size=chunk_size, return_entropy=return_entropy)


def packed_completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, *, temperature=1.0,
                            chunk_size=None, return_entropy=False):
    """``completion_logps`` through ``grpokit.packed``: the LM head sees only the real completion tokens;
    padded slots (after each EOS) get 0, a value no loss reads (every loss masks them)."""
    where = completion_mask.bool()  # (N, C)
    hidden = packed.completion_hidden(model, prompt_ids, prompt_mask, completion_ids, completion_mask)  # (M, H)
    weight, bias = lm_head_of(packed.base_model(model))
    out = token_logprobs(hidden, weight, completion_ids[where], temperature=temperature, bias=bias,
                         chunk_size=chunk_size, return_entropy=return_entropy)
    out = out if return_entropy else (out,)
    spread = tuple(values.new_zeros(where.shape).masked_scatter(where, values) for values in out)  # (N, C)
    return spread if return_entropy else spread[0]
