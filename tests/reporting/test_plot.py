"""``grpokit plot``: several runs on one PNG, labelled by folder name; clear errors."""

import json

from grpokit.cli import main
from grpokit.reporting.plot import run_labels


def write_run(folder, rewards, kl=None):
    folder.mkdir(parents=True)
    rows = [{"step": i + 1, "reward": r, "reward_std": 0.1, "entropy": 2.0 - 0.1 * i, "completion_length": 4.0,
             "clip_ratio": 0.0, **({"kl": kl} if kl is not None else {})} for i, r in enumerate(rewards)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_plot_several_runs_to_one_png(tmp_path, capsys):
    a = write_run(tmp_path / "lr_1e-3", [0.1, 0.3, 0.6])
    b = write_run(tmp_path / "lr_3e-3", [0.1, 0.5, 0.9], kl=0.01)
    out = tmp_path / "figs" / "compare.png"
    assert main(["plot", str(a), str(b), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert "plotted 2 run(s)" in capsys.readouterr().out
    assert main(["plot", str(a)]) == 0 and (a / "metrics.png").is_file()  # one run: next to its metrics


def test_labels_and_errors(tmp_path, capsys):
    assert run_labels([tmp_path / "x" / "run", tmp_path / "y" / "run"]) == ["x/run", "y/run"]
    assert run_labels([tmp_path / "a", tmp_path / "b"]) == ["a", "b"]
    assert main(["plot", str(tmp_path / "nope")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
    run = write_run(tmp_path / "r", [0.1])
    assert main(["plot", str(run), "-o", str(tmp_path / "x.pdf")]) == 2
    assert "PNG" in capsys.readouterr().err
