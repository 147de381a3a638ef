"""The practitioner's loop from the command line on a tiny local model: a YAML run with LoRA, built-in rewards by
name, a system prompt, TensorBoard and completion samples; then plot, eval of the LoRA checkpoint, merge."""

import json

import yaml

from grpokit.cli import main
from tests.helpers import save_tiny_model


def test_train_plot_eval_merge_from_the_cli(tmp_path, capsys):
    save_tiny_model(tmp_path / "model", "abcdefghijklmnopqrstuvwxyz<>/ ", hidden_size=16)
    rows = [{"prompt": [{"role": "user", "content": c}], "answer": c, "solution": "1"} for c in "abcd"]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    config = {"model": str(tmp_path / "model"), "dataset": str(tmp_path / "data.jsonl"),
              "reward_funcs": ["contains_answer", "think_format", "soft_overlong", "accuracy"],
              "output_dir": str(out), "max_steps": 2, "learning_rate": 1e-2, "prompts_per_step": 2,
              "num_generations": 2, "max_completion_length": 5, "beta": 0.04, "device": "cpu",
              "gradient_checkpointing": True, "peft": {"r": 2, "target_modules": ["q_proj", "v_proj"]},
              "system_prompt": "answer", "report_to": "tensorboard", "log_completions_steps": 1}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"rewards/think_format", "rewards/soft_overlong", "rewards/accuracy", "kl"} <= set(rows[-1])
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 4 and samples[0]["prompt"][0] == {"role": "system", "content": "answer"}
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    capsys.readouterr()

    assert main(["plot", str(out), "-o", str(tmp_path / "plot.png")]) == 0
    assert main(["eval", "--model", str(out / "checkpoint-2"), "--dataset", str(tmp_path / "data.jsonl"),
                 "--reward", "contains_answer", "--k", "2", "--max-completion-length", "5",
                 "--system-prompt", "answer", "--output", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["num_prompts"] == 4 and set(result["pass_at"]) == {"pass@1", "pass@2"}
    assert main(["merge", str(out / "checkpoint-2"), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
