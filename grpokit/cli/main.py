"""The ``grpokit`` command line.

    grpokit verify                                   re-check the GRPO theory on this machine
    grpokit train                                    the embedded demo (tiny model, learns in seconds)
    grpokit train --config run.yaml [--key value]    a GRPO run described by a YAML file
    grpokit plot | eval | merge | docs               around training (see grpokit.cli.commands)

The YAML keys are the ``GRPOConfig`` fields plus ``model`` (path or hub id), ``dataset`` (a path or a dataset
name), ``reward_funcs`` (list of built-in names, "module:function" or "path/file.py:function"), and optionally
``ref_model``, ``tokenizer`` and ``resume_from_checkpoint``. ``--key value`` overrides a key; the value is
read as YAML (``--reward_weights "[1, 0.5]"``). ``--resume`` continues the run in ``output_dir`` from its
newest checkpoint; ``--overwrite`` replaces an earlier run there (without either, such a start is refused).
Bad input gives one line on stderr and exit status 2; a run stopped by a non-finite loss or gradient, or by a
checkpoint it could not write, exit status 1 (``--debug`` shows the traceback). SIGTERM, SIGINT or SIGUSR1
during training stops the run after its current step with a checkpoint and the command that resumes it,
exit status 0; a second one exits at once (``grpokit.training.signals``).

Each command imports what it runs inside its own function: ``grpokit --help`` and a mistyped config key
answer without loading torch and transformers (seconds). The layering itself holds for these imports too
(``make lint``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, NoReturn

RUN_KEYS = ("model", "dataset", "reward_funcs", "ref_model", "tokenizer", "resume_from_checkpoint")
EXIT_USAGE = 2  # bad input: config, data, model path, reward functions
EXIT_FAILED = 1  # the run itself broke (a non-finite loss or gradient, a checkpoint that cannot be written)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="grpokit", description="GRPO training with a machine-checked loss.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_verify = sub.add_parser("verify", help="re-check the GRPO theory (eq. 20/21, KL gradients, ...) here")
    p_verify.add_argument("--seed", type=int, default=0)
    p_train = sub.add_parser(
        "train", help="train with GRPO (no --config: the embedded demo)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_fields_help(),
        description="Train a causal LM with GRPO. Without --config, runs the embedded demo (a tiny random-init "
                    "model learns a letter task on CPU; results in runs/demo/).",
    )
    p_train.add_argument("--config", help="YAML file: GRPOConfig fields + model, dataset, reward_funcs")
    p_train.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                         help="continue the run in output_dir from its newest checkpoint (or from CHECKPOINT)")
    p_train.add_argument("--overwrite", action="store_true",
                         help="start afresh even if output_dir holds an earlier run (overwrite_output_dir: true)")
    p_train.add_argument("--debug", action="store_true", help="show tracebacks")
    from grpokit.cli.commands import COMMANDS, add_commands, run_command

    add_commands(sub)  # plot, eval, merge, docs
    args, rest = parser.parse_known_args(argv)
    if args.command in COMMANDS:
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return run_command(args)
    if args.command == "verify":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        from grpokit.cli.verify import run_verify

        return run_verify(seed=args.seed)
    from grpokit.training.checkpoint import CheckpointError
    from grpokit.training.guards import TrainingError

    try:
        return run_train(args.config, parse_overrides(rest) | train_flags(args))
    except KeyboardInterrupt:
        print("grpokit: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError, TrainingError) as e:
        if args.debug:
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"grpokit: error: {message}", file=sys.stderr)
        return EXIT_FAILED if isinstance(e, (TrainingError, CheckpointError)) else EXIT_USAGE
    finally:  # under torchrun (see console)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def console() -> NoReturn:
    """The ``grpokit`` command and ``python -m grpokit``: ``main()``, then exit with its status.

    Under torchrun, DistributedDataParallel keeps gloo's process group, and its worker threads, alive past
    ``destroy_process_group``; when such a thread releases a finished collective's tensors while the interpreter
    is shutting down, it cannot take the GIL and the process aborts (SIGABRT) after all its work is done, and
    torchrun reports the run as failed. So once ``main()`` has closed every file and tracker, a process that ran
    under torchrun leaves with ``os._exit``, skipping interpreter teardown."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def train_flags(args: argparse.Namespace) -> dict[str, Any]:
    """``--resume [CHECKPOINT]`` and ``--overwrite`` as config keys (they win over the YAML file)."""
    flags: dict[str, Any] = {}
    if args.resume is not None and args.overwrite:
        raise ValueError("give --resume (continue the run in output_dir) or --overwrite (replace it), not both")
    if args.resume is not None:
        flags["resume_from_checkpoint"] = args.resume
    if args.overwrite:
        flags["overwrite_output_dir"] = True
    return flags


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """``--key value`` / ``--key=value`` pairs -> {key: yaml.safe_load(value)}."""
    import yaml

    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise ValueError(f"unexpected argument {token!r}: overrides are --key value")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise ValueError(f"--{key} needs a value")
            value, i = tokens[i + 1], i + 1
        try:
            out[key.replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.replace("-", "_")] = value
        i += 1
    return out


