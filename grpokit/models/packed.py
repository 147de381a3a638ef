"""The training forward without padding and with each group's prompt computed once (Llama-family models).

A GRPO batch is G completions per prompt, left-padded prompts and right-padded completions. The Hugging Face
forward computes every column of every row: the padding after each EOS, the left padding, and each prompt G
times. On a CPU (or a small GPU model) the linear layers cost nearly all the time and scale with those
columns. ``completion_hidden`` computes, per layer, the norms, projections and MLP over the *unique real tokens
only*, packed into one (T, H) tensor: each group's prompt once (rows with identical prompts share it), then
every real completion token. Only attention needs the padded (N, L) layout; there each row's keys and values
are gathered from the packed tensor (a non-leader row reads its leader's prompt) and the outputs of the real
positions are gathered back. The causal mask guarantees that a prompt token's states do not depend on the
completion after it, so sharing is exact; gradients of a shared prompt token add up over the rows that read
it, as the chain rule wants (``index_select``'s backward is a scatter-add).

Same model, same weights, same formula as ``grpokit.logprobs.hidden_states``: ``tests/models/test_packed.py`` checks
log-probs, entropies and every parameter's gradient against the Hugging Face forward (float64, 1e-10) for
every supported family, with LoRA, and under DDP (``CompletionLogps`` calls it inside DDP's forward). Models
it does not cover (other architectures, gradient checkpointing, attention dropout, FSDP-sharded layers, a
sliding window shorter than the batch) use the Hugging Face forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpokit.models import llama, mixed
from grpokit.models.llama import distinct_rows, position_ids_from_mask
from grpokit.models.loading import base_model


def supports(model: torch.nn.Module, total_length: int) -> bool:
    """Whether ``completion_hidden`` reproduces ``model``'s training forward for sequences of that length."""
    model = base_model(model)
    if not llama.supports(model, total_length):
        return False
    if any(getattr(m, "gradient_checkpointing", False) for m in (model.model, *model.model.layers)):
        # HF's recomputation needs its own layer calls
        return False
    if model.training and float(getattr(model.config, "attention_dropout", 0.0) or 0.0) > 0:
        return False
    from torch.distributed.fsdp import FSDPModule

    # FSDP2 gathers a layer's shards in hooks on the layer's own forward, which this path does not call
    return not any(isinstance(m, FSDPModule) for m in model.model.layers)


@dataclass
class Layout:
    """Where each token of an (N, L) padded batch lives in the packed (T, H) tensor.

    ``owned``: (T,) flat padded positions computed by the packed tensor (leaders' prompts, every real
    completion token), in row-major order. ``source``: (N * L,) packed index each padded position reads its
    keys and values from (left padding and a padded completion slot read index 0: masked out, never used).
    ``mask``: (N, 1, L, L) bool attention mask. ``positions``: (T,) rotary positions of the packed tokens.
    Each row's last completion token is neither computed nor attended to: nothing depends on it."""

    owned: torch.Tensor
    source: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor

    @classmethod
    def of(cls, prompt_ids, prompt_mask, completion_mask) -> Layout:
        N, P = prompt_ids.shape
        device = prompt_ids.device
        attention = torch.cat([prompt_mask, completion_mask], 1).bool()  # (N, L)
        L = attention.size(1)
        rows = torch.arange(N, device=device)
        first, group = distinct_rows(torch.cat([prompt_ids, prompt_mask], 1))  # as the sampler shares prompts
        leader = first[group]  # (N,) the first row with the same prompt
        # a row's last token feeds nothing: no later query sees it and it predicts no token. Leaving it out (of
        # the packed tokens, and of the keys) changes no output.
        columns = torch.arange(1, completion_mask.size(1) + 1, device=device)
        last = (completion_mask.bool() * columns).amax(-1) - 1  # (N,) column of the last real token, -1: none
        ends = rows[last >= 0]
        attention[ends, P + last[ends]] = False
        owned = attention.clone()
        owned[:, :P] &= (leader == rows)[:, None]
        owned = owned.view(-1).nonzero().squeeze(1)  # (T,)
        index = torch.zeros(N * L, dtype=torch.long, device=device)
        index[owned] = torch.arange(owned.numel(), device=device)
        index = index.view(N, L)
        index[:, :P] = index[leader, :P]  # prompt slots: the leader's tokens
        causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        # a padded query keeps its diagonal so that its softmax stays finite; its output is never read
        mask = (causal & attention[:, None, None, :]) | torch.eye(L, dtype=torch.bool, device=device)
        positions = position_ids_from_mask(attention).view(-1)[owned]  # as when sampling
        return cls(owned=owned, source=index.view(-1), mask=mask, positions=positions)


