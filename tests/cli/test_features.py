"""The features beyond outcome GRPO, each run from ``grpokit train --config X.yaml`` on a tiny local model:
process supervision, dynamic sampling, KL in the reward, TIS, pi_ref resets / Polyak, the exact KL, RLOO,
a learned reward retrained with replay. And DAPO's soft overlong punishment composing with them."""

import json

import pytest
import yaml

from grpokit.cli import main
from grpokit.rewards import load_reward_funcs
from grpokit.rewards.process import score_steps
from grpokit.rewards.reasoning import soft_overlong
from grpokit.tasks.steps import counting_task
from tests.helpers import save_tiny_model

REWARD_MODEL_FILE = """
class ShareOfA:
    '''A toy learned reward: a learned weight per character, refitted on every update.'''

    def __init__(self):
        self.weights, self.updates = {}, 0

    def __call__(self, prompts, completions, completion_ids=None, **kwargs):
        texts = [c[0]["content"] for c in completions]  # chat prompts: chat-shaped completions
        return [sum(self.weights.get(c, 0.0) for c in text) / max(len(text), 1) for text in texts]

    def update(self, samples):
        self.updates += 1
        for s in samples:
            text = s["completion"][0]["content"]
            for c in text:
                self.weights[c] = self.weights.get(c, 0.0) + 0.1 * (float(c == "a") - self.weights.get(c, 0.0))
        return {"updates": self.updates, "samples": len(samples)}


reward_model = ShareOfA()
"""


def write_run(tmp_path, **config):
    save_tiny_model(tmp_path / "model", "abcd;")
    rows = counting_task("abc", count=False, copies=2)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {"model": str(tmp_path / "model"), "dataset": str(tmp_path / "data.jsonl"),
            "output_dir": str(tmp_path / "out"), "max_steps": 2, "learning_rate": 1e-2, "prompts_per_step": 2,
            "num_generations": 4, "max_completion_length": 6, "save_steps": 0}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(base | config))
    return tmp_path / "run.yaml"


def metrics(tmp_path):
    return [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]


def test_process_dynamic_sampling_kl_in_reward_tis_and_resets(tmp_path):
    config = write_run(tmp_path, reward_funcs=["grpokit.tasks.steps:count_steps"], process_supervision=True,
                       step_delimiter=";", dynamic_sampling=True, max_sampling_rounds=3, beta=0.05, kl_in_reward=True,
                       tis="token", tis_cap=2.0, ref_reset_steps=1)
    assert main(["train", "--config", str(config)]) == 0
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("dynamic_sampling/rounds", "dynamic_sampling/dropped_groups", "kl", "kl_exact_reverse",
                "kl_exact_forward", "tis/mean_weight", "rewards/count_steps"):
        assert key in rows[-1], key
    assert rows[-1]["tis/mean_weight"] == pytest.approx(1.0, abs=1e-3)  # same engine: pi_sampler ~ pi_old


def test_rloo_exact_kl_polyak_and_a_learned_reward(tmp_path):
    (tmp_path / "rm.py").write_text(REWARD_MODEL_FILE)
    rewards = [f"{tmp_path / 'rm.py'}:reward_model", "grpokit.tasks.steps:count_outcome"]
    config = write_run(tmp_path, reward_funcs=rewards,
                       advantage_estimator="rloo", log_exact_kl=True, ref_sync_alpha=0.5, ref_sync_steps=1,
                       reward_model_update_steps=1, reward_model_replay_fraction=0.5, tis="sequence")
    assert main(["train", "--config", str(config), "--max_steps", "3"]) == 0
    rows = metrics(tmp_path)
    assert "kl" not in rows[-1] and rows[-1]["kl_exact_reverse"] >= 0 and rows[0]["kl_exact_reverse"] < 1e-9
    assert [r["reward_model/reward_model/updates"] for r in rows] == [1, 2, 3]
    assert [r["reward_model/replayed_samples"] for r in rows] == [0, 8, 8]  # as many as new ones (fraction 0.5)


def test_soft_overlong_composes_with_process_supervision():
    """DAPO's soft overlong punishment returns a number per completion: under process supervision that is one
    step ending at the end of the completion, pooled with the step rewards."""
    overlong = soft_overlong.from_config(6)
    funcs = load_reward_funcs([overlong, "grpokit.tasks.steps:count_steps"])
    texts = ["a;a;a;", "a;"]
    ids = [[7] * 6, [7] * 2]
    scores = score_steps(funcs, None, ["a"] * 2, texts, ids, {"target": ["a;a;a;"] * 2}, texts, ";")
    penalties = overlong(prompts=["a"] * 2, completions=texts, completion_ids=ids)
    assert scores.char_ends == [[6, 2, 4, 6], [2, 2]]
    assert scores.step_rewards[0][0] == penalties[0] and scores.step_rewards[1][0] == penalties[1]
