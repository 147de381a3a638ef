"""Prompts in: loading a dataset, turning its ``prompt`` column into token ids, and the order prompts come in.

A dataset row is ``{"prompt": str | list[message], **columns}``. String prompts are tokenized as they are;
chat prompts (a list of ``{"role", "content"}`` messages) are rendered with the tokenizer's chat template and
``add_generation_prompt=True``. Every other column is handed to the reward functions.
"""

from __future__ import annotations

import json
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
    name = f"dataset {str(source)!r}" if isinstance(source, (str, Path)) else "the dataset"
    if len(dataset) == 0:
        raise ValueError(f"{name} has no rows")
    if "prompt" not in dataset.column_names:
        raise ValueError(f"{name} has no 'prompt' column (columns: {', '.join(dataset.column_names) or 'none'})")
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
    if suffix not in DATA_SUFFIXES:
        raise ValueError(f"dataset file {str(path)!r}: unsupported format {suffix!r} (use "
                         f"{', '.join(DATA_SUFFIXES)}, or a save_to_disk folder)")
    try:
        if suffix in (".jsonl", ".json"):
            return rows_to_dataset(read_json_rows(path), path)
        return _load_table(path)
    except OSError as e:
        raise ValueError(f"cannot read dataset file {str(path)!r}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"dataset file {str(path)!r} is not UTF-8 text: {e.reason} at byte {e.start}") from e


def _load_table(path: Path):
    """A .parquet or .csv file through ``datasets``; its errors (empty file, bad bytes) name the file."""
    import datasets

    try:
        if path.suffix.lower() == ".parquet":
            return datasets.Dataset.from_parquet(str(path))
        return datasets.Dataset.from_csv(str(path))
    except OSError:
        raise
    except Exception as e:
        if "corresponds to no data" in str(e):  # datasets' words for an empty file
            return datasets.Dataset.from_dict({})
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"cannot read dataset file {str(path)!r}: {type(e).__name__}: {first}") from e


def read_json_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file (one object per line; blank lines skipped) or of a ``.json`` file holding one
    array of objects. A line that does not parse, or is not an object, is an error naming file and line."""
    text = path.read_text(encoding="utf-8", errors="strict")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"dataset file {str(path)!r}, line {e.lineno}: not valid JSON ({e.msg})") from None
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ValueError(f"dataset file {str(path)!r}: item {i} is a {type(row).__name__}, not an object")
        return rows
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"dataset file {str(path)!r}, line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"dataset file {str(path)!r}, line {number}: expected a JSON object, got "
                             f"{type(row).__name__}")
        rows.append(row)
    return rows


def rows_to_dataset(rows: list[dict[str, Any]], path: Path):
    """A ``datasets.Dataset`` of these rows; columns are the union of the rows' keys (missing -> None)."""
    import datasets

    columns = list(dict.fromkeys(key for row in rows for key in row))
    try:
        return datasets.Dataset.from_dict({c: [row.get(c) for row in rows] for c in columns})
    except Exception as e:  # pyarrow: a column whose rows mix types
        raise ValueError(f"dataset file {str(path)!r}: the rows do not form a table "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


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
