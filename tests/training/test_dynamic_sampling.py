"""DAPO dynamic sampling (grpokit.training.dynamic_sampling): flat groups dropped, refills, the cap, re-padding; and in
the trainer."""

import pytest
import torch

from grpokit import GRPOConfig
from grpokit.rewards import Scores
from grpokit.rollout import Rollout
from grpokit.tasks.demo import char_tokenizer, tiny_model
from grpokit.training.dynamic_sampling import Sampled, cat_rollouts, gather_informative, informative_groups
from grpokit.training.trainer import GRPOTrainer

G = 2
PAD = 0


def fake_sampled(group_rewards: list[list[float]], prompt_len: int, completion_len: int, tag: str) -> Sampled:
    """Groups with the given rewards; prompt/completion widths vary per call so re-padding is exercised."""
    n = sum(len(g) for g in group_rewards)
    rewards = torch.tensor([r for g in group_rewards for r in g])
    ones = torch.ones(n, prompt_len, dtype=torch.long), torch.ones(n, completion_len, dtype=torch.long)
    rollout = Rollout(prompt_ids=7 * ones[0], prompt_mask=ones[0], completion_ids=5 * ones[1], completion_mask=ones[1],
                      is_truncated=torch.zeros(n, dtype=torch.bool), sampling_logps=-1.0 * ones[1],
                      texts=[f"{tag}{i}" for i in range(n)])
    return Sampled(rollout=rollout, scores=Scores(rewards=rewards, per_func=rewards[:, None]),
                   prompts=[tag] * n, completions=[f"{tag}{i}" for i in range(n)], completion_ids=[[5]] * n,
                   columns={"row": list(range(n))})


def test_informative_groups():
    assert informative_groups([[1.0], [1.0], [0.0], [1.0], [], []], 2) == [False, True, False]
    assert informative_groups([[1.0, 0.0], [1.0], [0.5], [0.5]], 2) == [True, False]  # step rewards pooled


def test_refills_until_enough_informative_groups():
    calls = []
    script = [([[1, 1], [0, 1], [0, 0], [1, 1]], 3, 2, "a"),  # round 1: 1 of 4 informative
              ([[0, 1], [1, 0], [2, 2], [0, 3]], 5, 4, "b")]  # round 2: asks 3 / (1/4) -> capped at 4

    def sample(n):
        calls.append(n)
        rewards, p, c, tag = script[len(calls) - 1]
        return fake_sampled(rewards[:n], p, c, tag)

    out, metrics = gather_informative(sample, num_groups=4, group_size=G, max_rounds=5, pad_id=PAD)
    assert calls == [4, 4]
    assert metrics == {"dynamic_sampling/rounds": 2.0, "dynamic_sampling/dropped_groups": 4.0}
    assert out.scores.rewards.tolist() == [0, 1, 0, 1, 1, 0, 0, 3]  # a's group 1, then b's groups 0, 1, 3
    assert out.rollout.texts == ["a2", "a3", "b0", "b1", "b2", "b3", "b6", "b7"]
    r = out.rollout
    assert r.prompt_ids.shape == (8, 5) and r.completion_ids.shape == (8, 4)
    assert r.prompt_mask[:2].tolist() == [[0, 0, 1, 1, 1]] * 2 and (r.prompt_ids[:2, :2] == PAD).all()  # left pad
    assert r.completion_mask[:2].tolist() == [[1, 1, 0, 0]] * 2 and (r.completion_ids[:2, 2:] == PAD).all()
    assert (r.sampling_logps[:2, 2:] == 0).all() and out.columns["row"][:2] == [2, 3]


def test_the_cap_fills_with_flat_groups():
    out, metrics = gather_informative(lambda n: fake_sampled([[1, 1]] * n, 2, 2, "x"), num_groups=3, group_size=G,
                                      max_rounds=2, pad_id=PAD)
    assert metrics == {"dynamic_sampling/rounds": 2.0, "dynamic_sampling/dropped_groups": 6.0}
    assert len(out) == 6 and out.scores.rewards.tolist() == [1] * 6


def test_cat_rollouts_equal_widths_is_a_plain_concatenation():
    a, b = fake_sampled([[1, 2]], 3, 2, "a").rollout, fake_sampled([[3, 4]], 3, 2, "b").rollout
    c = cat_rollouts([a, b], PAD)
    assert torch.equal(c.prompt_ids, torch.cat([a.prompt_ids, b.prompt_ids])) and c.texts == a.texts + b.texts


def flat_for_a_and_b(prompts, completions, **kwargs):
    """Prompts 'a' and 'b': the same reward for every completion (a flat group); others: the share of 'a'."""
    return [0.5 if p in ("a", "b") else c.count("a") / max(len(c), 1) for p, c in zip(prompts, completions)]


def test_trainer_keeps_only_informative_groups(tmp_path):
    tokenizer = char_tokenizer("abcd")
    rows = [{"prompt": p} for p in "abcdabcd"]
    config = GRPOConfig(output_dir=str(tmp_path), max_steps=2, prompts_per_step=2, num_generations=4,
                        max_completion_length=6, dynamic_sampling=True, max_sampling_rounds=4, save_steps=0,
                        logging_steps=1000)
    trainer = GRPOTrainer(tiny_model(tokenizer, hidden_size=32), flat_for_a_and_b, rows, args=config,
                          tokenizer=tokenizer)
    history = trainer.train()
    batch, metrics = trainer.rollout()
    assert len(batch) == 8 and (batch.advantages.view(2, 4).abs().sum(1) > 0).all()
    rows = [*history, metrics]
    for row in rows:
        assert row["frac_zero_std_groups"] == 0.0  # every trained group carries a signal
        assert row["dynamic_sampling/rounds"] >= 1
    assert sum(row["dynamic_sampling/dropped_groups"] for row in rows) > 0


def test_overlong_filtering_divides_by_the_tokens_it_keeps(tmp_path):
    """mask_truncated_completions (DAPO's overlong filtering) with a token-level loss: truncated completions
    leave the numerator *and* the denominator (TRL #6369 counted them in the latter)."""
    from grpokit.losses import grpo_loss
    from grpokit.models.forward import completion_logps

    tokenizer = char_tokenizer("abcd")
    config = GRPOConfig(output_dir=str(tmp_path), prompts_per_step=4, num_generations=4, max_completion_length=2,
                        loss_type="dapo", mask_truncated_completions=True, learning_rate=1e-2)
    trainer = GRPOTrainer(tiny_model(tokenizer, hidden_size=32), flat_for_a_and_b,
                          [{"prompt": p} for p in "cdcd"], args=config, tokenizer=tokenizer)
    batch, _ = trainer.rollout()
    kept = batch.loss_mask.sum()
    assert 0 < kept < batch.completion_mask.sum()  # some completions truncated, some not
    logps = completion_logps(trainer.model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                             batch.completion_mask)
    expected = grpo_loss(logps, batch.advantages, batch.loss_mask, config=trainer.loss_config)
    per_token = expected.per_token_loss.detach()
    assert expected.loss.item() == pytest.approx(((per_token * batch.loss_mask).sum() / kept).item(), rel=1e-6)
    assert trainer.update(batch)["loss"] == pytest.approx(expected.loss.item(), rel=1e-5, abs=1e-8)
