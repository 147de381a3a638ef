"""DAPO dynamic sampling (Yu et al. 2025, "DAPO", sec. 3.2): train only on groups that carry a signal.

A group whose G rewards are all equal (all solved, all failed) has advantage 0 for every completion: it
costs a forward and backward and moves nothing but the KL term, and it shrinks the effective batch. With
``dynamic_sampling: true`` the trainer drops such groups and samples fresh prompts until ``prompts_per_step``
informative groups are gathered, for at most ``max_sampling_rounds`` rounds. If the cap is reached first,
the batch is topped up with dropped groups (their advantage is 0) so that every rollout keeps its shape.

Each round after the first samples ``missing / (informative share so far)`` prompts (at most
``prompts_per_step``), so a mostly-flat task needs few rounds; extra informative groups are discarded.
Logged per rollout: ``dynamic_sampling/rounds`` and ``dynamic_sampling/dropped_groups``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from grpokit.rollout import Rollout, select_rows


@dataclass(frozen=True)
class Sampled:
    """Some groups of completions, scored: a group's G completions are consecutive rows."""

    rollout: Rollout
    """The sampled tokens (N rows)."""
    scores: object
    """``rewards.Scores`` or ``process.StepScores`` of the N completions."""
    prompts: list
    """N prompts (each repeated G times), as the reward functions saw them."""
    completions: list
    """N completions, as the reward functions saw them (text, or chat messages for chat prompts)."""
    completion_ids: list[list[int]]
    """N token lists (through EOS), as the reward functions saw them."""
    columns: dict[str, list]
    """Every other dataset column, N entries each."""

    def __len__(self) -> int:
        return len(self.completions)


def reward_values(scores) -> list[list[float]]:
    """Per completion, the reward values a group's 'all equal' test compares: its step rewards (process
    supervision) or its one reward (none when NaN, i.e. unscored)."""
    if hasattr(scores, "values"):
        return scores.values()
    return [[] if math.isnan(r) else [r] for r in scores.rewards.tolist()]


def informative_groups(values: list[list[float]], group_size: int) -> list[bool]:
    """Per group: True when its completions' reward values hold at least two distinct numbers (else every
    advantage of the group is 0)."""
    out = []
    for g in range(0, len(values), group_size):
        pooled = {v for row in values[g:g + group_size] for v in row}
        out.append(len(pooled) >= 2)
    return out


def gather_informative(sample: Callable[[int], Sampled], num_groups: int, group_size: int, max_rounds: int,
                       pad_id: int) -> tuple[Sampled, dict[str, float]]:
    """Call ``sample(n_prompts)`` until ``num_groups`` informative groups are found or ``max_rounds`` rounds
    are done; returns exactly ``num_groups`` groups (informative ones first, then dropped ones to fill) and
    the metrics ``dynamic_sampling/rounds`` and ``dynamic_sampling/dropped_groups``."""
    kept: list[Sampled] = []
    dropped: list[Sampled] = []
    found = drawn = dropped_count = rounds = 0
    while found < num_groups and rounds < max_rounds:
        missing = num_groups - found
        n = num_groups if found == 0 else min(num_groups, math.ceil(missing * drawn / found))
        part = sample(n)
        rounds += 1
        drawn += n
        flags = informative_groups(reward_values(part.scores), group_size)
        good = [g for g, ok in enumerate(flags) if ok][:missing]
        bad = [g for g, ok in enumerate(flags) if not ok]
        dropped_count += len(bad)
        if good:
            kept.append(select_groups(part, good, group_size))
            found += len(good)
        if bad and sum(len(d) for d in dropped) < num_groups * group_size:  # more filler is never needed
            dropped.append(select_groups(part, bad, group_size))
    parts = kept
    if found < num_groups:  # the cap was reached: fill with flat groups so the rollout keeps its shape
        filler = concat(dropped, pad_id)
        need = num_groups - found
        parts = kept + [select_groups(filler, list(range(need)), group_size)]
    metrics = {"dynamic_sampling/rounds": float(rounds), "dynamic_sampling/dropped_groups": float(dropped_count)}
    return concat(parts, pad_id), metrics


# ----------------------------------------------------------------------------------------------------------
# selecting and joining groups


def select_groups(sampled: Sampled, groups: list[int], group_size: int) -> Sampled:
    """The given groups (indices) of ``sampled``, in that order."""
    rows = [g * group_size + i for g in groups for i in range(group_size)]
    return select_rows(sampled, rows)


def concat(parts: list[Sampled], pad_id: int) -> Sampled:
    """Rows of several ``Sampled`` one after the other (tensors re-padded to the widest part)."""
    if len(parts) == 1:
        return parts[0]
    return Sampled(
        rollout=cat_rollouts([p.rollout for p in parts], pad_id),
        scores=_cat_records([p.scores for p in parts]),
        prompts=[x for p in parts for x in p.prompts],
        completions=[x for p in parts for x in p.completions],
        completion_ids=[x for p in parts for x in p.completion_ids],
        columns={k: [x for p in parts for x in p.columns[k]] for k in parts[0].columns},
    )


def cat_rollouts(rollouts: list[Rollout], pad_id: int) -> Rollout:
    """Rollouts of different widths as one: prompts left-padded, completions right-padded to the widest, ids
    with ``pad_id`` (the tokenizer's), masks, sampling log-probs and entropies with 0. ``model_mask``: ``None``
    when every part's is; otherwise a part without one counts all its completion tokens as the model's."""
    P = max(r.prompt_ids.size(1) for r in rollouts)
    C = max(r.completion_ids.size(1) for r in rollouts)
    pad = pad_id
    return Rollout(
        prompt_ids=torch.cat([_pad(r.prompt_ids, P, pad, left=True) for r in rollouts]),
        prompt_mask=torch.cat([_pad(r.prompt_mask, P, 0, left=True) for r in rollouts]),
        completion_ids=torch.cat([_pad(r.completion_ids, C, pad, left=False) for r in rollouts]),
        completion_mask=torch.cat([_pad(r.completion_mask, C, 0, left=False) for r in rollouts]),
        is_truncated=torch.cat([r.is_truncated for r in rollouts]),
        sampling_logps=torch.cat([_pad(r.sampling_logps, C, 0.0, left=False) for r in rollouts]),
        texts=[t for r in rollouts for t in r.texts],
        sampling_entropy=None if any(r.sampling_entropy is None for r in rollouts) else
        torch.cat([_pad(r.sampling_entropy, C, 0.0, left=False) for r in rollouts]),
        model_mask=None if all(r.model_mask is None for r in rollouts) else
        torch.cat([_pad(r.completion_mask if r.model_mask is None else r.model_mask, C, 0, left=False)
                   for r in rollouts]),
    )


def _pad(x: torch.Tensor, width: int, value, *, left: bool) -> torch.Tensor:
    extra = width - x.size(1)
    if extra == 0:
        return x
    fill = x.new_full((x.size(0), extra), value)
    return torch.cat([fill, x] if left else [x, fill], dim=1)


def _cat_records(records: list):
    values = {}
    for f in fields(records[0]):
        items = [getattr(r, f.name) for r in records]
        values[f.name] = torch.cat(items) if isinstance(items[0], torch.Tensor) else [x for v in items for x in v]
    return type(records[0])(**values)
