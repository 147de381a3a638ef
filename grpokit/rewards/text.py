"""The text of a completion, whatever its shape: the one helper every reward module shares."""

from __future__ import annotations


def completion_text(completion) -> str:
    """The text of a completion in either of TRL's two shapes."""
    if isinstance(completion, list):
        return "".join(m.get("content") or "" for m in completion if isinstance(m, dict))
    return str(completion)
