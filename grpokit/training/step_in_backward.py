"""The clipped AdamW step taken inside the backward, one parameter at a time, so that the step never holds every
gradient at once (``GRPOConfig.optimizer_in_backward``).

A plain step keeps all gradients until ``clip_grad_norm_`` and ``optimizer.step()`` have run: for a full
fine-tune that is one more float32 copy of the model beside its weights and AdamW's two moments. Here the
backward runs twice, as LOMO's does (Lv et al. 2023, arXiv:2306.09782):

1. each parameter's gradient, as soon as autograd has accumulated it, gives its norm and is freed;
2. with the global norm known (and checked finite by the caller), the caller runs the forward again (same
   inputs, same random numbers: ``random_state`` and ``replaying``) and this backward scales each gradient by
   the clip coefficient ``clip_grad_norm_`` would use, steps its parameter and frees the gradient.

The forward is run again rather than its graph kept through the first backward, so that each backward frees
the activations as it goes: the head's weight gradient, formed last (``logprobs.late_weight_grad``), then
never sits beside them. The step is the same one: the same gradients, the same norm (the norm of the
per-parameter norms), the same clip coefficient (``clip_grads_with_norm_``), the same optimizer and moments
(one ``optimizer.step()`` per parameter, narrowed to it, so its checkpoints and resumes are the plain
step's). The price is one more forward and backward. It needs the whole step in one backward (gradients
accumulated over micro-batches have no point at which one is complete) and one process (DDP and FSDP reduce
gradients in buckets of their own)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch

AUTO_MIN_BYTES = 256 * 2**20
"""``optimizer_in_backward: null`` takes this path when the trainable parameters' gradients would hold at
least this much (float32: 64M parameters and up); below it the gradients are small beside the rest of the
step, and the second forward and backward would cost time for little memory."""


def gradient_bytes(params: list[torch.Tensor]) -> int:
    """Bytes of the gradients of ``params`` (a gradient has its parameter's dtype)."""
    return sum(p.numel() * p.element_size() for p in params)


class StepInBackward:
    """``measure(loss)`` (pass 1: the global gradient norm), then ``step(loss)`` (pass 2: clip and AdamW, one
    parameter at a time) on the same loss computed again; a step not taken (a non-finite norm) is just not
    taken.

    ``params``: the trainable parameters, each in ``optimizer``'s groups, all without a gradient on entry;
    ``max_norm``: the clipping threshold (``math.inf``: no clipping)."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float):
        self.optimizer, self.params, self.max_norm = optimizer, params, max_norm
        self.total_norm: torch.Tensor | None = None

    def measure(self, loss: torch.Tensor) -> torch.Tensor:
        """Backpropagate ``loss``; returns the global 2-norm of the gradients, which are freed as they come."""
        if any(p.grad is not None for p in self.params):
            raise RuntimeError("StepInBackward.measure: a parameter already holds a gradient")
        norms: list[torch.Tensor] = []

        def norm_of(param: torch.Tensor) -> None:
            norms.append(torch.linalg.vector_norm(param.grad, 2.0).float())
            param.grad = None

        with self._hooks(norm_of):
            loss.backward()
        # as clip_grad_norm_: the norm of the per-tensor norms
        self.total_norm = (torch.linalg.vector_norm(torch.stack(norms), 2.0) if norms
                           else torch.zeros((), device=loss.device))
        return self.total_norm

    def step(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss``, the measured one computed again; each gradient is clipped with the measured
        norm and its parameter stepped as soon as the gradient is complete."""
        if self.total_norm is None:
            raise RuntimeError("StepInBackward.step before measure")
        total, max_norm = self.total_norm, self.max_norm

        with one_at_a_time(self.optimizer) as step_one:
            def clip_and_step(param: torch.Tensor) -> None:
                if math.isfinite(max_norm):
                    torch.nn.utils.clip_grads_with_norm_([param], max_norm, total, foreach=True)
                step_one(param)
                param.grad = None

            with self._hooks(clip_and_step):
                loss.backward()
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


@contextlib.contextmanager
def one_at_a_time(optimizer: torch.optim.Optimizer) -> Iterator[Callable[[torch.Tensor], None]]:
    """``step(param)``: ``optimizer.step()`` narrowed to ``param``'s group and to it alone (so that it neither
    walks every parameter looking for gradients nor steps another that holds one); the groups are restored on
    exit."""
    groups = optimizer.param_groups
    members = [g["params"] for g in groups]
    group_of = {p: g for g in groups for p in g["params"]}

    def step(param: torch.Tensor) -> None:
        group = group_of[param]
        group["params"] = [param]
        optimizer.param_groups = [group]
        optimizer.step()

    try:
        yield step
    finally:
        optimizer.param_groups = groups
        for group, params in zip(groups, members, strict=True):
            group["params"] = params


def step_on_zero_gradients(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    """The AdamW step of a loss whose gradient is exactly 0 (every row of a GRPO step with no advantage, beta
    = 0), without running it: each parameter in turn takes a zero gradient (a view of one shared zero buffer,
    which AdamW only reads) and its step (the moments decay, weight decay acts)."""
    params = [p for p in params if p.numel()]
    if not params:
        return
    sizes: dict[tuple, int] = {}  # one buffer per (dtype, device), as large as its largest parameter
    for p in params:
        sizes[p.dtype, p.device] = max(sizes.get((p.dtype, p.device), 0), p.numel())
    zeros = {key: torch.zeros(n, dtype=key[0], device=key[1]) for key, n in sizes.items()}
    with one_at_a_time(optimizer) as step_one:
        for p in params:
            if p.grad is not None:
                raise RuntimeError("step_on_zero_gradients: a parameter already holds a gradient")
            p.grad = zeros[(p.dtype, p.device)][:p.numel()].view_as(p)
            try:
                step_one(p)
            finally:
                p.grad = None


def random_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The CPU random state, and that of ``device`` when it is a CUDA device, for ``replaying``."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def replaying(state: tuple[torch.Tensor, torch.Tensor | None]) -> Iterator[None]:
    """Run a block with the random state ``random_state`` took (a forward's dropout masks drawn again); the
    random state from before the block is back after it."""
    cpu, cuda = state
    devices = [torch.cuda.current_device()] if cuda is not None else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
        yield
