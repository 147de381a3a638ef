"""Llama-family ops (Llama, Mistral, Qwen2, Qwen3), shared by the lean sampler and the padding-free forward.

Both ``grpokit.rollout.lean`` (sampling, with a KV cache) and ``grpokit.models.packed`` (the training
forward over real tokens only) compute a decoder layer from the model's own modules and weights. The
operations they share live here, once: which models qualify (``supports``), RMSNorm, rotary embeddings,
stacked projections, the gated MLP test and attention with a boolean mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 attention mask -> (B, T) positions counting only real tokens (0 on left padding)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def distinct_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For x (B, n): ``first`` (U,), the first row of each distinct row value, and ``index`` (B,), which gives
    x == x[first][index]."""
    _, inverse = torch.unique(x, dim=0, return_inverse=True)  # (B,) into the U sorted distinct rows
    rows = torch.arange(x.size(0), device=x.device)
    first = torch.full((int(inverse.max()) + 1,), x.size(0), device=x.device).scatter_reduce_(
        0, inverse, rows, reduce="amin")  # (U,)
    return first, inverse


STATIC_ROPE = ("default", "linear", "llama3", "yarn")
"""RoPE types whose cos/sin at a position are fixed once the module is built: one table serves every call. The
``dynamic`` type rescales its frequencies with the longest position of each call and keeps state across
calls (``dynamic_rope_update``), so a table built for a rollout, or one call over the packed tokens, would
not give the frequencies of the Hugging Face forward that scores the batch; it is accepted only for
lengths it leaves at the plain frequencies. ``longrope``, ``proportional`` and unknown types are refused."""

NONLINEAR_SCALING = ("attn_logit_softcapping", "final_logit_softcapping")
"""Config fields of other architectures (Gemma-2/3) that change attention or logits; not computed here."""

MULTIPLIERS = ("logit_scale", "logits_scaling", "embedding_multiplier", "residual_multiplier", "attention_multiplier")
"""Config fields of other architectures (Cohere, Granite) that scale embeddings, residuals, attention or
logits; only their neutral value 1 (or absence) is reproduced."""


def supports(model: torch.nn.Module, total_length: int) -> bool:
    """Whether ``LlamaFamilyDecoder`` and ``grpokit.models.packed`` reproduce ``model``'s forward for
    sequences of ``total_length`` tokens (``unsupported_reason`` says why not)."""
    return unsupported_reason(model, total_length) is None


