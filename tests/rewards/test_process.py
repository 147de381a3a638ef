"""Process supervision end to end (grpokit.rewards.process): the step contract, char -> token ends, token advantages,
and a trainer that learns the counting task from step rewards."""

import math

import pytest
import torch
from tokenizers import AddedToken

from grpokit import GRPOConfig
from grpokit.rewards import RewardError, load_reward_funcs
from grpokit.rewards.process import parse_steps, score_steps, split_steps, step_advantages, token_step_ends
from grpokit.tasks.demo import char_tokenizer, tiny_model
from grpokit.tasks.steps import count_fixed_outcome, count_fixed_steps, count_outcome, count_steps, counting_task
from grpokit.training.trainer import GRPOTrainer

S = math.sqrt(3) / 2  # (1 - 0.5) / std of [1, 0, 1, 0] (sample std sqrt(1/3))


def test_split_steps_keeps_delimiters_with_their_step():
    assert split_steps("a;b;c", ";") == [("a;", 2), ("b;", 4), ("c", 5)]
    assert split_steps("a;b;", ";") == [("a;", 2), ("b;", 4)]
    assert split_steps("", ";") == [] and split_steps("abc", ";") == [("abc", 3)]
    assert split_steps("x\n\ny", "\n\n") == [("x\n\n", 3), ("y", 4)]


@pytest.mark.parametrize("value, expected", [
    (None, ([], [])),
    (0.5, ([0.5], [5])),  # a number: one step ending at the end of the text
    ({"steps": [1, 0], "ends": [2, 5]}, ([1.0, 0.0], [2, 5])),
    ([(1, 2), (0.5, 4)], ([1.0, 0.5], [2, 4])),
    ([1, 0, 1], ([1.0, 0.0, 1.0], [2, 4, 5])),  # plain rewards: one per ";"-delimited step
])
def test_every_shape_of_the_contract(value, expected):
    assert parse_steps(value, "a;b;c", ";", "f") == expected


@pytest.mark.parametrize("value, delimiter, message", [
    ([1, 0], None, "needs step_delimiter"),
    ([1, 0], ";", "2 step rewards for 3 steps"),
    ({"steps": [1], "ends": [9]}, None, r"integer character position in \[0, 5\]"),
    ({"steps": [1, 2], "ends": [1]}, None, "2 step rewards but 1 step ends"),
    ({"rewards": [1]}, None, "exactly the keys"),
    ([(1, 2), 3], None, "only step rewards or only"),
    ([(float("nan"), 2)], None, "not a finite number"),
    ("good", None, "expected None, a number"),
])
def test_contract_breaches_name_the_function_and_sample(value, delimiter, message):
    with pytest.raises(RewardError, match=f"reward function 'f', sample 3: .*{message}"):
        parse_steps(value, "a;b;c", delimiter, "reward function 'f', sample 3")


def test_score_steps_pools_functions_with_weights():
    def steps(prompts, completions, **kw):
        return [[1.0, 0.0], None]

    def outcome(prompts, completions, **kw):
        return [2.0, None]

    scores = score_steps(load_reward_funcs([steps, outcome]), [1.0, 0.5], ["p", "p"], ["a;b", "zz"], [[1], [2]], {},
                         ["a;b", "zz"], ";")
    assert scores.step_rewards == [[1.0, 0.0, 1.0], []]
    assert scores.char_ends == [[2, 3, 3], []]
    assert scores.rewards[0].item() == 2.0 and math.isnan(scores.rewards[1].item())  # nobody scored sample 1
    assert scores.per_func[0].tolist() == [1.0, 2.0] and torch.isnan(scores.per_func[1]).all()
    with pytest.raises(RewardError, match="returned 1 entries for 2"):
        score_steps(load_reward_funcs([lambda **kw: [1.0]]), None, ["p"] * 2, ["a", "b"], [[1], [2]], {}, ["a", "b"],
                    None)


def multi_char_tokenizer():
    tokenizer = char_tokenizer("abcd;")
    tokenizer.add_tokens([AddedToken("ab;", normalized=False), AddedToken("cd", normalized=False)])
    return tokenizer


def test_char_ends_map_to_the_token_that_completes_them():
    tokenizer = multi_char_tokenizer()
    ids = tokenizer("ab;cd;a", add_special_tokens=False)["input_ids"]  # "ab;" "cd" ";" "a"
    assert len(ids) == 4
    eos = tokenizer.eos_token_id
    ends = token_step_ends(tokenizer, [ids, ids + [eos]], ["ab;cd;a"] * 2, [[3, 4, 5, 6, 7], [7, 0]])
    assert ends[0] == [0, 1, 1, 2, 3]  # char 4 and 5 both lie in token "cd"
    assert ends[1] == [4, 0]  # the end of the text: the last token, EOS included


