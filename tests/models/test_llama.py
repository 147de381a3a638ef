"""``grpokit.models.llama.supports``: every module and attribute the lean decoder and the padding-free forward read
must be there, and what they do not compute must be off; otherwise the generic path runs."""

import copy

import pytest
import torch

from grpokit.models import llama
from grpokit.models.loading import base_model
from tests.rollout.test_lean import DYNAMIC, ROPE_VARIANTS, tiny

LENGTH = 9


class Opaque(torch.nn.Module):
    """A module with none of the attributes of the one it replaces."""

    def forward(self, x):
        return x


def layer(model, i=1):
    return model.model.layers[i]


def attn(model):
    return layer(model).self_attn


def set_config(name, value):
    return lambda m: setattr(m.config, name, value)


def gone(path, name):
    """Deletes attribute ``name`` of the module at ``path`` (a function of the model)."""
    return lambda m: delattr(path(m), name)


def body(m):
    return m.model


def rotary(m):
    return m.model.rotary_emb


def norm(name):
    return lambda m: getattr(layer(m), name)


# (what is changed, a fragment of the reason ``unsupported_reason`` gives)
MISSING = {
    # the model and its body
    "model_type": (set_config("model_type", "gpt2"), "model_type"),
    "body": (gone(lambda m: m, "model"), "body"),
    "embed_tokens": (gone(body, "embed_tokens"), "embed_tokens"),
    "embed_tokens.weight": (lambda m: setattr(m.model, "embed_tokens", Opaque()), "embed_tokens"),
    "layers": (gone(body, "layers"), "layers"),
    "norm": (gone(body, "norm"), "lacks norm"),
    "norm.variance_epsilon": (gone(lambda m: m.model.norm, "variance_epsilon"), "final norm"),
    "rotary_emb": (gone(body, "rotary_emb"), "rotary_emb"),
    "lm_head": (lambda m: setattr(m, "lm_head", None), "LM head"),
    "lm_head.out_features": (lambda m: setattr(m, "lm_head", Opaque()), "LM head"),
    # the config
    "num_key_value_heads": (gone(lambda m: m.config, "num_key_value_heads"), "num_key_value_heads"),
    "num_key_value_heads=3": (set_config("num_key_value_heads", 3), "num_key_value_heads"),  # 4 heads
    "num_key_value_heads=1": (set_config("num_key_value_heads", 1), "k_proj"),  # k_proj has 2 heads
    "num_attention_heads=8": (set_config("num_attention_heads", 8), "q_proj"),
    "num_hidden_layers": (set_config("num_hidden_layers", 1), "num_hidden_layers"),
    # a layer's attention
    "self_attn": (gone(layer, "self_attn"), "self_attn"),
    "self_attn.head_dim": (gone(attn, "head_dim"), "head_dim"),
    "self_attn.head_dim=4": (lambda m: setattr(attn(m), "head_dim", 4), "head_dim"),
    "first self_attn.head_dim": (gone(lambda m: layer(m, 0).self_attn, "head_dim"), "head_dim"),
    "self_attn.scaling": (gone(attn, "scaling"), "scaling"),
    "q_proj": (gone(attn, "q_proj"), "q_proj"),
    "k_proj": (gone(attn, "k_proj"), "k_proj"),
    "v_proj": (gone(attn, "v_proj"), "v_proj"),
    "o_proj": (gone(attn, "o_proj"), "o_proj"),
    "q_proj.out_features": (lambda m: setattr(attn(m), "q_proj", Opaque()), "q_proj"),
    "k_proj narrower": (lambda m: setattr(attn(m), "k_proj", torch.nn.Linear(32, 8)), "k_proj"),
    "q_norm in a llama": (lambda m: setattr(attn(m), "q_norm", Opaque()), "q_norm"),
    # a layer's norms and MLP
    "input_layernorm": (gone(layer, "input_layernorm"), "input_layernorm"),
    "input_layernorm.variance_epsilon": (gone(norm("input_layernorm"), "variance_epsilon"), "input_layernorm"),
    "input_layernorm.weight": (gone(norm("input_layernorm"), "weight"), "input_layernorm"),
    "post_attention_layernorm": (gone(layer, "post_attention_layernorm"), "post_attention_layernorm"),
    "post_attention_layernorm.variance_epsilon":
        (gone(norm("post_attention_layernorm"), "variance_epsilon"), "post_attention_layernorm"),
    "post_attention_layernorm.weight": (gone(norm("post_attention_layernorm"), "weight"), "post_attention_layernorm"),
    "mlp": (gone(layer, "mlp"), "mlp"),
    "mlp not a module": (lambda m: layer(m)._modules.__setitem__("mlp", lambda h: h), "mlp"),
    "gate_proj.out_features": (lambda m: setattr(layer(m).mlp, "gate_proj", Opaque()), "MLP"),
    # the rotary embedding
    "rope_type": (gone(rotary, "rope_type"), "rope_type"),
    "rope_type=longrope": (lambda m: setattr(rotary(m), "rope_type", "longrope"), "longrope"),
    "rope_type=proportional": (lambda m: setattr(rotary(m), "rope_type", "proportional"), "proportional"),
    "rope_type unknown": (lambda m: setattr(rotary(m), "rope_type", "my_rope"), "my_rope"),
    "inv_freq": (gone(rotary, "inv_freq"), "rotary_emb"),
    "partial rotary": (lambda m: setattr(rotary(m), "inv_freq", rotary(m).inv_freq[:2]), "rotary_emb"),
    # features of other architectures
    **{name: (set_config(name, value), name) for name, value in [
        ("pretraining_tp", 2), ("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0),
        ("logits_scaling", 2.0), ("logit_scale", 0.5), ("embedding_multiplier", 12.0),
        ("residual_multiplier", 0.2), ("attention_multiplier", 0.1)]},
}


@pytest.mark.parametrize("change", list(MISSING))
def test_a_model_missing_what_the_decoder_reads_is_not_supported(change):
    model = tiny("llama")
    assert llama.supports(model, LENGTH)
    apply, reason = MISSING[change]
    apply(model)
    assert not llama.supports(model, LENGTH)
    assert reason in llama.unsupported_reason(model, LENGTH)


@pytest.mark.parametrize("norm", ["q_norm", "k_norm"])
def test_qwen3_without_its_per_head_norms_is_not_supported(norm):
    model = tiny("qwen3")
    assert llama.supports(model, LENGTH)
    delattr(attn(model), norm)
    assert not llama.supports(model, LENGTH)


@pytest.mark.parametrize("family,extra", [
    ("llama", {}), ("llama", {"tie_word_embeddings": True}), ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("llama", {"head_dim": 16}), ("llama", {"num_key_value_heads": 4}), ("llama", {"hidden_act": "gelu"}),
    ("mistral", {}), ("mistral", {"sliding_window": LENGTH}), ("qwen2", {}), ("qwen3", {}),
    ("qwen3", {"attention_bias": True}),
    *[("llama", {"rope_parameters": params}) for params in ROPE_VARIANTS.values()],
    ("llama", {"rope_parameters": DYNAMIC, "max_position_embeddings": LENGTH + 1}),
])
def test_supported_models_stay_supported(family, extra):
    model = tiny(family, **copy.deepcopy(extra))
    assert llama.unsupported_reason(model, LENGTH) is None


def test_lora_layers_are_supported():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny("qwen2"), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj", "lm_head"]))
    assert llama.supports(base_model(model), LENGTH)


def test_lengths_the_model_cannot_reproduce_are_not_supported():
    windowed = tiny("qwen2", use_sliding_window=True, sliding_window=LENGTH - 1, max_window_layers=0)
    assert not llama.supports(windowed, LENGTH) and llama.supports(windowed, LENGTH - 1)
    dynamic = tiny("llama", rope_parameters=copy.deepcopy(DYNAMIC), max_position_embeddings=LENGTH)
    assert not llama.supports(dynamic, LENGTH) and llama.supports(dynamic, LENGTH - 1)
