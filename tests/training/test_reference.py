"""pi_ref over a run (grpokit.training.reference): resets and Polyak refreshes (iterative RL), the exact KL logged live,
and the KL in the reward in the trainer."""

import pytest
import torch

from grpokit import GRPOConfig
from grpokit.advantages import group_advantages
from grpokit.kl import exact_kl, kl_reward_to_go
from grpokit.models.forward import completion_logps
from grpokit.rollout import position_ids_from_mask
from grpokit.tasks.demo import char_tokenizer, tiny_model
from grpokit.training.reference import exact_kl_metrics, sync_alpha, sync_reference
from grpokit.training.trainer import GRPOTrainer

CHARS = "abcd"


def count_a(prompts, completions, **kwargs):
    return [c.count("a") / max(len(c), 1) for c in completions]


def make_trainer(tmp_path, **config):
    tokenizer = char_tokenizer(CHARS)
    fields = dict(output_dir=str(tmp_path / "run"), seed=0, max_steps=2, learning_rate=5e-2, prompts_per_step=2,
                  num_generations=4, max_completion_length=5, save_steps=0, logging_steps=1000)
    fields.update(config)
    rows = [{"prompt": p} for p in ["ab", "c", "dd", "abc"]]
    return GRPOTrainer(tiny_model(tokenizer, hidden_size=32), count_a, rows, args=GRPOConfig(**fields),
                       tokenizer=tokenizer)


def params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_sync_reference_is_a_reset_or_a_polyak_step():
    tokenizer = char_tokenizer(CHARS)
    policy, ref = tiny_model(tokenizer, hidden_size=32, seed=1, dtype=torch.float64), tiny_model(
        tokenizer, hidden_size=32, seed=2, dtype=torch.float64)
    theta, before = params(policy), params(ref)
    sync_reference(ref, policy, 0.25)
    for k, v in params(ref).items():
        torch.testing.assert_close(v, 0.25 * theta[k] + 0.75 * before[k], rtol=0, atol=1e-15)
    sync_reference(ref, policy, 1.0)
    assert all(torch.equal(v, theta[k]) for k, v in params(ref).items())
    with pytest.raises(ValueError, match="same parameter names and shapes"):
        sync_reference(tiny_model(tokenizer, hidden_size=16), policy)
    assert [sync_alpha(s, reset_steps=2, sync_steps=0, alpha=None) for s in (1, 2, 3, 4)] == [None, 1.0, None, 1.0]
    assert sync_alpha(3, reset_steps=0, sync_steps=3, alpha=0.5) == 0.5


def test_trainer_resets_and_refreshes_the_reference(tmp_path):
    reset = make_trainer(tmp_path / "reset", beta=0.1, ref_reset_steps=2)
    initial = params(reset.ref_model)
    reset.train()
    assert all(torch.equal(v, params(reset.model)[k]) for k, v in params(reset.ref_model).items())  # pi_ref <- pi
    assert not all(torch.equal(v, initial[k]) for k, v in params(reset.ref_model).items())

    polyak = make_trainer(tmp_path / "polyak", beta=0.1, ref_sync_alpha=0.5, ref_sync_steps=2)
    theta0 = params(polyak.model)
    polyak.train()
    theta2 = params(polyak.model)
    for k, v in params(polyak.ref_model).items():
        torch.testing.assert_close(v, 0.5 * theta2[k] + 0.5 * theta0[k], rtol=0, atol=1e-7)


@pytest.mark.parametrize("config, message", [
    (dict(beta=0.1, ref_reset_steps=3, num_iterations=2), "multiple of num_iterations"),
    (dict(ref_reset_steps=2), "unused with beta = 0"),
    (dict(beta=0.1, ref_sync_alpha=0.5), "needs ref_sync_steps"),
    (dict(beta=0.1, ref_sync_steps=2), "needs ref_sync_alpha"),
    (dict(beta=0.1, ref_sync_alpha=1.5, ref_sync_steps=2), r"in \(0, 1\]"),
    (dict(beta=0.1, ref_reset_steps=2, ref_sync_alpha=0.5, ref_sync_steps=2), "not both"),
    (dict(kl_in_reward=True), "kl_in_reward needs beta > 0"),
])
def test_config_errors(config, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**config)


