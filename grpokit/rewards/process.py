"""Process supervision end to end (DeepSeekMath 4.1.3): step rewards from reward functions -> token advantages.

With ``process_supervision: true`` a reward function may score each *step* of a completion. Its contract is
TRL's (``f(prompts, completions, completion_ids, **columns)``, one entry per completion), and each entry is:

* ``None``: the function does not score this completion (no steps);
* a number ``r``: one step that ends at the end of the completion (an outcome reward);
* ``{"steps": [r1, r2, ...], "ends": [c1, c2, ...]}``: step j has reward ``rj`` and ends at character ``cj``
  of the completion text, i.e. the step is the text up to ``text[:cj]`` (an exclusive end, Python's slice
  end: 0 <= cj <= len(text));
* ``[(r1, c1), (r2, c2), ...]``: the same as (reward, char_end) pairs;
* ``[r1, r2, ...]``, plain numbers: needs ``step_delimiter``. The text is cut after each delimiter
  (``split_steps``: the delimiter belongs to the step it closes; text after the last delimiter is a last
  step; an empty remainder is not a step) and ``rj`` is the reward of segment j. There must be exactly one
  reward per segment; call ``split_steps(text, delimiter)`` in the reward function to cut the same way.

The steps of every function are pooled (each reward times the function's ``reward_weights`` entry). A step
that ends at the end of the text ends at the completion's last token, EOS included, so an outcome-style
step also credits the stop; otherwise the character end maps to the token whose decoded prefix first reaches
it (``token_step_ends``, by decoding prefixes, which works for any tokenizer and needs no offsets).

``process_advantages`` then normalises all step rewards of a group by their mean and std, and token t gets
the sum of the normalised rewards of the steps ending at or after t: (N, C) advantages for ``grpo_loss``.
A completion's scalar ``reward`` (logged, and used by dynamic sampling's "all equal" test through its steps)
is the sum of its step rewards.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from grpokit.advantages import process_advantages
from grpokit.rewards import RewardError, RewardFunction, RewardRunner, call_rewards


@dataclass
class StepScores:
    """Step rewards of one rollout, N completions. Has ``rewards`` and ``per_func`` like ``rewards.Scores``."""

    rewards: torch.Tensor
    """(N,) float32 sum of each completion's (weighted) step rewards; NaN where no function scored it."""
    per_func: torch.Tensor
    """(N, F) float32, the sum of one function's step rewards (unweighted); NaN where it returned None."""
    step_rewards: list[list[float]]
    """N lists: the weighted reward of every step of the completion, all functions pooled."""
    char_ends: list[list[int]]
    """N lists aligned with ``step_rewards``: the exclusive character end of each step in the text."""
    failures: torch.Tensor | None = None
    """(N, F) int8 failure codes, as ``rewards.Scores.failures``."""

    def __post_init__(self) -> None:
        if self.failures is None:
            self.failures = torch.zeros(self.per_func.shape, dtype=torch.int8)

    def values(self) -> list[list[float]]:
        """What a group's 'all rewards equal' test looks at: each completion's step rewards."""
        return self.step_rewards


def split_steps(text: str, delimiter: str) -> list[tuple[str, int]]:
    """``text`` cut after each ``delimiter``: [(step text, exclusive char end)], delimiters kept with the step
    they close; a non-empty remainder after the last delimiter is a last step. ``"a;b;c"`` ->
    ``[("a;", 2), ("b;", 4), ("c", 5)]``; ``"a;b;"`` -> ``[("a;", 2), ("b;", 4)]``."""
    if not delimiter:
        raise ValueError("step_delimiter must be a non-empty string")
    steps, start = [], 0
    while True:
        found = text.find(delimiter, start)
        if found < 0:
            break
        end = found + len(delimiter)
        steps.append((text[start:end], end))
        start = end
    if start < len(text):
        steps.append((text[start:], len(text)))
    return steps


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def parse_steps(value, text: str, delimiter: str | None, where: str) -> tuple[list[float], list[int]]:
    """One reward-function entry (see the module docstring) -> (step rewards, exclusive char ends)."""
    if value is None:
        return [], []
    if _is_number(value):
        rewards, ends = [float(value)], [len(text)]
    elif isinstance(value, dict):
        if set(value) != {"steps", "ends"}:
            raise RewardError(f"{where}: a step dict needs exactly the keys 'steps' and 'ends', got {sorted(value)}")
        rewards, ends = list(value["steps"]), list(value["ends"])
        if len(rewards) != len(ends):
            raise RewardError(f"{where}: {len(rewards)} step rewards but {len(ends)} step ends")
    elif isinstance(value, Sequence) and not isinstance(value, str):
        value = list(value)
        if all(_is_number(v) for v in value):
            if delimiter is None:
                raise RewardError(f"{where}: a list of plain step rewards needs step_delimiter to know where each "
                                  "step ends; set step_delimiter, or return (reward, char_end) pairs or "
                                  "{'steps': [...], 'ends': [...]}")
            steps = split_steps(text, delimiter)
            if len(value) != len(steps):
                raise RewardError(f"{where}: {len(value)} step rewards for {len(steps)} steps of the text cut at "
                                  f"step_delimiter {delimiter!r}; return one per step "
                                  "(grpokit.rewards.process.split_steps cuts the text the same way)")
            rewards, ends = value, [end for _, end in steps]
        elif all(isinstance(v, Sequence) and not isinstance(v, str) and len(v) == 2 for v in value):
            rewards, ends = [v[0] for v in value], [v[1] for v in value]
        else:
            raise RewardError(f"{where}: a list must hold only step rewards or only (reward, char_end) pairs")
    else:
        raise RewardError(f"{where}: got {type(value).__name__}; expected None, a number, a list of step rewards, "
                          "(reward, char_end) pairs or {'steps': [...], 'ends': [...]}")
    for r in rewards:
        if not _is_number(r) or not math.isfinite(float(r)):
            raise RewardError(f"{where}: step reward {r!r} is not a finite number")
    for e in ends:
        if isinstance(e, bool) or not isinstance(e, numbers.Integral) or not 0 <= int(e) <= len(text):
            raise RewardError(f"{where}: step end {e!r} must be an integer character position in "
                              f"[0, {len(text)}] (the completion text has {len(text)} characters)")
    return [float(r) for r in rewards], [int(e) for e in ends]


