"""grpokit vs TRL 1.16 at a shape people train: a random-init model with Qwen2.5-0.5B's exact shapes.

Hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864, vocabulary 151,936, tied embeddings; 2 prompts x 4
completions of up to 64 tokens, beta 0, the demo's task and reward. Each run is a fresh subprocess (peak RSS is
its own); runs alternate between the libraries. Reported per run: the per-step time (median over the steps
after the first), ``train()`` wall time, peak RSS, completion tokens per second, and the model FLOP
utilisation (MFU) against this machine's matmul peak in the run's compute dtype, which the script measures
first (an (896 x 4864) weight times 536 rows, ``torch.matmul``, best of several).

    python benchmarks/realistic_shape.py                          # grpokit fp32 / bf16, TRL fp32 / defaults
    python benchmarks/realistic_shape.py --runs grpokit-bf16,trl-default --repeats 1
    python benchmarks/realistic_shape.py --long                   # 1 prompt x 4 completions of 1,024 tokens
    python benchmarks/realistic_shape.py --out benchmarks/results/realistic_shape.md

For grpokit, the step's median split (its ``time/*`` metrics: the rollout, the training forward + backward,
clipping + AdamW) and the time ``train()`` spends outside the steps (the final checkpoint and plot).

Runs: ``grpokit-fp32`` (float32), ``grpokit-bf16`` (``bf16: true``), ``grpokit-bf16-gc`` (and
``gradient_checkpointing: true``), ``trl-fp32`` (``bf16=False``),
``trl-default`` (TRL's defaults: bf16 autocast and gradient checkpointing on). MFU counts 2 FLOPs per
parameter per token for every forward (sampling and the no-grad log-prob forwards) and 6 for each token of a
forward + backward; embeddings count once, as the tied LM head.
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
from pathlib import Path

SHAPE = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
             intermediate_size=4864, vocab_size=151_936, tie_word_embeddings=True)
SMOKE_SHAPE = dict(num_hidden_layers=2, vocab_size=1024)  # --smoke: checks the harness in seconds
RUNS = ("grpokit-fp32", "grpokit-bf16", "grpokit-bf16-gc", "trl-fp32", "trl-default")
SEED, LR = 0, 1e-6
PHASES = ("rollout", "forward_backward", "optimizer")  # grpokit's time/<phase>_s metrics


def settings(long: bool) -> dict:
    """Batch and length: the issue's shape, or the long-completion one."""
    if long:
        return dict(prompts=1, generations=4, max_len=1024, steps=3)
    return dict(prompts=2, generations=4, max_len=64, steps=4)


# ---------------------------------------------------------------------------------------------- workers


def build():
    """The model, tokenizer and task (identical in every worker): the demo's character tokenizer, the
    model's ids beyond it decode to nothing."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from grpokit.tasks.demo import char_tokenizer, letter_task

    tokenizer = char_tokenizer()
    shape = {**SHAPE, **(SMOKE_SHAPE if os.environ.get("BENCH_SMOKE") else {})}
    config = Qwen2Config(**shape, max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer, letter_task()


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied: the embedding once


def matmul_peak(dtype_name: str) -> float:
    """GFLOP/s of (536, 896) @ (896, 4864) in ``dtype_name``, best of 20 after a warm-up."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(536, 896, dtype=dtype), torch.randn(896, 4864, dtype=dtype)
    for _ in range(5):
        a @ b
    best = float("inf")
    for _ in range(20):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 536 * 896 * 4864 / best / 1e9


def run_grpokit(bf16: bool, checkpointing: bool, cfg: dict, out_dir: str) -> dict:
    from grpokit import GRPOConfig, GRPOTrainer

    model, tokenizer, data = build()
    n_params = parameter_count(model)
    args = GRPOConfig(output_dir=out_dir, seed=SEED, max_steps=cfg["steps"], learning_rate=LR,
                      prompts_per_step=cfg["prompts"], num_generations=cfg["generations"],
                      max_completion_length=cfg["max_len"], beta=0.0, save_steps=0, logging_steps=1, bf16=bf16,
                      gradient_checkpointing=checkpointing)
    trainer = GRPOTrainer(model, "char_match", data, args=args, tokenizer=tokenizer)
    start = time.perf_counter()
    history = trainer.train()
    wall = time.perf_counter() - start
    steps = [row["step_time"] for row in history]
    lengths = [row["completion_length"] for row in history]
    flat = [row["frac_zero_std_groups"] for row in history]  # their rows skip the forward + backward
    phases = {name: [row[f"time/{name}_s"] for row in history] for name in PHASES}
    return dict(steps=steps, wall=wall, lengths=lengths, params=n_params, trained=1 - sum(flat) / len(flat),
                phases=phases)


def run_trl(default: bool, cfg: dict, out_dir: str) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from grpokit.rewards.builtin import char_match

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.last = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter() if self.last is None else self.last

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.times.append(now - self.last)
            self.last = now

    model, tokenizer, data = build()
    n_params = parameter_count(model)
    extra = {} if default else dict(bf16=False, gradient_checkpointing=False)
    args = GRPOConfig(output_dir=out_dir, seed=SEED, max_steps=cfg["steps"], learning_rate=LR,
                      per_device_train_batch_size=cfg["prompts"] * cfg["generations"],
                      num_generations=cfg["generations"], max_completion_length=cfg["max_len"], beta=0.0,
                      logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, **extra)
    timer = StepTimes()
    trainer = GRPOTrainer(model=model, reward_funcs=char_match, train_dataset=Dataset.from_list(data), args=args,
                          processing_class=tokenizer, callbacks=[timer])
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return dict(steps=timer.times, wall=wall, lengths=lengths, params=n_params,
                bf16=bool(args.bf16), gradient_checkpointing=bool(args.gradient_checkpointing))


