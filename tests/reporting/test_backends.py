"""``report_to: tensorboard`` event files and ``log_completions_steps`` samples (terminal table, samples.jsonl),
cut back on resume like metrics.jsonl."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from grpokit import GRPOConfig
from grpokit.reporting.backends import format_table, read_samples
from grpokit.tasks.demo import char_tokenizer, tiny_model
from grpokit.training.trainer import GRPOTrainer


def count_a(prompts, completions, **kwargs):
    return [c.count("a") / max(len(c), 1) for c in completions]


def trainer(output_dir, **config):
    tokenizer = char_tokenizer("abcd")
    args = GRPOConfig(output_dir=str(output_dir), seed=0, max_steps=4, learning_rate=1e-2, prompts_per_step=2,
                      num_generations=3, max_completion_length=4, save_steps=2, logging_steps=1000,
                      report_to="tensorboard", log_completions_steps=2, **config)
    return GRPOTrainer(tiny_model(tokenizer, hidden_size=16), count_a, [{"prompt": p} for p in ["ab", "c", "dd"]],
                       args=args, tokenizer=tokenizer)


def test_tensorboard_and_samples(tmp_path, capsys):
    out = tmp_path / "run"
    history = trainer(out).train()

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rewards = events.Scalars("reward")
    assert [e.step for e in rewards] == [1, 2, 3, 4]
    assert [e.value for e in rewards] == [torch.tensor(r["reward"]).float().item() for r in history]
    assert "entropy" in events.Tags()["scalars"] and "rewards/count_a" in events.Tags()["scalars"]

    samples = read_samples(out / "samples.jsonl")
    assert [r["step"] for r in samples] == [2] * 6 + [4] * 6  # every 2 steps, the whole rollout (2 x 3)
    first = samples[0]
    assert set(first) == {"step", "prompt", "completion", "reward", "rewards/count_a", "advantage"}
    assert first["reward"] == pytest.approx(count_a(None, [first["completion"]])[0], rel=1e-6)  # float32
    group = samples[:3]  # a group's advantages: (r - mean) / std, so they sum to 0
    assert abs(sum(r["advantage"] for r in group)) < 1e-5
    printed = capsys.readouterr().out
    assert "completions at step 2:" in printed and "advantage" in printed

    # resume from checkpoint-2 after a crash at step 4: samples and curves of steps 3-4 are rewritten, once
    resumed = trainer(out)
    resumed.train(resume_from_checkpoint=out / "checkpoint-2")
    assert [r["step"] for r in read_samples(out / "samples.jsonl")] == [2] * 6 + [4] * 6


def test_format_table_cuts_long_text():
    records = [{"prompt": [{"role": "user", "content": "x" * 100}], "completion": "line\nbreak", "reward": 0.5,
                "advantage": -1.0}] * 10
    table = format_table(records, rows=3, width=20)
    lines = table.splitlines()
    assert lines[0].split() == ["prompt", "completion", "reward", "advantage"]
    assert len(lines) == 2 + 3 + 1 and "7 more in samples.jsonl" in lines[-1]
    assert "line\\nbreak" in lines[2] and "…" in lines[2] and "-1.000" in lines[2]
    json.dumps(records)  # records are JSON-ready
