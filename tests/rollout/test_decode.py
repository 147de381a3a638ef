"""The KV-cache sampling loop: same distribution as a full forward, EOS masking, truncation, filters."""

import functools
from types import SimpleNamespace

import pytest
import torch

from grpokit.models.forward import completion_logps
from grpokit.rollout import (
    SamplingParams,
    completion_mask_from_eos,
    filter_logits,
    generate,
    position_ids_from_mask,
    sample,
)
from grpokit.rollout.engine import left_pad
from grpokit.rollout.hf import start_hf
from grpokit.tasks.demo import char_tokenizer, tiny_model
from grpokit.training.data import encode_prompt

EOS, PAD = 0, 0


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer, seed=0, dtype=torch.float64).eval()


def _prompts(tokenizer):
    return [encode_prompt(tokenizer, p) for p in ["ab", "a much longer prompt", "x"] for _ in range(2)]


def test_incremental_logits_equal_full_forward(model, tokenizer, monkeypatch):
    """Every step's next-token logits from the KV cache equal those of one no-cache forward over the whole
    left-padded sequence with mask-derived positions (the generic loop; the Llama-family decoder is checked
    the same way in test_fast_decode.py)."""
    monkeypatch.setattr("grpokit.rollout.lean.supports", lambda model, length: False)
    captured = []
    forward = model.forward

    @functools.wraps(forward)  # keeps the signature: the loop looks up the name of the cache argument
    def recording_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        captured.append(out.logits[:, -1].detach().clone())
        return out

    prompt_ids, prompt_mask = left_pad(_prompts(tokenizer), tokenizer.pad_token_id)
    model.forward = recording_forward
    try:
        draws = sample(start_hf(model), prompt_ids, prompt_mask,
                       SamplingParams(max_new_tokens=6, eos_token_ids=(-1,), pad_token_id=PAD,
                                      generator=torch.Generator().manual_seed(0)))
        ids = draws.completion_ids
    finally:
        del model.forward
    assert ids.shape == (6, 6) and len(captured) == 6  # prefill + 5 decode steps, no EOS possible
    full_ids = torch.cat([prompt_ids, ids], dim=1)
    full_mask = torch.cat([prompt_mask, torch.ones_like(ids)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=full_ids, attention_mask=full_mask,
                       position_ids=position_ids_from_mask(full_mask)).logits  # (B, P + C, V)
    P = prompt_ids.size(1)
    for t, step_logits in enumerate(captured):
        torch.testing.assert_close(step_logits, logits[:, P - 1 + t], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logps_equal_training_logps(model, tokenizer, temperature):
    """The tokens are scored by the training path under the same tempered distribution they were drawn from."""
    r = generate(model, tokenizer, _prompts(tokenizer), max_new_tokens=8, eos_token_ids=[EOS],
                 temperature=temperature, generator=torch.Generator().manual_seed(1))
    logps = completion_logps(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask,
                             temperature=temperature)
    m = r.completion_mask.bool()
    torch.testing.assert_close(logps[m], r.sampling_logps[m], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 3, 0.8)])
def test_sampling_entropy_equals_the_training_entropy(model, tokenizer, temperature, top_k, top_p):
    """The entropy the sampler records is the training forward's: of the tempered distribution, unfiltered
    (top-k/top-p shape only the draw), 0 after a row's EOS."""
    r = generate(model, tokenizer, _prompts(tokenizer) * 3, max_new_tokens=8, eos_token_ids=[EOS],
                 temperature=temperature, top_k=top_k, top_p=top_p, generator=torch.Generator().manual_seed(2))
    _, entropy = completion_logps(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask,
                                  temperature=temperature, return_entropy=True)
    m = r.completion_mask.bool()
    assert top_k or not m.all()  # unfiltered, some rows end early (top-3 rarely draws EOS)
    torch.testing.assert_close(r.sampling_entropy[m], entropy[m], rtol=1e-9, atol=1e-9)
    assert (r.sampling_entropy[~m] == 0).all() and (r.sampling_entropy[m] > 0).all()


