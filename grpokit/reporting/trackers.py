"""Experiment trackers: the ``Tracker`` protocol, the table of trackers by ``report_to`` name, and what they share.

A tracker is a class with ``start(config) -> run id``, ``log(row, step)``, ``log_samples(records, step)``,
``log_image(path)`` and ``finish()``, in its own module under ``grpokit/reporting/`` and one entry in
``TRACKERS``. ``Reporter`` (``grpokit.reporting.backends``) builds the trackers ``report_to`` names, starts them
with the run's config on the first metrics row, and hands each of them every row, the completion samples of
``log_completions_steps`` and, at the end, ``metrics.png``.

Each tracker's client library is an optional extra (``pip install grpokit[wandb]``...), imported only when the
tracker starts; ``check_trackers`` says which one is missing before any training happens. The run ids the
trackers return are kept in ``output_dir/trackers.json``, so that a resumed run continues the same tracker run.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

TRACKERS_FILE = "trackers.json"
DEFAULT_PROJECT = "grpokit"
SAMPLES_KEY = "completions"  # the name under which each tracker files the completion tables
IMAGE_KEY = "plots/metrics"  # ... and metrics.png ("metrics" alone is a key Trackio reserves)

TRACKERS: dict[str, tuple[str, str, str]] = {
    "tensorboard": ("grpokit.reporting.tensorboard", "TensorBoardTracker", "tensorboard"),
    "wandb": ("grpokit.reporting.wandb", "WandbTracker", "wandb"),
    "trackio": ("grpokit.reporting.trackio", "TrackioTracker", "trackio"),
    "mlflow": ("grpokit.reporting.mlflow", "MLflowTracker", "mlflow"),
}
"""``report_to`` name -> (module, class, the package it needs). ``jsonl`` (``metrics.jsonl``, always written)
and ``none`` are not trackers; ``all`` is every tracker whose package is installed."""

INSTALL_HINTS = {"tensorboard": "pip install tensorboard", "wandb": "pip install 'grpokit[wandb]'",
                 "trackio": "pip install 'grpokit[trackio]'", "mlflow": "pip install 'grpokit[mlflow]'"}


@dataclass(frozen=True)
class TrackerRun:
    """What a tracker needs to know about the run before it starts."""

    output_dir: Path
    """The run's ``output_dir`` (TensorBoard writes its event files under it)."""
    run_name: str | None = None
    """``run_name``; ``None``: the tracker names the run itself."""
    project: str | None = None
    """``project``; ``None``: the tracker's own environment variable (``WANDB_PROJECT``,
    ``MLFLOW_EXPERIMENT_NAME``), else ``grpokit``."""
    run_id: str | None = None
    """The tracker's id of the run to continue (a resumed run, from ``trackers.json``); ``None``: a new run."""
    start_step: int = 0
    """Optimizer steps already done (0: a fresh run)."""


class Tracker(Protocol):
    """One experiment tracker, fed by ``Reporter`` on rank 0 only."""

    name: str
    """Its ``report_to`` name."""

    def start(self, config: dict[str, Any]) -> str | None:
        """Open (or, with ``TrackerRun.run_id``, continue) the tracker's run and record the run's config;
        returns the run's id for ``trackers.json`` (``None``: nothing to resume by)."""

    def log(self, row: dict[str, float], step: int) -> None:
        """One metrics row's numbers (``step`` left out) at optimizer step ``step``."""

    def log_samples(self, records: list[dict[str, Any]], step: int) -> None:
        """A rollout's completions (``CompletionSamples.records``) as the tracker's own table type."""

    def log_image(self, path: Path) -> None:
        """The run's ``metrics.png``, once, at the end."""

    def finish(self) -> None:
        """Flush and close the run."""


def tracker_names(report_to: str | list[str] | tuple[str, ...]) -> list[str]:
    """The trackers ``report_to`` names, in its order (``jsonl`` and ``none`` are not trackers; ``all`` is
    every tracker whose package is installed)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if names == ["all"]:
        return [name for name, (_, _, package) in TRACKERS.items() if _installed(package)]
    return [name for name in dict.fromkeys(names) if name in TRACKERS]


def check_trackers(report_to: str | list[str] | tuple[str, ...]) -> list[str]:
    """``tracker_names``, after checking that each one's package is installed: a missing one is an
    ImportError saying what to install."""
    names = tracker_names(report_to)
    for name in names:
        package = TRACKERS[name][2]
        if not _installed(package):
            raise ImportError(f"report_to: {name} needs the {package} package: {INSTALL_HINTS[name]}")
    return names


def make_tracker(name: str, run: TrackerRun) -> Tracker:
    """The tracker ``name`` for this run (its module imports the client library only when it starts)."""
    module, cls, _ = TRACKERS[name]
    return getattr(importlib.import_module(module), cls)(run)


def project_name(run: TrackerRun, env_var: str | None = None) -> str:
    """The run's ``project``, else the tracker's environment variable, else ``grpokit``."""
    return run.project or (os.environ.get(env_var) if env_var else None) or DEFAULT_PROJECT


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The real numbers of a metrics row, ``step`` left out (None, bools and strings are not logged)."""
    return {key: float(value) for key, value in row.items()
            if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool)}


def table_of(records: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the completions table: step, prompt (one line), completion, reward,
    ``rewards/<name>``..., advantage; the columns of the first record, in its order."""
    if not records:
        return [], []
    columns = list(records[0])
    rows = [[prompt_text(r[c]) if c == "prompt" else r.get(c) for c in columns] for r in records]
    return columns, rows


def prompt_text(prompt) -> str:
    """A prompt on one line: a string as is, chat messages as ``role: content`` joined by `` | ``."""
    if isinstance(prompt, list):
        return " | ".join(f"{m.get('role')}: {m.get('content')}" for m in prompt if isinstance(m, dict))
    return str(prompt)


def read_run_ids(output_dir: str | Path) -> dict[str, str]:
    """``{tracker name: run id}`` of ``output_dir/trackers.json`` ({} when there is none or it is unreadable)."""
    path = Path(output_dir) / TRACKERS_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {str(k): str(v) for k, v in data.items() if v is not None} if isinstance(data, dict) else {}


def write_run_ids(output_dir: str | Path, ids: dict[str, str]) -> None:
    """Replace ``output_dir/trackers.json`` by ``ids`` (written aside, then renamed)."""
    path = Path(output_dir) / TRACKERS_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(ids, indent=2) + "\n")
    os.replace(tmp, path)


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None
