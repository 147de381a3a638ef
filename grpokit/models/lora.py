"""LoRA through ``peft``: the ``peft`` config section, the adapter-wrapped policy, pi_ref for free, merging.

With ``peft: {r: 16, alpha: 32, dropout: 0.05, target_modules: null}`` in the config the trainer wraps the
policy in LoRA adapters (``get_peft_model``); only the adapter matrices A, B train, every base weight stays
bit-identical. Consequences:

* pi_ref (beta > 0) is the base model itself: the same module run inside ``model.disable_adapter()``
  (``adapters_disabled``), so no second copy of the weights is held.
* A checkpoint holds the adapters (``PeftModel.save_pretrained``: ``adapter_config.json``,
  ``adapter_model.safetensors``) plus the optimizer, RNG and data state of any checkpoint; a resume loads the
  base model as the run did, then the adapters (``load_trained_weights``).
* ``grpokit merge CHECKPOINT OUT`` folds the adapters into the base weights (``merge_and_unload``) and writes a
  plain model + tokenizer that ``from_pretrained`` loads without peft (``merge_checkpoint``).

Nothing here imports ``peft`` at module level: ``grpokit.config`` validates the section without it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from grpokit.config import (
    PEFT_DEFAULTS,  # noqa: F401  (re-exported: the defaults belong to the config)
    check_peft_section,
)
from grpokit.models.loading import load_model, load_weights, quiet_transformers

ADAPTER_CONFIG = "adapter_config.json"
def is_peft_model(model: Any) -> bool:
    """True for a ``peft.PeftModel`` (checked without importing peft when nothing imported it)."""
    import sys

    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def add_lora(model, section: dict[str, Any]):
    """``model`` wrapped in fresh LoRA adapters (B = 0, so the wrapped model computes exactly what ``model``
    did); base weights frozen. The adapter config records the base model's absolute path when it has one,
    so ``grpokit merge`` finds it from any working directory."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("the peft config section needs the peft package: pip install peft") from e

    section = check_peft_section(section)
    config = LoraConfig(task_type="CAUSAL_LM", r=section["r"], lora_alpha=section["alpha"],
                        lora_dropout=section["dropout"], target_modules=section["target_modules"],
                        modules_to_save=section["modules_to_save"])
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for the user
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            wrapped = get_peft_model(model, config)
    except ValueError as e:  # e.g. target_modules naming no module of this model
        raise ValueError(f"peft: cannot add LoRA adapters to {type(model).__name__}: {str(e).splitlines()[0]}") from e
    if hasattr(wrapped.get_output_embeddings(), "lora_A"):
        raise ValueError("peft: LoRA on the LM head is not supported: grpokit's log-probs read the head's weight "
                         "directly (grpokit.logprobs), which would leave the adapter out of the loss. Drop the head "
                         "from target_modules; modules_to_save: [lm_head] trains it in full")
    base = wrapped.peft_config["default"].base_model_name_or_path
    if base and Path(base).is_dir():
        wrapped.peft_config["default"].base_model_name_or_path = str(Path(base).resolve())
    return wrapped


def adapters_disabled(model, logps_of):
    """pi_ref's log-prob callable for a LoRA policy: ``logps_of`` (the policy's, e.g. ``completion_logps``
    bound to ``model``) run inside ``model.disable_adapter()``, i.e. by the frozen base weights."""

    def reference_logps(*args, **kwargs):
        with model.disable_adapter():
            return logps_of(*args, **kwargs)

    return reference_logps


def load_trained_weights(model, folder: Path) -> None:
    """Put a checkpoint's trained weights into ``model``: the adapters of a LoRA policy, else every weight
    (``grpokit.models.loading.load_weights``)."""
    if not is_peft_model(model):
        load_weights(model, folder)
        return
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    file = Path(folder) / "adapter_model.safetensors"
    if not file.is_file():
        raise ValueError(f"checkpoint {str(folder)!r} holds no LoRA adapters (adapter_model.safetensors); was it "
                         "written by a run without the peft section?")
    result = set_peft_model_state_dict(model, load_file(str(file)))
    expected = {k for k, p in model.named_parameters() if p.requires_grad}
    loaded = expected - {k for k in result.missing_keys if k in expected}
    if loaded != expected or result.unexpected_keys:
        raise ValueError(f"the adapters in {str(folder)!r} do not match the model's peft section: missing "
                         f"{sorted(expected - loaded)[:3]}, unexpected {list(result.unexpected_keys)[:3]}")


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(folder: str | Path) -> str | None:
    """The base model an adapter folder was trained on (``base_model_name_or_path``), or None."""
    return json.loads((Path(folder) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or None


def load_adapted_model(folder: str | Path, *, base: str | None = None, dtype=None, merge: bool = True):
    """The base model with the adapters of ``folder`` (a LoRA checkpoint) applied; merged into plain weights
    (``merge_and_unload``) unless ``merge=False``. ``base`` overrides the base model the adapters name."""
    from peft import PeftModel

    base = base or adapter_base(folder)
    if base is None:
        raise ValueError(f"{str(folder)!r} does not name its base model (it was trained from an in-memory model); "
                         "give the base model's path with --base")
    model = load_model(str(base), dtype or "auto")  # "auto": the dtype the base was saved in
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for the user
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = PeftModel.from_pretrained(model, str(folder))
    return model.merge_and_unload() if merge else model


def merge_checkpoint(checkpoint: str | Path, output: str | Path, *, base: str | None = None) -> Path:
    """``grpokit merge``: base + adapters of ``checkpoint`` merged, written with its tokenizer to ``output``
    (loadable by ``AutoModelForCausalLM.from_pretrained`` alone)."""
    from transformers import AutoTokenizer

    checkpoint, output = Path(checkpoint), Path(output)
    if not is_adapter_folder(checkpoint):
        raise ValueError(f"{str(checkpoint)!r} has no {ADAPTER_CONFIG}: not a LoRA checkpoint (a full-weight "
                         "checkpoint is already a plain model: load it with from_pretrained)")
    with quiet_transformers():
        merged = load_adapted_model(checkpoint, base=base)
        output.mkdir(parents=True, exist_ok=True)
        merged.save_pretrained(output)
    tokenizer_source = checkpoint if (checkpoint / "tokenizer_config.json").is_file() else base or adapter_base(
        checkpoint)
    AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(output)
    return output
