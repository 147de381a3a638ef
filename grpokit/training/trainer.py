"""``GRPOTrainer``: Group Relative Policy Optimization (DeepSeekMath, arXiv 2402.03300, Algorithm 1).

The loop, one rollout at a time (``train``):

1. take ``prompts_per_step`` prompts and sample G = ``num_generations`` completions of each  (``sample_groups``;
   with ``dynamic_sampling``, flat groups are replaced by new prompts' groups: ``gather_informative``)
2. score every completion with the reward functions              (``score``; per step: ``process.score_steps``)
3. turn rewards into group-relative advantages A_i = (r_i - mean) / std   (``outcome_advantages``; per token
   with ``process_supervision``: ``process.step_advantages``; ``kl_in_reward`` adds ``kl_reward_to_go``)
4. record log pi_old (only if the rollout feeds several steps, or for ``tis`` / ``kl_in_reward``) and log pi_ref
   (only if beta > 0); with ``tis``, the capped weights pi_old / pi_sampler (``mismatch.tis_weights``)
5. mu = ``num_iterations`` passes x ``steps_per_rollout`` mini-batches, one AdamW step each  (``update``),
   accumulating gradients over micro-batches so that ``micro_batch_size`` never changes the update; with
   beta = 0, rows whose advantage is 0 (flat groups) carry no gradient and are not backpropagated
   (``micro_batches``)
6. log one row of metrics per optimizer step (with the exact KL to pi_ref: ``reference.exact_kl_metrics``);
   refresh pi_ref / retrain a learned reward when due (``after_step``); checkpoint every ``save_steps``

The math is elsewhere: ``grpo_loss`` (eq. 3 and variants), ``group_advantages`` (4.1.2), ``token_logprobs``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from grpokit.advantages import nanstd, outcome_advantages
from grpokit.config import GRPOConfig
from grpokit.kl import kl_reward_to_go
from grpokit.losses import grpo_loss
from grpokit.mismatch import add_totals, mean_weight, mismatch_metrics, mismatch_totals, tis_weights
from grpokit.models.loading import eos_token_ids, load_policy, load_weights, quiet_transformers, torch_dtype
from grpokit.models.lora import adapters_disabled, is_peft_model, load_trained_weights
from grpokit.models.prepare import prepare_model
from grpokit.reporting.backends import CompletionSamples, Reporter
from grpokit.reporting.metrics import MetricsLogger, plot_metrics, preload_plotting, read_metrics
from grpokit.reporting.trackers import check_trackers
from grpokit.rewards import RewardError, RewardRunner, Scores, failure_metrics, load_reward_funcs, score
from grpokit.rewards.learned import RewardModelUpdates, learned_rewards
from grpokit.rewards.process import score_steps, step_advantages
from grpokit.rollout import SamplingParams, make_engine, token_lists
from grpokit.rollout.multi_turn import add_totals as add_episode_totals
from grpokit.rollout.multi_turn import episode_metrics, make_sampler
from grpokit.training.batch import Batch
from grpokit.training.chat import with_system_prompt
from grpokit.training.checkpoint import (
    STATE_FILE,
    TrainingState,
    check_best_metric,
    load_checkpoint_state,
    remove_partial_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from grpokit.training.data import PromptLimit, PromptOrder, check_prompt_rows, eval_prompts, is_chat, load_prompts
from grpokit.training.distributed import (
    RowsLogger,
    agreed,
    global_totals,
    init_world,
    parallelize,
    rollout_shard,
    sampler_seed,
)
from grpokit.training.dynamic_sampling import Sampled, gather_informative
from grpokit.training.evaluate import TrainingEval, eval_sampling
from grpokit.training.guards import is_finite_update, non_finite_error
from grpokit.training.model_card import (
    PLOT_FILE,
    dataset_name,
    model_card,
    model_name,
    push_to_hub,
    run_description,
    write_final,
)
from grpokit.training.reference import exact_kl_metrics, make_reference, sync_alpha, sync_reference
from grpokit.training.run_dir import FINAL_DIR, begin_run, check_output_dir, resume_point
from grpokit.training.signals import GracefulStop, stop_message
from grpokit.training.step_in_backward import (
    AUTO_MIN_BYTES,
    StepInBackward,
    gradient_bytes,
    random_state,
    replaying,
    step_on_zero_gradients,
)
from grpokit.util import nan_to_none, release_during_backward, release_freed_memory, seed_everything


class GRPOTrainer:
    """Train a causal LM with GRPO.

    Args:
        model: a hub id or local path (``AutoModelForCausalLM`` + ``AutoTokenizer``), or an ``nn.Module``
            (a Hugging Face causal LM) together with ``tokenizer``. It is cast to ``args.dtype`` in place.
        reward_funcs: one reward function or a list (callables, built-in names, "module:function",
            "file.py:function"); TRL's contract ``f(prompts, completions, completion_ids, **columns)``.
        train_dataset: a ``datasets.Dataset``, a list of dicts or a path; column ``prompt`` is a string or
            a list of chat messages, every other column reaches the reward functions.
        args: the ``GRPOConfig``.
        ref_model: pi_ref (path or module). ``None``: a frozen copy of the initial policy when beta > 0.
        tokenizer: a tokenizer or a path; ``None`` loads it from ``model`` when that is a path.
        processing_class: TRL's name for ``tokenizer`` (either may be given).
        eval_dataset: prompts evaluated every ``eval_steps`` (as ``train_dataset``; ``None``: ``args.eval_dataset``).
        tools, environment_factory, rollout_func: multi-turn rollouts, TRL's arguments
            (``grpokit.rollout.multi_turn``): tool functions the model may call, a callable making one
            environment per completion (its methods are tools, ``get_reward()`` a reward), or
            ``rollout_func(prompts, trainer) -> dict`` sampling the completions itself.
    """

    def __init__(self, model, reward_funcs, train_dataset, args: GRPOConfig | None = None, *, ref_model=None,
                 tokenizer=None, processing_class=None, tools=None, environment_factory=None, rollout_func=None,
                 eval_dataset=None):
        if processing_class is not None:  # TRL's name for the tokenizer
            if tokenizer is not None:
                raise ValueError("give tokenizer= or processing_class=, not both")
            tokenizer = processing_class
        self.args = args = args if args is not None else GRPOConfig()
        self.dtype = torch_dtype(args.dtype)
        # cheap checks first: a typo in a reward name should not wait for a model to load
        self.agent = make_sampler(args, tools=tools, environment_factory=environment_factory, rollout_func=rollout_func)
        self.reward_weights = args.reward_weights
        if self.agent is not None:  # an environment's own reward joins the reward functions (weight 1, as TRL)
            reward_funcs, self.reward_weights = self.agent.with_environment_reward(reward_funcs, args.reward_weights)
        self.reward_funcs = load_reward_funcs(reward_funcs, max_completion_length=args.max_completion_length)
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} entries for "
                             f"{len(self.reward_funcs)} reward functions")
        self.dataset = with_system_prompt(check_prompt_rows(load_prompts(  # a bad row: one line naming it
            train_dataset, name=args.dataset_config, split=args.dataset_split, what="train_dataset")),
                                          args.system_prompt)
        eval_data = eval_prompts(eval_dataset if eval_dataset is not None else args.eval_dataset, train_dataset,
                                 eval_split=args.eval_split, dataset_config=args.dataset_config)
        if (eval_data is None) == bool(args.eval_steps):
            raise ValueError("eval_steps needs eval_dataset (or eval_split)" if args.eval_steps else
                             "eval_dataset is given but eval_steps is 0: set eval_steps")
        if eval_data is not None and self.agent is not None:
            raise ValueError("evaluation (eval_steps) samples single turns without tools: it does not run the episodes "
                             "of tools / environment_factory / rollout_func yet; leave eval_steps at 0")
        self.run = run_description(args.to_dict(), model=model_name(model), dataset=dataset_name(train_dataset),
                                   reward_funcs=[f.name for f in self.reward_funcs])
        check_trackers(args.report_to)  # a tracker's missing package, before the model loads
        self.columns = [c for c in self.dataset.column_names if c != "prompt"]
        if self.agent is not None:
            self.agent.check_columns(self.columns)
        self.world = init_world()  # one process, or this one's place among torchrun's (grpokit.training.distributed)
        self.shard = rollout_shard(args, self.world)  # which of a rollout's prompts this process samples
        for name in ("dynamic_sampling", "reward_model_update_steps"):
            if getattr(args, name) and self.world.world_size > 1:
                raise ValueError(f"{name} is not supported under torchrun yet: run it as one process")
        self.reward_model_updates = None  # learned rewards retrained on new samples (DeepSeekMath 4.1.4)
        if args.reward_model_update_steps:
            learners = learned_rewards(self.reward_funcs)
            if not learners:
                raise ValueError("reward_model_update_steps is set but no reward function has an update(samples) "
                                 "method (see grpokit.rewards.learned.LearnedReward)")
            self.reward_model_updates = RewardModelUpdates(
                learners, every=args.reward_model_update_steps, replay_fraction=args.reward_model_replay_fraction,
                buffer_size=args.reward_model_buffer_size, seed=args.seed)
        self.model, self.tokenizer = load_policy(model, tokenizer, self.dtype, device=args.device)
        self.model = prepare_model(self.model, args)  # gradient checkpointing, LoRA adapters (args.peft)
        self.loss_config = args.loss_config()
        self.ref_model = make_reference(self.model, ref_model, args.beta, self.dtype, keep=args.log_exact_kl)
        self.log_exact_kl = self.ref_model is not None and (args.beta > 0 or args.log_exact_kl)
        self.eos_token_ids = eos_token_ids(self.model, self.tokenizer)
        # log-prob callables of pi_theta / pi_ref, wrapped in DDP or FSDP under torchrun; before the optimizer,
        # since FSDP replaces the parameters by their shards
        self.parallel = parallelize(self.model, self.ref_model, args.distributed, self.world,
                                    padding_free=args.padding_free)
        if self.ref_model is None and args.beta > 0 and is_peft_model(self.model):  # LoRA: pi_ref = the base
            self.parallel.reference = adapters_disabled(self.model, self.parallel.policy)  # model, no copy

        # bf16 mixed precision: float32 master weights and AdamW state, bfloat16 compute (``autocast``)
        self.compute_dtype = torch.bfloat16 if args.bf16 else None
        engine_options = args.engine_options()
        if args.rollout_engine != "vllm":  # the in-process engines sample in the training compute dtype
            engine_options["compute_dtype"] = self.compute_dtype
        self.engine = make_engine(args.rollout_engine, self.model, self.tokenizer, **engine_options)
        self.sampling = SamplingParams(  # the engine's settings; the generator is the trainer's, checkpointed
            max_new_tokens=args.max_completion_length, eos_token_ids=tuple(self.eos_token_ids),
            pad_token_id=self.tokenizer.pad_token_id, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            generator=None)
        self._weight_sync_s = 0.0  # seconds spent pushing weights into the engine for the current rollout
        self._episode_totals: dict[str, float] = {}  # multi-turn: turns, tool calls, tokens of the current rollout

        self.optimizer = make_optimizer(self.model, args)
        self.scheduler = make_scheduler(self.optimizer, args)
        self.stepper = make_stepper(self.model, self.optimizer, args, self.world.world_size)  # or None
        self._release_hooks = release_during_backward(self.model.parameters())  # CPU: freed blocks go back
        self.order = PromptOrder(num_rows=len(self.dataset), seed=args.seed)
        self.generator = torch.Generator(device=next(self.model.parameters()).device)
        self.generator.manual_seed(sampler_seed(args.seed, self.world.rank))  # rank 0: args.seed
        self.sampling = dataclasses.replace(self.sampling, generator=self.generator)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self._batch: Batch | None = None  # the rollout being trained on, until its mu * S steps are done
        self._rollout_metrics: dict[str, float] = {}
        self._prompt_cache: dict[int, list[int]] = {}
        self.prompt_limit = PromptLimit(self.tokenizer, args.max_prompt_length, args.prompt_truncation)
        # reward_timeout_s / reward_on_error: how reward functions are called (grpokit.rewards.runner)
        self.reward_runner = RewardRunner(args.reward_timeout_s, args.reward_on_error)
        self.resume_hint = "trainer.train(resume_from_checkpoint=True), or grpokit train --config <run.yaml> --resume"
        """What a run stopped by a signal prints as the way to continue it (the CLI names its own command)."""
        self.stopped_by: str | None = None  # the signal that stopped the last train(), if one did
        self._samples: CompletionSamples | None = None  # the last rollout's, for log_completions_steps
        self.evaluation = None if eval_data is None else TrainingEval(  # eval_steps: its own generator
            with_system_prompt(eval_data, args.system_prompt), self.reward_funcs, self.tokenizer,
            params=eval_sampling(self.sampling, args.eval_temperature), every=args.eval_steps,
            max_steps=args.max_steps, num_samples=args.num_generations_eval or args.num_generations,
            threshold=args.eval_threshold, seed=args.seed, max_prompt_length=args.max_prompt_length,
            batch_size=args.rollout_size, reward_weights=self.reward_weights, device=self.generator.device)

    # ------------------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: bool | str | Path | None = None) -> list[dict[str, Any]]:
        """Run until ``max_steps`` optimizer steps; returns the metrics rows. ``resume_from_checkpoint``:
        ``True`` for the newest checkpoint in ``output_dir``, or a checkpoint path."""
        args = self.args
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        if self.world.is_main:
            remove_partial_checkpoints(output_dir)  # left by a run killed while saving
        self.world.barrier()  # under torchrun: no process looks for checkpoints while rank 0 tidies them
        checkpoint = resume_point(output_dir, resume_from_checkpoint, args)  # None: from step 0
        if checkpoint is not None:
            self.resume(checkpoint)
        else:  # refuse to start over an earlier run unless told to overwrite it
            check_output_dir(output_dir, resume=bool(resume_from_checkpoint), overwrite=args.overwrite_output_dir)
            seed_everything(args.seed)
        # config.yaml, and deleting an overwritten run, wait for the first step: a failed start changes nothing
        logger_class = MetricsLogger if self.world.is_main else RowsLogger  # only rank 0 prints and writes
        logger = logger_class(output_dir, max_steps=args.max_steps, logging_steps=args.logging_steps,
                               start_step=self.step,
                               on_open=functools.partial(begin_run, output_dir, args, clear=checkpoint is None),
                               rows=self.history if checkpoint is not None else None)
        self.history = logger.rows  # the same list, growing: each checkpoint saves the rows so far
        reporter = Reporter(output_dir, report_to=args.report_to, log_completions_steps=args.log_completions_steps,
                            start_step=self.step, enabled=self.world.is_main, config=self.run,
                            run_name=args.run_name, project=args.project)  # trackers, samples.jsonl
        # eval_steps: the policy before training, logged with the first step (a failed start writes nothing)
        pending = [{"step": 0, **self.evaluate()}] if self.evaluation is not None and self.step == 0 else []
        steps_per_rollout_cycle = args.steps_per_rollout_cycle  # mu * steps_per_rollout
        saved_at = self.step if resume_from_checkpoint else None
        if self.world.is_main:  # rank 0 draws metrics.png at the end; it imports matplotlib meanwhile
            preload_plotting()
        self.model.train()
        stop = GracefulStop().install()  # SIGTERM, SIGINT, SIGUSR1: stop after this step (grpokit.training.signals)
        first_step = self.step + 1
        try:
            while self.step < args.max_steps:
                start = time.perf_counter()
                # 1-4. a fresh rollout when the previous one has fed its mu * S optimizer steps
                rollout_s = 0.0
                if self._batch is None:
                    with self.checkpoint_on_reward_error(saved=saved_at == self.step):
                        self._batch, self._rollout_metrics = self.rollout()
                    release_freed_memory()  # the sampler's prepared weights and cache (grpokit.util)
                    rollout_s = time.perf_counter() - start
                # 5. one optimizer step on mini-batch k of pass k // S
                k = self.step % steps_per_rollout_cycle
                mini = self._batch[self.mini_batch_rows(k % args.steps_per_rollout)]
                step_metrics = self.update(mini)
                release_freed_memory()  # the step's activations and gradients
                self.step += 1
                if self.step % steps_per_rollout_cycle == 0:
                    self._batch = None
                step_metrics.update(self.after_step())  # iterative RL: pi_ref refresh, reward-model update
                # 6. log, checkpoint
                elapsed = time.perf_counter() - start
                num_tokens = step_metrics.pop("num_tokens")
                row = {"step": self.step, **self._rollout_metrics, **step_metrics, "step_time": elapsed,
                       "tokens_per_s": num_tokens / elapsed, "time/rollout_s": rollout_s}
                if self.evaluation is not None and self.evaluation.due(self.step):
                    row.update(self.evaluate())
                if self.step == first_step:  # metric_for_best_model names a metric (eval/* once evaluated)
                    check_best_metric(args.metric_for_best_model, [*pending, row], self.evaluation is not None)
                for done in [*pending, row]:
                    reporter.log(done, self._samples if done is row else None)  # a tracker that fails to start
                    logger.log(done)  # stops the run before an overwritten run's files go
                pending = []
                if args.save_steps and self.step % args.save_steps == 0:
                    self.save_checkpoint()
                    saved_at = self.step
                if stop.should_stop(self.world):  # a stop signal: this step is the last (every process agrees)
                    break
            if saved_at != self.step:
                self.save_checkpoint()
            self.stopped_by = stop.requested
            if self.world.is_main:
                for line in (self.prompt_limit.summary(), stop.requested and stop_message(
                        stop.requested, self.step, args.max_steps, output_dir / f"checkpoint-{self.step}",
                        self.resume_hint)):
                    if line:
                        print(line, file=sys.stderr, flush=True)
            if self.history and self.world.is_main:
                plot_metrics(self.history, output_dir / "metrics.png")
                reporter.log_image(output_dir / "metrics.png")
                if stop.requested is None:
                    self.save_model()  # output_dir/final: model, tokenizer, model card
        finally:
            stop.restore()
            self.reward_runner.close()
            logger.close()
            reporter.close()
            self.history = logger.rows
        if self.args.push_to_hub and self.world.is_main:
            push_to_hub(output_dir / FINAL_DIR, self.hub_repo())
        return self.history

    def evaluate(self) -> dict[str, float | None]:
        """The ``eval/*`` metrics of the policy as it is now on the eval prompts (``eval_steps``), sampled by
        the run's rollout engine (``grpokit.training.evaluate.TrainingEval``)."""
        with self.parallel.full_weights():  # FSDP: the whole policy on every process while sampling
            self.engine.sync_weights(self.model)
            return self.evaluation.run(self.engine)

    def save_model(self, output_dir: str | Path | None = None) -> Path:
        """TRL's ``save_model``: the model (or LoRA adapters) and tokenizer of the current step, loadable with
        ``from_pretrained``, with a model card ``README.md`` and ``metrics.png``, in ``output_dir`` (default
        ``output_dir/final``; ``grpokit.training.model_card``). Rank 0 writes it; ``train`` calls it at the end."""
        out = Path(self.args.output_dir)
        checkpoint = out / f"checkpoint-{self.step}"
        if not (checkpoint / STATE_FILE).is_file():
            checkpoint = self.save_checkpoint()  # under torchrun, every process takes part
        dest = Path(output_dir or out / FINAL_DIR)
        if not self.world.is_main:
            return dest
        card = model_card(self.run, self.history, adapters=is_peft_model(self.model), location=str(dest),
                          repo_id=self.hub_repo() if self.args.push_to_hub else None,
                          has_plot=(out / PLOT_FILE).is_file())
        return write_final(dest, checkpoint, card, out / PLOT_FILE)

    def hub_repo(self) -> str:
        """``hub_model_id``, else the name of ``output_dir`` (as transformers)."""
        return self.args.hub_model_id or Path(self.args.output_dir).resolve().name

    @contextlib.contextmanager
    def checkpoint_on_reward_error(self, saved: bool):
        """Around a rollout: a reward function that fails it (``reward_on_error: raise``) stops the run, once
        the last finished step is checkpointed as if the rollout had not begun (data order and RNGs put back),
        so that a resumed run redoes that rollout. ``saved``: that step's checkpoint is already written."""
        order, rng = self.order.state_dict(), rng_state(self.generator)
        try:
            yield
        except RewardError as e:
            if self.step == 0:
                raise RewardError(f"{e}; no optimizer step had been done, so no checkpoint was written") from e
            self.order.load_state_dict(order)
            set_rng_state(rng, self.generator)
            path = Path(self.args.output_dir) / f"checkpoint-{self.step}" if saved else self.save_checkpoint()
            raise RewardError(f"{e}; the run stopped after step {self.step}, saved in {str(path)!r}: fix the function "
                              "and resume (--resume)") from e

    def mini_batch_rows(self, index: int) -> slice:
        """Rows of mini-batch ``index`` of a rollout: consecutive blocks, so groups stay together. Under
        torchrun, of this process's rollout: its share of the global mini-batch (``RolloutShard``)."""
        size = self.args.mini_batch_size // self.world.world_size
        return slice(index * size, (index + 1) * size)

    # ------------------------------------------------------------------------------------------------------

    def rollout(self) -> tuple[Batch, dict[str, float]]:
        """Steps 1-4 as a pipeline, each step a function from record to record: sample and score (1-2),
        advantages (3), then the rollout-time log-probs: pi_old, pi_ref, the KL reward, TIS weights (4).
        Returns the batch and its metrics."""
        self._weight_sync_s, self._episode_totals = 0.0, {}
        sampled, metrics = self.sample_scored()  # 1-2
        metrics["rollout/weight_sync_s"] = self._weight_sync_s
        batch = self.with_advantages(sampled)  # 3
        policy_logps = self.rollout_policy_logps(batch)  # log pi_theta before any update, when something needs it
        batch = self.with_old_logps(batch, policy_logps)
        batch = self.with_ref_logps(batch)
        batch, kl = self.with_kl_reward(batch, policy_logps)
        batch = self.with_tis(batch, policy_logps)
        metrics.update(kl)
        if self.args.tis:
            metrics["tis/mean_weight"] = mean_weight(batch.tis_weights, batch.loss_mask)
        if self.args.log_completions_steps:
            self._samples = CompletionSamples.of(sampled.prompts, sampled.rollout.texts, sampled.scores,
                                                 [f.name for f in self.reward_funcs], batch.advantages,
                                                 batch.completion_mask)
        # under torchrun, means over every process's loss tokens (sequence-level TIS: its completions)
        rows = {"tis/mean_weight": float((batch.loss_mask.sum(-1) > 0).sum())} if self.args.tis == "sequence" else {}
        metrics = self.world.weighted_mean(metrics, float(batch.loss_mask.sum()), rows)
        if self.agent is not None:  # per episode: turns, tool calls and failures, model and environment tokens
            metrics.update(episode_metrics(self.world.sum_floats(self._episode_totals)))
        if policy_logps is not None:  # the engine's log-probs against the trainer's, at the same weights
            metrics.update(self.mismatch(mismatch_totals(policy_logps, batch.sampling_logps, batch.loss_mask)))
        return batch, {**self.rollout_summary(sampled), **metrics}

    def mismatch(self, totals: dict[str, float]) -> dict[str, float]:
        """``mismatch/*`` metrics of every process's loss tokens (``grpokit.mismatch``)."""
        if self.world.world_size > 1:
            abs_max = self.world.max_float(totals["abs_max"])
            totals = {**self.world.sum_floats(totals), "abs_max": abs_max}
        return mismatch_metrics(totals)

    def sample_scored(self) -> tuple[Sampled, dict[str, float]]:
        """Steps 1-2: G scored completions per prompt; DAPO's dynamic sampling swaps flat groups for new
        prompts' groups (its metrics returned beside). A learned reward records the new samples."""
        args = self.args
        if args.dynamic_sampling:
            sampled, metrics = gather_informative(self.sample_groups, args.prompts_per_step, args.num_generations,
                                                  args.max_sampling_rounds, self.tokenizer.pad_token_id)
        else:
            sampled, metrics = self.sample_groups(args.prompts_per_step), {}
        if self.reward_model_updates is not None:
            self.reward_model_updates.record(sampled.prompts, sampled.completions, sampled.completion_ids,
                                             sampled.columns, sampled.scores.rewards)
        return sampled, dict(metrics)

    def with_advantages(self, sampled: Sampled) -> Batch:
        """Step 3: the batch of this process's rows with group-relative advantages (NaN rewards -> 0), per
        completion (DeepSeekMath 4.1.2, or rloo / dr_grpo) or per token (process supervision, 4.1.3)."""
        args, rollout = self.args, sampled.rollout
        if args.process_supervision:  # (N, C); a group's rows are all on this process
            advantages = step_advantages(sampled.scores, self.tokenizer, sampled.completion_ids, rollout.texts,
                                         args.num_generations, rollout.completion_ids.size(1))
        else:  # (N,), over the global rollout under torchrun
            rewards = self.shard.gather(sampled.scores.rewards)
            advantages = outcome_advantages(rewards, args.num_generations, args.advantage_estimator,
                                            args.scale_rewards)
            advantages = self.shard.local(advantages)
        loss_mask = rollout.completion_mask
        if rollout.model_mask is not None:  # multi-turn: the model's tokens only, never the environment's
            loss_mask = loss_mask * rollout.model_mask
        if args.mask_truncated_completions:
            loss_mask = loss_mask * (~rollout.is_truncated).long().unsqueeze(1)  # (N, C)
        return Batch(prompt_ids=rollout.prompt_ids, prompt_mask=rollout.prompt_mask,
                     completion_ids=rollout.completion_ids, completion_mask=rollout.completion_mask,
                     loss_mask=loss_mask, advantages=advantages.to(rollout.completion_ids.device),
                     sampling_logps=rollout.sampling_logps, sampling_entropy=rollout.sampling_entropy)

    def rollout_policy_logps(self, batch: Batch) -> torch.Tensor | None:
        """log pi_theta (N, C) of the sampled tokens before any update of this rollout, computed only when
        something reads it: pi_old of a rollout that feeds several optimizer steps, ``tis``, ``kl_in_reward``."""
        args = self.args
        if args.steps_per_rollout_cycle > 1 or args.tis or args.kl_in_reward:
            return self.frozen_logps(self.parallel.policy, batch)
        return None

    def with_old_logps(self, batch: Batch, policy_logps: torch.Tensor | None) -> Batch:
        """pi_old only when the rollout feeds more than one optimizer step (else pi_old = sg(pi_theta)); then
        the sampler's entropy is not the updated policy's and is dropped."""
        if self.args.steps_per_rollout_cycle > 1:
            return dataclasses.replace(batch, old_logps=policy_logps, sampling_entropy=None)
        return batch

    def with_ref_logps(self, batch: Batch) -> Batch:
        """log pi_ref (N, C), only when beta > 0."""
        if self.parallel.reference is None or self.args.beta == 0:
            return batch
        return dataclasses.replace(batch, ref_logps=self.frozen_logps(self.parallel.reference, batch))

    def with_kl_reward(self, batch: Batch, policy_logps: torch.Tensor | None) -> tuple[Batch, dict[str, float]]:
        """``kl_in_reward``: each token's advantage gains -beta * sum_{s>=t} sg(k1_s), the sequence KL's exact
        gradient (``kl_reward_to_go``); ``kl`` logs the rollout's mean k1."""
        if not self.args.kl_in_reward:
            return batch, {}
        mask = batch.loss_mask.to(policy_logps.dtype)  # the model's tokens: environment tokens are no actions
        kl_rtg = kl_reward_to_go(policy_logps, batch.ref_logps, mask, self.args.beta)  # (N, C)
        advantages = batch.advantages.view(len(batch), -1).to(kl_rtg.dtype) + kl_rtg
        k1 = (policy_logps - batch.ref_logps) * batch.loss_mask
        return dataclasses.replace(batch, advantages=advantages), {
            "kl": float(k1.sum() / batch.loss_mask.sum().clamp(min=1))}

    def with_tis(self, batch: Batch, policy_logps: torch.Tensor | None) -> Batch:
        """``tis``: the capped weights pi_old / pi_sampler per token or per sequence (``mismatch.tis_weights``)."""
        if not self.args.tis:
            return batch
        weights = tis_weights(policy_logps, batch.sampling_logps, batch.loss_mask, level=self.args.tis,
                              cap=self.args.tis_cap)
        return dataclasses.replace(batch, tis_weights=weights)

    def rollout_summary(self, sampled: Sampled) -> dict[str, float]:
        """Reward, length and flat-group statistics of the global rollout (every process's rows)."""
        rollout = sampled.rollout
        scores = Scores(rewards=self.shard.gather(sampled.scores.rewards),
                        per_func=self.shard.gather(sampled.scores.per_func))
        lengths, truncated = (self.shard.gather(t) for t in (rollout.completion_mask.sum(-1), rollout.is_truncated))
        failures = failure_metrics(self.shard.gather(sampled.scores.failures), self.reward_funcs)  # errors, timeouts
        return {**rollout_metrics(scores, self.reward_funcs, lengths, truncated, self.args.num_generations), **failures}

    def sample_groups(self, num_prompts: int) -> Sampled:
        """Steps 1-2 for the next ``num_prompts`` prompts: G completions each (a group's rows consecutive),
        scored by the reward functions (per step with ``process_supervision``)."""
        args, G = self.args, self.args.num_generations
        rows = self.shard.take(self.order.take(num_prompts))  # under torchrun, this process's share
        examples = [self.dataset[i] for i in rows]
        prompts = [ex["prompt"] for ex in examples for _ in range(G)]
        columns = {c: [ex[c] for ex in examples for _ in range(G)] for c in self.columns}
        with self.parallel.full_weights():  # FSDP: the whole policy on every process while sampling
            self._weight_sync_s += self.engine.sync_weights(self.model)
            if self.agent is None:
                prompt_tokens = [self.encode(i, ex["prompt"]) for i, ex in zip(rows, examples)]
                rollout = self.engine.generate([p for p in prompt_tokens for _ in range(G)], self.sampling)
            else:  # tools, environments or a rollout_func: multi-turn episodes (grpokit.rollout.multi_turn)
                episodes = self.agent.sample(self.engine, self.tokenizer, prompts,
                                             [ex for ex in examples for _ in range(G)], self.sampling, group_size=G,
                                             owner=self)
        if self.agent is None:  # TRL's contract: chat prompts get chat-shaped completions
            completions = [[{"role": "assistant", "content": text}] if is_chat(p) else text
                           for p, text in zip(prompts, rollout.texts)]
            step_texts = rollout.texts
        else:  # the episodes' own (TRL's contract), the whole conversation as ``messages``
            rollout, prompts, completions, step_texts = (episodes.rollout, episodes.prompts, episodes.completions,
                                                         episodes.last_texts)
            columns.update(episodes.columns)
            self._episode_totals = add_episode_totals(self._episode_totals, episodes.totals)
        completion_ids = token_lists(rollout.completion_ids, rollout.completion_mask)
        calls = dict(runner=self.reward_runner, rows=[i for i in rows for _ in range(G)])  # rows: for error messages
        if args.process_supervision:  # agreed: under torchrun, a reward failure on one process stops them all
            scores = agreed(self.world, score_steps, self.reward_funcs, self.reward_weights, prompts, completions,
                            completion_ids, columns, step_texts, args.step_delimiter, **calls)
            if self.agent is not None:  # step ends in the last turn's text -> in the transcript's
                scores = dataclasses.replace(scores, char_ends=episodes.transcript_ends(scores.char_ends))
        else:
            scores = agreed(self.world, score, self.reward_funcs, self.reward_weights, prompts, completions,
                            completion_ids, columns, **calls)
        return Sampled(rollout=rollout, scores=scores, prompts=prompts, completions=completions,
                       completion_ids=completion_ids, columns=columns)

    def update(self, mini: Batch) -> dict[str, float]:
        """Step 5 for one mini-batch: forward/backward over micro-batches, clip, one AdamW step.

        Micro-batch losses are normalised by the mini-batch's sequence count (grpo, sapo, dr_grpo) or token
        count (bnpo, dapo, cispo), so their summed gradients equal the one-big-batch gradient."""
        # sequences and tokens of the global mini-batch (all processes'; one process: this one): the loss of
        # every process is a share of one global loss, and the batch of dapo/cispo is the optimizer step's
        start = time.perf_counter()
        totals = global_totals(self.world, mini.loss_mask)
        num_items = totals.num_tokens
        exact = {}
        if self.log_exact_kl:  # the exact full-vocabulary KL to pi_ref of the policy this step starts from
            with self.parallel.full_weights(reference=True):
                exact = exact_kl_metrics(self.model, self.ref_model, mini, temperature=self.args.temperature,
                                         micro_batch=self.args.micro_batch, chunk_size=self.args.logprob_chunk_size)
            exact = self.world.weighted_mean(exact, float(mini.loss_mask.sum()))  # torchrun: over all loss tokens
        sums = {"loss": 0.0, "entropy": 0.0, "kl": 0.0, "clip_ratio": 0.0, "clip_ratio_low": 0.0,
                "clip_ratio_high": 0.0, "ratio_mean": 0.0}
        tokens = max(int(num_items), 1)
        # on-policy (no pi_old), this forward runs at the weights the engine sampled with: the mismatch is
        # measured here, on the rows that run, at no extra cost (otherwise the rollout measured it)
        on_policy = mini.old_logps is None and mini.sampling_logps is not None
        gap = {"abs_max": 0.0, "abs_sum": 0.0, "k3_sum": 0.0, "count": 0.0}
        micro_batches = self.micro_batches(mini)  # [(micro-batch, backpropagate it)]
        backward_passes = sum(backward for _, backward in micro_batches)  # 0: the gradient is exactly 0
        last = max((i for i, (_, backward) in enumerate(micro_batches) if backward), default=-1)
        # the step inside the backward needs the step's gradient complete after one backward
        stepper = self.stepper if backward_passes == 1 else None
        replay = None  # stepper: (micro-batch, random state) of the forward the step runs again
        for i, (micro, backward) in enumerate(micro_batches):
            with self.parallel.grad_sync(last=i == last), torch.set_grad_enabled(backward):  # DDP: one all-reduce
                if backward and stepper is not None:
                    replay = micro, random_state(micro.prompt_ids.device)
                logps, entropy, out = self.micro_loss(micro, backward, totals)
                if on_policy and logps is not None:
                    gap = add_totals(gap, mismatch_totals(logps, micro.sampling_logps, micro.loss_mask))
                if backward and stepper is not None:
                    grad_norm = stepper.measure(out.loss * self.parallel.loss_scale)  # none of them is kept
                elif backward:
                    (out.loss * self.parallel.loss_scale).backward()  # x W under DDP/FSDP: they average gradients
            share = float(micro.loss_mask.sum()) / tokens  # token-weighted means over the mini-batch
            sums["loss"] += out.loss.item()
            sums["entropy"] += float((entropy.detach() * micro.loss_mask).sum()) / tokens
            for name in ("kl", "clip_ratio", "clip_ratio_low", "clip_ratio_high", "ratio_mean"):
                sums[name] += out.metrics.get(name, 0.0) * share
        sums = self.world.sum_floats(sums)  # under torchrun: the global loss and token-weighted means
        forward_backward_s = time.perf_counter() - start

        params = [p for p in self.model.parameters() if p.requires_grad]
        if backward_passes == 0:
            grad_norm = torch.zeros(())
        elif stepper is None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm(self.args), foreach=True)
        if not is_finite_update(sums["loss"], grad_norm):  # never step on NaN/inf: the run stops here
            self.optimizer.zero_grad(set_to_none=True)
            raise non_finite_error(self.step + 1, sums["loss"], grad_norm, self.args.output_dir)
        learning_rate = self.scheduler.get_last_lr()[0]
        if backward_passes == 0:
            step_on_zero_gradients(self.optimizer, params)
        elif stepper is None:
            self.optimizer.step()
        else:  # the forward again, with the same random numbers, then its backward: clip and AdamW
            micro, rng = replay
            with replaying(rng), torch.enable_grad():
                loss = self.micro_loss(micro, True, totals)[2].loss * self.parallel.loss_scale
            stepper.step(loss)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.loss_config.beta == 0:  # no KL in the loss (beta = 0, or kl_in_reward: the rollout logs it)
            del sums["kl"]
        mismatch = self.mismatch(gap) if on_policy else {}
        timing = {"time/forward_backward_s": forward_backward_s,
                  "time/optimizer_s": time.perf_counter() - start - forward_backward_s}
        return {**sums, **exact, **mismatch, "learning_rate": learning_rate, "grad_norm": float(grad_norm),
                **timing, "num_tokens": int(self.world.all_reduce_sum(mini.completion_mask.sum()))}

    def micro_loss(self, micro: Batch, backward: bool, totals) -> tuple[torch.Tensor | None, torch.Tensor, Any]:
        """``(log-probs or None, entropy, grpo_loss output)`` of one micro-batch; ``backward``: it will be
        backpropagated (``micro_batches``)."""
        if not backward and micro.old_logps is None and micro.sampling_entropy is not None:
            # on-policy, a row's loss (0) and ratios (1) do not depend on its log-probs, and the sampler
            # recorded its entropy under these same weights: no forward at all
            entropy = micro.sampling_entropy
            logps, measured = torch.zeros_like(entropy), None
        else:
            with self.autocast():  # backward then runs in the dtypes the forward chose
                logps, entropy = self.parallel.policy(
                    micro.prompt_ids, micro.prompt_mask, micro.completion_ids, micro.completion_mask,
                    temperature=self.args.temperature, chunk_size=self.args.logprob_chunk_size,
                    return_entropy=True,
                )  # (n, C) each, float32
            measured = logps
        out = grpo_loss(logps, micro.advantages, micro.loss_mask, old_logps=micro.old_logps,
                        ref_logps=micro.ref_logps, config=self.loss_config, totals=totals,
                        token_weights=micro.tis_weights)
        return measured, entropy, out

    def micro_batches(self, mini: Batch) -> list[tuple[Batch, bool]]:
        """The micro-batches of ``mini``, each with whether it is backpropagated: with ``skip_zero_advantage``
        (and beta = 0, one process), the rows that can carry gradient first, then those that cannot.

        With no KL term, every surrogate (``grpo_loss``) is the advantage times a function of the ratio, so a row
        whose advantage is 0 on all its loss tokens (or that has no loss token) adds exactly 0 to the loss and to
        every gradient. Those rows are not backpropagated. When the rollout feeds one optimizer step, they are not
        even run: their ratios are 1 and the sampler recorded their entropy (``Batch.sampling_entropy``);
        otherwise they run forward without autograd, for the logged entropy and ratios. If no row carries
        gradient, none is backpropagated: every trainable parameter takes a zero gradient and AdamW steps
        (moments, weight decay) as it would without the skipping (``step_on_zero_gradients``)."""
        size = self.args.micro_batch
        if not self.args.skip_zero_advantage or self.loss_config.beta != 0 or self.world.world_size > 1:
            return [(m, True) for m in mini.split(size)]
        advantages, mask = mini.advantages, mini.loss_mask.bool()  # (n,) or (n, C); (n, C)
        nonzero = advantages != 0
        live = (mask & (nonzero[:, None] if nonzero.dim() == 1 else nonzero)).any(-1)  # (n,)
        if bool(live.all()):
            return [(m, True) for m in mini.split(size)]
        live_rows, dead_rows = live.nonzero().squeeze(1), (~live).nonzero().squeeze(1)
        return ([(m, True) for m in mini[live_rows].split(size)]
                + [(m, False) for m in mini[dead_rows].split(size) if len(m)])

    def after_step(self) -> dict[str, float]:
        """Iterative RL (DeepSeekMath 4.1.4) after optimizer step ``self.step``: pi_ref <- pi_theta (or a Polyak
        step towards it) when due, at rollout boundaries; a learned reward's ``update`` when due."""
        args = self.args
        alpha = sync_alpha(self.step, reset_steps=args.ref_reset_steps, sync_steps=args.ref_sync_steps,
                           alpha=args.ref_sync_alpha)
        if alpha is not None and self.ref_model is not None:
            sync_reference(self.ref_model, self.model, alpha)
        if self.reward_model_updates is None:
            return {}
        return self.reward_model_updates.maybe_update(self.step)

    def autocast(self):
        """bfloat16 autocast on the policy's device with ``bf16``; a no-op context otherwise."""
        device = next(self.model.parameters()).device.type
        return torch.autocast(device, dtype=torch.bfloat16, enabled=self.compute_dtype is not None)

    @torch.no_grad()
    def frozen_logps(self, logps_of, batch: Batch) -> torch.Tensor:
        """log-probs (N, C) of the sampled tokens under a model as it is now, micro-batch by micro-batch;
        ``logps_of``: ``self.parallel.policy`` or ``.reference`` (``completion_logps`` of that model)."""
        with self.autocast():  # as the training forward: pi_old / pi_ref in the same precision as pi_theta
            parts = [logps_of(b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask,
                              temperature=self.args.temperature, chunk_size=self.args.logprob_chunk_size)
                     for b in batch.split(self.args.micro_batch)]
        return torch.cat(parts, dim=0)

    def encode(self, row: int, prompt) -> list[int]:
        if row not in self._prompt_cache:
            self._prompt_cache[row] = self.prompt_limit(row, prompt)  # max_prompt_length, prompt_truncation
        return self._prompt_cache[row]

    # ------------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Free what the rollout engine holds (a vLLM engine, its memory and temporary folder). The trainer
        can still save, but a later ``train()`` or evaluation needs a new trainer."""
        self.engine.close()

    def save_checkpoint(self) -> Path:
        """``output_dir/checkpoint-<step>/``: weights, tokenizer, optimizer, scheduler, RNGs, data order, and
        the current rollout when the step falls inside one."""
        rollout = None
        if self._batch is not None:
            rollout = {"batch": self._batch.state_dict(), "metrics": self._rollout_metrics}
        state = TrainingState(step=self.step, data_order=self.order.state_dict(), config=self.args.to_dict(),
                              log_history=self.history)
        with quiet_transformers():
            return self.parallel.save_checkpoint(  # under torchrun, every process adds its own state
                save_checkpoint, self.args.output_dir, state=state, model=self.model, tokenizer=self.tokenizer,
            optimizer=self.optimizer, scheduler=self.scheduler, generator=self.generator, ref_model=self.ref_model,
            rollout=rollout, save_total_limit=self.args.save_total_limit,
            metric_for_best_model=self.args.metric_for_best_model, greater_is_better=self.args.greater_is_better,
        )

    def resume(self, path: Path) -> None:
        """Restore everything ``save_checkpoint`` wrote, so the run continues as if never stopped."""
        state, tensors = load_checkpoint_state(path)
        # under torchrun: this process's RNG and rollout (re-split when the process count changed)
        tensors = self.parallel.checkpoint_tensors(path, tensors, device=self.generator.device)
        self.parallel.load_weights(self.model, path, load_trained_weights)  # LoRA: the adapters
        if self.ref_model is not None and (path / "ref_model").is_dir():
            self.parallel.load_weights(self.ref_model, path / "ref_model", load_weights)
        self.parallel.load_optimizer(self.optimizer, tensors["optimizer"])
        self.scheduler.load_state_dict(tensors["scheduler"])
        set_rng_state(tensors["rng"], self.generator)
        self.order.load_state_dict(state.data_order)
        self.step = state.step
        self._batch, self._rollout_metrics = None, {}
        if tensors["rollout"] is not None:
            self._batch = Batch(**tensors["rollout"]["batch"])
            self._rollout_metrics = tensors["rollout"]["metrics"]
        self.history = state.log_history  # None: a checkpoint written before log_history existed
        if self.history is None:
            self.history = read_metrics(Path(self.args.output_dir) / "metrics.jsonl", upto_step=self.step)


# ----------------------------------------------------------------------------------------------------------
# set-up helpers


def make_optimizer(model: torch.nn.Module, args: GRPOConfig) -> torch.optim.AdamW:
    """AdamW with TRL/transformers defaults; weight decay on matrices only (not biases, not norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # the fused kernel updates every tensor in one call: same AdamW, far fewer ops per step for small models
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=args.learning_rate,
                             betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                             fused=all(p.is_floating_point() for p in params))


def max_grad_norm(args: GRPOConfig) -> float:
    """The clipping threshold of ``clip_grad_norm_``: ``max_grad_norm``, or infinity (0: no clipping)."""
    return args.max_grad_norm if args.max_grad_norm > 0 else math.inf


def make_stepper(model: torch.nn.Module, optimizer: torch.optim.Optimizer, args: GRPOConfig,
                 world_size: int) -> StepInBackward | None:
    """The step inside the backward (``optimizer_in_backward``; ``None``: the usual step after it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    wanted = args.optimizer_in_backward
    if wanted and world_size > 1:
        raise ValueError("optimizer_in_backward: true is for one process (under torchrun DDP and FSDP reduce the "
                         "gradients first); set it to false or null")
    if wanted is None:
        wanted = world_size == 1 and gradient_bytes(params) >= AUTO_MIN_BYTES
    return StepInBackward(optimizer, params, max_grad_norm(args)) if wanted else None


def make_scheduler(optimizer: torch.optim.Optimizer, args: GRPOConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant / linear to 0 / cosine to 0 at ``max_steps`` (transformers' formulas)."""
    warmup, total = args.warmup_steps, args.max_steps

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if args.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if args.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rollout_metrics(scores, reward_funcs, lengths: torch.Tensor, is_truncated: torch.Tensor,
                    group_size: int) -> dict[str, float]:
    """Per-rollout statistics: reward mean/std, each function's mean, lengths, truncation, flat groups."""
    rewards = scores.rewards  # (N,)
    grouped = rewards.view(-1, group_size)  # (P, G)
    group_std = nanstd(grouped, dim=1)  # (P,)
    flat = torch.isnan(group_std) | torch.isclose(group_std, torch.zeros_like(group_std))
    lengths = lengths.float()  # (N,) tokens per completion
    metrics = {"reward": nan_to_none(torch.nanmean(rewards)), "reward_std": nan_to_none(nanstd(rewards))}
    for j, fn in enumerate(reward_funcs):
        metrics[f"rewards/{fn.name}"] = nan_to_none(torch.nanmean(scores.per_func[:, j]))
    metrics.update(completion_length=lengths.mean().item(), completion_length_max=lengths.max().item(),
                   truncated_ratio=is_truncated.float().mean().item(),
                   frac_zero_std_groups=flat.float().mean().item())
    return metrics

