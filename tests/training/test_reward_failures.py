"""Reward functions that hang or raise during training: survived and counted (reward_on_error none), or a stop
that names the function and dataset row after checkpointing the last step, from which a resumed run is the
uninterrupted one."""

import json

import pytest

from grpokit import GRPOConfig
from grpokit.cli import main
from grpokit.rewards import RewardError
from grpokit.tasks.demo import char_tokenizer, tiny_model
from grpokit.training.checkpoint import list_checkpoints
from grpokit.training.trainer import GRPOTrainer
from tests.training.reward_fixtures import raises_on_raise_rows, sleeps_on_hang_rows
from tests.training.test_resume import strip, write_run

ROWS = [{"prompt": "ab", "fate": "hang"}, {"prompt": "c", "fate": "raise"}, {"prompt": "dd", "fate": ""}]


def make_trainer(folder, reward_funcs, rows=ROWS, **config):
    tokenizer = char_tokenizer("abcd")
    fields = dict(output_dir=str(folder), seed=0, max_steps=3, learning_rate=1e-2, prompts_per_step=3,
                  num_generations=2, max_completion_length=4, save_steps=1, logging_steps=1000)
    fields.update(config)
    return GRPOTrainer(tiny_model(tokenizer, hidden_size=32), reward_funcs, rows, args=GRPOConfig(**fields),
                       tokenizer=tokenizer)


def test_a_hanging_and_a_raising_function_are_survived_with_counts_in_metrics(tmp_path):
    """reward_timeout_s 0.5, reward_on_error none: every rollout holds the row that hangs and the one that
    raises (3 prompts per step, 3 rows); the run reaches max_steps, and each metrics row counts 2 timeouts
    (its 2 completions) for one function and 2 errors for the other."""
    trainer = make_trainer(tmp_path, [sleeps_on_hang_rows, raises_on_raise_rows], reward_timeout_s=0.5,
                           reward_on_error="none", max_steps=2)
    rows = trainer.train()
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in written] == [1, 2]
    for row in written:
        assert row["rewards/sleeps_on_hang_rows/timeouts"] == 2 and row["rewards/sleeps_on_hang_rows/errors"] == 0
        assert row["rewards/raises_on_raise_rows/errors"] == 2 and row["rewards/raises_on_raise_rows/timeouts"] == 0
        assert row["reward"] is not None
    assert rows[-1]["step"] == 2 and trainer.reward_runner._pool is None  # the workers stop with train()


def test_raise_checkpoints_the_last_step_and_a_resume_is_the_uninterrupted_run(tmp_path):
    """A function that raises on its 3rd call (step 3's rollout): the error names it, the dataset row and the
    exception, and checkpoint-2 is written (save_steps 0) as if the rollout had not begun; resumed with the
    function fixed, the run equals one that never failed."""
    calls = {"batches": 0}

    def flaky(prompts, completions, fate, **kwargs):
        calls["batches"] += len(completions) > 1  # the calls on one sample alone belong to the last batch's
        if calls["batches"] == 3 and not calls.get("fixed"):
            return [1 / 0 if f == "raise" else 0.0 for f in fate]
        return [c.count("a") / 5 for c in completions]

    reference = make_trainer(tmp_path / "reference", flaky, max_steps=4, save_steps=0)
    calls["fixed"] = True
    expected = reference.train()
    calls.update(batches=0, fixed=False)
    with pytest.raises(RewardError) as error:
        make_trainer(tmp_path / "run", flaky, max_steps=4, save_steps=0).train()
    message = str(error.value)
    assert "\n" not in message and "'flaky' raised ZeroDivisionError on sample" in message
    assert "(dataset row 1)" in message and "division by zero" in message and "checkpoint-2" in message
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-2"]
    calls["fixed"] = True
    resumed = make_trainer(tmp_path / "run", flaky, max_steps=4, save_steps=0).train(resume_from_checkpoint=True)
    assert strip(resumed) == strip(expected)


def test_the_cli_prints_one_line_naming_function_and_row(tmp_path, capsys):
    (tmp_path / "rewards.py").write_text("def boom(prompts, completions, **kw):\n    raise KeyError('answer')\n")
    config = write_run(tmp_path, reward_funcs=[f"{tmp_path / 'rewards.py'}:boom"], max_steps=2)
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'boom' raised KeyError on sample 0 (dataset row" in err, err
    assert "no optimizer step had been done" in err
