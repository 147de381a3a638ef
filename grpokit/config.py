"""``GRPOConfig``: every knob of a GRPO run, one field each, with its docstring and its check.

The YAML file of ``grpokit train --config`` and the ``--key value`` overrides are this dataclass's fields;
``GRPOConfig.from_dict`` rejects unknown keys and names the closest valid one. Validation lives in
``__post_init__`` only, and every error names the field.

Batch shapes, per rollout (one process):
    prompts_per_step prompts x num_generations completions  = N completions
    N / steps_per_rollout                                   = one mini-batch = one optimizer step
    mini-batch / micro_batch_size                           = forward/backward passes (gradient accumulation)
    num_iterations (mu) passes over the N completions       = num_iterations * steps_per_rollout optimizer steps
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from grpokit.losses import LossConfig
from grpokit.modeling import DEVICE_RE
from grpokit.peft_utils import check_peft_section

LR_SCHEDULERS = ("constant", "linear", "cosine")
SCALE_REWARDS = ("group", "batch", "none")
REPORT_TO = ("none", "jsonl", "tensorboard")
DTYPES = ("float32", "float64", "bfloat16", "float16")
DISTRIBUTED = ("ddp", "fsdp")


@dataclass
class GRPOConfig:
    """Configuration of a GRPO run (DeepSeekMath, arXiv 2402.03300). Defaults follow TRL 1.16 unless noted."""

    # ---- run ---------------------------------------------------------------------------------------------
    output_dir: str = "runs/grpo"
    """Where ``metrics.jsonl``, ``metrics.png``, ``config.yaml`` and ``checkpoint-<step>/`` go."""
    overwrite_output_dir: bool = False
    """Start afresh even if ``output_dir`` holds an earlier run (``metrics.jsonl`` or checkpoints), deleting
    them once the new run's first step is done. ``False``: such a start is refused (resume it instead)."""
    seed: int = 42
    """Seeds the model init (when built here), the data order and the sampler; same seed, same run on CPU."""
    max_steps: int = 200
    """Number of optimizer steps. TRL derives it from epochs when -1; grpokit always counts steps."""

    # ---- model -------------------------------------------------------------------------------------------
    device: str = "auto"
    """Where the policy and pi_ref run: ``auto`` (CUDA when torch sees a GPU, else CPU), ``cpu``, ``cuda``,
    ``cuda:N`` or ``mps``. Under ``auto`` a model passed in as an ``nn.Module`` stays on its device."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them: less memory for roughly a third
    more compute per update (TRL defaults to ``True``). The KV cache (``use_cache``) is off while training."""
    peft: dict[str, Any] | None = None
    """LoRA adapters (``grpokit.peft_utils``): a mapping of ``r`` (16), ``alpha`` (32), ``dropout`` (0.05),
    ``target_modules`` (``null``: peft's choice for the architecture; ``all-linear``; or a list of module
    names) and ``modules_to_save`` (modules trained in full, e.g. ``[model.norm]``; ``null``); ``{}`` takes
    every default. Only these train; pi_ref (beta > 0) is the base model with the adapters disabled, not a
    copy. ``None``: full fine-tuning."""

    # ---- optimiser (AdamW) -------------------------------------------------------------------------------
    learning_rate: float = 1e-6
    """Peak AdamW learning rate (TRL's default 1e-6, the paper's value; random-init tiny models want ~3e-3)."""
    lr_scheduler: str = "linear"
    """``constant``, ``linear`` (decay to 0 at ``max_steps``, as TRL/transformers) or ``cosine`` (to 0)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many optimizer steps."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this before each step; 0 disables clipping."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""

    # ---- batch shape -------------------------------------------------------------------------------------
    prompts_per_step: int = 8
    """Distinct prompts per rollout (all processes together). TRL's default batch is 8 completions, i.e. one
    prompt when ``num_generations=8``; grpokit defaults to 8 prompts so that a step sees several groups."""
    num_generations: int = 8
    """G, completions sampled per prompt (>= 2: the group baseline needs two)."""
    num_iterations: int = 1
    """mu, passes over each rollout (DeepSeekMath Alg. 1). 1 = on-policy: pi_old = sg(pi_theta)."""
    steps_per_rollout: int = 1
    """Optimizer steps per pass: each pass splits the rollout into this many mini-batches (TRL's
    ``steps_per_generation``)."""
    micro_batch_size: int | None = None
    """Completions per forward/backward; gradients accumulate over a mini-batch's micro-batches and the
    update is the same as with one big batch (up to float rounding). ``None``: the whole mini-batch."""

    # ---- generation --------------------------------------------------------------------------------------
    max_prompt_length: int | None = 512
    """Prompts longer than this many tokens keep their last ones (left truncation). ``None``: no limit.
    (TRL 1.16 dropped this option; older TRL defaulted to 512.)"""
    system_prompt: str | None = None
    """Prepended to chat prompts as a ``{"role": "system"}`` message (a row whose messages already start with
    a system message keeps its own), and to string prompts as plain text followed by a blank line. Reward
    functions see the prompt with it. ``None``: prompts as the dataset has them."""
    max_completion_length: int = 256
    """Most tokens sampled per completion; also the constant denominator of ``dr_grpo``. TRL: 512; 256 keeps
    CPU runs short."""
    temperature: float = 1.0
    """Sampling temperature; the loss uses log-probs of the same tempered distribution (log_softmax(z/T))."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 disables. Shapes sampling only, never the loss (as TRL)."""
    top_k: int = 0
    """Keep only the k most likely tokens when sampling; 0 disables. Sampling only (as TRL)."""

    # ---- loss (grpokit.losses.LossConfig) ----------------------------------------------------------------
    loss_type: str = "grpo"
    """``grpo`` (the paper: mean over each completion's tokens, then over completions), ``bnpo``,
    ``dr_grpo``, ``dapo``, ``cispo`` or ``sapo``; see ``grpokit.losses``. TRL defaults to ``dapo``."""
    beta: float = 0.0
    """KL coefficient (paper: 0.04; TRL: 0). 0 builds no reference model at all."""
    epsilon_low: float = 0.2
    """Lower clip range: the ratio is clipped below at ``1 - epsilon_low``."""
    epsilon: float | None = None
    """TRL's name for ``epsilon_low``; when given it sets ``epsilon_low`` and is then cleared."""
    epsilon_high: float | None = None
    """Upper clip range (``1 + epsilon_high``); ``None`` means ``epsilon_low``. For ``cispo``, the ratio cap."""
    delta: float | None = None
    """Two-sided clipping: also cap the unclipped ratio at ``delta`` (> 1 + epsilon_high). ``None``: off."""
    importance_sampling_level: str = "token"
    """``token`` (GRPO) or ``sequence`` (GSPO: exp of the mean log-ratio of the completion)."""
    kl_estimator: str = "k3"
    """Per-token KL penalty: ``k3`` (paper eq. 4), ``k1``, ``k2`` or ``k3_is`` (see ``grpokit.kl``)."""
    sapo_temperature_pos: float = 1.0
    """SAPO gate temperature for positive advantages."""
    sapo_temperature_neg: float = 1.05
    """SAPO gate temperature for zero or negative advantages."""

    # ---- rewards -----------------------------------------------------------------------------------------
    scale_rewards: str = "group"
    """Advantage scaling: ``group`` std (paper), ``batch`` std, or ``none`` (centre only, Dr. GRPO)."""
    mask_truncated_completions: bool = False
    """Leave completions that hit ``max_completion_length`` without EOS out of the loss (DAPO)."""
    reward_weights: list[float] | None = None
    """One weight per reward function (weighted sum, None entries skipped); ``None``: all 1."""

    # ---- beyond outcome GRPO: advantages, process supervision, DAPO, KL, iterative RL, mismatch --------------
    advantage_estimator: str = "grpo"
    """Outcome advantages (``grpokit.advantages.ADVANTAGE_ESTIMATORS``): ``grpo`` (group-normalised, the paper;
    ``scale_rewards`` applies), ``rloo`` (leave-one-out baseline, unbiased) or ``dr_grpo`` (centred, unscaled)."""
    process_supervision: bool = False
    """DeepSeekMath 4.1.3: reward functions may score each step of a completion (a number, step rewards with
    ``step_delimiter``, (reward, char_end) pairs or ``{"steps", "ends"}``; see ``grpokit.process``); token t's
    advantage is the sum of the group-normalised rewards of the steps ending at or after it."""
    step_delimiter: str | None = None
    """With ``process_supervision``: the text that ends a step (e.g. ``"\n"``), so that a reward function can
    return plain per-step rewards, one per delimited step. ``None``: steps carry their own character ends."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal (advantage 0) and sample new prompts until
    ``prompts_per_step`` informative groups are gathered (``grpokit.dynamic_sampling``)."""
    max_sampling_rounds: int = 4
    """Most sampling rounds per rollout with ``dynamic_sampling``; if still short, flat groups fill the batch."""
    kl_in_reward: bool = False
    """Put the KL in the reward instead of the loss: each token's advantage gets ``-beta * sum_{s>=t} sg(k1_s)``
    (``grpokit.kl.kl_reward_to_go``: the exact gradient of the sequence KL(pi_theta||pi_ref)); needs beta > 0,
    and then the loss has no KL term (``kl_estimator`` unused). ``kl`` logs the rollout's mean k1."""
    log_exact_kl: bool = False
    """Log ``kl_exact_reverse`` / ``kl_exact_forward`` (exact full-vocabulary per-token KL to pi_ref) even with
    beta = 0, keeping a frozen reference for it; with beta > 0 they are always logged."""
    ref_reset_steps: int = 0
    """Iterative RL (DeepSeekMath 4.1.4): pi_ref <- pi_theta every this many optimizer steps (a multiple of
    ``num_iterations * steps_per_rollout``); 0: pi_ref stays the initial policy."""
    ref_sync_alpha: float | None = None
    """Polyak refresh of pi_ref every ``ref_sync_steps``: pi_ref <- alpha * pi_theta + (1 - alpha) * pi_ref,
    alpha in (0, 1] (TRL's ``ref_model_mixup_alpha``). ``None``: off."""
    ref_sync_steps: int = 0
    """Optimizer steps between Polyak refreshes (with ``ref_sync_alpha``; a multiple of ``num_iterations *
    steps_per_rollout``)."""
    reward_model_update_steps: int = 0
    """Every this many optimizer steps, call ``update(samples)`` on each learned reward function (one with an
    ``update`` method; ``grpokit.reward_model``) with the new samples plus a replay of old ones; 0: never."""
    reward_model_replay_fraction: float = 0.1
    """Share of replayed historical samples in each reward-model update (DeepSeekMath: 10%), in [0, 1)."""
    reward_model_buffer_size: int = 10000
    """Historical samples kept for the replay (a uniform reservoir)."""
    tis: str | None = None
    """Truncated importance sampling for a sampler/trainer mismatch (``grpokit.mismatch``): ``token`` weights
    each token's loss by ``min(pi_old/pi_sampler, tis_cap)``, ``sequence`` by the capped sequence ratio;
    ``None``: off. pi_sampler is the sampler's recorded log-prob (``Rollout.sampling_logps``)."""
    tis_cap: float = 2.0
    """Upper cap of the TIS weight (> 0)."""

    # ---- bookkeeping -------------------------------------------------------------------------------------
    save_steps: int = 500
    """Write ``checkpoint-<step>/`` every this many optimizer steps (and always at the end); 0: only at the end."""
    save_total_limit: int | None = None
    """Keep only the newest this many checkpoints; ``None``: keep all."""
    logging_steps: int = 10
    """Print a progress line every this many steps when stdout is not a TTY (``metrics.jsonl`` gets every
    step regardless)."""
    log_completions_steps: int = 0
    """Every this many steps, print a table of sample prompts, completions, rewards and advantages, and
    append that rollout's completions to ``samples.jsonl``. 0: never."""
    report_to: str = "jsonl"
    """``jsonl``, ``tensorboard`` (also TensorBoard event files in ``output_dir/tensorboard/``) or ``none``;
    ``metrics.jsonl`` is written in every case."""
    dtype: str = "float32"
    """Parameter dtype: ``float32`` (default; TRL uses bf16 on GPUs), ``float64`` (exactness checks),
    ``bfloat16``, ``float16``."""
    logprob_chunk_size: int | None = None
    """Tokens per chunk when computing log-probs through the LM head (bounds the B*T*V logits memory);
    ``None``: ``grpokit.logprobs``'s default."""
    padding_free: bool = True
    """Llama-family models (Llama, Mistral, Qwen2, Qwen3): the training forward computes only real tokens,
    each group's prompt once (``grpokit.packed``); the same log-probs and gradients up to float rounding.
    ``False``: the Hugging Face forward over the padded batch. Other models always use the latter."""
    skip_zero_advantage: bool = True
    """With beta = 0, a completion whose advantage is 0 on every loss token (a group whose rewards are all
    equal) adds exactly 0 to the loss and its gradient, so it is not backpropagated. With one update per
    rollout it is not run at all (its ratio is 1; its logged entropy is the sampler's); otherwise it runs
    forward without autograd, for the logged entropy and ratios. The update and the metrics are the same up to
    float rounding. One process only (under torchrun every row runs through autograd). ``False``: every row
    is backpropagated."""

    # ---- several processes (torchrun; grpokit.distributed) -----------------------------------------------
    distributed: str = "ddp"
    """How the model is spread over the processes of a ``torchrun`` launch: ``ddp`` (a full replica on each,
    gradients all-reduced) or ``fsdp`` (parameters, gradients and AdamW moments sharded with FSDP2, for models
    that do not fit one device). Ignored by a single process."""

    def __post_init__(self) -> None:
        if self.epsilon is not None:
            _check_real("epsilon", self.epsilon, low=0.0)
            self.epsilon_low, self.epsilon = float(self.epsilon), None
        _check_int("seed", self.seed, low=0)
        _check_int("max_steps", self.max_steps, low=1)
        if not isinstance(self.device, str) or not DEVICE_RE.match(self.device):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps; got {self.device!r}")
        _check_bool("gradient_checkpointing", self.gradient_checkpointing)
        _check_bool("padding_free", self.padding_free)
        _check_bool("skip_zero_advantage", self.skip_zero_advantage)
        self.peft = check_peft_section(self.peft)
        if self.peft is not None and (self.log_exact_kl or self.ref_reset_steps or self.ref_sync_steps):
            raise ValueError("peft: pi_ref of a LoRA run is the base model with adapters off; log_exact_kl, "
                             "ref_reset_steps and ref_sync_steps need a separate reference model (full fine-tuning)")
        _check_real("learning_rate", self.learning_rate, low=0.0, strict=True)
        _check_choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _check_int("warmup_steps", self.warmup_steps, low=0)
        _check_real("weight_decay", self.weight_decay, low=0.0)
        _check_real("max_grad_norm", self.max_grad_norm, low=0.0)
        for name in ("adam_beta1", "adam_beta2"):
            _check_real(name, getattr(self, name), low=0.0)
            if getattr(self, name) >= 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        _check_real("adam_epsilon", self.adam_epsilon, low=0.0, strict=True)

        _check_int("prompts_per_step", self.prompts_per_step, low=1)
        _check_int("num_generations", self.num_generations, low=2,
                   why="GRPO's group baseline needs at least 2 completions per prompt")
        _check_int("num_iterations", self.num_iterations, low=1)
        _check_int("steps_per_rollout", self.steps_per_rollout, low=1)
        n = self.prompts_per_step * self.num_generations
        if n % self.steps_per_rollout:
            raise ValueError(f"steps_per_rollout={self.steps_per_rollout} must divide prompts_per_step * "
                             f"num_generations = {self.prompts_per_step} * {self.num_generations} = {n}")
        if self.micro_batch_size is not None:
            _check_int("micro_batch_size", self.micro_batch_size, low=1)
            if self.mini_batch_size % self.micro_batch_size:
                raise ValueError(f"micro_batch_size={self.micro_batch_size} must divide the mini-batch of "
                                 f"{self.mini_batch_size} completions (prompts_per_step * num_generations / "
                                 f"steps_per_rollout)")

        if self.max_prompt_length is not None:
            _check_int("max_prompt_length", self.max_prompt_length, low=1)
        _check_int("max_completion_length", self.max_completion_length, low=1)
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ValueError(f"system_prompt must be a string or null, got {self.system_prompt!r}")
        _check_real("temperature", self.temperature, low=0.0, strict=True)
        _check_real("top_p", self.top_p, low=0.0, strict=True)
        if self.top_p > 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        _check_int("top_k", self.top_k, low=0)

        _check_choice("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        _check_bool("mask_truncated_completions", self.mask_truncated_completions)
        if self.reward_weights is not None:
            if not isinstance(self.reward_weights, (list, tuple)) or not self.reward_weights:
                raise ValueError(f"reward_weights must be a non-empty list of numbers, got {self.reward_weights!r}")
            for i, w in enumerate(self.reward_weights):
                _check_real(f"reward_weights[{i}]", w, low=float("-inf"))
            self.reward_weights = [float(w) for w in self.reward_weights]

        _check_int("save_steps", self.save_steps, low=0)
        if self.save_total_limit is not None:
            _check_int("save_total_limit", self.save_total_limit, low=1)
        _check_int("logging_steps", self.logging_steps, low=1)
        _check_choice("report_to", self.report_to, REPORT_TO)
        _check_int("log_completions_steps", self.log_completions_steps, low=0)
        _check_choice("dtype", self.dtype, DTYPES)
        if self.logprob_chunk_size is not None:
            _check_int("logprob_chunk_size", self.logprob_chunk_size, low=1)
        _check_choice("distributed", self.distributed, DISTRIBUTED)
        if not isinstance(self.output_dir, (str, Path)) or not str(self.output_dir):
            raise ValueError(f"output_dir must be a non-empty path, got {self.output_dir!r}")
        self.output_dir = str(self.output_dir)
        _check_bool("overwrite_output_dir", self.overwrite_output_dir)
        self._check_extensions()
        self.loss_config()  # LossConfig validates the loss fields and names the culprit

    def _check_extensions(self) -> None:
        """Validation of the fields of the "beyond outcome GRPO" section."""
        from grpokit.advantages import ADVANTAGE_ESTIMATORS
        from grpokit.mismatch import TIS_LEVELS

        _check_choice("advantage_estimator", self.advantage_estimator, tuple(ADVANTAGE_ESTIMATORS))
        if self.advantage_estimator != "grpo" and self.scale_rewards != "group":
            raise ValueError(f"scale_rewards applies to advantage_estimator 'grpo' only; got scale_rewards="
                             f"{self.scale_rewards!r} with advantage_estimator={self.advantage_estimator!r}")
        for name in ("process_supervision", "dynamic_sampling", "kl_in_reward", "log_exact_kl"):
            _check_bool(name, getattr(self, name))
        if self.step_delimiter is not None:
            if not isinstance(self.step_delimiter, str) or not self.step_delimiter:
                raise ValueError(f"step_delimiter must be a non-empty string or null, got {self.step_delimiter!r}")
            if not self.process_supervision:
                raise ValueError("step_delimiter needs process_supervision: true")
        if self.process_supervision and (self.advantage_estimator != "grpo" or self.scale_rewards != "group"):
            raise ValueError("process_supervision normalises step rewards by their group's mean and std "
                             "(DeepSeekMath 4.1.3): leave advantage_estimator 'grpo' and scale_rewards 'group'")
        _check_int("max_sampling_rounds", self.max_sampling_rounds, low=1)
        if self.kl_in_reward and self.beta == 0:
            raise ValueError("kl_in_reward needs beta > 0 (beta is the KL coefficient in the reward)")
        _check_int("ref_reset_steps", self.ref_reset_steps, low=0)
        _check_int("ref_sync_steps", self.ref_sync_steps, low=0)
        if self.ref_sync_alpha is not None:
            _check_real("ref_sync_alpha", self.ref_sync_alpha, low=0.0, strict=True)
            if self.ref_sync_alpha > 1 or not self.ref_sync_steps:
                raise ValueError(f"ref_sync_alpha must be in (0, 1] and needs ref_sync_steps > 0, got "
                                 f"ref_sync_alpha={self.ref_sync_alpha!r}, ref_sync_steps={self.ref_sync_steps}")
        elif self.ref_sync_steps:
            raise ValueError("ref_sync_steps needs ref_sync_alpha (the Polyak coefficient)")
        if self.ref_reset_steps and self.ref_sync_steps:
            raise ValueError("give ref_reset_steps (hard resets) or ref_sync_alpha/ref_sync_steps (Polyak), not both")
        for name in ("ref_reset_steps", "ref_sync_steps"):
            value = getattr(self, name)
            if value and value % self.steps_per_generation_cycle:
                raise ValueError(f"{name}={value} must be a multiple of num_iterations * steps_per_rollout = "
                                 f"{self.steps_per_generation_cycle}, so that pi_ref changes between rollouts")
            if value and self.beta == 0 and not self.log_exact_kl:
                raise ValueError(f"{name} refreshes pi_ref, which is unused with beta = 0; set beta > 0 "
                                 "(or log_exact_kl: true)")
        _check_int("reward_model_update_steps", self.reward_model_update_steps, low=0)
        _check_real("reward_model_replay_fraction", self.reward_model_replay_fraction, low=0.0)
        if self.reward_model_replay_fraction >= 1:
            raise ValueError(f"reward_model_replay_fraction must be in [0, 1), got {self.reward_model_replay_fraction}")
        _check_int("reward_model_buffer_size", self.reward_model_buffer_size, low=1)
        if self.tis is not None:
            _check_choice("tis", self.tis, TIS_LEVELS)
        _check_real("tis_cap", self.tis_cap, low=0.0, strict=True)

    # ---- derived quantities ------------------------------------------------------------------------------

    @property
    def rollout_size(self) -> int:
        """Completions per rollout: prompts_per_step * num_generations."""
        return self.prompts_per_step * self.num_generations

    @property
    def mini_batch_size(self) -> int:
        """Completions per optimizer step."""
        return self.rollout_size // self.steps_per_rollout

    @property
    def micro_batch(self) -> int:
        """Completions per forward/backward (``micro_batch_size`` or the whole mini-batch)."""
        return self.mini_batch_size if self.micro_batch_size is None else self.micro_batch_size

    @property
    def steps_per_generation_cycle(self) -> int:
        """Optimizer steps fed by one rollout: num_iterations * steps_per_rollout."""
        return self.num_iterations * self.steps_per_rollout

    def loss_config(self) -> LossConfig:
        """The ``LossConfig`` these fields describe (``max_completion_length`` is shared with generation; with
        ``kl_in_reward`` the KL is in the advantages, so the loss's beta is 0)."""
        beta = 0.0 if self.kl_in_reward else self.beta
        return LossConfig(
            loss_type=self.loss_type, beta=beta, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
            delta=self.delta, importance_sampling_level=self.importance_sampling_level,
            kl_estimator=self.kl_estimator, max_completion_length=self.max_completion_length,
            sapo_temperature_pos=self.sapo_temperature_pos, sapo_temperature_neg=self.sapo_temperature_neg,
        )

    # ---- serialisation -----------------------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GRPOConfig:
        """Build from a mapping of field names; an unknown key raises ValueError naming the closest field."""
        if not isinstance(data, dict):
            raise ValueError(f"a GRPO config must be a mapping of field: value, got {type(data).__name__}")
        check_keys(data, cls.field_names())
        return cls(**{key: _coerce_number(cls, key, value) for key, value in data.items()})

    @classmethod
    def from_yaml(cls, path: str | Path) -> GRPOConfig:
        return cls.from_dict(read_yaml(path))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "epsilon"}

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The resolved config as YAML (every field, in declaration order); written to ``path`` if given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def replace(self, **changes: Any) -> GRPOConfig:
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------------------


