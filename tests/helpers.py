"""Small builders shared by the tests."""

from pathlib import Path

from grpokit.tasks.demo import CHARS, char_tokenizer, tiny_model


def save_tiny_model(folder: str | Path, chars: str = CHARS, hidden_size: int = 32) -> Path:
    """A random-init tiny Llama and its character tokenizer saved to ``folder``, as a pretrained model is."""
    tokenizer = char_tokenizer(chars)
    tiny_model(tokenizer, hidden_size=hidden_size).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
