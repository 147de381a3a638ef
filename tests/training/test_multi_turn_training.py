"""GRPOTrainer with tools, environments and rollout_func (grpokit.rollout.multi_turn): a run whose tools are
never called is the single-turn run exactly; environment tokens carry no gradient and change no normaliser;
a task answerable only through a tool is learned; dynamic sampling, resume, LoRA, process supervision,
completion samples, rollout_func and the vLLM engine work with episodes."""

import dataclasses
import json

import pytest
import torch

from grpokit import GRPOConfig
from grpokit.losses import LossConfig, grpo_loss
from grpokit.reporting.metrics import TIMING_KEYS
from grpokit.tasks import peek as peek_task_module
from grpokit.tasks.demo import char_tokenizer, tiny_model
from grpokit.training.distributed import global_totals, init_world
from grpokit.training.trainer import GRPOTrainer

TIMING = TIMING_KEYS


def peek() -> str:
    """Return the hidden letter."""
    return "c"


def always_call(text: str) -> list[dict]:
    """A parser that finds a call of ``peek`` in every turn."""
    return [{"name": "peek", "arguments": {}}]


def count_a(prompts, completions, **kwargs):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [t.count("a") / max(len(t), 1) for t in texts]


def make_trainer(tmp_path, *, chars="abcd", rows=None, reward=count_a, seed=0, **kwargs):
    config = {k: kwargs.pop(k) for k in list(kwargs) if k in GRPOConfig.field_names()}
    tokenizer = char_tokenizer(chars)
    model = tiny_model(tokenizer, hidden_size=32, seed=seed)
    rows = rows if rows is not None else [{"prompt": p} for p in ["ab", "c", "dd", "abc"]]
    fields = dict(output_dir=str(tmp_path / "run"), seed=seed, max_steps=2, learning_rate=1e-2, prompts_per_step=2,
                  num_generations=4, max_completion_length=6, save_steps=0, logging_steps=1000)
    fields.update(config)
    return GRPOTrainer(model, reward, rows, args=GRPOConfig(**fields), tokenizer=tokenizer, **kwargs)


def params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def strip(history):
    return [{k: v for k, v in row.items() if k not in TIMING and not k.startswith("tools/")} for row in history]


def strip_timing(row):
    return {k: v for k, v in row.items() if k not in TIMING}


# ----------------------------------------------------------------------------------------------------------
# tools never called = single-turn training


