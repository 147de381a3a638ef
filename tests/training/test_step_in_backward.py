"""The AdamW step inside the backward (``optimizer_in_backward``): the plain step's values, without holding
every gradient at once."""

import pytest
import torch

from grpokit import GRPOConfig
from grpokit.tasks.demo import char_tokenizer, letter_task, tiny_model
from grpokit.training.step_in_backward import AUTO_MIN_BYTES, StepInBackward
from grpokit.training.trainer import GRPOTrainer, make_optimizer, make_stepper


def trainer_for(tmp_path, in_backward: bool, **config) -> GRPOTrainer:
    tokenizer = char_tokenizer()
    fields = dict(output_dir=str(tmp_path / str(in_backward)), seed=0, max_steps=3, prompts_per_step=2,
                  num_generations=4, max_completion_length=6, learning_rate=1e-2, save_steps=0,
                  skip_zero_advantage=False, optimizer_in_backward=in_backward)
    fields.update(config)
    return GRPOTrainer(tiny_model(tokenizer, hidden_size=64), "char_match", letter_task(), args=GRPOConfig(**fields),
                       tokenizer=tokenizer)


@pytest.mark.parametrize("config", [
    dict(max_grad_norm=1e-3),  # the clip acts
    dict(max_grad_norm=0.0),  # no clipping
    dict(max_grad_norm=1e-3, bf16=True, weight_decay=0.1),
    dict(max_grad_norm=1e-3, gradient_checkpointing=True, beta=0.05),
    dict(max_grad_norm=1e-3, peft={"r": 4, "dropout": 0.5}),  # the second forward draws the same masks
], ids=["clipped", "unclipped", "bf16-decay", "checkpointing-kl", "lora-dropout"])
def test_the_step_in_the_backward_is_the_plain_step(tmp_path, config):
    """Three updates from the same batch: the same gradient norms, weights and AdamW state as the step after
    the backward (the tied embedding table included: its hook fires once per backward, so every parameter has
    stepped exactly three times; with dropout, the forward run again draws the masks of the first)."""
    plain, fused = trainer_for(tmp_path, False, **config), trainer_for(tmp_path, True, **config)
    assert plain.stepper is None and isinstance(fused.stepper, StepInBackward)
    assert plain.model.get_input_embeddings().weight is plain.model.get_output_embeddings().weight
    batch, _ = plain.rollout()
    for step in range(3):
        torch.manual_seed(step)  # the same dropout masks for both (the random state is global)
        a = plain.update(batch)
        torch.manual_seed(step)
        b = fused.update(batch)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6)
        assert b["loss"] == a["loss"]
    for (name, p), q in zip(plain.model.named_parameters(), fused.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=name)
        assert q.grad is None
    moments, fused_moments = plain.optimizer.state_dict(), fused.optimizer.state_dict()
    assert moments["param_groups"] == fused_moments["param_groups"]
    for key, state in moments["state"].items():
        assert float(fused_moments["state"][key]["step"]) == float(state["step"]) == 3.0
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fused_moments["state"][key][name], state[name], rtol=1e-5, atol=1e-9)
    assert abs(a["grad_norm"]) > 0  # a real gradient, and one the clip scaled where asked
    if config["max_grad_norm"]:
        assert a["grad_norm"] > config["max_grad_norm"]


def test_at_most_one_gradient_is_held_at_a_time(tmp_path):
    """At every moment of the step inside the backward no two parameters hold a gradient (the plain backward
    ends with every parameter holding one)."""
    held = {}
    for in_backward in (False, True):
        trainer = trainer_for(tmp_path, in_backward)
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        most = [0]

        def count(_, params=params, most=most):
            most[0] = max(most[0], sum(p.grad is not None for p in params))

        handles = [p.register_post_accumulate_grad_hook(count) for p in params]
        trainer.update(trainer.rollout()[0])
        for handle in handles:
            handle.remove()
        held[in_backward] = (most[0], len(params))
    assert held[False] == (held[False][1], held[False][1]) and held[True] == (1, held[False][1])


def test_optimizer_in_backward_choices(tmp_path):
    with pytest.raises(ValueError, match="optimizer_in_backward must be true or false, got 'yes'"):
        GRPOConfig(optimizer_in_backward="yes")
    with pytest.raises(ValueError, match="optimizer_in_backward: true needs the whole step in one backward, but "
                                         "micro_batch_size=4 splits the mini-batch of 8"):
        GRPOConfig(optimizer_in_backward=True, prompts_per_step=2, num_generations=4, micro_batch_size=4)
    GRPOConfig(prompts_per_step=2, num_generations=4, micro_batch_size=4)  # null: chosen per step
    small = tiny_model(char_tokenizer(), hidden_size=32)
    args = GRPOConfig(output_dir=str(tmp_path))
    assert make_stepper(small, make_optimizer(small, args), args, world_size=1) is None  # null, small: plain
    with pytest.raises(ValueError, match="optimizer_in_backward: true is for one process"):
        make_stepper(small, None, GRPOConfig(output_dir=str(tmp_path), optimizer_in_backward=True), world_size=2)
    large = torch.nn.Linear(AUTO_MIN_BYTES // 4 // 1024, 1024, bias=False, device="meta")  # 256 MiB of float32
    assert isinstance(make_stepper(large, None, args, world_size=1), StepInBackward)
    assert make_stepper(large, None, args, world_size=2) is None
    off = GRPOConfig(output_dir=str(tmp_path), optimizer_in_backward=False)
    assert make_stepper(large, None, off, world_size=1) is None


def test_auto_takes_the_plain_step_when_the_gradient_spans_micro_batches(tmp_path, monkeypatch):
    """``null`` with rows carrying gradient in two micro-batches: the usual step (no hook is left behind)."""
    import grpokit.training.step_in_backward as module

    trainer = trainer_for(tmp_path, None, micro_batch_size=4)
    assert trainer.stepper is None
    monkeypatch.setattr(module.StepInBackward, "measure", lambda *a: pytest.fail("stepped in the backward"))
    trainer.stepper = StepInBackward(trainer.optimizer, list(trainer.model.parameters()), 1.0)
    trainer.update(trainer.rollout()[0])  # skip_zero_advantage off: both micro-batches backpropagate
    assert all(p.grad is None for p in trainer.model.parameters())


def test_a_step_on_zero_gradients_is_adamw_on_zeros():
    """``step_on_zero_gradients``: the step ``optimizer.step()`` takes with every gradient a zero tensor, the
    shared zero buffer left at zero, no gradient left behind."""
    from grpokit.training.step_in_backward import step_on_zero_gradients

    def model_and_optimizer():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3, bias=False))
        opt = torch.optim.AdamW([{"params": [model[0].weight, model[1].weight], "weight_decay": 0.1},
                                 {"params": [model[0].bias], "weight_decay": 0.0}], lr=1e-2, fused=True)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()  # moments that are not zero
        opt.zero_grad(set_to_none=True)
        return model, opt

    (want, plain), (got, zeroed) = model_and_optimizer(), model_and_optimizer()
    for p in want.parameters():
        p.grad = torch.zeros_like(p)
    plain.step()
    step_on_zero_gradients(zeroed, list(got.parameters()))
    for p, q in zip(want.parameters(), got.parameters(), strict=True):
        assert torch.equal(p, q) and q.grad is None
    assert [len(g["params"]) for g in zeroed.param_groups] == [2, 1]  # the groups are whole again
    for a, b in zip(plain.state.values(), zeroed.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
