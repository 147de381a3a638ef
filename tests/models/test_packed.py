"""The packed, prefix-shared training forward (grpokit.models.packed) against the Hugging Face forward, held to
float64 rounding (1e-12) with the ``exact_norms`` fixture (tests/conftest.py)."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grpokit.logprobs import hidden_states, lm_head_of, token_logprobs
from grpokit.models import packed
from grpokit.models.forward import completion_logps
from grpokit.rollout import position_ids_from_mask
from tests.rollout.test_lean import DYNAMIC, ROPE_VARIANTS, tiny

FAMILIES = [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("mistral", {}), ("qwen2", {}), ("qwen3", {})]


def grpo_batch(vocab: int = 37, seed: int = 1):
    """Five rows: two groups of two sharing a prompt (one left-padded to a single token), one row alone;
    completions of 1 to 4 tokens, right-padded."""
    g = torch.Generator().manual_seed(seed)
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 1]])
    prompt_ids = torch.randint(1, vocab, (5, 5), generator=g) * prompt_mask
    prompt_ids[1], prompt_ids[4] = prompt_ids[0], prompt_ids[3]
    completion_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    completion_ids = torch.randint(1, vocab, (5, 4), generator=g) * completion_mask
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def hugging_face_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature):
    ids, mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    hidden = hidden_states(model, ids, mask, position_ids=position_ids_from_mask(mask))[:, prompt_ids.size(1) - 1:-1]
    weight, bias = lm_head_of(model)
    return token_logprobs(hidden, weight, completion_ids, temperature=temperature, bias=bias, return_entropy=True)


def values_and_grads(model, fn, mask):
    model.zero_grad()
    logps, entropy = fn()
    ((logps * mask).sum() + 0.3 * (entropy * mask).sum()).backward()  # entropy's gradient checked too
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # a tied table's lookup adds a sparse gradient to the head's dense one: what AdamW sees is dense
    assert all(g.layout == torch.strided for g in grads.values())
    return logps * mask, entropy * mask, grads


@pytest.mark.parametrize("family,extra", FAMILIES)
def test_logps_entropy_and_gradients_equal_the_hugging_face_forward(family, extra, exact_norms):
    model = tiny(family, **extra).double().train()
    batch = grpo_batch()
    mask = batch[3]
    assert packed.supports(model, 9)
    got = values_and_grads(model, lambda: completion_logps(model, *batch, temperature=0.7, return_entropy=True), mask)
    want = values_and_grads(model, lambda: hugging_face_logps(model, *batch, 0.7), mask)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-12)
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_float32_and_bfloat16_match_too(dtype, atol):
    model = tiny("qwen2").to(dtype).train()  # qkv biases; HF's own norms
    batch = grpo_batch()
    got = completion_logps(model, *batch) * batch[3]
    want = hugging_face_logps(model, *batch, 1.0)[0] * batch[3]
    torch.testing.assert_close(got, want, rtol=0, atol=atol)


ROPE_MODELS = {  # the batch's 9 columns reach position 8: dynamic stays below its 16 original positions
    **{name: {"rope_parameters": params} for name, params in ROPE_VARIANTS.items()},
    "dynamic": {"rope_parameters": DYNAMIC, "max_position_embeddings": 16},
}


def rope_model(name, **extra):
    return tiny("llama", initializer_range=0.1, **copy.deepcopy(ROPE_MODELS[name]), **extra)


@pytest.mark.parametrize("variant", list(ROPE_MODELS))
def test_scaled_rope_matches_the_hugging_face_forward(variant, exact_norms):
    model = rope_model(variant).double().train()
    batch = grpo_batch()
    mask = batch[3]
    assert packed.supports(model, 9)
    got = values_and_grads(model, lambda: completion_logps(model, *batch, return_entropy=True), mask)
    want = values_and_grads(model, lambda: hugging_face_logps(model, *batch, 1.0), mask)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-12)
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=0, atol=1e-12, msg=name)
    if variant != "dynamic":  # the scaling reaches the log-probs (dynamic is plain RoPE at this length)
        plain = tiny("llama", initializer_range=0.1).double()
        plain.load_state_dict(model.state_dict())
        assert (hugging_face_logps(plain, *batch, 1.0)[0] * mask - want[0]).abs().max() > 1e-2


def test_dynamic_rope_past_its_original_length_uses_the_hugging_face_forward():
    """Past its original length dynamic RoPE takes its frequencies from the longest position of the call (and
    keeps them for shorter later calls): the packed tokens leave out each row's last one, so their call need
    not see the padded forward's longest position. ``supports`` refuses it and the padded forward runs."""
    model = tiny("llama", initializer_range=0.1, max_position_embeddings=4,
                 rope_parameters=copy.deepcopy(DYNAMIC)).double()
    batch = grpo_batch()
    mask = batch[3]
    assert not packed.supports(model, 9)
    with torch.no_grad():
        want = hugging_face_logps(model, *batch, 1.0)[0] * mask
        torch.testing.assert_close(completion_logps(model, *batch) * mask, want, rtol=0, atol=0)