def score_steps(funcs: Sequence[RewardFunction], weights: Sequence[float] | None, prompts: list, completions: list,
                completion_ids: list[list[int]], columns: dict[str, list], texts: list[str],
                delimiter: str | None, *, runner: RewardRunner | None = None,
                rows: Sequence[int] | None = None) -> StepScores:
    """Call every reward function on one rollout and pool their steps (see the module docstring). ``runner``
    and ``rows`` as in ``grpokit.rewards.score``: a failed call's sample has no steps, under
    ``reward_on_error: none``."""
    n = len(completions)
    weights = [1.0] * len(funcs) if weights is None else list(weights)
    per_func = torch.full((n, len(funcs)), math.nan, dtype=torch.float32)  # (N, F)
    step_rewards: list[list[float]] = [[] for _ in range(n)]
    char_ends: list[list[int]] = [[] for _ in range(n)]
    outputs, failures = call_rewards(funcs, prompts, completions, completion_ids, columns, runner=runner, rows=rows,
                                     unit="entries")
    for j, (fn, out) in enumerate(zip(funcs, outputs)):
        for i, value in enumerate(out):
            row = f" (dataset row {rows[i]})" if rows is not None else ""
            where = f"reward function {fn.name!r}, sample {i}{row}"
            rewards, ends = parse_steps(value, texts[i], delimiter, where)
            if value is not None:
                per_func[i, j] = sum(rewards)
            step_rewards[i] += [weights[j] * r for r in rewards]
            char_ends[i] += ends
    totals = torch.tensor([sum(r) if r else math.nan for r in step_rewards], dtype=torch.float32)
    scored = ~torch.isnan(per_func).all(dim=1)
    totals = torch.where(scored, torch.nan_to_num(totals), torch.full_like(totals, math.nan))
    return StepScores(rewards=totals, per_func=per_func, step_rewards=step_rewards, char_ends=char_ends,
                      failures=failures)


def token_step_ends(tokenizer, completion_ids: list[list[int]], texts: list[str],
                    char_ends: list[list[int]]) -> list[list[int]]:
    """Character ends -> token indices: a step ending at the end of the text ends at the last token (EOS
    included); any other end ``c`` at the first token t whose decoded prefix ``ids[:t + 1]`` has >= c
    characters (binary search over prefixes, decoded as the completion text was: special tokens skipped)."""
    out = []
    for ids, text, ends in zip(completion_ids, texts, char_ends):
        last = max(len(ids) - 1, 0)
        cache: dict[int, int] = {}

        def prefix_chars(t: int, ids=ids, cache=cache) -> int:
            if t not in cache:
                cache[t] = len(tokenizer.decode(ids[: t + 1], skip_special_tokens=True))
            return cache[t]

        row = []
        for c in ends:
            if c >= len(text):
                row.append(last)
                continue
            lo, hi = 0, last  # smallest t in [0, last] with prefix_chars(t) >= c
            while lo < hi:
                mid = (lo + hi) // 2
                if prefix_chars(mid) >= c:
                    hi = mid
                else:
                    lo = mid + 1
            row.append(lo)
        out.append(row)
    return out


def step_advantages(scores: StepScores, tokenizer, completion_ids: list[list[int]], texts: list[str],
                    group_size: int, seq_len: int) -> torch.Tensor:
    """(N, C) process-supervised token advantages (DeepSeekMath 4.1.3) of a scored rollout."""
    ends = token_step_ends(tokenizer, completion_ids, texts, scores.char_ends)
    return process_advantages(scores.step_rewards, ends, group_size, seq_len)
