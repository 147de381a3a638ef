"""The result as people share it: ``output_dir/final/``, its model card, and the push to the Hugging Face Hub.

``final/`` holds what ``from_pretrained`` loads (the full model, or the LoRA adapters for
``peft.AutoPeftModelForCausalLM``), the tokenizer with its chat template, ``metrics.png`` and ``README.md``: a
model card (``huggingface_hub.ModelCard``) naming the base model, the dataset and the reward functions, with the
run's results, its reward curve and its config. The model files are those of the run's last checkpoint, linked
(or copied) from it, so that every way of training (one process, DDP, FSDP) saves the same files; the folder is
assembled aside and renamed into place, so ``final/`` is always complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from grpokit.training.checkpoint import STATE_FILE

TRAINING_STATE = {"optimizer.pt", "scheduler.pt", "rng.pt", "rollout.pt", STATE_FILE}
"""Files of a checkpoint that only a resumed run reads: left out of ``final/``."""
CARD_FILE = "README.md"
PLOT_FILE = "metrics.png"


def run_description(config: dict[str, Any], *, model: str | None, dataset: str | None,
                    reward_funcs: list[str]) -> dict[str, Any]:
    """The run as the trackers and the model card record it: the ``GRPOConfig`` fields plus ``model``,
    ``dataset`` and ``reward_funcs`` (names)."""
    return {"model": model, "dataset": dataset, "reward_funcs": list(reward_funcs), **config}


def model_name(model) -> str | None:
    """What a model was loaded from: the path or hub id given, else its config's ``_name_or_path``."""
    if isinstance(model, (str, Path)):
        return str(model)
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    return str(name) if name else None


def dataset_name(dataset) -> str | None:
    """A dataset given by path or name (``None`` for one given as an object)."""
    return str(dataset) if isinstance(dataset, (str, Path)) else None


def model_card(run: dict[str, Any], history: list[dict[str, Any]], *, adapters: bool, location: str,
               repo_id: str | None = None, has_plot: bool = True) -> str:
    """The text of ``final/README.md``: YAML metadata (``ModelCardData``: base model when it is a hub id,
    dataset, library, tags) and a body with the base model, dataset, reward functions, the first and last
    metrics, the reward curve ``metrics.png``, how to load it (from ``location``: the Hub repository ``repo_id``
    or the folder) and the config (``run``: ``run_description``)."""
    from huggingface_hub import ModelCard, ModelCardData

    base, dataset = run.get("model"), run.get("dataset")
    hub_id = lambda name: isinstance(name, str) and not Path(name).exists() and not name.startswith((".", "/"))
    data = ModelCardData(
        base_model=base if hub_id(base) else None, datasets=[dataset] if hub_id(dataset) else None,
        library_name="peft" if adapters else "transformers", pipeline_tag="text-generation",
        tags=["grpokit", "grpo", "reinforcement-learning"] + (["lora"] if adapters else []),
    )
    name = repo_id or location
    lines = [f"# {repo_id.split('/')[-1] if repo_id else 'GRPO fine-tune'}", "",
             f"{'LoRA adapters' if adapters else 'A fine-tune'} of `{base or 'a causal LM'}`, trained with GRPO "
             "(Group Relative Policy Optimization, [DeepSeekMath](https://arxiv.org/abs/2402.03300)) by grpokit.",
             "", "| | |", "|---|---|", f"| base model | `{base or 'n/a'}` |",
             f"| dataset | `{dataset or 'n/a'}`" + (f" (split `{run['dataset_split']}`)" if run.get("dataset_split")
                                                   and dataset else "") + " |",
             f"| reward functions | {', '.join(f'`{f}`' for f in run.get('reward_funcs') or []) or 'n/a'} |",
             f"| optimizer steps | {history[-1]['step'] if history else 0} |", ""]
    lines += _results(history)
    if has_plot:
        lines += ["## Training curves", "", f"![reward, KL, entropy, completion length and clip ratio]({PLOT_FILE})",
                  ""]
    loader = ("from peft import AutoPeftModelForCausalLM\n"
              f"model = AutoPeftModelForCausalLM.from_pretrained(\"{name}\")") if adapters else (
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained(\"{name}\")")
    lines += ["## Use", "", "```python", loader, "from transformers import AutoTokenizer",
              f"tokenizer = AutoTokenizer.from_pretrained(\"{name}\")", "```", "",
              "## Config", "", "```yaml", yaml.safe_dump(run, sort_keys=False).rstrip(), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)).content


def _results(history: list[dict[str, Any]]) -> list[str]:
    """First and last value of the reward and of each ``eval/*`` metric."""
    keys = ["reward"] + sorted({k for row in history for k in row if k.startswith("eval/")})
    rows = []
    for key in keys:
        logged = [(row["step"], row[key]) for row in history if row.get(key) is not None]
        if logged:
            (s0, v0), (s1, v1) = logged[0], logged[-1]
            rows.append(f"| {key} | {v0:.4g} (step {s0}) | {v1:.4g} (step {s1}) |")
    if not rows:
        return []
    return ["## Results", "", "| metric | first | last |", "|---|---|---|", *rows, ""]


def write_final(folder: str | Path, checkpoint: str | Path, card: str, plot: str | Path | None = None) -> Path:
    """``folder`` (``output_dir/final``): the model and tokenizer files of ``checkpoint`` (hard links where the
    file system allows, else copies; training state, ``ref_model/`` and per-rank files left out), ``card`` as
    ``README.md`` and ``plot`` as ``metrics.png``. Built aside, then renamed into place."""
    folder, checkpoint = Path(folder), Path(checkpoint)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for path in sorted(checkpoint.iterdir()):
        if path.is_file() and path.name not in TRAINING_STATE:
            _link_or_copy(path, tmp / path.name)
    if plot is not None and Path(plot).is_file():
        shutil.copy2(plot, tmp / PLOT_FILE)
    (tmp / CARD_FILE).write_text(card)
    if folder.exists():  # the folder of an earlier run (or save) goes only once the new one is complete
        old = folder.with_name(f".old-{folder.name}-{os.getpid()}")
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    return folder


def push_to_hub(folder: str | Path, repo_id: str, *, commit_message: str = "grpokit: GRPO fine-tune") -> str:
    """Upload ``folder`` to the model repository ``repo_id`` (created if missing), as TRL's ``push_to_hub``
    does; returns the repository's URL. Needs a Hugging Face login (``hf auth login`` or ``HF_TOKEN``)."""
    from huggingface_hub import create_repo, upload_folder

    url = create_repo(repo_id, repo_type="model", exist_ok=True)
    upload_folder(repo_id=url.repo_id, folder_path=str(folder), commit_message=commit_message)
    return str(url)


def _link_or_copy(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)
