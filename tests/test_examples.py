"""examples/trl_quickstart.py runs offline, and its TRL-default config is a valid GRPOConfig."""

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trl_quickstart.py"


def load_example():
    spec = importlib.util.spec_from_file_location("trl_quickstart", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trl_quickstart_runs_offline(tmp_path):
    example = load_example()
    config = example.trl_defaults()
    assert (config.rollout_size, config.mini_batch_size, config.loss_type) == (8, 8, "dapo")
    history = example.main(["--max_steps", "3", "--output_dir", str(tmp_path / "run")])
    assert [r["step"] for r in history] == [1, 2, 3]
    assert (tmp_path / "run" / "checkpoint-3").is_dir()


def test_tools_quickstart_runs_offline(tmp_path):
    path = EXAMPLE.parent / "tools_quickstart.py"
    spec = importlib.util.spec_from_file_location("tools_quickstart", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    history = example.main(["--max-steps", "2", "--output_dir", str(tmp_path / "run")])
    assert [r["step"] for r in history] == [1, 2]
    assert {"tools/turns", "tools/call_frequency", "tools/failure_frequency"} <= set(history[-1])
    assert example.accuracy([[{"role": "assistant", "content": "it is 12"}], "56"], [12, 65]) == [1.0, 0.0]
