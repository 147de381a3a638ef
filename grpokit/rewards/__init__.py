"""Reward functions: where they come from (``load_reward_funcs``) and how they are called (``score``).

Contract (TRL's): ``f(prompts, completions, completion_ids, **columns) -> list[float | None]``, one value per
completion, every dataset column but ``prompt`` passed as a keyword list aligned with the completions. ``None``
means "this function does not score this sample"; a sample no function scores gets reward NaN and advantage 0.

A reward function can be given as a callable, a built-in name (``grpokit.rewards.builtin.REGISTRY``, plus
``soft_overlong``, built from ``max_completion_length``), ``"package.module:function"`` or
``"path/to/file.py:function"``. The built-ins are importable from here: ``from grpokit.rewards import accuracy``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpokit.rewards.builtin import (
    CONFIGURED,
    REGISTRY,
    char_match,
    completion_text,
    contains_answer,
    exact_match,
)
from grpokit.rewards.reasoning import accuracy, overlong_penalty, soft_overlong, think_format
from grpokit.util import closest

__all__ = [
    "RewardError", "RewardFunction", "Scores", "load_reward_funcs", "resolve_reward_func", "score", "call_reward",
    "completion_text", "char_match", "exact_match", "contains_answer", "accuracy", "think_format", "soft_overlong",
    "overlong_penalty",
]


class RewardError(ValueError):
    """A reward function failed or broke the contract; the message names the function and the sample."""


@dataclass
class RewardFunction:
    name: str
    """Name used in metrics (``rewards/<name>``) and error messages."""
    func: Callable
    """The callable itself."""


@dataclass
class Scores:
    """Rewards of one rollout, N = prompts_per_step * num_generations completions."""

    rewards: torch.Tensor
    """(N,) float32 weighted sum over functions (None entries skipped); NaN where no function scored."""
    per_func: torch.Tensor
    """(N, F) float32, one column per reward function, NaN where it returned None."""


def load_reward_funcs(specs: Any, *, max_completion_length: int | None = None) -> list[RewardFunction]:
    """One ``RewardFunction`` per spec (a callable, a built-in name, "module:function" or "file.py:function");
    a single spec may be given bare. Metric names are made unique by suffixing ``_2``, ``_3``...
    ``max_completion_length`` builds the config-dependent built-ins named in ``CONFIGURED``."""
    if specs is None or (isinstance(specs, (list, tuple)) and not specs):
        raise ValueError("at least one reward function is needed (reward_funcs)")
    if not isinstance(specs, (list, tuple)):
        specs = [specs]
    funcs, seen = [], {}
    for spec in specs:
        fn = resolve_reward_func(spec, max_completion_length=max_completion_length)
        seen[fn.name] = seen.get(fn.name, 0) + 1
        if seen[fn.name] > 1:
            fn = RewardFunction(f"{fn.name}_{seen[fn.name]}", fn.func)
        funcs.append(fn)
    return funcs


def resolve_reward_func(spec: Any, *, max_completion_length: int | None = None) -> RewardFunction:
    if isinstance(spec, RewardFunction):
        return spec
    if callable(spec):
        name = getattr(spec, "__name__", None) or type(spec).__name__
        return RewardFunction(name, spec)
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a reward function must be a callable or a string, got {spec!r}")
    if ":" not in spec:
        if spec in REGISTRY:
            return RewardFunction(spec, REGISTRY[spec])
        if spec in CONFIGURED:
            if max_completion_length is None:
                raise ValueError(f"reward function {spec!r} by name takes its length from max_completion_length, "
                                 f"which was not given; build it yourself, e.g. {spec}(max_length, cache_length)")
            return RewardFunction(spec, CONFIGURED[spec](max_completion_length))
        names = [*REGISTRY, *CONFIGURED]
        hint = closest(spec, names)
        raise ValueError(f"unknown reward function {spec!r}" + (f"; did you mean {hint!r}?" if hint else "")
                         + f" (built-ins: {', '.join(names)}; or give 'module:function' / 'file.py:function')")
    where, _, attr = spec.rpartition(":")
    module = _import_file(where, spec) if where.endswith(".py") or "/" in where else _import_module(where, spec)
    if not hasattr(module, attr):
        raise ValueError(f"reward function {spec!r}: {where!r} has no attribute {attr!r}")
    func = getattr(module, attr)
    if not callable(func):
        raise ValueError(f"reward function {spec!r} is not callable")
    return RewardFunction(attr, func)


def _import_file(path: str, spec: str):
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"reward function {spec!r}: file {path!r} does not exist")
    name = f"grpokit_reward_{abs(hash(str(file.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ValueError(f"reward function {spec!r}: importing {path!r} failed: {type(e).__name__}: {e}") from e
    return module


def _import_module(name: str, spec: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ValueError(f"reward function {spec!r}: cannot import module {name!r}: {e}") from e


# ----------------------------------------------------------------------------------------------------------


def score(
    funcs: Sequence[RewardFunction],
    weights: Sequence[float] | None,
    prompts: list,
    completions: list,
    completion_ids: list[list[int]],
    columns: dict[str, list],
) -> Scores:
    """Call every reward function on one rollout and combine them (weighted nansum, TRL's
    ``sum_then_normalize``). Raises ``RewardError`` naming the function and sample on any contract breach."""
    n = len(completions)
    weights = [1.0] * len(funcs) if weights is None else list(weights)
    if len(weights) != len(funcs):
        raise ValueError(f"reward_weights has {len(weights)} entries but there are {len(funcs)} reward functions")
    per_func = torch.empty(n, len(funcs), dtype=torch.float32)  # (N, F)
    for j, fn in enumerate(funcs):
        values = call_reward(fn, prompts, completions, completion_ids, columns)
        per_func[:, j] = torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)
    w = torch.tensor(weights, dtype=torch.float32)
    rewards = (per_func * w).nansum(dim=1)  # (N,)
    rewards[torch.isnan(per_func).all(dim=1)] = math.nan  # nobody scored it: excluded from baselines, A = 0
    return Scores(rewards=rewards, per_func=per_func)


def call_reward(fn: RewardFunction, prompts, completions, completion_ids, columns) -> list[float | None]:
    """``fn`` on the whole batch, its output checked: a list of N finite numbers or None."""
    n = len(completions)
    try:
        out = fn.func(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
    except Exception as e:
        index = _first_failing_sample(fn, prompts, completions, completion_ids, columns)
        where = f" on sample {index}" if index is not None else f" (on a batch of {n} completions)"
        hint = ""
        if isinstance(e, TypeError) and "unexpected keyword argument" in str(e):
            hint = " (reward functions receive every dataset column as a keyword argument: add **kwargs)"
        raise RewardError(f"reward function {fn.name!r} raised {type(e).__name__}{where}: {e}{hint}") from e
    if isinstance(out, torch.Tensor):
        out = out.tolist()
    if not isinstance(out, Sequence) and not hasattr(out, "tolist"):
        raise RewardError(f"reward function {fn.name!r} returned {type(out).__name__}; expected a list of "
                          f"{n} floats (or None)")
    out = list(out.tolist() if hasattr(out, "tolist") else out)
    if len(out) != n:
        raise RewardError(f"reward function {fn.name!r} returned {len(out)} rewards for {n} completions; it must "
                          "return exactly one per completion")
    for i, value in enumerate(out):
        if value is None:
            continue
        if not isinstance(value, numbers.Real):
            raise RewardError(f"reward function {fn.name!r} returned {value!r} ({type(value).__name__}) for "
                              f"sample {i}; expected a float or None")
        if not math.isfinite(float(value)):
            raise RewardError(f"reward function {fn.name!r} returned {value} for sample {i}; rewards must be "
                              "finite (return None to leave a sample unscored)")
    return out


def _first_failing_sample(fn: RewardFunction, prompts, completions, completion_ids, columns) -> int | None:
    """After a batch call raised: the first sample on which the function raises alone (None if none does)."""
    for i in range(len(completions)):
        try:
            fn.func(prompts=prompts[i:i + 1], completions=completions[i:i + 1],
                    completion_ids=completion_ids[i:i + 1], **{k: v[i:i + 1] for k, v in columns.items()})
        except Exception:
            return i
    return None
