"""``grpokit plot RUN_DIR [RUN_DIR ...] [-o FILE.png]``: several runs' curves on one figure.

Each run is read from its ``metrics.jsonl`` and labelled by its folder name (with as many parent folders as
it takes to tell runs apart); the drawing is ``grpokit.reporting.metrics.plot_runs``, the same as each run's own
``metrics.png``.
"""

from __future__ import annotations

from pathlib import Path

from grpokit.reporting.metrics import plot_runs, read_metrics


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Shortest distinct labels: the folder names, or their last two, three... parts when names collide."""
    parts = [Path(d).resolve().parts for d in run_dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(d) for d in run_dirs]


def plot_run_dirs(run_dirs: list[str | Path], output: str | Path | None = None) -> Path:
    """Plot the runs in ``run_dirs`` to ``output`` (default: ``RUN_DIR/metrics.png`` for one run,
    ``runs.png`` for several); returns the PNG's path."""
    if not run_dirs:
        raise ValueError("give at least one run folder (one that holds a metrics.jsonl)")
    run_dirs = [Path(d) for d in run_dirs]
    runs = {}
    for label, folder in zip(run_labels(run_dirs), run_dirs):
        path = folder / "metrics.jsonl"
        if not path.is_file():
            raise ValueError(f"{str(folder)!r} has no metrics.jsonl: not a grpokit run folder")
        rows = [r for r in read_metrics(path) if "step" in r]
        if not rows:
            raise ValueError(f"{str(path)!r} holds no metrics rows yet")
        runs[label] = rows
    if output is None:
        output = run_dirs[0] / "metrics.png" if len(run_dirs) == 1 else Path("runs.png")
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise ValueError(f"the plot is a PNG: give -o FILE.png, not {str(output)!r}")
    output.parent.mkdir(parents=True, exist_ok=True)
    plot_runs(runs, output)
    return output
