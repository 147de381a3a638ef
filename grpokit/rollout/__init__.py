"""Sampling completions: the ``RolloutEngine`` seam, its ``Rollout`` record, and the engines behind it.

``make_engine(name, model, tokenizer)`` builds the engine ``rollout_engine`` names: ``lean`` (the lean
Llama-family decoder, ``grpokit.rollout.lean``), ``hf`` (any Hugging Face causal LM, ``grpokit.rollout.hf``),
``vllm`` (``grpokit.rollout.vllm``), or ``auto`` (``lean`` where it applies, else ``hf``). A new engine is a
class with ``generate``, ``sync_weights`` and ``close`` in its own module, and one entry in ``ENGINES``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from grpokit.models.llama import position_ids_from_mask
from grpokit.rollout.decode import Draws, sample
from grpokit.rollout.engine import (
    Rollout,
    RolloutEngine,
    SamplingParams,
    completion_mask_from_eos,
    left_pad,
    select_rows,
    token_lists,
)
from grpokit.rollout.hf import HFEngine
from grpokit.rollout.lean import LeanEngine
from grpokit.rollout.sampling import filter_logits, sample_next, tempered_logits


def _vllm_engine(model, tokenizer, **options):
    from grpokit.rollout.vllm import VLLMEngine  # vLLM is an optional extra: imported only when asked for

    return VLLMEngine(model, tokenizer, **options)


ENGINES = {
    "auto": lambda model, tokenizer, compute_dtype=None: LeanEngine(model, tokenizer, fallback=True,
                                                                    compute_dtype=compute_dtype),
    "lean": lambda model, tokenizer, compute_dtype=None: LeanEngine(model, tokenizer, compute_dtype=compute_dtype),
    "hf": lambda model, tokenizer, compute_dtype=None: HFEngine(model, tokenizer, compute_dtype=compute_dtype),
    "vllm": _vllm_engine,
}
"""``rollout_engine`` name -> builder ``(model, tokenizer, **options) -> RolloutEngine``; the in-process
engines take ``compute_dtype`` (bf16 mixed precision), vLLM its ``vllm_*`` settings."""


def make_engine(name: str, model: torch.nn.Module, tokenizer, **options) -> RolloutEngine:
    """The engine ``name`` over ``model``; ``options`` reach engines that take settings (vLLM's)."""
    if name not in ENGINES:
        raise ValueError(f"rollout_engine must be one of {', '.join(ENGINES)}; got {name!r}")
    return ENGINES[name](model, tokenizer, **options)


def generate(model: torch.nn.Module, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             eos_token_ids: Sequence[int], temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             generator: torch.Generator | None = None, engine: str = "auto") -> Rollout:
    """One completion per prompt (token id lists) from an in-process engine (``auto``: lean where it applies)."""
    params = SamplingParams(max_new_tokens=max_new_tokens, eos_token_ids=tuple(eos_token_ids),
                            pad_token_id=tokenizer.pad_token_id, temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=generator)
    return make_engine(engine, model, tokenizer).generate(prompts, params)


__all__ = [
    "ENGINES",
    "Draws",
    "HFEngine",
    "LeanEngine",
    "Rollout",
    "RolloutEngine",
    "SamplingParams",
    "completion_mask_from_eos",
    "filter_logits",
    "generate",
    "left_pad",
    "make_engine",
    "position_ids_from_mask",
    "sample",
    "sample_next",
    "select_rows",
    "tempered_logits",
    "token_lists",
]
