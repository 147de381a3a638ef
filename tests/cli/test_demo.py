"""The embedded demo learns: reward from near random to >= 0.9 (about 8 s on 2 CPU cores)."""

import pytest

from grpokit.cli.demo import run_demo


@pytest.mark.slow
def test_demo_reward_rises_above_0_9(tmp_path):
    last = run_demo({"output_dir": str(tmp_path / "demo"), "logging_steps": 1000})
    rows = [line for line in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 200
    assert last["reward"] >= 0.9
    assert (tmp_path / "demo" / "checkpoint-200" / "model.safetensors").exists()
