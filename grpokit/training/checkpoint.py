"""Checkpoints: ``output_dir/checkpoint-<step>/``, written atomically, holding all a resumed run needs.

Layout::

    checkpoint-<step>/
        model.safetensors, config.json, ...   policy (save_pretrained: loadable with from_pretrained)
        tokenizer.json, ...                   tokenizer
        ref_model/                            pi_ref, only when it exists
        optimizer.pt, scheduler.pt            AdamW moments and step counts, LR schedule position
        rng.pt                                python, numpy, torch (CPU and CUDA) and sampler generator states
        rollout.pt                            the current rollout, only when a checkpoint falls inside one
                                              (num_iterations or steps_per_rollout > 1)
        trainer_state.json                    step, data order (epoch, position), config; written last

The folder is assembled under ``output_dir/.tmp-checkpoint-<step>-<pid>``, every file fsync'ed, then renamed
into place, so a crash leaves either the old state or the complete new one, never half a checkpoint. With the
same thread count, resuming on CPU reproduces the uninterrupted run bit for bit (``metrics.jsonl`` is cut
back to the checkpoint's step on resume).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grpokit.models.loading import save_model

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


@dataclass
class TrainingState:
    """The resumable state of a run beside the tensors: where it stands and what it read."""

    step: int
    """Optimizer steps done."""
    data_order: dict[str, int]
    """``PromptOrder.state_dict()``: seed, epoch, position."""
    config: dict[str, Any]
    """The run's ``GRPOConfig`` as a dict (for inspection; resuming uses the trainer's own config)."""
    log_history: list[dict[str, Any]] | None = None
    """The metrics rows of steps 1..step (``metrics.jsonl``'s, as HF's ``trainer_state.json`` keeps them): a
    resumed run rebuilds ``metrics.jsonl`` from them, so a lost or damaged file costs no row."""


def save_checkpoint(
    output_dir: str | Path,
    *,
    state: TrainingState,
    model: torch.nn.Module,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    scheduler,
    generator: torch.Generator,
    ref_model: torch.nn.Module | None = None,
    rollout: dict[str, Any] | None = None,
    save_total_limit: int | None = None,
    before_commit: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``output_dir/checkpoint-<state.step>`` atomically; returns its path. ``before_commit(folder)``
    runs once the files are in the temporary folder, before it is committed (under torchrun the other
    processes add their ``rank-<r>/`` files then; ``grpokit.training.distributed``)."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{state.step}"
    tmp = output_dir / f".tmp-checkpoint-{state.step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    save_model(model, tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if ref_model is not None:
        save_model(ref_model, tmp / "ref_model")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(generator), tmp / "rng.pt")
    if rollout is not None:
        torch.save(rollout, tmp / "rollout.pt")
    if before_commit is not None:
        before_commit(tmp)
    (tmp / STATE_FILE).write_text(json.dumps(
        {"step": state.step, "data_order": state.data_order, "config": state.config,
         "log_history": state.log_history}, indent=2))

    _fsync_tree(tmp)
    if final.exists():  # a re-save of the same step: move the old one aside first (rename is atomic)
        old = output_dir / f".old-checkpoint-{state.step}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(output_dir)
    if save_total_limit is not None:
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            delete_checkpoint(old)
    return final


def delete_checkpoint(path: Path) -> None:
    """Rename a checkpoint out of the ``checkpoint-<step>`` namespace, then delete it: a crash half way
    leaves a ``.deleting-*`` folder (swept by ``remove_partial_checkpoints``), never a torn checkpoint."""
    doomed = path.parent / f".deleting-{path.name}-{os.getpid()}"
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def load_checkpoint_state(path: Path) -> tuple[TrainingState, dict[str, Any]]:
    """``TrainingState`` and the tensor files (optimizer, scheduler, rng, rollout or None) of a checkpoint."""
    info = json.loads((path / STATE_FILE).read_text())
    state = TrainingState(step=info["step"], data_order=info["data_order"], config=info.get("config", {}),
                          log_history=info.get("log_history"))
    load = lambda name: torch.load(path / name, weights_only=False) if (path / name).exists() else None
    return state, {name: load(f"{name}.pt") for name in ("optimizer", "scheduler", "rng", "rollout")}


def resolve_checkpoint(output_dir: str | Path, resume: bool | str | Path) -> Path:
    """``True``: the newest complete checkpoint in ``output_dir``; a path: that checkpoint."""
    if resume is True:
        found = list_checkpoints(output_dir)
        if not found:
            raise ValueError(f"resume_from_checkpoint=True but {str(output_dir)!r} has no checkpoint-<step>/")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"{str(path)!r} is not a grpokit checkpoint (no {STATE_FILE})")
    return path


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of ``output_dir``, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def remove_partial_checkpoints(output_dir: str | Path) -> None:
    """Sweep what a run killed while saving or deleting left behind: ``.tmp-checkpoint-*`` (a save never
    renamed into place) and ``.deleting-checkpoint-*`` are deleted; ``.old-checkpoint-<step>-*`` (a re-save of
    the same step killed between its two renames) is put back when ``checkpoint-<step>`` is missing."""
    output_dir = Path(output_dir)
    for child in sorted(output_dir.glob(".*-checkpoint-*")):
        if not child.is_dir():
            continue
        if child.name.startswith(".old-checkpoint-"):
            step = child.name[len(".old-checkpoint-"):].split("-")[0]
            final = output_dir / f"checkpoint-{step}"
            if not final.exists() and (child / STATE_FILE).is_file():
                os.replace(child, final)
                continue
        if child.name.startswith((".tmp-checkpoint-", ".old-checkpoint-", ".deleting-checkpoint-")):
            shutil.rmtree(child, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "sampler": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["sampler"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