def materialised_exact_kl(policy, ref, batch, temperature):
    """Mean exact KL over loss tokens from the models' full (B, T, V) logits."""
    P = batch.prompt_ids.size(1)
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
    mask = torch.cat([batch.prompt_mask, batch.completion_mask], 1)
    kw = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    with torch.no_grad():
        logp = torch.log_softmax(policy(**kw).logits[:, P - 1:-1].double() / temperature, -1)
        logq = torch.log_softmax(ref(**kw).logits[:, P - 1:-1].double() / temperature, -1)
    m = batch.loss_mask.double()
    return ((exact_kl(logp, logq) * m).sum() / m.sum()).item(), ((exact_kl(logq, logp) * m).sum() / m.sum()).item()


def test_exact_kl_is_logged_and_matches_the_full_logits(tmp_path):
    trainer = make_trainer(tmp_path, beta=0.1, max_steps=3, temperature=0.8)
    history = trainer.train()
    assert history[0]["kl_exact_reverse"] == pytest.approx(0.0, abs=1e-9)  # step 1: pi_theta = pi_ref
    assert all(row["kl_exact_reverse"] > 0 and row["kl_exact_forward"] > 0 for row in history[1:])
    batch, _ = trainer.rollout()
    got = exact_kl_metrics(trainer.model, trainer.ref_model, batch, temperature=0.8, micro_batch=3, chunk_size=5)
    want = materialised_exact_kl(trainer.model, trainer.ref_model, batch, 0.8)
    assert got["kl_exact_reverse"] == pytest.approx(want[0], rel=1e-5)
    assert got["kl_exact_forward"] == pytest.approx(want[1], rel=1e-5)
    assert got["kl_exact_reverse"] != pytest.approx(got["kl_exact_forward"], rel=1e-3)


def test_log_exact_kl_with_beta_zero_keeps_a_reference(tmp_path):
    trainer = make_trainer(tmp_path, log_exact_kl=True)
    assert trainer.ref_model is not None
    history = trainer.train()
    assert "kl" not in history[-1] and history[-1]["kl_exact_reverse"] > 0
    off = make_trainer(tmp_path / "off")
    assert off.ref_model is None and not off.log_exact_kl  # beta = 0 and no log_exact_kl: no reference at all


def test_kl_in_reward_puts_the_kl_reward_to_go_into_the_advantages(tmp_path):
    trainer = make_trainer(tmp_path, beta=0.2, kl_in_reward=True, max_steps=1)
    assert trainer.loss_config.beta == 0.0  # no KL term in the loss
    row = trainer.train()[-1]  # moves pi_theta away from pi_ref
    assert row["kl"] == 0.0 and "kl_exact_reverse" in row  # the rollout's k1, before any update
    batch, metrics = trainer.rollout()
    logps = completion_logps(trainer.model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                             batch.completion_mask).detach()
    mask = batch.completion_mask.float()
    kl_part = kl_reward_to_go(logps, batch.ref_logps, mask, 0.2)  # (N, C)
    assert kl_part.abs().sum() > 0
    outcome = (batch.advantages - kl_part)[:, 0]  # (N,): what the rewards gave
    texts = [trainer.tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
             for ids, m in zip(batch.completion_ids, batch.completion_mask)]
    torch.testing.assert_close(outcome, group_advantages(torch.tensor(count_a(None, texts)), 4), rtol=0, atol=1e-5)
    assert (batch.advantages - outcome[:, None] - kl_part).abs().max() < 1e-5  # every token
    k1 = ((logps - batch.ref_logps) * batch.loss_mask).sum() / batch.loss_mask.sum()
    assert metrics["kl"] == pytest.approx(k1.item(), rel=1e-5) and metrics["kl"] > 0
    assert "kl" not in trainer.update(batch)  # the loss has no KL term to report
