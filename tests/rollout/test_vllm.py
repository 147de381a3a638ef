"""``rollout_engine: vllm`` (grpokit.rollout.vllm) with the real engine: vLLM's CPU backend on tiny models.

vLLM's CPU attention needs a head size of at least 32, so the models here are hidden 128 with 4 heads. Each
``VLLMEngine`` starts a vLLM engine in this process (a few seconds): the engine-level tests share one.
"""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from grpokit import GRPOConfig
from grpokit.cli.demo import demo_config
from grpokit.models.forward import completion_logps
from grpokit.rollout import SamplingParams, make_engine, token_lists
from grpokit.tasks.demo import char_tokenizer, letter_task, tiny_model
from grpokit.training.trainer import GRPOTrainer

pytest.importorskip("vllm")
on_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks vLLM's CPU backend")

HIDDEN = 128  # head size 32, the smallest vLLM's CPU attention takes
MAX_NEW = 12


def sequence_logps(model, sequence: list[int]) -> torch.Tensor:
    """log p(token | prefix) of each token after the first, from ``model``'s own forward in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([sequence])).logits[0].float()
    finally:
        model.train(was_training)
    return torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(sequence[1:])[:, None])[:, 0]


def assert_engine_holds(engine, model, tokenizer):
    """vLLM's log-probs of fixed sequences are ``model``'s: the engine holds its current weights."""
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "b"}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
    sequences = [chat + tokenizer.encode("bbbb"), tokenizer.encode("the quick brown fox, 42!")]
    for sequence, got in zip(sequences, engine.score(sequences)):
        torch.testing.assert_close(got, sequence_logps(model, sequence), rtol=0, atol=1e-4)


# ---- the engine on its own ------------------------------------------------------------------------------


class TestEngine:
    @pytest.fixture(scope="class")
    def setup(self):
        from grpokit.rollout.vllm import VLLMEngine

        tokenizer = char_tokenizer()
        model = tiny_model(tokenizer, hidden_size=HIDDEN)
        engine = VLLMEngine(model, tokenizer, max_prompt_length=16, max_completion_length=MAX_NEW)
        yield engine, model, tokenizer
        engine.close()

    @staticmethod
    def prompts(tokenizer):
        """Prompts of three lengths, each repeated as a group of 4 (the trainer's layout)."""
        texts = ["a", "hello", "ab cd ef gh"]
        return [tokenizer.encode(t) for t in texts for _ in range(4)]

    @staticmethod
    def params(tokenizer, seed: int = 0, **kw) -> SamplingParams:
        # several EOS tokens, so that a random model ends most completions early
        eos = (tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(list("aeiou")))
        return SamplingParams(max_new_tokens=MAX_NEW, eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id,
                              generator=torch.Generator().manual_seed(seed), **kw)

    @pytest.mark.parametrize("filters", [dict(), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8)])
    def test_rollout_contract_and_sampler_logps(self, setup, filters):
        engine, model, tokenizer = setup
        prompts = self.prompts(tokenizer)
        params = self.params(tokenizer, **filters)
        r = engine.generate(prompts, params)
        B, C = r.completion_ids.shape
        assert B == len(prompts) and 1 <= C <= MAX_NEW and r.sampling_entropy is None
        # prompts: left-padded with the pad id
        for i, p in enumerate(prompts):
            width = r.prompt_ids.size(1)
            assert r.prompt_ids[i, width - len(p):].tolist() == p
            assert r.prompt_mask[i].tolist() == [0] * (width - len(p)) + [1] * len(p)
            assert set(r.prompt_ids[i, :width - len(p)].tolist()) <= {tokenizer.pad_token_id}
        # completions: mask 1 through the first EOS, pad id after it; truncated = no EOS within MAX_NEW
        eos = set(params.eos_token_ids)
        lengths = r.completion_mask.sum(-1)
        assert int(lengths.max()) == C
        for i in range(B):
            n = int(lengths[i])
            row = r.completion_ids[i].tolist()
            assert r.completion_mask[i].tolist() == [1] * n + [0] * (C - n)
            assert set(row[n:]) <= {tokenizer.pad_token_id}
            ended = [k for k, t in enumerate(row[:n]) if t in eos]
            if ended:
                assert ended == [n - 1] and not r.is_truncated[i]
            else:
                assert n == MAX_NEW and r.is_truncated[i]
        assert 0 < int(r.is_truncated.sum()) < B  # both kinds present
        assert r.texts == tokenizer.batch_decode(token_lists(r.completion_ids, r.completion_mask),
                                                 skip_special_tokens=True)
        # each row drew from its own seed: a group's completions are not copies of one another
        assert len({tuple(row) for row in r.completion_ids[:4].tolist()}) > 1
        # the recorded log-probs are those of the tempered, unfiltered distribution, as the trainer scores it
        temperature = filters.get("temperature", 1.0)
        logps = completion_logps(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask,
                                 temperature=temperature)
        assert torch.all(r.sampling_logps[r.completion_mask == 0] == 0)
        torch.testing.assert_close(r.sampling_logps * r.completion_mask, logps * r.completion_mask, rtol=0,
                                   atol=1e-4)
        if "top_k" in filters:  # and the filter shaped which tokens were drawn: each within its top 5
            for i in range(B):
                n, p = int(lengths[i]), prompts[i]
                sequence = p + r.completion_ids[i, :n].tolist()
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([sequence])).logits[0, len(p) - 1:-1]  # (n, V)
                drawn = logits.gather(-1, r.completion_ids[i, :n, None])  # (n, 1)
                assert bool(((logits > drawn).sum(-1) < 5).all())

    def test_seeds_come_from_the_trainer_generator(self, setup):
        engine, _, tokenizer = setup
        prompts = self.prompts(tokenizer)
        first = engine.generate(prompts, self.params(tokenizer, seed=3))
        again = engine.generate(prompts, self.params(tokenizer, seed=3))
        other = engine.generate(prompts, self.params(tokenizer, seed=4))
        assert torch.equal(first.completion_ids, again.completion_ids)
        torch.testing.assert_close(first.sampling_logps, again.sampling_logps, rtol=0, atol=1e-6)
        assert not torch.equal(first.completion_ids, other.completion_ids)

    def test_process_state_is_left_as_found(self, setup):
        engine, _, tokenizer = setup
        torch.manual_seed(11)
        random.seed(11)
        state, python_state, threads = torch.get_rng_state(), random.getstate(), torch.get_num_threads()
        set_threads = torch.set_num_threads
        engine.generate(self.prompts(tokenizer), self.params(tokenizer))
        assert torch.equal(torch.get_rng_state(), state) and random.getstate() == python_state
        assert torch.get_num_threads() == threads and torch.set_num_threads is set_threads

    def test_sync_pushes_changed_weights_only(self, setup):
        engine, model, tokenizer = setup
        assert engine.sync_weights(model) == 0.0  # nothing changed since the engine started
        assert_engine_holds(engine, model, tokenizer)
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
            model.model.embed_tokens.weight.add_(0.05)  # tied to the LM head
        assert engine.sync_weights(model) > 0.0
        assert engine.sync_weights(model) == 0.0
        assert_engine_holds(engine, model, tokenizer)

    def test_too_long_for_max_model_len(self, setup):
        engine, _, tokenizer = setup
        params = self.params(tokenizer)
        with pytest.raises(ValueError, match="raise vllm_max_model_length"):
            engine.generate([list(range(5, 40))], params)


