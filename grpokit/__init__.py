"""grpokit: GRPO training for language models whose loss is checked against the paper by machine."""

from grpokit.advantages import group_advantages, process_advantages
from grpokit.kl import kl_penalty
from grpokit.losses import LossConfig, LossOutput, grpo_loss

__version__ = "0.1.0"

__all__ = [
    "LossConfig",
    "LossOutput",
    "grpo_loss",
    "kl_penalty",
    "group_advantages",
    "process_advantages",
]
