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

import ast
import dataclasses
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from grpokit.advantages import ADVANTAGE_ESTIMATORS, SCALES
from grpokit.losses import LossConfig
from grpokit.mismatch import TIS_LEVELS
from grpokit.util import check_bool, check_choice, check_int, check_keys, check_real, closest

DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
PEFT_DEFAULTS: dict[str, Any] = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": None,
                                 "modules_to_save": None}
"""TRL's ``ModelConfig`` LoRA defaults. ``target_modules: None`` lets peft pick per architecture (q_proj and
v_proj for Llama/Qwen); ``"all-linear"`` adapts every linear layer but the LM head. ``modules_to_save``: names
of modules trained in full, as a copy beside the frozen original (e.g. ``[norm]``, or ``[embed_tokens]`` after
adding tokens); ``None``: none."""


def check_peft_section(section: Any) -> dict[str, Any] | None:
    """The ``peft`` config field, validated and completed with ``PEFT_DEFAULTS`` (``None`` stays ``None``).
    Every error names the key, e.g. ``peft.r must be an integer >= 1, got 0``."""
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ValueError(f"peft must be a mapping like {{r: 16, alpha: 32, dropout: 0.05, target_modules: null}} "
                         f"or null, got {section!r}")
    for key in section:
        if key not in PEFT_DEFAULTS:
            hint = closest(str(key), list(PEFT_DEFAULTS))
            raise ValueError(f"unknown peft key {key!r}" + (f"; did you mean {hint!r}?" if hint else "")
                             + f" (keys: {', '.join(PEFT_DEFAULTS)})")
    out = {**PEFT_DEFAULTS, **section}
    r, alpha, dropout, targets = out["r"], out["alpha"], out["dropout"], out["target_modules"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"peft.r must be an integer >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"peft.alpha must be a number > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"peft.dropout must be a number in [0, 1), got {dropout!r}")
    if targets is not None and not isinstance(targets, str):
        if not isinstance(targets, (list, tuple)) or not targets or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"peft.target_modules must be null, 'all-linear' or a list of module names, "
                             f"got {targets!r}")
        targets = list(targets)
    saved = out["modules_to_save"]
    if saved is not None:
        if not isinstance(saved, (list, tuple)) or not saved or not all(isinstance(t, str) for t in saved):
            raise ValueError(f"peft.modules_to_save must be null or a list of module names, got {saved!r}")
        saved = list(saved)
    return {"r": r, "alpha": alpha, "dropout": float(dropout), "target_modules": targets, "modules_to_save": saved}



LR_SCHEDULERS = ("constant", "linear", "cosine")
REPORT_TO = ("none", "jsonl", "tensorboard", "wandb", "trackio", "mlflow", "all")
"""``report_to`` names: the trackers of ``grpokit.reporting.trackers.TRACKERS`` (a test holds them equal), plus
``jsonl`` / ``none`` (no tracker) and ``all``."""
DTYPES = ("float32", "float64", "bfloat16", "float16")
DISTRIBUTED = ("ddp", "fsdp")
ROLLOUT_ENGINES = ("auto", "lean", "hf", "vllm")
PROMPT_TRUNCATION = ("left", "error")
REWARD_ON_ERROR = ("raise", "none")
"""``reward_on_error`` values: ``grpokit.rewards.runner.ON_ERROR`` (a test holds them equal)."""
"""``rollout_engine`` values: the keys of ``grpokit.rollout.ENGINES`` (a test holds them equal)."""
TOOL_CALL_PARSERS = ("auto", "hermes", "compact")
"""Built-in ``tool_call_parser`` names: ``grpokit.rollout.tools.PARSERS`` (a test holds them equal)."""


