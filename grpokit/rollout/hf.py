"""The generic engine: any Hugging Face causal LM, sampled through its own forward and KV cache.

It keeps every row until the last one finishes (a Hugging Face cache cannot drop rows cheaply) and reads the
training weights in place, so there is nothing to synchronise.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from grpokit.models.llama import position_ids_from_mask
from grpokit.models.loading import base_model
from grpokit.rollout.decode import local_rollout
from grpokit.rollout.engine import Rollout, SamplingParams


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


def start_hf(model: torch.nn.Module, compute_dtype: torch.dtype | None = None):
    """The ``Start`` of ``model``'s own forward over a Hugging Face KV cache; ``compute_dtype`` (bf16 mixed
    precision): every forward under ``torch.autocast`` to it."""
    device = next(model.parameters()).device

    def autocast():
        return torch.autocast(device.type, dtype=compute_dtype or torch.bfloat16, enabled=compute_dtype is not None)

    def start(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int):
        B = prompt_ids.size(0)
        cache = {cache_argument(model): new_cache(model)}  # filled in place by every forward below
        with autocast():
            out = model(input_ids=prompt_ids, attention_mask=prompt_mask,
                        position_ids=position_ids_from_mask(prompt_mask), use_cache=True, logits_to_keep=1, **cache)
        state = {"mask": prompt_mask, "next_position": prompt_mask.sum(-1, keepdim=True)}  # (B, P + t), (B, 1)

        def advance(token: torch.Tensor, t: int) -> torch.Tensor:
            state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(B, 1)], dim=1)
            with autocast():
                out = model(input_ids=token[:, None], attention_mask=state["mask"],
                            position_ids=state["next_position"] + t, use_cache=True, **cache)
            return out.logits[:, -1]

        return out.logits[:, -1], advance, None

    return start


class HFEngine:
    """``rollout_engine: hf``: the model's Hugging Face forward, one token per step."""

    name = "hf"

    def __init__(self, model: torch.nn.Module, tokenizer, *, compute_dtype: torch.dtype | None = None):
        self.model, self.tokenizer, self.compute_dtype = model, tokenizer, compute_dtype

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Rollout:
        model = base_model(self.model)  # a peft model samples through the model it wraps, LoRA layers included
        return local_rollout(model, self.tokenizer, prompts, params, start_hf(model, self.compute_dtype))

    def sync_weights(self, model: torch.nn.Module) -> float:
        return 0.0  # the training weights, read in place

    def close(self) -> None:
        pass
