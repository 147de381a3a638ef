"""Per-token log-probabilities and entropies of an LM head without ever materialising B x T x V logits.

A GRPO step needs ``log pi(o_t | ...)`` of the sampled tokens (and logs the policy entropy). The usual
``log_softmax(model(...).logits)`` builds (B, T, V) logits plus as many (B, T, V) temporaries for softmax,
entropy and their gradients: at B*T = 4096 and Qwen2's V = 151,936 that is 2.5 GB per fp32 copy and 9-12 GB
in all (benchmarks/results/logprobs_memory.md). ``token_logprobs`` takes the decoder's last hidden states
and the LM head instead, and walks over the flattened B*T rows ``chunk_size`` at a time inside one
``torch.autograd.Function``:

* forward keeps, per row, only the log-sum-exp ``lse`` (and the entropy when asked for): O(B*T) floats;
* backward recomputes each chunk's logits from (hidden, weight, bias), forms dlogits in the chunk's buffer
  in place and accumulates grad_hidden, grad_weight (fp32) and grad_bias.

So the transient memory is one (chunk_size, V) logits buffer and a (<= 64 MiB) exp scratch, plus the (V, H)
fp32 weight-gradient accumulator in backward (0.8 GiB in all at the size above, against 9-12 GiB), at the
price of one extra (B*T, H) x (H, V) matmul (the recomputation). With ``late_weight_grad`` the weight
gradient is formed at the end of the whole model's backward instead, from the rows' dlogits kept until then
(``LateWeightGrad``), so that it never sits beside the body's activations.

Notation per row, with tau the temperature: ``z = (h @ W.T + b) / tau``, ``p = softmax(z)``, ``logp = z - lse``,
``H = -sum_v p_v logp_v``. The two gradients used (``1_t`` is the one-hot of the target)::

    d logp_t / dz = 1_t - p
    d H / dz      = -p * (logp + H)       (dH/dz_k = -sum_j (logp_j + 1) p_j (d_jk - p_k))

``hidden_states`` and ``lm_head_of`` split a Hugging Face causal LM into body and head so that a trainer can
call ``token_logprobs(hidden_states(model, ids, mask)[:, :-1], *lm_head_of(model), ids[:, 1:])``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_BYTES = 64 * 2**20
"""Default size of one chunk of logits in the compute dtype (fp32, or fp64 for fp64 inputs); the transient
peak adds a <= 64 MiB scratch, and a half-size copy for bf16/fp16 inputs. 64 MiB is 104 rows at
V = 151,936: still enough rows that every matmul is compute-bound (each chunk re-reads the whole (V, H)
weight), and small enough that the head's buffers, which exist while every activation of the body does,
add little to the peak of a training step."""


def default_chunk_size(vocab_size: int, dtype: torch.dtype = torch.float32) -> int:
    """Rows per chunk so that one (rows, V) buffer of ``dtype`` stays within ``DEFAULT_CHUNK_BYTES``."""
    row_bytes = vocab_size * torch.empty((), dtype=dtype).element_size()
    rows = max(1, DEFAULT_CHUNK_BYTES // row_bytes)
    return rows - rows % 8 if rows >= 16 else rows  # a multiple of 8 keeps GEMM tiles whole


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    return_entropy: bool = False,
    compute_dtype: torch.dtype | None = None,
    late_weight_grad: LateWeightGrad | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities (and entropies) of ``softmax((hidden @ weight.T + bias) / temperature)``, chunked.

    Equal in value and gradient to ``materialized_token_logprobs`` (the (B, T, V) computation) while holding
    at most ``chunk_size`` rows of logits at a time; see the module docstring.

    Args:
        hidden: (B, T, H) (any leading shape) last hidden states, fp32/bf16/fp16/fp64.
        weight: (V, H) LM head, same dtype as ``hidden``.
        targets: (B, T) integer token ids in [0, V): position t is scored under row t of ``hidden``.
        temperature: logits are divided by it (sampling temperature), > 0.
        bias: (V,) LM-head bias or ``None``.
        chunk_size: rows of B*T processed at once; ``None``: ``default_chunk_size(V)`` (~64 MiB of fp32).
        return_entropy: also return the entropy of each row's distribution.
        compute_dtype: the dtype of ``hidden`` and of the head's matmuls when narrower than the weight's (bf16
            mixed precision: a float32 master weight, cast here). Value and gradients equal those of
            ``weight.to(compute_dtype)`` passed in (the weight's gradient rounded to it), without a full-size
            gradient in that dtype and its float32 copy beside the float32 one.
        late_weight_grad: ``weight`` as ``late_weight_grad(weight)`` returned it, taken before the model body
            ran: the weight's gradient is then formed at the end of the backward, once the body's activations
            are freed, instead of at its start (``LateWeightGrad``).

    Returns:
        logps (B, T), or ``(logps, entropy)`` with entropy (B, T); fp32 (fp64 for fp64 inputs) whatever the
        input dtype. Both are differentiable wrt hidden, weight and bias.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be targets {tuple(targets.shape)} + (H,)")
    if weight.dim() != 2 or weight.size(1) != hidden.size(-1):
        raise ValueError(f"weight must be (V, H={hidden.size(-1)}), got {tuple(weight.shape)}")
    if bias is not None and bias.dtype != weight.dtype:
        raise ValueError(f"weight and bias must share a dtype, got {weight.dtype}, {bias.dtype}")
    compute = compute_dtype or weight.dtype
    if hidden.dtype != compute:
        raise ValueError(f"hidden must be in the compute dtype {compute}, got {hidden.dtype}"
                         + ("" if compute_dtype else " (the weight's; or pass compute_dtype)"))
    if bias is not None and bias.shape != (weight.size(0),):
        raise ValueError(f"bias must be ({weight.size(0)},), got {tuple(bias.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.size(0), _compute_dtype(compute))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    h2 = hidden.reshape(-1, hidden.size(-1))  # (N, H), a view when hidden is contiguous
    t1 = targets.reshape(-1).long()  # (N,)
    out = _ChunkedLogprobs.apply(h2, weight, bias, t1, float(temperature), int(chunk_size), return_entropy,
                                 compute, late_weight_grad)
    if return_entropy:
        return out[0].view(targets.shape), out[1].view(targets.shape)
    return out.view(targets.shape)


def materialized_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The reference ``token_logprobs`` is checked against: (B, T, V) logits, log_softmax, gather.

    Logits are formed in the input dtype (as an ``nn.Linear`` head does) and upcast before the softmax.
    Memory: several (B, T, V) fp32 tensors; use it for tests and benchmarks only."""
    logits = F.linear(hidden, weight, bias).to(_compute_dtype(weight.dtype))  # (B, T, V)
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logps = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)  # (B, T)
    if not return_entropy:
        return logps
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # (B, T)
    return logps, entropy


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Softmax statistics in fp32 at least: bf16/fp16 logits are upcast, fp64 stays fp64.
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(h, weight, bias, out, low_buf):
    """Logits ``h @ W.T + b`` of one chunk, written into ``out`` (n, V) of the compute dtype.

    They are rounded to the input dtype first when it is narrower (``low_buf``), exactly as the materialised
    ``nn.Linear`` head produces them, so both paths see the same logits."""
    dst = out if low_buf is None else low_buf
    if bias is None:
        torch.mm(h, weight.t(), out=dst)
    else:
        torch.addmm(bias, h, weight.t(), out=dst)  # what F.linear does
    if low_buf is not None:
        out.copy_(low_buf)
    return out