def worker(run: str, long: bool) -> None:
    cfg = settings(long)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as tmp:
        if run.startswith("grpokit"):
            result = run_grpokit("bf16" in run, run.endswith("-gc"), cfg, tmp)
        else:
            result = run_trl(run.endswith("default"), cfg, tmp)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["import_rss_mb"] = base_rss / 1024
    print("RESULT " + json.dumps(result))


# ---------------------------------------------------------------------------------------------- driver


def run_once(run: str, long: bool) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, __file__, "--worker", run] + (["--long"] if long else [])
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{run} failed:\n{proc.stderr[-3000:]}")


def step_flops(params: int, cfg: dict, completion_length: float, trained: float = 1.0) -> float:
    """Model FLOPs of one optimizer step: sampling (2 per parameter per prompt and completion token) and one
    forward + backward (6) over the share ``trained`` of the rows that were trained (grpokit does not run the
    rows of flat groups: their gradient is exactly 0); the prompts are a few tokens, counted as 8."""
    tokens = cfg["prompts"] * cfg["generations"] * (8 + completion_length)
    return 2 * params * tokens + 6 * params * tokens * trained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--long", action="store_true", help="1 prompt x 4 completions of up to 1,024 tokens")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--smoke", action="store_true", help="2 layers, V = 1,024: check the harness only")
    parser.add_argument("--worker", choices=RUNS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.long)

    import platform

    import torch

    if args.smoke:
        os.environ["BENCH_SMOKE"] = "1"  # the workers inherit it
    cfg = settings(args.long)
    peaks = {"float32": matmul_peak("float32"), "bfloat16": matmul_peak("bfloat16")}
    runs = args.runs.split(",")
    results: dict[str, list[dict]] = {run: [] for run in runs}
    for r in range(args.repeats):
        for run in runs:  # alternate, so drifts in machine load hit every run
            res = run_once(run, args.long)
            results[run].append(res)
            print(f"#{r + 1} {run}: steps {[round(t, 1) for t in res['steps']]} s, wall {res['wall']:.1f} s, "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)

    lines = ["| run | step time s (median of steps 2+) | train() wall s | peak RSS MB | completion tok/s | "
             "rows trained | MFU |", "|---|---|---|---|---|---|---|"]
    summary = {}
    for run, rs in results.items():
        step = statistics.median(statistics.median(x["steps"][1:] or x["steps"]) for x in rs)
        wall = statistics.median(x["wall"] for x in rs)
        rss = statistics.median(x["peak_rss_mb"] for x in rs)
        length = statistics.median(statistics.mean(x["lengths"]) for x in rs)
        tokens = cfg["prompts"] * cfg["generations"] * length
        dtype = "bfloat16" if "bf16" in run or run == "trl-default" else "float32"
        recompute = 2 if run in ("trl-default", "grpokit-bf16-gc") else 1  # checkpointing: the forward runs twice
        trained = statistics.median(x.get("trained", 1.0) for x in rs)
        recomputed = (recompute - 1) * 2 * rs[0]["params"] * tokens * trained
        flops = step_flops(rs[0]["params"], cfg, length, trained) + recomputed
        mfu = flops / step / (peaks[dtype] * 1e9)
        summary[run] = dict(step=step, rss=rss)
        lines.append(f"| {run} | {step:.1f} | {wall:.1f} | {rss:.0f} | {tokens / step:.1f} | {trained:.2f} | "
                     f"{mfu:.3f} |")
    split = [f"| {run} | " + " | ".join(
        f"{statistics.median(statistics.median(x['phases'][p][1:] or x['phases'][p]) for x in rs):.2f}"
        for p in PHASES) + f" | {statistics.median(x['wall'] - sum(x['steps']) for x in rs):.1f} |"
        for run, rs in results.items() if "phases" in rs[0]]
    if split:  # where grpokit's step goes (its time/* metrics), and train()'s time outside the steps
        lines += ["", "| run | rollout s | forward + backward s | clip + AdamW s | train() outside steps s "
                  "(final checkpoint, plot) |", "|---|---|---|---|---|", *split]
    ratios = []
    for ours, theirs in (("grpokit-bf16", "trl-default"), ("grpokit-bf16-gc", "trl-default"),
                         ("grpokit-fp32", "trl-fp32"), ("grpokit-bf16", "grpokit-fp32")):
        if ours in summary and theirs in summary:
            ratios.append(f"| {ours} / {theirs} | {summary[ours]['step'] / summary[theirs]['step']:.2f} | "
                          f"{summary[ours]['rss'] / summary[theirs]['rss']:.2f} |")
    header = (f"Qwen2.5-0.5B shapes (random init), {cfg['prompts']} prompts x {cfg['generations']} completions of "
              f"up to {cfg['max_len']} tokens, {cfg['steps']} steps, beta 0; median of {args.repeats} alternating "
              f"run(s); {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch "
              f"{torch.__version__}. Matmul peak measured here: float32 {peaks['float32']:.0f} GFLOP/s, bfloat16 "
              f"{peaks['bfloat16']:.0f} GFLOP/s.")
    table = "\n".join([header, "", *lines, "", "| ratio | step time | peak RSS |", "|---|---|---|", *ratios])
    print("\n" + table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
