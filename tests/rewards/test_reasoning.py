"""Reasoning rewards on real strings: accuracy (math-verify), think_format, soft_overlong (DAPO eq. 13)."""

import pytest

from grpokit.rewards import accuracy, load_reward_funcs, score, soft_overlong, think_format


def chat(text):
    return [{"role": "assistant", "content": text}]


@pytest.mark.parametrize(("completion", "gold", "expected"), [
    (r"\boxed{3}", "3", 1.0),
    (r"so the result is \boxed{3}.", "$3$", 1.0),
    (r"\boxed{4}", "3", 0.0),
    ("3", "3", 0.0),  # a bare number is not an answer: LaTeX (\boxed or $...$ after an anchor) is required
    ("x = 3/4", r"\frac{3}{4}", 0.0),  # plain text, no LaTeX anchor
    (r"The answer is $\frac{3}{4}$", r"\frac{3}{4}", 1.0),
    (r"\boxed{0.75}", r"\frac{3}{4}", 1.0),  # equal values, different notation
    (r"\boxed{3", "3", 0.0),  # unclosed box
    ("garbage ~~ }{ \\", "3", 0.0),
    ("", "3", 0.0),
    (r"\boxed{3}", "no number here", None),  # the gold does not parse: sample left out, as TRL
])
def test_accuracy(completion, gold, expected):
    assert accuracy(None, [completion], solution=[gold]) == [expected]
    assert accuracy(None, [chat(completion)], solution=[gold]) == [expected]  # chat-shaped completions too


@pytest.mark.parametrize(("completion", "expected"), [
    ("<think>2 + 1 = 3</think>The answer is 3.", 1.0),
    ("\n<think>\nreason\n</think>\n\\boxed{3}\n", 1.0),
    ("<think>reason</think>", 0.0),  # no answer
    ("<think>reason</think>   \n", 0.0),  # blank answer
    ("<think></think>3", 0.0),  # no reasoning
    ("<think>reason 3", 0.0),  # unclosed
    ("answer first <think>reason</think> 3", 0.0),
    ("<think>a</think><think>b</think>3", 0.0),  # two blocks
    ("<think>a <think> b</think>3", 0.0),  # nested tag
    ("<think>a</think>3</think>", 0.0),  # stray closing tag
    ("just an answer", 0.0),
])
def test_think_format(completion, expected):
    assert think_format(None, [completion, chat(completion)]) == [expected, expected]


def test_soft_overlong_follows_dapo_eq_13():
    reward = soft_overlong(max_length=10, cache_length=4)  # penalty starts after 6 tokens
    lengths = [0, 6, 7, 8, 10, 11, 50]
    out = reward(None, ["x"] * len(lengths), [[1] * n for n in lengths])
    assert out == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]


def test_soft_overlong_by_name_uses_max_completion_length():
    (fn,) = load_reward_funcs(["soft_overlong"], max_completion_length=20)  # L_cache = 20 // 5 = 4
    assert (fn.func.max_length, fn.func.cache_length) == (20, 4)
    scores = score([fn], None, ["p"] * 3, ["a", "b", "c"], [[1] * 16, [1] * 18, [1] * 20], {})
    assert scores.rewards.tolist() == [0.0, -0.5, -1.0]
    with pytest.raises(ValueError, match="max_completion_length"):
        load_reward_funcs(["soft_overlong"])
    with pytest.raises(ValueError, match="cache_length"):
        soft_overlong(10, 0)
    with pytest.raises(ValueError, match="did you mean 'soft_overlong'"):
        load_reward_funcs(["soft_overlog"], max_completion_length=20)


def test_builtins_by_name_combine_in_score():
    funcs = load_reward_funcs(["accuracy", "think_format"], max_completion_length=8)
    completions = ["<think>1+2</think>\\boxed{3}", "\\boxed{3}", "<think>hm</think>\\boxed{5}", "<think>x</think>4"]
    out = score(funcs, [1.0, 0.5], ["q"] * 4, completions, [[1]] * 4,
                {"solution": ["3", "3", "3", "unparseable gold"]})
    assert out.per_func[:, 0].tolist()[:3] == [1.0, 1.0, 0.0]
    assert out.rewards.tolist() == [1.5, 1.0, 0.5, 0.5]  # None (gold unparseable) skipped in the weighted sum
