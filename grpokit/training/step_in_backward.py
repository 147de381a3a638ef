"""The clipped AdamW step taken inside the backward, one parameter at a time, so that the step never holds every
gradient at once (``GRPOConfig.optimizer_in_backward``).

A plain step keeps all gradients until ``clip_grad_norm_`` and ``optimizer.step()`` have run: for a full
fine-tune that is one more float32 copy of the model beside its weights and AdamW's two moments. Here the
backward runs twice over one retained graph, as LOMO does (Lv et al. 2023, arXiv:2306.09782):

1. each parameter's gradient, as soon as autograd has accumulated it, gives its norm and is freed;
2. with the global norm known (and checked finite by the caller), each gradient is scaled by the clip
   coefficient ``clip_grad_norm_`` would use, its parameter takes its AdamW step, and the gradient is freed.

The step is the same one: the same gradients (the same graph, run twice), the same norm (the norm of the
per-parameter norms), the same clip coefficient (``clip_grads_with_norm_``), the same optimizer and moments
(one ``optimizer.step()`` per parameter, with only that parameter's gradient set, so its checkpoints and
resumes are the plain step's). The price is the second backward. It needs the whole step in one backward
(gradients accumulated over micro-batches have no point at which one is complete) and one process (DDP and
FSDP reduce gradients in buckets of their own)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch

AUTO_MIN_BYTES = 256 * 2**20
"""``optimizer_in_backward: null`` takes this path when the trainable parameters' gradients would hold at
least this much (float32: 64M parameters and up); below it the second backward costs more than it saves."""


def gradient_bytes(params: list[torch.Tensor]) -> int:
    """Bytes of the gradients of ``params`` (a gradient has its parameter's dtype)."""
    return sum(p.numel() * p.element_size() for p in params)


class StepInBackward:
    """``measure(loss)`` (pass 1: the global gradient norm), then ``step(loss)`` (pass 2: clip and AdamW, one
    parameter at a time) on the same ``loss``; a step not taken (a non-finite norm) just drops ``loss``, and
    with it the retained graph.

    ``params``: the trainable parameters, each in ``optimizer``'s groups, all without a gradient on entry;
    ``max_norm``: the clipping threshold (``math.inf``: no clipping)."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float):
        self.optimizer, self.params, self.max_norm = optimizer, params, max_norm
        self.total_norm: torch.Tensor | None = None

    def measure(self, loss: torch.Tensor) -> torch.Tensor:
        """Backpropagate ``loss``, keeping its graph; returns the global 2-norm of the gradients, which are
        freed as they come."""
        if any(p.grad is not None for p in self.params):
            raise RuntimeError("StepInBackward.measure: a parameter already holds a gradient")
        norms: list[torch.Tensor] = []

        def norm_of(param: torch.Tensor) -> None:
            norms.append(torch.linalg.vector_norm(param.grad, 2.0).float())
            param.grad = None

        with self._hooks(norm_of):
            loss.backward(retain_graph=True)
        # as clip_grad_norm_: the norm of the per-tensor norms
        self.total_norm = (torch.linalg.vector_norm(torch.stack(norms), 2.0) if norms
                           else torch.zeros((), device=loss.device))
        return self.total_norm

    def step(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` again (its graph is then freed); each gradient is clipped with the measured
        norm and its parameter stepped as soon as the gradient is complete."""
        if self.total_norm is None:
            raise RuntimeError("StepInBackward.step before measure")
        total, max_norm, optimizer = self.total_norm, self.max_norm, self.optimizer
        groups = optimizer.param_groups
        members = [g["params"] for g in groups]
        group_of = {p: g for g in groups for p in g["params"]}  # a step narrows it to its parameter alone

        def clip_and_step(param: torch.Tensor) -> None:
            if math.isfinite(max_norm):
                torch.nn.utils.clip_grads_with_norm_([param], max_norm, total, foreach=True)
            # the optimizer narrowed to this parameter's group and to it alone: the step touches only it, and
            # does not walk every parameter of the model looking for gradients
            group = group_of[param]
            group["params"] = [param]
            optimizer.param_groups = [group]
            optimizer.step()
            param.grad = None

        try:
            with self._hooks(clip_and_step):
                loss.backward()
        finally:
            optimizer.param_groups = groups
            for group, params in zip(groups, members, strict=True):
                group["params"] = params
        self.total_norm = None

    @contextlib.contextmanager
    def _hooks(self, fn: Callable[[torch.Tensor], None]) -> Iterator[None]:
        handles = [p.register_post_accumulate_grad_hook(fn) for p in self.params]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for p in self.params:  # an interrupted backward leaves no gradient behind
                p.grad = None
