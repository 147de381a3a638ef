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
        trainer_state.json                    step, data order (epoch, position), config, metrics rows,
                                              best_metric / best_model_checkpoint; written last

The folder is assembled under ``output_dir/.tmp-checkpoint-<step>-<pid>``, every file fsync'ed, then renamed
into place, so a crash leaves either the old state or the complete new one, never half a checkpoint. With the
same thread count, resuming on CPU reproduces the uninterrupted run bit for bit (``metrics.jsonl`` is cut
back to the checkpoint's step on resume).

A save that fails (a full disk, a permission) deletes its temporary folder and raises ``CheckpointError``,
one line naming the folder, the space a checkpoint takes and the space free; the checkpoints before it are
untouched (nothing is deleted before the new one is committed). ``save_total_limit`` keeps the newest
checkpoints of the run, the one just written always, and with ``metric_for_best_model`` the best one too.
"""

from __future__ import annotations

import errno
import json
import math
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
from grpokit.util import closest

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


class CheckpointError(OSError):
    """A checkpoint could not be written; the message says where, why, and what is kept."""

    def __str__(self) -> str:
        return str(self.strerror)


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
    metric_for_best_model: str | None = None,
    greater_is_better: bool | None = None,
    before_commit: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``output_dir/checkpoint-<state.step>`` atomically; returns its path. ``before_commit(folder)``
    runs once the files are in the temporary folder, before it is committed (under torchrun the other
    processes add their ``rank-<r>/`` files then; ``grpokit.training.distributed``). Then the run's checkpoints
    beyond ``save_total_limit`` are deleted (``checkpoints_to_delete``). Raises ``CheckpointError`` when a
    file cannot be written, leaving every earlier checkpoint as it was."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{state.step}"
    tmp = output_dir / f".tmp-checkpoint-{state.step}-{os.getpid()}"
    best = best_checkpoint(output_dir, state.step, state.log_history, metric_for_best_model, greater_is_better)
    try:
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
             "log_history": state.log_history, "best_metric": best[1] if best else None,
             "best_model_checkpoint": str(output_dir / best[0]) if best else None}, indent=2))
        _fsync_tree(tmp)
        if final.exists():  # a re-save of the same step: move the old one aside first (rename is atomic)
            old = output_dir / f".old-checkpoint-{state.step}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, CheckpointError):
            raise
        raise save_error(e, output_dir, state.step, [model, ref_model, optimizer]) from e
    _fsync_dir(output_dir)
    if save_total_limit is not None:
        for doomed in checkpoints_to_delete(output_dir, state.step, save_total_limit, best[0] if best else None):
            delete_checkpoint(doomed)
    return final


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_RE.match(Path(path).name).group(1))


def checkpoints_to_delete(output_dir: str | Path, step: int, limit: int, best: str | None = None) -> list[Path]:
    """``save_total_limit``: after writing ``checkpoint-<step>``, the run's checkpoints to delete. Kept: the
    newest ``limit`` of those up to ``step`` (so always the one just written, which a resume would take) and
    ``best``. Checkpoints of later steps (left by a run resumed from an earlier checkpoint) are not this
    run's: they are neither counted nor deleted."""
    mine = [p for p in list_checkpoints(output_dir) if checkpoint_step(p) <= step]
    keep = {p.name for p in mine[-limit:]} | {f"checkpoint-{step}"} | ({best} if best else set())
    return [p for p in mine if p.name not in keep]


def best_checkpoint(output_dir: str | Path, step: int, history: list[dict[str, Any]] | None, metric: str | None,
                    greater_is_better: bool | None = None) -> tuple[str, float] | None:
    """``metric_for_best_model``: (name, value) of the checkpoint, among the run's checkpoints up to ``step``
    and the one of ``step`` about to be written, whose step logged the best ``metric`` (rows of ``history``;
    a missing or None value never wins). ``greater_is_better=None``: larger is better unless the name ends in
    ``loss`` (transformers' rule). None without a metric or a value."""
    if metric is None or not history:
        return None
    greater = greater_is_better if greater_is_better is not None else not metric.endswith("loss")
    logged = {row.get("step"): row.get(metric) for row in history}
    steps = [checkpoint_step(p) for p in list_checkpoints(output_dir) if checkpoint_step(p) < step] + [step]
    scored = [(s, float(logged[s])) for s in steps if isinstance(logged.get(s), (int, float))
              and math.isfinite(float(logged[s]))]
    if not scored:
        return None
    s, value = (max if greater else min)(scored, key=lambda sv: sv[1])
    return f"checkpoint-{s}", value


def check_best_metric(metric: str | None, rows: list[dict[str, Any]], evaluating: bool = False) -> None:
    """ValueError unless ``metric`` (``metric_for_best_model``) is a key of the metrics rows ``rows`` (a run's
    first), or with ``evaluating`` an ``eval/`` metric, which only the rows of evaluation steps carry."""
    if metric is None or any(metric in row for row in rows) or (evaluating and metric.startswith("eval/")):
        return
    keys = sorted({k for row in rows for k in row})
    hint = closest(metric, keys)
    raise ValueError(f"metric_for_best_model {metric!r} is not a key of the metrics rows"
                     + (f"; did you mean {hint!r}?" if hint else f" (keys: {', '.join(keys)})"))


def save_error(error: OSError, output_dir: Path, step: int, holders: list) -> CheckpointError:
    """The one-line ``CheckpointError`` for a failed save: the folder, the OS's reason, for a full disk the
    size a checkpoint takes (the newest one's, else the tensors to write) against the free space, and which
    checkpoint is kept."""
    saved = [p for p in list_checkpoints(output_dir) if checkpoint_step(p) != step]
    kept = f"the previous checkpoint, {saved[-1].name}, is intact" if saved else "no checkpoint had been written yet"
    reason = error.strerror or str(error)
    space = ""
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        need = folder_bytes(saved[-1]) if saved else sum(_tensor_bytes(h) for h in holders if h is not None)
        try:
            free = shutil.disk_usage(output_dir).free
        except OSError:
            free = None
        shown = f" and {format_size(free)} is free there" if free is not None else ""
        space = f"; a checkpoint of this run takes about {format_size(need)}{shown}"
    return CheckpointError(error.errno, f"cannot write checkpoint-{step} in {str(output_dir)!r}: {reason}{space}; "
                                        f"{kept}. Free space (or lower save_total_limit), then resume with --resume")


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _tensor_bytes(holder) -> int:
    """Bytes of a model's parameters (a stand-in's ``state``) or an optimizer's state tensors."""
    if hasattr(holder, "parameters"):
        return sum(p.numel() * p.element_size() for p in holder.parameters())
    state = getattr(holder, "state", None)
    if callable(getattr(holder, "state_dict", None)) and not isinstance(state, dict):
        state = holder.state_dict().get("state", {})
    tensors = [t for v in (state or {}).values() for t in (v.values() if isinstance(v, dict) else [v])]
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def format_size(n: float) -> str:
    """``298.9 KB``, ``1.2 GB``: a byte count for people (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


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
    if "sampler_seed" in state:  # re-derived for another process count (grpokit.training.distributed)
        generator.manual_seed(state["sampler_seed"])
    else:
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
