"""Next-token sampling: temperature, top-k, top-p, from a seeded generator. Pure functions of the logits."""

from __future__ import annotations

import torch


def tempered_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T in at least float32: the distribution that is sampled AND scored by the loss (TRL #4159)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return logits / temperature if temperature != 1.0 else logits


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every token outside the top-k and outside the smallest set whose mass reaches top_p.

    logits: (B, V) already tempered. ``top_k=0`` and ``top_p=1`` are no-ops. The most likely token always stays.
    """
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = mass_before >= top_p  # the first token has mass_before 0 < top_p: always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one token per row. logits: (B, V) raw scores of the next position.

    Returns ``tokens`` (B,), ``logps`` (B,) and ``entropy`` (B,): the log-probs of the drawn tokens under
    log_softmax(logits / T), the unfiltered tempered distribution that the loss scores (top-k/top-p shape
    sampling only, as in TRL), and that distribution's entropy, as the training forward logs it.
    """
    z = tempered_logits(logits, temperature)  # (B, V)
    filtered = top_k > 0 or top_p < 1.0
    probs = torch.softmax(filter_logits(z, top_k, top_p) if filtered else z, dim=-1)  # (B, V)
    tokens = draw(probs, generator)  # (B, 1)
    if filtered:  # the loss scores the unfiltered distribution
        lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (B, 1)
        logps = z.gather(-1, tokens) - lse
        probs = (z - lse).exp_()  # the unfiltered distribution, for its entropy
    else:
        logps = probs.gather(-1, tokens).log()  # same distribution: no second pass over V
        lse = z.gather(-1, tokens) - logps  # log-sum-exp of z, read off the drawn token
    # H = -sum p log p = lse - sum p z: one dot product per row (no (B, V) temporary)
    entropy = lse.squeeze(-1) - (probs.unsqueeze(1) @ z.unsqueeze(-1)).view(-1)
    return tokens.squeeze(-1), logps.squeeze(-1), entropy


BLOCK = 1024
"""Vocabulary block of the two-level draw: above 4 blocks, a row's cdf is built over block sums first."""


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``probs`` (B, V), by inversion of the cumulative distribution: (B, 1) long.

    Exact sampling from one uniform number per row (``torch.multinomial`` draws V exponentials per row, 4x
    slower at these sizes). Index k is chosen when cdf[k-1] <= u < cdf[k], which needs probs[k] > 0, so
    filtered (zero) tokens are never drawn; cumulative sums are in float64. For a large vocabulary the
    inversion runs in two levels — over the sums of blocks of ``BLOCK`` tokens, then inside the chosen block —
    so no (B, V) cdf is allocated: one read of ``probs`` instead of three passes and two (B, V) buffers."""
    B, V = probs.shape
    u = torch.rand(B, 1, generator=generator, dtype=torch.float64, device=probs.device)  # (B, 1) in [0, 1)
    if V <= 4 * BLOCK:
        return _invert(probs, u)
    full = V // BLOCK * BLOCK
    sums = probs[:, :full].view(B, -1, BLOCK).sum(-1).double()  # (B, nb)
    if full < V:
        sums = torch.cat([sums, probs[:, full:].sum(-1, keepdim=True).double()], dim=1)
    block = _invert(sums, u)  # (B, 1): the block holding the draw
    cdf = sums.cumsum(-1)
    before = torch.where(block > 0, cdf.gather(-1, (block - 1).clamp(min=0)), torch.zeros_like(u))
    within = ((u * cdf[:, -1:] - before) / sums.gather(-1, block)).clamp_(0.0, 1.0 - 1e-12)  # (B, 1) in [0, 1)
    start = block * BLOCK  # (B, 1)
    cols = start + torch.arange(BLOCK, device=probs.device)  # (B, BLOCK); the last block may be short
    inside = probs.gather(-1, cols.clamp(max=V - 1)).masked_fill(cols >= V, 0.0)  # (B, BLOCK)
    return start + _invert(inside, within)


def _invert(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index k with cdf[k-1] <= u * total < cdf[k] per row: probs (B, n), u (B, 1) in [0, 1) -> (B, 1)."""
    cdf = probs.cumsum(-1, dtype=torch.float64)  # (B, n)
    return (cdf <= u * cdf[:, -1:]).sum(-1, keepdim=True).clamp_(max=probs.size(-1) - 1)
