"""GRPOTrainer end to end on tiny local models: updates, accumulation exactness, pi_old / pi_ref, rewards,
chat prompts, outputs, checkpoints and resume."""

import dataclasses
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from grpokit import GRPOConfig
from grpokit.reporting.metrics import TIMING_KEYS
from grpokit.tasks.demo import char_tokenizer, tiny_model
from grpokit.training.checkpoint import list_checkpoints
from grpokit.training.trainer import GRPOTrainer, make_scheduler

CHARS = "abcd"


def count_a(prompts, completions, **kwargs):
    """Fraction of 'a' in the completion text: learnable without reading the prompt."""
    return [c.count("a") / max(len(c), 1) for c in completions]


def make_trainer(tmp_path, reward=count_a, rows=None, *, dtype="float32", seed=0, **config):
    tokenizer = char_tokenizer(CHARS)
    model = tiny_model(tokenizer, hidden_size=32, seed=seed)
    rows = rows if rows is not None else [{"prompt": p} for p in ["ab", "c", "dd", "abc"]]
    fields = dict(output_dir=str(tmp_path / "run"), seed=seed, max_steps=1, learning_rate=1e-2, prompts_per_step=2,
                  num_generations=4, max_completion_length=6, save_steps=0, logging_steps=1000, dtype=dtype)
    fields.update(config)
    return GRPOTrainer(model, reward, rows, args=GRPOConfig(**fields), tokenizer=tokenizer)


def params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_parameters_change_after_one_step(tmp_path):
    trainer = make_trainer(tmp_path)
    before = params(trainer.model)
    history = trainer.train()
    after = params(trainer.model)
    assert len(history) == 1 and history[0]["step"] == 1
    assert all(not torch.equal(before[k], after[k]) for k in before if "norm" not in k)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_reward_rises_on_a_small_task(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=40, learning_rate=1e-2, prompts_per_step=4, num_generations=8)
    history = trainer.train()
    first = sum(r["reward"] for r in history[:5]) / 5
    last = sum(r["reward"] for r in history[-5:]) / 5
    assert last > first + 0.3, (first, last)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"])
def test_micro_batch_size_does_not_change_the_update(tmp_path, loss_type, exact_norms):
    """One optimizer step (grad clipping on, mu = 2 so the ratio is live) with micro-batches of 8, 2 and 1
    rows gives the same parameters as the whole 8-row mini-batch, in float64 to ~1e-13."""
    results = []
    for micro in (None, 2, 1):
        trainer = make_trainer(tmp_path / str(micro), dtype="float64", loss_type=loss_type, micro_batch_size=micro,
                               num_iterations=2, max_completion_length=5, beta=0.05, max_grad_norm=0.5,
                               epsilon_high=5.0 if loss_type == "cispo" else None)
        batch, _ = trainer.rollout()
        for name in ("advantages", "completion_mask"):  # same rollout each time
            if results:
                assert torch.equal(getattr(batch, name), results[0][1][name])
        trainer.update(batch)  # pass 1: ratio 1
        metrics = trainer.update(batch)  # pass 2: ratio != 1, clipping live
        results.append((params(trainer.model), {"advantages": batch.advantages,
                                                "completion_mask": batch.completion_mask}, metrics))
    reference = results[0][0]
    for other, _, metrics in results[1:]:
        for k in reference:
            torch.testing.assert_close(other[k], reference[k], rtol=0, atol=1e-13)
        assert math.isclose(metrics["loss"], results[0][2]["loss"], rel_tol=1e-10, abs_tol=1e-13)


def zero_some_advantages(batch, rows):
    advantages = batch.advantages.clone()
    advantages[rows] = 0.0
    return dataclasses.replace(batch, advantages=advantages)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "cispo", "sapo"])
def test_zero_advantage_rows_skip_the_backward_and_the_update_is_the_same(tmp_path, loss_type):
    """Rows with advantage 0 run without autograd: the same parameters (float64, 1e-13) and the same logged
    entropy, loss and ratios, over two passes of one rollout (the second off-policy, so the ratios are live)."""
    results = []
    for skip in (False, True):
        trainer = make_trainer(tmp_path / str(skip), dtype="float64", loss_type=loss_type, skip_zero_advantage=skip,
                               num_iterations=2, micro_batch_size=2, weight_decay=0.1,
                               epsilon_high=5.0 if loss_type == "cispo" else None)
        batch = zero_some_advantages(trainer.rollout()[0], [0, 1, 2, 3, 6])  # a whole group and one more row
        assert batch.advantages[[4, 5, 7]].ne(0).all()
        backward = [len(m) for m, b in trainer.micro_batches(batch) if b]
        assert backward == ([2, 2, 2, 2] if not skip else [2, 1])  # skipped: all but the 3 rows with an advantage
        metrics = [trainer.update(batch), trainer.update(batch)]
        results.append((params(trainer.model), metrics))
    (expected, expected_metrics), (got, got_metrics) = results
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-13)
    for want, have in zip(expected_metrics, got_metrics):
        for name in ("loss", "entropy", "ratio_mean", "clip_ratio", "grad_norm"):
            assert math.isclose(have[name], want[name], rel_tol=1e-10, abs_tol=1e-13), name
    assert expected_metrics[1]["ratio_mean"] != 1.0


