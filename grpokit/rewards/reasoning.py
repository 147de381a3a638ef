"""Rewards for reasoning tasks: answer correctness (math-verify), the ``<think>`` format, DAPO's overlong penalty.

All follow the reward contract of ``grpokit.rewards`` (TRL's): ``f(prompts, completions, completion_ids,
**columns) -> list[float | None]``, where a completion is a string or ``[{"role": "assistant", "content": ...}]``.

* ``accuracy``       1.0 / 0.0: the completion's final answer equals the ``solution`` column (math-verify);
                     None when the solution itself cannot be parsed (the sample is left out, as TRL).
* ``think_format``   1.0 / 0.0: ``<think>reasoning</think>`` then an answer, nothing else.
* ``soft_overlong``  DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), a function of the length only:
                     ``soft_overlong(max_length, cache_length)`` builds one; by name in a YAML config it uses
                     ``max_length = max_completion_length`` and ``cache_length = max_length // 5`` (DAPO's
                     ratio, 4096 of 20480).
"""

from __future__ import annotations

import logging
import re
import threading

from grpokit.rewards.text import completion_text


def accuracy(prompts, completions, completion_ids=None, *, solution, **_) -> list[float | None]:
    """1.0 when the completion's answer is mathematically equal to the ``solution`` column, else 0.0; None
    when the solution does not parse (no function scores that sample, so it gets no advantage).

    Same rules as TRL's ``accuracy_reward``: the solution is parsed leniently (``"3"``, ``"$\\frac{3}{4}$"``,
    ``"0.75"``), the completion strictly, as LaTeX: the first ``\\boxed{...}``, or a ``$...$`` expression
    after an anchor such as "the answer is". A bare ``3`` or ``x = 3/4`` in plain text scores 0.0. Equality is
    math-verify's ``verify(gold, answer)`` (``\\boxed{0.75}`` matches ``\\frac{3}{4}``)."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse, verify

    # math-verify times out with signal.alarm, which only the main thread may use
    main = threading.current_thread() is threading.main_thread()
    parse_timeout, verify_timeout = (10, 5) if main else (None, None)
    if not main:
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).setLevel(logging.ERROR)
    answer_config = [LatexExtractionConfig(normalization_config=NormalizationConfig(units=True),
                                           boxed_match_priority=0, try_extract_without_anchor=False)]
    rewards: list[float | None] = []
    for completion, gold_text in zip(completions, solution):
        gold = parse(str(gold_text), parsing_timeout=parse_timeout)
        if not gold:
            rewards.append(None)
            continue
        answer = parse(completion_text(completion), extraction_config=answer_config, extraction_mode="first_match",
                       parsing_timeout=parse_timeout)
        rewards.append(float(verify(gold, answer, timeout_seconds=verify_timeout)))
    return rewards


_NO_TAG = r"(?:(?!</?think>).)*"  # any text without a <think> or </think> tag
THINK_FORMAT = re.compile(rf"\s*<think>({_NO_TAG})</think>({_NO_TAG})", re.DOTALL)


def think_format(prompts, completions, completion_ids=None, **_) -> list[float]:
    """1.0 when the completion is ``<think>reasoning</think>`` followed by an answer, else 0.0.

    Both the reasoning and the answer must hold some non-blank text, and there is exactly one think block,
    at the start (leading whitespace allowed). Chat templates that open ``<think>`` in the prompt (so the
    completion starts inside the block) need their own variant."""
    out = []
    for completion in completions:
        match = THINK_FORMAT.fullmatch(completion_text(completion))
        out.append(float(match is not None and bool(match.group(1).strip()) and bool(match.group(2).strip())))
    return out


class soft_overlong:  # noqa: N801 - used like a function: soft_overlong(4096, 512) is a reward function
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13) of a completion of |y| tokens:

        0                                   |y| <= L_max - L_cache
        ((L_max - L_cache) - |y|) / L_cache  L_max - L_cache < |y| <= L_max     (linear, down to -1)
        -1                                  |y| > L_max

    ``max_length`` is L_max (usually ``max_completion_length``), ``cache_length`` L_cache. |y| counts the
    completion's tokens (``completion_ids``, the EOS included), so a completion cut at ``max_completion_length``
    gets -1. Add it to a correctness reward; alone it only says "shorter"."""

    __name__ = "soft_overlong"

    def __init__(self, max_length: int, cache_length: int):
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"soft_overlong: max_length must be an integer >= 1, got {max_length!r}")
        if isinstance(cache_length, bool) or not isinstance(cache_length, int) or not 0 < cache_length <= max_length:
            raise ValueError(f"soft_overlong: cache_length must be an integer in [1, max_length={max_length}], "
                             f"got {cache_length!r}")
        self.max_length, self.cache_length = max_length, cache_length

    def __call__(self, prompts=None, completions=None, completion_ids=None, **_) -> list[float]:
        if completion_ids is None:
            raise ValueError("soft_overlong needs completion_ids (token lengths)")
        return [overlong_penalty(len(ids), self.max_length, self.cache_length) for ids in completion_ids]

    def __repr__(self) -> str:
        return f"soft_overlong(max_length={self.max_length}, cache_length={self.cache_length})"

    @classmethod
    def from_config(cls, max_completion_length: int) -> soft_overlong:
        """The by-name default: L_max = ``max_completion_length``, L_cache = L_max // 5 (at least 1)."""
        return cls(max_completion_length, max(1, max_completion_length // 5))


def overlong_penalty(length: int, max_length: int, cache_length: int) -> float:
    """DAPO eq. 13 for one completion of ``length`` tokens (see ``soft_overlong``)."""
    start = max_length - cache_length
    if length <= start:
        return 0.0
    if length <= max_length:
        return (start - length) / cache_length
    return -1.0
