"""The policy as it trains: activation checkpointing and LoRA adapters, applied once after loading.

``prepare_model`` is what the trainer calls once its policy is loaded and cast to ``dtype``:

1. ``gradient_checkpointing``: ``gradient_checkpointing_enable`` (non-reentrant), and ``use_cache`` off in the
   model config, since a KV cache is useless in a training forward (sampling passes ``use_cache=True`` itself,
   in eval mode, where no checkpointing happens).
2. ``peft``: LoRA adapters (``grpokit.models.lora.add_lora``), after 1 so they are checkpointed too; their random
   A matrices are drawn from ``seed``, so a resumed run rebuilds the same adapters before loading them.
"""

from __future__ import annotations

import torch

from grpokit.models.lora import add_lora


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in the backward pass instead of storing them (less memory, ~30 % more compute)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"gradient_checkpointing: {type(model).__name__} does not support it")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False


def prepare_model(model, args):
    """The policy as it trains: checkpointing and LoRA per ``args`` (a ``GRPOConfig``); returns the model to
    train (the same module, or its ``PeftModel`` wrapper)."""
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if args.peft is not None:
        with torch.random.fork_rng(devices=[]):  # LoRA's A matrices: from the seed, the same in every run
            torch.manual_seed(args.seed)
            model = add_lora(model, args.peft)
    return model
