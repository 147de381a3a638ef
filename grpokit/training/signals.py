"""Stopping a run cleanly when the cluster asks: SIGTERM (preemption, ``scancel``, torchrun's shutdown), SIGINT
(Ctrl-C) and SIGUSR1 (Slurm's ``--signal=USR1@<seconds>`` warning before the time limit).

While ``train()`` runs, the first such signal only sets a flag: the current optimizer step finishes, a checkpoint
of it is written, the run says how to resume, and ``train()`` returns the rows so far (``grpokit train``
exits 0). A second signal exits at once: SIGTERM and SIGUSR1 with the signal's own status, SIGINT as Python's
Ctrl-C does, by ``KeyboardInterrupt`` (``grpokit train`` exits 130; a notebook's kernel survives). At worst a
checkpoint being written is left as a ``.tmp-checkpoint-*`` folder, which the next start sweeps away; the
checkpoint before it is complete, since a checkpoint only takes its ``checkpoint-<step>`` name by an atomic
rename once every file is on disk (``grpokit.training.checkpoint``).

Under torchrun each process gets the signal (torchrun forwards it) but maybe not at the same step: after
every step the processes all-reduce their flags (``World.max_float``; one process skips it), so all stop
after the same step and write one checkpoint together.

Handlers are installed only from the main thread (Python's rule; ``train()`` from another thread runs without
them) and the previous handlers are restored when ``train()`` returns or raises.
"""

from __future__ import annotations

import os
import signal
import threading

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


class GracefulStop:
    """Context manager around the training loop: ``requested`` is the name of the first stop signal received
    (``None`` before); ``should_stop(world)`` is whether every process stops after this step."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> GracefulStop:
        """Take over the stop signals (from the main thread only; elsewhere nothing changes)."""
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        """Put the handlers that were there before ``install`` back."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __enter__(self) -> GracefulStop:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:  # the second signal: leave now
            _write(f"grpokit: {name} again: exiting now (the last complete checkpoint is kept)\n")
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)  # die of the signal itself, with its exit status
            os.kill(os.getpid(), signum)
            return
        self.requested = name
        _write(f"grpokit: {name} received: finishing this optimizer step, then saving a checkpoint and stopping "
               f"({name} again exits at once)\n")

    def should_stop(self, world) -> bool:
        """After an optimizer step: has this process, or under torchrun any process, been asked to stop?"""
        asked = self.requested is not None
        if world.world_size > 1:
            asked = world.max_float(1.0 if asked else 0.0) > 0
            if asked and self.requested is None:
                self.requested = "a stop signal on another process"
        return asked


def _write(text: str) -> None:
    """Straight to stderr's file descriptor: a handler runs between two bytecodes of the main thread, maybe
    inside a ``print`` whose buffered stream would refuse a reentrant write."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass


def stop_message(reason: str, step: int, max_steps: int, checkpoint, resume_hint: str) -> str:
    """What a stopped run prints: why, where it stands, and the command that continues it."""
    return (f"grpokit: stopped by {reason} after step {step} of {max_steps}; {checkpoint} holds it. "
            f"Continue with: {resume_hint}")
