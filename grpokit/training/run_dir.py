"""The output folder of a run: never start a new run on top of an earlier one by accident.

A folder holds an *earlier run* when it has a ``metrics.jsonl`` with at least one row or a ``checkpoint-<step>/``.
A new run there must say what it wants: continue it (``--resume`` / ``resume_from_checkpoint``) or replace it
(``--overwrite`` / ``overwrite_output_dir: true``). Replacing deletes the earlier run's checkpoints and metrics
only once the new run has finished its first optimizer step (``clear_earlier_run``, called by the trainer just
before it writes its first metrics row), so a start that fails on bad input leaves every file where it was.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from grpokit.training.checkpoint import (
    CHECKPOINT_RE,
    STATE_FILE,
    delete_checkpoint,
    list_checkpoints,
    resolve_checkpoint,
)

METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"  # the shared result, written at the end (grpokit.training.model_card)
RUN_FILES = ("metrics.jsonl", "metrics.png")  # what a run writes beside its checkpoints (config.yaml is rewritten)
# fields a resumed run must share with its checkpoint: they fix the saved rollout's rows, pi_ref and dtypes
RESUME_FIELDS = ("prompts_per_step", "num_generations", "num_iterations", "steps_per_rollout", "beta", "dtype")


class OutputDirError(ValueError):
    """The output folder holds an earlier run and the new run said neither resume nor overwrite."""


def earlier_run(output_dir: str | Path) -> list[str]:
    """Names of what marks an earlier run in ``output_dir``: a non-empty ``metrics.jsonl``, ``checkpoint-*/``."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    metrics = output_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(METRICS_FILE)
    found += sorted(p.name for p in output_dir.iterdir() if CHECKPOINT_RE.match(p.name) and p.is_dir())
    return found


def check_output_dir(output_dir: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a fresh start (neither ``resume`` nor ``overwrite``) in a folder that holds an earlier run."""
    if resume or overwrite:
        return
    found = earlier_run(output_dir)
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise OutputDirError(
            f"output_dir {str(output_dir)!r} already holds a run ({shown}); continue it with --resume "
            "(resume_from_checkpoint: true), replace it with --overwrite (overwrite_output_dir: true), "
            "or choose another output_dir")


def clear_earlier_run(output_dir: str | Path) -> None:
    """Delete an earlier run's checkpoints and metrics files (``overwrite_output_dir``). Checkpoints go first,
    each renamed away before it is deleted (``delete_checkpoint``), so a crash half way never leaves a torn
    checkpoint, nor new metrics beside an old checkpoint that a resume could pick."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return
    for path in sorted(output_dir.iterdir()):
        if CHECKPOINT_RE.match(path.name) and path.is_dir():
            delete_checkpoint(path)
    for name in RUN_FILES:
        (output_dir / name).unlink(missing_ok=True)
    if (output_dir / FINAL_DIR).is_dir():  # the earlier run's result (grpokit.training.model_card)
        doomed = output_dir / f".deleting-{FINAL_DIR}-{os.getpid()}"
        os.replace(output_dir / FINAL_DIR, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def resume_point(output_dir: str | Path, resume: bool | str | Path | None, config=None) -> Path | None:
    """The checkpoint a run continues from, or None to start at step 0. ``resume=True`` in a folder without a
    checkpoint yet (a run killed before its first save) starts at step 0: from the same seed that *is* the
    run's continuation, and its ``metrics.jsonl`` rows are replaced as the steps are redone. With ``config``,
    the checkpoint must have been written with the same batch shapes (``check_resumable``)."""
    if not resume:
        return None
    if resume is True and not list_checkpoints(output_dir):
        print(f"grpokit: no checkpoint in {str(output_dir)!r} yet; starting from step 0", file=sys.stderr)
        return None
    path = resolve_checkpoint(output_dir, resume)
    if config is not None:
        check_resumable(path, config.to_dict())
    return path


def check_resumable(path: Path, config: dict[str, Any]) -> None:
    """ValueError when the checkpoint was written with other values of the fields that shape its saved
    rollout and optimizer state (``RESUME_FIELDS``); other fields (max_steps, save_steps...) may change."""
    saved = json.loads((Path(path) / STATE_FILE).read_text()).get("config") or {}
    changed = [f"{name}={saved[name]!r} (now {config[name]!r})" for name in RESUME_FIELDS
               if name in saved and name in config and saved[name] != config[name]]
    if changed:
        raise ValueError(f"cannot resume from {str(path)!r}: it was written with {', '.join(changed)}; resume with "
                         "the run's own values (its trainer_state.json has them) or start a new run")


def begin_run(output_dir: str | Path, config, *, clear: bool) -> None:
    """Once the first step of a (re)started run is done, just before its first metrics row: delete the earlier
    run it overwrites (``clear``), then write the resolved ``config.yaml``."""
    if clear:
        clear_earlier_run(output_dir)
    config.to_yaml(Path(output_dir) / "config.yaml")
