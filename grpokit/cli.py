"""The ``grpokit`` command line: ``grpokit verify`` (and more subcommands as they land)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="grpokit", description="GRPO training with a machine-checked loss.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_verify = sub.add_parser("verify", help="re-check the GRPO theory (eq. 20/21, KL gradients, ...) here")
    p_verify.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "verify":
        from grpokit.verify import run_verify

        return run_verify(seed=args.seed)
    return 2


if __name__ == "__main__":
    sys.exit(main())
