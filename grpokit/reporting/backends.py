"""Where a run reports beside ``metrics.jsonl``: experiment trackers, and samples of its completions.

* ``report_to``: the trackers (``tensorboard``, ``wandb``, ``trackio``, ``mlflow``: one module each under
  ``grpokit/reporting/``, ``grpokit.reporting.trackers`` for the protocol) get the run's config, every metrics
  row, the completion samples as a table and ``metrics.png`` (``docs/tracking.md``).
* ``log_completions_steps: K``: every K steps, a table of the rollout's first completions (prompt, completion,
  reward, advantage) is printed, and the whole rollout's completions are appended to ``output_dir/samples.jsonl``,
  one JSON object per completion: ``{"step", "prompt", "completion", "reward", "rewards/<name>"..., "advantage"}``.

Like ``metrics.jsonl``, nothing is written before a run's first step is done (a start that fails on bad input
leaves the folder as it was); a fresh run starts both outputs afresh, and a resumed run cuts them back to the
checkpoint's step (``samples.jsonl`` rows after it are dropped; TensorBoard hides them with ``purge_step``),
and the trackers continue the runs recorded in ``trackers.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpokit.reporting.metrics import read_metrics, write_rows_atomically
from grpokit.reporting.trackers import (
    TRACKERS_FILE,
    Tracker,
    TrackerRun,
    check_trackers,
    make_tracker,
    prompt_text,
    read_run_ids,
    write_run_ids,
)
from grpokit.util import nan_to_none

SAMPLES_FILE = "samples.jsonl"
SHOWN_ROWS = 8  # completions in the printed table
SHOWN_CHARS = 48  # characters of each prompt / completion in the printed table


@dataclass
class CompletionSamples:
    """One rollout's completions as the reward functions saw them, with what GRPO made of them (N rows)."""

    prompts: list
    """N prompts (strings or chat messages), a group's G rows consecutive."""
    completions: list[str]
    """N completion texts."""
    rewards: torch.Tensor
    """(N,) combined reward (NaN where no function scored)."""
    per_func: dict[str, torch.Tensor]
    """{reward function name: (N,) its reward (NaN for None)}."""
    advantages: torch.Tensor
    """(N,) advantage; a per-token advantage (N, C) is shown as its mean over the completion's tokens."""

    @classmethod
    def of(cls, prompts: list, texts: list[str], scores, reward_names: list[str], advantages: torch.Tensor,
           completion_mask: torch.Tensor) -> CompletionSamples:
        """From a rollout: its N prompts and completion texts, its ``Scores`` (``rewards`` (N,), ``per_func``
        (N, F)), the names of the F reward functions, and its advantages, (N,) or per token (N, C)."""
        advantages = advantages.detach().float().cpu()
        if advantages.dim() == 2:  # per token: the mean over each completion's tokens
            mask = completion_mask.detach().float().cpu()
            advantages = (advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        per_func = {name: scores.per_func[:, j].detach().float().cpu() for j, name in enumerate(reward_names)}
        return cls(prompts=list(prompts), completions=list(texts), rewards=scores.rewards.detach().float().cpu(),
                   per_func=per_func, advantages=advantages)

    def records(self, step: int) -> list[dict[str, Any]]:
        """One JSON-ready dict per completion (``samples.jsonl`` rows)."""
        out = []
        for i, (prompt, completion) in enumerate(zip(self.prompts, self.completions)):
            row = {"step": step, "prompt": prompt, "completion": completion, "reward": nan_to_none(self.rewards[i])}
            row.update({f"rewards/{name}": nan_to_none(values[i]) for name, values in self.per_func.items()})
            row["advantage"] = nan_to_none(self.advantages[i])
            out.append(row)
        return out


def format_table(records: list[dict[str, Any]], *, rows: int = SHOWN_ROWS, width: int = SHOWN_CHARS) -> str:
    """A plain-text table of the first ``rows`` records: prompt, completion (``repr``, cut to ``width``),
    reward, advantage."""

    def cut(text: str) -> str:
        text = repr(text)[1:-1]
        return text if len(text) <= width else text[: width - 1] + "…"

    shown = records[:rows]
    cells = [(cut(prompt_text(r["prompt"])), cut(r["completion"]), _fmt(r["reward"]), _fmt(r["advantage"], "+.3f"))
             for r in shown]
    header = ("prompt", "completion", "reward", "advantage")
    widths = [max(len(h), *(len(c[k]) for c in cells)) for k, h in enumerate(header)]
    line = lambda c: "  ".join(x.ljust(w) if k < 2 else x.rjust(w) for k, (x, w) in enumerate(zip(c, widths)))
    rule = "  ".join("-" * w for w in widths)
    more = f"\n({len(records) - len(shown)} more in {SAMPLES_FILE})" if len(records) > len(shown) else ""
    return "\n".join([line(header), rule, *(line(c) for c in cells)]) + more


class Reporter:
    """The extra outputs of one run: the trackers of ``report_to`` (``grpokit.reporting.trackers``) and the
    completion samples of ``log_completions_steps``. ``enabled=False`` (torchrun ranks > 0) makes every call a
    no-op.

    The trackers start on the first metrics row, with ``config`` (the run's settings, as a flat mapping);
    their run ids go to ``output_dir/trackers.json``, and a resumed run (``start_step`` > 0) continues the runs
    recorded there."""

    def __init__(self, output_dir: str | Path, *, report_to: str | list[str], log_completions_steps: int,
                 start_step: int = 0, enabled: bool = True, config: dict[str, Any] | None = None,
                 run_name: str | None = None, project: str | None = None):
        self.output_dir = Path(output_dir)
        self.names = check_trackers(report_to) if enabled else []
        self.every = log_completions_steps if enabled else 0
        self.start_step = start_step
        self.config = dict(config or {})
        self.run_name, self.project = run_name, project
        self.trackers: list[Tracker] | None = None  # started by the first row
        self.samples_started = False

    def log(self, row: dict[str, Any], samples: CompletionSamples | None = None) -> None:
        """After metrics row ``row`` (step ``row["step"]``): its numbers to every tracker, and the rollout's
        samples when due."""
        step = int(row["step"])
        for tracker in self._started():
            tracker.log(row, step)
        if self.every and step % self.every == 0 and step > 0 and samples is not None:
            self.log_samples(step, samples)

    def _started(self) -> list[Tracker]:
        if self.trackers is None:
            resumed = read_run_ids(self.output_dir) if self.start_step else {}
            ids, self.trackers = dict(resumed), []
            for name in self.names:
                run = TrackerRun(output_dir=self.output_dir, run_name=self.run_name, project=self.project,
                                 run_id=resumed.get(name), start_step=self.start_step)
                tracker = make_tracker(name, run)
                run_id = tracker.start(self.config)
                self.trackers.append(tracker)
                if run_id is not None:
                    ids[name] = run_id
            if ids or resumed or (self.output_dir / TRACKERS_FILE).exists():  # a fresh run: no stale ids
                write_run_ids(self.output_dir, ids)
        return self.trackers

    def log_samples(self, step: int, samples: CompletionSamples) -> None:
        """Print the table, append the rollout's completions to ``samples.jsonl`` and give them to every
        tracker as a table."""
        from tqdm.auto import tqdm

        records = samples.records(step)
        path = self.output_dir / SAMPLES_FILE
        if not self.samples_started:  # fresh: start empty; resumed: keep the rows up to the checkpoint
            kept = read_samples(path, upto_step=self.start_step) if self.start_step else []
            write_rows_atomically(path, kept)
            self.samples_started = True
        with path.open("a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
        for tracker in self._started():
            tracker.log_samples(records, step)
        tqdm.write(f"completions at step {step}:\n{format_table(records)}")

    def log_image(self, path: str | Path) -> None:
        """The run's ``metrics.png`` to every tracker that has started."""
        for tracker in self.trackers or []:
            tracker.log_image(Path(path))

    def close(self) -> None:
        for tracker in self.trackers or []:
            tracker.finish()
        if self.trackers is not None:
            self.trackers = []


def read_samples(path: str | Path, upto_step: int | None = None) -> list[dict[str, Any]]:
    """Rows of a ``samples.jsonl`` (those with ``step <= upto_step`` when given): the format of
    ``metrics.jsonl``, read by the same code, so a torn last line (a crash while writing) is dropped."""
    return read_metrics(path, upto_step)



def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)
