"""``advantage_estimator``: the trainer's outcome advantages come from ``outcome_advantages`` by name."""

import pytest
import torch

from grpokit import GRPOConfig
from grpokit.advantages import outcome_advantages
from grpokit.tasks.demo import char_tokenizer, tiny_model
from grpokit.training.trainer import GRPOTrainer


def count_a(prompts, completions, **kwargs):
    return [c.count("a") / max(len(c), 1) for c in completions]


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "dr_grpo"])
def test_trainer_uses_the_named_estimator(tmp_path, estimator):
    tokenizer = char_tokenizer("abcd")
    config = GRPOConfig(output_dir=str(tmp_path), prompts_per_step=2, num_generations=4, max_completion_length=5,
                        advantage_estimator=estimator)
    trainer = GRPOTrainer(tiny_model(tokenizer, hidden_size=32), count_a, [{"prompt": p} for p in "abcd"],
                          args=config, tokenizer=tokenizer)
    batch, _ = trainer.rollout()
    texts = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
             for ids, m in zip(batch.completion_ids, batch.completion_mask)]
    rewards = torch.tensor(count_a(None, texts))
    assert batch.advantages.shape == (8,) and batch.advantages.abs().sum() > 0
    torch.testing.assert_close(batch.advantages, outcome_advantages(rewards, 4, estimator), rtol=0, atol=1e-6)


def test_scale_rewards_only_with_grpo():
    with pytest.raises(ValueError, match="scale_rewards applies to advantage_estimator 'grpo' only"):
        GRPOConfig(advantage_estimator="rloo", scale_rewards="batch")
    with pytest.raises(ValueError, match="advantage_estimator must be one of grpo, dr_grpo, rloo"):
        GRPOConfig(advantage_estimator="ppo")