def field_docs() -> dict[str, str]:
    """{field: the docstring written under it in ``GRPOConfig``} (read from this file's source)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(GRPOConfig))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def closest(name: str, choices: tuple[str, ...] | list[str]) -> str | None:
    """The valid name closest to a misspelt one (difflib), or None when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return match[0] if match else None


def check_keys(data: dict[str, Any], valid: tuple[str, ...] | list[str]) -> None:
    """ValueError for the first key of ``data`` not in ``valid``, suggesting the closest valid one."""
    for key in data:
        if key not in valid:
            hint = closest(str(key), valid)
            suggestion = f"; did you mean {hint!r}?" if hint else "; see `grpokit train --help` for the fields"
            raise ValueError(f"unknown config key {key!r}{suggestion}")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {yaml_error_summary(e)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {str(path)!r} cannot be read: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of key: value, got {type(data).__name__}")
    return data


def yaml_error_summary(error: Exception) -> str:
    """One line for a PyYAML error: ``line L, column C: problem`` (PyYAML's own text spans several lines)."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or getattr(error, "context", None) or str(error)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(problem).split())


def _coerce_number(cls: type, name: str, value: Any) -> Any:
    """YAML 1.1 reads ``1e-6`` (no dot) as a string; accept it for float fields."""
    annotation = str(next(f.type for f in fields(cls) if f.name == name))
    if isinstance(value, str) and "float" in annotation:
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_int(name: str, value: object, *, low: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        extra = f" ({why})" if why else ""
        raise ValueError(f"{name} must be an integer >= {low}{extra}, got {value!r}")


def _check_real(name: str, value: object, *, low: float, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    ok = ok and abs(value) != float("inf") and (value > low if strict else value >= low)
    if not ok:
        bound = "" if low == float("-inf") else f" {'>' if strict else '>='} {low}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
