"""How reward functions are called: a per-call timeout, ``async def`` functions, and what a failing call does.

``RewardRunner.call`` runs every reward function of a rollout over the whole batch, the functions concurrently:

* an ``async def`` function (TRL accepts them too) runs on one event loop in a daemon thread, every async
  function of the rollout at once, each under ``asyncio.wait_for(..., reward_timeout_s)``. A coroutine that
  blocks the loop (a synchronous ``time.sleep`` inside it) cannot be cancelled: after the timeout and a grace
  second the run stops waiting for it, counts a timeout and starts a new loop for the next calls.
* with ``reward_timeout_s`` set, a plain module-level function (importable as ``module.name``, or loaded from
  ``"file.py:function"``) runs in a worker process of a ``pebble.ProcessPool`` (``forkserver`` start where
  the platform has it, else ``spawn``). A call that overruns has its worker stopped (SIGTERM, then SIGKILL
  three seconds later) and replaced, so a pure-Python verifier that ignores signals, or is stuck in C code,
  is stopped all the same. The function and its arguments travel by pickle: its module is imported in the
  worker, module-level state is the worker's own, and a script that defines reward functions must guard its
  entry point with ``if __name__ == "__main__":`` (as any program using ``multiprocessing``' ``spawn``).
* anything else under a timeout (a lambda, a closure, a callable object such as a learned reward, a function
  defined in ``__main__``) runs in a daemon thread of this process: the run stops waiting for it after the
  timeout, but Python cannot stop a thread, which keeps its CPU and memory until the function returns. Move
  such a function to a module (or a ``file.py``) to have it killed instead.
* without a timeout, a plain function runs in this process, as a direct call (the default).

When the call over the whole batch fails (it raised, timed out, or its worker died), the function is called
on each sample alone, concurrently, each call under the timeout and all of them within ``RETRY_BUDGET`` (2)
timeouts, to find the samples it fails on.
``reward_on_error``: ``raise`` stops with a ``RewardError`` naming the function, the sample (and its dataset
row) and the exception; ``none`` scores those samples ``None`` (like a function that does not score them) and
counts them (``rewards/<name>/errors``, ``rewards/<name>/timeouts``). If every sample succeeds alone, their
values are used under ``none``, and ``raise`` names the batch call that failed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import inspect
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ON_ERROR = ("raise", "none")
"""``reward_on_error`` values."""
ERROR, TIMEOUT = 1, 2
"""Codes of a failed sample in ``Scores.failures``: the function raised (or returned a non-finite number) /
its call timed out."""
ASYNC_GRACE_S = 1.0
"""How long past the timeout a blocked event loop is waited for before it is abandoned."""
RETRY_BUDGET = 2.0
"""The calls of one function on each sample alone, after its batch call failed, share ``RETRY_BUDGET *
reward_timeout_s`` seconds: with more samples than workers a call may queue, and a function that hangs on
every sample would otherwise hold a rollout for samples / workers timeouts."""


@dataclass(frozen=True)
class Failure:
    """A call of a reward function that returned nothing usable."""

    code: int
    """``ERROR`` or ``TIMEOUT``."""
    detail: str
    """What happened: the exception's message (``division by zero``), ``timed out after 2 s``, or for a value
    it returned, ``returned inf``."""
    error_type: str = ""
    """The exception's class name (``ERROR`` raised by the function; empty for a value it returned)."""
    where: str = ""
    """``file.py:line`` of the innermost frame of the exception, when known."""
    exception: BaseException | None = field(default=None, compare=False, repr=False)
    """The exception itself when it was raised in this process (a worker's stays there): the cause of the
    ``RewardError``, so that ``--debug`` shows its traceback."""


