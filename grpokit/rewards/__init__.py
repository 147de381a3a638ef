"""Reward functions: where they come from (``load_reward_funcs``) and how they are called (``score``).

Contract (TRL's): ``f(prompts, completions, completion_ids, **columns) -> list[float | None]``, one value per
completion, every dataset column but ``prompt`` passed as a keyword list aligned with the completions. ``None``
means "this function does not score this sample"; a sample no function scores gets reward NaN and advantage 0.

A reward function can be given as a callable, a built-in name (``grpokit.rewards.builtin.REGISTRY``, plus
``soft_overlong``, built from ``max_completion_length``), ``"package.module:function"`` or
``"path/to/file.py:function"``. The built-ins are importable from here: ``from grpokit.rewards import accuracy``.

How the functions are called (a per-call timeout, ``async def`` functions, what a failing call does) is
``grpokit.rewards.runner``'s business: ``score`` takes a ``RewardRunner``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
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
    contains_answer,
    exact_match,
)
from grpokit.rewards.reasoning import accuracy, overlong_penalty, soft_overlong, think_format
from grpokit.rewards.runner import ERROR, TIMEOUT, Failure, RewardRunner
from grpokit.rewards.text import completion_text
from grpokit.util import closest

__all__ = [
    "RewardError", "RewardFunction", "RewardRunner", "Scores", "load_reward_funcs", "resolve_reward_func", "score",
    "call_reward", "call_rewards", "failure_metrics",
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
    source: str | None = None
    """``"path/file.py:function"`` when loaded from a file: how a worker process loads it again
    (``grpokit.rewards.runner``)."""


@dataclass
class Scores:
    """Rewards of one rollout, N = prompts_per_step * num_generations completions."""

    rewards: torch.Tensor
    """(N,) float32 weighted sum over functions (None entries skipped); NaN where no function scored."""
    per_func: torch.Tensor
    """(N, F) float32, one column per reward function, NaN where it returned None."""
    failures: torch.Tensor | None = None
    """(N, F) int8: 0 where the function's call gave a value (or None), ``runner.ERROR`` where it raised or
    returned a non-finite number, ``runner.TIMEOUT`` where it timed out (with ``reward_on_error: none``; those
    entries are NaN in ``per_func``). ``None`` is read as all 0."""

    def __post_init__(self) -> None:
        if self.failures is None:
            self.failures = torch.zeros(self.per_func.shape, dtype=torch.int8)


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
            fn = dataclasses.replace(fn, name=f"{fn.name}_{seen[fn.name]}")
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
    return RewardFunction(attr, func, source=spec if module.__name__.startswith("grpokit_reward_") else None)


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


DEFAULT_RUNNER = RewardRunner()
"""Direct calls, no timeout, ``reward_on_error: raise`` (and an event loop for async functions)."""


def score(
    funcs: Sequence[RewardFunction],
    weights: Sequence[float] | None,
    prompts: list,
    completions: list,
    completion_ids: list[list[int]],
    columns: dict[str, list],
    *,
    runner: RewardRunner | None = None,
    rows: Sequence[int] | None = None,
) -> Scores:
    """Call every reward function on one rollout and combine them (weighted nansum, TRL's
    ``sum_then_normalize``). ``runner`` says how the functions are called and what a failure does
    (``grpokit.rewards.runner``; default: directly, failures raise); ``rows``, the dataset row of each sample,
    is named in errors. Raises ``RewardError`` naming the function and sample on any contract breach."""
    n = len(completions)
    weights = [1.0] * len(funcs) if weights is None else list(weights)
    if len(weights) != len(funcs):
        raise ValueError(f"reward_weights has {len(weights)} entries but there are {len(funcs)} reward functions")
    values, failures = call_rewards(funcs, prompts, completions, completion_ids, columns, runner=runner, rows=rows,
                                    check=_finite_number)
    per_func = torch.empty(n, len(funcs), dtype=torch.float32)  # (N, F)
    for j, column in enumerate(values):
        per_func[:, j] = torch.tensor([math.nan if v is None else float(v) for v in column], dtype=torch.float32)
    w = torch.tensor(weights, dtype=torch.float32)
    rewards = (per_func * w).nansum(dim=1)  # (N,)
    rewards[torch.isnan(per_func).all(dim=1)] = math.nan  # nobody scored it: excluded from baselines, A = 0
    return Scores(rewards=rewards, per_func=per_func, failures=failures)


def call_rewards(funcs: Sequence[RewardFunction], prompts, completions, completion_ids, columns, *,
                 runner: RewardRunner | None = None, rows: Sequence[int] | None = None, unit: str = "rewards",
                 check: Callable | None = None) -> tuple[list[list], torch.Tensor]:
    """Every function on the batch (``runner.call``); a function whose batch call failed is called again per
    sample (``runner.call_each``). Returns, per function, its N entries (``None`` where it failed, under
    ``reward_on_error: none``), and the (N, F) int8 failure codes. ``check(fn, value, i)`` vets an entry: it
    returns the value, raises ``RewardError`` (a contract breach) or returns a ``Failure`` (e.g. a non-finite
    number). ``unit`` names the entries in the length error."""
    runner = runner if runner is not None else DEFAULT_RUNNER
    n = len(completions)
    kwargs = dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
    failures = torch.zeros(n, len(funcs), dtype=torch.int8)  # (N, F)
    values = []
    for j, (fn, out) in enumerate(zip(funcs, runner.call(funcs, kwargs))):
        entries = _per_sample(fn, out, runner, kwargs, n, unit) if isinstance(out, Failure) else \
            _entries(fn, out, n, unit)
        column = []
        for i, value in enumerate(entries):
            if check is not None and not isinstance(value, Failure):
                value = check(fn, value, _sample(i, rows))
            if isinstance(value, Failure):
                if runner.on_error == "raise":
                    raise RewardError(_message(fn, value, _sample(i, rows))) from value.exception
                failures[i, j], value = value.code, None
            column.append(value)
        values.append(column)
    return values, failures


def call_reward(fn: RewardFunction, prompts, completions, completion_ids, columns) -> list[float | None]:
    """``fn`` on the whole batch, its output checked: a list of N finite numbers or None."""
    values, _ = call_rewards([fn], prompts, completions, completion_ids, columns, check=_finite_number)
    return values[0]


def failure_metrics(failures: torch.Tensor | None, funcs: Sequence[RewardFunction]) -> dict[str, float]:
    """``rewards/<name>/errors`` and ``rewards/<name>/timeouts``: the samples of a rollout each function failed
    on (``Scores.failures``, (N, F)), scored None under ``reward_on_error: none``."""
    metrics = {}
    for j, fn in enumerate(funcs):
        column = failures[:, j] if failures is not None else torch.zeros(0)
        metrics[f"rewards/{fn.name}/errors"] = float((column == ERROR).sum())
        metrics[f"rewards/{fn.name}/timeouts"] = float((column == TIMEOUT).sum())
    return metrics


def _sample(i: int, rows: Sequence[int] | None) -> str:
    return f"sample {i}" + (f" (dataset row {rows[i]})" if rows is not None else "")


def _message(fn: RewardFunction, failure: Failure, where: str) -> str:
    """One line: the function, what happened, on which sample, and the exception's text and place."""
    name = f"reward function {fn.name!r}"
    if failure.code == TIMEOUT:
        return f"{name} {failure.detail} on {where} (reward_timeout_s)"
    if not failure.error_type:  # a value it returned (a non-finite number)
        return (f"{name} {failure.detail} for {where}; rewards must be finite (return None to leave a sample "
                "unscored, or set reward_on_error: none)")
    text = f"{name} raised {failure.error_type} on {where}"
    if failure.detail:
        text += f": {failure.detail}"
    if failure.where:
        text += f" (at {failure.where})"
    if failure.error_type == "TypeError" and "unexpected keyword argument" in failure.detail:
        text += " (reward functions receive every dataset column as a keyword argument: add **kwargs)"
    return text


