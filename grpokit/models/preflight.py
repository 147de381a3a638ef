"""Cheap checks on a run's inputs, made before anything slow (loading a model, reaching the Hub).

A model spec is either a local folder or a Hub id (``name`` or ``org/name``). ``transformers`` treats any
string that is not an existing folder as a Hub id, so a mistyped local path costs a network round trip with
retries (tens of seconds offline) and ends in a message about repo ids. Here a spec that can only be a path
(absolute, ``./``, ``~``, more than one ``/``, or under an existing local folder) must exist.
"""

from __future__ import annotations

from pathlib import Path


def looks_like_local_path(spec: str) -> bool:
    """True when ``spec`` cannot be a Hub id (``name`` / ``org/name``) and so must be a local path."""
    if spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1 or spec.endswith("/"):
        return True
    return "/" in spec and Path(spec.split("/")[0]).expanduser().is_dir()


def check_model_source(spec: str, what: str = "model") -> None:
    """ValueError naming ``spec`` when it is a local path that does not exist or is not a folder."""
    if not isinstance(spec, str) or not looks_like_local_path(spec):
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise ValueError(f"cannot load {what} {spec!r}: no such folder")
    if not path.is_dir():
        raise ValueError(f"cannot load {what} {spec!r}: it is a file; give the folder written by save_pretrained")
