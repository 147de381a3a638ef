"""A synthetic multi-step task with verifiable steps, for process supervision on the tiny local models.

The user says a letter; the answer counts on from it in ``steps`` steps, each a letter and the delimiter
``;``: "c" -> "c;d;e;". Step j is right when the j-th ``;``-delimited segment of the completion is exactly
the j-th target step. Two reward functions see the same verifier:

* ``count_steps``: per-step rewards (``process_supervision: true``, ``step_delimiter: ";"``), one entry per
  ``;``-delimited segment of the completion: the segment scored position by position against its target step,
  over ``steps`` (an extra segment scores 0); ``count_outcome``: their sum, one number per completion;
* ``count_fixed_steps``: the completion cut at the target steps' character positions instead (always
  ``steps`` steps, as (reward, char_end) pairs; no delimiter needed); ``count_fixed_outcome``: their sum.

Each pair reports the same ``reward`` (the share of right steps) and differs only in how credit reaches the
tokens: that is what ``benchmarks/process_vs_outcome.py`` compares.

    reward_funcs: ["grpokit.tasks.steps:count_steps"]     # or count_outcome, count_fixed_steps, ...
"""

from __future__ import annotations

from grpokit.rewards.process import split_steps
from grpokit.rewards.text import completion_text

DELIMITER = ";"
LETTERS = "abcdef"
STEPS = 3


def counting_task(letters: str = LETTERS, *, steps: int = STEPS, copies: int = 10, count: bool = True) -> list[dict]:
    """Rows ``{"prompt": [{"role": "user", "content": "c"}], "target": "c;d;e;"}``, ``copies`` per letter."""
    rows = []
    for c in letters:
        target = "".join((chr(ord(c) + j) if count else c) + DELIMITER for j in range(steps))
        rows += [{"prompt": [{"role": "user", "content": c}], "target": target} for _ in range(copies)]
    return rows


def _step_scores(text: str, target: str) -> list[float]:
    want = [s for s, _ in split_steps(target, DELIMITER)]
    got = [s for s, _ in split_steps(text, DELIMITER)]
    return [_match(s, want[j]) / len(want) if j < len(want) else 0.0 for j, s in enumerate(got)]


def _match(step: str, want: str) -> float:
    """Characters equal position by position over the longer length: 1 only for the exact step."""
    return sum(a == b for a, b in zip(step, want)) / max(len(step), len(want), 1)


def count_steps(prompts, completions, completion_ids=None, *, target, **_) -> list[list[float]]:
    """Process reward: per ``;``-delimited segment, 1/steps if it is the right step, else 0."""
    return [_step_scores(completion_text(c), t) for c, t in zip(completions, target)]


def count_outcome(prompts, completions, completion_ids=None, *, target, **_) -> list[float]:
    """Outcome reward: the share of right steps (the sum of ``count_steps``)."""
    return [sum(_step_scores(completion_text(c), t)) for c, t in zip(completions, target)]


def count_fixed_steps(prompts, completions, completion_ids=None, *, target, **_) -> list[list[tuple[float, int]]]:
    """Process reward with a fixed number of steps: step j is the completion's characters at the target step's
    positions (``"c;"`` at 0-1, 2-3, ...), scored position by position, as (reward, char_end) pairs (no
    delimiter needed). Every completion has exactly ``steps`` steps, so none is charged for having more."""
    out = []
    for c, t in zip(completions, target):
        text, start, pairs = completion_text(c), 0, []
        want = split_steps(t, DELIMITER)
        for step, end in want:
            pairs.append((_match(text[start:end], step) / len(want), min(end, len(text))))
            start = end
        out.append(pairs)
    return out


def count_fixed_outcome(prompts, completions, completion_ids=None, *, target, **_) -> list[float]:
    """Outcome twin of ``count_fixed_steps``: the sum of its step rewards, one number per completion."""
    return [sum(r for r, _ in steps) for steps in count_fixed_steps(prompts, completions, target=target)]