def run_train(config_path: str | None, overrides: dict[str, Any]) -> int:
    from grpokit.config import GRPOConfig, check_keys, read_yaml

    data = read_yaml(config_path) if config_path else {}
    data.update(overrides)
    check_keys(data, GRPOConfig.field_names() + RUN_KEYS)
    run = {key: data.pop(key) for key in RUN_KEYS if key in data}

    if config_path is None and "model" not in run:  # the embedded demo, with any overrides applied
        extra = [k for k in run if k != "resume_from_checkpoint"]
        if extra:
            raise ValueError(f"{extra[0]!r} needs a full run config: give --config FILE.yaml")
        from grpokit.cli.demo import run_demo

        last = run_demo(overrides=data, resume_from_checkpoint=run.get("resume_from_checkpoint"))
        return 0 if last is not None else 1

    for key in ("model", "dataset", "reward_funcs"):
        if key not in run:
            raise ValueError(f"the config has no {key!r} key (needed besides the GRPOConfig fields)")
    config = GRPOConfig.from_dict(data)
    preflight(config, run)
    from grpokit.training.trainer import GRPOTrainer

    trainer = GRPOTrainer(run["model"], run["reward_funcs"], run["dataset"], args=config,
                          ref_model=run.get("ref_model"), tokenizer=run.get("tokenizer"))
    trainer.resume_hint = resume_command(config_path, overrides)  # printed if a signal stops the run
    try:
        history = trainer.train(resume_from_checkpoint=run.get("resume_from_checkpoint"))
    finally:
        trainer.close()  # the rollout engine's memory (vLLM)
    if history and trainer.world.is_main and trainer.stopped_by is None:  # rank 0 speaks for every process
        last = history[-1]
        print(f"grpokit: done, step {last['step']}, reward {last['reward']}; results in {config.output_dir}/")
    return 0


def resume_command(config_path: str | None, overrides: dict[str, Any]) -> str:
    """The ``grpokit train`` command line that continues this run: its config, its overrides, ``--resume``."""
    import json
    import shlex

    parts = ["grpokit", "train"] + (["--config", shlex.quote(str(config_path))] if config_path else [])
    for key, value in overrides.items():
        if key not in ("resume_from_checkpoint", "overwrite_output_dir"):
            parts += [f"--{key}", shlex.quote(value if isinstance(value, str) else json.dumps(value))]
    return " ".join(parts + ["--resume"])


def preflight(config, run: dict[str, Any]) -> None:
    """The checks that need no model: an earlier run in output_dir, local model/tokenizer paths that do not
    exist (the dataset and the reward functions are checked by the trainer before it loads the model)."""
    from grpokit.models.preflight import check_model_source
    from grpokit.training.run_dir import check_output_dir

    check_output_dir(config.output_dir, resume=bool(run.get("resume_from_checkpoint")),
                     overwrite=config.overwrite_output_dir)
    for key in ("model", "ref_model", "tokenizer"):
        check_model_source(run.get(key), key)


def _fields_help() -> str:
    from grpokit.config import GRPOConfig, field_docs

    docs = field_docs()
    defaults = GRPOConfig().to_dict()
    lines = ["config keys (YAML or --key value):",
             "  model                 model path or hub id (AutoModelForCausalLM)",
             "  dataset               .jsonl/.json/.parquet/.csv file, a data or save_to_disk folder, or a Hub",
             "                        dataset name (dataset_config, dataset_split); column 'prompt'",
             "  reward_funcs          list of built-in names, 'module:function' or 'path/file.py:function'",
             "  ref_model, tokenizer  optional paths",
             "  resume_from_checkpoint  true (newest in output_dir) or a checkpoint path"]
    for name, default in defaults.items():
        doc = " ".join(docs.get(name, "").replace("``", "").split())
        first = re.split(r"\.\s+(?=[A-Z])", doc)[0].rstrip(".")
        lines.append(f"  {name:<22}{first} (default: {default})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
