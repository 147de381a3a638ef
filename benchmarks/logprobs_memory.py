"""Peak memory and time of token log-probs + entropy, forward + backward: materialised vs chunked.

    .venv/bin/python benchmarks/logprobs_memory.py            # full probe size: B*T=4096, H=896, V=151936
    .venv/bin/python benchmarks/logprobs_memory.py --small    # B*T=512, H=128, V=32000, a few seconds

Each measurement runs in a fresh subprocess (``--worker``): inputs are allocated and both code paths warmed
up on a tiny problem, then the peak RSS (``ru_maxrss``) is read as the baseline; the peak growth is the
``ru_maxrss`` after forward + backward minus that baseline. Two losses are timed:

* ``entropy logged``: loss = <g, logps>, entropy computed under the same call but not differentiated
  (what the trainer does);
* ``entropy in loss``: loss = <g, logps> + 0.01 * sum(entropy), so its gradient runs too.

Values and gradients of the two paths are compared (inputs come from the same seed). Results go to
``benchmarks/results/logprobs_memory.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL = dict(rows=4096, hidden=896, vocab=151_936)
SMALL = dict(rows=512, hidden=128, vocab=32_000)
PATHS = ("materialised", "chunked")
MODES = ("entropy logged", "entropy in loss")


def _inputs(rows, hidden, vocab, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=g).requires_grad_()  # normed hidden states: O(1) entries
    w = torch.randn(vocab, hidden, generator=g).mul_(0.05).requires_grad_()  # logits of std ~1.5; in place:
    # a temporary here would raise the baseline peak above what the step itself needs
    targets = torch.randint(0, vocab, (rows,), generator=g)
    g_lp = torch.randn(rows, generator=g)
    return h, w, targets, g_lp


def _step(path, mode, h, w, targets, g_lp, chunk_size, temperature):
    from grpokit.logprobs import materialized_token_logprobs, token_logprobs

    if path == "chunked":
        logps, entropy = token_logprobs(h, w, targets, temperature=temperature, chunk_size=chunk_size,
                                        return_entropy=True)
    else:
        logps, entropy = materialized_token_logprobs(h, w, targets, temperature=temperature,
                                                     return_entropy=True)
    loss = (logps * g_lp).sum()
    if mode == "entropy in loss":
        loss = loss + 0.01 * entropy.sum()
    h_grad, w_grad = __import__("torch").autograd.grad(loss, [h, w])
    return logps.detach(), entropy.detach(), h_grad, w_grad


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker(args) -> None:
    import torch

    h, w, targets, g_lp = _inputs(args.rows, args.hidden, args.vocab, args.seed)
    # warm up both paths (thread pools, BLAS/oneDNN state) on a tiny problem, so the baseline includes them
    tiny = _inputs(64, args.hidden, 1000, args.seed + 1)
    for path in PATHS:
        _step(path, "entropy in loss", *tiny, 16, args.temperature)
    del tiny
    baseline = _maxrss_bytes()
    slack = baseline - _rss_bytes()  # > 0: an earlier transient peak that the growth would hide
    t0, c0 = time.perf_counter(), _cpu_s()
    out = _step(args.worker, args.mode, h, w, targets, g_lp, args.chunk_size, args.temperature)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    peak = _maxrss_bytes()
    if args.save:
        torch.save(dict(zip(("logps", "entropy", "grad_hidden", "grad_weight"), out)), args.save)
    print(json.dumps({"growth_bytes": peak - baseline, "wall_s": wall, "cpu_s": cpu,
                      "baseline_bytes": baseline, "slack_bytes": slack}))


def _run_worker(path, mode, size, args, save=None) -> dict:
    cmd = [sys.executable, __file__, "--worker", path, "--mode", mode, "--rows", str(size["rows"]),
           "--hidden", str(size["hidden"]), "--vocab", str(size["vocab"]), "--seed", str(args.seed),
           "--temperature", str(args.temperature)]
    if args.chunk_size is not None:
        cmd += ["--chunk-size", str(args.chunk_size)]
    if save:
        cmd += ["--save", save]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"worker {path}/{mode} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _compare(file_a, file_b) -> dict:
    """Max |a - b| / max |b| per output (a: chunked, b: materialised)."""
    import torch

    a, b = torch.load(file_a), torch.load(file_b)
    return {k: ((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-30)).item() for k in b}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="quick run: B*T=512, H=128, V=32000")
    p.add_argument("--repeats", type=int, default=None, help="runs per case (default 3 small, 1 full)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="chunked path rows per chunk (default: auto, ~256 MiB; B*T/4 with --small)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "logprobs_memory.md")
    p.add_argument("--worker", choices=PATHS, help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, default=MODES[1], help=argparse.SUPPRESS)
    p.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    p.add_argument("--hidden", type=int, help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)

    import torch

    from grpokit.logprobs import default_chunk_size

    size = SMALL if args.small else FULL
    repeats = args.repeats or (3 if args.small else 1)
    if args.chunk_size is None:  # --small: several chunks even though all logits would fit in one
        args.chunk_size = size["rows"] // 4 if args.small else default_chunk_size(size["vocab"])
    chunk = args.chunk_size
    gib = 2**30
    rows_md, slack = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        # repeats interleave the two paths, so that load from other processes hits both alike
        runs = {(m, p): [] for m in MODES for p in PATHS}
        files = {(m, p): os.path.join(tmp, f"{p}-{m.replace(' ', '_')}.pt") for m in MODES for p in PATHS}
        for r in range(repeats):
            for mode in MODES:
                for path in PATHS:
                    res = _run_worker(path, mode, size, args, save=files[mode, path] if r == 0 else None)
                    runs[mode, path].append(res)
                    slack = max(slack, res["slack_bytes"])
                    print(f"[{r + 1}/{repeats}] {mode:16s} {path:12s} "
                          f"growth {res['growth_bytes'] / gib:7.3f} GiB  "
                          f"wall {res['wall_s']:7.2f} s  cpu {res['cpu_s']:7.2f} s", flush=True)
        for mode in MODES:
            keys = ("growth_bytes", "wall_s", "cpu_s")
            st = {p: {k: statistics.median(x[k] for x in runs[mode, p]) for k in keys} for p in PATHS}
            err = _compare(files[mode, "chunked"], files[mode, "materialised"])
            m, c = st["materialised"], st["chunked"]
            rows_md.append(
                f"| {mode} | {m['growth_bytes'] / gib:.3f} | {c['growth_bytes'] / gib:.3f} "
                f"| **{c['growth_bytes'] / m['growth_bytes']:.3f}** | {m['wall_s']:.1f} | {c['wall_s']:.1f} "
                f"| **{c['wall_s'] / m['wall_s']:.2f}** | {m['cpu_s']:.1f} | {c['cpu_s']:.1f} "
                f"| {c['cpu_s'] / m['cpu_s']:.2f} | "
                + ", ".join(f"{k} {v:.1e}" for k, v in err.items()) + " |"
            )
            print(rows_md[-1], flush=True)

    header = (
        f"# token_logprobs: chunked vs materialised, forward + backward\n\n"
        f"B*T = {size['rows']}, H = {size['hidden']}, V = {size['vocab']}, fp32, temperature "
        f"{args.temperature}, no bias; chunked path: {chunk} rows per chunk "
        f"({chunk * size['vocab'] * 4 / 2**20:.0f} MiB of fp32 logits).\n"
        f"Machine: {_cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}.\n"
        f"Each cell: median of {repeats} run(s), each in a fresh subprocess, the two paths interleaved. "
        f"Memory: peak RSS growth (ru_maxrss after the step minus ru_maxrss once inputs are allocated and "
        f"both paths warmed up; largest setup slack, ru_maxrss - RSS at the baseline: "
        f"{slack / 2**20:.0f} MiB). "
        f"Time: wall and process CPU (user + sys) of forward + backward.\n"
        f"Error: max |chunked - materialised| / max |materialised| per output (first run of each).\n"
        f"Command: `python benchmarks/logprobs_memory.py{' --small' if args.small else ''}"
        f"{f' --repeats {repeats}' if args.repeats else ''}`\n\n"
        "| loss | materialised GiB | chunked GiB | memory ratio | materialised wall s | chunked wall s "
        "| wall ratio | materialised CPU s | chunked CPU s | CPU ratio "
        "| relative error (chunked vs materialised) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + "\n".join(rows_md) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
