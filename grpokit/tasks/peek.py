"""A tool-use task a random-init tiny model learns on a CPU: the answer is a letter only a tool call reveals.

The environment (``PeekEnv``) holds a hidden letter, from the dataset row; its one tool, ``peek()``, returns
it. The model answers in one-token turns (``max_turn_length: 1``) on plain-string prompts, so tool calls use
the ``compact`` format, where a bare ``!`` calls the only tool. Two kinds of rows (``peek_task``):

* hidden: the prompt is ``?``; the only way to the letter is ``!``, after which the environment appends
  ``\\npeek: c`` and the model's next turn is its answer: ``?`` | ``!`` | ``\\npeek: c`` | ``c``;
* shown: the prompt already holds a past call and its result, ``?!\\npeek: c``; the answer needs no call.

The reward is 1 when the final answer (the last turn) is the letter (``correct``). A policy that never calls
the tool scores at most 1/6 on the hidden rows (a guess among six letters); to score 1 it must call ``peek``
on every hidden row. The shown rows teach the model to read a tool result, so that a call pays off before
calling is common; a random policy calls in about one turn in 18 (``CHARS``). ``peeked`` logs, through a reward
function with weight 0, how often the model calls the tool on each kind of row (``rewards/peeked_hidden``,
``rewards/peeked_shown``).

    python -m grpokit.tasks.peek docs/multi_turn_peek.png     trains it and plots reward and calls per step
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpokit.rollout.multi_turn import PLAIN_TOOL_MESSAGE

LETTERS = "abcdef"
CHARS = LETTERS + "!?: \n" + "pk"
"""The task's characters: the letters, the call and the rendering of its result (``peek: c``). A vocabulary of
the characters it uses keeps a random policy's first call likely enough (1 in 18 turns) for GRPO to find it."""


class PeekEnv:
    """One episode's hidden letter; ``peek`` is its tool."""

    def reset(self, letter: str, **row) -> None:
        self.letter = letter

    def peek(self) -> str:
        """Return the hidden letter."""
        return self.letter


def peek_task(letters: str = LETTERS, copies: int = 10) -> list[dict]:
    """Rows ``{"prompt", "letter", "hidden"}``: for each letter, ``copies`` hidden rows (prompt ``?``) and
    ``copies`` shown rows (the prompt ends with a call's result, rendered as the environment renders it)."""
    rows = []
    for c in letters:
        shown = "?!" + PLAIN_TOOL_MESSAGE.format(name="peek", content=c)
        rows += [{"prompt": "?", "letter": c, "hidden": True}] * copies
        rows += [{"prompt": shown, "letter": c, "hidden": False}] * copies
    return rows


def correct(completions, letter, **kwargs) -> list[float]:
    """1 when the final answer (the last turn's text) is the hidden letter, else 0."""
    return [float(c == x) for c, x in zip(completions, letter)]


def peeked_hidden(messages, hidden, **kwargs) -> list[float | None]:
    """On hidden rows, 1 when the episode called a tool (None on shown rows): a metric, at weight 0."""
    return [float(any(m["role"] == "tool" for m in ms)) if h else None for ms, h in zip(messages, hidden)]


def peeked_shown(messages, hidden, **kwargs) -> list[float | None]:
    """On shown rows, 1 when the episode called a tool (None on hidden rows): a metric, at weight 0."""
    return [None if h else float(any(m["role"] == "tool" for m in ms)) for ms, h in zip(messages, hidden)]


REWARD_FUNCS = [correct, peeked_hidden, peeked_shown]
REWARD_WEIGHTS = [1.0, 0.0, 0.0]


def peek_config(**overrides):
    """The task's ``GRPOConfig`` (``overrides`` replace fields)."""
    from grpokit.config import GRPOConfig

    fields = dict(output_dir="runs/peek", seed=0, max_steps=100, learning_rate=3e-3, lr_scheduler="constant",
                  prompts_per_step=8, num_generations=8, max_completion_length=16, max_turn_length=1,
                  max_tool_calling_iterations=1, reward_weights=REWARD_WEIGHTS, save_steps=0, logging_steps=50,
                  overwrite_output_dir=True)
    fields.update(overrides)
    return GRPOConfig(**fields)


def run_peek(**overrides) -> list[dict]:
    """Train the task on a random-init tiny model (``grpokit.tasks.demo``); returns the metrics rows."""
    from grpokit.tasks.demo import char_tokenizer, tiny_model
    from grpokit.training.trainer import GRPOTrainer

    config = peek_config(**overrides)
    tokenizer = char_tokenizer(CHARS)
    trainer = GRPOTrainer(tiny_model(tokenizer, seed=config.seed), REWARD_FUNCS, peek_task(), args=config,
                          tokenizer=tokenizer, environment_factory=PeekEnv)
    return trainer.train()


def plot_peek(history: list[dict], path: str | Path) -> Path:
    """Reward and tool calls per step (each a moving average over 10 steps) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(key):
        values = [row[key] for row in history]
        return [sum(values[max(0, i - 9):i + 1]) / len(values[max(0, i - 9):i + 1]) for i in range(len(values))]

    steps = [row["step"] for row in history]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(steps, smooth("rewards/correct"), label="reward (final answer = hidden letter)")
    ax.plot(steps, smooth("rewards/peeked_hidden"), label="calls peek, letter hidden")
    ax.plot(steps, smooth("rewards/peeked_shown"), label="calls peek, letter shown", linestyle="--")
    ax.set_xlabel("optimizer step")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("tiny random-init model learns to call a tool")
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    output = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs/peek/peek.png")
    rows = run_peek()
    print(f"reward {rows[0]['rewards/correct']:.2f} -> {rows[-1]['rewards/correct']:.2f}; plot: "
          f"{plot_peek(rows, output)}")
