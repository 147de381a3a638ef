"""The CPU choices of grpokit's sampler and training forward, each measured against its alternative.

    python benchmarks/cpu_kernels.py --out benchmarks/results/cpu_kernels.md

1. Attention, forward + backward: plain ops (``llama.attention`` with an additive mask) against
   ``scaled_dot_product_attention``, at 36, 128 and 200 keys (``SHORT_ATTENTION`` = 128 picks between them).
2. One (64 rows) x (256 -> 1024) projection: oneDNN's prepacked weight (``Stacked``) against ``F.linear``, with
   12 different weights in turn, so that they are not all in cache as in a decode step.
3. A whole rollout (64 completions) with oneDNN weights from ``ONEDNN_MIN_WEIGHT`` up (the default), for no
   weight, and for every weight, on the 2-layer hidden-64 and the 6-layer hidden-256 models of ``vs_trl.py``.
4. The optimizer step's forward + backward on one rollout of the medium model: ``padding_free`` on and off.
5. Rotary on a (1442, 8, 64) tensor: ``llama.rotary`` (roll, one fused multiply-add) against HF's
   ``x * cos + rotate_half(x) * sin``.
6. ``LlamaFamilyDecoder.select`` dropping 7 of 56 rows of the medium model's cache (25 of 36 slots written)
   against a strided copy of the written slots.
7. A rollout of the medium model, 8 prompts x 8 completions, <= 3 and <= 8 tokens: each distinct prompt
   prefilled once (``generate.distinct_rows``) against every row prefilled.
8. A rollout of the small model: norm weights and attention scale folded into the stacked weights
   (``PreparedLayer``) against not folded.
9. The optimizer step on one rollout of the medium model whose first 4 of 8 groups are flat (advantage 0):
   ``skip_zero_advantage`` on and off, with one update per rollout (the flat rows are not run at all) and with
   two (they run forward without autograd).

10. One draw of 64 rows at a 151,936-token vocabulary: ``sample_next``, which records the entropy, against the
   same draw without it.

``--parts`` runs some of them: attention, projection, rollout, padding_free, rotary_select, sampler,
zero_advantage, sampler_entropy.

Each pair alternates in one process; medians of the repeats, in milliseconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpokit.models import llama  # noqa: E402
from grpokit.rollout import lean  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def alternate(pair: dict, rounds: int, repeats: int) -> dict[str, float]:
    """Median ms per call of each of ``pair``'s functions, timed in alternation ``rounds`` times."""
    times = {name: [] for name in pair}
    for _ in range(rounds):
        for name, fn in pair.items():
            times[name].append(timed(fn, repeats))
    return {name: statistics.median(t) for name, t in times.items()}


def attention_pair(keys: int) -> dict:
    """Forward + backward of 64 rows x 4 heads x ``keys`` keys, head size 64, through each path."""
    q, k, v = (torch.randn(64, 4, keys, 64, requires_grad=True) for _ in range(3))
    causal = torch.ones(keys, keys, dtype=torch.bool).tril()[None, None]
    mask = causal & (torch.rand(64, 1, 1, keys) > 0.1) | torch.eye(keys, dtype=torch.bool)
    additive = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
    grad = torch.randn(64, 4, keys, 64)
    return {"plain ops": lambda: llama.attention(q, k, v, additive, 0.125).backward(grad),
            "fused kernel": lambda: llama.attention(q, k, v, mask, 0.125).backward(grad)}


def attention_rows(rounds: int) -> list[str]:
    rows = []
    for keys in (36, 128, 200):
        ms = alternate(attention_pair(keys), rounds, repeats=max(2, 400 // keys))
        rows.append(f"| attention fwd+bwd, 64 x 4 heads x {keys} keys | {ms['plain ops']:.2f} (plain ops) | "
                    f"{ms['fused kernel']:.2f} (fused) | {ms['plain ops'] / ms['fused kernel']:.2f} |")
    return rows


def projection_row(rounds: int) -> str:
    weights = [torch.randn(1024, 256) for _ in range(12)]
    h = torch.randn(64, 1, 256)
    linears = []
    for w in weights:
        layer = torch.nn.Linear(256, 1024, bias=False)
        layer.weight.data = w
        linears.append(layer)
    with torch.inference_mode():
        stacked = [lean.Stacked((layer,), 64) for layer in linears]
        if stacked[0].onednn is None:
            return "| 64 x (256 -> 1024) projection | oneDNN ops unavailable in this torch build | | |"
        pair = {"onednn": lambda: [s(h) for s in stacked], "linear": lambda: [F.linear(h, w) for w in weights]}
        ms = alternate(pair, rounds, repeats=50)
    per = {k: v / len(weights) for k, v in ms.items()}
    return (f"| 64 x (256 -> 1024) projection, 12 weights in turn | {per['onednn']:.3f} (oneDNN) | "
            f"{per['linear']:.3f} (F.linear) | {per['onednn'] / per['linear']:.2f} |")


def rollout_pair(layers: int, hidden: int, length: int) -> dict:
    """A rollout of 64 completions with oneDNN weights from the default size up, for every weight, and for
    none (``F.linear`` only); the same seed each time, so the same completion lengths."""
    from grpokit.tasks.demo import char_tokenizer, tiny_model

    generate_module = importlib.import_module("grpokit.rollout.decode")
    tokenizer = char_tokenizer()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "c"}], add_generation_prompt=True,
                                           tokenize=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    model = tiny_model(tokenizer, hidden_size=hidden, num_layers=layers)
    default = lean.ONEDNN_MIN_WEIGHT

    def rollout(minimum: int) -> None:
        lean.ONEDNN_MIN_WEIGHT = minimum
        try:
            generate_module.generate(model, tokenizer, [prompt] * 64, max_new_tokens=length, eos_token_ids=[0],
                                     generator=torch.Generator().manual_seed(0))
        finally:
            lean.ONEDNN_MIN_WEIGHT = default

    return {"default": lambda: rollout(default), "all": lambda: rollout(0), "none": lambda: rollout(2**62)}


