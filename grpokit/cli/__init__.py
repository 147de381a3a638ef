"""The ``grpokit`` command line: ``train``, ``verify``, ``eval``, ``plot``, ``merge``, ``docs``."""

from grpokit.cli.main import main

__all__ = ["main"]
