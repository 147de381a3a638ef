"""``grpokit.models.mixed.cast_linear`` against the same layers under ``torch.autocast``."""

from __future__ import annotations

import pytest
import torch

from grpokit.models import mixed

BF16 = torch.bfloat16


def layers(bias: bool, seed: int = 0):
    torch.manual_seed(seed)
    return [torch.nn.Linear(24, n, bias=bias) for n in (16, 8, 8)]


def stacked_under_autocast(x, linears):
    """What the padding-free forward computed before ``cast_linear``: one linear of the stacked bf16 casts."""
    weight = torch.cat([m.weight.to(BF16) for m in linears])
    bias = torch.cat([m.bias.to(BF16) for m in linears]) if linears[0].bias is not None else None
    return torch.nn.functional.linear(x, weight, bias)


def grads_of(fn, x, linears):
    """(output, d x, {name: d parameter}) of ``fn(x)`` backpropagated with a fixed random cotangent."""
    x = x.detach().requires_grad_()
    for m in linears:
        m.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=BF16):
        out = fn(x)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.dtype)
    out.backward(cotangent)
    params = {f"{i}.{n}": p.grad for i, m in enumerate(linears) for n, p in m.named_parameters()}
    return out.detach(), x.grad, params


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(11, 24), (2, 5, 24)])
def test_cast_linear_gives_autocasts_outputs_and_gradients(bias, shape):
    """Stacked layers, as q/k/v: the output and the input gradient bit for bit (the same bf16 products), every
    float32 master gradient to bf16 rounding (the weight gradient is formed as (out, in) rather than as the
    transpose of (in, out), which may round the last bit differently); a missing or misplaced stacked weight
    would be off by its whole size."""
    linears = layers(bias)
    x = torch.randn(shape)
    workspace = mixed.Workspace()
    got = grads_of(lambda t: mixed.cast_linear(t, linears, BF16, workspace), x, linears)
    want = grads_of(lambda t: stacked_under_autocast(t, linears), x, linears)
    assert got[0].dtype == want[0].dtype == BF16
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert got[1].dtype == torch.float32
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)  # the same one bf16 product
    assert got[2].keys() == want[2].keys()
    for name, g in got[2].items():
        assert g.dtype == torch.float32 and g.is_contiguous(), name
        torch.testing.assert_close(g, want[2][name], rtol=1e-2, atol=1e-2 * float(want[2][name].abs().max()))


def test_layers_in_sequence_share_the_workspace():
    """Two stacks one after the other cast into the same buffers: each still gets its own gradient, and the
    second's (bigger) weights grow the buffers."""
    first = layers(True, seed=1)  # 24 -> 32
    torch.manual_seed(2)
    second = [torch.nn.Linear(32, n) for n in (40, 8)]  # 32 -> 48
    workspace = mixed.Workspace()

    def chained(cast):
        return lambda t: cast(cast(t, first).float(), second)

    ours = chained(lambda t, ls: mixed.cast_linear(t, ls, BF16, workspace))
    x = torch.randn(7, 24)
    got, want = grads_of(ours, x, first + second), grads_of(chained(stacked_under_autocast), x, first + second)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for name, g in got[2].items():
        assert (g - want[2][name]).norm() <= 0.01 * want[2][name].norm(), name


def test_no_copy_of_a_weight_is_kept_for_the_backward():
    """Autocast keeps each layer's bf16 weight from the forward to the backward; ``cast_linear`` keeps the input
    and the float32 master only."""
    linears = layers(True)

    def saved(fn):
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            with torch.autocast("cpu", dtype=BF16):
                fn(torch.randn(4, 24, requires_grad=True))
        return [(t.dtype, tuple(t.shape)) for t in kept]

    plain = saved(lambda t: torch.cat([m(t) for m in linears], -1))
    ours = saved(lambda t: mixed.cast_linear(t, linears, BF16, mixed.Workspace()))
    assert (BF16, (24, 16)) in plain  # (the transposed view of the cast)
    assert [shape for dtype, shape in ours if dtype == BF16] == [(4, 24)]  # the input
    assert [shape for dtype, shape in ours if dtype == torch.float32] == [(16, 24), (8, 24), (8, 24)]  # masters


def test_workspace_grows_and_reuses():
    workspace = mixed.Workspace()
    a = workspace.take("w", (4, 3), BF16, torch.device("cpu"))
    b = workspace.take("w", (2, 3), BF16, torch.device("cpu"))
    assert b.data_ptr() == a.data_ptr()
    c = workspace.take("w", (5, 3), BF16, torch.device("cpu"))
    assert c.shape == (5, 3) and workspace.take("g", (1,), BF16, torch.device("cpu")).data_ptr() != c.data_ptr()