def rollout_rows(rounds: int) -> list[str]:
    rows = []
    for layers, hidden, length in ((2, 64, 12), (6, 256, 32)):
        ms = alternate(rollout_pair(layers, hidden, length), rounds, repeats=5)
        rows.append(f"| rollout, {layers} layers, hidden {hidden}, 64 x <= {length} tokens | {ms['default']:.1f} "
                    f"(oneDNN for weights >= {lean.ONEDNN_MIN_WEIGHT}) | {ms['none']:.1f} (F.linear only); "
                    f"{ms['all']:.1f} (oneDNN for all) | {ms['default'] / ms['none']:.2f} |")
    return rows


def rotary_row(rounds: int) -> str:
    x, cos, sin = torch.randn(1442, 8, 64), torch.randn(1442, 1, 64), torch.randn(1442, 1, 64)
    signed = llama.signed_sin(sin)

    def rotate_half(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([-t[..., 32:], t[..., :32]], dim=-1)

    ms = alternate({"roll": lambda: llama.rotary(x, cos, signed),
                    "rotate_half": lambda: x * cos + rotate_half(x) * sin}, rounds, repeats=100)
    return (f"| rotary, (1442, 8, 64) | {ms['roll']:.3f} (roll + addcmul) | {ms['rotate_half']:.3f} "
            f"(x * cos + rotate_half(x) * sin) | {ms['roll'] / ms['rotate_half']:.2f} |")


def select_row(rounds: int) -> str:
    from types import SimpleNamespace

    cache, filled = torch.randn(6, 2, 56, 4, 36, 64), 25
    index = torch.arange(49)

    def gather() -> None:
        decoder = SimpleNamespace(cache=cache, filled=filled, key_ok=torch.ones(56, 36, dtype=torch.bool),
                                  next_position=torch.zeros(56, 1, dtype=torch.long))
        lean.LlamaFamilyDecoder.select(decoder, index)

    def strided() -> None:
        out = cache.new_empty(cache.shape[:2] + (index.numel(),) + cache.shape[3:])
        out[..., :filled, :] = cache[:, :, index, :, :filled]

    ms = alternate({"select": gather, "strided": strided}, rounds, repeats=20)
    return (f"| drop 7 of 56 rows of the medium cache (25 of 36 slots written) | {ms['select']:.2f} "
            f"(LlamaFamilyDecoder.select) | {ms['strided']:.2f} (strided copy) | {ms['select'] / ms['strided']:.2f} |")


def sampler_pair(layers: int, hidden: int, length: int, module, name: str, replacement) -> dict:
    """A rollout of 8 prompts x 8 completions as grpokit runs it, and with ``module.name`` replaced."""
    from grpokit.tasks.demo import char_tokenizer, tiny_model

    generate_module = importlib.import_module("grpokit.rollout.decode")
    tokenizer = char_tokenizer()
    prompts = []
    for letter in "abcdefgh":
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": letter}], add_generation_prompt=True,
                                               tokenize=True)
        prompts += [prompt["input_ids"] if hasattr(prompt, "keys") else prompt] * 8
    model = tiny_model(tokenizer, hidden_size=hidden, num_layers=layers)
    original = getattr(module, name)

    def rollout(fn) -> None:
        setattr(module, name, fn)
        try:
            generate_module.generate(model, tokenizer, prompts, max_new_tokens=length,
                                     eos_token_ids=[tokenizer.eos_token_id], generator=torch.Generator().manual_seed(0))
        finally:
            setattr(module, name, original)

    return {"grpokit": lambda: rollout(original), "alternative": lambda: rollout(replacement)}


