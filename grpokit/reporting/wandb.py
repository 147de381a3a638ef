"""``report_to: wandb``: Weights & Biases (``pip install grpokit[wandb]``).

The run goes to project ``project`` (else ``WANDB_PROJECT``, else ``grpokit``) under the name ``run_name``,
with the run's config as its config; every metrics row is a history row at its step, each completions table a
``wandb.Table`` under ``completions``, and ``metrics.png`` a ``wandb.Image`` under ``plots/metrics`` at the last
step. ``WANDB_MODE=offline`` keeps everything in a local run folder (``WANDB_DIR``, else ``./wandb``) for a
later ``wandb sync``; wandb's other settings are its own environment variables.

A resumed run continues the same wandb run (``wandb.init(id=..., resume="allow")``). wandb ignores rows at
steps it already holds, so the steps between the checkpoint and the point where the first attempt stopped
keep that attempt's values there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from grpokit.reporting.trackers import IMAGE_KEY, SAMPLES_KEY, TrackerRun, project_name, scalars, table_of


class WandbTracker:
    name = "wandb"

    def __init__(self, run: TrackerRun):
        self.run = run
        self.wandb_run = None
        self.last_step = run.start_step

    def start(self, config: dict[str, Any]) -> str:
        import wandb

        self.wandb = wandb
        self.wandb_run = wandb.init(project=project_name(self.run, "WANDB_PROJECT"), name=self.run.run_name,
                                    config=config, id=self.run.run_id, resume="allow" if self.run.run_id else None)
        return self.wandb_run.id

    def log(self, row: dict[str, Any], step: int) -> None:
        self.wandb_run.log(scalars(row), step=step)
        self.last_step = step

    def log_samples(self, records: list[dict[str, Any]], step: int) -> None:
        columns, rows = table_of(records)
        self.wandb_run.log({SAMPLES_KEY: self.wandb.Table(columns=columns, data=rows)}, step=step)

    def log_image(self, path: Path) -> None:
        self.wandb_run.log({IMAGE_KEY: self.wandb.Image(str(path))}, step=self.last_step)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
