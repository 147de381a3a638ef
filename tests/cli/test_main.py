"""``grpokit train``: a YAML run on a tiny local model, overrides, the demo path, and one-line errors."""

import json
import subprocess
import sys

import pytest
import yaml

from grpokit.cli import main
from grpokit.cli.main import parse_overrides
from tests.helpers import save_tiny_model

REWARD_FILE = """
def has_a(prompts, completions, completion_ids, answer, **kwargs):
    return [float(a in c) for c, a in zip(completions, answer)]

def broken(prompts, completions, **kwargs):
    raise KeyError("oops")
"""


@pytest.fixture()
def run_dir(tmp_path):
    save_tiny_model(tmp_path / "model", "abcd")
    (tmp_path / "data.jsonl").write_text("".join(
        json.dumps({"prompt": [{"role": "user", "content": c}], "answer": c}) + "\n" for c in "abcd"))
    (tmp_path / "rewards.py").write_text(REWARD_FILE)
    config = {"model": str(tmp_path / "model"), "dataset": str(tmp_path / "data.jsonl"),
              "reward_funcs": [f"{tmp_path / 'rewards.py'}:has_a", "contains_answer"],
              "output_dir": str(tmp_path / "out"), "max_steps": 2, "learning_rate": "1e-3", "prompts_per_step": 2,
              "num_generations": 2, "max_completion_length": 4, "reward_weights": [1.0, 0.5]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def test_train_from_yaml_with_overrides(run_dir, capsys):
    assert main(["train", "--config", str(run_dir / "run.yaml"), "--max_steps", "3", "--seed=7"]) == 0
    rows = [json.loads(line) for line in (run_dir / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and "rewards/has_a" in rows[0]
    resolved = yaml.safe_load((run_dir / "out" / "config.yaml").read_text())
    assert resolved["seed"] == 7 and resolved["learning_rate"] == 1e-3 and resolved["reward_weights"] == [1.0, 0.5]
    assert (run_dir / "out" / "checkpoint-3" / "model.safetensors").exists()
    assert "done, step 3" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--learning_rte", "1e-3"], "unknown config key 'learning_rte'; did you mean 'learning_rate'?"),
    (["--num_generations", "1"], "num_generations must be an integer >= 2"),
    (["--reward_funcs", "[char_mach]"], "unknown reward function 'char_mach'; did you mean 'char_match'?"),
    (["--dataset", "nowhere.jsonl"], "dataset path 'nowhere.jsonl' does not exist"),
    (["--max_steps"], "--max_steps needs a value"),
])
def test_bad_input_is_one_line_and_exit_2(run_dir, capsys, args, message):
    assert main(["train", "--config", str(run_dir / "run.yaml"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("grpokit: error: ") and message in err and err.count("\n") == 1


def test_failing_reward_function_is_named(run_dir, capsys):
    spec = f"[{run_dir / 'rewards.py'}:broken, contains_answer]"
    assert main(["train", "--config", str(run_dir / "run.yaml"), "--reward_funcs", spec]) == 2
    assert "reward function 'broken' raised KeyError on sample 0" in capsys.readouterr().err


def test_debug_shows_the_traceback(run_dir):
    with pytest.raises(ValueError, match="learning_rte"):
        main(["train", "--config", str(run_dir / "run.yaml"), "--learning_rte", "1", "--debug"])


def test_missing_run_keys_and_missing_config(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("max_steps: 2\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "no 'model' key" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_no_config_runs_the_demo(tmp_path, capsys):
    assert main(["train", "--max_steps", "2", "--output_dir", str(tmp_path / "demo")]) == 0
    assert (tmp_path / "demo" / "metrics.png").exists() and (tmp_path / "demo" / "checkpoint-2").is_dir()
    assert "grpokit demo: reward" in capsys.readouterr().out


def test_parse_overrides_reads_yaml_values():
    assert parse_overrides(["--a", "1e-3", "--b=[1, 2]", "--c", "true", "--d-e", "x"]) == {
        "a": "1e-3", "b": [1, 2], "c": True, "d_e": "x"}


def test_subprocess_exit_status_and_no_traceback(tmp_path):
    (tmp_path / "c.yaml").write_text("learning_rate: [\n")
    proc = subprocess.run([sys.executable, "-m", "grpokit", "train", "--config", str(tmp_path / "c.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr and "Traceback" not in proc.stderr


def test_verify_subcommand_still_parses():
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", "--help"])
    assert exit_info.value.code == 0