def unsupported_reason(model: torch.nn.Module, total_length: int) -> str | None:
    """``None`` when the lean decoder and the padding-free forward can run ``model`` for sequences of
    ``total_length`` tokens, else what stops them.

    They read the model's modules and attributes directly (embeddings, every layer's norms, projections,
    head size, attention scale, MLP, the rotary module and the LM head), so each one must be there with the
    shape they assume, and nothing they do not compute may be switched on (another rope type, a sliding
    window shorter than the sequence, soft-capping, multipliers). Only attribute reads: it runs per rollout."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        return f"model_type {model_type!r} is not one of {', '.join(SUPPORTED)}"
    body = getattr(model, "model", None)
    if body is None:
        return "no model body (model.model)"
    missing = [a for a in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(body, a)]
    if missing:
        return f"the model body lacks {', '.join(missing)}"
    reason = _config_reason(config, total_length)
    if reason is None:
        reason = _body_reason(model, body, config, total_length)
    return reason


def _config_reason(config, total_length: int) -> str | None:
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp is not 1"
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", window is not None) and window is not None
    if uses_window and window < total_length:  # would need a sliding mask
        return f"a sliding window of {window} is shorter than {total_length} tokens"
    for name in NONLINEAR_SCALING:
        if getattr(config, name, None):
            return f"{name} is set"
    for name in MULTIPLIERS:
        if getattr(config, name, None) not in (None, 1):
            return f"{name} is not 1"
    heads, kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if not (isinstance(heads, int) and isinstance(kv, int) and 0 < kv <= heads and heads % kv == 0):
        return "num_attention_heads is not a multiple of num_key_value_heads"
    return None


def _body_reason(model, body, config, total_length: int) -> str | None:
    if not isinstance(getattr(body.embed_tokens, "weight", None), torch.Tensor):
        return "embed_tokens has no weight"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "out_features"):
        return "no linear output embeddings (LM head)"
    if not _is_rms_norm(body.norm):
        return "the final norm is not an RMSNorm with weight and variance_epsilon"
    layers = body.layers
    if len(layers) == 0 or getattr(config, "num_hidden_layers", None) != len(layers):
        return "num_hidden_layers differs from the number of layers"
    head_dim = getattr(getattr(layers[0], "self_attn", None), "head_dim", None)
    if not isinstance(head_dim, int):
        return "self_attn has no head_dim"
    reason = _rope_reason(body.rotary_emb, head_dim, total_length)
    if reason is not None:
        return reason
    qk_norm = config.model_type == "qwen3"  # per-head norms of q and k before rotary: Qwen3 only
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    widths = {"q_proj": heads * head_dim, "k_proj": kv * head_dim, "v_proj": kv * head_dim}
    for i, layer in enumerate(layers):
        reason = _layer_reason(layer, widths, head_dim, qk_norm)
        if reason is not None:
            return f"layer {i}: {reason}"
    return None


def _rope_reason(rotary_emb, head_dim: int, total_length: int) -> str | None:
    rope_type = getattr(rotary_emb, "rope_type", None)
    if rope_type == "dynamic":
        original = getattr(rotary_emb, "original_max_seq_len", None)
        # Hugging Face restores the plain frequencies only below the original length (strictly)
        if not isinstance(original, int) or total_length >= original:
            return f"dynamic RoPE rescales at {total_length} tokens (from {original})"
    elif not isinstance(rope_type, str) or rope_type not in STATIC_ROPE:
        return f"rope_type {rope_type!r} is not one of {', '.join(STATIC_ROPE)} (or dynamic)"
    inv_freq = getattr(rotary_emb, "inv_freq", None)
    if not callable(rotary_emb) or not isinstance(inv_freq, torch.Tensor) or 2 * inv_freq.numel() != head_dim:
        return "rotary_emb does not rotate the whole head"  # partial rotary, or no frequencies
    return None


def _layer_reason(layer, widths: dict[str, int], head_dim: int, qk_norm: bool) -> str | None:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        return "no self_attn or mlp"
    for name in ("input_layernorm", "post_attention_layernorm"):
        if not _is_rms_norm(getattr(layer, name, None)):
            return f"{name} is not an RMSNorm with weight and variance_epsilon"
    if getattr(attn, "head_dim", None) != head_dim:
        return "self_attn.head_dim differs from the first layer's"
    if not isinstance(getattr(attn, "scaling", None), (int, float)):
        return "self_attn has no scaling"
    for name, width in widths.items():
        if getattr(getattr(attn, name, None), "out_features", None) != width:
            return f"self_attn.{name} does not give {width} features"
    if not hasattr(getattr(attn, "o_proj", None), "out_features"):
        return "self_attn has no o_proj"
    if any(hasattr(attn, n) != qk_norm for n in ("q_norm", "k_norm")):
        return "q_norm / k_norm present in a model that does not apply them, or missing from Qwen3"
    if is_gated_mlp(mlp):
        if not (callable(mlp.act_fn) and all(hasattr(getattr(mlp, p), "out_features")
                                             for p in ("gate_proj", "up_proj", "down_proj"))):
            return "the gated MLP's projections are not linear layers"
    elif not isinstance(mlp, torch.nn.Module):
        return "mlp is not a module"
    return None


def _is_rms_norm(norm) -> bool:
    """Has what ``rms_norm`` reads (weight, variance_epsilon) and can be called, as the other dtypes do."""
    return (isinstance(norm, torch.nn.Module) and isinstance(getattr(norm, "weight", None), torch.Tensor)
            and isinstance(getattr(norm, "variance_epsilon", None), (int, float)))


def rms_norm(norm: torch.nn.Module, x: torch.Tensor, folded: bool = False) -> torch.Tensor:
    """The model's RMSNorm as one fused op for float32 (same formula: x / sqrt(mean(x^2) + eps) * weight);
    other dtypes keep the module, whose float32 round trip a fused op would not reproduce. ``folded``: the
    weight is already in the next projection's weight (``foldable``), so it is left out here."""
    if x.dtype != torch.float32 or norm.weight.dtype != torch.float32:
        return norm(x)
    return F.rms_norm(x, x.shape[-1:], None if folded else norm.weight, norm.variance_epsilon)


