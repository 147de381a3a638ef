"""``grpokit eval``: the unbiased pass@k estimator against hand-computed values, and the command end to end on
a tiny local model with a reward whose outcome is fixed per prompt."""

import json
import math

import pytest

from grpokit.cli import main
from grpokit.training.evaluate import pass_at_k, reported_ks
from tests.helpers import save_tiny_model

REWARD_FILE = """
def by_answer(prompts, completions, answer, **kwargs):
    return [{"yes": 1.0, "no": 0.0, "half": 0.5}.get(a) for a in answer]
"""


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
    (10, 3, 1, 0.3),  # pass@1 = c/n
    (4, 0, 4, 0.0),
    (4, 4, 1, 1.0),
    (3, 1, 3, 1.0),  # n - c < k: some sample of every k-subset is correct
    (8, 1, 4, 1 - 35 / 70),  # 1 - C(7,4)/C(8,4)
])
def test_pass_at_k_matches_the_binomial_formula(n, c, k, expected):
    assert math.isclose(pass_at_k(n, c, k), expected, rel_tol=1e-12)
    assert math.isclose(pass_at_k(n, c, k), 1 - math.comb(n - c, k) / math.comb(n, k), rel_tol=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    assert reported_ks(8) == [1, 2, 4, 8] and reported_ks(6) == [1, 2, 4, 6] and reported_ks(1) == [1]


def test_eval_command_on_a_tiny_model(tmp_path, capsys):
    save_tiny_model(tmp_path / "model", "abcd", hidden_size=16)
    rows = [{"prompt": "a", "answer": "yes"},
            {"prompt": "b", "answer": "no"}, {"prompt": "c", "answer": "half"},
            {"prompt": "d", "answer": "unscored"}]  # None from every function: left out
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rewards.py").write_text(REWARD_FILE)
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "data.jsonl"),
                 "--reward", f"{tmp_path / 'rewards.py'}:by_answer", "--k", "4", "--max-completion-length", "3",
                 "--temperature", "0.7", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pass@4" in printed and "mean reward" in printed
    result = json.loads(out.read_text())
    assert result["num_prompts"] == 3 and result["num_samples"] == 4
    assert result["mean_reward"] == pytest.approx(0.5)
    assert result["pass_at"] == {"pass@1": pytest.approx(1 / 3), "pass@2": pytest.approx(1 / 3),
                                 "pass@4": pytest.approx(1 / 3)}  # only "yes" reaches the threshold 1.0
    assert [p["correct"] for p in result["per_prompt"]] == [4, 0, 0, 0]
    assert all(len(p["example"]) <= 3 * 20 for p in result["per_prompt"])

    assert main(["eval", "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "data.jsonl"),
                 "--reward", "acuracy"]) == 2
    assert "did you mean 'accuracy'" in capsys.readouterr().err
