"""A lean sampling loop: prompts run once, then one token per step through the model's KV cache.

Why not ``model.generate``: its per-step machinery (logits processors, stopping criteria, generation config
resolution) costs more than the forward pass of a small model; this loop is the forward pass and a draw.
Rows are left-padded so every row's next token sits in the last column; position ids come from the attention
mask, so a padded row sees the same positions as it would alone (and as the training forward gives it).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from grpokit.data import left_pad
from grpokit.rollout import fast_decode
from grpokit.rollout.sampling import sample_next


@dataclass
class Rollout:
    """N sampled completions and their prompts. B = N rows, P = longest prompt, C = longest completion."""

    prompt_ids: torch.Tensor
    """(B, P) long, left-padded with the pad id."""
    prompt_mask: torch.Tensor
    """(B, P) long, 1 on prompt tokens, 0 on left padding."""
    completion_ids: torch.Tensor
    """(B, C) long, right-padded with the pad id after the first EOS (C <= max_completion_length)."""
    completion_mask: torch.Tensor
    """(B, C) long, 1 on completion tokens up to and including the first EOS, 0 after it."""
    is_truncated: torch.Tensor
    """(B,) bool, True where max_completion_length was reached without an EOS."""
    sampling_logps: torch.Tensor
    """(B, C) log-probs of the drawn tokens under the sampled (tempered, unfiltered) distribution, recorded by
    the KV-cache path; 0 on padding. Diagnostics only: the loss recomputes log-probs with a full forward."""
    texts: list[str]
    """B decoded completions (special tokens skipped, so no EOS)."""
    sampling_entropy: torch.Tensor | None = None
    """(B, C) entropy of that distribution at each completion token, 0 on padding (``None`` where a rollout
    was built without it). The trainer logs it for rows that need no training forward (``skip_zero_advantage``)."""

    @property
    def num_tokens(self) -> int:
        """Completion tokens counted by the mask (EOS included)."""
        return int(self.completion_mask.sum())


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 attention mask -> (B, T) positions counting only real tokens (0 on left padding)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def token_lists(completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[list[int]]:
    """(B, C) ids and their (B, C) mask, 1 through the first EOS (a prefix of each row) -> B lists of ids."""
    lengths = completion_mask.sum(-1).tolist()
    return [row[:n] for row, n in zip(completion_ids.tolist(), lengths)]


def completion_mask_from_eos(completion_ids: torch.Tensor, eos_token_ids: Sequence[int]) -> torch.Tensor:
    """(B, C) -> (B, C) long mask, 1 through the first EOS of each row (every token when there is none)."""
    is_eos = torch.isin(completion_ids, torch.as_tensor(list(eos_token_ids), device=completion_ids.device))
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0  # (B, C) True strictly after the first EOS
    return (~after_eos).long()


def cache_argument(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument of ``model.forward``: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (older releases)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def new_cache(model: torch.nn.Module):
    from transformers import DynamicCache

    config = getattr(model, "config", None)
    try:
        return DynamicCache(config=config)
    except TypeError:  # releases whose DynamicCache takes no config
        return DynamicCache()


def distinct_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For x (B, n): ``first`` (U,), the first row of each distinct row value, and ``index`` (B,), which gives
    x == x[first][index]."""
    _, inverse = torch.unique(x, dim=0, return_inverse=True)  # (B,) into the U sorted distinct rows
    rows = torch.arange(x.size(0), device=x.device)
    first = torch.full((int(inverse.max()) + 1,), x.size(0), device=x.device).scatter_reduce_(
        0, inverse, rows, reduce="amin")  # (U,)
    return first, inverse


def start_decoding(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int):
    """Runs the prompts; returns the first completion token's logits (B, V) and ``advance(token, t)``, which
    feeds completion token t (B,) and returns the next logits, and ``keep(rows)`` (or ``None``), which drops
    the rows outside ``rows`` (b,) bool from the batch. Llama-family models take the lean decoder
    (``fast_decode``); any other model the generic loop over its own KV cache, which keeps every row."""
    if fast_decode.supports(model, prompt_ids.size(1) + max_new_tokens):
        # a group's G rows share one prompt: each distinct prompt is run once, then its cache and logits repeated
        first, index = distinct_rows(torch.cat([prompt_ids, prompt_mask], 1))  # (U,), (B,)
        decoder = fast_decode.LlamaFamilyDecoder(model, prompt_mask[first], max_new_tokens)
        logits = decoder.prefill(prompt_ids[first])  # (U, V)
        if first.numel() < prompt_ids.size(0):
            decoder.select(index)
            logits = logits[index]
        return logits, decoder.step, decoder.keep

    B = prompt_ids.size(0)
    cache = {cache_argument(model): new_cache(model)}  # filled in place by every forward below
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids_from_mask(prompt_mask),
                use_cache=True, logits_to_keep=1, **cache)
    state = {"mask": prompt_mask, "next_position": prompt_mask.sum(-1, keepdim=True)}  # (B, P + t), (B, 1)

    def advance(token: torch.Tensor, t: int) -> torch.Tensor:
        state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(B, 1)], dim=1)
        out = model(input_ids=token[:, None], attention_mask=state["mask"],
                    position_ids=state["next_position"] + t, use_cache=True, **cache)
        return out.logits[:, -1]

    return out.logits[:, -1], advance, None


@torch.inference_mode()
def sample(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample up to ``max_new_tokens`` tokens per row of a left-padded batch.

    Returns ``completion_ids`` (B, C), ``completion_mask`` (B, C), ``is_truncated`` (B,), ``sampling_logps``
    (B, C) and ``sampling_entropy`` (B, C) (both 0 after a row's EOS). Stops as soon as every row has emitted an
    EOS; tokens after a row's EOS are the pad id. Once an eighth of the rows still in the batch have finished,
    the lean decoder drops them (``keep``), so short completions stop costing while long ones go on.
    """
    B, device = prompt_ids.size(0), prompt_ids.device
    eos = torch.as_tensor(list(eos_token_ids), device=device)
    logits, advance, keep = start_decoding(model, prompt_ids, prompt_mask, max_new_tokens)  # (B, V), steps

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
    return completion_ids, completion_mask, is_truncated, sampling_logps, sampling_entropy


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample one completion per prompt (token id lists; repeat a prompt G times for a group) -> ``Rollout``.

    The model is put in eval mode while sampling and given back in the mode it came in. A peft model samples
    through the Hugging Face model it wraps (LoRA layers included), which the lean decoder understands.
    """
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id)  # (B, P)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    was_training = model.training
    model.eval()
    try:
        completion_ids, completion_mask, is_truncated, sampling_logps, sampling_entropy = sample(
            model, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
            pad_token_id=tokenizer.pad_token_id, temperature=temperature, top_k=top_k, top_p=top_p,
            generator=generator,
        )
    finally:
        model.train(was_training)
    # inference-mode tensors cannot enter autograd later: clone them into normal ones
    completion_ids, completion_mask = completion_ids.clone(), completion_mask.clone()
    is_truncated, sampling_logps = is_truncated.clone(), sampling_logps.clone()
    sampling_entropy = sampling_entropy.clone()
    kept = token_lists(completion_ids, completion_mask)
    texts = tokenizer.batch_decode(kept, skip_special_tokens=True)
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                   completion_mask=completion_mask, is_truncated=is_truncated, sampling_logps=sampling_logps,
                   texts=texts, sampling_entropy=sampling_entropy)
