"""``grpokit verify``: re-derive the GRPO theory numerically on this install, in float64, on fresh random inputs.

Each claim is one function returning the worst absolute error between what grpokit's code computes (through
autograd, as training does) and what the paper or the closed form says. ``docs/theory.md`` explains each.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from grpokit.advantages import STD_EPS, group_advantages, process_advantages
from grpokit.kl import exact_kl, kl_penalty, kl_reward_to_go
from grpokit.losses import LOSS_TYPES, LossConfig, grpo_loss

F64 = torch.float64
TOL = 1e-10


@dataclass
class Claim:
    name: str
    source: str
    check: Callable[[torch.Generator], float]
    tolerance: float = TOL


# -------------------------------------------------------------------------------------------- inputs


def random_rollout(g: torch.Generator, B: int = 6, T: int = 9, spread: float = 0.0):
    """Random log-probs (B, T), a mask of random lengths >= 1, outcome advantages (B,), pi_ref and pi_old."""
    logps = -torch.rand(B, T, generator=g, dtype=F64) * 4
    ref = logps + 0.7 * torch.randn(B, T, generator=g, dtype=F64)
    old = logps + spread * torch.randn(B, T, generator=g, dtype=F64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(F64)
    adv = torch.randn(B, generator=g, dtype=F64)
    return logps.requires_grad_(), adv, mask, ref, old


def grad_wrt_logps(logps, adv, mask, config, **kw) -> torch.Tensor:
    out = grpo_loss(logps, adv, mask, config=config, **kw)
    (g,) = torch.autograd.grad(out.loss, logps)
    return g


# --------------------------------------------------------------------------------- loss claims


def eq21_gradient(beta: float) -> Callable[[torch.Generator], float]:
    def check(g: torch.Generator) -> float:
        logps, adv, mask, ref, _ = random_rollout(g)
        grad = grad_wrt_logps(logps, adv, mask, LossConfig(loss_type="grpo", beta=beta), ref_logps=ref)
        gc = adv[:, None] + beta * (torch.exp(ref - logps.detach()) - 1)  # eq. 21 gradient coefficient
        expected = -gc * mask / mask.sum(-1, keepdim=True) / logps.size(0)  # weights 1/G * 1/|o_i|
        return (grad - expected).abs().max().item()

    return check


def clipped_gradient_off_policy(g: torch.Generator) -> float:
    logps, adv, mask, _, old = random_rollout(g, spread=0.5)
    eps = 0.2
    grad = grad_wrt_logps(logps, adv, mask, LossConfig(epsilon_low=eps), old_logps=old)
    r = torch.exp(logps.detach() - old)
    A = adv[:, None]
    inactive = ((r > 1 + eps) & (A > 0)) | ((r < 1 - eps) & (A < 0))  # the min picks the constant branch
    expected = torch.where(inactive, 0.0, -A * r) * mask / mask.sum(-1, keepdim=True) / logps.size(0)
    return (grad - expected).abs().max().item()


def clipping_is_inert_on_policy(g: torch.Generator) -> float:
    logps, adv, mask, _, _ = random_rollout(g)
    a = grad_wrt_logps(logps, adv, mask, LossConfig(epsilon_low=0.01))
    b = grad_wrt_logps(logps, adv, mask, LossConfig(epsilon_low=0.9))
    return (a - b).abs().max().item()


def normaliser(loss_type: str) -> Callable[[torch.Generator], float]:
    """On-policy, every surrogate has gradient -A * w on log pi; w is the loss type's normaliser."""

    def check(g: torch.Generator) -> float:
        logps, adv, mask, _, _ = random_rollout(g)
        B, T = mask.shape
        items = float(mask.sum()) + 5.0  # a global batch larger than this one (dapo/cispo)
        cfg = LossConfig(loss_type=loss_type, epsilon_high=5.0 if loss_type == "cispo" else None)
        grad = grad_wrt_logps(logps, adv, mask, cfg, num_items_in_batch=items)
        weight = {
            "grpo": 1 / (B * mask.sum(-1, keepdim=True)),
            "sapo": 1 / (B * mask.sum(-1, keepdim=True)),
            "bnpo": 1 / mask.sum(),
            "dapo": torch.tensor(1 / items, dtype=F64),
            "cispo": torch.tensor(1 / items, dtype=F64),
            "dr_grpo": torch.tensor(1 / (B * T), dtype=F64),
        }[loss_type]
        return (grad - (-adv[:, None] * weight * mask)).abs().max().item()

    return check