def completion_hidden(model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    """Last hidden states (M, H) that predict the M real completion tokens, in row-major order of
    ``completion_mask.bool()``: row i is the state before token ``completion_ids[completion_mask.bool()][i]``.

    The input of the LM head, as ``hidden_states(model, cat(prompt, completion))[:, P - 1:-1]`` at those
    positions, computed over the unique real tokens only (module docstring)."""
    hf = base_model(model)
    body, config = hf.model, hf.config
    N, P = prompt_ids.shape
    layout = Layout.of(prompt_ids, prompt_mask, completion_mask)
    L = P + completion_ids.size(1)
    ids = torch.cat([prompt_ids, completion_ids], 1).view(-1)[layout.owned]  # (T,)
    x = embed(body.embed_tokens, ids, hf.get_output_embeddings())  # (T, H)
    cos, sin = body.rotary_emb(x[None], layout.positions[None])  # (1, T, d) each
    cos, sin = cos[0, :, None], llama.signed_sin(sin[0, :, None])  # (T, 1, d): broadcast over heads
    num_heads, num_kv = config.num_attention_heads, config.num_key_value_heads
    mask = llama.attention_mask(layout.mask, x.dtype, L)
    workspace = mixed.Workspace()  # under autocast: the buffers the linear layers cast their weights into
    for layer in body.layers:
        a = layer.self_attn
        d = a.head_dim
        h = llama.rms_norm(layer.input_layernorm, x)
        q, k, v = project(h, (a.q_proj, a.k_proj, a.v_proj), workspace)
        q, k, v = q.view(-1, num_heads, d), k.view(-1, num_kv, d), v.view(-1, num_kv, d)  # (T, heads, d)
        if hasattr(a, "q_norm"):  # Qwen3 normalises q and k per head before rotary
            q, k = a.q_norm(q), a.k_norm(k)
        qk = torch.cat([q, k], 1)
        qk = llama.rotary(qk, cos, sin)  # as HF's apply_rotary_pos_emb
        qkv = torch.cat([qk, v], 1).index_select(0, layout.source)  # (N * L, heads + 2 kv, d)
        qkv = qkv.view(N, L, -1, d).transpose(1, 2)  # (N, heads + 2 kv, L, d)
        q, k, v = qkv.split([num_heads, num_kv, num_kv], dim=1)
        o = llama.attention(q, k, v, mask, a.scaling)  # (N, heads, L, d)
        o = o.transpose(1, 2).reshape(N * L, -1).index_select(0, layout.owned)  # (T, heads * d)
        x = x + project(o, (a.o_proj,), workspace)[0]
        x = x + mlp(layer.mlp, llama.rms_norm(layer.post_attention_layernorm, x), workspace)
    x = llama.rms_norm(body.norm, x)
    # the state at column P - 1 + t predicts completion token t (a prompt column: the leader's token)
    predictors = layout.source.view(N, L)[:, P - 1:L - 1][completion_mask.bool()]  # (M,)
    return x.index_select(0, predictors)


def sparse_lookup(embedding: torch.nn.Module, head: torch.nn.Module | None) -> bool:
    """Whether ``embed`` looks ``embedding`` up with a sparse gradient: a plain ``nn.Embedding`` being trained
    whose table is tied to the LM head ``head`` (which gives the table its dense gradient)."""
    weight = getattr(embedding, "weight", None)
    return (type(embedding) is torch.nn.Embedding and weight is getattr(head, "weight", None)
            and weight.requires_grad and embedding.max_norm is None)


def embed(embedding: torch.nn.Module, ids: torch.Tensor, head: torch.nn.Module | None) -> torch.Tensor:
    """``embedding(ids)``. When the table is tied to the LM head (``sparse_lookup``), the lookup's own gradient is
    sparse: its T rows are added into the head's gradient instead of a dense (V, H) table of zeros being filled,
    scattered into and then added whole."""
    if not sparse_lookup(embedding, head):
        return embedding(ids)
    return torch.nn.functional.embedding(ids, embedding.weight, embedding.padding_idx,
                                         scale_grad_by_freq=embedding.scale_grad_by_freq, sparse=True)


def project(h: torch.Tensor, linears, workspace: mixed.Workspace) -> list[torch.Tensor]:
    """``[m(h) for m in linears]``, as one matmul when they are all plain ``nn.Linear`` (the stacked weight is
    a differentiable ``cat`` of theirs; LoRA layers and other wrappers are called one by one). Under autocast,
    plain layers whose weights are in another dtype go through ``mixed.cast_linear`` (autocast's values,
    without its per-step copies of the weights)."""
    dtype = llama.autocast_dtype(h)
    if (dtype is not None and llama.stackable(linears) and linears[0].weight.is_floating_point()
            and linears[0].weight.dtype != dtype):
        out = mixed.cast_linear(h, linears, dtype, workspace)
        return list(out.split([m.out_features for m in linears], dim=-1))
    return llama.project(h, linears, llama.fused_weight(linears))


def mlp(module: torch.nn.Module, h: torch.Tensor, workspace: mixed.Workspace) -> torch.Tensor:
    """The Llama-family MLP ``down(act(gate(h)) * up(h))`` with gate and up as one matmul; others are called."""
    if not llama.is_gated_mlp(module):
        return module(h)
    gate, up = project(h, (module.gate_proj, module.up_proj), workspace)
    return project(module.act_fn(gate) * up, (module.down_proj,), workspace)[0]
