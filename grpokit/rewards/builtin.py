"""Built-in reward functions, selectable by name (``reward_funcs: [char_match]`` in a YAML config).

``REGISTRY`` holds the plain functions; ``CONFIGURED`` those built from the config by name (``soft_overlong``
takes its L_max from ``max_completion_length``). The reasoning rewards live in ``grpokit.rewards.reasoning``.

Each follows TRL's contract ``f(prompts, completions, completion_ids, **columns) -> list[float | None]``; a
completion is a string (string prompts) or ``[{"role": "assistant", "content": text}]`` (chat prompts).
"""

from __future__ import annotations

from collections.abc import Callable

from grpokit.rewards.reasoning import accuracy, soft_overlong, think_format
from grpokit.rewards.text import completion_text


def char_match(prompts, completions, completion_ids=None, *, target, **_) -> list[float]:
    """Graded string match against the ``target`` column: characters equal position by position, divided by
    the longer of the two lengths. 1.0 only for the exact target; extra or missing characters cost."""
    out = []
    for completion, goal in zip(completions, target):
        text = completion_text(completion)
        hits = sum(a == b for a, b in zip(text, goal))
        out.append(hits / max(len(text), len(goal), 1))
    return out


def exact_match(prompts, completions, completion_ids=None, *, answer, **_) -> list[float]:
    """1.0 when the completion, stripped, equals the ``answer`` column (stripped), else 0.0."""
    return [float(completion_text(c).strip() == str(a).strip()) for c, a in zip(completions, answer)]


def contains_answer(prompts, completions, completion_ids=None, *, answer, **_) -> list[float]:
    """1.0 when the ``answer`` column occurs in the completion, else 0.0."""
    return [float(str(a) in completion_text(c)) for c, a in zip(completions, answer)]


REGISTRY: dict[str, Callable] = {
    "char_match": char_match,
    "exact_match": exact_match,
    "contains_answer": contains_answer,
    "accuracy": accuracy,
    "think_format": think_format,
}

# built-ins whose parameters come from the run's config: name -> factory(max_completion_length) -> reward function
CONFIGURED: dict[str, Callable[[int], Callable]] = {
    "soft_overlong": soft_overlong.from_config,
}