# ---- errors ---------------------------------------------------------------------------------------------


@on_cuda
def test_head_size_below_the_cpu_backend_minimum():
    tokenizer = char_tokenizer()
    with pytest.raises(ValueError, match="head sizes 32, .*this model's is 16.*'lean' or 'hf'"):
        make_engine("vllm", tiny_model(tokenizer, hidden_size=64), tokenizer, max_completion_length=4)


@on_cuda
def test_sleep_mode_needs_cuda():
    tokenizer = char_tokenizer()
    with pytest.raises(ValueError, match="vllm_enable_sleep_mode needs CUDA"):
        make_engine("vllm", tiny_model(tokenizer, hidden_size=HIDDEN), tokenizer, enable_sleep_mode=True)


def test_unsupported_architecture():
    import transformers

    tokenizer = char_tokenizer()
    xlnet = transformers.XLNetLMHeadModel(transformers.XLNetConfig(vocab_size=len(tokenizer), d_model=HIDDEN, n_layer=1,
                                                                   n_head=4, d_inner=2 * HIDDEN))
    with pytest.raises(ValueError, match="does not support the architecture XLNetLMHeadModel: use rollout_engine"):
        make_engine("vllm", xlnet, tokenizer, max_completion_length=4)


def test_missing_vllm_says_how_to_install(monkeypatch):
    from grpokit.rollout.vllm import import_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now fails
    with pytest.raises(ImportError, match=r"pip install 'grpokit\[vllm\]'.*make install"):
        import_vllm()


# ---- through the trainer --------------------------------------------------------------------------------


def rewards(rows, first: int, last: int) -> tuple[float, float]:
    return (sum(r["reward"] for r in rows[:first]) / first, sum(r["reward"] for r in rows[-last:]) / last)


@pytest.mark.slow
def test_learns_the_demo_task_as_the_lean_engine_does(tmp_path):
    """The demo run (lr 3e-3, 8 prompts x 8, 4 tokens) on a hidden-128 model, sampled by vLLM and by the lean
    engine: rewards rise alike. 60 steps: the lean engine's last-10 mean is 0.86 at seed 0."""
    tokenizer = char_tokenizer()
    runs = {}
    for engine in ("lean", "vllm"):
        config = demo_config(output_dir=str(tmp_path / engine), max_steps=60, rollout_engine=engine,
                             logging_steps=1000)
        trainer = GRPOTrainer(tiny_model(tokenizer, hidden_size=HIDDEN), "char_match", letter_task(), args=config,
                              tokenizer=tokenizer)
        try:
            runs[engine] = trainer.train()
            if engine == "vllm":
                rows = runs[engine]
                assert all("rollout/weight_sync_s" in row for row in rows)
                assert rows[0]["rollout/weight_sync_s"] == 0.0  # the engine started on these weights
                assert all(row["rollout/weight_sync_s"] > 0 for row in rows[1:])  # every step changed them
                assert trainer.engine.sync_weights(trainer.model) > 0  # the last step's update
                assert_engine_holds(trainer.engine, trainer.model, tokenizer)
        finally:
            trainer.engine.close()
    (lean_first, lean_last), (first, last) = rewards(runs["lean"], 5, 10), rewards(runs["vllm"], 5, 10)
    assert lean_first < 0.1 and first < 0.1  # a random policy: 1 in 51 characters right
    assert lean_last > 0.6
    assert last > 0.6 and last > lean_last - 0.2, (runs["lean"][-1], runs["vllm"][-1])


