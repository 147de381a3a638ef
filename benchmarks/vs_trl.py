"""grpokit vs TRL 1.16, side by side: the same locally built model, task, batch and settings.

Each run is a fresh subprocess (so peak RSS is the run's own); runs alternate grpokit, TRL, grpokit, TRL...
and the table reports the median ``train()`` wall time of each, their ratio, completion tokens per second,
peak RSS, the final reward, and where the time went (generation, scoring, no-grad log-prob forwards, the
optimizer step's forward+backward, other), and the share of flat groups (each library's own metric:
``frac_zero_std_groups``, ``frac_reward_zero_std``).

    python benchmarks/vs_trl.py                      # all scales, 3 alternating repeats each
    python benchmarks/vs_trl.py --scales small --repeats 1
    python benchmarks/vs_trl.py --scales small,medium --prompts 1    # 1 prompt x 8 completions per step
    python benchmarks/vs_trl.py --out benchmarks/results/vs_trl.md

Scales (the settings the project's issues quote):
    small   2 layers, hidden 64,   200 steps, 8 prompts x 8 completions <= 12 tokens
    medium  6 layers, hidden 256,   30 steps, 8 x 8 <= 32 tokens
    vocab   2 layers, hidden 64, V = 151,936, 10 steps, 8 x 8 <= 32 tokens
    medium-short (on request) the medium model with completions <= 8 tokens: more of the time is per-call
            overhead and prompt prefill, less is matmuls over completion tokens
The task is the demo's ("say <letter> <n> times", graded ``char_match`` reward), lr 3e-3, beta 0, every other
setting each library's default (grpokit: loss ``grpo``; TRL: ``dapo``; both: AdamW, linear decay, clip 1.0).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

SCALES = {
    "small": dict(layers=2, hidden=64, vocab=None, steps=200, max_len=12),
    "medium": dict(layers=6, hidden=256, vocab=None, steps=30, max_len=32),
    "vocab": dict(layers=2, hidden=64, vocab=151_936, steps=10, max_len=32),
    "medium-short": dict(layers=6, hidden=256, vocab=None, steps=30, max_len=8),  # not in the default run
}
PROMPTS = int(os.environ.get("BENCH_PROMPTS", 8))  # prompts per step (--prompts); workers read it from here
GENERATIONS, LR, SEED = 8, 3e-3, 0


# ---------------------------------------------------------------------------------------------- workers


def build(scale: dict):
    """The shared model, tokenizer and dataset (built identically in every worker)."""
    from grpokit.tasks.demo import char_tokenizer, letter_task, tiny_model

    tokenizer = char_tokenizer()
    model = tiny_model(tokenizer, hidden_size=scale["hidden"], num_layers=scale["layers"], seed=SEED)
    if scale["vocab"]:  # same body, a large vocabulary: ids the tokenizer lacks decode to nothing
        model.resize_token_embeddings(scale["vocab"])
    return model, tokenizer, letter_task()


class Timers:
    """Exclusive wall time spent inside wrapped functions, by category: a wrapped call nested in another
    (TRL generates from inside ``training_step``) counts for its own category only."""

    def __init__(self):
        self.total = defaultdict(float)
        self.stack: list[float] = []  # time spent in nested wrapped calls, per open call

    def wrap(self, owner, name: str, category: str):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            self.stack.append(0.0)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                nested = self.stack.pop()
                self.total[category] += elapsed - nested
                if self.stack:
                    self.stack[-1] += elapsed

        setattr(owner, name, timed)


def run_grpokit(scale: dict, out_dir: str) -> dict:
    import grpokit.rewards as rewards_module
    import grpokit.training.trainer as trainer_module
    from grpokit import GRPOConfig, GRPOTrainer
    from grpokit.rollout.hf import HFEngine
    from grpokit.rollout.lean import LeanEngine

    model, tokenizer, data = build(scale)
    args = GRPOConfig(output_dir=out_dir, seed=SEED, max_steps=scale["steps"], learning_rate=LR,
                      prompts_per_step=PROMPTS, num_generations=GENERATIONS,
                      max_completion_length=scale["max_len"], beta=0.0, save_steps=0,
                      logging_steps=max(1, scale["steps"] // 4))
    timers = Timers()
    timers.wrap(LeanEngine, "generate", "generation")
    timers.wrap(HFEngine, "generate", "generation")
    timers.wrap(trainer_module if hasattr(trainer_module, "score") else rewards_module, "score", "scoring")
    timers.wrap(trainer_module.GRPOTrainer, "frozen_logps", "logprob forwards")
    timers.wrap(trainer_module.GRPOTrainer, "update", "train step")
    trainer = GRPOTrainer(model, "char_match", data, args=args, tokenizer=tokenizer)
    start = time.perf_counter()
    history = trainer.train()
    wall = time.perf_counter() - start
    tokens = sum(row["completion_length"] * PROMPTS * GENERATIONS for row in history)
    rewards = [row["reward"] for row in history]
    return dict(wall=wall, tokens=tokens, reward_first=rewards[0], reward_last=_tail_mean(rewards),
                flat=_mean([row["frac_zero_std_groups"] for row in history]), parts=dict(timers.total))


def run_trl(scale: dict, out_dir: str) -> dict:
    import trl.trainer.grpo_trainer as trl_module
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from grpokit.rewards.builtin import char_match

    model, tokenizer, data = build(scale)
    args = GRPOConfig(output_dir=out_dir, seed=SEED, max_steps=scale["steps"], learning_rate=LR,
                      per_device_train_batch_size=PROMPTS * GENERATIONS, num_generations=GENERATIONS,
                      max_completion_length=scale["max_len"], beta=0.0, logging_steps=1, report_to="none",
                      use_cpu=True, save_strategy="no", disable_tqdm=True)
    timers = Timers()
    timers.wrap(trl_module.GRPOTrainer, "_generate", "generation")
    timers.wrap(trl_module.GRPOTrainer, "_calculate_rewards", "scoring")
    timers.wrap(trl_module.GRPOTrainer, "training_step", "train step")
    trainer = GRPOTrainer(model=model, reward_funcs=char_match, train_dataset=Dataset.from_list(data), args=args,
                          processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "reward" in h]
    tokens = sum(h["completions/mean_length"] * PROMPTS * GENERATIONS for h in logs)
    rewards = [h["reward"] for h in logs]
    return dict(wall=wall, tokens=tokens, reward_first=rewards[0], reward_last=_tail_mean(rewards),
                flat=_mean([h["frac_reward_zero_std"] for h in logs]), parts=dict(timers.total))


def _tail_mean(values: list[float], n: int = 10) -> float:
    return _mean(values[-n:])


def _mean(values: list[float | None]) -> float:
    kept = [v for v in values if v is not None]
    return sum(kept) / max(len(kept), 1)


def worker(lib: str, scale_name: str) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as tmp:
        result = (run_grpokit if lib == "grpokit" else run_trl)(SCALES[scale_name], tmp)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["import_rss_mb"] = base_rss / 1024
    print("RESULT " + json.dumps(result))


# ---------------------------------------------------------------------------------------------- driver


def run_once(lib: str, scale: str) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__, "--worker", lib, "--scale", scale], capture_output=True,
                          text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{lib} {scale} failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="small,medium,vocab")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--prompts", type=int, default=PROMPTS, help="prompts per step, 8 completions each")
    parser.add_argument("--worker", choices=["grpokit", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--scale", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.scale)
    os.environ["BENCH_PROMPTS"] = str(args.prompts)  # the workers inherit it

    lines = ["| scale | grpokit s (median) | TRL s (median) | time ratio | grpokit tok/s | TRL tok/s | "
             "grpokit peak RSS MB | TRL peak RSS MB | RSS ratio | reward grpokit | reward TRL |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    parts_lines = ["| scale | library | generation | scoring | logprob forwards | train step | other |",
                   "|---|---|---|---|---|---|---|"]
    flat_lines = ["| scale | grpokit | TRL |", "|---|---|---|"]
    for scale in args.scales.split(","):
        runs = {"grpokit": [], "trl": []}
        for r in range(args.repeats):
            for lib in ("grpokit", "trl"):  # alternate, so drifts in machine load hit both
                res = run_once(lib, scale)
                runs[lib].append(res)
                print(f"{scale} #{r + 1} {lib}: {res['wall']:.2f} s, reward {res['reward_first']:.3f} -> "
                      f"{res['reward_last']:.3f}, peak RSS {res['peak_rss_mb']:.0f} MB, flat groups "
                      f"{res['flat']:.2f}", flush=True)
        med = {lib: statistics.median(x["wall"] for x in rs) for lib, rs in runs.items()}
        rss = {lib: statistics.median(x["peak_rss_mb"] for x in rs) for lib, rs in runs.items()}
        tps = {lib: statistics.median(x["tokens"] / x["wall"] for x in rs) for lib, rs in runs.items()}
        rew = {lib: statistics.median(x["reward_last"] for x in rs) for lib, rs in runs.items()}
        flat = {lib: statistics.median(x["flat"] for x in rs) for lib, rs in runs.items()}
        flat_lines.append(f"| {scale} | {flat['grpokit']:.2f} | {flat['trl']:.2f} |")
        lines.append(f"| {scale} | {med['grpokit']:.2f} | {med['trl']:.2f} | {med['grpokit'] / med['trl']:.3f} | "
                     f"{tps['grpokit']:.0f} | {tps['trl']:.0f} | {rss['grpokit']:.0f} | {rss['trl']:.0f} | "
                     f"{rss['grpokit'] / rss['trl']:.2f} | {rew['grpokit']:.3f} | {rew['trl']:.3f} |")
        for lib, rs in runs.items():
            parts = {k: statistics.median(x["parts"].get(k, 0.0) for x in rs)
                     for k in ("generation", "scoring", "logprob forwards", "train step")}
            other = med[lib] - sum(parts.values())
            parts_lines.append(f"| {scale} | {lib} | " + " | ".join(f"{v:.2f}" for v in parts.values())
                               + f" | {other:.2f} |")
    import platform

    import torch

    header = (f"Median of {args.repeats} alternating runs per library, {os.cpu_count()} CPU cores "
              f"({platform.processor() or platform.machine()}), torch {torch.__version__}, CPU, float32; "
              f"{args.prompts} prompts x {GENERATIONS} completions per step.")
    table = "\n".join([header, "", *lines, "", "Where the time goes (seconds, medians):", "", *parts_lines, "",
                       "Share of flat groups (all rewards equal: advantage 0), mean over the steps, median over runs:",
                       "", *flat_lines])
    print("\n" + table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
