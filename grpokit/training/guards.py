"""Stop a run cleanly when its numbers break: a non-finite loss or gradient never reaches the optimizer.

GRPO's pieces are finite by construction (NaN rewards get advantage 0, empty completions a zero loss, extreme
log-ratios are clipped; see tests/test_losses.py), so a NaN or inf here means the run itself went wrong
(learning rate too high, float16 overflow, a corrupted model). Going on would write NaN weights into the next
checkpoint; instead the update is dropped, the run stops, and the last good checkpoint stays the newest one.
"""

from __future__ import annotations

import math
from pathlib import Path

from grpokit.training.checkpoint import list_checkpoints


class TrainingError(RuntimeError):
    """The run cannot go on; the message says at which step, why, and what is kept."""


def is_finite_update(loss: float, grad_norm: float) -> bool:
    """True when both the loss and the global gradient norm (before clipping) are finite numbers."""
    return math.isfinite(float(loss)) and math.isfinite(float(grad_norm))


def non_finite_error(step: int, loss: float, grad_norm: float, output_dir: str | Path) -> TrainingError:
    """The error for a non-finite update at optimizer step ``step``, naming the newest checkpoint to resume."""
    broken = [f"the {name} is {float(value)}" for name, value in (("loss", loss), ("gradient norm", grad_norm))
              if not math.isfinite(float(value))]
    saved = list_checkpoints(output_dir)
    kept = f"the last good checkpoint is {str(saved[-1])!r}" if saved else "no checkpoint had been written yet"
    return TrainingError(
        f"step {step}: {' and '.join(broken)}; the optimizer step was skipped and the run stopped ({kept}). "
        "Try a lower learning_rate, max_grad_norm > 0, rewards of a moderate scale, or dtype float32")
