"""Truncated importance sampling for a sampler/trainer mismatch (grpokit.mismatch, grpo_loss token_weights)."""

import dataclasses
import math

import pytest
import torch

from grpokit import GRPOConfig
from grpokit.losses import LossConfig, grpo_loss
from grpokit.mismatch import mean_weight, tis_weights
from grpokit.tasks.demo import char_tokenizer, tiny_model
from grpokit.training.trainer import GRPOTrainer

F64 = torch.float64


def test_token_and_sequence_weights_by_hand():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]], dtype=F64)
    sampling = torch.tensor([[-1.5, -1.0, -2.0], [-1.2, -0.9, -7.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=F64)
    w = tis_weights(old, sampling, mask, level="token", cap=2.0)
    expected = torch.tensor([[math.exp(0.5), math.exp(-1.0), 2.0], [math.exp(0.2), math.exp(-0.1), 1.0]], dtype=F64)
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-12)  # capped at 2; padding weighs 1
    seq = tis_weights(old, sampling, mask, level="sequence", cap=2.0)
    torch.testing.assert_close(seq, torch.tensor([[2.0], [math.exp(0.1)]], dtype=F64), rtol=0, atol=1e-12)
    assert mean_weight(w, mask) == pytest.approx((w * mask).sum().item() / 5)
    assert mean_weight(seq, mask) == pytest.approx((2.0 + math.exp(0.1)) / 2)
    with pytest.raises(ValueError, match="tis must be one of token, sequence"):
        tis_weights(old, sampling, mask, level="tokens")


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_token_weights_scale_the_surrogate_gradient_not_the_kl(beta):
    g = torch.Generator().manual_seed(0)
    logps = (-torch.rand(3, 4, generator=g, dtype=F64) * 3).requires_grad_()
    ref = logps.detach() + 0.3 * torch.randn(3, 4, generator=g, dtype=F64)
    adv = torch.randn(3, generator=g, dtype=F64)
    mask = torch.ones(3, 4, dtype=F64)
    w = torch.rand(3, 4, generator=g, dtype=F64) * 2
    cfg = LossConfig(beta=beta)
    (g_w,) = torch.autograd.grad(grpo_loss(logps, adv, mask, ref_logps=ref, config=cfg, token_weights=w).loss, logps)
    # on-policy: d/dlogp = -(w * A + beta * (1 - exp(ref - logp))) / (B * T)
    kl_grad = beta * (1 - torch.exp(ref - logps.detach()))
    expected = (-w * adv[:, None] + kl_grad) / 12
    torch.testing.assert_close(g_w, expected, rtol=0, atol=1e-14)


class SkewedEngine:
    """Another engine's log-probs: the wrapped engine's, off by a known amount per row."""

    name = "skewed"

    def __init__(self, inner, shift: torch.Tensor):
        self.inner, self.shift = inner, shift

    def generate(self, prompts, params):
        rollout = self.inner.generate(prompts, params)
        skewed = (rollout.sampling_logps + self.shift) * rollout.completion_mask
        return dataclasses.replace(rollout, sampling_logps=skewed)

    def sync_weights(self, model) -> float:
        return self.inner.sync_weights(model)

    def close(self) -> None:
        self.inner.close()


def test_trainer_weights_the_loss_by_the_capped_ratio(tmp_path):
    """A sampler whose log-probs are off by a known amount per row (another engine, another precision)."""
    shift = torch.tensor([0.0, 0.3, -1.0, 1.5] * 2)[:, None]  # log pi_sampler - log pi_old, per row

    tokenizer = char_tokenizer("abcd")
    config = GRPOConfig(output_dir=str(tmp_path), max_steps=1, prompts_per_step=2, num_generations=4,
                        max_completion_length=5, tis="token", tis_cap=2.0, save_steps=0, logging_steps=1000)
    trainer = GRPOTrainer(tiny_model(tokenizer, hidden_size=32), lambda completions, **kw: [c.count("a") * 1.0
                          for c in completions], [{"prompt": p} for p in "abcd"], args=config, tokenizer=tokenizer)
    trainer.engine = SkewedEngine(trainer.engine, shift)
    batch, metrics = trainer.rollout()
    assert batch.old_logps is None  # one step per rollout: pi_old is still sg(pi_theta) in the loss
    mask = batch.completion_mask.bool()
    expected = torch.exp(-shift).clamp(max=2.0).expand_as(batch.tis_weights)
    torch.testing.assert_close(batch.tis_weights[mask], expected[mask], rtol=0, atol=2e-5)  # e^1 capped at 2
    assert metrics["tis/mean_weight"] == pytest.approx(mean_weight(batch.tis_weights, batch.loss_mask))
    row = trainer.train()[-1]
    assert "tis/mean_weight" in row

    config.tis = "sequence"
    sequence_level = GRPOTrainer(trainer.model, lambda completions, **kw: [0.0] * len(completions),
                                 [{"prompt": "a"}], args=config, tokenizer=tokenizer)
    sequence_level.engine = SkewedEngine(sequence_level.engine, shift)
    batch, _ = sequence_level.rollout()
    assert batch.tis_weights.shape == (8, 1)


def test_mismatch_metrics_by_hand():
    """Two loss tokens with log-ratios log(pi_trainer / pi_sampler) = +0.5 and -0.2, one masked token of 9."""
    from grpokit.mismatch import add_totals, mismatch_metrics, mismatch_totals

    trainer = torch.tensor([[-1.0, -2.0, 5.0]], dtype=F64)
    sampler = torch.tensor([[-1.5, -1.8, -4.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0]])
    totals = mismatch_totals(trainer, sampler, mask)
    metrics = mismatch_metrics(totals)
    k3 = [math.expm1(x) - x for x in (0.5, -0.2)]  # (r - 1) - log r
    assert metrics["mismatch/logp_abs_max"] == pytest.approx(0.5, abs=1e-15)
    assert metrics["mismatch/logp_abs_mean"] == pytest.approx(0.35, abs=1e-15)
    assert metrics["mismatch/kl"] == pytest.approx(sum(k3) / 2, abs=1e-15)
    halves = add_totals(mismatch_totals(trainer[:, :1], sampler[:, :1], mask[:, :1]),
                        mismatch_totals(trainer[:, 1:], sampler[:, 1:], mask[:, 1:]))
    assert mismatch_metrics(halves) == pytest.approx(metrics, abs=1e-15)  # parts add up
    assert mismatch_metrics(mismatch_totals(trainer, trainer, mask)) == {
        "mismatch/logp_abs_max": 0.0, "mismatch/logp_abs_mean": 0.0, "mismatch/kl": 0.0}
