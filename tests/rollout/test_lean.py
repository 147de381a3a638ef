import pytest
import torch

from grpokit.models import llama
from grpokit.models.llama import position_ids_from_mask
from grpokit.rollout import lean


def tiny(family: str, **extra):
    import transformers

    common = dict(vocab_size=37, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, **extra)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[family]
    torch.manual_seed(0)
    return model_cls(config_cls(**common)).eval()


@pytest.mark.parametrize("family,extra", [("llama", {}), ("llama", {"tie_word_embeddings": True}),
                                          ("mistral", {}), ("qwen2", {}), ("qwen3", {})])
def test_logits_match_the_hugging_face_forward(family, extra):
    model = tiny(family, **extra)
    g = torch.Generator().manual_seed(1)
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])  # left padding
    prompt_ids = torch.randint(0, 37, (3, 5), generator=g) * prompt_mask
    new = torch.randint(0, 37, (3, 4), generator=g)  # completion tokens fed one by one
    assert llama.supports(model, 9)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    decoder = lean.LlamaFamilyDecoder(model, prompt_mask, max_new_tokens=4)
    with torch.inference_mode():
        got = [decoder.prefill(prompt_ids)] + [decoder.step(new[:, t], t) for t in range(3)]
        ids = torch.cat([prompt_ids, new], 1)
        mask = torch.cat([prompt_mask, torch.ones_like(new)], 1)
        full = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    for t, logits in enumerate(got):
        torch.testing.assert_close(logits, full[:, 4 + t], rtol=0, atol=1e-5)
    # the norm weights and attention scale folded into the stacked copies leave the model's own weights alone
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


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