@pytest.mark.parametrize("how", ["no call", "no round"])
def test_a_run_whose_tools_are_never_called_is_the_single_turn_run(tmp_path, how):
    """The same seed, pi_old / pi_ref / TIS / truncation masking on: the same tokens, rewards, metrics and
    parameters. "no call": no turn holds a call (the tokenizer cannot even spell ``!``); "no round":
    every turn calls, but ``max_tool_calling_iterations=0`` runs no round."""
    config = dict(max_steps=3, num_iterations=2, beta=0.04, tis="token", mask_truncated_completions=True,
                  log_completions_steps=1)
    single = make_trainer(tmp_path / "single", **config)
    extra = {"tools": [peek]}
    if how == "no round":
        extra.update(tool_call_parser=always_call, max_tool_calling_iterations=0)
    multi = make_trainer(tmp_path / "multi", **config, **extra)
    h_single, h_multi = single.train(), multi.train()
    assert strip(h_single) == strip(h_multi)
    assert h_multi[-1]["tools/call_frequency"] == 0 and h_multi[-1]["tools/environment_tokens"] == 0
    a, b = params(single.model), params(multi.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    samples = [(tmp_path / name / "run" / "samples.jsonl").read_text() for name in ("single", "multi")]
    assert samples[0] == samples[1]


# ----------------------------------------------------------------------------------------------------------
# environment tokens: no gradient, no normaliser


def compact(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Each row's entries where ``keep``, moved left, the rest 0: the batch with the other tokens cut out."""
    out = torch.zeros_like(x)
    for i in range(x.size(0)):
        values = x[i][keep[i]]
        out[i, :values.numel()] = values
    return out


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_environment_tokens_carry_no_gradient_and_change_no_normaliser(loss_type, level):
    """float64: the loss of a transcript batch (loss mask = completion mask x model mask) equals the loss of the
    batch with the environment tokens cut out, with pi_old, pi_ref (k3), TIS weights and per-token advantages
    that are garbage on those tokens; their log-probs get exactly zero gradient."""
    torch.manual_seed(0)
    B, C = 4, 10
    completion_mask = torch.ones(B, C, dtype=torch.long)
    completion_mask[1, 7:] = completion_mask[3, 4:] = 0
    model_mask = torch.ones(B, C, dtype=torch.long)
    model_mask[:, 2:5] = 0
    model_mask[2, 8] = 0
    loss_mask = completion_mask * model_mask
    keep = loss_mask.bool()
    garbage = ~keep * 1e3
    logps = (-torch.rand(B, C, dtype=torch.float64)).requires_grad_()
    old = logps.detach() + 0.1 * torch.randn(B, C, dtype=torch.float64) + garbage
    ref = logps.detach() + 0.1 * torch.randn(B, C, dtype=torch.float64) - garbage
    weights = torch.rand(B, C, dtype=torch.float64) + garbage
    advantages = torch.randn(B, C, dtype=torch.float64) + garbage
    config = LossConfig(loss_type=loss_type, beta=0.04, importance_sampling_level=level, max_completion_length=12,
                        epsilon_high=5.0 if loss_type == "cispo" else None)
    world = init_world()
    out = grpo_loss(logps, advantages, loss_mask, old_logps=old, ref_logps=ref, config=config,
                    totals=global_totals(world, loss_mask), token_weights=weights)
    out.loss.backward()
    assert (logps.grad[~keep] == 0).all() and (logps.grad[keep] != 0).any()
    cut = compact(logps.detach(), keep).requires_grad_()
    cut_mask = compact(loss_mask, keep)
    cut_out = grpo_loss(cut, compact(advantages, keep), cut_mask, old_logps=compact(old, keep),
                        ref_logps=compact(ref, keep), config=config, totals=global_totals(world, cut_mask),
                        token_weights=compact(weights, keep))
    cut_out.loss.backward()
    torch.testing.assert_close(out.loss, cut_out.loss, rtol=1e-14, atol=0)
    torch.testing.assert_close(compact(logps.grad, keep), cut.grad, rtol=1e-12, atol=1e-16)
    for name in out.metrics:
        assert out.metrics[name] == pytest.approx(cut_out.metrics[name], rel=1e-12), name


def perturbed(sampled, seed=1):
    """``sampled`` with noise in everything the rollout recorded on environment tokens."""
    r = sampled.rollout
    env = ((r.model_mask == 0) & (r.completion_mask == 1)).to(r.sampling_logps.dtype)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(r.sampling_logps.shape, generator=g, dtype=r.sampling_logps.dtype) * env
    rollout = dataclasses.replace(r, sampling_logps=r.sampling_logps + noise,
                                  sampling_entropy=r.sampling_entropy + noise.abs())
    return dataclasses.replace(sampled, rollout=rollout)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_what_the_sampler_recorded_on_environment_tokens_changes_nothing(tmp_path, loss_type):
    """Two identical float64 trainers train on the same episodes, one with noise in the sampler's log-probs and
    entropies on the environment tokens: TIS (sequence level: a sum over tokens), the KL reward, the mismatch
    and entropy metrics, the exact KL and the update are bit-identical."""
    config = dict(dtype="float64", loss_type=loss_type, num_iterations=2, beta=0.04, kl_in_reward=True,
                  tis="sequence", log_exact_kl=True, chars="abcd!", tools=[peek], tool_call_parser=always_call,
                  max_tool_calling_iterations=1, max_turn_length=2, max_completion_length=16)
    a, b = make_trainer(tmp_path / "a", **config), make_trainer(tmp_path / "b", **config)
    sampled, extra = a.sample_scored()
    assert ((sampled.rollout.model_mask == 0) & (sampled.rollout.completion_mask == 1)).any()
    a.sample_scored = lambda: (sampled, dict(extra))
    b.sample_scored = lambda: (perturbed(sampled), dict(extra))
    batch_a, metrics_a = a.rollout()
    batch_b, metrics_b = b.rollout()
    assert metrics_a == metrics_b
    for name in ("advantages", "old_logps", "ref_logps", "tis_weights", "loss_mask"):
        x, y = getattr(batch_a, name), getattr(batch_b, name)
        assert torch.equal(x * batch_a.loss_mask if x.shape == batch_a.loss_mask.shape else x,
                           y * batch_b.loss_mask if y.shape == batch_b.loss_mask.shape else y), name
    step_a, step_b = a.update(batch_a), b.update(batch_b)
    assert strip_timing(step_a) == strip_timing(step_b)
    pa, pb = params(a.model), params(b.model)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_environment_tokens_are_out_of_the_loss_mask_and_the_token_count(tmp_path):
    trainer = make_trainer(tmp_path, chars="abcd!", tools=[peek], tool_call_parser=always_call,
                           max_tool_calling_iterations=1, max_turn_length=2, max_completion_length=16)
    batch, metrics = trainer.rollout()
    env = batch.completion_mask.bool() & ~batch.loss_mask.bool()
    assert env.any()
    model_tokens = float(batch.loss_mask.sum())
    assert metrics["tools/model_tokens"] * len(batch) == model_tokens
    assert metrics["tools/environment_tokens"] * len(batch) == float(env.sum())
    assert float(global_totals(trainer.world, batch.loss_mask).num_tokens) == model_tokens


# ----------------------------------------------------------------------------------------------------------
# the toy task: the answer only a tool call reveals


def test_a_tiny_model_learns_to_call_the_tool_its_answer_needs(tmp_path):
    """grpokit.tasks.peek: a random-init 2-layer, hidden-64 model, one-token turns. Without calling ``peek``
    a policy scores at most 1/2 + 1/12 (the shown rows, and a guess among six letters on the hidden ones);
    it learns to call on the hidden rows, and only there."""
    tokenizer = char_tokenizer(peek_task_module.CHARS)
    model = tiny_model(tokenizer)
    args = peek_task_module.peek_config(output_dir=str(tmp_path / "run"), max_steps=100, logging_steps=1000)
    trainer = GRPOTrainer(model, peek_task_module.REWARD_FUNCS, peek_task_module.peek_task(), args=args,
                          tokenizer=tokenizer, environment_factory=peek_task_module.PeekEnv)
    history = trainer.train()

    def mean(key, rows):
        values = [r[key] for r in rows if r[key] is not None]
        return sum(values) / len(values)

    assert mean("rewards/correct", history[:10]) < 0.5
    assert mean("rewards/peeked_hidden", history[:10]) < 0.2
    assert mean("rewards/correct", history[-10:]) > 0.9
    assert mean("rewards/peeked_hidden", history[-10:]) > 0.9  # calls the tool where the answer is hidden
    assert mean("rewards/peeked_shown", history[-10:]) < 0.1  # and not where the prompt shows it


# ----------------------------------------------------------------------------------------------------------
# features that meet episodes


class CountingEnv:
    made = 0

    def __init__(self):
        CountingEnv.made += 1

    def reset(self, prompt, **row):
        self.prompt = prompt

    def peek(self) -> str:
        """Return the hidden letter."""
        return self.prompt[0]

    def get_reward(self) -> float:
        return float(self.prompt[0] == "a")


def test_environment_reward_dynamic_sampling_and_the_logged_transcripts(tmp_path):
    CountingEnv.made = 0
    trainer = make_trainer(tmp_path, chars="abcdekp!: \n", reward=[count_a], environment_factory=CountingEnv,
                           tool_call_parser=always_call, max_tool_calling_iterations=1, max_turn_length=1,
                           max_completion_length=12, dynamic_sampling=True, max_sampling_rounds=2,
                           log_completions_steps=1, rows=[{"prompt": p} for p in ["ab", "ba", "cd", "ac"]])
    assert [f.name for f in trainer.reward_funcs] == ["count_a", "CountingEnv"]
    history = trainer.train()
    row = history[-1]
    assert row["rewards/CountingEnv"] in (0.0, 0.5, 1.0) and "dynamic_sampling/rounds" in row
    assert row["tools/call_frequency"] == 1.0 and row["tools/turns"] == 2.0
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert all("\npeek: " in s["completion"] for s in samples)  # whole transcripts
    assert CountingEnv.made >= 1 + 2 * 8  # the probe, then one per episode


def test_resume_recreates_the_environments_from_the_data_position(tmp_path):
    config = dict(chars="abcd!: \n", environment_factory=CountingEnv, tool_call_parser="compact",
                  max_tool_calling_iterations=1, max_turn_length=2, max_completion_length=12, max_steps=4,
                  num_iterations=2, lr_scheduler="constant")  # the same schedule when stopped at step 2
    full = make_trainer(tmp_path / "full", **config).train()
    part = make_trainer(tmp_path / "part", save_steps=2, **{**config, "max_steps": 2}).train()
    resumed_trainer = make_trainer(tmp_path / "part", **config)
    resumed = resumed_trainer.train(resume_from_checkpoint=True)
    assert strip(resumed) == strip(full) and strip(part) == strip(full)[:2]


def test_lora_and_process_supervision_with_tools(tmp_path):
    seen = {}

    def last_step(prompts, completions, messages, **kwargs):
        seen["messages"] = messages
        return [{"steps": [0.5 if "a" in c else -0.5], "ends": [len(c)]} for c in completions]

    trainer = make_trainer(tmp_path, chars="abcd!: \n", reward=last_step, tools=[peek],
                           tool_call_parser=always_call, max_tool_calling_iterations=1, max_turn_length=2,
                           max_completion_length=16, process_supervision=True, peft={"r": 4})
    sampled = trainer.sample_groups(2)
    ends = sampled.scores.char_ends
    assert [e[0] for e in ends] == [len(t) for t in sampled.rollout.texts]  # last turn's end = transcript's end
    assert seen["messages"][0][0] == {"role": "user", "content": sampled.prompts[0]}
    before = params(trainer.model)
    trainer.train()
    after = params(trainer.model)
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora" in k)


def test_rollout_func_with_an_environment_mask(tmp_path):
    calls = []

    def rollout_func(prompts, trainer):
        calls.append(len(prompts))
        G = trainer.args.num_generations
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": [], "env_mask": [], "source": []}
        for p in prompts:
            ids = trainer.tokenizer(p)["input_ids"]
            for g in range(G):
                out["prompt_ids"].append(ids)
                out["completion_ids"].append([5, 6, 5 + g % 2])
                out["logprobs"].append([-1.0, 0.0, -1.0])
                out["env_mask"].append([1, 0, 1])
                out["source"].append("mine")
        return out

    def reward(completions, source, **kwargs):
        assert set(source) == {"mine"}
        return [float(c.endswith("b")) for c in completions]

    trainer = make_trainer(tmp_path, reward=reward, rollout_func=rollout_func)
    batch, _ = trainer.rollout()
    assert calls == [2] and batch.loss_mask[:, 1].sum() == 0 and batch.loss_mask[:, [0, 2]].all()
    assert trainer.train()[-1]["step"] == 2


def test_vllm_samples_the_turns(tmp_path):
    """The vLLM engine samples each turn of the episodes; the model tokens' log-probs it recorded are the
    training forward's over the whole transcript."""
    pytest.importorskip("vllm")
    if torch.cuda.is_available():
        pytest.skip("checks vLLM's CPU backend")
    from grpokit.models.forward import completion_logps

    tokenizer = char_tokenizer()
    model = tiny_model(tokenizer, hidden_size=128)
    args = GRPOConfig(output_dir=str(tmp_path / "run"), max_steps=1, prompts_per_step=2, num_generations=2,
                      max_completion_length=24, rollout_engine="vllm", tool_call_parser=always_call,
                      max_tool_calling_iterations=2, max_turn_length=3, save_steps=0)
    trainer = GRPOTrainer(model, count_a, [{"prompt": "ab"}, {"prompt": "cd"}], args=args, tokenizer=tokenizer,
                          tools=[peek])
    try:
        r = trainer.sample_groups(2).rollout
        assert ((r.model_mask == 0) & (r.completion_mask == 1)).any()
        with torch.no_grad():
            logps = completion_logps(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
        where = r.model_mask.bool()
        torch.testing.assert_close(logps[where], r.sampling_logps[where], rtol=0, atol=1e-4)
    finally:
        trainer.engine.close()


def test_bad_arguments_are_named(tmp_path):
    def undocumented(x):
        return x

    with pytest.raises(ValueError, match="tool 'undocumented'"):
        make_trainer(tmp_path, tools=[undocumented])
    with pytest.raises(ValueError, match="at least one reward function"):
        make_trainer(tmp_path, reward=None, tools=[peek])
    with pytest.raises(ValueError, match="reward_weights has 3 entries for 2"):
        make_trainer(tmp_path, reward=[count_a], environment_factory=CountingEnv, reward_weights=[1.0, 1.0, 1.0])
    trainer = make_trainer(tmp_path, reward=[count_a], environment_factory=CountingEnv, reward_weights=[2.0])
    assert trainer.reward_weights == [2.0, 1.0]
    with pytest.raises(ValueError, match="max_turn_length must be an integer >= 1"):
        GRPOConfig(max_turn_length=0)
    (tmp_path / "eval.jsonl").write_text('{"prompt": "ab"}\n')
    with pytest.raises(ValueError, match="evaluation .eval_steps. samples single turns"):
        make_trainer(tmp_path, tools=[peek], eval_steps=1, eval_dataset=str(tmp_path / "eval.jsonl"))


def test_the_demo_with_a_tool_it_never_calls_is_the_demo(tmp_path):
    """The demo (chat prompts, char_match) with ``tools=[peek]``: a random model never writes a Hermes call, the
    demo's chat template shows no tool schema, and the run is the demo's, step for step."""
    from grpokit.cli.demo import demo_config
    from grpokit.tasks.demo import letter_task

    runs = []
    for name, extra in (("plain", {}), ("tools", {"tools": [peek]})):
        tokenizer = char_tokenizer()
        config = demo_config(output_dir=str(tmp_path / name), max_steps=4, logging_steps=1000)
        trainer = GRPOTrainer(tiny_model(tokenizer), "char_match", letter_task(), args=config, tokenizer=tokenizer,
                              **extra)
        runs.append((strip(trainer.train()), params(trainer.model)))
    (h_plain, p_plain), (h_tools, p_tools) = runs
    assert h_plain == h_tools
    assert all(torch.equal(p_plain[k], p_tools[k]) for k in p_plain)
