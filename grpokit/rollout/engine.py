"""The rollout-engine seam: what the trainer asks of whatever samples its completions.

An engine turns prompt token ids into a ``Rollout``: G completions per prompt (the trainer repeats each prompt
G times), their masks, and the log-prob of each drawn token under the distribution the engine sampled from.
The trainer talks to engines only through ``RolloutEngine``; ``grpokit.rollout.make_engine`` builds one by
name (``rollout_engine`` in the config). In-process engines (``lean``, ``hf``) read the training weights
directly, so their ``sync_weights`` does nothing; an engine holding its own copy of the weights (vLLM)
copies them in there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: the same for every engine."""

    max_new_tokens: int
    """Most tokens per completion (``max_completion_length``)."""
    eos_token_ids: tuple[int, ...]
    """Tokens that end a completion (kept in it, masked 1)."""
    pad_token_id: int
    """Fills ``completion_ids`` after a row's EOS."""
    temperature: float = 1.0
    """Softmax temperature; the recorded log-probs are of the tempered distribution."""
    top_k: int = 0
    """Keep the k most likely tokens; 0: off."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]; 1: off."""
    generator: torch.Generator | None = None
    """The trainer's sampler stream (per-rank seed, saved in checkpoints): engines draw from it, or seed
    themselves from it, so that a resumed run samples what the uninterrupted run would."""


@dataclass(frozen=True)
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
    the engine; 0 on padding. Used by ``tis`` and the logged mismatch: the loss recomputes log-probs with the
    training forward."""
    texts: list[str]
    """B decoded completions (special tokens skipped, so no EOS)."""
    sampling_entropy: torch.Tensor | None = None
    """(B, C) entropy of that distribution at each completion token, 0 on padding (``None`` where a rollout
    was built without it). The trainer logs it for rows that need no training forward (``skip_zero_advantage``)."""
    model_mask: torch.Tensor | None = None
    """(B, C) long, 1 on tokens the model sampled, 0 on environment tokens (tool messages of a multi-turn
    rollout, ``grpokit.rollout.multi_turn``) and on padding; the loss sees only the former. ``None``: every
    completion token is the model's (single-turn rollouts). A multi-turn rollout's completion is its whole
    transcript: ``completion_mask`` is 1 on all of it, EOS tokens inside it included."""

    @property
    def num_tokens(self) -> int:
        """Completion tokens counted by the mask (EOS included)."""
        return int(self.completion_mask.sum())

    def __len__(self) -> int:
        return self.prompt_ids.size(0)


@runtime_checkable
class RolloutEngine(Protocol):
    """What samples completions for the trainer."""

    name: str
    """The ``rollout_engine`` value that builds it (``lean``, ``hf``, ``vllm``)."""

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Rollout:
        """One completion per prompt (token id lists; a group's prompt repeated G times, rows consecutive)."""
        ...

    def sync_weights(self, model: torch.nn.Module) -> float:
        """Make the engine sample from ``model``'s current weights; returns the seconds it took (0.0 for an
        engine that reads the training weights in place)."""
        ...

    def close(self) -> None:
        """Free what the engine holds (processes, caches, device memory)."""
        ...


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists: -> ids (B, P), mask (B, P) with 1 on real tokens."""
    width = max(len(s) for s in sequences)
    ids = torch.tensor([[pad_id] * (width - len(s)) + list(s) for s in sequences], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], dtype=torch.long)
    return ids.view(len(sequences), width), mask.view(len(sequences), width)


def token_lists(completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[list[int]]:
    """(B, C) ids and their (B, C) mask, 1 through the first EOS (a prefix of each row) -> B lists of ids."""
    lengths = completion_mask.sum(-1).tolist()
    return [row[:n] for row, n in zip(completion_ids.tolist(), lengths)]


def completion_mask_from_eos(completion_ids: torch.Tensor, eos_token_ids: Sequence[int]) -> torch.Tensor:
    """(B, C) -> (B, C) long mask, 1 through the first EOS of each row (every token when there is none)."""
    is_eos = torch.isin(completion_ids, torch.as_tensor(list(eos_token_ids), device=completion_ids.device))
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0  # (B, C) True strictly after the first EOS
    return (~after_eos).long()


def select_rows(record, rows):
    """The rows ``rows`` (a slice, or a list / (k,) long tensor of indices, in that order) of a record: a
    dataclass whose fields hold one entry per row (tensors along dim 0, lists, dicts of those, nested records;
    ``None`` stays ``None``). One definition of row selection for every record (``Rollout``, ``Batch``,
    reward scores, ``Sampled``)."""
    if rows is not None and not isinstance(rows, slice):
        rows = torch.as_tensor(rows, dtype=torch.long)
    return _select(record, rows)


def _select(value, rows):
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value[rows] if isinstance(rows, slice) else value[rows.to(value.device)]
    if isinstance(value, list):
        return value[rows] if isinstance(rows, slice) else [value[i] for i in rows.tolist()]
    if isinstance(value, dict):
        return {k: _select(v, rows) for k, v in value.items()}
    if dataclasses.is_dataclass(value):
        return type(value)(**{f.name: _select(getattr(value, f.name), rows) for f in dataclasses.fields(value)})
    raise TypeError(f"cannot select rows of a {type(value).__name__}")
