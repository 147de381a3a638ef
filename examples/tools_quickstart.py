"""TRL's tool-calling GRPO example (agent training), ported to grpokit.

TRL's version (``GRPOTrainer(tools=...)``, huggingface/trl#4300)::

    from datasets import Dataset
    from trl import GRPOTrainer

    def multiply(a: int, b: int) -> int:
        '''
        Multiplies two integers.

        Args:
            a: The first integer.
            b: The second integer.

        Returns:
            The product of the two integers.
        '''
        return a * b

    dataset = Dataset.from_list([
        {"prompt": [{"role": "user", "content": "What is 3 multiplied by 4?"}], "answer": 12},
        ...
    ])

    def accuracy(completions, answer, **kwargs):
        return [1.0 if str(ans) in completion[-1]["content"] else 0.0 for completion, ans in zip(completions, answer)]

    trainer = GRPOTrainer(model="Qwen/Qwen3-0.6B", train_dataset=dataset, tools=[multiply], reward_funcs=accuracy)
    trainer.train()

grpokit takes the same arguments: ``tools=[multiply]``, and reward functions whose ``completions`` of chat prompts
are the transcript's messages (``completion[-1]["content"]`` is the model's last turn). Qwen3 writes its calls
as ``<tool_call>{...}</tool_call>``, which ``tool_call_parser: auto`` reads for chat prompts (``hermes``).

Offline there is no Hub: the same script runs a random-init tiny model (``grpokit.tasks.demo``) on the questions
as plain-string prompts, where ``auto`` reads ``compact`` calls (``!multiply 3 4``, or ``!m 3 4``). A random
model does not learn multiplication in a few steps; this shows the wiring and the ``tools/*`` metrics. For a
task a tiny model does learn through a tool, see ``grpokit.tasks.peek`` (docs/multi_turn.md).

    python examples/tools_quickstart.py            offline, tiny local model (--max_steps 3 runs in seconds)
    python examples/tools_quickstart.py --hub      TRL's model, Qwen/Qwen3-0.6B (needs the Hugging Face Hub)
"""

import argparse

from grpokit import GRPOConfig, GRPOTrainer

QUESTIONS = [("What is 3 multiplied by 4?", 12), ("Calculate 7 times 8.", 56), ("Find the product of 5 and 6.", 30),
             ("What do you get when you multiply 9 by 9?", 81), ("Compute 12 multiplied by 11.", 132),
             ("What is 15 times 14?", 210)]


def multiply(a: int, b: int) -> int:
    """
    Multiplies two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        The product of the two integers.
    """
    return a * b


def accuracy(completions, answer, **kwargs):
    """TRL's reward: 1 when the answer is in the model's last turn (chat prompts: ``completion[-1]["content"]``;
    plain-string prompts: the completion is that text)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if str(ans) in text else 0.0 for text, ans in zip(texts, answer)]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hub", action="store_true", help="TRL's Qwen/Qwen3-0.6B and chat prompts")
    parser.add_argument("--max_steps", "--max-steps", type=int, default=None)
    parser.add_argument("--output_dir", default="runs/tools_quickstart")
    args = parser.parse_args(argv)

    if args.hub:  # TRL's example, line for line (with TRL's loss and learning rate)
        dataset = [{"prompt": [{"role": "user", "content": q}], "answer": a} for q, a in QUESTIONS]
        config = GRPOConfig(output_dir=args.output_dir, max_steps=args.max_steps or 500, loss_type="dapo",
                            learning_rate=1e-6, prompts_per_step=1, num_generations=8, max_completion_length=512,
                            dtype="bfloat16", overwrite_output_dir=True)
        trainer = GRPOTrainer(model="Qwen/Qwen3-0.6B", train_dataset=dataset, tools=[multiply],
                              reward_funcs=accuracy, args=config)
        return trainer.train()

    from grpokit.tasks.demo import char_tokenizer, tiny_model

    tokenizer = char_tokenizer()
    dataset = [{"prompt": q.lower() + "\n", "answer": a} for q, a in QUESTIONS]
    config = GRPOConfig(output_dir=args.output_dir, max_steps=args.max_steps or 20, learning_rate=3e-3,
                        prompts_per_step=2, num_generations=4, max_completion_length=32, max_turn_length=8,
                        max_tool_calling_iterations=2, save_steps=0, logging_steps=5, overwrite_output_dir=True)
    trainer = GRPOTrainer(model=tiny_model(tokenizer), train_dataset=dataset, tools=[multiply],
                          reward_funcs=accuracy, args=config, processing_class=tokenizer)
    return trainer.train()


if __name__ == "__main__":
    history = main()
    last = history[-1]
    print(f"reward {history[0]['reward']:.3f} -> {last['reward']:.3f} in {len(history)} steps; "
          f"{last['tools/call_frequency']:.2f} tool calls and {last['tools/turns']:.2f} turns per episode")
