import copy

import pytest
import torch

from grpokit.models import llama
from grpokit.models.llama import position_ids_from_mask
from grpokit.rollout import lean


def tiny(family: str, **extra):
    import transformers

    common = dict(vocab_size=37, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    common.update(extra)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[family]
    torch.manual_seed(0)
    return model_cls(config_cls(**common)).eval()


ROPE_VARIANTS = {  # transformers 5 takes them as ``rope_parameters`` (``rope_scaling`` is an alias of it)
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
}
"""Scaled RoPE types whose cos/sin do not depend on the sequence length (``llama.STATIC_ROPE``): the decoder's
rope table holds for them. ``dynamic`` has its own tests."""

DYNAMIC = {"rope_type": "dynamic", "factor": 2.0}


def decode_against_full_forward(model, prompt_len: int = 5, new_tokens: int = 4, seed: int = 1):
    """Three left-padded prompts (2, 0 and prompt_len - 1 pad tokens) and ``new_tokens`` completion tokens fed
    one by one: the decoder's logits (3, new_tokens, V) and the Hugging Face forward's at the same positions,
    over the whole sequence at once with mask-derived positions."""
    g = torch.Generator().manual_seed(seed)
    prompt_mask = torch.ones(3, prompt_len, dtype=torch.long)
    prompt_mask[0, :2] = 0
    prompt_mask[2, :prompt_len - 1] = 0
    prompt_ids = torch.randint(0, 37, (3, prompt_len), generator=g) * prompt_mask
    new = torch.randint(0, 37, (3, new_tokens), generator=g)
    assert llama.supports(model, prompt_len + new_tokens), llama.unsupported_reason(model, prompt_len + new_tokens)
    decoder = lean.LlamaFamilyDecoder(model, prompt_mask, max_new_tokens=new_tokens)
    with torch.inference_mode():
        got = [decoder.prefill(prompt_ids)] + [decoder.step(new[:, t], t) for t in range(new_tokens - 1)]
        ids = torch.cat([prompt_ids, new], 1)
        mask = torch.cat([prompt_mask, torch.ones_like(new)], 1)
        full = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    return torch.stack(got, 1), full[:, prompt_len - 1:-1]


@pytest.mark.parametrize("family,extra", [("llama", {}), ("llama", {"tie_word_embeddings": True}),
                                          ("llama", {"attention_bias": True, "mlp_bias": True}),
                                          ("mistral", {}), ("qwen2", {}), ("qwen3", {}),
                                          ("qwen3", {"attention_bias": True})])
def test_logits_match_the_hugging_face_forward(family, extra):
    model = tiny(family, **extra)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got, want = decode_against_full_forward(model)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the norm weights and attention scale folded into the stacked copies leave the model's own weights alone
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_bfloat16_logits_match_the_hugging_face_bfloat16_forward(family):
    """Against the Hugging Face forward of the same bfloat16 model. Both round every op to bfloat16 (8 bits of
    mantissa) but not in the same places (stacked projections, attention kernel, the rope table), so they
    agree only to bfloat16 rounding of the logits: measured, within 1 % of the largest logit, about what the
    Hugging Face bfloat16 forward itself differs from its float32 forward. 3 % of the largest logit leaves
    room and still fails a real error: with these weights (initializer_range 0.1, so that attention is not
    near-uniform) a wrong RoPE moves the logits by 15 % or more."""
    model = tiny(family, initializer_range=0.1).to(torch.bfloat16)
    got, want = decode_against_full_forward(model)
    assert got.dtype == torch.bfloat16
    scale = want.float().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=3e-2 * scale)


def with_default_rope(model):
    """The same weights under plain RoPE."""
    plain = tiny(model.config.model_type, initializer_range=model.config.initializer_range,
                 max_position_embeddings=model.config.max_position_embeddings)
    plain.load_state_dict(model.state_dict())
    return plain.to(model.dtype)


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_rope_logits_match_the_hugging_face_forward(variant, dtype):
    """24 tokens, beyond the 16 original positions of llama3 and yarn; the scaled frequencies reach the logits
    (they differ from plain RoPE's with the same weights), and the decoder reproduces them."""
    model = tiny("llama", initializer_range=0.1, rope_parameters=copy.deepcopy(ROPE_VARIANTS[variant])).to(dtype)
    assert model.model.rotary_emb.rope_type == variant
    got, want = decode_against_full_forward(model, prompt_len=12, new_tokens=12)
    scale = want.float().abs().max().item()
    _, plain = decode_against_full_forward(with_default_rope(model), prompt_len=12, new_tokens=12)
    assert (plain.float() - want.float()).abs().max() > 0.1 * scale
    atol = 1e-5 if dtype == torch.float32 else 3e-2 * scale  # bfloat16: as in the test above
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=atol)


