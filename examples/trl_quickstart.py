"""TRL's GRPO quick start, ported to grpokit.

TRL's version (docs, "GRPO Trainer > Quick start")::

    from datasets import load_dataset
    from trl import GRPOTrainer
    from trl.rewards import accuracy_reward

    dataset = load_dataset("trl-lib/DeepMath-103K", split="train")

    trainer = GRPOTrainer(
        model="Qwen/Qwen2-0.5B-Instruct",
        reward_funcs=accuracy_reward,
        train_dataset=dataset,
    )
    trainer.train()

grpokit's is the same three objects: ``GRPOTrainer(model, reward_funcs, train_dataset, args)``, with the
reward by name or callable (``grpokit.rewards.accuracy`` is TRL's ``accuracy_reward``). Two differences show:
grpokit counts batches in prompts (``prompts_per_step``) and steps (``max_steps``, no epochs), and its defaults
are the paper's (``loss_type="grpo"``, float32), so TRL's run is spelled out in ``trl_defaults`` below
(docs/coming_from_trl.md maps every name).

    python examples/trl_quickstart.py           offline: the demo's tiny local model and letter task
    python examples/trl_quickstart.py --hub     TRL's own model and data set (needs the Hugging Face Hub)
"""

import argparse

from grpokit import GRPOConfig, GRPOTrainer
from grpokit.rewards import accuracy


def trl_defaults(**changes) -> GRPOConfig:
    """TRL 1.16's GRPOConfig defaults on one GPU, in grpokit's names: 8 completions per step, all of one
    prompt (per_device_train_batch_size=8, num_generations=8), DAPO's token-level loss, bf16, gradient
    checkpointing, lr 1e-6, 512 completion tokens."""
    fields = dict(output_dir="runs/trl_quickstart", prompts_per_step=1, num_generations=8, micro_batch_size=8,
                  loss_type="dapo", learning_rate=1e-6, max_completion_length=512, dtype="bfloat16",
                  gradient_checkpointing=True, logging_steps=10, max_prompt_length=None, max_steps=1000)
    return GRPOConfig(**{**fields, **changes})


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hub", action="store_true", help="TRL's Qwen2-0.5B-Instruct on DeepMath-103K")
    parser.add_argument("--max_steps", type=int, default=None)
    parser.add_argument("--output_dir", default=None)
    args = parser.parse_args(argv)
    changes = {k: v for k, v in (("max_steps", args.max_steps), ("output_dir", args.output_dir)) if v is not None}

    if args.hub:  # TRL's quick start, line for line
        from datasets import load_dataset

        dataset = load_dataset("trl-lib/DeepMath-103K", split="train")
        trainer = GRPOTrainer(
            model="Qwen/Qwen2-0.5B-Instruct",
            reward_funcs=accuracy,
            train_dataset=dataset,
            args=trl_defaults(**changes),
        )
        return trainer.train()

    # offline: no Hub here, so the demo's random-init tiny model (saved to disk, loaded by path like a hub
    # model) and its letter task stand in; a random model never writes \boxed{}, so the reward is char_match
    from grpokit.cli.demo import build_demo, demo_config

    config = demo_config(**{"output_dir": "runs/trl_quickstart", "overwrite_output_dir": True, **changes})
    model, dataset = build_demo(config)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs="char_match",
        train_dataset=dataset,
        args=config,
    )
    return trainer.train()


if __name__ == "__main__":
    history = main()
    print(f"reward {history[0]['reward']:.3f} -> {history[-1]['reward']:.3f} in {len(history)} steps")
