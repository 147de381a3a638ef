"""Process vs outcome supervision on the synthetic step task (``grpokit.tasks.steps``), same everything else.

    .venv/bin/python benchmarks/process_vs_outcome.py                     # 3 seeds x 100 steps, four modes
    .venv/bin/python benchmarks/process_vs_outcome.py --seeds 0 --steps 50

Task: the user says a letter, the answer is 3 ``;``-terminated steps of it ("c" -> "c;c;c;"), on a character
tokenizer of "abcd;" (a random policy gets a few % of the steps). Two verifiers, each scoring a step position
by position over 3, and each run twice, with the same numbers given as step rewards (process supervision,
DeepSeekMath 4.1.3) or as their sum (outcome supervision, 4.1.2):

* ``delimited``: one step per ``;``-delimited segment of the completion (``count_steps`` with
  ``step_delimiter: ";"`` / ``count_outcome``); a completion with more segments has more steps;
* ``fixed``: the completion cut at the target steps' positions, always 3 steps (``count_fixed_steps`` as
  (reward, char_end) pairs / ``count_fixed_outcome``).

Model: the random-init Llama of ``grpokit.tasks.demo`` (2 layers, hidden 64); 8 prompts x 8 completions per step,
completions of at most 6 tokens. ``reward`` is the share of right steps under the run's verifier. Results:
``benchmarks/results/process_vs_outcome.md`` (mean over seeds of the reward at steps 1/25/50/..., each point
the mean of the 5 steps ending there) and the curves as JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {"outcome_delimited": "count_outcome", "process_delimited": "count_steps",
         "outcome_fixed": "count_fixed_outcome", "process_fixed": "count_fixed_steps"}


def run(mode: str, seed: int, steps: int, lr: float, workdir: Path) -> list[float]:
    from grpokit.config import GRPOConfig
    from grpokit.tasks import steps as step_task
    from grpokit.tasks.demo import char_tokenizer, tiny_model
    from grpokit.training.trainer import GRPOTrainer

    tokenizer = char_tokenizer("abcd;")
    model = tiny_model(tokenizer, seed=seed)
    extra = {"process_fixed": dict(process_supervision=True),
             "process_delimited": dict(process_supervision=True, step_delimiter=";")}.get(mode, {})
    config = GRPOConfig(output_dir=str(workdir / f"{mode}-{seed}"), seed=seed, max_steps=steps, learning_rate=lr,
                        prompts_per_step=8, num_generations=8, max_completion_length=6, save_steps=0,
                        logging_steps=10_000, **extra)
    reward = getattr(step_task, MODES[mode])
    trainer = GRPOTrainer(model, reward, step_task.counting_task("abcd", count=False), args=config,
                          tokenizer=tokenizer)
    return [row["reward"] for row in trainer.train()]


def window(values: list[float], end: int, width: int = 5) -> float:
    """Mean of values[end - width : end] (steps end-width+1 .. end, 1-based)."""
    part = values[max(0, end - width):end]
    return sum(part) / len(part)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "process_vs_outcome.md"))
    args = parser.parse_args()

    curves: dict[str, list[list[float]]] = {m: [] for m in MODES}
    times: dict[str, list[float]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for mode in MODES:  # alternate modes so machine load hits both alike
                start = time.perf_counter()
                curves[mode].append(run(mode, seed, args.steps, args.lr, Path(tmp)))
                times[mode].append(time.perf_counter() - start)
                curve = curves[mode][-1]
                print(f"{mode} seed {seed}: reward {curve[0]:.3f} -> {window(curve, args.steps):.3f} in "
                      f"{times[mode][-1]:.1f} s", flush=True)

    points = [1] + list(range(args.every, args.steps + 1, args.every))
    lines = ["# Process vs outcome supervision (step task \"c\" -> \"c;c;c;\", `grpokit.tasks.steps`)", "",
             f"Share of right steps (the `reward` of every run), mean over seeds {args.seeds}; each point is the mean "
             "of the 5 steps ending there (step 1: itself). Random-init 2-layer Llama (hidden 64), character "
             f"tokenizer of \"abcd;\", 8 prompts x 8 completions, lr {args.lr:g}, max 6 completion tokens, "
             "`loss_type: grpo`, beta 0. Command: `.venv/bin/python benchmarks/process_vs_outcome.py --seeds "
             f"{' '.join(map(str, args.seeds))} --steps {args.steps} --lr {args.lr:g}`.", "",
             "| step | " + " | ".join(str(p) for p in points) + " |",
             "|---|" + "---|" * len(points)]
    for mode in MODES:
        means = [statistics.mean(window(c, p, 1 if p == 1 else 5) for c in curves[mode]) for p in points]
        lines.append(f"| {mode} | " + " | ".join(f"{v:.3f}" for v in means) + " |")
    for mode in MODES:
        per_seed = ", ".join(f"{window(c, args.steps):.3f}" for c in curves[mode])
        lines.append(f"\n{mode}: final 5-step reward per seed {per_seed}; "
                     f"{statistics.mean(times[mode]) / args.steps * 1000:.0f} ms/step")
    first_hit = {m: [next((i + 1 for i in range(len(c)) if window(c, i + 1) >= 0.5), None) for c in curves[m]]
                 for m in MODES}
    lines.append("\nFirst step whose 5-step mean reward reaches 0.5, per seed: "
                 + "; ".join(f"{m} {first_hit[m]}" for m in MODES))
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"seeds": args.seeds, "curves": curves}) + "\n")
    print(text)


if __name__ == "__main__":
    main()
