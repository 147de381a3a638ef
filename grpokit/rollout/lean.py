"""A lean decoder for Llama-family models (Llama, Mistral, Qwen2, Qwen3) during sampling.

Sampling calls the model once per token. For the small models GRPO is often taught and tested on, the
Python machinery around each Hugging Face forward (cache objects, mask builders, output records, decorators)
costs more than the arithmetic. ``LlamaFamilyDecoder`` runs the same computation from the model's own modules
and weights — its norms, MLPs, rotary embedding and projections — with a pre-allocated KV cache, one
attention mask, and nothing else. Per rollout, q/k/v and gate/up are stacked into one weight each and, on a
CPU in float32, reordered for oneDNN (``Stacked``); rows that have finished leave the batch (``keep``). It is
used only under ``torch.inference_mode`` for sampling; every log-prob that enters the loss comes from the
training forward (``grpokit.models.packed`` or the Hugging Face model), so a difference in the last float bit
changes which token is drawn, never what the loss scores.

``tests/rollout/test_lean.py`` checks its logits against the Hugging Face forward for every supported family,
with left padding, to 1e-5 in float32, in bfloat16 (to bfloat16 rounding), and for the scaled RoPE types.
``grpokit.models.llama.supports`` decides which models it runs (every module and attribute it reads must be
there, and nothing it does not compute switched on); any other model falls back to the generic cache loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from grpokit.models.llama import (
    attention,
    attention_mask,
    distinct_rows,
    foldable,
    is_gated_mlp,
    rms_norm,
    rotary,
    signed_sin,
    stackable,
    supports,
    unsupported_reason,
)
from grpokit.models.loading import base_model
from grpokit.rollout.decode import local_rollout
from grpokit.rollout.engine import Rollout, SamplingParams
from grpokit.rollout.hf import start_hf


class LlamaFamilyDecoder:
    """Prefill a left-padded batch of prompts, then decode one token per call, reusing a static KV cache.

    Shapes: B rows, P prompt columns, L = P + max_new_tokens cache slots, H hidden, h heads of size d.
    """

    def __init__(self, model: torch.nn.Module, prompt_mask: torch.Tensor, max_new_tokens: int,
                 compute_dtype: torch.dtype | None = None):
        """``compute_dtype`` (bf16 mixed precision): the projections, attention and KV cache run in it, from a
        per-rollout copy of the weights in that dtype; the residual stream and the norms stay in the model's
        dtype (float32 master weights), as under autocast. ``None``: everything in the model's dtype."""
        body = model.model
        self.model, self.body = model, body
        self.head = model.get_output_embeddings()
        B, P = prompt_mask.shape
        self.P = P
        attn = body.layers[0].self_attn
        self.head_dim = attn.head_dim
        num_kv = model.config.num_key_value_heads
        L = P + max_new_tokens
        dtype = compute_dtype or body.embed_tokens.weight.dtype  # of the projections, attention and cache
        self.compute_dtype = dtype
        device = prompt_mask.device
        # every layer's keys and values in one tensor (layers, 2, B, kv, L, d): ``keep`` copies it in one op
        self.cache = torch.zeros(len(body.layers), 2, B, num_kv, L, self.head_dim, dtype=dtype, device=device)
        self.filled = 0  # cache slots written so far
        # key_ok[b, j]: slot j of row b holds a real token (prompt tokens, then every generated slot)
        self.key_ok = torch.cat([prompt_mask.bool(), prompt_mask.new_ones(B, max_new_tokens, dtype=torch.bool)], 1)
        self.positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P), as the training forward uses
        self.next_position = prompt_mask.sum(-1, keepdim=True)  # (B, 1)
        # the head first: its copy passes through a plain and a reordered form at once (see Stacked), the
        # largest transient of the sampler, better taken before the layers' copies exist
        self.fold_final = foldable(body.norm, (self.head,))
        self.head_prepared = Stacked((self.head,), B, in_scale=body.norm.weight if self.fold_final else None,
                                     dtype=dtype)
        # per layer, the projections prepared once per rollout (q/k/v stacked, gate/up stacked; see Stacked)
        self.prepared = [PreparedLayer(layer, B, dtype) for layer in body.layers]
        # rotary cos/sin of every position this rollout can reach, computed once by the model's own rotary
        # module. Valid because ``supports`` admits only RoPE whose cos/sin do not depend on the sequence
        # length (``STATIC_ROPE``, or ``dynamic`` below its original length, where it is plain RoPE); a per-call
        # ``rotary_emb`` for ``dynamic`` beyond it would rotate each cached key with the frequencies of its own
        # step, not those of the forward that later scores the whole sequence.
        every = torch.arange(L, device=device)[None]  # (1, L)
        cos, sin = body.rotary_emb(body.embed_tokens.weight[:1, None], every)  # 2 x (1, L, d)
        self.rope_table = cos[0].to(dtype), signed_sin(sin[0]).to(dtype)  # (L, d) each

    def _rope(self, position_ids: torch.Tensor):
        cos, sin = self.rope_table
        return cos[position_ids], sin[position_ids]  # (B, n, d) each

    def _layers(self, x: torch.Tensor, position_ids: torch.Tensor, start: int, mask: torch.Tensor) -> torch.Tensor:
        """x (B, n, H) at cache slots [start, start + n) -> last hidden states (B, n, H), final norm applied.
        ``mask``: (B, 1, n, start + n) bool, True where a query may see a key."""
        B, n, _ = x.shape
        mask = attention_mask(mask, self.compute_dtype, start + n)
        end = start + n
        cos, sin = self._rope(position_ids)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, n, d): broadcast over heads
        d = self.head_dim
        for i, p in enumerate(self.prepared):
            h = rms_norm(p.input_norm, x, p.fold_input_norm)
            heads, kv = p.heads, p.kv_heads
            if p.qk_norm is None and p.qkv.stacked:  # q, k, v: views of one output; rotary on q, k
                qkv = p.qkv.whole(h).view(B, n, heads + 2 * kv, d).transpose(1, 2)  # (B, h + 2 kv, n, d)
                qk, v = rotary(qkv[:, :heads + kv], cos, sin), qkv[:, heads + kv:]
            else:  # projections called one by one (LoRA), or Qwen3's per-head norms of q and k before rotary
                q, k, v = (t.view(B, n, -1, d).to(self.compute_dtype) for t in p.qkv(h))  # (B, n, heads, d)
                if p.qk_norm is not None:
                    q, k = p.qk_norm[0](q).to(self.compute_dtype), p.qk_norm[1](k).to(self.compute_dtype)
                qk, v = rotary(torch.cat([q, k], 2).transpose(1, 2), cos, sin), v.transpose(1, 2)
            q, k = qk.split([heads, kv], dim=1)
            keys, values = self.cache[i]  # (B, kv, L, d) each
            keys[:, :, start:end] = k
            values[:, :, start:end] = v
            o = attention(q, keys[:, :, :end], values[:, :, :end], mask, p.scaling)  # (B, h, n, d)
            x = p.o.add(o.transpose(1, 2).reshape(B, n, -1), x)  # x + o_proj(o)
            h = rms_norm(p.post_norm, x, p.fold_post_norm)
            if p.gate_up is not None:  # the Llama-family MLP down(act(gate(h)) * up(h)), gate and up in one matmul
                gate, up = p.gate_up(h)
                x = p.down.add(p.act_fn(gate) * up, x)
            else:
                x = x + p.mlp(h)  # a non-gated MLP module: in the model's dtype
        self.filled = end
        return rms_norm(self.body.norm, x, self.fold_final)

    def select(self, index: torch.Tensor) -> None:
        """The batch becomes its rows ``index`` (b,) long, in that order: a row may be dropped or repeated."""
        # from a quarter of the slots written on, one contiguous gather of every slot (written or not) replaces a
        # strided copy of the written ones, which costs more per byte (the cache row of
        # benchmarks/results/cpu_kernels.md compares the two)
        if 4 * self.filled >= self.cache.size(-2):
            self.cache = self.cache.index_select(2, index)
        else:  # right after the prefill: gather only the slots written so far
            cache = self.cache.new_empty(self.cache.shape[:2] + (index.numel(),) + self.cache.shape[3:])
            cache[..., :self.filled, :] = self.cache[..., :self.filled, :].index_select(2, index)
            self.cache = cache
        self.key_ok = self.key_ok[index]
        self.next_position = self.next_position[index]

    def keep(self, rows: torch.Tensor) -> None:
        """Drop the rows not in ``rows`` (b,) bool from the batch: rows that have finished stop costing."""
        self.select(rows.nonzero().squeeze(1))

    def prefill(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Runs the prompts; returns the logits (B, V) of the first completion token."""
        P = self.P
        causal = torch.ones(P, P, dtype=torch.bool, device=prompt_ids.device).tril()
        # (B, 1, P, P): causal and only real keys; the diagonal keeps left-pad rows finite (they are never read)
        mask = (causal & self.key_ok[:, None, None, :P]) | torch.eye(P, dtype=torch.bool, device=causal.device)
        x = self.body.embed_tokens(prompt_ids)  # (B, P, H)
        hidden = self._layers(x, self.positions, 0, mask)
        return self.head_prepared(hidden[:, -1])[0]

    def step(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """Feeds completion token ``t`` (B,) (0-based); returns the logits (B, V) of token t + 1."""
        slot = self.P + t
        x = self.body.embed_tokens(tokens[:, None])  # (B, 1, H)
        mask = self.key_ok[:, None, None, : slot + 1]  # (B, 1, 1, slot + 1)
        hidden = self._layers(x, self.next_position + t, slot, mask)
        return self.head_prepared(hidden[:, -1])[0]


ONEDNN_MIN_WEIGHT = 256 * 256
"""Smaller weights keep ``F.linear``: on them oneDNN's per-call overhead outweighs what its blocked layout saves
(the rollout rows of benchmarks/results/cpu_kernels.md compare this threshold with oneDNN for every weight and
for none)."""


class Stacked:
    """Plain ``nn.Linear`` layers that read the same input, prepared once per rollout as one matmul: weights
    stacked (q/k/v, gate/up), so that a decode step runs one matmul where it would run two or three, and on a
    CPU in float32 or bfloat16 reordered once into oneDNN's blocked layout (then the only copy kept), which
    oneDNN multiplies faster than ``F.linear`` multiplies the plain weight when the weight is large enough
    (``ONEDNN_MIN_WEIGHT``; figures in benchmarks/results/cpu_kernels.md). Other modules (LoRA layers,
    quantised linears) are called one by one. ``__call__(h)`` -> one output per layer."""

    def __init__(self, linears, batch_size: int, in_scale: torch.Tensor | None = None,
                 out_scale: torch.Tensor | None = None, dtype: torch.dtype | None = None):
        """``in_scale`` (in,) multiplies the stacked weight's columns, ``out_scale`` (out,) its rows and bias
        (a folded norm weight, a folded attention scale); they need a stacked weight (``stackable``).
        ``dtype``: the stacked weight is cast to it after scaling (bf16 mixed precision), and inputs with it."""
        self.linears, self.sizes = linears, [m.out_features for m in linears]
        self.weight = self.bias = self.onednn = self.dtype = None  # ``dtype``: of the stacked weight
        if not stackable(linears):
            assert in_scale is None and out_scale is None, "only a stacked weight takes folded scales"
            return
        weight, self.bias = stacked_weight(linears, in_scale, out_scale, dtype)
        self.dtype = weight.dtype
        # float32, or bfloat16 under mixed precision (oneDNN's bf16 kernels also beat F.linear's on CPU); the
        # reordered weight replaces the plain one, so the sampler holds one copy of each projection
        cpu_onednn_dtype = weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
        if cpu_onednn_dtype and weight.numel() >= ONEDNN_MIN_WEIGHT and torch.backends.mkldnn.is_available():
            try:
                self.onednn = torch.ops.mkldnn._reorder_linear_weight(weight, batch_size)
            except (AttributeError, RuntimeError):  # a torch build without these oneDNN ops
                self.onednn = None
        if self.onednn is None:
            self.weight = weight

    @property
    def stacked(self) -> bool:
        """One matmul: ``weight`` (or, once reordered, ``onednn``) in ``dtype``."""
        return self.dtype is not None

    def __call__(self, h: torch.Tensor) -> list[torch.Tensor]:
        if not self.stacked:  # modules called as they are, in their own dtype
            return [m(h) for m in self.linears]
        return list(self.whole(h).split(self.sizes, dim=-1))

    def whole(self, h: torch.Tensor) -> torch.Tensor:
        """The stacked output, not split (a stacked weight only)."""
        if self.onednn is None:
            return F.linear(h.to(self.dtype), self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(h.to(self.dtype), self.onednn, self.bias, "none", [], "")

    def add(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + self(h)[0]`` for one layer; with oneDNN weights the addition is fused into the matmul."""
        if self.onednn is None or residual.dtype != self.dtype:  # mixed precision: add in the residual's dtype
            out = self.whole(h) if self.stacked else self(h)[0]
            return residual + out.to(residual.dtype)
        return torch.ops.mkldnn._linear_pointwise.binary(h, residual, self.onednn, self.bias, "add")


STACK_BLOCK_ROWS = 4096
"""``stacked_weight`` scales and casts this many rows at a time."""


def stacked_weight(linears, in_scale: torch.Tensor | None, out_scale: torch.Tensor | None,
                   dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight, bias)`` of ``linears`` stacked (``stackable``), the weight's columns times ``in_scale`` and its
    rows (and the bias) times ``out_scale``, in the weights' dtype, then cast to ``dtype``. Written block by
    block into the result: a bf16 copy of a large projection (the LM head) passes through no full-size float32
    one. The same values as scaling a float32 ``torch.cat`` in place and casting it."""
    source = linears[0].weight
    dtype = dtype or source.dtype
    weight = torch.empty(sum(m.out_features for m in linears), source.size(1), dtype=dtype, device=source.device)
    start = 0
    for m in linears:
        for r in range(0, m.out_features, STACK_BLOCK_ROWS):
            block = m.weight[r:r + STACK_BLOCK_ROWS]
            rows = slice(start + r, start + r + block.size(0))
            if in_scale is not None or out_scale is not None:
                block = block.mul(in_scale) if in_scale is not None else block.clone()
                if out_scale is not None:
                    block.mul_(out_scale[rows, None])
            weight[rows].copy_(block)  # round to nearest, as .to(dtype)
        start += m.out_features
    bias = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
    if bias is not None and out_scale is not None:
        bias.mul_(out_scale)
    return weight, None if bias is None else bias.to(dtype)


class PreparedLayer:
    """A decoder layer as the sampler runs it, built once per rollout: its projections ``Stacked`` (``qkv``,
    ``o``, and for the Llama-family MLP ``gate_up`` and ``down``), with the weights of the two RMSNorms folded
    into the stacked weights they feed and the attention scale folded into q's rows unless a per-head norm
    follows q (Qwen3); the same logits up to float32 rounding, with fewer elementwise kernels per token
    (``tests/rollout/test_lean.py`` checks them against the Hugging Face forward)."""

    def __init__(self, layer: torch.nn.Module, batch_size: int, dtype: torch.dtype | None = None):
        a, mlp = layer.self_attn, layer.mlp
        self.input_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.heads, self.kv_heads = a.q_proj.out_features // a.head_dim, a.k_proj.out_features // a.head_dim
        self.qk_norm = (a.q_norm, a.k_norm) if hasattr(a, "q_norm") else None
        qkv = (a.q_proj, a.k_proj, a.v_proj)
        self.fold_input_norm = foldable(self.input_norm, qkv)
        self.scaling, in_scale, out_scale = a.scaling, None, None
        if self.fold_input_norm:  # q's rows carry the attention scale too, unless a per-head norm follows them
            in_scale = self.input_norm.weight
            if self.qk_norm is None:
                w = a.q_proj.weight
                out_scale = torch.ones(sum(m.out_features for m in qkv), dtype=w.dtype, device=w.device)
                out_scale[:a.q_proj.out_features] = a.scaling
                self.scaling = 1.0
        self.qkv = Stacked(qkv, batch_size, in_scale=in_scale, out_scale=out_scale, dtype=dtype)
        self.o = Stacked((a.o_proj,), batch_size, dtype=dtype)
        self.mlp, self.act_fn = mlp, getattr(mlp, "act_fn", None)
        self.gate_up = self.down = None
        self.fold_post_norm = False
        if is_gated_mlp(mlp):
            gate_up = (mlp.gate_proj, mlp.up_proj)
            self.fold_post_norm = foldable(self.post_norm, gate_up)
            self.gate_up = Stacked(gate_up, batch_size, in_scale=self.post_norm.weight if self.fold_post_norm else None,
                                   dtype=dtype)
            self.down = Stacked((mlp.down_proj,), batch_size, dtype=dtype)


def start_lean(model: torch.nn.Module, compute_dtype: torch.dtype | None = None):
    """The ``Start`` of ``LlamaFamilyDecoder``: a group's G rows share one prompt, so each distinct prompt is
    run once, then its cache and logits repeated."""

    def start(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int):
        first, index = distinct_rows(torch.cat([prompt_ids, prompt_mask], 1))  # (U,), (B,)
        decoder = LlamaFamilyDecoder(model, prompt_mask[first], max_new_tokens, compute_dtype)
        logits = decoder.prefill(prompt_ids[first])  # (U, V)
        if not torch.equal(index, torch.arange(index.numel(), device=index.device)):  # shared, or in another
            decoder.select(index)  # order: distinct rows come sorted (multi-turn prompts are all distinct)
            logits = logits[index]
        return logits, decoder.step, decoder.keep

    return start


class LeanEngine:
    """``rollout_engine: lean`` (and ``auto`` for Llama-family models): ``LlamaFamilyDecoder`` over the
    training weights, in place. ``fallback``: a model or length it does not support is sampled by the
    generic Hugging Face loop instead (``auto``); otherwise that is an error. ``compute_dtype``: bf16 mixed
    precision (``LlamaFamilyDecoder``; the generic loop runs under autocast)."""

    name = "lean"

    def __init__(self, model: torch.nn.Module, tokenizer, *, fallback: bool = False,
                 compute_dtype: torch.dtype | None = None):
        self.model, self.tokenizer, self.fallback = model, tokenizer, fallback
        self.compute_dtype = compute_dtype

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Rollout:
        model = base_model(self.model)  # a peft model samples through the model it wraps, LoRA layers included
        length = max(len(p) for p in prompts) + params.max_new_tokens
        if supports(model, length):
            start = start_lean(model, self.compute_dtype)
        elif self.fallback:
            start = start_hf(model, self.compute_dtype)
        else:
            raise ValueError(f"rollout_engine 'lean' supports Llama-family models (llama, mistral, qwen2, qwen3) "
                             f"whose forward it reproduces; {type(model).__name__} is not one "
                             f"({unsupported_reason(model, length)}): use rollout_engine 'auto' or 'hf'")
        return local_rollout(model, self.tokenizer, prompts, params, start)

    def sync_weights(self, model: torch.nn.Module) -> float:
        return 0.0  # the training weights, read in place

    def close(self) -> None:
        pass
