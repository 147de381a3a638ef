"""The rollout-engine seam: the registry, the records' row selection, and one contract for every in-process engine."""

import dataclasses

import pytest
import torch

from grpokit.config import ROLLOUT_ENGINES
from grpokit.rollout import ENGINES, Rollout, RolloutEngine, SamplingParams, make_engine, select_rows
from grpokit.tasks.demo import char_tokenizer, tiny_model
from grpokit.training.data import encode_prompt


def test_every_config_choice_has_an_engine_and_back():
    assert tuple(ENGINES) == ROLLOUT_ENGINES
    with pytest.raises(ValueError, match="rollout_engine must be one of auto, lean, hf, vllm; got 'sglang'"):
        make_engine("sglang", None, None)


def test_select_rows_of_nested_records():
    @dataclasses.dataclass(frozen=True)
    class Inner:
        x: torch.Tensor
        names: list

    @dataclasses.dataclass(frozen=True)
    class Outer:
        inner: Inner
        columns: dict
        empty: torch.Tensor | None

    record = Outer(Inner(torch.arange(8).view(4, 2), list("abcd")), {"target": [10, 11, 12, 13]}, None)
    picked = select_rows(record, [3, 0, 3])
    assert picked.inner.x.tolist() == [[6, 7], [0, 1], [6, 7]] and picked.inner.names == ["d", "a", "d"]
    assert picked.columns == {"target": [13, 10, 13]} and picked.empty is None
    sliced = select_rows(record, slice(1, 3))
    assert sliced.inner.names == ["b", "c"] and sliced.inner.x.data_ptr() == record.inner.x[1:3].data_ptr()  # a view


@pytest.mark.parametrize("name", ["auto", "lean", "hf"])
def test_in_process_engines_keep_the_rollout_contract(name):
    tokenizer = char_tokenizer("abcde")
    model = tiny_model(tokenizer, hidden_size=32)
    engine = make_engine(name, model, tokenizer)
    assert isinstance(engine, RolloutEngine) and engine.sync_weights(model) == 0.0  # reads the weights in place
    prompts = [encode_prompt(tokenizer, p) for p in ["ab", "c", "dde"] for _ in range(4)]
    params = SamplingParams(max_new_tokens=6, eos_token_ids=(tokenizer.eos_token_id,),
                            pad_token_id=tokenizer.pad_token_id, temperature=0.9,
                            generator=torch.Generator().manual_seed(0))
    rollout = engine.generate(prompts, params)
    assert isinstance(rollout, Rollout) and len(rollout) == 12
    C = rollout.completion_ids.size(1)
    assert C <= 6 and rollout.prompt_mask.sum(-1).tolist() == [len(p) for p in prompts]
    is_eos = rollout.completion_ids == tokenizer.eos_token_id
    for row in range(12):
        n = int(rollout.completion_mask[row].sum())
        assert rollout.completion_mask[row, :n].all() and not rollout.completion_mask[row, n:].any()  # a prefix
        assert bool(rollout.is_truncated[row]) == (not is_eos[row, :n].any() and n == 6)
        assert (rollout.sampling_logps[row, n:] == 0).all() and (rollout.sampling_logps[row, :n] < 0).all()
    assert len(rollout.texts) == 12
    engine.close()
    same = make_engine(name, model, tokenizer).generate(prompts, dataclasses.replace(
        params, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(same.completion_ids, rollout.completion_ids)  # the trainer's generator decides the draws


def test_lean_engine_refuses_a_model_it_cannot_run():
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = char_tokenizer("ab")
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    params = SamplingParams(max_new_tokens=2, eos_token_ids=(0,), pad_token_id=0)
    with pytest.raises(ValueError, match="rollout_engine 'lean' supports Llama-family models"):
        make_engine("lean", model, tokenizer).generate([[3, 4]], params)
    assert len(make_engine("auto", model, tokenizer).generate([[3, 4]], params)) == 1  # auto falls back to hf
