"""``grpokit train`` without a config: the demo run on the tiny model and letter task of ``grpokit.tasks.demo``."""

from __future__ import annotations

import time
from pathlib import Path

from grpokit.tasks.demo import DEMO_LENGTH, DEMO_LETTERS, char_tokenizer, letter_task, tiny_model


def demo_config(**overrides):
    """The demo's ``GRPOConfig``; ``overrides`` replace fields (``grpokit train --max_steps 50``)."""
    from grpokit.config import GRPOConfig

    fields = dict(
        output_dir="runs/demo", seed=0, max_steps=200, learning_rate=3e-3, prompts_per_step=8, num_generations=8,
        max_completion_length=DEMO_LENGTH, beta=0.0, save_steps=0, logging_steps=20,
        overwrite_output_dir=True,  # the demo's results are disposable: a second `grpokit train` replaces them
    )
    fields.update(overrides)
    return GRPOConfig.from_dict(fields)


def build_demo(config, write: bool = True):
    """(model path, dataset): the tokenizer and random-init model are saved under ``output_dir/init`` so
    that the trainer loads them with from_pretrained, as it would a real model (``write=False``: only the
    path, for the processes of a torchrun launch other than rank 0)."""
    init = Path(config.output_dir) / "init"
    if not write:
        return str(init), letter_task()
    tokenizer = char_tokenizer()
    model = tiny_model(tokenizer, seed=config.seed)
    from grpokit.training.trainer import quiet_transformers

    with quiet_transformers():
        model.save_pretrained(init)
    tokenizer.save_pretrained(init)
    return str(init), letter_task()


def run_demo(overrides: dict | None = None, resume_from_checkpoint=None) -> dict | None:
    """Train the demo; returns the last metrics row (``reward`` should end >= 0.9)."""
    from grpokit.training.distributed import init_world
    from grpokit.training.trainer import GRPOTrainer

    start = time.perf_counter()
    config = demo_config(**(overrides or {}))
    world = init_world()  # under torchrun, rank 0 writes the initial model and speaks; the others wait for it
    model_path, dataset = build_demo(config, write=world.is_main)
    world.barrier()
    say = print if world.is_main else (lambda *args, **kwargs: None)
    say(f"grpokit demo: random-init 2-layer Llama (hidden 64), character tokenizer, task 'c' -> 'cccc' "
        f"(letters {DEMO_LETTERS}); GRPO {config.prompts_per_step} prompts x {config.num_generations} completions, "
        f"{config.max_steps} steps -> {config.output_dir}/", flush=True)
    trainer = GRPOTrainer(model_path, "char_match", dataset, args=config)
    trainer.resume_hint = "grpokit train --resume"  # what a run stopped by a signal prints
    history = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    if not history:
        return None
    first, last = history[0], history[-1]
    say(f"grpokit demo: reward {first['reward']:.3f} -> {last['reward']:.3f} in "
        f"{time.perf_counter() - start:.1f} s; see {config.output_dir}/metrics.png", flush=True)
    return last