@pytest.mark.parametrize("family,variant", [("llama", None), ("mistral", None), ("qwen2", None), ("qwen3", None),
                                            *[("llama", name) for name in ROPE_VARIANTS]])
def test_bfloat16_log_probs_match_the_hugging_face_bfloat16_forward(family, variant):
    """Log-probs near log(1/37) = -3.6: bfloat16 spaces numbers of that size 2**-6 = 0.016 apart, and the two
    forwards round in different places (stacked projections, attention layout, the packed rotary call), so
    they differ by up to about one such step (measured: 0.011 at most here, close to how far the Hugging Face
    bfloat16 forward is from its float32 one). 2e-2 passes that and still fails a wrong rotation: with these
    weights (initializer_range 0.1) RoPE scaled by 1.5 instead of not at all moves them by 0.03 or more; the
    float32 and float64 tests hold the formula itself to rounding."""
    model = (rope_model(variant) if variant else tiny(family, initializer_range=0.1)).to(torch.bfloat16)
    batch = grpo_batch()
    assert packed.supports(model, 9)
    with torch.no_grad():
        got = completion_logps(model, *batch) * batch[3]
        want = hugging_face_logps(model, *batch, 1.0)[0] * batch[3]
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2e-2)


@pytest.mark.parametrize("tied", [False, True])
def test_under_bf16_autocast_logps_and_master_gradients_match_the_hugging_face_forward(tied):
    """bf16 mixed precision: float32 master weights, the forward under autocast (projections stacked in bf16,
    short attention in float32, the head in bf16 from the float32 master). Log-probs within bf16's spacing
    near -3.6 of the Hugging Face forward under autocast, and every master gradient float32, dense, and within
    a few percent of the Hugging Face one (the two round in different places); a gradient that missed a
    stacked weight or the tied table would be off by its whole size."""
    from grpokit.models.forward import head_in

    model = tiny("qwen2", initializer_range=0.1, tie_word_embeddings=tied)
    batch = grpo_batch()

    def reference():
        prompt_ids, prompt_mask, completion_ids, completion_mask = batch
        ids, mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
        hidden = hidden_states(model, ids, mask, position_ids=position_ids_from_mask(mask))[:, 4:-1]
        return token_logprobs(**head_in(hidden, *lm_head_of(model)), targets=completion_ids, return_entropy=True)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = values_and_grads(model, lambda: completion_logps(model, *batch, return_entropy=True), batch[3])
        want = values_and_grads(model, reference, batch[3])
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=2e-2)
    assert got[2].keys() == want[2].keys() == {n for n, _ in model.named_parameters()}
    for name, g in got[2].items():
        assert g.dtype == torch.float32
        assert (g - want[2][name]).norm() <= 0.05 * want[2][name].norm(), name


def test_a_tied_tables_lookup_gradient_is_added_into_the_heads_in_place(monkeypatch):
    """The head's (V, H) gradient, as the chunked head forms it (late, after the body's backward), becomes the
    table's ``.grad`` itself: the lookup's sparse rows were added into it, not both into a new tensor."""
    import grpokit.logprobs as lp

    returned = []  # addresses only: holding the tensor would itself rule out adding into it in place
    take = lp.LateWeightGrad.take

    def spy(self):
        grad = take(self)
        returned.append(grad.data_ptr())
        return grad

    monkeypatch.setattr(lp.LateWeightGrad, "take", spy)
    model = tiny("llama", tie_word_embeddings=True)
    batch = grpo_batch()
    values_and_grads(model, lambda: completion_logps(model, *batch, return_entropy=True), batch[3])
    table = model.get_input_embeddings().weight
    assert table.grad.data_ptr() in returned  # an out-of-place sum is made while both exist: another address


