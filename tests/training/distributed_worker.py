"""Runs GRPO cases on one process or under torchrun, for tests/training/test_distributed.py.

    torchrun --nproc-per-node 2 tests/training/distributed_worker.py CASES.json OUT_DIR

Each case is a dict of ``GRPOConfig`` fields, plus ``"sample": true`` to sample for real,
``"resume_from": "<path under OUT_DIR>"`` to start from a checkpoint and ``"signal_on_rank": r`` for process r
to send itself SIGUSR1 while its second rollout is scored. Sampling is
replaced by ``fixed_generate``: the completions of a prompt depend only on the prompt and the completion's place
in its group, never on the process, the model or a generator, so 1 and 2 processes train on the same
completions. Rank 0 writes ``OUT_DIR/<name>.pt`` with the whole parameters after the run and the metrics rows.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import zlib
from pathlib import Path

import torch

from grpokit import GRPOConfig
from grpokit.rollout import Rollout, completion_mask_from_eos
from grpokit.rollout.engine import left_pad
from grpokit.tasks.demo import char_tokenizer, tiny_model
from grpokit.training.trainer import GRPOTrainer

CHARS = "abcd"
PROMPTS = ["ab", "c", "dd", "abc", "b", "ca", "dab", "bb"]


def reward(prompts, completions, **kwargs):
    """Graded and prompt-dependent, so groups are rarely flat."""
    return [c.count(p[0]) / max(len(c), 1) + 0.05 * len(c) for p, c in zip(prompts, completions)]


def fixed_generate(model, tokenizer, prompts, *, max_new_tokens, eos_token_ids, group_size, **kwargs) -> Rollout:
    """Completion j of a group of prompt p: a pure function of (p, j). Shorter than ``max_new_tokens``: ends
    with EOS; as long: truncated."""
    device = next(model.parameters()).device
    eos, vocab = eos_token_ids[0], len(tokenizer)
    rows = []
    for i, prompt in enumerate(prompts):
        g = torch.Generator().manual_seed(zlib.crc32(bytes(f"{list(prompt)}/{i % group_size}", "ascii")))
        length = int(torch.randint(1, max_new_tokens + 1, (1,), generator=g))
        tokens = torch.randint(1, vocab, (length,), generator=g).tolist()
        rows.append(tokens + [eos] if length < max_new_tokens else tokens)
    width = max(len(r) for r in rows)
    completion_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])  # (B, C)
    completion_mask = completion_mask_from_eos(completion_ids, eos_token_ids)
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id)
    kept = [r[m.bool()].tolist() for r, m in zip(completion_ids, completion_mask)]
    return Rollout(prompt_ids=prompt_ids.to(device), prompt_mask=prompt_mask.to(device),
                   completion_ids=completion_ids.to(device), completion_mask=completion_mask.to(device),
                   is_truncated=torch.tensor([len(r) == max_new_tokens and eos not in r for r in rows], device=device),
                   sampling_logps=torch.zeros(completion_ids.shape, dtype=torch.float64, device=device),
                   texts=tokenizer.batch_decode(kept, skip_special_tokens=True))


def initial_parameters() -> dict[str, torch.Tensor]:
    return dict(tiny_model(char_tokenizer(CHARS), hidden_size=32, seed=0, dtype=torch.float64).named_parameters())


def make_trainer(case: dict, output_dir: Path) -> GRPOTrainer:
    tokenizer = char_tokenizer(CHARS)
    model = tiny_model(tokenizer, hidden_size=32, seed=0, dtype=torch.float64)
    fields = dict(output_dir=str(output_dir), seed=0, max_steps=2, learning_rate=1e-2, prompts_per_step=4,
                  num_generations=4, max_completion_length=5, save_steps=0, logging_steps=1000, dtype="float64",
                  max_grad_norm=0.5, overwrite_output_dir=True)
    fields.update({k: v for k, v in case.items() if k not in ("name", "resume_from", "sample", "signal_on_rank")})
    return GRPOTrainer(model, reward, [{"prompt": p} for p in PROMPTS], args=GRPOConfig(**fields),
                       tokenizer=tokenizer)


def whole_parameters(trainer) -> dict[str, torch.Tensor]:
    """Every parameter, whole (gathered from the shards under FSDP), on CPU; a collective under torchrun."""
    with trainer.parallel.full_weights():
        return {k: v.detach().cpu().clone() for k, v in trainer.model.named_parameters()}


class FixedEngine:
    """A rollout engine whose completions are ``fixed_generate``'s."""

    name = "fixed"

    def __init__(self, model, tokenizer, group_size: int):
        self.model, self.tokenizer, self.group_size = model, tokenizer, group_size

    def generate(self, prompts, params) -> Rollout:
        return fixed_generate(self.model, self.tokenizer, prompts, max_new_tokens=params.max_new_tokens,
                              eos_token_ids=params.eos_token_ids, group_size=self.group_size)

    def sync_weights(self, model) -> float:
        return 0.0

    def close(self) -> None:
        pass


def run_case(case: dict, out: Path) -> dict:
    """Train ``case`` (from the checkpoint ``out / case["resume_from"]`` if given). ``"sample": True`` samples
    for real; otherwise ``fixed_generate`` stands in (the same whatever the process count)."""
    trainer = make_trainer(case, out / f"run-{case['name']}")
    if not case.get("sample"):
        trainer.engine = FixedEngine(trainer.model, trainer.tokenizer, case.get("num_generations", 4))
    if case.get("signal_on_rank") == trainer.world.rank:
        trainer.reward_funcs[0].func = signalling(trainer.reward_funcs[0].func, call=2)
    history = trainer.train(resume_from_checkpoint=out / case["resume_from"] if "resume_from" in case else None)
    return {"params": whole_parameters(trainer), "history": history, "world_size": trainer.world.world_size,
            "stopped_by": trainer.stopped_by}


def signalling(func, call: int):
    """``func``, sending this process SIGUSR1 during its ``call``-th call."""
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGUSR1)
        return func(*args, **kwargs)

    return wrapped


def collectives() -> dict:
    """What ``World``'s helpers return on this process (rank r contributes r + 1)."""
    from grpokit.training.distributed import init_world

    world = init_world()
    r = world.rank
    return {"sum": world.all_reduce_sum(torch.tensor([r + 1.0])).item(),
            "gather": world.gather_rows(torch.tensor([[r, r], [r, -r]])).tolist(),
            "gather_bool": world.gather_rows(torch.tensor([r == 0, True])).tolist(),
            "weighted_mean": world.weighted_mean({"x": r + 1.0}, weight=r + 1.0),
            "broadcast": world.broadcast_object(f"from rank {r}")}


def main() -> None:
    cases, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    torch.save(collectives(), out / f"collectives-{int(os.environ.get('RANK', 0))}.pt")
    for case in cases:
        result = run_case(case, out)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            torch.save(result, out / f"{case['name']}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # every result is on disk: skip interpreter teardown, where a C++ thread left by gloo or FSDP has now and then
    # aborted the process ("terminate called without an active exception") after all the work was done
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