@dataclass
class GRPOConfig(LossConfig):
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
    """LoRA adapters (``grpokit.models.lora``): a mapping of ``r`` (16), ``alpha`` (32), ``dropout`` (0.05),
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
    optimizer_in_backward: bool | None = None
    """Take the clipped AdamW step inside the backward, parameter by parameter, freeing each gradient once
    used, so that the step never holds a full set of gradients (``grpokit.training.step_in_backward``: the
    forward and backward run twice, once for the global norm, once for the step; the same step up to float
    rounding).
    It needs the whole step in one backward (``micro_batch_size`` unset or the mini-batch) and one process.
    ``None``: on for one process when the trainable parameters' gradients would hold 256 MiB or more and the
    step's rows carrying gradient fit one micro-batch; ``False``: the usual step after the backward."""
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
    """Prompts longer than this many tokens keep their last ones (left truncation) or are an error, as
    ``prompt_truncation`` says. ``None``: no limit. (TRL 1.16 dropped this option; older TRL defaulted to 512.)"""
    prompt_truncation: str = "left"
    """What a prompt longer than ``max_prompt_length`` gets: ``left`` keeps its last tokens (a warning names
    the first such dataset row, and the run ends with their count), ``error`` stops the run naming the row."""
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

    rollout_engine: str = "auto"
    """What samples the completions (``grpokit.rollout``): ``lean`` (grpokit's Llama-family decoder over the
    training weights: the fastest for small models on a CPU), ``hf`` (any Hugging Face causal LM, through its
    own forward), ``vllm`` (vLLM in this process, with its own copy of the weights, pushed before each rollout
    when they changed: the engine for real models; ``pip install grpokit[vllm]``), or ``auto`` (``lean`` where
    it applies, else ``hf``)."""
    vllm_gpu_memory_utilization: float = 0.3
    """``rollout_engine: vllm`` on CUDA: the share of GPU memory vLLM may take for its weights and KV cache
    (TRL's name and default)."""
    vllm_max_model_length: int | None = None
    """``rollout_engine: vllm``: the longest prompt + completion vLLM plans for. ``None``: the longest prompt
    (``max_prompt_length``, else the model's limit) plus ``max_completion_length``."""
    vllm_tensor_parallel_size: int = 1
    """``rollout_engine: vllm``: GPUs each engine spans (tensor parallelism)."""
    vllm_enable_sleep_mode: bool = False
    """``rollout_engine: vllm`` on CUDA: free vLLM's weights and KV cache after each rollout and take them back
    before the next, so that training gets that memory (TRL's name). Not available on a CPU."""
    vllm_kv_cache_gb: float | None = None
    """``rollout_engine: vllm``: GiB of memory for vLLM's KV cache (``kv_cache_memory_bytes``; on CUDA it then
    replaces ``vllm_gpu_memory_utilization``'s sizing of the cache). ``None``: 1 GiB on a CPU (ample for
    CPU-sized models; ``VLLM_CPU_KVCACHE_SPACE`` is honoured when set), vLLM's own sizing on CUDA."""
    vllm_enforce_eager: bool | None = None
    """``rollout_engine: vllm``: run without CUDA graphs / compilation (faster start, slower decoding).
    ``None``: eager on a CPU, graphs on CUDA."""

    # ---- multi-turn rollouts (GRPOTrainer's tools / environment_factory; grpokit.rollout.multi_turn) ----------
    max_tool_calling_iterations: int | None = None
    """Most rounds of tool calls in one episode (TRL's name); the model's turn after the last round ends the
    episode whatever it says. ``None``: no limit but ``max_completion_length``, which bounds the whole
    transcript (model and tool tokens) and defines truncation."""
    max_turn_length: int | None = None
    """Most tokens the model samples in one turn of an episode. ``None``: whatever the transcript has left of
    ``max_completion_length``."""
    tool_call_parser: str | Callable = "auto"
    """How tool calls are read from a model turn (``grpokit.rollout.tools``): ``hermes`` (Hermes / Qwen
    ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``), ``compact`` (``!name arg ...`` lines, a name
    cut to a prefix only one tool has; for tiny models), ``auto`` (``hermes`` for chat prompts, ``compact`` for
    plain-string prompts), ``"module:function"`` or a callable ``str -> [{"name": str, "arguments": dict}]``."""
    tool_timeout: float | None = None
    """Seconds a tool call may run before the model reads a timeout error instead of its result. ``None``: no
    limit."""

    # ---- loss (grpokit.losses.LossConfig) ----------------------------------------------------------------
    # loss_type, beta, epsilon_low, epsilon_high, delta, importance_sampling_level, kl_estimator,
    # sapo_temperature_pos, sapo_temperature_neg: inherited from LossConfig, which declares and checks them
    epsilon: float | None = None
    """TRL's name for ``epsilon_low``; when given it sets ``epsilon_low`` and is then cleared."""

    # ---- rewards -----------------------------------------------------------------------------------------
    scale_rewards: str = "group"
    """Advantage scaling: ``group`` std (paper), ``batch`` std, or ``none`` (centre only, Dr. GRPO)."""
    mask_truncated_completions: bool = False
    """Leave completions that hit ``max_completion_length`` without EOS out of the loss (DAPO)."""
    reward_weights: list[float] | None = None
    """One weight per reward function (weighted sum, None entries skipped); ``None``: all 1."""
    reward_timeout_s: float | None = None
    """Seconds one call of a reward function may take (``grpokit.rewards.runner``): a module-level function runs
    in a worker process, killed and replaced when it overruns; an ``async def`` function is cancelled; other
    callables (lambdas, closures, objects) run in a thread that is no longer waited for. ``None``: no limit,
    every function called directly in this process."""
    reward_on_error: str = "raise"
    """When a reward function raises, times out, or returns NaN or inf for a sample: ``raise`` stops the run
    with one line naming the function, the dataset row and the exception, after saving a checkpoint of the last
    finished step; ``none`` scores that sample ``None`` (left out of its group's baseline, like an unscored
    sample) and counts it in ``rewards/<name>/errors`` / ``rewards/<name>/timeouts``."""

    # ---- beyond outcome GRPO: advantages, process supervision, DAPO, KL, iterative RL, mismatch --------------
    advantage_estimator: str = "grpo"
    """Outcome advantages (``grpokit.advantages.ADVANTAGE_ESTIMATORS``): ``grpo`` (group-normalised, the paper;
    ``scale_rewards`` applies), ``rloo`` (leave-one-out baseline, unbiased) or ``dr_grpo`` (centred, unscaled)."""
    process_supervision: bool = False
    """DeepSeekMath 4.1.3: reward functions may score each step of a completion (a number, step rewards with
    ``step_delimiter``, (reward, char_end) pairs or ``{"steps", "ends"}``; see ``grpokit.rewards.process``); token t's
    advantage is the sum of the group-normalised rewards of the steps ending at or after it."""
    step_delimiter: str | None = None
    """With ``process_supervision``: the text that ends a step (e.g. ``"\n"``), so that a reward function can
    return plain per-step rewards, one per delimited step. ``None``: steps carry their own character ends."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal (advantage 0) and sample new prompts until
    ``prompts_per_step`` informative groups are gathered (``grpokit.training.dynamic_sampling``)."""
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
    ``update`` method; ``grpokit.rewards.learned``) with the new samples plus a replay of old ones; 0: never."""
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

    # ---- data and evaluation (grpokit.training.data, grpokit.training.evaluate) -----------------------------
    dataset_config: str | None = None
    """The configuration (subset) of a dataset loaded by name with ``datasets.load_dataset`` (its ``name``)."""
    dataset_split: str = "train"
    """The split of the training dataset (a dataset by name, a data folder or a ``DatasetDict``)."""
    eval_dataset: str | None = None
    """Prompts to evaluate on: a file, a data folder or a dataset name, as the training dataset
    (``GRPOTrainer(eval_dataset=...)`` also takes a ``Dataset`` or a list of dicts). ``None``: with
    ``eval_split``, that split of the training dataset; else no evaluation."""
    eval_split: str | None = None
    """The split of ``eval_dataset``, or, without one, of the training dataset (``test``...); ``None``: ``train``
    for ``eval_dataset``."""
    eval_steps: int = 0
    """Evaluate every this many optimizer steps, and before the first and after the last: the policy answers
    the eval prompts through the run's rollout engine and ``eval/reward``, ``eval/rewards/<name>``,
    ``eval/pass@k`` and ``eval/completion_length`` join the metrics row of that step (step 0: a row of its
    own). 0: never."""
    num_generations_eval: int | None = None
    """Completions per eval prompt, n; ``eval/pass@k`` is reported for k = 1, 2, 4... up to n (TRL's name).
    ``None``: ``num_generations``."""
    eval_temperature: float | None = None
    """Sampling temperature of the evaluation; 0: greedy (the most likely token, as ``top_k`` 1). ``None``: the
    training ``temperature``."""
    eval_threshold: float = 1.0
    """An eval completion counts as correct for pass@k when its combined reward is >= this."""

    # ---- bookkeeping -------------------------------------------------------------------------------------
    save_steps: int = 500
    """Write ``checkpoint-<step>/`` every this many optimizer steps (and always at the end); 0: only at the end."""
    save_total_limit: int | None = None
    """Keep only the newest this many checkpoints (plus the best one with ``metric_for_best_model``); ``None``:
    keep all. The checkpoint just written is never deleted."""
    metric_for_best_model: str | None = None
    """A ``metrics.jsonl`` key (e.g. ``reward``): the checkpoint whose step logged its best value is kept beyond
    ``save_total_limit`` and named in each checkpoint's ``trainer_state.json`` (``best_model_checkpoint``,
    ``best_metric``). ``None``: no best checkpoint."""
    greater_is_better: bool | None = None
    """Whether a larger ``metric_for_best_model`` is better. ``None``: yes, unless its name ends in ``loss``
    (transformers' rule)."""
    logging_steps: int = 10
    """Print a progress line every this many steps when stdout is not a TTY (``metrics.jsonl`` gets every
    step regardless)."""
    log_completions_steps: int = 0
    """Every this many steps, print a table of sample prompts, completions, rewards and advantages, and
    append that rollout's completions to ``samples.jsonl``. 0: never."""
    report_to: str | list[str] = "jsonl"
    """Experiment trackers that get the run's config, every metrics row, the completion samples of
    ``log_completions_steps`` as a table and ``metrics.png`` (``docs/tracking.md``): one name or a list of
    ``tensorboard`` (event files in ``output_dir/tensorboard/``), ``wandb``, ``trackio``, ``mlflow``; ``all``
    (every one whose package is installed, as transformers), ``jsonl`` or ``none`` (no tracker).
    ``metrics.jsonl`` is written in every case; only rank 0 reports under torchrun."""
    run_name: str | None = None
    """The run's name in the trackers (transformers' name); ``None``: each tracker makes one up."""
    project: str | None = None
    """The trackers' project (wandb, trackio) or experiment (MLflow); ``None``: ``WANDB_PROJECT`` /
    ``MLFLOW_EXPERIMENT_NAME`` where set, else ``grpokit``."""
    push_to_hub: bool = False
    """At the end, upload ``output_dir/final/`` (model or LoRA adapters, tokenizer, model card) to the Hugging
    Face Hub repository ``hub_model_id``, created if needed (``huggingface_hub``; needs a login)."""
    hub_model_id: str | None = None
    """The Hub repository of ``push_to_hub``, ``user/name`` or ``name``; ``None``: the name of ``output_dir``."""
    dtype: str = "float32"
    """Parameter dtype: ``float32`` (default), ``float64`` (exactness checks), ``bfloat16``, ``float16``. The
    whole model, optimizer state included, is cast to it; for mixed precision keep ``float32`` and set ``bf16``."""
    bf16: bool = False
    """bf16 mixed precision (TRL's name): float32 master weights and AdamW state, bfloat16 compute through
    ``torch.autocast`` in the training forward and the rollout-time log-probs, bfloat16 projections and KV cache
    in the in-process samplers (``lean``, ``hf``); log-sum-exps, log-probs, the loss and its reductions stay
    float32. Fastest on GPUs and on CPUs with bfloat16 matrix units (AVX-512 BF16, AMX)."""
    logprob_chunk_size: int | None = None
    """Tokens per chunk when computing log-probs through the LM head (bounds the B*T*V logits memory);
    ``None``: ``grpokit.logprobs``'s default."""
    padding_free: bool = True
    """Llama-family models (Llama, Mistral, Qwen2, Qwen3): the training forward computes only real tokens,
    each group's prompt once (``grpokit.models.packed``); the same log-probs and gradients up to float rounding.
    ``False``: the Hugging Face forward over the padded batch. Other models always use the latter."""
    skip_zero_advantage: bool = True
    """With beta = 0, a completion whose advantage is 0 on every loss token (a group whose rewards are all
    equal) adds exactly 0 to the loss and its gradient, so it is not backpropagated. With one update per
    rollout it is not run at all (its ratio is 1; its logged entropy is the sampler's); otherwise it runs
    forward without autograd, for the logged entropy and ratios. The update and the metrics are the same up to
    float rounding. One process only (under torchrun every row runs through autograd). ``False``: every row
    is backpropagated."""

    # ---- several processes (torchrun; grpokit.training.distributed) -----------------------------------------------
    distributed: str = "ddp"
    """How the model is spread over the processes of a ``torchrun`` launch: ``ddp`` (a full replica on each,
    gradients all-reduced) or ``fsdp`` (parameters, gradients and AdamW moments sharded with FSDP2, for models
    that do not fit one device). Ignored by a single process."""

    def __post_init__(self) -> None:
        if self.epsilon is not None:
            check_real("epsilon", self.epsilon, low=0.0)
            self.epsilon_low, self.epsilon = float(self.epsilon), None
        check_int("seed", self.seed, low=0)
        check_int("max_steps", self.max_steps, low=1)
        if not isinstance(self.device, str) or not DEVICE_RE.match(self.device):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps; got {self.device!r}")
        check_bool("gradient_checkpointing", self.gradient_checkpointing)
        check_bool("padding_free", self.padding_free)
        check_bool("skip_zero_advantage", self.skip_zero_advantage)
        self.peft = check_peft_section(self.peft)
        if self.peft is not None and (self.log_exact_kl or self.ref_reset_steps or self.ref_sync_steps):
            raise ValueError("peft: pi_ref of a LoRA run is the base model with adapters off; log_exact_kl, "
                             "ref_reset_steps and ref_sync_steps need a separate reference model (full fine-tuning)")
        check_real("learning_rate", self.learning_rate, low=0.0, strict=True)
        check_choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        check_int("warmup_steps", self.warmup_steps, low=0)
        check_real("weight_decay", self.weight_decay, low=0.0)
        check_real("max_grad_norm", self.max_grad_norm, low=0.0)
        if self.optimizer_in_backward is not None:
            check_bool("optimizer_in_backward", self.optimizer_in_backward)
        for name in ("adam_beta1", "adam_beta2"):
            check_real(name, getattr(self, name), low=0.0)
            if getattr(self, name) >= 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        check_real("adam_epsilon", self.adam_epsilon, low=0.0, strict=True)

        check_int("prompts_per_step", self.prompts_per_step, low=1)
        check_int("num_generations", self.num_generations, low=2,
                   why="GRPO's group baseline needs at least 2 completions per prompt")
        check_int("num_iterations", self.num_iterations, low=1)
        check_int("steps_per_rollout", self.steps_per_rollout, low=1)
        n = self.prompts_per_step * self.num_generations
        if n % self.steps_per_rollout:
            raise ValueError(f"steps_per_rollout={self.steps_per_rollout} must divide prompts_per_step * "
                             f"num_generations = {self.prompts_per_step} * {self.num_generations} = {n}")
        if self.micro_batch_size is not None:
            check_int("micro_batch_size", self.micro_batch_size, low=1)
            if self.mini_batch_size % self.micro_batch_size:
                raise ValueError(f"micro_batch_size={self.micro_batch_size} must divide the mini-batch of "
                                 f"{self.mini_batch_size} completions (prompts_per_step * num_generations / "
                                 f"steps_per_rollout)")
        if self.optimizer_in_backward and self.micro_batch < self.mini_batch_size:
            raise ValueError(f"optimizer_in_backward: true needs the whole step in one backward, but "
                             f"micro_batch_size={self.micro_batch_size} splits the mini-batch of "
                             f"{self.mini_batch_size} completions (unset micro_batch_size, or set "
                             f"optimizer_in_backward: false)")

        if self.max_prompt_length is not None:
            check_int("max_prompt_length", self.max_prompt_length, low=1)
        check_choice("prompt_truncation", self.prompt_truncation, PROMPT_TRUNCATION)
        check_int("max_completion_length", self.max_completion_length, low=1)
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ValueError(f"system_prompt must be a string or null, got {self.system_prompt!r}")
        check_real("temperature", self.temperature, low=0.0, strict=True)
        check_real("top_p", self.top_p, low=0.0, strict=True)
        if self.top_p > 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        check_int("top_k", self.top_k, low=0)

        check_choice("scale_rewards", self.scale_rewards, SCALES)
        check_bool("mask_truncated_completions", self.mask_truncated_completions)
        if self.reward_weights is not None:
            if not isinstance(self.reward_weights, (list, tuple)) or not self.reward_weights:
                raise ValueError(f"reward_weights must be a non-empty list of numbers, got {self.reward_weights!r}")
            for i, w in enumerate(self.reward_weights):
                check_real(f"reward_weights[{i}]", w, low=float("-inf"))
            self.reward_weights = [float(w) for w in self.reward_weights]

        check_int("save_steps", self.save_steps, low=0)
        if self.save_total_limit is not None:
            check_int("save_total_limit", self.save_total_limit, low=1)
        if self.metric_for_best_model is not None and (not isinstance(self.metric_for_best_model, str)
                                                       or not self.metric_for_best_model):
            raise ValueError(f"metric_for_best_model must be a metrics key such as 'reward', or null; got "
                             f"{self.metric_for_best_model!r}")
        if self.greater_is_better is not None:
            check_bool("greater_is_better", self.greater_is_better)
        if self.reward_timeout_s is not None:
            check_real("reward_timeout_s", self.reward_timeout_s, low=0.0, strict=True)
        check_choice("reward_on_error", self.reward_on_error, REWARD_ON_ERROR)
        check_int("logging_steps", self.logging_steps, low=1)
        self._check_reporting()
        check_int("log_completions_steps", self.log_completions_steps, low=0)
        check_choice("dtype", self.dtype, DTYPES)
        check_bool("bf16", self.bf16)
        if self.bf16 and self.dtype != "float32":
            raise ValueError(f"bf16: true keeps float32 master weights and computes in bfloat16; it needs dtype "
                             f"float32, got dtype {self.dtype!r} (or drop bf16 to train wholly in {self.dtype})")
        if self.logprob_chunk_size is not None:
            check_int("logprob_chunk_size", self.logprob_chunk_size, low=1)
        check_choice("distributed", self.distributed, DISTRIBUTED)
        if not isinstance(self.output_dir, (str, Path)) or not str(self.output_dir):
            raise ValueError(f"output_dir must be a non-empty path, got {self.output_dir!r}")
        self.output_dir = str(self.output_dir)
        check_bool("overwrite_output_dir", self.overwrite_output_dir)
        self._check_extensions()
        self._check_engine()
        self._check_multi_turn()
        self.loss_config()  # LossConfig validates the loss fields and names the culprit

    def _check_reporting(self) -> None:
        """Validation of ``report_to``, the tracker settings, the data and evaluation fields and the Hub push."""
        names = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        if not isinstance(names, (list, tuple)) or not names:
            raise ValueError(f"report_to must be a name or a list of names ({', '.join(REPORT_TO)}), "
                             f"got {self.report_to!r}")
        for name in names:
            check_choice("report_to", name, REPORT_TO)
        if len(names) > 1 and any(name in ("all", "none") for name in names):
            raise ValueError(f"report_to: 'all' and 'none' stand alone, got {list(names)!r}")
        if not isinstance(self.report_to, str):
            self.report_to = list(names)
        for name in ("run_name", "project", "hub_model_id", "dataset_config", "eval_dataset", "eval_split"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string or null, got {value!r}")
        if not isinstance(self.dataset_split, str) or not self.dataset_split:
            raise ValueError(f"dataset_split must be a non-empty string, got {self.dataset_split!r}")
        check_bool("push_to_hub", self.push_to_hub)
        check_int("eval_steps", self.eval_steps, low=0)
        if self.num_generations_eval is not None:
            check_int("num_generations_eval", self.num_generations_eval, low=1)
        if self.eval_temperature is not None:
            check_real("eval_temperature", self.eval_temperature, low=0.0)
        check_real("eval_threshold", self.eval_threshold, low=float("-inf"))
        if (self.eval_dataset is not None or self.eval_split is not None) and not self.eval_steps:
            raise ValueError("eval_dataset / eval_split are set but eval_steps is 0: set eval_steps (optimizer "
                             "steps between evaluations)")

    def _check_extensions(self) -> None:
        """Validation of the fields of the "beyond outcome GRPO" section."""
        check_choice("advantage_estimator", self.advantage_estimator, tuple(ADVANTAGE_ESTIMATORS))
        if self.advantage_estimator != "grpo" and self.scale_rewards != "group":
            raise ValueError(f"scale_rewards applies to advantage_estimator 'grpo' only; got scale_rewards="
                             f"{self.scale_rewards!r} with advantage_estimator={self.advantage_estimator!r}")
        for name in ("process_supervision", "dynamic_sampling", "kl_in_reward", "log_exact_kl"):
            check_bool(name, getattr(self, name))
        if self.step_delimiter is not None:
            if not isinstance(self.step_delimiter, str) or not self.step_delimiter:
                raise ValueError(f"step_delimiter must be a non-empty string or null, got {self.step_delimiter!r}")
            if not self.process_supervision:
                raise ValueError("step_delimiter needs process_supervision: true")
        if self.process_supervision and (self.advantage_estimator != "grpo" or self.scale_rewards != "group"):
            raise ValueError("process_supervision normalises step rewards by their group's mean and std "
                             "(DeepSeekMath 4.1.3): leave advantage_estimator 'grpo' and scale_rewards 'group'")
        check_int("max_sampling_rounds", self.max_sampling_rounds, low=1)
        if self.kl_in_reward and self.beta == 0:
            raise ValueError("kl_in_reward needs beta > 0 (beta is the KL coefficient in the reward)")
        check_int("ref_reset_steps", self.ref_reset_steps, low=0)
        check_int("ref_sync_steps", self.ref_sync_steps, low=0)
        if self.ref_sync_alpha is not None:
            check_real("ref_sync_alpha", self.ref_sync_alpha, low=0.0, strict=True)
            if self.ref_sync_alpha > 1 or not self.ref_sync_steps:
                raise ValueError(f"ref_sync_alpha must be in (0, 1] and needs ref_sync_steps > 0, got "
                                 f"ref_sync_alpha={self.ref_sync_alpha!r}, ref_sync_steps={self.ref_sync_steps}")
        elif self.ref_sync_steps:
            raise ValueError("ref_sync_steps needs ref_sync_alpha (the Polyak coefficient)")
        if self.ref_reset_steps and self.ref_sync_steps:
            raise ValueError("give ref_reset_steps (hard resets) or ref_sync_alpha/ref_sync_steps (Polyak), not both")
        for name in ("ref_reset_steps", "ref_sync_steps"):
            value = getattr(self, name)
            if value and value % self.steps_per_rollout_cycle:
                raise ValueError(f"{name}={value} must be a multiple of num_iterations * steps_per_rollout = "
                                 f"{self.steps_per_rollout_cycle}, so that pi_ref changes between rollouts")
            if value and self.beta == 0 and not self.log_exact_kl:
                raise ValueError(f"{name} refreshes pi_ref, which is unused with beta = 0; set beta > 0 "
                                 "(or log_exact_kl: true)")
        check_int("reward_model_update_steps", self.reward_model_update_steps, low=0)
        check_real("reward_model_replay_fraction", self.reward_model_replay_fraction, low=0.0)
        if self.reward_model_replay_fraction >= 1:
            raise ValueError(f"reward_model_replay_fraction must be in [0, 1), got {self.reward_model_replay_fraction}")
        check_int("reward_model_buffer_size", self.reward_model_buffer_size, low=1)
        if self.tis is not None:
            check_choice("tis", self.tis, TIS_LEVELS)
        check_real("tis_cap", self.tis_cap, low=0.0, strict=True)

    def _check_engine(self) -> None:
        """Validation of ``rollout_engine`` and the ``vllm_*`` settings."""
        check_choice("rollout_engine", self.rollout_engine, ROLLOUT_ENGINES)
        check_real("vllm_gpu_memory_utilization", self.vllm_gpu_memory_utilization, low=0.0, strict=True)
        if self.vllm_gpu_memory_utilization > 1:
            raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        if self.vllm_max_model_length is not None:
            check_int("vllm_max_model_length", self.vllm_max_model_length, low=2)
        check_int("vllm_tensor_parallel_size", self.vllm_tensor_parallel_size, low=1)
        check_bool("vllm_enable_sleep_mode", self.vllm_enable_sleep_mode)
        if self.vllm_kv_cache_gb is not None:
            check_real("vllm_kv_cache_gb", self.vllm_kv_cache_gb, low=0.0, strict=True)
        if self.vllm_enforce_eager is not None:
            check_bool("vllm_enforce_eager", self.vllm_enforce_eager)

    def _check_multi_turn(self) -> None:
        """Validation of the multi-turn fields."""
        for name in ("max_tool_calling_iterations", "max_turn_length"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), low=0 if name == "max_tool_calling_iterations" else 1)
        parser = self.tool_call_parser
        if not callable(parser) and (not isinstance(parser, str) or (parser not in TOOL_CALL_PARSERS
                                                                     and ":" not in parser)):
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)}, 'module:function' "
                             f"or a callable, got {parser!r}")
        if self.tool_timeout is not None:
            check_real("tool_timeout", self.tool_timeout, low=0.0, strict=True)

    def engine_options(self) -> dict[str, Any]:
        """The settings of the chosen ``rollout_engine`` (the ``vllm_*`` fields without their prefix, plus the
        lengths and seed it plans with); empty for the in-process engines."""
        if self.rollout_engine != "vllm":
            return {}
        return {"gpu_memory_utilization": self.vllm_gpu_memory_utilization,
                "max_model_length": self.vllm_max_model_length, "tensor_parallel_size": self.vllm_tensor_parallel_size,
                "enable_sleep_mode": self.vllm_enable_sleep_mode, "kv_cache_gb": self.vllm_kv_cache_gb,
                "enforce_eager": self.vllm_enforce_eager, "max_prompt_length": self.max_prompt_length,
                "max_completion_length": self.max_completion_length, "seed": self.seed}

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
    def steps_per_rollout_cycle(self) -> int:
        """Optimizer steps fed by one rollout: num_iterations * steps_per_rollout."""
        return self.num_iterations * self.steps_per_rollout

    def loss_config(self) -> LossConfig:
        """The ``LossConfig`` these fields describe (``max_completion_length`` is shared with generation; with
        ``kl_in_reward`` the KL is in the advantages, so the loss's beta is 0)."""
        values = {f.name: getattr(self, f.name) for f in fields(LossConfig)}
        return LossConfig(**{**values, "beta": 0.0 if self.kl_in_reward else self.beta})

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
        """Every field (but ``epsilon``), as YAML writes it: a callable ``tool_call_parser`` as its
        ``"module:function"``."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "epsilon"}
        if callable(out["tool_call_parser"]):
            parser = out["tool_call_parser"]
            out["tool_call_parser"] = f"{parser.__module__}:{getattr(parser, '__qualname__', type(parser).__name__)}"
        return out

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
    """{field: the docstring written under it}, read from the source of ``LossConfig`` (the inherited loss
    fields), then of ``GRPOConfig`` (where a field is declared again, as ``max_completion_length``, its own)."""
    docs = {}
    for cls in (LossConfig, GRPOConfig):
        body = ast.parse(inspect.getsource(cls)).body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


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


