"""grpokit: GRPO training for language models whose loss is checked against the paper by machine."""

import os

# PyTorch's CPU allocator backs each block of 2 MB or more with transparent huge pages when this is set (read
# at its first allocation, so it takes effect unless tensors were made before grpokit was imported). A GRPO
# step allocates gigabytes afresh (activations, weight casts, gradients); with 4 KB pages much of that time
# goes to page faults. THP_MEM_ALLOC_ENABLE=0 in the environment keeps the default pages.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from grpokit.advantages import group_advantages, process_advantages
from grpokit.config import GRPOConfig
from grpokit.kl import kl_penalty
from grpokit.losses import LossConfig, LossOutput, grpo_loss

__version__ = "0.1.0"


def __getattr__(name):  # the trainer pulls in transformers: import it on first use only
    if name == "GRPOTrainer":
        from grpokit.training.trainer import GRPOTrainer

        return GRPOTrainer
    raise AttributeError(f"module 'grpokit' has no attribute {name!r}")


__all__ = [
    "GRPOConfig",
    "GRPOTrainer",
    "LossConfig",
    "LossOutput",
    "grpo_loss",
    "kl_penalty",
    "group_advantages",
    "process_advantages",
]
