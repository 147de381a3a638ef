"""Prompts in: loading a dataset, turning its ``prompt`` column into token ids, and the order prompts come in.

A dataset row is ``{"prompt": str | list[message], **columns}``. String prompts are tokenized as they are;
chat prompts (a list of ``{"role", "content"}`` messages) are rendered with the tokenizer's chat template and
``add_generation_prompt=True``. Every other column is handed to the reward functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def load_prompts(source: Any):
    """A ``datasets.Dataset`` from a Dataset, a list of dicts, or a path (.jsonl, .json, .parquet, .csv, or a
    folder written by ``Dataset.save_to_disk``). Checks that there is a ``prompt`` column and a row."""
    import datasets

    if isinstance(source, datasets.DatasetDict):
        if "train" not in source:
            raise ValueError(f"the DatasetDict has no 'train' split (splits: {', '.join(source)})")
        source = source["train"]
    if isinstance(source, datasets.Dataset):
        dataset = source
    elif isinstance(source, (list, tuple)):
        if not all(isinstance(row, dict) for row in source):
            raise ValueError("train_dataset as a list must hold dicts with a 'prompt' key")
        dataset = datasets.Dataset.from_list(list(source))
    elif isinstance(source, (str, Path)):
        dataset = _load_path(Path(source))
    else:
        raise ValueError(f"train_dataset must be a datasets.Dataset, a list of dicts or a path; "
                         f"got {type(source).__name__}")
    if "prompt" not in dataset.column_names:
        raise ValueError(f"the dataset has no 'prompt' column (columns: {', '.join(dataset.column_names) or 'none'})")
    if len(dataset) == 0:
        raise ValueError("the dataset has no rows")
    return dataset


def _load_path(path: Path):
    import datasets

    if not path.exists():
        raise ValueError(f"dataset path {str(path)!r} does not exist")
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise ValueError(f"dataset folder {str(path)!r} was not written by save_to_disk: {e}") from None
        return loaded["train"] if isinstance(loaded, datasets.DatasetDict) and "train" in loaded else loaded
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return datasets.Dataset.from_json(str(path))
    if suffix == ".parquet":
        return datasets.Dataset.from_parquet(str(path))
    if suffix == ".csv":
        return datasets.Dataset.from_csv(str(path))
    raise ValueError(f"dataset file {str(path)!r}: unsupported format {suffix!r} (use {', '.join(DATA_SUFFIXES)}, "
                     "or a save_to_disk folder)")


def is_chat(prompt: Any) -> bool:
    """True for a list of ``{"role", "content"}`` messages."""
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt)


def encode_prompt(tokenizer, prompt: Any, max_length: int | None = None) -> list[int]:
    """Token ids of one prompt: a chat is rendered by the chat template (``add_generation_prompt=True``), a
    string is tokenized with the tokenizer's special tokens (as TRL). Longer than ``max_length``: the last
    ``max_length`` tokens are kept (the end of a prompt is what the completion continues)."""
    if is_chat(prompt):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the prompts are chat messages but the tokenizer has no chat_template")
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    elif isinstance(prompt, str):
        ids = tokenizer(prompt)["input_ids"]
    else:
        raise ValueError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    if not ids:
        raise ValueError(f"prompt {prompt!r} encodes to no tokens")
    return ids[-max_length:] if max_length is not None else ids


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists: -> ids (B, P), mask (B, P) with 1 on real tokens."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


@dataclass
class PromptOrder:
    """Which dataset rows each rollout uses: a seeded permutation, epoch after epoch, consumed in order.

    The whole state is ``(epoch, position)``; the permutation of an epoch is a pure function of
    ``(seed, epoch)``, so a checkpoint stores two integers and a resumed run draws the same rows.
    """

    num_rows: int
    seed: int
    epoch: int = 0
    position: int = 0

    def permutation(self, epoch: int) -> list[int]:
        """The row order of one epoch, a pure function of (seed, epoch)."""
        cached = getattr(self, "_cache", None)
        if cached is None or cached[0] != (self.seed, epoch):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = ((self.seed, epoch), torch.randperm(self.num_rows, generator=generator).tolist())
        return self._cache[1]

    def take(self, count: int) -> list[int]:
        """The next ``count`` row indices; crosses into the next epoch (a new permutation) when needed."""
        rows: list[int] = []
        while len(rows) < count:
            chunk = self.permutation(self.epoch)[self.position:self.position + count - len(rows)]
            rows.extend(chunk)
            self.position += len(chunk)
            if self.position >= self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
        return rows

    def state_dict(self) -> dict[str, int]:
        return {"num_rows": self.num_rows, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_rows"] != self.num_rows:
            raise ValueError(f"the checkpoint was trained on {state['num_rows']} prompts, this dataset has "
                             f"{self.num_rows}")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
