"""Bad prompts: one line naming the dataset row (empty, missing, unknown chat roles, too long with
prompt_truncation: error), and prompts longer than max_prompt_length truncated from the left with a counted
warning."""

import pytest

from grpokit import GRPOConfig
from grpokit.tasks.demo import char_tokenizer, tiny_model
from grpokit.training.data import PromptLimit, check_prompt_rows, encode_prompt, load_prompts, prompt_problem
from grpokit.training.trainer import GRPOTrainer


def count_a(prompts, completions, **kwargs):
    return [c.count("a") / 4 for c in completions]


@pytest.mark.parametrize("prompt, problem", [
    ("", "the prompt is empty"),
    ("  \n", "the prompt is empty"),
    (None, "it has no prompt"),
    ([], "an empty list of messages"),
    (7, "the prompt is a int"),
    ([{"role": "usr", "content": "hi"}], "message 0 has role 'usr' (did you mean 'user'?); chat roles are system"),
    ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}], "message 1 has role 'robot'"),
    ([{"content": "hi"}], "message 0 is not a {'role': ..., 'content': ...} mapping"),
    ([{"role": "user"}], "message 0 (user) has no 'content' string"),
    ([{"role": "system", "content": ""}, {"role": "user", "content": " "}], "every message of the prompt is empty"),
])
def test_what_is_not_a_prompt(prompt, problem):
    assert problem in prompt_problem(prompt)


def test_good_prompts_pass():
    for prompt in ["a", [{"role": "user", "content": "a"}],
                   [{"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]},
                    {"role": "tool", "content": "3"}, {"role": "user", "content": [{"type": "text", "text": "a"}]}]]:
        assert prompt_problem(prompt) is None


def test_the_first_bad_row_is_named():
    rows = [{"prompt": "ab"}, {"prompt": "c"}, {"prompt": ""}, {"prompt": "d"}, {"prompt": None}]
    with pytest.raises(ValueError, match="^dataset row 2: the prompt is empty$"):
        check_prompt_rows(load_prompts(rows))
    chat = [{"prompt": [{"role": "user", "content": "c"}]}, {"prompt": [{"role": "User", "content": "c"}]}]
    with pytest.raises(ValueError, match=r"^dataset row 1: message 0 has role 'User' \(did you mean 'user'\?\)"):
        check_prompt_rows(load_prompts(chat))


def test_a_trainer_refuses_a_bad_row_before_loading_the_model(tmp_path):
    with pytest.raises(ValueError, match="dataset row 1: the prompt is empty"):
        GRPOTrainer("no/such/model", count_a, [{"prompt": "ab"}, {"prompt": ""}],
                    args=GRPOConfig(output_dir=str(tmp_path)))


def test_too_long_prompts_are_cut_from_the_left_with_a_counted_warning(capsys):
    tokenizer = char_tokenizer("abcd")
    limit = PromptLimit(tokenizer, max_length=3)
    assert limit(0, "ab") == tokenizer("ab")["input_ids"]
    assert limit(4, "abcdabc") == tokenizer("abcdabc")["input_ids"][-3:]
    assert limit(7, "ddddd") == tokenizer("ddddd")["input_ids"][-3:]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dataset row 4: the prompt has more than max_prompt_length=3 tokens" in err
    assert limit.summary() == ("grpokit: 2 of the 3 prompts used were longer than max_prompt_length=3 and kept "
                               "their last tokens (first: dataset row 4)")
    assert PromptLimit(tokenizer, max_length=None)(0, "abcdabcd") == tokenizer("abcdabcd")["input_ids"]
    assert PromptLimit(tokenizer, 3).summary() is None


def test_prompt_truncation_error_names_the_row():
    tokenizer = char_tokenizer("abcd")
    with pytest.raises(ValueError, match=r"^dataset row 5: the prompt has 7 tokens, more than max_prompt_length=3 "
                                         r"\(prompt_truncation: error\)"):
        PromptLimit(tokenizer, 3, "error")(5, "abcdabc")
    assert encode_prompt(tokenizer, "abcdabc", 3) == tokenizer("abcdabc")["input_ids"][-3:]  # the default: left
    with pytest.raises(ValueError, match="prompt_truncation must be one of left, error"):
        GRPOConfig(prompt_truncation="right")


def test_training_stops_on_a_too_long_prompt_with_prompt_truncation_error(tmp_path):
    tokenizer = char_tokenizer("abcd")
    rows = [{"prompt": "ab"}, {"prompt": "abcdabcdab"}]
    trainer = GRPOTrainer(tiny_model(tokenizer, hidden_size=32), count_a, rows, tokenizer=tokenizer,
                          args=GRPOConfig(output_dir=str(tmp_path), max_steps=2, prompts_per_step=2, num_generations=2,
                                          max_completion_length=3, max_prompt_length=4, prompt_truncation="error"))
    with pytest.raises(ValueError, match="dataset row 1: the prompt has 10 tokens, more than max_prompt_length=4"):
        trainer.train()
