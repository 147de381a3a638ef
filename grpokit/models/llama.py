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


def supports(model: torch.nn.Module, total_length: int) -> bool:
    """Whether ``LlamaFamilyDecoder`` reproduces ``model`` for sequences of ``total_length`` tokens."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED:
        return False
    body = getattr(model, "model", None)
    if body is None or not all(hasattr(body, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", window is not None) and window is not None
    if uses_window and window < total_length:  # would need a sliding mask
        return False
    if getattr(config, "pretraining_tp", 1) != 1 or model.get_output_embeddings() is None:
        return False
    return all(hasattr(layer, "self_attn") and hasattr(layer, "mlp") for layer in body.layers)


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
    ``rotate_half(x) = (-x2, x1)``, written as ``x * cos + roll(x, half) * signed_sin(sin)``: two kernels
    fewer (no negation, no concatenation); on (1442, 8, 64) 0.22 ms against 0.29 ms (benchmarks/cpu_kernels.py)."""
    return torch.addcmul(x * cos, x.roll(x.size(-1) // 2, -1), sin_signed)


def stackable(linears) -> bool:
    """Whether ``linears`` are all plain ``nn.Linear`` layers (not a LoRA layer, not a quantised linear) that
    all have a bias or all have none: then ``fused_weight`` stacks them."""
    if not all(type(m) is torch.nn.Linear for m in linears):
        return False
    has_bias = [m.bias is not None for m in linears]
    return all(has_bias) or not any(has_bias)


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
"""Up to this many keys, attention on a CPU is three plain ops (scores, softmax, weighted sum): on 2 cores,
forward + backward at (64 rows, 4 heads, 36 keys, head size 64) took 5.1 ms against 7.1 ms for the fused
``scaled_dot_product_attention`` kernel, and 39.6 ms against 44.8 ms at 128 keys; at 200 keys the fused
kernel wins (95 ms against 139 ms; benchmarks/cpu_kernels.py). GPUs always take the fused kernel."""


def attention_mask(mask: torch.Tensor, dtype: torch.dtype, keys: int) -> torch.Tensor:
    """The mask ``attention`` wants: boolean for the fused kernel, an additive 0 / -inf float mask for the plain
    ops (built once per forward and shared by every layer)."""
    if mask.device.type != "cpu" or keys > SHORT_ATTENTION or dtype not in (torch.float32, torch.float64):
        return mask  # bf16 / fp16: the fused kernel accumulates the softmax in float32, plain ops would not
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q (B, h, n, d) and k, v (B, kv, L, d) (grouped-query when kv < h);
    ``mask`` from ``attention_mask``. Every query must see at least one key."""
    if mask.dtype == torch.bool:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.size(1) != k.size(1))
    if k.size(1) != q.size(1):
        k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
    scores = torch.matmul(q, k.transpose(-1, -2))  # (B, h, n, L)
    scores = (scores if scale == 1.0 else scores.mul_(scale)).add_(mask)  # 1.0: folded into q (PreparedLayer)
    return torch.matmul(scores.softmax(-1), v)