def _entries(fn: RewardFunction, out: Any, n: int, unit: str) -> list:
    """A function's output as a list of ``n`` entries (a tensor or array is turned into one), else a
    ``RewardError``."""
    if isinstance(out, torch.Tensor) or (hasattr(out, "tolist") and not isinstance(out, (list, tuple))):
        out = out.tolist()
    if not isinstance(out, Sequence) or isinstance(out, str):
        raise RewardError(f"reward function {fn.name!r} returned {type(out).__name__}; expected a list of "
                          f"{n} {unit} (or None)" + (" (an async function must be declared async def)"
                                                       if inspect.isawaitable(out) else ""))
    out = list(out)
    if len(out) != n:
        raise RewardError(f"reward function {fn.name!r} returned {len(out)} {unit} for {n} completions; it must "
                          "return exactly one per completion")
    return out


def _per_sample(fn: RewardFunction, batch: Failure, runner: RewardRunner, kwargs: dict, n: int, unit: str) -> list:
    """After the batch call failed: each sample alone. ``raise`` stops at the first failing sample; if none
    fails alone, ``raise`` names the batch call, ``none`` uses the samples' values."""
    each = runner.call_each(fn, kwargs, n, stop_at_first=runner.on_error == "raise")
    entries = [out if isinstance(out, Failure) or out is None else _entries(fn, out, 1, unit)[0] for out in each]
    if runner.on_error == "raise" and not any(isinstance(e, Failure) for e in entries):
        raise RewardError(_message(fn, batch, f"a batch of {n} completions").replace(
            " (reward_timeout_s)", " (each sample alone finished in time: reward_timeout_s bounds one call of the "
                                   "function, over the whole batch)")) from batch.exception
    return entries


def _finite_number(fn: RewardFunction, value: Any, where: str) -> Any:
    """``None`` or a finite real number; a non-finite one is a ``Failure`` (``reward_on_error`` decides), any
    other value a ``RewardError``."""
    if value is None:
        return None
    if not isinstance(value, numbers.Real):
        raise RewardError(f"reward function {fn.name!r} returned {value!r} ({type(value).__name__}) for {where}; "
                          "expected a float or None")
    if not math.isfinite(float(value)):
        return Failure(ERROR, f"returned {value}")
    return value