def test_on_policy_rows_without_advantage_are_not_even_run(tmp_path):
    """One update per rollout: rows with advantage 0 get no forward; the logged entropy (the sampler's for
    them) and every other metric and parameter match the all-rows update (float64)."""
    results = []
    for skip in (False, True):
        trainer = make_trainer(tmp_path / str(skip), dtype="float64", skip_zero_advantage=skip)
        batch = zero_some_advantages(trainer.rollout()[0], [0, 1, 2, 3, 6])
        assert batch.sampling_entropy is not None and batch.old_logps is None
        rows = []
        policy = trainer.parallel.policy
        trainer.parallel.policy = lambda *a, rows=rows, policy=policy, **k: rows.append(a[0].size(0)) or policy(*a, **k)
        metrics = trainer.update(batch)
        assert rows == ([8] if not skip else [3])  # only the 3 rows with an advantage are run
        results.append((params(trainer.model), metrics))
    (expected, expected_metrics), (got, got_metrics) = results
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-13)
    for name in ("loss", "entropy", "ratio_mean", "clip_ratio", "grad_norm"):
        assert math.isclose(got_metrics[name], expected_metrics[name], rel_tol=1e-9, abs_tol=1e-12), name


def test_a_rollout_without_advantage_still_steps_adamw_as_usual(tmp_path):
    """All advantages 0: no row runs through autograd, yet every parameter takes its zero gradient and AdamW's
    moments and weight decay act as without the skipping (a step after a real one moves the weights)."""
    results = []
    for skip in (False, True):
        trainer = make_trainer(tmp_path / str(skip), dtype="float64", skip_zero_advantage=skip, weight_decay=0.1,
                               max_steps=3)
        batch = trainer.rollout()[0]
        trainer.update(batch)  # a real step: AdamW's moments are no longer 0
        flat = zero_some_advantages(batch, slice(None))
        assert sum(b for _, b in trainer.micro_batches(flat)) == (0 if skip else len(trainer.micro_batches(flat)))
        before = params(trainer.model)
        metrics = trainer.update(flat)
        after = params(trainer.model)
        assert metrics["grad_norm"] == 0.0 and any(not torch.equal(before[k], after[k]) for k in before)
        assert all(p.grad is None for p in trainer.model.parameters())  # zero_grad after the step, as always
        results.append(after)
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=0, atol=1e-13)


def test_every_row_is_backpropagated_when_the_loss_has_a_kl_term(tmp_path):
    trainer = make_trainer(tmp_path, beta=0.05)
    batch = zero_some_advantages(trainer.rollout()[0], slice(None))
    assert all(b for _, b in trainer.micro_batches(batch))  # the KL term has a gradient on every row


def test_old_logps_only_when_a_rollout_feeds_several_steps(tmp_path):
    assert make_trainer(tmp_path / "a").rollout()[0].old_logps is None  # mu = 1, S = 1: pi_old = sg(pi)
    batch, _ = make_trainer(tmp_path / "b", num_iterations=2).rollout()
    assert batch.old_logps is not None and batch.old_logps.shape == batch.completion_ids.shape
    assert make_trainer(tmp_path / "c", steps_per_rollout=2).rollout()[0].old_logps is not None
    assert make_trainer(tmp_path / "d").ref_model is None  # beta = 0: no reference model at all


def test_second_pass_is_off_policy_and_clipping_binds(tmp_path):
    trainer = make_trainer(tmp_path, num_iterations=2, max_steps=2, learning_rate=0.2, prompts_per_step=4)
    first, second = trainer.train()
    assert first["ratio_mean"] == 1.0 and first["clip_ratio"] == 0.0  # pass 1: pi_theta == pi_old exactly
    assert second["ratio_mean"] != 1.0 and second["clip_ratio"] > 0.0  # pass 2: after an update
    assert second["clip_ratio"] == pytest.approx(second["clip_ratio_low"] + second["clip_ratio_high"])