def test_finished_rows_leave_the_batch_and_every_row_is_still_scored_right(model, tokenizer, monkeypatch):
    """With 64 rows and 40 tokens, enough rows end early that the decoder drops them (``keep``); the kept rows'
    later tokens, the dropped rows' padding and every sampling log-prob stay right."""
    from grpokit.rollout import lean

    kept = []
    keep = lean.LlamaFamilyDecoder.keep
    monkeypatch.setattr(lean.LlamaFamilyDecoder, "keep", lambda self, rows: kept.append(int(rows.sum())) or
                        keep(self, rows))
    prompts = [encode_prompt(tokenizer, p) for p in ["ab", "a much longer prompt", "x", "yz"] for _ in range(16)]
    r = generate(model, tokenizer, prompts, max_new_tokens=40, eos_token_ids=[EOS],
                 generator=torch.Generator().manual_seed(3))
    assert kept and kept == sorted(kept, reverse=True) and kept[-1] < 64  # the batch shrank, step by step
    ended = torch.isin(r.completion_ids, torch.tensor([EOS])).any(-1)
    assert 0 < int(ended.sum()) < 64 and torch.equal(r.is_truncated, ~ended)
    assert (r.completion_ids[r.completion_mask == 0] == PAD).all()
    logps = completion_logps(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    m = r.completion_mask.bool()
    torch.testing.assert_close(logps[m], r.sampling_logps[m], rtol=1e-9, atol=1e-9)
    assert (r.sampling_logps[~m] == 0).all()


def test_distinct_rows():
    from grpokit.models.llama import distinct_rows

    x = torch.tensor([[5, 1, 2], [0, 1, 2], [5, 1, 2], [7, 7, 7], [0, 1, 2]])
    first, index = distinct_rows(x)
    assert sorted(first.tolist()) == [0, 1, 3] and torch.equal(x[first][index], x)
    # left padding with a pad id that is also a real token: the mask keeps the rows apart
    ids, mask = torch.tensor([[0, 3], [0, 3]]), torch.tensor([[0, 1], [1, 1]])
    assert distinct_rows(torch.cat([ids, mask], 1))[0].numel() == 2


def test_a_shared_prompt_is_run_once_and_every_row_is_scored_right(model, tokenizer, monkeypatch):
    """A group's G rows share their prompt: the decoder runs each distinct prompt once, then repeats its cache;
    every row's sampling log-probs still equal the training forward's."""
    from grpokit.rollout import lean

    rows = []
    prefill = lean.LlamaFamilyDecoder.prefill
    monkeypatch.setattr(lean.LlamaFamilyDecoder, "prefill", lambda self, ids: rows.append(ids.size(0)) or
                        prefill(self, ids))
    prompts = [encode_prompt(tokenizer, p) for p in ["ab", "a much longer prompt", "x"] for _ in range(4)]
    r = generate(model, tokenizer, prompts, max_new_tokens=8, eos_token_ids=[EOS],
                 generator=torch.Generator().manual_seed(5))
    assert rows == [3]
    assert len(set(map(tuple, r.completion_ids.tolist()))) > 3  # a group's rows still differ
    logps = completion_logps(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    m = r.completion_mask.bool()
    torch.testing.assert_close(logps[m], r.sampling_logps[m], rtol=1e-9, atol=1e-9)


def test_same_seed_same_rollout(model, tokenizer):
    run = lambda: generate(model, tokenizer, _prompts(tokenizer), max_new_tokens=8, eos_token_ids=[EOS],
                           generator=torch.Generator().manual_seed(7))
    a, b = run(), run()
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts


class Scripted(torch.nn.Module):
    """A stand-in LM whose step-t token for row b is script[b][t] (logits one-hot)."""

    def __init__(self, script, vocab=10):
        super().__init__()
        self.script, self.vocab, self.calls = torch.tensor(script), vocab, 0
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.config = None

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=True, logits_to_keep=0,
                cache=None):
        logits = torch.full((input_ids.size(0), 1, self.vocab), -1e4)
        logits[torch.arange(input_ids.size(0)), 0, self.script[:, self.calls]] = 0.0
        self.calls += 1
        return SimpleNamespace(logits=logits)


def test_eos_masking_truncation_and_early_stop():
    script = [[5, EOS, 7, 7, 7, 7],   # EOS at step 1
              [6, 6, 6, 6, 6, 6],     # never: truncated
              [EOS, 3, 3, 3, 3, 3]]   # EOS first
    model = Scripted(script)
    draws = sample(start_hf(model), torch.ones(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.long),
                   SamplingParams(max_new_tokens=4, eos_token_ids=(EOS,), pad_token_id=9))
    ids, mask, truncated = draws.completion_ids, draws.completion_mask, draws.is_truncated
    assert ids.tolist() == [[5, EOS, 9, 9], [6, 6, 6, 6], [EOS, 9, 9, 9]]  # pad after EOS
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]  # through the first EOS
    assert truncated.tolist() == [False, True, False]
    assert model.calls == 4  # max_new_tokens forwards: the last token needs no forward after it

    done_early = Scripted([[EOS, 1, 1, 1, 1], [4, EOS, 1, 1, 1]])
    draws = sample(start_hf(done_early), torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long),
                   SamplingParams(max_new_tokens=5, eos_token_ids=(EOS,), pad_token_id=9))
    ids, truncated = draws.completion_ids, draws.is_truncated
    assert ids.shape == (2, 2) and done_early.calls == 2 and not truncated.any()  # stopped once all rows ended


