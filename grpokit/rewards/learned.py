"""Keep training a learned reward model on the policy's new samples, with a replay of old ones (DeepSeekMath 4.1.4).

A reward function that also has an ``update(samples)`` method is a *learned reward* (``LearnedReward``):
with ``reward_model_update_steps: N``, every N optimizer steps the trainer calls

    reward_fn.update(samples)   # -> optional dict of metrics, logged as reward_model/<name>/<key>

with the samples scored since the previous update, plus a replay of historical samples drawn uniformly from
a reservoir buffer, so that replayed samples make up ``reward_model_replay_fraction`` of the call (the
paper's 10%). Each sample is a dict::

    {"prompt": ..., "completion": ..., "completion_ids": [...], "reward": float | None, <dataset columns>}

``reward`` is the combined reward the trainer used. How ``update`` trains (labels from a dataset column, a
verifier, human data) is the reward model's business. A learned reward given in YAML is an object:
``reward_funcs: ["my_rm.py:reward_model"]`` with ``reward_model = MyRewardModel()`` in that file.

Not checkpointed: the buffer and the reward model's own state (save them in ``update`` if a run must resume
exactly).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from grpokit.rewards import RewardFunction


@runtime_checkable
class LearnedReward(Protocol):
    """A reward function that can be trained further: TRL's reward contract plus ``update``."""

    def __call__(self, prompts, completions, completion_ids, **columns) -> list[float | None]: ...

    def update(self, samples: list[dict[str, Any]]) -> dict[str, float] | None: ...


def learned_rewards(funcs: Sequence[RewardFunction]) -> list[RewardFunction]:
    """The reward functions that have an ``update`` method."""
    return [fn for fn in funcs if callable(getattr(fn.func, "update", None))]


class ReplayBuffer:
    """At most ``capacity`` samples, a uniform random subset of all ever added (reservoir sampling)."""

    def __init__(self, capacity: int, seed: int = 0):
        self.capacity = capacity
        self.items: list[dict[str, Any]] = []
        self.seen = 0
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, samples: Sequence[dict[str, Any]]) -> None:
        for s in samples:
            self.seen += 1
            if len(self.items) < self.capacity:
                self.items.append(s)
            else:
                j = self.rng.randrange(self.seen)
                if j < self.capacity:
                    self.items[j] = s

    def sample(self, k: int) -> list[dict[str, Any]]:
        return self.rng.sample(self.items, min(k, len(self.items)))


def replay_count(new: int, fraction: float, available: int) -> int:
    """Replayed samples to add to ``new`` fresh ones so that they make up ``fraction`` of the whole."""
    if fraction <= 0 or new == 0:
        return 0
    return min(available, round(new * fraction / (1.0 - fraction)))


class RewardModelUpdates:
    """The trainer's side of the hook: collects samples, calls ``update`` every ``every`` steps."""

    def __init__(self, learners: Sequence[RewardFunction], *, every: int, replay_fraction: float,
                 buffer_size: int, seed: int = 0):
        self.learners = list(learners)
        self.every, self.replay_fraction = every, replay_fraction
        self.buffer = ReplayBuffer(buffer_size, seed)
        self.pending: list[dict[str, Any]] = []

    def record(self, prompts, completions, completion_ids, columns: dict[str, list], rewards) -> None:
        """Keep one rollout's scored samples for the next update."""
        for i, (p, c, ids) in enumerate(zip(prompts, completions, completion_ids)):
            reward = float(rewards[i])
            self.pending.append({"prompt": p, "completion": c, "completion_ids": ids,
                                 "reward": None if math.isnan(reward) else reward,
                                 **{k: v[i] for k, v in columns.items()}})

    def maybe_update(self, step: int) -> dict[str, float]:
        """After optimizer step ``step``: every ``every`` steps, train each learned reward on the new samples
        plus the replay; then the new samples join the buffer. Returns the metrics to log."""
        if not self.every or step % self.every or not self.pending:
            return {}
        new = self.pending
        replay = self.buffer.sample(replay_count(len(new), self.replay_fraction, len(self.buffer)))
        samples = new + replay
        metrics = {"reward_model/new_samples": float(len(new)), "reward_model/replayed_samples": float(len(replay))}
        for fn in self.learners:
            out = fn.func.update(list(samples)) or {}
            metrics.update({f"reward_model/{fn.name}/{k}": float(v) for k, v in out.items()})
        self.buffer.add(new)
        self.pending = []
        return metrics
