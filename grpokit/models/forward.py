"""The training forward: log-probs (and entropy) of each completion token under the policy.

Under ``torch.autocast`` (bf16 mixed precision: ``GRPOConfig.bf16``) the body's matmuls run in bfloat16 as
autocast decides, and the LM head's chunks multiply in the autocast dtype too (``head_in``); the
log-sum-exp, the log-probs, the entropy and everything after them are float32.
"""

from __future__ import annotations

import torch

from grpokit.logprobs import hidden_states, late_weight_grad, lm_head_of, token_logprobs
from grpokit.models import packed
from grpokit.models.llama import autocast_dtype, position_ids_from_mask


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
    ``grpokit.models.packed``, real tokens only, padded completion slots 0.
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
    return token_logprobs(**head_in(hidden, *lm_head_of(model)), targets=completion_ids, temperature=temperature,
                          chunk_size=chunk_size, return_entropy=return_entropy)


def head_in(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> dict:
    """``token_logprobs``' arguments for the head: under autocast, ``hidden`` cast to its dtype and that dtype
    as ``compute_dtype`` (the float32 master weight is cast inside, and its gradient returned in float32);
    otherwise all in the weight's dtype."""
    dtype = autocast_dtype(hidden) or weight.dtype
    hidden = hidden if hidden.dtype == dtype else hidden.to(dtype)
    return dict(hidden=hidden, weight=weight, bias=bias, compute_dtype=dtype)


def packed_completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, *, temperature=1.0,
                            chunk_size=None, return_entropy=False):
    """``completion_logps`` through ``grpokit.models.packed``: the LM head sees only the real completion tokens;
    padded slots (after each EOS) get 0, a value no loss reads (every loss masks them)."""
    where = completion_mask.bool()  # (N, C)
    hf = packed.base_model(model)
    weight, bias = lm_head_of(hf)
    late = None
    if weight.requires_grad and torch.is_grad_enabled():
        # the head's weight gradient formed after the body's backward (logprobs.LateWeightGrad), through a node
        # made before the body: for a tied table (packed.sparse_lookup) autograd then also delivers the
        # lookup's sparse gradient first and adds it into the head's dense one in place
        weight, late = late_weight_grad(weight)
    hidden = packed.completion_hidden(model, prompt_ids, prompt_mask, completion_ids, completion_mask)  # (M, H)
    out = token_logprobs(**head_in(hidden, weight, bias), targets=completion_ids[where],
                         temperature=temperature, chunk_size=chunk_size, return_entropy=return_entropy,
                         late_weight_grad=late)
    out = out if return_entropy else (out,)
    spread = tuple(values.new_zeros(where.shape).masked_scatter(where, values) for values in out)  # (N, C)
    return spread if return_entropy else spread[0]
