"""``report_to: trackio``: Trackio, local-first (``pip install grpokit[trackio]``).

The run goes to project ``project`` (else ``grpokit``) under the name ``run_name`` (else one Trackio makes up),
with the run's config; every metrics row is logged at its step, each completions table as a ``trackio.Table``
under ``completions``, and ``metrics.png`` as a ``trackio.Image`` under ``plots/metrics`` at the last step. Without a
Space (``TRACKIO_SPACE_ID``) everything stays in Trackio's local database under ``TRACKIO_DIR`` (default
``~/.cache/huggingface/trackio``); ``trackio show`` opens the dashboard.

Trackio continues a run by name: a resumed run reopens the one it started (its name is kept in
``trackers.json``) and logs the steps after the checkpoint again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from grpokit.reporting.trackers import IMAGE_KEY, SAMPLES_KEY, TrackerRun, project_name, scalars, table_of


class TrackioTracker:
    name = "trackio"

    def __init__(self, run: TrackerRun):
        self.run = run
        self.trackio_run = None
        self.last_step = run.start_step

    def start(self, config: dict[str, Any]) -> str:
        import trackio

        self.trackio = trackio
        name = self.run.run_id or self.run.run_name  # a resumed run: the name it was given the first time
        self.trackio_run = trackio.init(project=project_name(self.run), name=name, config=config,
                                        resume="allow" if self.run.run_id else "never")
        return self.trackio_run.name

    def log(self, row: dict[str, Any], step: int) -> None:
        self.trackio_run.log(scalars(row), step=step)
        self.last_step = step

    def log_samples(self, records: list[dict[str, Any]], step: int) -> None:
        columns, rows = table_of(records)
        self.trackio_run.log({SAMPLES_KEY: self.trackio.Table(columns=columns, data=rows)}, step=step)

    def log_image(self, path: Path) -> None:
        self.trackio_run.log({IMAGE_KEY: self.trackio.Image(str(path))}, step=self.last_step)

    def finish(self) -> None:
        if self.trackio_run is not None:
            self.trackio_run.finish()
            self.trackio_run = None
