"""DAPO dynamic sampling on the demo task: how many sampling rounds it takes, what it drops, what it buys.

    .venv/bin/python benchmarks/dynamic_sampling.py                  # seeds 0 1 2, 150 steps, on and off
    .venv/bin/python benchmarks/dynamic_sampling.py --seeds 0 --steps 60

Task: ``grpokit.tasks.demo`` ("c" -> "cccc", graded ``char_match``, random-init 2-layer Llama, 8 prompts x 8
completions, lr 3e-3) with binary rewards instead: 1 when the completion is exactly the target (a random
policy: ~1e-7), plus ``char_match`` at weight 0.1 so that the start is not flat. As the policy learns, more
groups become all-right (flat, advantage 0); dynamic sampling (``max_sampling_rounds: 4``) replaces them.
Results: ``benchmarks/results/dynamic_sampling.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def exact(prompts, completions, completion_ids=None, *, target, **_):
    return [float(c[0]["content"] == t) for c, t in zip(completions, target)]


def run(seed: int, steps: int, dynamic: bool, workdir: Path) -> tuple[list[dict], float]:
    from grpokit.cli.demo import demo_config
    from grpokit.tasks.demo import char_tokenizer, letter_task, tiny_model
    from grpokit.training.trainer import GRPOTrainer

    tokenizer = char_tokenizer()
    config = demo_config(output_dir=str(workdir / f"{seed}-{dynamic}"), seed=seed, max_steps=steps,
                         dynamic_sampling=dynamic, max_sampling_rounds=4, reward_weights=[1.0, 0.1],
                         logging_steps=10_000)
    trainer = GRPOTrainer(tiny_model(tokenizer, seed=seed), [exact, "char_match"], letter_task(), args=config,
                          tokenizer=tokenizer)
    start = time.perf_counter()
    rows = trainer.train()
    return rows, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dynamic_sampling.md"))
    args = parser.parse_args()
    windows = [(1, 25), (26, 50), (51, 75), (76, 100), (101, 125), (126, 150)]
    windows = [(a, min(b, args.steps)) for a, b in windows if a <= args.steps]
    results = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for dynamic in (False, True):
                rows, seconds = run(seed, args.steps, dynamic, Path(tmp))
                results[dynamic].append((rows, seconds))
                print(f"seed {seed} dynamic={dynamic}: exact-match share {rows[0]['rewards/exact']:.2f} -> "
                      f"{rows[-1]['rewards/exact']:.2f} in {seconds:.1f} s", flush=True)

    def mean_over(rows_list, key, a, b):
        return statistics.mean(statistics.mean(r[key] for r in rows[a - 1:b]) for rows, _ in rows_list)

    lines = ["# DAPO dynamic sampling (demo task, binary exact-match reward + 0.1 x char_match)", "",
             f"Mean over seeds {args.seeds}, per window of steps. `rounds`: sampling rounds per rollout (cap 4); "
             "`dropped`: flat groups dropped per rollout (of 8 kept); `exact`: share of completions exactly right; "
             "`flat`: share of flat groups in the trained batch. Command: `.venv/bin/python "
             f"benchmarks/dynamic_sampling.py --seeds {' '.join(map(str, args.seeds))} --steps {args.steps}`.", "",
             "| steps | " + " | ".join(f"{a}-{b}" for a, b in windows) + " |",
             "|---|" + "---|" * len(windows)]
    for key, label in (("dynamic_sampling/rounds", "rounds (on)"), ("dynamic_sampling/dropped_groups", "dropped (on)")):
        lines.append(f"| {label} | " + " | ".join(f"{mean_over(results[True], key, a, b):.2f}" for a, b in windows)
                     + " |")
    for dynamic in (False, True):
        name = "on" if dynamic else "off"
        for key, label in (("rewards/exact", "exact"), ("frac_zero_std_groups", "flat")):
            lines.append(f"| {label} ({name}) | " + " | ".join(
                f"{mean_over(results[dynamic], key, a, b):.2f}" for a, b in windows) + " |")
    for dynamic in (False, True):
        secs = statistics.mean(s for _, s in results[dynamic])
        lines.append(f"\ndynamic sampling {'on' if dynamic else 'off'}: {secs / args.steps * 1000:.0f} ms/step")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