def test_padded_slots_are_zero_and_shared_prompts_are_computed_once():
    prompt_ids, prompt_mask, completion_ids, completion_mask = grpo_batch()
    layout = packed.Layout.of(prompt_ids, prompt_mask, completion_mask)
    # unique prompt tokens 3 + 5 + 1, plus the 4 + 2 + 1 + 3 + 4 real completion tokens but each row's last
    assert layout.owned.numel() == 9 + 14 - 5
    model = tiny("llama")
    logps = completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    assert (logps[completion_mask == 0] == 0).all() and (logps[completion_mask == 1] < 0).all()


def test_lora_layers_are_called_and_get_the_same_gradients(exact_norms):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny("llama").double(), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"],
                                                               lora_dropout=0.0, init_lora_weights=False))
    model.train()
    batch = grpo_batch()
    mask = batch[3]
    assert packed.supports(model, 9)
    got = values_and_grads(model, lambda: completion_logps(model, *batch, return_entropy=True), mask)
    want = values_and_grads(model, lambda: hugging_face_logps(model, *batch, 1.0), mask)
    assert any("lora" in name for name in want[2])
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=0, atol=1e-12, msg=name)


def test_what_it_does_not_cover_uses_the_hugging_face_forward():
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=20, n_embd=16, n_layer=1, n_head=2))
    assert not packed.supports(gpt2, 10)
    checkpointed = tiny("llama")
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not packed.supports(checkpointed, 9)
    dropout = tiny("llama", attention_dropout=0.1).train()
    assert not packed.supports(dropout, 9) and packed.supports(dropout.eval(), 9)
    assert not packed.supports(tiny("mistral", sliding_window=4), 9)


def test_the_trainer_makes_the_same_update_with_and_without_padding(tmp_path, exact_norms):
    from tests.models.test_prepare import one_update

    _, padded = one_update(tmp_path / "padded", padding_free=False, beta=0.1)
    _, free = one_update(tmp_path / "free", padding_free=True, beta=0.1)
    for name in padded:
        torch.testing.assert_close(free[name], padded[name], rtol=0, atol=1e-12, msg=name)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_padding_and_sharing_pattern_matches_the_hugging_face_forward(data, exact_norms):
    """Random row counts, prompt and completion lengths (a completion may be empty), and rows sharing an
    earlier row's prompt (a group, or a prompt drawn twice): log-probs and gradients as the padded Hugging Face
    forward's, in float64."""
    model = PROPERTY_MODEL
    N, P, C = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    prompt_len = [data.draw(st.integers(1, P)) for _ in range(N)]
    prompt_mask = torch.tensor([[0] * (P - n) + [1] * n for n in prompt_len])
    prompt_ids = torch.randint(1, 37, (N, P), generator=g) * prompt_mask
    for n in range(1, N):  # repeat an earlier row's prompt (the previous one: a group) or not
        if data.draw(st.booleans()):
            earlier = data.draw(st.integers(0, n - 1))
            prompt_ids[n], prompt_mask[n] = prompt_ids[earlier], prompt_mask[earlier]
    completion_mask = torch.tensor([[1] * n + [0] * (C - n) for n in (data.draw(st.integers(0, C)) for _ in range(N))])
    completion_ids = torch.randint(1, 37, (N, C), generator=g) * completion_mask
    batch = (prompt_ids, prompt_mask, completion_ids, completion_mask)
    got = values_and_grads(model, lambda: completion_logps(model, *batch, return_entropy=True), completion_mask)
    want = values_and_grads(model, lambda: hugging_face_logps(model, *batch, 1.0), completion_mask)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-12)
    for name in want[2]:
        torch.testing.assert_close(got[2].get(name, torch.zeros_like(want[2][name])), want[2][name], rtol=0,
                                   atol=1e-12, msg=name)


PROPERTY_MODEL = tiny("qwen2").double().train()  # qkv biases, grouped-query attention