def test_reference_model_is_frozen_and_never_changes(tmp_path):
    trainer = make_trainer(tmp_path, beta=0.1, max_steps=3, learning_rate=5e-2)
    ref_before = params(trainer.ref_model)
    assert all(not p.requires_grad for p in trainer.ref_model.parameters()) and not trainer.ref_model.training
    assert all(torch.equal(ref_before[k], v) for k, v in params(trainer.model).items())  # pi_ref = pi_0
    history = trainer.train()
    assert all(torch.equal(ref_before[k], v) for k, v in params(trainer.ref_model).items())
    assert not all(torch.equal(ref_before[k], v) for k, v in params(trainer.model).items())
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-7) and history[-1]["kl"] > 0


def test_mask_truncated_completions_zeroes_their_loss_mask(tmp_path):
    trainer = make_trainer(tmp_path, mask_truncated_completions=True, max_completion_length=2, prompts_per_step=4)
    torch.manual_seed(0)
    batch, metrics = trainer.rollout()
    truncated = (batch.completion_mask.sum(-1) == 2) & ~(batch.completion_ids == 0).any(-1)
    assert truncated.any() and metrics["truncated_ratio"] == truncated.float().mean().item()
    assert (batch.loss_mask[truncated] == 0).all()
    assert torch.equal(batch.loss_mask[~truncated], batch.completion_mask[~truncated])


def test_reward_functions_get_columns_aligned_and_chat_completions(tmp_path):
    seen = []

    def spy(prompts, completions, completion_ids, target, level, **kwargs):
        seen.append((prompts, completions, completion_ids, target, level))
        return [float(len(c[0]["content"])) for c in completions]

    rows = [{"prompt": [{"role": "user", "content": c}], "target": c * 2, "level": i} for i, c in enumerate(CHARS)]
    trainer = make_trainer(tmp_path, reward=spy, rows=rows, prompts_per_step=2, num_generations=3)
    batch, _ = trainer.rollout()
    prompts, completions, completion_ids, target, level = seen[0]
    assert len(prompts) == len(completions) == len(target) == len(level) == 6
    for g in range(2):  # each prompt's G completions are consecutive and carry that row's columns
        group = slice(3 * g, 3 * g + 3)
        assert len({str(p) for p in prompts[group]}) == 1 and len(set(level[group])) == 1
        assert target[group][0] == prompts[3 * g][0]["content"] * 2
    assert all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in completions)
    assert [len(ids) for ids in completion_ids] == batch.completion_mask.sum(-1).tolist()  # through EOS
    tokenizer = trainer.tokenizer
    assert tokenizer.decode(batch.prompt_ids[0][batch.prompt_mask[0].bool()]).endswith("<|end|><|assistant|>")


def test_outputs_metrics_plot_config_and_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=3, save_steps=2, beta=0.1)
    trainer.train()
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    keys = {"step", "reward", "reward_std", "rewards/count_a", "kl", "loss", "entropy", "clip_ratio",
            "clip_ratio_low", "clip_ratio_high", "completion_length", "truncated_ratio", "frac_zero_std_groups",
            "learning_rate", "grad_norm", "step_time", "tokens_per_s"}
    assert keys <= set(rows[0])
    assert (out / "metrics.png").stat().st_size > 0
    assert GRPOConfig.from_yaml(out / "config.yaml") == trainer.args
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
    reloaded = AutoModelForCausalLM.from_pretrained(out / "checkpoint-3")
    for k, v in params(trainer.model).items():
        assert torch.equal(dict(reloaded.named_parameters())[k], v)
    assert (out / "checkpoint-3" / "ref_model" / "model.safetensors").exists()
    assert not any(p.name.startswith(".tmp") for p in out.iterdir())


