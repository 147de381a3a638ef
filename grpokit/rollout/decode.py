"""The token-by-token sampling loop shared by the in-process engines (``lean``, ``hf``).

Why not ``model.generate``: its per-step machinery (logits processors, stopping criteria, generation config
resolution) costs more than the forward pass of a small model; this loop is the forward pass and a draw.
Rows are left-padded so every row's next token sits in the last column; position ids come from the attention
mask, so a padded row sees the same positions as it would alone (and as the training forward gives it).
An engine supplies ``start``: how its model runs the prompts and then one token per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from grpokit.rollout.engine import Rollout, SamplingParams, completion_mask_from_eos, left_pad, token_lists
from grpokit.rollout.sampling import sample_next

Advance = Callable[[torch.Tensor, int], torch.Tensor]
"""``advance(token, t)``: feeds completion token t (b,) of the rows still decoding, returns their next logits."""
Keep = Callable[[torch.Tensor], None]
"""``keep(rows)``: drops the rows outside ``rows`` (b,) bool from the batch."""
Start = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, Advance, Keep | None]]
"""``start(prompt_ids, prompt_mask, max_new_tokens)``: runs the prompts, returns the first completion token's
logits (B, V), ``advance`` and ``keep`` (``None`` for a decoder that keeps every row)."""


@dataclass(frozen=True)
class Draws:
    """What ``sample`` drew for B rows; C = the longest completion."""

    completion_ids: torch.Tensor
    """(B, C) long, the pad id after each row's first EOS."""
    completion_mask: torch.Tensor
    """(B, C) long, 1 through the first EOS."""
    is_truncated: torch.Tensor
    """(B,) bool, no EOS within ``max_new_tokens``."""
    sampling_logps: torch.Tensor
    """(B, C) log-prob of each drawn token under the tempered, unfiltered distribution; 0 after EOS."""
    sampling_entropy: torch.Tensor
    """(B, C) entropy of that distribution at each drawn token; 0 after EOS."""


@torch.inference_mode()
def sample(start: Start, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, params: SamplingParams) -> Draws:
    """Sample up to ``params.max_new_tokens`` tokens per row of a left-padded batch (B, P).

    ``start`` runs the prompts and gives the decoding steps (``Start``). Stops as soon as every row has
    emitted an EOS; tokens after a row's EOS are the pad id. Once an eighth of the rows still in the batch
    have finished, a decoder that can drop rows (``keep``) drops them, so short completions stop costing
    while long ones go on.
    """
    max_new_tokens, eos_token_ids, pad_token_id = params.max_new_tokens, params.eos_token_ids, params.pad_token_id
    temperature, top_k, top_p, generator = params.temperature, params.top_k, params.top_p, params.generator
    B, device = prompt_ids.size(0), prompt_ids.device
    eos = torch.as_tensor(list(eos_token_ids), device=device)
    logits, advance, keep = start(prompt_ids, prompt_mask, max_new_tokens)  # (B, V), steps

    completion_ids = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    sampling_logps = torch.zeros(B, max_new_tokens, dtype=torch.promote_types(logits.dtype, torch.float32),
                                 device=device)
    sampling_entropy = torch.zeros_like(sampling_logps)
    rows = None  # the batch's rows among the B: all of them (None) until ``keep`` drops some
    done = torch.zeros(B, dtype=torch.bool, device=device)  # of the batch's rows
    finished, length = 0, max_new_tokens
    for step in range(max_new_tokens):
        token, logp, entropy = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                           generator=generator)
        if finished:  # rows past their EOS get padding
            token, logp = token.masked_fill(done, pad_token_id), logp.masked_fill(done, 0.0)  # (b,)
            entropy = entropy.masked_fill(done, 0.0)
        where = slice(None) if rows is None else rows
        completion_ids[where, step] = token
        sampling_logps[where, step] = logp.to(sampling_logps.dtype)
        sampling_entropy[where, step] = entropy.to(sampling_entropy.dtype)
        done = done | (token == eos[0] if eos.numel() == 1 else torch.isin(token, eos))
        finished = int(done.sum())
        if step == max_new_tokens - 1 or finished == done.numel():
            length = step + 1
            break
        if keep is not None and finished * 8 >= done.numel():
            keep(~done)
            rows = (torch.arange(B, device=device) if rows is None else rows)[~done]
            token, done, finished = token[~done], done[~done], 0
        logits = advance(token, step)

    completion_ids, sampling_logps = completion_ids[:, :length], sampling_logps[:, :length]  # (B, C)
    sampling_entropy = sampling_entropy[:, :length]
    completion_mask = completion_mask_from_eos(completion_ids, eos_token_ids)  # (B, C)
    is_truncated = ~torch.isin(completion_ids, eos).any(-1)  # reached max_new_tokens without EOS
    return Draws(completion_ids=completion_ids, completion_mask=completion_mask, is_truncated=is_truncated,
                 sampling_logps=sampling_logps, sampling_entropy=sampling_entropy)


def local_rollout(model: torch.nn.Module, tokenizer, prompts: Sequence[Sequence[int]], params: SamplingParams,
                  start: Start) -> Rollout:
    """``sample`` for an in-process model: pads and places the prompts, samples in eval mode (the model is
    given back in the mode it came in), decodes the texts."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, params.pad_token_id)  # (B, P)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    was_training = model.training
    model.eval()
    try:
        draws = sample(start, prompt_ids, prompt_mask, params)
    finally:
        model.train(was_training)
    # inference-mode tensors cannot enter autograd later: clone them into normal ones
    draws = Draws(**{name: value.clone() for name, value in vars(draws).items()})
    texts = tokenizer.batch_decode(token_lists(draws.completion_ids, draws.completion_mask), skip_special_tokens=True)
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=draws.completion_ids,
                   completion_mask=draws.completion_mask, is_truncated=draws.is_truncated,
                   sampling_logps=draws.sampling_logps, texts=texts, sampling_entropy=draws.sampling_entropy)
