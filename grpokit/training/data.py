"""Prompts in: loading a dataset, turning its ``prompt`` column into token ids, and the order prompts come in.

A dataset row is ``{"prompt": str | list[message], **columns}``. String prompts are tokenized as they are;
chat prompts (a list of ``{"role", "content"}`` messages) are rendered with the tokenizer's chat template and
``add_generation_prompt=True``. Every other column is handed to the reward functions.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpokit.util import closest

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def load_prompts(source: Any, *, name: str | None = None, split: str = "train", what: str = "the dataset"):
    """A ``datasets.Dataset`` of prompts. ``source``: a ``Dataset``, a ``DatasetDict`` (its ``split``), a list of
    dicts, or a string: a data file (.jsonl, .json, .parquet, .csv), a folder written by ``save_to_disk``, a
    folder of data files (``datasets.load_dataset(folder)``, e.g. ``train.jsonl`` + ``test.jsonl``, or
    ``data/train-*.parquet``), or a dataset name on the Hugging Face Hub (``datasets.load_dataset(source,
    name, split=split)``). ``split`` picks the split of a folder, a name or a ``DatasetDict``; a single file
    is one split. Checks that there is a ``prompt`` column and a row; ``what`` names the dataset in errors
    (``train_dataset``, ``eval_dataset``)."""
    import datasets

    label = f"dataset {str(source)!r}" if isinstance(source, (str, Path)) else what
    if isinstance(source, datasets.DatasetDict):
        dataset = pick_split(source, split, label)
    elif isinstance(source, datasets.Dataset):
        dataset = source
    elif isinstance(source, (list, tuple)):
        if not all(isinstance(row, dict) for row in source):
            raise ValueError(f"{what} as a list must hold dicts with a 'prompt' key")
        dataset = datasets.Dataset.from_list(list(source))
    elif isinstance(source, (str, Path)):
        dataset = _load_source(str(source), name, split)
    else:
        raise ValueError(f"{what} must be a datasets.Dataset, a DatasetDict, a list of dicts, a path or a dataset "
                         f"name; got {type(source).__name__}")
    if len(dataset) == 0:
        raise ValueError(f"{label} has no rows")
    if "prompt" not in dataset.column_names:
        raise ValueError(f"{label} has no 'prompt' column (columns: {', '.join(dataset.column_names) or 'none'})")
    return dataset


def eval_prompts(eval_dataset: Any, train_dataset: Any, *, eval_split: str | None, dataset_config: str | None):
    """The evaluation prompts: ``eval_dataset`` (its ``eval_split``, default ``train``), or, without one, split
    ``eval_split`` of the training dataset (given as a path, a dataset name or a ``DatasetDict``); ``None``
    when neither is given. ``dataset_config`` applies to the training dataset's name."""
    import datasets

    if eval_dataset is None and eval_split is None:
        return None
    if eval_dataset is None:
        if not isinstance(train_dataset, (str, Path, datasets.DatasetDict)):
            raise ValueError(f"eval_split {eval_split!r} without eval_dataset takes that split of the training "
                             "dataset, which then must be a path, a dataset name or a DatasetDict; give eval_dataset")
        eval_dataset = train_dataset
    same = isinstance(eval_dataset, (str, Path)) and str(eval_dataset) == str(train_dataset)
    return load_prompts(eval_dataset, name=dataset_config if same else None, split=eval_split or "train",
                        what="eval_dataset")


def pick_split(splits, split: str, label: str):
    """Split ``split`` of a ``DatasetDict``; a missing one is an error naming the dataset and its splits."""
    if split not in splits:
        raise ValueError(f"{label} has no split {split!r} (splits: {', '.join(splits) or 'none'})")
    return splits[split]


def _load_source(source: str, name: str | None, split: str):
    """A path or a Hub name: a data file, a ``save_to_disk`` folder, a folder of data files, a dataset name."""
    path = Path(source)
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():  # written by save_to_disk
            return _load_path(path, split)
        return load_by_name(source, name, split)  # a folder of data files
    if path.exists() or path.suffix.lower() in DATA_SUFFIXES or source.startswith((".", "/", "~")):
        return _load_path(path, split)  # a data file, or a path that does not exist
    return load_by_name(source, name, split)


def load_by_name(source: str, name: str | None, split: str):
    """``datasets.load_dataset(source, name, split=split)``: a folder of data files or a Hub dataset. Its
    errors (no such dataset, no such split) become one line naming the dataset, config and split."""
    import datasets

    where = f"dataset {source!r}" + (f" (config {name!r})" if name else "")
    hint = (" (a dataset folder holds .jsonl, .json, .parquet or .csv files, or was written by save_to_disk)"
            if Path(source).is_dir() else "")
    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()  # a failed load would otherwise print bars around the error
    try:
        return datasets.load_dataset(source, name, split=split)
    except ValueError as e:
        if "Unknown split" in str(e):
            raise ValueError(f"{where} has no split {split!r}: {_first_line(e)}") from e
        raise ValueError(f"cannot load {where}, split {split!r}: {_first_line(e)}{hint}") from e
    except Exception as e:  # datasets' DatasetNotFoundError, a network error, a bad data file
        raise ValueError(f"cannot load {where}, split {split!r}: {type(e).__name__}: {_first_line(e)}{hint}") from e
    finally:
        if bars:
            datasets.utils.logging.enable_progress_bar()


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load_path(path: Path, split: str = "train"):
    import datasets

    if not path.exists():
        raise ValueError(f"dataset path {str(path)!r} does not exist")
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise ValueError(f"dataset folder {str(path)!r} was not written by save_to_disk: {e}") from None
        return pick_split(loaded, split, f"dataset {str(path)!r}") if isinstance(loaded, datasets.DatasetDict) \
            else loaded
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise ValueError(f"dataset file {str(path)!r}: unsupported format {suffix!r} (use "
                         f"{', '.join(DATA_SUFFIXES)}, a save_to_disk folder or a folder of data files)")
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


