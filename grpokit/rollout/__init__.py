"""Sampling completions: the ``Rollout`` record and the KV-cache sampling loop that fills it."""

from grpokit.rollout.generate import (
    Rollout,
    completion_mask_from_eos,
    generate,
    position_ids_from_mask,
    sample,
)
from grpokit.rollout.sampling import filter_logits, sample_next, tempered_logits

__all__ = [
    "Rollout",
    "generate",
    "sample",
    "sample_next",
    "filter_logits",
    "tempered_logits",
    "position_ids_from_mask",
    "completion_mask_from_eos",
]
