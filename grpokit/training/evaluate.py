"""``grpokit eval``: sample n completions per prompt with grpokit's sampler, score them, report mean reward and
pass@k.

pass@k is the unbiased estimator of Chen et al. 2021 (arXiv 2107.03374, eq. 1): with n samples of a prompt of
which c are correct (reward >= ``threshold``),

    pass@k = 1 - C(n - c, k) / C(n, k)     averaged over prompts,

the probability that at least one of k samples drawn without replacement from the n is correct. n defaults to
k (then pass@k is the share of prompts with at least one correct sample); n > k lowers its variance. Prompts
that no reward function scores (every reward None, e.g. an unparseable gold answer) are left out of both
numbers.

The model is a folder (or hub id) ``from_pretrained`` loads, or a LoRA checkpoint of ``grpokit train``
(its adapters are merged into the base model it names).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from grpokit.config import DTYPES
from grpokit.models.loading import eos_token_ids, load_policy, quiet_transformers, resolve_device, torch_dtype
from grpokit.models.lora import is_adapter_folder, load_adapted_model
from grpokit.rewards import load_reward_funcs, score
from grpokit.rollout import generate
from grpokit.training.chat import with_system_prompt
from grpokit.training.data import encode_prompt, is_chat, load_prompts
from grpokit.util import check_choice, nan_to_none, seed_everything


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. 2021, eq. 1: 1 - C(n-c, k) / C(n, k), as the numerically stable product
    1 - prod_{i=n-c+1}^{n} (1 - k / i)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def reported_ks(k: int) -> list[int]:
    """1, 2, 4, ... below k, and k itself."""
    ks, power = [], 1
    while power < k:
        ks.append(power)
        power *= 2
    return ks + [k]


@dataclass
class EvalResult:
    """What ``grpokit eval`` reports (``--output`` writes it as JSON)."""

    model: str
    dataset: str
    reward_funcs: list[str]
    num_prompts: int
    """Prompts scored (those with at least one reward that is not None)."""
    num_samples: int
    """n, completions sampled per prompt."""
    k: int
    threshold: float
    """A completion is correct when its combined reward is >= this."""
    temperature: float
    max_completion_length: int
    mean_reward: float | None
    """Mean combined reward over every scored completion."""
    reward_means: dict[str, float | None]
    """Mean of each reward function (its None values left out)."""
    pass_at: dict[str, float]
    """``{"pass@1": ..., "pass@k": ...}``, averaged over prompts."""
    mean_completion_length: float
    seconds: float
    per_prompt: list[dict[str, Any]] = field(default_factory=list)
    """``{"prompt", "n", "correct", "mean_reward", "example"}`` per prompt (``example``: its first completion)."""

    def table(self) -> str:
        rows = [("prompts", str(self.num_prompts)), ("samples per prompt", str(self.num_samples)),
                ("mean reward", _fmt(self.mean_reward))]
        rows += [(f"  {name}", _fmt(value)) for name, value in self.reward_means.items()] if len(
            self.reward_means) > 1 else []
        rows += [(name, _fmt(value)) for name, value in self.pass_at.items()]
        rows += [("mean completion length", f"{self.mean_completion_length:.1f}"), ("time", f"{self.seconds:.1f} s")]
        width = max(len(name) for name, _ in rows)
        title = f"grpokit eval: {self.model} on {self.dataset} (T={self.temperature}, correct: reward >= " \
                f"{self.threshold})"
        return "\n".join([title, *(f"  {name:<{width}}  {value}" for name, value in rows)])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def evaluate(
    model: str | Path,
    dataset,
    reward_funcs,
    *,
    k: int = 8,
    num_samples: int | None = None,
    max_completion_length: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    threshold: float = 1.0,
    system_prompt: str | None = None,
    max_prompt_length: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "auto",
    base: str | None = None,
) -> EvalResult:
    """Sample ``num_samples`` (default ``k``) completions of every prompt of ``dataset`` from ``model``
    (``grpokit.rollout.decode``), score them with ``reward_funcs`` and compute mean reward and pass@k."""

    n = k if num_samples is None else num_samples
    for name, value, low in (("k", k, 1), ("num_samples", n, k), ("max_completion_length", max_completion_length, 1),
                             ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    check_choice("dtype", dtype, DTYPES)
    funcs = load_reward_funcs(reward_funcs, max_completion_length=max_completion_length)  # cheap checks first
    data = with_system_prompt(load_prompts(dataset), system_prompt)
    columns = [c for c in data.column_names if c != "prompt"]
    policy, tokenizer = load_eval_model(model, torch_dtype(dtype), device, base=base)
    policy.eval()
    seed_everything(seed)
    generator = torch.Generator(device=next(policy.parameters()).device).manual_seed(seed)
    eos = eos_token_ids(policy, tokenizer)

    start = time.perf_counter()
    examples = [data[i] for i in range(len(data))]
    encoded = [encode_prompt(tokenizer, ex["prompt"], max_prompt_length) for ex in examples]
    rows = [i for i in range(len(examples)) for _ in range(n)]  # prompt index of every completion
    rewards, per_func, lengths, texts = [], [], [], []
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo:lo + batch_size]
        rollout = generate(policy, tokenizer, [encoded[i] for i in chunk], max_new_tokens=max_completion_length,
                           eos_token_ids=eos, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        prompts = [examples[i]["prompt"] for i in chunk]
        completions = [[{"role": "assistant", "content": t}] if is_chat(p) else t
                       for p, t in zip(prompts, rollout.texts)]
        ids = [r[m.bool()].tolist() for r, m in zip(rollout.completion_ids.cpu(), rollout.completion_mask.cpu())]
        scores = score(funcs, None, prompts, completions, ids,
                       {c: [examples[i][c] for i in chunk] for c in columns})
        rewards.append(scores.rewards)
        per_func.append(scores.per_func)
        lengths.append(rollout.completion_mask.sum(-1).float().cpu())
        texts += rollout.texts
    rewards_t = torch.cat(rewards).view(len(examples), n)  # (P, n), NaN where nobody scored
    per_func_t = torch.cat(per_func)  # (P * n, F)
    seconds = time.perf_counter() - start

    scored = ~torch.isnan(rewards_t).all(dim=1)  # (P,)
    per_prompt, pass_sums = [], dict.fromkeys(reported_ks(k), 0.0)
    for i, ex in enumerate(examples):
        values = rewards_t[i]
        correct = int((values >= threshold).sum())  # NaN compares False: unscored samples are not correct
        entry = {"prompt": ex["prompt"], "n": n, "correct": correct,
                 "mean_reward": nan_to_none(torch.nanmean(values)), "example": texts[i * n]}
        per_prompt.append(entry)
        if scored[i]:
            for kk in pass_sums:
                pass_sums[kk] += pass_at_k(n, correct, kk)
    num_scored = int(scored.sum())
    return EvalResult(
        model=str(model), dataset=str(dataset) if isinstance(dataset, (str, Path)) else "<dataset>",
        reward_funcs=[f.name for f in funcs], num_prompts=num_scored, num_samples=n, k=k, threshold=threshold,
        temperature=temperature, max_completion_length=max_completion_length,
        mean_reward=nan_to_none(torch.nanmean(rewards_t[scored])) if num_scored else None,
        reward_means={f.name: nan_to_none(torch.nanmean(per_func_t[:, j])) for j, f in enumerate(funcs)},
        pass_at={f"pass@{kk}": (v / num_scored if num_scored else math.nan) for kk, v in pass_sums.items()},
        mean_completion_length=float(torch.cat(lengths).mean()), seconds=seconds, per_prompt=per_prompt,
    )


def load_eval_model(source: str | Path, dtype: torch.dtype, device: str = "auto", base: str | None = None):
    """(model, tokenizer) of a model folder / hub id, or of a LoRA checkpoint (adapters merged into its base)."""

    if is_adapter_folder(source):
        with quiet_transformers():
            merged = load_adapted_model(source, base=base, dtype=dtype).to(resolve_device(device))
        return load_policy(merged, str(source), dtype, device="auto")
    return load_policy(str(source), None, dtype, device=device)



def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