def test_step_advantages_by_hand():
    """Group of 2: "ab;cd;a" with steps [1, 0, 1] and "cd"+EOS with one step [0]; all four normalised
    together (mean 1/2, std sqrt(1/3)); token t sums the steps ending at or after t."""
    tokenizer = multi_char_tokenizer()
    texts = ["ab;cd;a", "cd"]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids[1] = ids[1] + [tokenizer.eos_token_id]

    def reward(prompts, completions, **kw):
        return [[1, 0, 1], [0]]

    scores = score_steps(load_reward_funcs(reward), None, ["p", "p"], texts, ids, {}, texts, ";")
    adv = step_advantages(scores, tokenizer, ids, texts, group_size=2, seq_len=4)  # (2, 4)
    expected = torch.tensor([[S, 0.0, 0.0, S], [-S, -S, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)


def test_trainer_gives_per_token_advantages_and_config_checks(tmp_path):
    tokenizer = char_tokenizer("abcd;")
    config = GRPOConfig(output_dir=str(tmp_path), max_steps=1, prompts_per_step=2, num_generations=4,
                        max_completion_length=6, process_supervision=True, step_delimiter=";", save_steps=0)
    trainer = GRPOTrainer(tiny_model(tokenizer, hidden_size=32), count_steps, counting_task("ab", count=False),
                          args=config, tokenizer=tokenizer)
    batch, metrics = trainer.rollout()
    assert batch.advantages.shape == batch.completion_ids.shape  # (N, C)
    assert (batch.advantages * (1 - batch.completion_mask)).abs().sum() == 0  # nothing on padding
    assert 0 <= metrics["reward"] <= 1 and "rewards/count_steps" in metrics
    with pytest.raises(ValueError, match="step_delimiter needs process_supervision"):
        GRPOConfig(step_delimiter=";")
    with pytest.raises(ValueError, match="leave advantage_estimator 'grpo'"):
        GRPOConfig(process_supervision=True, advantage_estimator="rloo")


def run_step_task(tmp_path, reward, **config):
    """benchmarks/process_vs_outcome.py's set-up (seed 2) for 40 steps at a constant learning rate: the mean
    reward of the first and of the last 5 steps."""
    tokenizer = char_tokenizer("abcd;")
    config = GRPOConfig(output_dir=str(tmp_path), seed=2, max_steps=40, learning_rate=3e-3, prompts_per_step=8,
                        num_generations=8, max_completion_length=6, save_steps=0, logging_steps=1000,
                        lr_scheduler="constant", **config)
    trainer = GRPOTrainer(tiny_model(tokenizer, seed=2), reward, counting_task("abcd", count=False), args=config,
                          tokenizer=tokenizer)
    rewards = [r["reward"] for r in trainer.train()]
    return sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5


def test_process_supervision_learns_the_step_task_faster_than_outcome(tmp_path):
    """"c" -> "c;c;c;" with one verifier: each ';'-delimited step scored, given as step rewards (process) or
    as their sum (outcome). The share of right steps rises from 0.04 to 0.62 with step rewards in 40 steps,
    to 0.22 with their sum (benchmarks/results/process_vs_outcome.md: 3 seeds, 100 steps)."""
    first, process = run_step_task(tmp_path / "process", count_steps, process_supervision=True, step_delimiter=";")
    _, outcome = run_step_task(tmp_path / "outcome", count_outcome)
    assert process > first + 0.3 and process > outcome + 0.15, (first, process, outcome)


def test_outcome_twin_reports_the_same_reward():
    completions = ["c;c;x;", "c;", "cc", "c;c;c;c;"]
    target = ["c;c;c;"] * 4
    steps = count_steps(None, completions, target=target)
    assert steps[0] == [1 / 3, 1 / 3, 1 / 6] and steps[1] == [1 / 3] and steps[2] == [1 / 6] and steps[3][-1] == 0.0
    assert count_outcome(None, completions, target=target) == [sum(s) for s in steps]
    fixed = count_fixed_steps(None, completions, target=target)
    assert fixed[0] == [(1 / 3, 2), (1 / 3, 4), (1 / 6, 6)] and fixed[2] == [(1 / 6, 2), (0.0, 2), (0.0, 2)]
    assert count_fixed_outcome(None, completions, target=target) == [sum(r for r, _ in f) for f in fixed]