def foldable(norm: torch.nn.Module, linears) -> bool:
    """Whether ``norm``'s weight can move into the stacked weight of ``linears``, which read its output (a
    float32 RMSNorm, plain float32 linears): ``rms_norm(norm, x) @ W.T`` is then
    ``rms_norm(norm, x, folded=True) @ (W * norm.weight).T`` up to float32 rounding."""
    weight = getattr(norm, "weight", None)
    return (stackable(linears) and isinstance(weight, torch.Tensor) and weight.dtype == torch.float32
            and all(m.weight.dtype == torch.float32 for m in linears) and hasattr(norm, "variance_epsilon"))


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """The rotary sines with the first half of the last dimension negated, as ``rotary`` takes them."""
    half = sin.size(-1) // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """HF's ``apply_rotary_pos_emb`` for one tensor, ``x * cos + rotate_half(x) * sin`` with
    ``rotate_half(x) = (-x2, x1)``, written as ``x * cos + roll(x, half) * signed_sin(sin)``: the negation and
    concatenation of ``rotate_half`` are paid once per table instead of per call, which leaves two kernels
    fewer per rotation (figures: the rotary row of benchmarks/results/cpu_kernels.md)."""
    return torch.addcmul(x * cos, x.roll(x.size(-1) // 2, -1), sin_signed)


def stackable(linears) -> bool:
    """Whether ``linears`` are all plain ``nn.Linear`` layers (not a LoRA layer, not a quantised linear) that
    all have a bias or all have none: then ``fused_weight`` stacks them."""
    if not all(type(m) is torch.nn.Linear for m in linears):
        return False
    has_bias = [m.bias is not None for m in linears]
    return all(has_bias) or not any(has_bias)


def autocast_dtype(tensor: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` computes in on ``tensor``'s device, or ``None`` outside autocast."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def fused_weight(linears) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight, bias)`` of several plain ``nn.Linear`` layers stacked as one, or ``None`` unless
    ``stackable(linears)``."""
    if not stackable(linears):
        return None
    bias = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
    return torch.cat([m.weight for m in linears]), bias


def project(h: torch.Tensor, linears, fused=None) -> list[torch.Tensor]:
    """``[m(h) for m in linears]``; one matmul when ``fused`` (``fused_weight(linears)``) is given."""
    if fused is None:
        return [m(h) for m in linears]
    return list(F.linear(h, *fused).split([m.out_features for m in linears], dim=-1))


def is_gated_mlp(module: torch.nn.Module) -> bool:
    """Whether ``module`` is the Llama-family MLP ``down_proj(act_fn(gate_proj(h)) * up_proj(h))``."""
    return all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj", "act_fn"))


SHORT_ATTENTION = 128
"""Up to this many keys, attention on a CPU is three plain ops (scores, softmax, weighted sum): for the short
sequences of small-model GRPO the fused ``scaled_dot_product_attention`` kernel's fixed cost, forward and
backward, outweighs what it saves, while from a few hundred keys on it is the faster one (the attention
rows of benchmarks/results/cpu_kernels.md, from benchmarks/cpu_kernels.py). GPUs always take the fused kernel."""


def attention_mask(mask: torch.Tensor, dtype: torch.dtype, keys: int) -> torch.Tensor:
    """The mask ``attention`` wants: boolean for the fused kernel, an additive 0 / -inf float mask for the plain
    ops (built once per forward and shared by every layer), in float64 for float64 and float32 otherwise: the
    plain ops then compute the scores and softmax of bf16 / fp16 inputs in float32, as the fused kernel does."""
    if mask.device.type != "cpu" or keys > SHORT_ATTENTION:
        return mask
    dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q (B, h, n, d) and k, v (B, kv, L, d) (grouped-query when kv < h);
    ``mask`` from ``attention_mask``. Every query must see at least one key."""
    if mask.dtype == torch.bool:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.size(1) != k.size(1))
    if q.dtype != mask.dtype:  # bf16 / fp16 inputs (autocast or the sampler's compute dtype): float32 inside
        with torch.autocast(q.device.type, enabled=False):
            return attention(q.to(mask.dtype), k.to(mask.dtype), v.to(mask.dtype), mask, scale).to(q.dtype)
    B, h, n, d = q.shape
    kv = k.size(1)
    # grouped-query: the h // kv query heads of each key/value head are rows of one matmul, so that keys and
    # values are never repeated per query head
    scores = torch.matmul(q.reshape(B, kv, h // kv * n, d), k.transpose(-1, -2))  # (B, kv, h // kv * n, L)
    if scale != 1.0:  # 1.0: folded into q (PreparedLayer)
        scores.mul_(scale)
    scores = scores.view(B, kv, h // kv, n, -1).add_(mask[:, :, None]).view(B, kv, h // kv * n, -1)
    return torch.matmul(scores.softmax(-1), v).view(B, h, n, d)
