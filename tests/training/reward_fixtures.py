"""Reward functions for the training tests that run them in worker processes (``reward_timeout_s``): a module
of their own, light to import, since each worker process imports it."""

import time


def sleeps_on_hang_rows(prompts, completions, fate, **kwargs):
    """Sleeps forever on the completions of dataset rows whose ``fate`` is "hang"."""
    if "hang" in fate:
        time.sleep(10_000)
    return [len(c) / 5 for c in completions]


def raises_on_raise_rows(prompts, completions, fate, **kwargs):
    """Raises on the completions of dataset rows whose ``fate`` is "raise"."""
    return [1 / 0 if f == "raise" else c.count("a") / 5 for c, f in zip(completions, fate)]