class RewardRunner:
    """Calls reward functions as ``reward_timeout_s`` and ``reward_on_error`` say (module docstring). Holds a
    worker pool and an event loop, both started on first use; ``close()`` stops them."""

    def __init__(self, timeout_s: float | None = None, on_error: str = "raise", max_workers: int | None = None):
        if timeout_s is not None and not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise ValueError(f"reward_timeout_s must be a number > 0 or null, got {timeout_s!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"reward_on_error must be one of {', '.join(ON_ERROR)}; got {on_error!r}")
        self.timeout_s, self.on_error = timeout_s, on_error
        self.max_workers = max_workers or max(1, min(4, os.cpu_count() or 1))
        self._pool = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- the calls -----------------------------------------------------------------------------------------

    def call(self, funcs: Sequence, kwargs: dict[str, Any]) -> list[Any]:
        """Each function of ``funcs`` (``RewardFunction``) on the whole batch ``kwargs`` (TRL's keyword
        arguments), concurrently: its output, or a ``Failure``."""
        if self._pool is None and any(self.mode(fn) == "process" for fn in funcs):
            self.pool(preload=[process_ref(fn).__module__ for fn in funcs if self.mode(fn) == "process"
                               and not isinstance(process_ref(fn), FileFunction)])
        pending: list[Callable[[float | None], Any] | None] = [None] * len(funcs)
        direct = []
        for j, fn in enumerate(funcs):  # everything that runs in the background first, then the direct calls
            if self.mode(fn) == "direct":
                direct.append(j)
            else:
                pending[j] = self.submit(fn, kwargs)
        for j in direct:
            pending[j] = self.submit(fn=funcs[j], kwargs=kwargs)
        return [wait(None) for wait in pending]

    def call_each(self, fn, kwargs: dict[str, Any], n: int, *, stop_at_first: bool = False) -> list[Any]:
        """``fn`` on each of the ``n`` samples alone (concurrently unless it runs as a direct call), all within
        ``RETRY_BUDGET * reward_timeout_s``: per sample its output (a list of one entry) or a ``Failure``.
        ``stop_at_first``: direct calls stop after the first failure (the rest are ``None``)."""
        one = lambda i: {k: v[i:i + 1] for k, v in kwargs.items()}
        if self.mode(fn) != "direct":
            deadline = None if self.timeout_s is None else time.monotonic() + RETRY_BUDGET * self.timeout_s
            waits = [self.submit(fn, one(i)) for i in range(n)]
            return [wait(deadline) for wait in waits]
        out: list[Any] = [None] * n
        for i in range(n):
            out[i] = self.submit(fn, one(i))(None)
            if stop_at_first and isinstance(out[i], Failure):
                break
        return out

    def mode(self, fn) -> str:
        """Where ``fn`` runs: ``async`` (the event loop), ``process`` (a worker process; with a timeout),
        ``thread`` (a daemon thread; with a timeout, for what a worker cannot import) or ``direct``."""
        if is_async(fn.func):
            return "async"
        if self.timeout_s is None:
            return "direct"
        return "process" if process_ref(fn) is not None else "thread"

    def submit(self, fn, kwargs: dict[str, Any]) -> Callable[[float | None], Any]:
        """Start one call of ``fn``; returns ``wait(deadline)``, which gives its output or a ``Failure`` (a
        timeout when it is not done by ``deadline``, a ``time.monotonic()`` time; ``None``: its own timeout)."""
        mode, timeout = self.mode(fn), self.timeout_s
        if mode == "direct":
            result = _run(fn.func, kwargs)
            return lambda deadline: result
        started = time.monotonic()
        if mode == "async":
            loop = self.loop()
            future = asyncio.run_coroutine_threadsafe(_run_async(fn.func, kwargs, timeout), loop)
            return lambda deadline: self._wait_async(future, loop, started, deadline)
        if mode == "thread":
            future: concurrent.futures.Future = concurrent.futures.Future()
            threading.Thread(target=lambda: future.set_result(_run(fn.func, kwargs)), daemon=True,
                             name=f"grpokit-reward-{fn.name}").start()
            return lambda deadline: _wait_thread(future, timeout, started, deadline)
        future = self.pool().schedule(_run, args=(process_ref(fn), kwargs, False), timeout=timeout)
        return lambda deadline: _wait_pool(future, timeout, deadline)

    def _wait_async(self, future: concurrent.futures.Future, loop, started: float, deadline: float | None) -> Any:
        if self.timeout_s is None:
            return future.result()
        end = started + self.timeout_s + ASYNC_GRACE_S  # wait_for fires at the timeout unless the loop is stuck
        try:
            return future.result(timeout=max(0.0, (end if deadline is None else min(end, deadline))
                                             - time.monotonic()))
        except concurrent.futures.TimeoutError:
            if deadline is not None and deadline < end:
                future.cancel()
                return Failure(TIMEOUT, _BUDGET)
            if self._loop is loop:  # the loop itself is blocked: leave it to its thread, start another
                self._loop = None
            return Failure(TIMEOUT, f"timed out after {self.timeout_s:g} s (the coroutine blocked its event loop)")

    # ---- what the calls run on -------------------------------------------------------------------------------

    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop of the async reward functions, running in a daemon thread (started once)."""
        if self._loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, daemon=True, name="grpokit-reward-loop").start()
            self._loop = loop
        return self._loop

    def pool(self, preload: Sequence[str] = ()):
        """The worker processes (``pebble.ProcessPool``, started once). Under ``forkserver``, the first pool of
        this process starts the fork server with this module and ``preload`` (the reward functions' modules)
        imported, so that a worker, and the one replacing a killed worker, starts without importing them."""
        if self._pool is None:
            import pebble

            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
            if context.get_start_method() == "forkserver":
                context.set_forkserver_preload(list(dict.fromkeys([__name__, *preload])))
            self._pool = pebble.ProcessPool(max_workers=self.max_workers, initializer=_worker_init,
                                            context=context)
        return self._pool

    def close(self) -> None:
        """Stop the worker processes and the event loop (a later call starts them again)."""
        if self._pool is not None:  # every call has returned or timed out: the workers are idle, or being replaced
            self._pool.close()
            try:
                self._pool.join(timeout=10)
            except TimeoutError:
                self._pool.stop()
                self._pool.join()
            self._pool = None
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop = None


# ----------------------------------------------------------------------------------------------------------
# one call


def is_async(func) -> bool:
    """``async def`` functions, and callable objects whose ``__call__`` is one."""
    call = type(func).__call__ if callable(func) and not inspect.isroutine(func) else None
    return inspect.iscoroutinefunction(func) or (call is not None and inspect.iscoroutinefunction(call))


@dataclass(frozen=True)
class FileFunction:
    """A reward function loaded from ``path:attr`` (``"file.py:function"``), as a worker process loads it."""

    path: str
    attr: str

    def load(self) -> Callable:
        name = f"grpokit_reward_{abs(hash(self.path))}"
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, self.path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        return getattr(module, self.attr)


def process_ref(fn) -> Callable | FileFunction | None:
    """What a worker process can load ``fn`` from (the function, pickled by reference, or its file), or
    ``None``: lambdas, closures, callable objects and ``__main__``'s functions stay in this process."""
    if fn.source is not None:
        path, _, attr = fn.source.rpartition(":")
        return FileFunction(str(Path(path).resolve()), attr)
    func = fn.func
    if not inspect.isfunction(func) or func.__module__ == "__main__" or "<" in func.__qualname__:
        return None
    try:
        pickle.dumps(func)
    except Exception:
        return None
    return func


def _run(func, kwargs: dict[str, Any], keep_exception: bool = True) -> Any:
    """``func(**kwargs)``, or a ``Failure`` for what it raised (this runs in the worker processes too, which
    send back no exception object: it may not pickle)."""
    try:
        if isinstance(func, FileFunction):
            func = func.load()
        return func(**kwargs)
    except Exception as e:
        return _failure(e, keep_exception)


async def _run_async(func, kwargs: dict[str, Any], timeout: float | None) -> Any:
    async def guarded():  # a TimeoutError the function raises itself is an error, not our timeout
        try:
            return await func(**kwargs)
        except Exception as e:
            return _failure(e, True)

    if timeout is None:
        return await guarded()
    try:
        return await asyncio.wait_for(guarded(), timeout)
    except asyncio.TimeoutError:
        return Failure(TIMEOUT, f"timed out after {timeout:g} s")


def _failure(e: BaseException, keep_exception: bool) -> Failure:
    tb = traceback.extract_tb(e.__traceback__)
    where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return Failure(ERROR, text, error_type=type(e).__name__, where=where, exception=e if keep_exception else None)


_BUDGET = f"was not done within the {RETRY_BUDGET:g} x reward_timeout_s its calls on single samples share"


def _wait_thread(future: concurrent.futures.Future, timeout: float, started: float, deadline: float | None) -> Any:
    end = started + timeout
    try:
        return future.result(timeout=max(0.0, (end if deadline is None else min(end, deadline)) - time.monotonic()))
    except concurrent.futures.TimeoutError:
        return Failure(TIMEOUT, f"timed out after {timeout:g} s (its thread runs on: reward functions that are "
                                "not importable cannot be stopped)")


def _wait_pool(future, timeout: float, deadline: float | None) -> Any:
    """A worker's output: errors come back as ``Failure`` values, so an exception here is the pool's own. Not
    done by ``deadline``: cancelled (a running call's worker is stopped)."""
    try:
        return future.result(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
    except concurrent.futures.TimeoutError:
        if future.done():  # pebble's own: the call ran past reward_timeout_s
            return Failure(TIMEOUT, f"timed out after {timeout:g} s")
        future.cancel()
        return Failure(TIMEOUT, _BUDGET)
    except Exception as e:  # the worker died (pebble.ProcessExpired), or the arguments did not pickle
        return Failure(ERROR, f"its worker process failed: {e}", error_type=type(e).__name__)


def _worker_init() -> None:
    """A worker process ignores the signals that ask the training process to stop (Ctrl-C reaches the whole
    process group): the trainer finishes its step and stops the pool itself."""
    for name in ("SIGINT", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
