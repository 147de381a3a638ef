"""Soak test: a long demo run with checkpoints, a SIGTERM and a resume half way, watching memory and file handles.

    .venv/bin/python benchmarks/soak.py                        # 2,000 steps, checkpoints every 100 (the real run)
    .venv/bin/python benchmarks/soak.py --steps 200 --sample-every 20 --out /tmp/soak.md   # a quick check

The demo task (``grpokit.tasks.demo``: random-init 2-layer Llama, "c" -> "cccc", ``char_match``, 8 prompts x 8,
lr 3e-3) with ``save_steps`` 100, ``save_total_limit`` 3 and ``metric_for_best_model: reward``, and the reward
called in a worker process (``reward_timeout_s``, so that the pool lives through the run). At half of the steps
the process sends itself SIGTERM: the run finishes that step, checkpoints and returns; a new trainer then resumes
it (``resume_from_checkpoint=True``) to the last step, in the same process.

Every ``--sample-every`` steps: the resident set size (``/proc/self/statm``) and the open file descriptors
(``/proc/self/fd``). Reported: the RSS slope in MB per 1,000 steps, by least squares, of each half (the first
sample of a half left out as warm-up; the resumed half builds a second trainer beside the first's leftovers, so
the halves are fitted apart), the step in RSS at the resume, the descriptor counts, and whether the output folder
holds exactly what the config says (the newest 3 checkpoints, the best one by reward, ``final/``,
``metrics.jsonl``, ``metrics.png``, ``config.yaml``). Exit status 1 if the folder or the rows are not as
configured. Results: ``benchmarks/results/soak.md``. Linux only.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def make_trainer(config, samples: list, every: int, stop_at: int | None):
    """The demo's trainer, sampling RSS and descriptors after every ``every``-th step and sending itself
    SIGTERM after step ``stop_at``."""
    from grpokit.tasks.demo import char_tokenizer, letter_task, tiny_model
    from grpokit.training.trainer import GRPOTrainer

    class Watched(GRPOTrainer):
        def after_step(self):
            out = super().after_step()
            if self.step % every == 0:
                samples.append((self.step, rss_mb(), open_fds()))
            if self.step == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)  # handled after this step: checkpoint, then train() returns
            return out

    tokenizer = char_tokenizer()
    return Watched(tiny_model(tokenizer, seed=config.seed), "char_match", letter_task(), args=config,
                   tokenizer=tokenizer)


def slope_per_1000(points: list[tuple[int, float, int]]) -> float | None:
    """Least-squares slope of RSS (MB) against step, per 1,000 steps."""
    if len(points) < 2:
        return None
    steps, rss = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
    return float(np.polyfit(steps, rss, 1)[0] * 1000)


def expected_names(rows: list[dict], steps: int, save_steps: int, limit: int) -> set[str]:
    """What the output folder should hold at the end: run files, the newest ``limit`` checkpoints, the best."""
    saved = [s for s in range(save_steps, steps + 1, save_steps)] + ([steps] if steps % save_steps else [])
    reward = {r["step"]: r.get("reward") for r in rows}
    best = max((s for s in saved if reward.get(s) is not None), key=lambda s: reward[s])
    return ({"metrics.jsonl", "metrics.png", "config.yaml", "final"} | {f"checkpoint-{s}" for s in saved[-limit:]}
            | {f"checkpoint-{best}"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--save-steps", type=int, default=100)
    parser.add_argument("--save-total-limit", type=int, default=3)
    parser.add_argument("--sample-every", type=int, default=100)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak.md"))
    args = parser.parse_args()
    from grpokit.cli.demo import demo_config

    samples: list[tuple[int, float, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "soak"
        config = demo_config(output_dir=str(out), max_steps=args.steps, save_steps=args.save_steps,
                             save_total_limit=args.save_total_limit, metric_for_best_model="reward",
                             logging_steps=max(args.steps // 10, 1), reward_timeout_s=30.0)
        half = args.steps // 2
        start = time.perf_counter()
        first = make_trainer(config, samples, args.sample_every, stop_at=half).train()
        stopped_at = first[-1]["step"]
        resumed_from = len(samples)
        rows = make_trainer(config, samples, args.sample_every, stop_at=None).train(resume_from_checkpoint=True)
        seconds = time.perf_counter() - start
        names = {p.name for p in out.iterdir()}
        expected = expected_names(rows, args.steps, args.save_steps, args.save_total_limit)
    halves = samples[:resumed_from], samples[resumed_from:]
    slopes = [slope_per_1000(half[1:]) for half in halves]
    jump = halves[1][0][1] - halves[0][-1][1] if all(halves) else None
    fds = [p[2] for p in samples]
    shown = lambda slope: f"{slope:+.2f} MB per 1,000 steps" if slope is not None else "too few samples"
    lines = [
        "# Soak test", "",
        f"`python benchmarks/soak.py --steps {args.steps} --save-steps {args.save_steps} --save-total-limit "
        f"{args.save_total_limit} --sample-every {args.sample_every}`: the demo task, reward in a worker process, "
        f"SIGTERM after step {half} (the run stopped after step {stopped_at}), resumed in the same process to step "
        f"{rows[-1]['step']}; {seconds:.0f} s in all.", "",
        "| step | RSS (MB) | open file descriptors |", "|---|---|---|",
        *[f"| {s} | {r:.1f} | {n} |" for s, r, n in samples], "",
        f"- RSS slope, least squares, first half: {shown(slopes[0])}; resumed half: {shown(slopes[1])}",
        f"- RSS at the resume (a second trainer in the same process): {jump:+.1f} MB" if jump is not None else None,
        f"- open file descriptors: {min(fds)} to {max(fds)} (first {fds[0]}, last {fds[-1]})" if fds else None,
        f"- reward: {rows[0]['reward']:.3f} at step 1, {rows[-1]['reward']:.3f} at step {rows[-1]['step']}; "
        f"{len(rows)} metrics rows for {args.steps} steps",
        "- output folder as configured: " + (
            "yes, " + ", ".join(sorted(names)) if names == expected
            else f"NO: extra {sorted(names - expected)}, missing {sorted(expected - names)}"),
    ]
    text = "\n".join(line for line in lines if line is not None) + "\n"
    Path(args.out).write_text(text)
    print(text)
    if names != expected or [r["step"] for r in rows] != list(range(1, args.steps + 1)):
        sys.exit(1)


if __name__ == "__main__":
    main()
