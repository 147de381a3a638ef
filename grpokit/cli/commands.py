"""The ``grpokit`` subcommands around training (``grpokit.cli`` registers them):

    grpokit plot RUN_DIR [RUN_DIR ...] [-o FILE.png]     reward, KL, entropy, length, clip ratio of runs
    grpokit eval --model PATH --dataset D --reward R     mean reward and pass@k of sampled completions
    grpokit merge CHECKPOINT OUT [--base PATH]           LoRA checkpoint -> a plain merged model
    grpokit docs [-o FILE]                               docs/configuration.md from GRPOConfig

Bad input gives one line on stderr and exit status 2 (``--debug``: the traceback), as ``grpokit train``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

COMMANDS = ("plot", "eval", "merge", "docs")
EXIT_USAGE = 2


def add_commands(sub) -> None:
    """Add this module's subcommands to the ``grpokit`` subparsers ``sub``."""
    p = sub.add_parser("plot", help="plot reward, KL, entropy, completion length and clip ratio of runs",
                       description="Draw the metrics of one or more runs against step, one line per run (legend: "
                                   "the run folder's name), into a PNG.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run's output_dir (holds metrics.jsonl)")
    p.add_argument("-o", "--output", metavar="FILE.png",
                   help="where the PNG goes (default: RUN_DIR/metrics.png for one run, runs.png for several)")

    p = sub.add_parser("eval", help="sample k completions per prompt; mean reward and pass@k",
                       description="Sample completions with grpokit's sampler, score them with reward functions, "
                                   "and report the mean reward and pass@k (Chen et al. 2021, unbiased).")
    p.add_argument("--model", required=True, help="model folder, hub id, or a LoRA checkpoint of grpokit train")
    p.add_argument("--dataset", required=True,
                   help="prompts: a .jsonl/.json/.parquet/.csv file, a data or save_to_disk folder, or a dataset name")
    p.add_argument("--split", default="train", help="the dataset's split (default train)")
    p.add_argument("--dataset-config", default=None, metavar="NAME", help="the configuration of a dataset by name")
    p.add_argument("--reward", required=True, action="append", metavar="R",
                   help="reward function (built-in name, module:function, file.py:function); repeat to sum several")
    p.add_argument("--k", type=int, default=8, help="pass@k's k (default 8); also reports pass@1, 2, 4...")
    p.add_argument("--num-samples", type=int, default=None, metavar="N",
                   help="completions per prompt, >= k (default k); more lowers pass@k's variance")
    p.add_argument("--max-completion-length", type=int, default=256, metavar="N")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="0: greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--threshold", type=float, default=1.0,
                   help="a completion is correct when its reward is >= this (default 1.0)")
    p.add_argument("--system-prompt", default=None, help="prepended to every prompt, as in training")
    p.add_argument("--max-prompt-length", type=int, default=None, metavar="N")
    p.add_argument("--batch-size", type=int, default=64, help="completions sampled per batch (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16, float64")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--base", default=None, help="base model of a LoRA checkpoint (default: the one it names)")
    p.add_argument("--output", metavar="FILE.json", help="write the full result (with per-prompt counts) as JSON")

    p = sub.add_parser("merge", help="merge a LoRA checkpoint's adapters into its base model",
                       description="Fold the LoRA adapters of a grpokit checkpoint into the base model and write a "
                                   "plain model + tokenizer that from_pretrained loads without peft.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint-<step>/ folder of a LoRA run")
    p.add_argument("output", metavar="OUT", help="folder for the merged model")
    p.add_argument("--base", default=None, help="the base model (default: the path the adapters record)")

    p = sub.add_parser("docs", help="print docs/configuration.md (every GRPOConfig field)")
    p.add_argument("-o", "--output", metavar="FILE", help="write it here instead of stdout")

    for name in COMMANDS:
        sub.choices[name].add_argument("--debug", action="store_true", help="show tracebacks")


def run_command(args: argparse.Namespace) -> int:
    """Run subcommand ``args.command``; errors in the input are one line on stderr and exit status 2."""
    try:
        return {"plot": _plot, "eval": _eval, "merge": _merge, "docs": _docs}[args.command](args)
    except KeyboardInterrupt:
        print("grpokit: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as e:
        if args.debug:
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"grpokit: error: {message}", file=sys.stderr)
        return EXIT_USAGE


def _plot(args) -> int:
    from grpokit.reporting.plot import plot_run_dirs

    path = plot_run_dirs(args.run_dirs, args.output)
    print(f"grpokit: plotted {len(args.run_dirs)} run(s) to {path}")
    return 0


def _eval(args) -> int:
    from grpokit.training.evaluate import evaluate

    if args.output is not None and Path(args.output).suffix.lower() != ".json":
        raise ValueError(f"--output is a JSON file: give FILE.json, not {args.output!r}")
    result = evaluate(
        args.model, args.dataset, args.reward, k=args.k, num_samples=args.num_samples,
        max_completion_length=args.max_completion_length, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, threshold=args.threshold, system_prompt=args.system_prompt,
        max_prompt_length=args.max_prompt_length, batch_size=args.batch_size, seed=args.seed, dtype=args.dtype,
        device=args.device, base=args.base, split=args.split, dataset_config=args.dataset_config,
    )
    print(result.table())
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(result.to_json())
        print(f"grpokit: results in {args.output}")
    return 0


def _merge(args) -> int:
    from grpokit.models.lora import merge_checkpoint

    out = merge_checkpoint(args.checkpoint, args.output, base=args.base)
    print(f"grpokit: merged {args.checkpoint} into {out}/ (load it with AutoModelForCausalLM.from_pretrained)")
    return 0


def _docs(args) -> int:
    from grpokit.cli.docgen import render

    text = render()
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0
