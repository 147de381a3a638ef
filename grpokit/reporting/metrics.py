"""What a run reports: ``metrics.jsonl`` (one JSON object per optimizer step), a progress bar or periodic
lines, and ``metrics.png`` at the end.

Keys of a ``metrics.jsonl`` row (rollout statistics repeat on every step their rollout feeds):

    step                  optimizer steps done
    reward, reward_std    mean / std of the combined reward over the rollout's completions (NaN rows left out)
    rewards/<name>        mean of one reward function (None entries left out)
    rewards/<name>/errors, rewards/<name>/timeouts  samples of the rollout that function raised on (or returned
                          NaN/inf for) / timed out on, scored None (reward_on_error: none; grpokit.rewards.runner)
    completion_length     mean tokens per completion, EOS included; completion_length_max its max
    truncated_ratio       share of completions that hit max_completion_length without EOS
    frac_zero_std_groups  share of groups whose G rewards are all equal (advantage 0: no signal)
    loss                  the mini-batch loss (sum of its micro-batch losses)
    entropy               mean per-token entropy of the policy on the loss tokens (tempered distribution)
    kl                    mean per-token KL estimate to pi_ref (only when beta > 0; with kl_in_reward, the
                          rollout's mean k1 = log pi_theta/pi_ref of its sampled tokens)
    kl_exact_reverse      exact mean per-token KL(pi_theta||pi_ref) over the whole vocabulary, loss tokens, for
                          the policy the step starts from (beta > 0 or log_exact_kl; grpokit.training.reference)
    kl_exact_forward      the same for KL(pi_ref||pi_theta), whose gradient k3 in the loss follows
    dynamic_sampling/rounds, dynamic_sampling/dropped_groups  sampling rounds of the rollout and the flat
                          groups it dropped (dynamic_sampling; grpokit.training.dynamic_sampling)
    tis/mean_weight       mean truncated importance weight min(pi_old / pi_sampler, tis_cap) (tis)
    reward_model/...      on steps with a learned-reward update: new_samples, replayed_samples and
                          reward_model/<name>/<key> for whatever its update() returned (grpokit.rewards.learned)
    clip_ratio(_low/_high) share of tokens whose clip is active (low: r < 1-eps with A < 0; high: r > 1+eps, A > 0)
    ratio_mean            mean pi_theta / pi_old over the loss tokens (exactly 1 on a rollout's first step)
    learning_rate         the LR this step used; grad_norm the global norm before clipping
    step_time, tokens_per_s  wall time of the step (its rollout included) and completion tokens / step_time
    time/rollout_s, time/forward_backward_s, time/optimizer_s  where step_time went: the rollout (sampling,
                          rewards, rollout-time log-probs; 0 on a step that reuses its rollout), the training
                          forward and backward of the mini-batch, and clipping plus the AdamW step (with
                          optimizer_in_backward: the second backward, which takes the step, is in the latter)
    eval/reward, eval/rewards/<name>, eval/pass@k, eval/completion_length  on evaluation steps (eval_steps): the
                          policy's mean reward, each function's mean, pass@1, 2, 4... up to num_generations_eval
                          and the mean length on the eval prompts (grpokit.training.evaluate); step 0 (before
                          training) is a row of its own, with only these keys
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TIMING_KEYS = frozenset({"step_time", "tokens_per_s", "time/rollout_s", "time/forward_backward_s", "time/optimizer_s"})
"""Row keys that are wall-clock measurements: the only ones a rerun of the same steps changes."""
PLOTTED = ("reward", "kl", "entropy", "completion_length", "clip_ratio")  # panels of plot_runs, in order


def read_metrics(path: str | Path, upto_step: int | None = None) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` (those with ``step <= upto_step`` when given); a torn last line is dropped."""
    path = Path(path)
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by a crash ends the readable part
        if upto_step is None or row.get("step", 0) <= upto_step:
            rows.append(row)
    return rows