def test_completion_mask_from_eos_handles_several_eos_ids():
    ids = torch.tensor([[1, 2, 3, 2], [3, 3, 3, 3], [4, 4, 4, 4]])
    assert completion_mask_from_eos(ids, [2, 3]).tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]


def test_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.75)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.85)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.1)).tolist() == [[False, True, True, True]]  # top-1 stays
    assert torch.equal(filter_logits(logits), logits)


def test_top_k_one_is_greedy(model, tokenizer):
    r = generate(model, tokenizer, _prompts(tokenizer), max_new_tokens=5, eos_token_ids=[EOS], top_k=1,
                 generator=torch.Generator().manual_seed(3))
    prompt_ids, prompt_mask = r.prompt_ids, r.prompt_mask
    with torch.no_grad():
        first = model(input_ids=prompt_ids, attention_mask=prompt_mask,
                      position_ids=position_ids_from_mask(prompt_mask)).logits[:, -1].argmax(-1)
    assert torch.equal(r.completion_ids[:, 0], first)


def test_draw_samples_the_given_distribution_and_never_a_zero_probability_token():
    from grpokit.rollout.sampling import draw

    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0]]).expand(20_000, 5)
    idx = draw(probs, torch.Generator().manual_seed(0)).squeeze(-1)
    freq = torch.bincount(idx, minlength=5).float() / idx.numel()
    assert freq[1] == 0 and freq[4] == 0
    torch.testing.assert_close(freq, probs[0], rtol=0, atol=0.015)  # ~4 sigma at n = 20,000


def test_two_level_draw_over_a_large_vocabulary():
    from grpokit.rollout.sampling import BLOCK, draw

    V = 5 * BLOCK + 37  # several full blocks and a short last one
    probs = torch.zeros(V)
    support = torch.tensor([3, BLOCK - 1, BLOCK, 3 * BLOCK + 5, V - 1])  # block edges and the short block
    probs[support] = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
    idx = draw(probs.expand(20_000, V), torch.Generator().manual_seed(0)).squeeze(-1)
    freq = torch.bincount(idx, minlength=V).float() / idx.numel()
    assert set(idx.unique().tolist()) <= set(support.tolist())
    torch.testing.assert_close(freq[support], probs[support], rtol=0, atol=0.015)
