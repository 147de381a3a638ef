"""Linear layers of the padding-free training forward under bf16 mixed precision, without per-step copies.

Under ``torch.autocast`` a linear layer casts its float32 master weight to bfloat16 in the forward and keeps
that cast for the backward; the backward forms the weight gradient in bfloat16 and casts it to float32. Over
a whole model that allocates a bfloat16 copy of every weight and of every weight gradient, each step, and
holds the weight copies from the forward to the backward. On a CPU the allocations are the cost: memory freshly
handed out by the system is faulted in page by page, several times slower than the cast that fills it.

``cast_linear`` computes the same thing with two reusable buffers (``Workspace``): the forward casts the
stacked weight into one, multiplies and keeps nothing but the float32 master; the backward casts it again
into the same buffer for the input gradient and forms the weight gradient in the other. The values are those
of autocast (bfloat16 products of the same bfloat16 weights and inputs, the weight gradient rounded to
bfloat16 before it becomes float32); autocast's copies of the weights are not made, nor held through the
backward. ``tests/models/test_mixed.py`` checks it against autocast.
"""

from __future__ import annotations

import math

import torch


class Workspace:
    """Reusable flat buffers, one per (slot, dtype, device), grown to the largest size asked for. A view handed
    out is valid until the next ``take`` of the same slot."""

    def __init__(self):
        self.buffers: dict[tuple, torch.Tensor] = {}

    def take(self, slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (slot, dtype, device)
        n = math.prod(shape)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < n:
            buffer = self.buffers[key] = torch.empty(n, dtype=dtype, device=device)
        return buffer[:n].view(shape)


def cast_linear(x: torch.Tensor, linears, dtype: torch.dtype, workspace: Workspace) -> torch.Tensor:
    """``torch.cat([m(x) for m in linears], -1)`` as autocast computes it in ``dtype`` (module docstring); the
    output is in ``dtype``. ``linears``: plain ``nn.Linear`` layers with floating weights
    (``grpokit.models.llama.stackable``)."""
    weights = [m.weight for m in linears]
    biases = [m.bias for m in linears] if linears[0].bias is not None else []
    return _CastLinear.apply(x, dtype, workspace, len(weights), *weights, *biases)


def _cast_stacked(weights, dtype: torch.dtype, workspace: Workspace) -> torch.Tensor:
    """The weights cast to ``dtype`` and stacked by rows, written into the workspace's weight buffer."""
    rows = sum(w.size(0) for w in weights)
    stacked = workspace.take("weight", (rows, weights[0].size(1)), dtype, weights[0].device)
    start = 0
    for w in weights:
        stacked[start:start + w.size(0)].copy_(w)  # round to nearest, as .to(dtype)
        start += w.size(0)
    return stacked


class _CastLinear(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, dtype, workspace, count, *tensors):
        weights, biases = tensors[:count], tensors[count:]
        with torch.autocast(x.device.type, enabled=False):
            weight = _cast_stacked(weights, dtype, workspace)
            x_cast = x.to(dtype)
            flat = x_cast.reshape(-1, x.size(-1))
            if biases:
                bias = torch.cat([b.to(dtype) for b in biases])
                out = torch.addmm(bias, flat, weight.t())
            else:
                out = torch.mm(flat, weight.t())
        ctx.save_for_backward(x_cast, *weights)
        ctx.dtype, ctx.workspace, ctx.x_dtype = dtype, workspace, x.dtype
        ctx.bias_dtypes = [b.dtype for b in biases]
        return out.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out):
        x_cast, *weights = ctx.saved_tensors
        dtype, workspace = ctx.dtype, ctx.workspace
        needs = ctx.needs_input_grad
        count = len(weights)
        grad = grad_out.reshape(-1, grad_out.size(-1)).to(dtype)  # (n, sum of out)
        grad_x = weight_grads = bias_grads = None
        with torch.autocast(grad.device.type, enabled=False):
            if needs[0]:
                weight = _cast_stacked(weights, dtype, workspace)
                grad_x = torch.mm(grad, weight).view(x_cast.shape).to(ctx.x_dtype)
            sizes = [w.size(0) for w in weights]
            if any(needs[4:4 + count]):
                flat = x_cast.reshape(-1, x_cast.size(-1))
                stacked = workspace.take("grad", (sum(sizes), flat.size(1)), dtype, grad.device)
                torch.mm(grad.t(), flat, out=stacked)  # in dtype, as autocast rounds it
                weight_grads = [g.to(w.dtype) if need else None
                                for g, w, need in zip(stacked.split(sizes), weights, needs[4:4 + count])]
            if ctx.bias_dtypes:
                bias_grads = [g.sum(0).to(b_dtype) if need else None
                              for g, b_dtype, need in zip(grad.split(sizes, dim=1), ctx.bias_dtypes, needs[4 + count:])]
        return (grad_x, None, None, None, *(weight_grads or [None] * count), *(bias_grads or []))
