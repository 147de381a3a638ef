"""Loading models and tokenizers: from a path or hub id, to a dtype and a device, with friendly errors.

Also the helpers every layer above needs to handle a model it was given: ``base_model`` (the Hugging Face
model inside a peft wrapper), ``load_weights`` (safetensors into a module, in place), ``quiet_transformers``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from grpokit.models.preflight import check_model_source


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``dtype`` config value (``grpokit.config.DTYPES``): ``"bfloat16"`` -> ``torch.bfloat16``."""
    return getattr(torch, name)


def resolve_device(device: str):
    """``"auto"``: CUDA when present, else CPU; any other value is taken as given (``cpu``, ``cuda:1``)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device here; use device: auto or cpu")
    return resolved


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a peft wrapper (LoRA layers stay in place), or ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def load_policy(model, tokenizer, dtype: torch.dtype, device: str = "auto"):
    """(model, tokenizer) from a path/hub id or a module; the pad token defaults to EOS. A loaded model goes to
    ``device`` (``auto``: CUDA when present); a module passed in moves only when ``device`` is not ``auto``."""
    from transformers import AutoTokenizer

    if isinstance(model, (str, Path)):
        source = str(model)
        model = load_model(source, dtype).to(resolve_device(device))
        if tokenizer is None:
            tokenizer = source
    elif not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a path, a hub id or an nn.Module, got {type(model).__name__}")
    elif tokenizer is None:
        raise ValueError("a model given as an nn.Module needs tokenizer=")
    else:
        model.to(dtype)
        if device != "auto":
            model.to(resolve_device(device))
    if isinstance(tokenizer, (str, Path)):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load tokenizer {str(tokenizer)!r}: {str(e).splitlines()[0]}") from e
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_model(source: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    check_model_source(source)  # a mistyped local path: fail now, not after Hub retries
    try:
        with quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load model {source!r}: {str(e).splitlines()[0]}") from e


def eos_token_ids(model, tokenizer) -> list[int]:
    """Tokens that end a completion: the tokenizer's EOS plus the model's generation_config EOS ids (as TRL)."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in [extra] if isinstance(extra, int) else (extra or []):
        if i not in ids:
            ids.append(i)
    return ids


@contextlib.contextmanager
def quiet_transformers():
    """No transformers progress bars ("Loading weights", "Writing model shards") while inside."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def save_model(model: torch.nn.Module, folder: Path) -> None:
    """``save_pretrained`` (safetensors) for Hugging Face models; a ``model.safetensors`` otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder)
    else:
        from safetensors.torch import save_model as save_safetensors

        save_safetensors(model, str(folder / "model.safetensors"))


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Load the safetensors weights of ``folder`` (sharded or not) into ``model`` in place.

    Keys that ``save_pretrained`` leaves out because they are tied to a saved tensor (e.g. ``lm_head.weight``
    tied to the embeddings) are fine; any other missing or unexpected key is an error."""
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {str(folder)!r}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    loaded = {params[k].data_ptr() for k in state if k in params}
    untied = [k for k in missing if k not in params or params[k].data_ptr() not in loaded]
    if untied or unexpected:
        raise ValueError(f"checkpoint {str(folder)!r} does not match the model: missing {untied[:5]}, "
                         f"unexpected {list(unexpected)[:5]}")