def encode_prompt(tokenizer, prompt: Any, max_length: int | None = None, *, truncation: str = "left",
                  row: int | None = None) -> list[int]:
    """Token ids of one prompt: a chat is rendered by the chat template (``add_generation_prompt=True``), a
    string is tokenized with the tokenizer's special tokens (as TRL). Longer than ``max_length``: with
    ``truncation="left"`` the last ``max_length`` tokens are kept (the end of a prompt is what the completion
    continues), with ``"error"`` a ValueError names the dataset ``row``."""
    where = f"dataset row {row}: " if row is not None else ""
    if is_chat(prompt):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the prompts are chat messages but the tokenizer has no chat_template")
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    elif isinstance(prompt, str):
        ids = tokenizer(prompt)["input_ids"]
    else:
        raise ValueError(f"{where}a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    if not ids:
        raise ValueError(f"{where}prompt {prompt!r} encodes to no tokens")
    if max_length is None or len(ids) <= max_length:
        return ids
    if truncation == "error":
        raise ValueError(f"{where}the prompt has {len(ids)} tokens, more than max_prompt_length={max_length} "
                         "(prompt_truncation: error); shorten it, raise max_prompt_length, or set "
                         "prompt_truncation: left to keep its last tokens")
    return ids[-max_length:]


class PromptLimit:
    """``max_prompt_length`` for the trainer: encodes a row's prompt once, and counts the prompts cut to their
    last tokens (``prompt_truncation: left``), warning on the first. ``summary()`` is the count, for the end."""

    def __init__(self, tokenizer, max_length: int | None, truncation: str = "left"):
        self.tokenizer, self.max_length, self.truncation = tokenizer, max_length, truncation
        self.truncated: list[int] = []  # dataset rows whose prompt was cut
        self.encoded = 0

    def __call__(self, row: int, prompt: Any) -> list[int]:
        ids = encode_prompt(self.tokenizer, prompt, None, row=row)
        self.encoded += 1
        if self.max_length is None or len(ids) <= self.max_length:
            return ids
        if self.truncation == "error":
            encode_prompt(self.tokenizer, prompt, self.max_length, truncation="error", row=row)  # raises
        ids = ids[-self.max_length:]
        if not self.truncated:
            print(f"grpokit: warning: dataset row {row}: the prompt has more than max_prompt_length="
                  f"{self.max_length} tokens; it keeps its last {self.max_length} (prompt_truncation: left; "
                  "'error' refuses such prompts). Later ones are counted, not shown", file=sys.stderr, flush=True)
        self.truncated.append(row)
        return ids

    def summary(self) -> str | None:
        """One line on the prompts that were cut, or None when none was."""
        if not self.truncated:
            return None
        return (f"grpokit: {len(self.truncated)} of the {self.encoded} prompts used were longer than "
                f"max_prompt_length={self.max_length} and kept their last tokens (first: dataset row "
                f"{self.truncated[0]})")


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
"""Message roles the chat templates of the Hugging Face hub use; any other is refused as a typo."""


def prompt_problem(prompt: Any) -> str | None:
    """Why a ``prompt`` cell cannot be a prompt (None when it can): missing, empty, a message without a role
    or content, a role no chat template knows."""
    if prompt is None:
        return "it has no prompt (a string or a list of chat messages)"
    if isinstance(prompt, str):
        return "the prompt is empty" if not prompt.strip() else None
    if not isinstance(prompt, (list, tuple)):
        return f"the prompt is a {type(prompt).__name__}; expected a string or a list of chat messages"
    if not prompt:
        return "the prompt is an empty list of messages"
    for i, message in enumerate(prompt):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"message {i} is not a {{'role': ..., 'content': ...}} mapping: {message!r}"[:200]
        role, content = message["role"], message.get("content")
        if role not in CHAT_ROLES:
            hint = closest(role, CHAT_ROLES)
            return (f"message {i} has role {role!r}" + (f" (did you mean {hint!r}?)" if hint else "")
                    + f"; chat roles are {', '.join(CHAT_ROLES)}")
        if not isinstance(content, (str, list)) and not (content is None and message.get("tool_calls")):
            return f"message {i} ({role}) has no 'content' string"
    if all(isinstance(m.get("content"), str) and not m["content"].strip() for m in prompt):
        return "every message of the prompt is empty"
    return None


def check_prompt_rows(dataset):
    """The dataset itself, once every ``prompt`` cell is a prompt (``prompt_problem``); otherwise a ValueError
    naming the first bad row and what is wrong with it."""
    for row, prompt in enumerate(dataset["prompt"]):
        problem = prompt_problem(prompt)
        if problem is not None:
            raise ValueError(f"dataset row {row}: {problem}")
    return dataset


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