@pytest.mark.slow
@pytest.mark.parametrize("peft", [None, {"dropout": 0.0}], ids=["full", "lora"])
def test_several_updates_per_rollout_stay_in_sync(tmp_path, peft):
    """num_iterations=2: the trainer scores each rollout with its own forward, so the mismatch metrics compare
    vLLM's log-probs with the trainer's on the same weights: float32 rounding, the weights were pushed (LoRA:
    merged). The LoRA model is untied (a separate LM head to push); the trained adapters stay unmerged. LoRA
    dropout is off: the trainer computes its rollout-time log-probs with the model in train mode, so dropout
    would put its own noise into the metrics."""
    tokenizer = char_tokenizer()
    model = tiny_model(tokenizer, hidden_size=HIDDEN, tie_word_embeddings=peft is None)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    config = GRPOConfig(output_dir=str(tmp_path), max_steps=4, num_iterations=2, prompts_per_step=4,
                        num_generations=4, max_completion_length=6, learning_rate=3e-3, rollout_engine="vllm",
                        peft=peft, save_steps=0, logging_steps=1000, seed=1)
    trainer = GRPOTrainer(model, "char_match", letter_task(), args=config, tokenizer=tokenizer)
    try:
        rows = trainer.train()
        assert len(rows) == 4 and all("rollout/weight_sync_s" in row for row in rows)
        assert rows[0]["rollout/weight_sync_s"] == 0.0 and rows[2]["rollout/weight_sync_s"] > 0  # 2nd rollout
        for row in rows:
            assert row["mismatch/logp_abs_max"] < 1e-3, row
            assert abs(row["mismatch/kl"]) < 1e-6, row
        assert trainer.engine.sync_weights(trainer.model) > 0
        assert_engine_holds(trainer.engine, trainer.model, tokenizer)
        if peft is not None:
            from peft.tuners.lora import LoraLayer

            layers = [m for m in trainer.model.modules() if isinstance(m, LoraLayer)]
            assert layers and not any(m.merged for m in layers)
            assert any(float(m.lora_B["default"].weight.abs().max()) > 0 for m in layers)  # the adapters trained
            for k, v in trainer.model.get_base_model().state_dict().items():  # base weights untouched
                if "lora_" not in k:
                    assert torch.equal(v, base[k.replace(".base_layer", "")]), k
    finally:
        trainer.engine.close()


TORCHRUN_WORKER = '''
import json, sys
import torch.distributed as dist
from grpokit import GRPOConfig
from grpokit.tasks.demo import char_tokenizer, letter_task, tiny_model
from grpokit.training.trainer import GRPOTrainer

tokenizer = char_tokenizer()
out = {}
for mode in ("ddp", "fsdp"):
    config = GRPOConfig(output_dir=f"{sys.argv[1]}/{mode}", max_steps=4, num_iterations=2, prompts_per_step=4,
                        num_generations=4, max_completion_length=6, learning_rate=3e-3, rollout_engine="vllm",
                        distributed=mode, save_steps=0, logging_steps=1000, seed=1)
    trainer = GRPOTrainer(tiny_model(tokenizer, hidden_size=128), "char_match", letter_task(), args=config,
                          tokenizer=tokenizer)
    rows = trainer.train()
    trainer.engine.close()  # vLLM's shutdown leaves the trainer's process group alone: the next run uses it
    out[mode] = [{k: row[k] for k in ("rollout/weight_sync_s", "mismatch/logp_abs_max", "reward")} for row in rows]
print("RESULT " + json.dumps({"rank": dist.get_rank(), **out}), flush=True)
'''


@pytest.mark.slow
def test_torchrun_one_engine_per_rank(tmp_path):
    """2 gloo processes, DDP then FSDP: each rank runs its own engine (vLLM's external_launcher backend), pushes
    the updated weights (under FSDP, gathered, on every rollout) and samples from them."""
    worker = tmp_path / "worker.py"
    worker.write_text(TORCHRUN_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(worker), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    results = [json.loads(line[len("RESULT "):]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert sorted(r["rank"] for r in results) == [0, 1]
    for result in results:
        for mode in ("ddp", "fsdp"):
            rows = result[mode]
            assert len(rows) == 4 and all(row["mismatch/logp_abs_max"] < 1e-3 for row in rows), rows
            assert rows[2]["rollout/weight_sync_s"] > 0  # the second rollout, after two updates
            if mode == "ddp":
                assert rows[0]["rollout/weight_sync_s"] == 0.0
