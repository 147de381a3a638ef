"""The ``system_prompt`` option: one instruction prepended to every prompt of a dataset.

* chat prompts (lists of messages): a ``{"role": "system", "content": system_prompt}`` message goes first,
  unless the row already starts with a system message (the row's own wins: many chat templates accept only
  one, at the start);
* string prompts (raw text for base models, which have no roles): the text goes first, then a blank line.

The reward functions receive the prompts as the model saw them, system message included.
"""

from __future__ import annotations

from typing import Any

from grpokit.training.data import is_chat


def add_system_prompt(prompt: Any, system_prompt: str | None) -> Any:
    """One prompt with ``system_prompt`` prepended (see the module docstring); ``None`` changes nothing."""
    if system_prompt is None:
        return prompt
    if is_chat(prompt):
        if prompt and prompt[0].get("role") == "system":
            return prompt
        return [{"role": "system", "content": system_prompt}, *prompt]
    if isinstance(prompt, str):
        return f"{system_prompt}\n\n{prompt}"
    return prompt  # not a prompt at all: encode_prompt says so


def with_system_prompt(dataset, system_prompt: str | None):
    """The ``datasets.Dataset`` with ``system_prompt`` prepended to its ``prompt`` column (in memory)."""
    if system_prompt is None:
        return dataset
    from datasets.utils import logging as ds_logging

    shown = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()  # no "Map:" bar for an instant edit
    try:
        return dataset.map(lambda row: {"prompt": add_system_prompt(row["prompt"], system_prompt)},
                           keep_in_memory=True)
    finally:
        if shown:
            ds_logging.enable_progress_bar()
