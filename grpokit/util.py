"""Helpers shared by every layer: input checks that name the culprit, and small conversions.

A leaf module: it imports nothing from grpokit, so any module may use it without creating a cycle.
"""

from __future__ import annotations

import ctypes
import difflib
import functools
import math
import random
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The valid name closest to a misspelt one (difflib), or None when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return match[0] if match else None


def check_keys(data: dict[str, Any], valid: Iterable[str], *, what: str = "config key",
               hint: str = "see `grpokit train --help` for the fields") -> None:
    """ValueError for the first key of ``data`` not in ``valid``, suggesting the closest valid one."""
    valid = list(valid)
    for key in data:
        if key not in valid:
            near = closest(str(key), valid)
            suggestion = f"; did you mean {near!r}?" if near else f"; {hint}"
            raise ValueError(f"unknown {what} {key!r}{suggestion}")


def check_int(name: str, value: object, *, low: int, why: str = "") -> None:
    """ValueError unless ``value`` is an integer (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        extra = f" ({why})" if why else ""
        raise ValueError(f"{name} must be an integer >= {low}{extra}, got {value!r}")


def check_real(name: str, value: object, *, low: float, strict: bool = False) -> None:
    """ValueError unless ``value`` is a finite number >= ``low`` (> with ``strict``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    ok = ok and abs(value) != float("inf") and (value > low if strict else value >= low)
    if not ok:
        bound = "" if low == float("-inf") else f" {'>' if strict else '>='} {low}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")


def check_choice(name: str, value: object, choices: Iterable[str]) -> None:
    """ValueError unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def check_bool(name: str, value: object) -> None:
    """ValueError unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def nan_to_none(value) -> float | None:
    """A float (or 0-d tensor) as a JSON-friendly number: NaN becomes ``None``."""
    value = float(value)
    return None if math.isnan(value) else value


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or ``None`` (another C library, another system)."""
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # musl and other C libraries have none
        return None


TRIM_EVERY_BYTES = 256 * 2**20


def release_during_backward(params: Iterable[torch.Tensor], every_bytes: int = TRIM_EVERY_BYTES) -> list:
    """Hooks that call ``release_freed_memory`` during each backward, whenever gradients of ``every_bytes``
    more have been accumulated into ``params`` (CPU tensors; none elsewhere, or without glibc); returns
    their handles. In a backward, blocks freed by one layer (its saved bf16 weights, its bf16 gradients) are
    too small for the next layer's float32 gradients, so without this they stay resident beside them until
    the backward ends."""
    params = [p for p in params if p.requires_grad and p.device.type == "cpu"]
    if _malloc_trim() is None or not params:
        return []
    since = [0]

    def hook(param: torch.Tensor) -> None:
        since[0] += param.numel() * param.element_size()
        if since[0] >= every_bytes:
            since[0] = 0
            release_freed_memory()

    return [p.register_post_accumulate_grad_hook(hook) for p in params]


def release_freed_memory() -> None:
    """Hand the pages of freed CPU tensors back to the system. glibc keeps the blocks of freed allocations below
    its mmap threshold (up to 32 MB: a layer's weights, a micro-batch's activations) for reuse, where they still
    count in the process's resident memory; the next phase's allocations, of other sizes, then grow the heap
    beyond them. ``malloc_trim(0)`` returns every free page; elsewhere this does nothing."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
