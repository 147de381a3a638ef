"""The ``grpokit`` command line: ``train``, ``verify``, ``eval``, ``plot``, ``merge``, ``docs``."""

from grpokit.cli.main import console, main

__all__ = ["console", "main"]