def sampler_rows(rounds: int) -> list[str]:
    generate_module = importlib.import_module("grpokit.rollout.decode")

    def every_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(x.size(0))
        return rows, rows

    rows = []
    for length in (3, 8):
        ms = alternate(sampler_pair(6, 256, length, generate_module, "distinct_rows", every_row), rounds, repeats=5)
        rows.append(f"| rollout, 6 layers, hidden 256, 8 prompts x 8 x <= {length} tokens | {ms['grpokit']:.1f} "
                    f"(each prompt prefilled once) | {ms['alternative']:.1f} (every row prefilled) | "
                    f"{ms['grpokit'] / ms['alternative']:.2f} |")
    ms = alternate(sampler_pair(2, 64, 12, lean, "foldable", lambda norm, linears: False), rounds,
                   repeats=20)
    rows.append(f"| rollout, 2 layers, hidden 64, 8 prompts x 8 x <= 12 tokens | {ms['grpokit']:.1f} "
                f"(norm weights, attention scale folded) | {ms['alternative']:.1f} (not folded) | "
                f"{ms['grpokit'] / ms['alternative']:.2f} |")
    return rows


def medium_rollout(**config):
    """A trainer of vs_trl's medium model (learning rate 1e-9: repeated updates leave it as it is) and one
    rollout of it, 8 prompts x 8 completions."""
    from vs_trl import SCALES, build

    from grpokit import GRPOConfig, GRPOTrainer

    scale = SCALES["medium"]
    model, tokenizer, data = build(scale)
    args = GRPOConfig(output_dir=tempfile.mkdtemp(), seed=0, max_steps=1, learning_rate=1e-9, prompts_per_step=8,
                      num_generations=8, max_completion_length=scale["max_len"], beta=0.0, save_steps=0, **config)
    trainer = GRPOTrainer(model, "char_match", data, args=args, tokenizer=tokenizer)
    return trainer, trainer.rollout()[0]


def padding_free_row(rounds: int) -> str:
    trainer, batch = medium_rollout()
    policy = trainer.parallel.policy  # functools.partial(completion_logps, model, padding_free=...)

    def step(padding_free: bool) -> None:
        policy.keywords["padding_free"] = padding_free
        trainer.update(batch)

    ms = alternate({"on": lambda: step(True), "off": lambda: step(False)}, rounds, repeats=3)
    return (f"| optimizer step, medium model, one rollout (64 x <= 32 tokens) | {ms['on']:.0f} (padding_free) | "
            f"{ms['off']:.0f} (padded HF forward) | {ms['on'] / ms['off']:.2f} |")


def zero_advantage_rows(rounds: int) -> list[str]:
    rows = []
    for iterations, how in ((1, "one update per rollout: not run"), (2, "two updates: forward, no backward")):
        trainer, batch = medium_rollout(num_iterations=iterations)
        advantages = torch.randn(len(batch), generator=torch.Generator().manual_seed(0))
        advantages[:32] = 0.0  # 4 of the 8 groups flat
        batch = dataclasses.replace(batch, advantages=advantages)

        def step(skip: bool, trainer=trainer, batch=batch) -> None:
            trainer.args.skip_zero_advantage = skip
            trainer.update(batch)

        ms = alternate({"on": lambda: step(True), "off": lambda: step(False)}, rounds, repeats=3)
        rows.append(f"| optimizer step, medium model, 4 of 8 groups flat, {how} | {ms['on']:.0f} "
                    f"(skip_zero_advantage) | {ms['off']:.0f} (every row backpropagated) | "
                    f"{ms['on'] / ms['off']:.2f} |")
    return rows


def sampler_entropy_row(rounds: int) -> str:
    """One draw of 64 rows at V = 151,936: ``sample_next`` (token, log-prob and the entropy it records) against
    the same draw without the entropy (its code before the entropy was added)."""
    from grpokit.rollout.sampling import draw, sample_next

    logits = torch.randn(64, 151_936, generator=torch.Generator().manual_seed(0)) * 3
    generator = torch.Generator().manual_seed(0)

    def without_entropy() -> None:
        probs = torch.softmax(logits, dim=-1)
        tokens = draw(probs, generator)
        probs.gather(-1, tokens).log()

    ms = alternate({"with": lambda: sample_next(logits, generator=generator), "without": without_entropy},
                   rounds, repeats=20)
    return (f"| draw of 64 rows, V = 151,936 | {ms['with']:.1f} (sample_next, entropy recorded) | "
            f"{ms['without']:.1f} (no entropy) | {ms['with'] / ms['without']:.2f} |")


PARTS = {
    "attention": attention_rows,
    "projection": lambda r: [projection_row(r)],
    "rollout": rollout_rows,
    "padding_free": lambda r: [padding_free_row(r)],
    "rotary_select": lambda r: [rotary_row(r), select_row(r)],
    "sampler": sampler_rows,
    "zero_advantage": zero_advantage_rows,
    "sampler_entropy": lambda r: [sampler_entropy_row(r)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # vs_trl's model builder
    import platform

    lines = [f"Median of {args.rounds} alternating rounds, {torch.get_num_threads()} threads "
             f"({platform.processor() or platform.machine()}), torch {torch.__version__}, float32; ms.", "",
             "| what | grpokit's choice | alternative | ratio |", "|---|---|---|---|"]
    for name in args.parts.split(","):
        for row in PARTS[name](args.rounds):
            print(row, flush=True)
            lines.append(row)
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
