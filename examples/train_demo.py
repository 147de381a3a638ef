"""The embedded demo task through the Python API, on one process or several.

    python examples/train_demo.py                                    # one process
    torchrun --nproc-per-node 2 examples/train_demo.py               # 2 processes, DDP
    torchrun --nproc-per-node 2 examples/train_demo.py --distributed fsdp

``prompts_per_step`` (8) counts the prompts of all processes together: with 2 processes each samples 4 prompts
x 8 completions per step. Only rank 0 prints and writes ``runs/demo-torchrun/``.
"""

import argparse
import time

from grpokit import GRPOTrainer
from grpokit.cli.demo import demo_config
from grpokit.tasks.demo import char_tokenizer, letter_task, tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--distributed", default="ddp", choices=("ddp", "fsdp"))
    parser.add_argument("--max_steps", type=int, default=200)
    parser.add_argument("--output_dir", default="runs/demo-torchrun")
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args()

    start = time.perf_counter()
    config = demo_config(output_dir=cli.output_dir, max_steps=cli.max_steps, distributed=cli.distributed,
                         seed=cli.seed)
    tokenizer = char_tokenizer()
    model = tiny_model(tokenizer, seed=config.seed)  # every process starts from rank 0's weights anyway
    trainer = GRPOTrainer(model, "char_match", letter_task(), args=config, tokenizer=tokenizer)
    history = trainer.train()
    if trainer.world.is_main:
        last10 = sum(row["reward"] for row in history[-10:]) / len(history[-10:])
        print(f"{trainer.world.world_size} process(es), {config.distributed}: reward {history[0]['reward']:.3f} -> "
              f"{history[-1]['reward']:.3f} (mean of the last 10 steps {last10:.3f}) in "
              f"{time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
