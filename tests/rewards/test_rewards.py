"""Reward functions: loading by callable, name, module and file; weighted nansum; clear contract errors."""

import math

import pytest
import torch

from grpokit.rewards import RewardError, load_reward_funcs, score
from grpokit.rewards.builtin import char_match

PROMPTS = ["p0", "p1", "p2"]
COMPLETIONS = ["aaa", "ab", "b"]
IDS = [[1, 1, 1], [1, 2], [2]]


def test_char_match_is_graded():
    out = char_match(None, ["aaa", "aab", "aaaa", "", [{"role": "assistant", "content": "aaa"}]],
                     target=["aaa"] * 5)
    assert out == [1.0, 2 / 3, 3 / 4, 0.0, 1.0]


def test_load_by_callable_name_module_and_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text("def length(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n")
    funcs = load_reward_funcs([char_match, "exact_match", "grpokit.rewards.builtin:contains_answer",
                               f"{path}:length"])
    assert [f.name for f in funcs] == ["char_match", "exact_match", "contains_answer", "length"]
    assert funcs[3].func(prompts=PROMPTS, completions=COMPLETIONS) == [3.0, 2.0, 1.0]


def test_duplicate_names_are_made_unique():
    assert [f.name for f in load_reward_funcs([char_match, char_match])] == ["char_match", "char_match_2"]


@pytest.mark.parametrize("spec, message", [
    ("char_mach", "did you mean 'char_match'"),
    ("no_such_module_xyz:f", "cannot import module"),
    ("grpokit.rewards.builtin:nope", "has no attribute 'nope'"),
    ("missing/file.py:f", "does not exist"),
])
def test_load_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        load_reward_funcs(spec)


def test_weighted_nansum_and_all_none_is_nan():
    def first(prompts, completions, **kw):
        return [1.0, None, None]

    def second(prompts, completions, **kw):
        return [2.0, 3.0, None]

    s = score(load_reward_funcs([first, second]), [1.0, 0.5], PROMPTS, COMPLETIONS, IDS, {})
    assert s.rewards[:2].tolist() == [2.0, 1.5] and math.isnan(s.rewards[2])
    assert torch.isnan(s.per_func[1:, 0]).all() and s.per_func[1, 1] == 3.0


def test_columns_reach_reward_functions_aligned():
    seen = {}

    def spy(prompts, completions, completion_ids, answer, **kw):
        seen.update(prompts=prompts, completion_ids=completion_ids, answer=answer)
        return [0.0] * len(completions)

    score(load_reward_funcs(spy), None, PROMPTS, COMPLETIONS, IDS, {"answer": ["x", "y", "z"]})
    assert seen == {"prompts": PROMPTS, "completion_ids": IDS, "answer": ["x", "y", "z"]}


def _raises_on_second(prompts, completions, **kw):
    return [1.0 / (len(c) - 2) for c in completions]  # "ab" -> division by zero


@pytest.mark.parametrize("func, message", [
    (lambda prompts, completions, **kw: [1.0], "'<lambda>' returned 1 rewards for 3 completions"),
    (lambda prompts, completions, **kw: [1.0, float("nan"), 0.0], "returned nan for sample 1"),
    (lambda prompts, completions, **kw: [1.0, "x", 0.0], "returned 'x' \\(str\\) for sample 1"),
    (_raises_on_second, "'_raises_on_second' raised ZeroDivisionError on sample 1"),
    (lambda prompts, completions: [0.0] * 3, "add \\*\\*kwargs"),
])
def test_contract_errors_name_function_and_sample(func, message):
    with pytest.raises(RewardError, match=message):
        score(load_reward_funcs(func), None, PROMPTS, COMPLETIONS, IDS, {"answer": ["x", "y", "z"]})