@pytest.mark.parametrize("config", [dict(num_iterations=2), dict(steps_per_rollout=2, beta=0.1)])
def test_resume_is_bit_identical(tmp_path, config):
    """Stop after step 1 (inside a rollout that feeds two steps), resume: the same parameters and metrics
    as an uninterrupted run."""
    full = make_trainer(tmp_path / "full", max_steps=4, **config)
    full_history = full.train()

    part = make_trainer(tmp_path / "part", max_steps=4, save_steps=1, **config)
    part.args.max_steps = 1  # simulate a run killed after step 1's checkpoint
    part.train()
    part_dir = tmp_path / "part" / "run"
    with (part_dir / "metrics.jsonl").open("a") as f:  # a row written after the checkpoint, then a crash
        f.write(json.dumps({"step": 2, "reward": -1.0}) + "\n")
    resumed = make_trainer(tmp_path / "part", max_steps=4, save_steps=1, seed=0, **config)
    resumed_history = resumed.train(resume_from_checkpoint=part_dir / "checkpoint-1")

    for k, v in params(full.model).items():
        assert torch.equal(params(resumed.model)[k], v), k
    timing = TIMING_KEYS
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]
    assert strip(resumed_history) == strip(full_history)
    rows = [json.loads(line) for line in (part_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_resume_true_takes_the_latest_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, save_steps=1)
    trainer.train()
    again = make_trainer(tmp_path, max_steps=3, save_steps=1)
    history = again.train(resume_from_checkpoint=True)
    assert [r["step"] for r in history] == [1, 2, 3]


def test_model_from_path_and_module_errors(tmp_path):
    tokenizer = char_tokenizer(CHARS)
    model = tiny_model(tokenizer, hidden_size=32)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    trainer = GRPOTrainer(str(tmp_path / "m"), count_a, [{"prompt": "a"}], args=GRPOConfig(output_dir=str(tmp_path)))
    assert trainer.tokenizer.eos_token_id == 0
    with pytest.raises(ValueError, match="needs tokenizer="):
        GRPOTrainer(model, count_a, [{"prompt": "a"}])
    with pytest.raises(ValueError, match="cannot load model"):
        GRPOTrainer(str(tmp_path / "nope"), count_a, [{"prompt": "a"}])
    with pytest.raises(ValueError, match="reward_weights has 2 entries for 1"):
        GRPOTrainer(model, count_a, [{"prompt": "a"}], tokenizer=tokenizer, args=GRPOConfig(reward_weights=[1, 2]))


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_scheduler_matches_transformers(kind):
    from transformers import get_scheduler

    args = GRPOConfig(lr_scheduler=kind, warmup_steps=3, max_steps=10, learning_rate=1.0)
    optimizers = [torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0) for _ in range(2)]
    ours = make_scheduler(optimizers[0], args)
    name = "constant_with_warmup" if kind == "constant" else kind
    theirs = get_scheduler(name, optimizers[1], num_warmup_steps=3, num_training_steps=10)
    for _ in range(10):
        assert ours.get_last_lr()[0] == pytest.approx(theirs.get_last_lr()[0], abs=1e-12)
        for opt in optimizers:
            opt.step()
        ours.step()
        theirs.step()


def test_partial_checkpoint_is_ignored_and_cleaned(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1, save_steps=1)
    trainer.train()
    out = tmp_path / "run"
    (out / ".tmp-checkpoint-2-999").mkdir()  # a save killed half way: never renamed into place
    (out / ".tmp-checkpoint-2-999" / "model.safetensors").write_bytes(b"torn")
    again = make_trainer(tmp_path, max_steps=2, save_steps=1)
    history = again.train(resume_from_checkpoint=True)
    assert [r["step"] for r in history] == [1, 2]
    assert not (out / ".tmp-checkpoint-2-999").exists()


def test_processing_class_is_an_alias_of_tokenizer(tmp_path):
    tokenizer = char_tokenizer(CHARS)
    model = tiny_model(tokenizer, hidden_size=32)
    trainer = GRPOTrainer(model, count_a, [{"prompt": "a"}], args=GRPOConfig(output_dir=str(tmp_path)),
                          processing_class=tokenizer)
    assert trainer.tokenizer is tokenizer


ROW_KEYS = {*TIMING_KEYS, "step", "loss", "entropy", "clip_ratio", "clip_ratio_low", "clip_ratio_high",
            "ratio_mean", "learning_rate", "grad_norm", "reward", "reward_std", "rewards/count_a",
            "rewards/count_a/errors", "rewards/count_a/timeouts", "completion_length",
            "completion_length_max", "truncated_ratio", "frac_zero_std_groups", "rollout/weight_sync_s",
            "mismatch/logp_abs_max", "mismatch/logp_abs_mean", "mismatch/kl"}


@pytest.mark.parametrize("extra, more_keys", [
    ({}, set()),
    ({"num_iterations": 2, "tis": "token"}, {"tis/mean_weight"}),
    ({"beta": 0.04}, {"kl", "kl_exact_reverse", "kl_exact_forward"}),
])
def test_a_metrics_row_has_exactly_the_documented_keys(tmp_path, extra, more_keys):
    """Every key of a ``metrics.jsonl`` row, no more (a stray key such as a leaked ``num_tokens`` fails)."""
    trainer = make_trainer(tmp_path, max_steps=2, **extra)
    rows = trainer.train()
    written = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for row in (rows[-1], written[-1]):
        assert set(row) == ROW_KEYS | more_keys
    assert 0 <= rows[-1]["mismatch/logp_abs_max"] < 1e-4  # the lean sampler and the training forward agree