class MetricsLogger:
    """Appends one row per step to ``metrics.jsonl`` (flushed each step) and shows progress.

    On a TTY: a tqdm bar with step, reward, kl and ETA. Otherwise: a plain line every ``logging_steps``.
    ``start_step`` > 0 (a resumed run) first cuts ``metrics.jsonl`` back to the rows of steps <= start_step, by
    an atomic rename (a kill during the cut loses no row). A fresh run (``start_step`` 0) leaves the file alone
    until its first row: ``on_open`` runs then, and the file starts empty, so a start that fails on bad input
    does not touch an earlier ``metrics.jsonl``.
    """

    def __init__(self, output_dir: str | Path, *, max_steps: int, logging_steps: int, start_step: int = 0,
                 progress: bool = True, on_open: Callable[[], None] | None = None,
                 rows: list[dict[str, Any]] | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        if rows is None:  # the rows of steps 1..start_step: given (a checkpoint's) or read back from the file
            rows = read_metrics(self.path, upto_step=start_step) if start_step > 0 else []
        self.rows = list(rows)
        if start_step > 0:
            write_rows_atomically(self.path, self.rows)
        self.file = None  # opened by the first log()
        self.on_open = on_open
        self.max_steps, self.logging_steps, self.start_step = max_steps, logging_steps, start_step
        self.start_time = time.perf_counter()
        self.bar = None
        if progress and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, desc="grpo", unit="step", dynamic_ncols=True)
        self.progress = progress

    def log(self, row: dict[str, Any]) -> None:
        if self.file is None:
            if self.on_open is not None:
                self.on_open()
            if self.start_step == 0:
                write_rows_atomically(self.path, [])
            self.file = self.path.open("a")
        self.rows.append(row)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        step = row["step"]
        if step == 0:  # the evaluation before training (eval_steps): no step of progress
            return
        if self.bar is not None:
            shown = {"reward": _fmt(row.get("reward"), ".3f")}
            if "kl" in row:
                shown["kl"] = _fmt(row["kl"], ".4f")
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
        elif self.progress and (step % self.logging_steps == 0 or step == self.max_steps):
            print(self.format_line(row), flush=True)

    def format_line(self, row: dict[str, Any]) -> str:
        step = row["step"]
        elapsed = time.perf_counter() - self.start_time
        done = max(step - self.start_step, 1)
        eta = elapsed / done * (self.max_steps - step)
        parts = [f"step {step}/{self.max_steps}",
                 f"reward {_fmt(row.get('reward'), '.3f')} ± {_fmt(row.get('reward_std'), '.3f')}"]
        if "kl" in row:
            parts.append(f"kl {_fmt(row['kl'], '.4f')}")
        if "eval/reward" in row:
            parts.append(f"eval {_fmt(row['eval/reward'], '.3f')}")
        parts += [f"loss {_fmt(row.get('loss'), '+.4f')}", f"len {_fmt(row.get('completion_length'), '.1f')}",
                  f"entropy {_fmt(row.get('entropy'), '.2f')}", f"{elapsed / done:.3f} s/step", f"ETA {_hms(eta)}"]
        return " | ".join(parts)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.bar is not None:
            self.bar.close()


def write_rows_atomically(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace ``path`` by these rows: written to a temporary file, fsync'ed, renamed over the old one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def preload_plotting() -> threading.Thread:
    """Imports matplotlib (~0.5-1 s of pure Python) on a background thread while training runs, so the plot
    written at the end of ``train`` does not add that time to the run."""

    def load() -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401

    thread = threading.Thread(target=load, name="grpokit-preload-matplotlib", daemon=True)
    thread.start()
    return thread


def plot_metrics(rows: list[dict[str, Any]], path: str | Path) -> None:
    """One run's ``PLOTTED`` metrics against step, in one PNG (``metrics.png``)."""
    plot_runs({"": rows}, path)


def plot_runs(runs: dict[str, list[dict[str, Any]]], path: str | Path) -> None:
    """reward (+- its std; ``eval/reward`` dashed where the run evaluated), KL, entropy, completion length and
    clip ratio against step, one panel each, every run of ``runs`` ({label: metrics rows}) a line on each panel;
    a legend when there are several. PNG, Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # fixed margins: tight_layout would render the figure once more just to measure its labels
    fig, axes = plt.subplots(2, 3, figsize=(14, 6.5), sharex=True,
                             gridspec_kw=dict(left=0.04, right=0.99, bottom=0.08, top=0.95, wspace=0.18, hspace=0.25))
    for ax, name in zip(axes.flat, PLOTTED):
        drawn = False
        for label, rows in runs.items():
            steps = [r["step"] for r in rows]
            values = [math.nan if r.get(name) is None else r[name] for r in rows]
            if all(math.isnan(v) for v in values):
                continue
            (line,) = ax.plot(steps, values, lw=1.2, label=label or None)
            drawn = True
            if name == "reward" and any(r.get("reward_std") is not None for r in rows):
                std = [math.nan if r.get("reward_std") is None else r["reward_std"] for r in rows]
                ax.fill_between(steps, [v - s for v, s in zip(values, std)], [v + s for v, s in zip(values, std)],
                                alpha=0.15, color=line.get_color())
            evals = [(r["step"], r["eval/reward"]) for r in rows if r.get("eval/reward") is not None]
            if name == "reward" and evals:  # the evaluations (eval_steps), dashed in the run's colour
                ax.plot(*zip(*evals), ls="--", marker="o", ms=3, lw=1.0, color=line.get_color())
                ax.set_title("reward (dashed: eval/reward)")
        if not drawn:
            why = "beta = 0: no reference model" if name == "kl" else "not logged"
            ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)
        if not ax.get_title():
            ax.set_title(name)
        ax.grid(alpha=0.3)
    legend = axes.flat[len(PLOTTED)]  # the spare panel holds the legend
    legend.axis("off")
    if len(runs) > 1:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        for ax in axes.flat[1:len(PLOTTED)]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        legend.legend(handles, labels, loc="center", title="run")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    axes[0][-1].set_xlabel("step")  # the panel above the legend shows its own step ticks
    axes[0][-1].xaxis.set_tick_params(labelbottom=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