def zero_advantage_rows(g: torch.Generator) -> float:
    """With beta = 0, a row with A = 0 has gradient exactly 0 under every loss type, on- and off-policy, with
    sequence-level ratios and with TIS weights: what lets the trainer skip its backward (skip_zero_advantage)."""
    worst = 0.0
    for loss_type in LOSS_TYPES:
        for level, spread in (("token", 0.0), ("token", 0.5), ("sequence", 0.5)):
            logps, adv, mask, _, old = random_rollout(g, spread=spread)
            adv[::2] = 0.0
            cfg = LossConfig(loss_type=loss_type, importance_sampling_level=level,
                             epsilon_high=5.0 if loss_type == "cispo" else None)
            weights = torch.rand(mask.shape, generator=g, dtype=F64) + 0.5
            grad = grad_wrt_logps(logps, adv, mask, cfg, old_logps=old, token_weights=weights)
            worst = max(worst, grad[::2].abs().max().item())
    return worst


# ----------------------------------------------------------------------------------- KL claims


def expected_kl_gradient(estimator: str, theta: torch.Tensor, ref_logits: torch.Tensor,
                         old_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Exact E_{o ~ sampler}[grad_theta kl_penalty(o)] for one token position over a small vocabulary.

    theta (V,) are the policy logits; the sampler is pi_theta itself (on-policy, weights not differentiated)
    or pi_old = softmax(old_logits). Enumerates every token o, no sampling noise."""
    theta = theta.detach().clone().requires_grad_()
    logp = torch.log_softmax(theta, -1)  # (V,)
    ref = torch.log_softmax(ref_logits, -1)
    if old_logits is None:
        weights, old = logp.detach().exp(), None
    else:
        old = torch.log_softmax(old_logits, -1)
        weights = old.exp()
    per_token = kl_penalty(logp, ref, estimator, old_logps=old)  # (V,): the penalty had token o been drawn
    (grad,) = torch.autograd.grad((weights * per_token).sum(), theta)
    return grad


def kl_gradient(theta: torch.Tensor, ref_logits: torch.Tensor, direction: str) -> torch.Tensor:
    theta = theta.detach().clone().requires_grad_()
    logp, ref = torch.log_softmax(theta, -1), torch.log_softmax(ref_logits, -1)
    kl = exact_kl(logp, ref) if direction == "reverse" else exact_kl(ref, logp)
    (grad,) = torch.autograd.grad(kl, theta)
    return grad


def kl_claim(estimator: str, off_policy: bool, target: str) -> Callable[[torch.Generator], float]:
    """target: ``reverse`` (KL(pi_theta||pi_ref)), ``forward`` (KL(pi_ref||pi_theta)), ``zero``, or ``biased``
    (matches neither: the returned error is 0 when the gap to both KLs' gradients is clearly non-zero)."""

    def check(g: torch.Generator) -> float:
        V = 7
        theta, ref = torch.randn(V, generator=g, dtype=F64), torch.randn(V, generator=g, dtype=F64)
        old = theta + torch.randn(V, generator=g, dtype=F64) if off_policy else None
        got = expected_kl_gradient(estimator, theta, ref, old)
        if target == "zero":
            return got.abs().max().item()
        if target == "biased":
            gap = min((got - kl_gradient(theta, ref, d)).abs().max().item() for d in ("reverse", "forward"))
            return 0.0 if gap > 1e-3 else 1.0
        return (got - kl_gradient(theta, ref, target)).abs().max().item()

    return check


def two_token_sequences(g: torch.Generator, V: int = 4):
    """Every sequence (o1, o2) of a tabular two-step policy: per-token log-probs (V*V, 2) under pi_theta
    (differentiable in its logits) and pi_ref, plus the logits themselves."""
    theta1 = torch.randn(V, generator=g, dtype=F64).requires_grad_()
    theta2 = torch.randn(V, V, generator=g, dtype=F64).requires_grad_()  # row o1: logits of o2 given o1
    ref1, ref2 = torch.randn(V, generator=g, dtype=F64), torch.randn(V, V, generator=g, dtype=F64)
    o1, o2 = torch.arange(V).repeat_interleave(V), torch.arange(V).repeat(V)  # all V*V sequences
    logps = torch.stack([torch.log_softmax(theta1, -1)[o1], torch.log_softmax(theta2, -1)[o1, o2]], dim=1)
    ref = torch.stack([torch.log_softmax(ref1, -1)[o1], torch.log_softmax(ref2, -1)[o1, o2]], dim=1)
    return logps, ref, (theta1, theta2)


def sequence_kl_gradient(method: str) -> Callable[[torch.Generator], float]:
    """Exact E_{o ~ pi_theta}[gradient] of a KL treatment vs the gradient of the *sequence* KL(pi_theta||pi_ref).
    ``kl_in_reward``: REINFORCE with -sg(k1) reward-to-go (should match); ``k2_loss``: per-token k2 summed
    (matches only per position, not the sequence: the returned error is 0 when it clearly differs)."""

    def check(g: torch.Generator) -> float:
        logps, ref, params = two_token_sequences(g)
        p_seq = logps.sum(1).exp().detach()  # (N,) probability of each sequence under pi_theta
        mask = torch.ones_like(logps)
        if method == "kl_in_reward":
            adv = kl_reward_to_go(logps, ref, mask, beta=1.0)  # (N, 2), constants
            surrogate = -(adv * logps).sum(1)  # minimised: the policy-gradient loss
        else:
            surrogate = kl_penalty(logps, ref, "k2").sum(1)
        got = torch.autograd.grad((p_seq * surrogate).sum(), params, retain_graph=True)
        seq_kl = (logps.sum(1).exp() * (logps.sum(1) - ref.sum(1))).sum()
        want = torch.autograd.grad(seq_kl, params)
        err = max((a - b).abs().max().item() for a, b in zip(got, want))
        return err if method == "kl_in_reward" else (0.0 if err > 1e-3 else 1.0)

    return check


# ---------------------------------------------------------------------------- advantage claims


def group_advantage_formula(g: torch.Generator) -> float:
    G, P = 5, 4
    rewards = torch.randn(P * G, generator=g, dtype=F64)
    rewards[G: 2 * G] = 0.5  # one group with no variance
    rewards[2 * G + 1] = float("nan")  # one reward function returned None
    got = group_advantages(rewards, G, "group")
    worst = 0.0
    for p in range(P):
        group = rewards[p * G: (p + 1) * G]
        valid = group[~group.isnan()]
        mean, std = valid.mean(), valid.std()  # std: Bessel's correction
        for i in range(G):
            r = group[i].item()
            want = 0.0 if math.isnan(r) or bool((valid == valid[0]).all()) else (r - mean) / (std + STD_EPS)
            worst = max(worst, abs(got[p * G + i].item() - float(want)))
    return worst


def process_advantage_formula(g: torch.Generator) -> float:
    """4.1.3: normalise all step rewards of the group; token t sums the normalised rewards of steps ending >= t."""
    G, T = 3, 12
    rewards, ends = [], []
    for _ in range(2 * G):
        k = int(torch.randint(1, 4, (1,), generator=g))
        ends.append(sorted(torch.randperm(T, generator=g)[:k].tolist()))
        rewards.append(torch.rand(k, generator=g, dtype=F64).tolist())
    got = process_advantages(rewards, ends, G, T, dtype=F64)
    worst = 0.0
    for start in range(0, 2 * G, G):
        pool = torch.tensor([r for i in range(start, start + G) for r in rewards[i]], dtype=F64)
        mean, std = pool.mean().item(), pool.std().item()
        for i in range(start, start + G):
            for t in range(T):
                want = sum((r - mean) / std for r, e in zip(rewards[i], ends[i]) if e >= t)
                worst = max(worst, abs(got[i, t].item() - want))
    return worst


CLAIMS = [
    *[Claim(f"on-policy gradient = eq. 21, beta={b}", "DeepSeekMath eq. 20/21", eq21_gradient(b))
      for b in (0.0, 0.04, 0.5)],
    Claim("clipping is inert on-policy (ratio = 1)", "eq. 3 with pi_old = sg(pi_theta)", clipping_is_inert_on_policy),
    Claim("off-policy clipped-surrogate gradient", "PPO clip, eq. 3", clipped_gradient_off_policy),
    *[Claim(f"{lt} normaliser", "TRL 1.16 aggregation", normaliser(lt)) for lt in LOSS_TYPES],
    Claim("beta = 0: a row with A = 0 has gradient 0", "every surrogate is linear in A", zero_advantage_rows,
          tolerance=0.0),
    Claim("k1 on-policy: gradient 0 in expectation", "Schulman k1", kl_claim("k1", False, "zero")),
    Claim("k2 on-policy: grad KL(pi_theta||pi_ref)", "reverse KL", kl_claim("k2", False, "reverse")),
    Claim("k3 on-policy: grad KL(pi_ref||pi_theta)", "eq. 4 in the loss = forward KL",
          kl_claim("k3", False, "forward")),
    Claim("k3_is on-policy: grad KL(pi_theta||pi_ref)", "DeepSeek-V3.2", kl_claim("k3_is", False, "reverse")),
    Claim("k3_is off-policy: grad KL(pi_theta||pi_ref)", "DeepSeek-V3.2", kl_claim("k3_is", True, "reverse")),
    *[Claim(f"{e} off-policy: biased (neither KL)", "sampled from pi_old", kl_claim(e, True, "biased"))
      for e in ("k1", "k2", "k3")],
    Claim("kl_in_reward: grad of the sequence KL(pi_theta||pi_ref)", "k1 reward-to-go, Tang & Munos",
          sequence_kl_gradient("kl_in_reward")),
    Claim("per-token k2 summed: not the sequence KL gradient", "per-token KL loss", sequence_kl_gradient("k2_loss")),
    Claim("group advantages (r - mean) / (std + 1e-4)", "DeepSeekMath 4.1.2", group_advantage_formula),
    Claim("process advantages", "DeepSeekMath 4.1.3", process_advantage_formula),
]


def run_verify(seed: int = 0, trials: int = 5, print_fn=print) -> int:
    """Checks every claim on ``trials`` fresh random inputs; prints a table; returns 0 if all hold, else 1."""
    start = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    width = max(len(c.name) for c in CLAIMS)
    print_fn(f"{'claim':<{width}}  {'source':<32} {'max error':>10}  result")
    failures = 0
    for claim in CLAIMS:
        err = max(claim.check(g) for _ in range(trials))
        ok = err <= claim.tolerance
        failures += not ok
        print_fn(f"{claim.name:<{width}}  {claim.source:<32} {err:>10.1e}  {'ok' if ok else 'FAIL'}")
    elapsed = time.perf_counter() - start
    verdict = "all claims hold" if not failures else f"{failures} claim(s) FAILED"
    print_fn(f"\n{len(CLAIMS)} claims x {trials} random cases, float64, {elapsed:.1f} s: {verdict}")
    return 1 if failures else 0