def test_dynamic_rope_is_run_only_where_it_is_plain_rope():
    """Dynamic NTK RoPE recomputes its frequencies from the longest position of each call. Past the original
    16 positions the Hugging Face forward over a whole sequence uses frequencies that depend on that
    sequence's length, which a decoder (one rope table per rollout, or one call per step) cannot know when it
    rotates the first keys: ``supports`` refuses it there. Below 16 tokens it is plain RoPE, and matches."""
    model = tiny("llama", initializer_range=0.1, max_position_embeddings=16, rope_parameters=copy.deepcopy(DYNAMIC))
    assert not llama.supports(model, 16) and not llama.supports(model, 24)
    assert "dynamic" in llama.unsupported_reason(model, 24)
    ids = torch.randint(0, 37, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # past 16 tokens the scaling acts
        scaled, plain = (m(input_ids=ids).logits[0, 16:] for m in (model, with_default_rope(model)))
    assert (scaled - plain).abs().max() > 1e-2 * plain.abs().max()
    got, want = decode_against_full_forward(model, prompt_len=8, new_tokens=7)  # 15 tokens
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_unsupported_models_fall_back():
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=20, n_embd=16, n_layer=1, n_head=2))
    assert not llama.supports(gpt2, 10)
    windowed = tiny("mistral", sliding_window=4)
    assert not llama.supports(windowed, 10) and llama.supports(windowed, 4)


@pytest.mark.parametrize("max_new_tokens", [2, 40])  # the cache gathered whole, or only its written slots
def test_select_repeats_and_drops_rows_of_the_written_cache(max_new_tokens):
    model = tiny("llama")
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]])
    prompt_ids = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 0, 4]])
    index = torch.tensor([2, 0, 0, 1, 2])
    with torch.inference_mode():
        whole = lean.LlamaFamilyDecoder(model, prompt_mask, max_new_tokens)
        first = whole.prefill(prompt_ids)
        written = whole.cache[..., :whole.filled, :].clone()
        whole.select(index)
        torch.testing.assert_close(whole.cache[..., :whole.filled, :], written[:, :, index], rtol=0, atol=0)
        key_ok = torch.cat([prompt_mask.bool(), torch.ones(3, max_new_tokens, dtype=torch.bool)], 1)
        assert torch.equal(whole.key_ok, key_ok[index])
        # and decoding on from the selected rows matches decoding the same rows from scratch
        direct = lean.LlamaFamilyDecoder(model, prompt_mask[index], max_new_tokens)
        torch.testing.assert_close(first[index], direct.prefill(prompt_ids[index]), rtol=0, atol=1e-5)
        token = torch.tensor([3, 1, 2, 5, 7])
        torch.testing.assert_close(whole.step(token, 0), direct.step(token, 0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_onednn_weights_give_the_same_logits_and_are_the_only_copy(compute_dtype):
    """Projections of at least ``ONEDNN_MIN_WEIGHT`` elements run on oneDNN's reordered weight (float32, or the
    bfloat16 of mixed precision): the logits still match the Hugging Face forward, and each reordered projection
    keeps no plain stacked weight beside it (the sampler holds one copy of the weights it prepares)."""
    if not torch.backends.mkldnn.is_available():
        pytest.fail("this torch build has no oneDNN: the reordered-weight path cannot be checked")
    model = tiny("qwen2", vocab_size=300, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True)
    prompt_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    prompt_ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    with torch.inference_mode():
        decoder = lean.LlamaFamilyDecoder(model, prompt_mask, 2, compute_dtype)
        got = decoder.prefill(prompt_ids)
        want = model(input_ids=prompt_ids, attention_mask=prompt_mask,
                     position_ids=position_ids_from_mask(prompt_mask)).logits[:, -1]
    prepared = [s for p in decoder.prepared for s in (p.qkv, p.o, p.gate_up, p.down)] + [decoder.head_prepared]
    assert all(s.onednn is not None and s.weight is None for s in prepared)
    assert all(s.dtype == (compute_dtype or torch.float32) for s in prepared)
    scale = want.abs().max().item()
    torch.testing.assert_close(got.float(), want, rtol=0, atol=1e-5 * scale if compute_dtype is None else 3e-2 * scale)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_stacked_weight_block_by_block_equals_scaling_a_stacked_copy(monkeypatch, dtype):
    """Rows scaled and cast a block at a time (blocks that straddle nothing, and a short last one) give the
    bits of the whole stacked float32 copy scaled in place and cast."""
    from grpokit.rollout import lean

    monkeypatch.setattr(lean, "STACK_BLOCK_ROWS", 7)
    torch.manual_seed(0)
    linears = [torch.nn.Linear(12, n, bias=True) for n in (16, 5, 9)]
    in_scale, out_scale = torch.rand(12) + 0.5, torch.rand(30) + 0.5
    want = torch.cat([m.weight for m in linears]).detach().mul_(in_scale).mul_(out_scale[:, None])
    want_bias = torch.cat([m.bias for m in linears]).detach().mul_(out_scale)
    with torch.no_grad():
        weight, bias = lean.stacked_weight(linears, in_scale, out_scale, dtype)
        plain, _ = lean.stacked_weight(linears, None, None, dtype)
    target = dtype or torch.float32
    assert weight.dtype == bias.dtype == target
    assert torch.equal(weight, want.to(target)) and torch.equal(bias, want_bias.to(target))
    assert torch.equal(plain, torch.cat([m.weight for m in linears]).detach().to(target))
