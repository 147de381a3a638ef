"""Evaluation: sample n completions per prompt, score them, report mean reward and pass@k.

``evaluate_policy`` does it for a policy behind a rollout engine; ``grpokit eval`` (``evaluate``: a saved model)
and the trainer's evaluation during training (``eval_steps``) both call it.

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

import dataclasses
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
from grpokit.rewards import RewardFunction, load_reward_funcs, score
from grpokit.rollout import RolloutEngine, SamplingParams, make_engine, token_lists
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


@dataclass
class PolicyEval:
    """Mean reward and pass@k of a policy on a set of prompts (``evaluate_policy``)."""

    num_prompts: int
    """Prompts scored (those with at least one reward that is not None)."""
    num_samples: int
    """n, completions sampled per prompt."""
    mean_reward: float | None
    """Mean combined reward over every scored completion."""
    reward_means: dict[str, float | None]
    """Mean of each reward function (its None values left out)."""
    pass_at: dict[str, float]
    """``{"pass@1": ..., "pass@k": ...}`` for k = 1, 2, 4... and k, averaged over the scored prompts."""
    mean_completion_length: float
    """Mean tokens per completion, EOS included."""
    seconds: float
    per_prompt: list[dict[str, Any]] = field(default_factory=list)
    """``{"prompt", "n", "correct", "mean_reward", "example"}`` per prompt (``example``: its first completion)."""

    def metrics(self, prefix: str = "eval/") -> dict[str, float | None]:
        """The metrics-row entries: ``eval/reward``, ``eval/rewards/<name>``, ``eval/pass@k``,
        ``eval/completion_length``."""
        out = {f"{prefix}reward": self.mean_reward}
        out.update({f"{prefix}rewards/{name}": value for name, value in self.reward_means.items()})
        out.update({f"{prefix}{name}": nan_to_none(value) for name, value in self.pass_at.items()})
        out[f"{prefix}completion_length"] = self.mean_completion_length
        return out


def eval_sampling(params: SamplingParams, temperature: float | None) -> SamplingParams:
    """``params`` at the evaluation's temperature (``None``: unchanged); 0 is greedy decoding, run by every
    engine as the only token top-k = 1 keeps, drawn at temperature 1."""
    if temperature is None:
        return params
    if temperature == 0:
        return dataclasses.replace(params, temperature=1.0, top_k=1, top_p=1.0)
    return dataclasses.replace(params, temperature=temperature)


def evaluate_policy(engine: RolloutEngine, tokenizer, data, reward_funcs: list[RewardFunction], *,
                    params: SamplingParams, num_samples: int, k: int | None = None, threshold: float = 1.0,
                    max_prompt_length: int | None = None, batch_size: int = 64,
                    reward_weights: list[float] | None = None) -> PolicyEval:
    """Sample ``num_samples`` completions of every prompt of ``data`` (a ``Dataset`` with a ``prompt`` column;
    the other columns reach the reward functions) through ``engine`` with ``params`` (its ``generator`` is the
    random stream), score them with ``reward_funcs`` (combined with ``reward_weights``) and compute the mean
    reward and pass@k (k = 1, 2, 4... up to ``k``, default ``num_samples``; correct: reward >= ``threshold``).

    ``grpokit eval`` and the trainer's evaluation during training (``eval_steps``) both run this."""
    n, k = num_samples, num_samples if k is None else k
    start = time.perf_counter()
    columns = [c for c in data.column_names if c != "prompt"]
    examples = [data[i] for i in range(len(data))]
    encoded = [encode_prompt(tokenizer, ex["prompt"], max_prompt_length) for ex in examples]
    rows = [i for i in range(len(examples)) for _ in range(n)]  # prompt index of every completion
    rewards, per_func, lengths, texts = [], [], [], []
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo:lo + batch_size]
        rollout = engine.generate([encoded[i] for i in chunk], params)
        prompts = [examples[i]["prompt"] for i in chunk]
        completions = [[{"role": "assistant", "content": t}] if is_chat(p) else t
                       for p, t in zip(prompts, rollout.texts)]
        scores = score(reward_funcs, reward_weights, prompts, completions,
                       token_lists(rollout.completion_ids, rollout.completion_mask),
                       {c: [examples[i][c] for i in chunk] for c in columns})
        rewards.append(scores.rewards)
        per_func.append(scores.per_func)
        lengths.append(rollout.completion_mask.sum(-1).float().cpu())
        texts += rollout.texts
    rewards_t = torch.cat(rewards).view(len(examples), n)  # (P, n), NaN where nobody scored
    per_func_t = torch.cat(per_func)  # (P * n, F)

    scored = ~torch.isnan(rewards_t).all(dim=1)  # (P,)
    per_prompt, pass_sums = [], dict.fromkeys(reported_ks(k), 0.0)
    for i, ex in enumerate(examples):
        values = rewards_t[i]
        correct = int((values >= threshold).sum())  # NaN compares False: unscored samples are not correct
        per_prompt.append({"prompt": ex["prompt"], "n": n, "correct": correct,
                           "mean_reward": nan_to_none(torch.nanmean(values)), "example": texts[i * n]})
        if scored[i]:
            for kk in pass_sums:
                pass_sums[kk] += pass_at_k(n, correct, kk)
    num_scored = int(scored.sum())
    return PolicyEval(
        num_prompts=num_scored, num_samples=n,
        mean_reward=nan_to_none(torch.nanmean(rewards_t[scored])) if num_scored else None,
        reward_means={f.name: nan_to_none(torch.nanmean(per_func_t[:, j])) for j, f in enumerate(reward_funcs)},
        pass_at={f"pass@{kk}": (v / num_scored if num_scored else math.nan) for kk, v in pass_sums.items()},
        mean_completion_length=float(torch.cat(lengths).mean()), seconds=time.perf_counter() - start,
        per_prompt=per_prompt,
    )


