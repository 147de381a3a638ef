"""Retraining a learned reward on new samples with a replay of old ones (grpokit.rewards.learned), with a toy
learned reward: per-character weights fitted to a verifier's label (the share of 'a')."""

import pytest

from grpokit import GRPOConfig
from grpokit.rewards.learned import LearnedReward, ReplayBuffer, replay_count
from grpokit.tasks.demo import char_tokenizer, tiny_model
from grpokit.training.trainer import GRPOTrainer


class CharRewardModel:
    """reward(text) = mean over its characters of a learned weight per character; ``update`` fits the weights
    to the label ``text.count('a') / len(text)`` by a few passes of SGD."""

    def __init__(self):
        self.weights: dict[str, float] = {}
        self.calls: list[list[dict]] = []
        self.__name__ = "char_rm"

    def predict(self, text: str) -> float:
        return sum(self.weights.get(c, 0.0) for c in text) / max(len(text), 1)

    def __call__(self, prompts, completions, completion_ids=None, **kwargs):
        return [self.predict(c) for c in completions]

    def error(self, texts) -> float:
        return sum((self.predict(t) - t.count("a") / max(len(t), 1)) ** 2 for t in texts) / len(texts)

    def update(self, samples):
        self.calls.append(samples)
        texts = [s["completion"] for s in samples]
        before = self.error(texts)
        for _ in range(20):
            for t in texts:
                residual = t.count("a") / max(len(t), 1) - self.predict(t)
                for c in t:
                    self.weights[c] = self.weights.get(c, 0.0) + 0.5 * residual / max(len(t), 1)
        return {"mse_before": before, "mse_after": self.error(texts)}


def test_replay_share_and_reservoir():
    assert replay_count(90, 0.1, 1000) == 10  # 10 of 100 samples replayed: the paper's 10%
    assert replay_count(90, 0.1, 3) == 3 and replay_count(90, 0.0, 1000) == 0 and replay_count(0, 0.1, 9) == 0
    buffer = ReplayBuffer(capacity=5, seed=0)
    buffer.add([{"i": i} for i in range(100)])
    assert len(buffer) == 5 and buffer.seen == 100
    assert len({s["i"] for s in buffer.items}) == 5 and max(s["i"] for s in buffer.items) > 5  # not just the first
    assert len(buffer.sample(3)) == 3 and len(buffer.sample(10)) == 5


def test_trainer_retrains_the_learned_reward_with_replay(tmp_path):
    rm = CharRewardModel()
    assert isinstance(rm, LearnedReward)
    tokenizer = char_tokenizer("abcd")
    rows = [{"prompt": p, "level": i} for i, p in enumerate("abcd")]
    config = GRPOConfig(output_dir=str(tmp_path), max_steps=4, learning_rate=1e-2, prompts_per_step=2,
                        num_generations=4, max_completion_length=5, reward_model_update_steps=2, save_steps=0,
                        logging_steps=1000)
    trainer = GRPOTrainer(tiny_model(tokenizer, hidden_size=32), rm, rows, args=config, tokenizer=tokenizer)
    history = trainer.train()
    assert [len(c) for c in rm.calls] == [16, 16 + 2]  # 2 rollouts of 8 new samples; then 10% replayed (2 of 18)
    first, second = rm.calls
    def among(s, samples):
        return any(s is t for t in samples)

    assert all(among(s, first) for s in second[16:]) and not any(among(s, first) for s in second[:16])
    sample = first[0]
    assert set(sample) == {"prompt", "completion", "completion_ids", "reward", "level"}
    assert sample["reward"] == 0.0  # before any update every character weighs 0
    assert "reward_model/new_samples" not in history[0] and history[1]["reward_model/new_samples"] == 16
    assert history[3]["reward_model/replayed_samples"] == 2
    assert history[1]["reward_model/char_rm/mse_after"] < history[1]["reward_model/char_rm/mse_before"]
    texts = [s["completion"] for s in second]
    assert rm.error(texts) < CharRewardModel().error(texts)  # the trained reward model beats the untrained one


def test_update_steps_without_a_learned_reward_is_refused(tmp_path):
    tokenizer = char_tokenizer("abcd")
    config = GRPOConfig(output_dir=str(tmp_path), reward_model_update_steps=2)
    with pytest.raises(ValueError, match="no reward function has an update"):
        GRPOTrainer(tiny_model(tokenizer, hidden_size=32), lambda completions, **kw: [0.0] * len(completions),
                    [{"prompt": "a"}], args=config, tokenizer=tokenizer)