# The elementwise passes over a chunk go by row blocks of at most this size, so that exp(z), needed next to z
# for the entropy and its gradient, takes a (block, V) scratch instead of a second (chunk, V) buffer. Not
# smaller: every pass over a block is one thread-pool sync on CPU (one launch on GPU), and cache-sized blocks
# (a few MiB), though faster on an idle CPU, were several times slower once another process held a core.
_BLOCK_BYTES = 64 * 2**20
_ROUND_BLOCK_ROWS = 8192  # rows of a head gradient rounded at a time (``_rounded``)


def _block_rows(vocab: int, dtype: torch.dtype) -> int:
    return max(1, _BLOCK_BYTES // (vocab * torch.empty((), dtype=dtype).element_size()))


def _head(buf: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if buf is None else buf[:n]


class _ChunkedLogprobs(torch.autograd.Function):
    """Memory per call: one (chunk, V) logits buffer, a (block, V) scratch, a (chunk, V) input-dtype copy for
    bf16/fp16 inputs, and in backward the (V, H) compute-dtype weight-gradient accumulator. A float32 master
    weight used in a narrower compute dtype is cast in the forward and again in the backward, not kept between
    them; when the rows fit one chunk, the backward drops that cast before it makes the weight's gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, return_entropy, compute, late):
        # hidden (N, H), weight (V, H), bias (V,) | None, targets (N,) int64; compute: hidden's dtype, the
        # matmuls' (the weight and bias are cast to it here when they are wider)
        ctx.master_dtype, ctx.compute = weight.dtype, compute
        master, master_bias = weight, bias  # saved for the backward instead of their casts
        if compute != weight.dtype:
            weight, bias = weight.to(compute), None if bias is None else bias.to(compute)
        n_rows, vocab = hidden.size(0), weight.size(0)
        cdtype, dev = _compute_dtype(weight.dtype), hidden.device
        rows = min(chunk_size, max(n_rows, 1))
        blk = min(rows, _block_rows(vocab, cdtype))
        buf = torch.empty(rows, vocab, dtype=cdtype, device=dev)  # reused by every chunk
        low = None if cdtype == weight.dtype else torch.empty(rows, vocab, dtype=weight.dtype, device=dev)
        scratch = torch.empty(blk, vocab, dtype=cdtype, device=dev)
        logps = torch.empty(n_rows, dtype=cdtype, device=dev)
        lse = torch.empty(n_rows, dtype=cdtype, device=dev)  # of z = logits / tau
        entropy = torch.empty(n_rows, dtype=cdtype, device=dev) if return_entropy else None

        for s in range(0, n_rows, chunk_size):
            n = min(chunk_size, n_rows - s)
            z = _chunk_logits(hidden[s : s + n], weight, bias, buf[:n], _head(low, n))
            for r in range(0, n, blk):
                zb = z[r : r + blk]  # (k, V) view, updated in place
                k, i = zb.size(0), slice(s + r, s + r + zb.size(0))
                if temperature != 1.0:
                    zb.div_(temperature)
                m = zb.amax(dim=-1, keepdim=True)  # (k, 1): shift so exp cannot overflow
                zb.sub_(m)
                ex = torch.exp(zb, out=scratch[:k])  # exp(z - m)
                log_s = ex.sum(-1).log_()  # (k,) log sum exp(z - m)
                logps[i] = zb.gather(1, targets[i, None]).squeeze(1) - log_s
                lse[i] = m.squeeze(1) + log_s
                if return_entropy:
                    # H = -sum p (z - lse) = log S - sum(e (z - m)) / S, with e = exp(z - m), S = sum e
                    entropy[i] = log_s - ex.mul_(zb).sum(-1) / log_s.exp()
        del buf, low, scratch, weight, bias

        ctx.temperature, ctx.chunk_size, ctx.has_bias, ctx.late = temperature, chunk_size, master_bias is not None, late
        ctx.save_for_backward(hidden, master, master_bias, targets, lse, entropy)
        ctx.set_materialize_grads(False)  # an unused entropy output gets None, and skips its work
        if return_entropy:
            return logps, entropy
        return logps

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps, grad_entropy=None):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        if (grad_logps is None and grad_entropy is None) or not (need_h or need_w or need_b):
            return None, None, None, None, None, None, None, None, None

        if ctx.compute != weight.dtype:  # the cast the forward made
            weight, bias = weight.to(ctx.compute), None if bias is None else bias.to(ctx.compute)
        n_rows, vocab = hidden.size(0), weight.size(0)
        cdtype, dev = lse.dtype, hidden.device
        rows = min(chunk_size, max(n_rows, 1))
        blk = min(rows, _block_rows(vocab, cdtype))
        buf = torch.empty(rows, vocab, dtype=cdtype, device=dev)
        # late weight gradient: every row's dlogits, in the head's dtype, kept for LateWeightGrad (bounded by
        # the size of the gradient it defers)
        late = ctx.late if need_w and ctx.late is not None and ctx.late.worth(n_rows, weight) else None
        kept = torch.empty(n_rows, vocab, dtype=weight.dtype, device=dev) if late is not None else None
        low = (None if cdtype == weight.dtype or kept is not None
               else torch.empty(rows, vocab, dtype=weight.dtype, device=dev))
        scratch = torch.empty(blk, vocab, dtype=cdtype, device=dev) if grad_entropy is not None else None
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None  # (V, H) fp32 accumulator: the first chunk's product, then the others added into it
        grad_b = torch.zeros(vocab, dtype=cdtype, device=dev) if need_b else None
        # dlogits = dz / tau is linear in the upstream gradients: fold 1/tau into them
        g_lp = None if grad_logps is None else grad_logps.to(cdtype) / temperature
        g_ent = None if grad_entropy is None else grad_entropy.to(cdtype) / temperature

        for s in range(0, n_rows, chunk_size):
            n = min(chunk_size, n_rows - s)
            h = hidden[s : s + n]
            narrow = None if cdtype == weight.dtype else _head(low, n) if kept is None else kept[s : s + n]
            z = _chunk_logits(h, weight, bias, buf[:n], narrow)
            # dlogits = g_lp * 1_t - p * (g_lp + g_ent * (logp + H)), built in z's buffer block by block
            for r in range(0, n, blk):
                zb = z[r : r + blk]
                k, i = zb.size(0), slice(s + r, s + r + zb.size(0))
                if temperature != 1.0:
                    zb.div_(temperature)
                zb.sub_(lse[i, None])  # logp
                if g_ent is None:
                    zb.exp_().mul_(-g_lp[i, None])
                else:
                    p = torch.exp(zb, out=scratch[:k])
                    # -(g_lp + g_ent * (logp + H)) = logp * (-g_ent) - c, with c = g_lp + g_ent * H per row
                    c = g_ent[i] * entropy[i]
                    if g_lp is not None:
                        c += g_lp[i]
                    zb.mul_(-g_ent[i, None]).sub_(c[:, None]).mul_(p)
            if g_lp is not None:
                z.scatter_add_(1, targets[s : s + n, None], g_lp[s : s + n, None])
            if need_b:
                grad_b += z.sum(0)
            # same rounding as autograd through a bf16 nn.Linear: dlogits cast to the head's dtype
            dz = kept[s : s + n].copy_(z) if kept is not None else z if low is None else low[:n].copy_(z)
            if need_h:
                torch.mm(dz, weight, out=grad_h[s : s + n])
            if s + n >= n_rows:  # the last chunk: the weight's cast and the narrow buffer are done with
                weight = low = None
            if late is not None:
                continue
            if need_w and grad_w is None:
                grad_w = torch.mm(z.t(), h.to(cdtype))  # (V, n) @ (n, H): no zero-filled (V, H) to add it to
            elif need_w:
                grad_w.addmm_(z.t(), h.to(cdtype))  # accumulated in fp32
        buf = z = None
        if late is not None:  # formed by LateWeightGrad's node; here a stand-in that takes no memory
            late.keep(kept, hidden)
            grad_w = torch.zeros((), dtype=ctx.master_dtype, device=dev).expand(vocab, hidden.size(1))
        elif need_w and grad_w is None:  # no rows: a dense zero, so that a tied embedding's gradient stays dense
            grad_w = torch.zeros(vocab, hidden.size(1), dtype=cdtype, device=dev)
        if grad_w is not None and late is None:
            grad_w = _rounded(grad_w, ctx.compute, ctx.master_dtype)
        if grad_b is not None:
            grad_b = _rounded(grad_b, ctx.compute, ctx.master_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


class LateWeightGrad:
    """The LM head's weight gradient formed at the end of the backward instead of at its start.

    The head is the last layer of the forward, so autograd reaches it first: a (V, H) weight gradient made
    there (544 MB in float32 at V = 151,936, H = 896) would sit beside every activation of the body until the
    backward ends (a tied table's gradient is complete only once the embedding lookup's part has come too).
    ``late_weight_grad(weight)``, called before the body runs, returns the weight through a node of its own
    made before the body's nodes; ``token_logprobs(..., late_weight_grad=handle)`` then keeps the rows'
    dlogits in the head's dtype (N x V: smaller than the gradient whenever N < 2H in bf16, N < H in float32;
    otherwise the gradient is made at once, as without it) and that node, which autograd runs after the
    body's, forms the gradient from them: one (V, N) x (N, H) product in the head's dtype, as autograd
    through a plain ``nn.Linear`` head would."""

    def __init__(self, master_dtype: torch.dtype):
        self.master_dtype = master_dtype
        self.dlogits = self.hidden = None

    def worth(self, n_rows: int, weight: torch.Tensor) -> bool:
        """Whether keeping ``n_rows`` rows of dlogits (in ``weight``'s dtype) takes less than the gradient."""
        keep = n_rows * weight.size(0) * weight.element_size()
        return keep < weight.numel() * torch.empty((), dtype=self.master_dtype).element_size()

    def keep(self, dlogits: torch.Tensor, hidden: torch.Tensor) -> None:
        self.dlogits, self.hidden = dlogits, hidden

    def take(self) -> torch.Tensor | None:
        """The weight gradient (V, H) in the master dtype, or ``None`` when the head made it itself."""
        dlogits, hidden = self.dlogits, self.hidden
        if dlogits is None:
            return None
        self.dlogits = self.hidden = None
        grad = torch.empty(dlogits.size(1), hidden.size(1), dtype=self.master_dtype, device=dlogits.device)
        for r in range(0, grad.size(0), _ROUND_BLOCK_ROWS):  # block by block: no full-size narrow copy
            grad[r:r + _ROUND_BLOCK_ROWS].copy_(torch.mm(dlogits[:, r:r + _ROUND_BLOCK_ROWS].t(), hidden))
        return grad


def late_weight_grad(weight: torch.Tensor) -> tuple[torch.Tensor, LateWeightGrad]:
    """``(weight as the head should read it, handle)`` for ``token_logprobs(..., late_weight_grad=handle)``;
    call it before the model body runs (see ``LateWeightGrad``)."""
    handle = LateWeightGrad(weight.dtype)
    return _Late.apply(weight, handle), handle


class _Late(torch.autograd.Function):
    """The identity on the weight; its backward returns the gradient ``LateWeightGrad`` formed late, or passes
    on the one the head made (a fresh tensor, which a tied table's sparse lookup gradient is added into)."""

    @staticmethod
    def forward(ctx, weight, handle):
        ctx.handle = handle
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        late = ctx.handle.take()
        return (grad if late is None else late), None


def _rounded(grad: torch.Tensor, compute: torch.dtype, master: torch.dtype) -> torch.Tensor:
    """A gradient accumulated in ``grad``'s dtype, rounded to ``compute`` (as an autograd matmul in that dtype
    rounds it), returned in ``master``. Rounded in place block by block when ``grad`` already is ``master``:
    the values of ``grad.to(compute).to(master)`` with no full-size copy."""
    if compute == grad.dtype:
        return grad.to(master)
    if master != grad.dtype:
        return grad.to(compute).to(master)
    for r in range(0, grad.size(0), _ROUND_BLOCK_ROWS):
        block = grad[r:r + _ROUND_BLOCK_ROWS]
        block.copy_(block.to(compute))
    return grad


# ----------------------------------------------------------------------------------------------------------
# Hugging Face causal LMs: body and head apart


def lm_head_of(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight (V, H), bias (V,) | None)`` of a Hugging Face causal LM's output layer (tied or not).

    Raises for heads whose logits are not a plain linear map of the last hidden state (Gemma-2/3 final
    logit soft-capping, Cohere's ``logit_scale``, Granite's ``logits_scaling``): chunked log-probs of those
    would silently differ from the model's own."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "final_logit_softcapping", None):
        raise ValueError("models with final_logit_softcapping are not supported by token_logprobs")
    for name in ("logit_scale", "logits_scaling"):
        value = getattr(config, name, None)
        if value is not None and value != 1:
            raise ValueError(f"models with {name}={value} are not supported by token_logprobs")
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")
    return head.weight, getattr(head, "bias", None)


def hidden_states(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw
) -> torch.Tensor:
    """Last hidden states (B, T, H) of a Hugging Face causal LM's body: the input of its LM head.

    Runs the decoder only (``model.get_decoder()``, i.e. ``model.model`` for Llama/Qwen2), so no logits are
    built. HF decoders apply their final norm before returning, so ``lm_head(hidden_states(...))`` equals
    ``model(...).logits``. Extra keyword arguments (``position_ids``, ...) go to the decoder; the KV cache is
    off unless asked for."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    if body is model:
        raise ValueError(f"cannot find the decoder body of {type(model).__name__}")
    kw.setdefault("use_cache", False)
    out = body(input_ids=input_ids, attention_mask=attention_mask, **kw)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


# ----------------------------------------------------------------------------------------------------------
# the exact KL between two LM heads, for logging


@torch.no_grad()
def token_kl_exact(
    hidden_p: torch.Tensor,
    weight_p: torch.Tensor,
    hidden_q: torch.Tensor,
    weight_q: torch.Tensor,
    *,
    temperature: float = 1.0,
    bias_p: torch.Tensor | None = None,
    bias_q: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-position ``KL(p||q)`` and ``KL(q||p)`` over the whole vocabulary, chunked, without gradients.

    ``p = softmax((hidden_p @ weight_p.T + bias_p) / temperature)`` and likewise ``q``: e.g. p the policy and q
    the reference, each with its own body's hidden states and its own head (the vocabularies must match, the
    hidden sizes need not). ``KL(p||q) = sum_v p_v (log p_v - log q_v)`` (``grpokit.kl.exact_kl``), computed
    ``chunk_size`` rows at a time, so at most a few (chunk_size, V) buffers exist, never (B, T, V).

    Args:
        hidden_p: (B, T, Hp) (any leading shape); ``hidden_q`` (B, T, Hq) with the same leading shape.
        weight_p: (V, Hp) LM head of p; ``weight_q`` (V, Hq).
        temperature: both distributions are tempered by it (the sampling temperature), > 0.
        bias_p, bias_q: (V,) head biases or ``None``.
        chunk_size: rows of B*T per chunk; ``None``: ``default_chunk_size(V)``.

    Returns:
        ``(kl_pq, kl_qp)``, each (B, T) in the compute dtype (fp32, fp64 for fp64 inputs). With p = pi_theta
        and q = pi_ref these are the reverse KL(pi_theta||pi_ref) and the forward KL(pi_ref||pi_theta).
    """
    if hidden_p.shape[:-1] != hidden_q.shape[:-1]:
        raise ValueError(f"hidden_p {tuple(hidden_p.shape)} and hidden_q {tuple(hidden_q.shape)} must share "
                         "their leading (B, T) shape")
    for name, h, w in (("p", hidden_p, weight_p), ("q", hidden_q, weight_q)):
        if w.dim() != 2 or w.size(1) != h.size(-1):
            raise ValueError(f"weight_{name} must be (V, H={h.size(-1)}), got {tuple(w.shape)}")
    if weight_p.size(0) != weight_q.size(0):
        raise ValueError(f"the two heads have different vocabularies: {weight_p.size(0)} vs {weight_q.size(0)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = weight_p.size(0)
    cdtype = torch.promote_types(_compute_dtype(weight_p.dtype), _compute_dtype(weight_q.dtype))
    if chunk_size is None:  # three (chunk, V) buffers at the peak: half the rows of token_logprobs' default
        chunk_size = max(1, default_chunk_size(vocab, cdtype) // 2)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    hp = hidden_p.reshape(-1, hidden_p.size(-1))  # (N, Hp)
    hq = hidden_q.reshape(-1, hidden_q.size(-1))  # (N, Hq)
    kl_pq = torch.empty(hp.size(0), dtype=cdtype, device=hp.device)
    kl_qp = torch.empty_like(kl_pq)
    for s in range(0, hp.size(0), chunk_size):
        rows = slice(s, s + chunk_size)
        logp = _tempered_log_softmax(hp[rows], weight_p, bias_p, temperature, cdtype)  # (n, V)
        logq = _tempered_log_softmax(hq[rows], weight_q, bias_q, temperature, cdtype)  # (n, V)
        d = logq.sub_(logp)  # log q - log p, in logq's buffer
        kl_pq[rows] = -torch.einsum("nv,nv->n", logp.exp(), d)  # sum_v p (log p - log q)
        kl_qp[rows] = torch.einsum("nv,nv->n", logp.add_(d).exp_(), d)  # q = exp(log p + d), in logp's buffer
    shape = hidden_p.shape[:-1]
    return kl_pq.view(shape), kl_qp.view(shape)


def _tempered_log_softmax(h, weight, bias, temperature, cdtype):
    """log_softmax((h @ W.T + b) / temperature) with the logits formed in the head's dtype (as ``nn.Linear``),
    the softmax in ``cdtype``."""
    z = F.linear(h, weight, bias).to(cdtype)
    if temperature != 1.0:
        z.div_(temperature)
    return torch.log_softmax(z, dim=-1)