class TrainingEval:
    """Evaluation during training (``eval_steps``): the eval prompts, the reward functions and the sampling
    settings, fixed at the start; ``run(engine)`` evaluates the policy behind ``engine`` as it is now.

    Every evaluation re-seeds its own generator with the run's seed, so the training's random stream is
    untouched (a run with evaluation trains exactly as one without) and every evaluation draws the same
    random numbers: the differences between evaluations come from the policy."""

    def __init__(self, data, reward_funcs: list[RewardFunction], tokenizer, *, params: SamplingParams, every: int,
                 max_steps: int, num_samples: int, threshold: float, seed: int, max_prompt_length: int | None,
                 batch_size: int, reward_weights: list[float] | None = None, device=None):
        self.data, self.reward_funcs, self.tokenizer = data, reward_funcs, tokenizer
        self.every, self.max_steps, self.num_samples, self.threshold = every, max_steps, num_samples, threshold
        self.seed, self.max_prompt_length, self.batch_size = seed, max_prompt_length, batch_size
        self.reward_weights = reward_weights
        self.generator = torch.Generator(device=device)
        self.params = dataclasses.replace(params, generator=self.generator)

    def due(self, step: int) -> bool:
        """Before the first step (0), every ``every`` steps, and after the last."""
        return step == 0 or step % self.every == 0 or step == self.max_steps

    def run(self, engine: RolloutEngine) -> dict[str, float | None]:
        """The ``eval/*`` entries of a metrics row (``PolicyEval.metrics``)."""
        self.generator.manual_seed(self.seed)
        result = evaluate_policy(engine, self.tokenizer, self.data, self.reward_funcs, params=self.params,
                                 num_samples=self.num_samples, threshold=self.threshold,
                                 max_prompt_length=self.max_prompt_length, batch_size=self.batch_size,
                                 reward_weights=self.reward_weights)
        return result.metrics()


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
    split: str = "train",
    dataset_config: str | None = None,
) -> EvalResult:
    """``grpokit eval``: load ``model``, sample ``num_samples`` (default ``k``) completions of every prompt of
    ``dataset`` (its ``split``) and score them (``evaluate_policy``). ``temperature`` 0: greedy."""

    n = k if num_samples is None else num_samples
    for name, value, low in (("k", k, 1), ("num_samples", n, k), ("max_completion_length", max_completion_length, 1),
                             ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature!r}")
    check_choice("dtype", dtype, DTYPES)
    funcs = load_reward_funcs(reward_funcs, max_completion_length=max_completion_length)  # cheap checks first
    data = with_system_prompt(load_prompts(dataset, name=dataset_config, split=split), system_prompt)
    policy, tokenizer = load_eval_model(model, torch_dtype(dtype), device, base=base)
    policy.eval()
    seed_everything(seed)
    generator = torch.Generator(device=next(policy.parameters()).device).manual_seed(seed)
    params = SamplingParams(max_new_tokens=max_completion_length, eos_token_ids=tuple(eos_token_ids(policy, tokenizer)),
                            pad_token_id=tokenizer.pad_token_id, temperature=1.0, top_k=top_k, top_p=top_p,
                            generator=generator)
    result = evaluate_policy(make_engine("auto", policy, tokenizer), tokenizer, data, funcs,
                             params=eval_sampling(params, temperature), num_samples=n, k=k, threshold=threshold,
                             max_prompt_length=max_prompt_length, batch_size=batch_size)
    return EvalResult(
        model=str(model), dataset=str(dataset) if isinstance(dataset, (str, Path)) else "<dataset>",
        reward_funcs=[f.name for f in funcs], num_prompts=result.num_prompts, num_samples=n, k=k,
        threshold=threshold, temperature=temperature, max_completion_length=max_completion_length,
        mean_reward=result.mean_reward, reward_means=result.reward_means, pass_at=result.pass_at,
        mean_completion_length=result.mean_completion_length, seconds=result.seconds,
        per_prompt=result.per_prompt,
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
