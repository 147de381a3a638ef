"""``report_to: tensorboard``: event files in ``output_dir/tensorboard/`` (``tensorboard --logdir output_dir``).

Scalars: every number of every metrics row at its step. Text: the run's config (``config``, as YAML, at step 0)
and each completions table (``completions``, a Markdown table, at its step). Image: ``metrics.png`` at the last
step. A fresh run deletes the event files an overwritten run left; a resumed run hides the steps after its
checkpoint that the first attempt had logged (``purge_step``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from grpokit.reporting.trackers import IMAGE_KEY, SAMPLES_KEY, TrackerRun, scalars, table_of

TENSORBOARD_DIR = "tensorboard"


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, run: TrackerRun):
        self.run = run
        self.writer = None
        self.last_step = run.start_step

    def start(self, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = self.run.output_dir / TENSORBOARD_DIR
        if self.run.start_step == 0 and log_dir.is_dir():  # a fresh run: an overwritten run's curves go
            for old in log_dir.glob("events.out.tfevents.*"):
                old.unlink()
        start = self.run.start_step
        self.writer = SummaryWriter(str(log_dir), purge_step=start + 1 if start else None)
        if not start:
            self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)
        return None

    def log(self, row: dict[str, Any], step: int) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()
        self.last_step = step

    def log_samples(self, records: list[dict[str, Any]], step: int) -> None:
        columns, rows = table_of(records)
        cell = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)).replace("|", "\\|")
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(v).replace("\n", "\\n") for v in row) + " |" for row in rows]
        self.writer.add_text(SAMPLES_KEY, "\n".join(lines), step)
        self.writer.flush()

    def log_image(self, path: Path) -> None:
        import matplotlib.image

        pixels = matplotlib.image.imread(str(path))[..., :3]  # (H, W, 3) floats in [0, 1]
        self.writer.add_image(IMAGE_KEY, pixels, self.last_step, dataformats="HWC")
        self.writer.flush()

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
