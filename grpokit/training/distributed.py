"""One GRPO run on several processes: data parallel (DDP) or sharded parameters (FSDP2), under torchrun.

    torchrun --nproc-per-node 2 -m grpokit train --config run.yaml
    torchrun --nproc-per-node 2 train.py          # any script that builds a GRPOTrainer

Without torchrun (no ``WORLD_SIZE`` > 1 in the environment) nothing here does anything and the trainer runs
as one process, exactly as before. With W processes, per rollout:

1. Every process draws the same global prompt order (``PromptOrder``, same seed) and takes its share of the
   step's ``prompts_per_step`` prompts (``RolloutShard``): whole groups, so a group's G completions are
   sampled and scored on one process. Each process samples with its own generator (``sampler_seed``).
2. Rewards (and lengths, truncation) are gathered into the global rollout's order; the advantages and the
   rollout metrics are computed from them exactly as one process computes them (so ``scale_rewards: batch``
   uses the std of all W * n rewards), then each process keeps its own rows.
3. Every micro-batch loss is normalised by the totals of the *global* mini-batch (``global_totals``): its
   sequence count (grpo, sapo, dr_grpo) or its token count over all processes (bnpo, dapo, cispo). The global
   loss is then the sum of the processes' losses. DDP and FSDP *average* gradients over processes, so each
   process back-propagates ``W x`` its loss (``Parallel.loss_scale``): the averaged gradient is the gradient of
   the global loss, and the update equals one process's update on the same completions
   (tests/training/test_distributed.py checks it in float64).
4. Metric sums are all-reduced; only rank 0 prints, writes ``metrics.jsonl``, ``config.yaml``, the plot and
   the checkpoints' model.

Checkpoints (``Parallel.save_checkpoint``): rank 0 writes the usual layout (an HF-loadable model, gathered
from the shards under FSDP); each other rank r adds ``rank-<r>/`` beside it with what is its own: ``rng.pt``
(its Python/NumPy/torch/sampler states), ``rollout.pt`` (its rows of the current rollout) and, under FSDP,
``optimizer.pt`` (its shard of the AdamW moments). ``world.json`` records the process count; a checkpoint
resumes on the same number of processes, exactly.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpokit.config import DISTRIBUTED
from grpokit.losses import BatchTotals
from grpokit.models.forward import completion_logps
from grpokit.reporting.metrics import read_metrics
from grpokit.training.checkpoint import rng_state
from grpokit.util import check_choice

WORLD_FILE = "world.json"


# ----------------------------------------------------------------------------------------------------------
# the processes


@dataclass(frozen=True)
class World:
    """This process's place among the W processes of a run; ``World()`` is the single process."""

    rank: int = 0
    """0 .. world_size - 1; rank 0 writes every shared file."""
    world_size: int = 1
    """W, the number of processes (torchrun's ``WORLD_SIZE``)."""
    local_rank: int = 0
    """Rank on this machine: the GPU this process uses."""
    device: torch.device = torch.device("cpu")
    """Where collectives run: ``cuda:<local_rank>`` under NCCL, the CPU under gloo."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over all processes (``x`` itself in one process)."""
        if self.world_size == 1:
            return x
        out = x.detach().to(self.device, copy=True)
        torch.distributed.all_reduce(out)
        return out.to(x.device)

    def max_float(self, value: float) -> float:
        """The largest ``value`` over all processes."""
        if self.world_size == 1:
            return value
        out = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX)
        return float(out)

    def sum_floats(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over all processes (one collective for the whole dict)."""
        if self.world_size == 1:
            return values
        total = self.all_reduce_sum(torch.tensor(list(values.values()), dtype=torch.float64))
        return dict(zip(values, total.tolist()))

    def weighted_mean(self, values: dict[str, float], weight: float,
                      weights: dict[str, float] | None = None) -> dict[str, float]:
        """Means over ``weight`` items (e.g. loss tokens) of this process -> the means over every process's
        items; ``weights`` overrides the item count of some keys (e.g. a mean over completions)."""
        if self.world_size == 1 or not values:
            return values
        counts = {k: float((weights or {}).get(k, weight)) for k in values}
        sums = self.sum_floats({**{k: v * counts[k] for k, v in values.items()},
                                **{f"count/{k}": c for k, c in counts.items()}})
        return {k: sums[k] / max(sums[f"count/{k}"], 1.0) for k in values}

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(n, ...) on every process -> (W * n, ...): rank 0's rows, then rank 1's, ... (same n everywhere)."""
        if self.world_size == 1:
            return x
        send = x.detach().to(self.device, torch.uint8 if x.dtype == torch.bool else x.dtype).contiguous()
        parts = [torch.empty_like(send) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, send)
        return torch.cat(parts).to(x.device, x.dtype)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def init_world() -> World:
    """The ``World`` of this process: under torchrun (``WORLD_SIZE`` > 1) the default process group is
    initialised from its environment variables (``env://``), with NCCL when CUDA is available (each process
    on GPU ``LOCAL_RANK``) and gloo otherwise. A process group the caller initialised is used as it is."""
    dist = torch.distributed
    if not dist.is_available():
        return World()
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return World()
        missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {', '.join(missing)} is not: launch "
                             "several processes with torchrun (torchrun --nproc-per-node N ...)")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.get_world_size() == 1:
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return World(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def sampler_seed(seed: int, rank: int) -> int:
    """Seed of the sampling generator of process ``rank``: ``seed`` on rank 0 (so one process is unchanged),
    ``seed + rank * 2**32`` elsewhere (no two processes of any runs with seeds < 2**32 share a stream)."""
    return seed + (rank << 32)


# ----------------------------------------------------------------------------------------------------------
# the rollout, split over processes


@dataclass(frozen=True)
class RolloutShard:
    """Which prompts of a rollout this process samples, and where its rows sit in the global rollout.

    The global rollout is the one process's: P prompts x G completions, N = P * G rows, mini-batch k =
    prompts [k P/S, (k+1) P/S). Each mini-batch is cut into W consecutive blocks of P/(S W) prompts, block r
    to rank r; so rank r's k-th local mini-batch is exactly its block of the global k-th mini-batch, and
    mu passes x S steps on W processes make the same updates as on one."""

    prompts: tuple[int, ...]
    """Positions, in the step's list of P prompts, of the prompts this process samples (its local order)."""
    rows: torch.Tensor
    """(n,) long: the global rows this process holds, n = N / W, in its local order."""
    inverse: torch.Tensor
    """(N,) long: global row i is row ``inverse[i]`` of the rank-major gather of every process's rows."""
    world: World

    def take(self, items: list) -> list:
        """This process's share of the step's P prompts (any per-prompt list)."""
        return items if self.world.world_size == 1 else [items[i] for i in self.prompts]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(n, ...) rows of this process -> (N, ...) rows of all processes, in the global rollout's order."""
        if self.world.world_size == 1:
            return x
        return self.world.gather_rows(x)[self.inverse.to(x.device)]

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) global rows -> (n, ...) the rows of this process."""
        return x if self.world.world_size == 1 else x[self.rows.to(x.device)]


def shard_prompts(num_prompts: int, steps_per_rollout: int, world_size: int, rank: int) -> list[int]:
    """Positions of the prompts rank ``rank`` samples: block ``rank`` of the W blocks of every mini-batch."""
    per_step = num_prompts // steps_per_rollout  # prompts per mini-batch
    block = per_step // world_size
    return [k * per_step + rank * block + i for k in range(steps_per_rollout) for i in range(block)]


def rollout_shard(args, world: World) -> RolloutShard:
    """The ``RolloutShard`` of this process for ``args`` (a ``GRPOConfig``); checks that the batch splits."""
    P, G, S, W = args.prompts_per_step, args.num_generations, args.steps_per_rollout, world.world_size
    check_batch_shape(args, W)
    rows_of = lambda rank: [p * G + j for p in shard_prompts(P, S, W, rank) for j in range(G)]
    gathered = torch.tensor([row for rank in range(W) for row in rows_of(rank)])  # (N,) global row of each
    return RolloutShard(prompts=tuple(shard_prompts(P, S, W, world.rank)), rows=torch.tensor(rows_of(world.rank)),
                        inverse=torch.argsort(gathered), world=world)


def check_batch_shape(args, world_size: int) -> None:
    """W processes need whole groups per process in every mini-batch, and micro-batches that divide it."""
    if world_size == 1:
        return
    P, S = args.prompts_per_step, args.steps_per_rollout
    unit = S * world_size
    if P % unit:
        raise ValueError(
            f"prompts_per_step={P} must be a multiple of steps_per_rollout * processes = {S} * {world_size} = "
            f"{unit} under torchrun: every process samples whole groups and each optimizer step's mini-batch is "
            f"split evenly over the processes (e.g. prompts_per_step: {-(-P // unit) * unit})")
    local_mini = args.mini_batch_size // world_size
    if args.micro_batch_size is not None and local_mini % args.micro_batch_size:
        raise ValueError(f"micro_batch_size={args.micro_batch_size} must divide each process's share of a mini-batch, "
                         f"{args.mini_batch_size} / {world_size} processes = {local_mini} completions")


def global_totals(world: World, loss_mask: torch.Tensor) -> BatchTotals:
    """Denominators of the optimizer step's global mini-batch, from this process's ``loss_mask`` (n, C):
    W * n sequences (every process holds n) and the unmasked tokens summed over processes."""
    tokens = world.all_reduce_sum(loss_mask.sum())
    return BatchTotals(num_sequences=loss_mask.size(0) * world.world_size, num_tokens=tokens,
                       num_items_in_batch=tokens)


# ----------------------------------------------------------------------------------------------------------
# the model on several processes


class CompletionLogps(torch.nn.Module):
    """``completion_logps`` of ``model`` as a module. DDP and FSDP act through a module's ``forward``, and the
    training forward runs the model's body and LM head directly (no logits), never ``model.forward``."""

    def __init__(self, model: torch.nn.Module, padding_free: bool = True):
        super().__init__()
        self.model, self.padding_free = model, padding_free

    def forward(self, *args, **kwargs):
        out = completion_logps(self.model, *args, padding_free=self.padding_free, **kwargs)
        # FSDP warns on outputs that are views (an in-place op on one would skip its backward hook)
        return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()


@dataclass
class Parallel:
    """The policy (and pi_ref) as this run spreads them over processes: ``none`` (one process), ``ddp``
    (a full replica per process, gradients all-reduced) or ``fsdp`` (parameters, gradients and AdamW moments
    sharded, FSDP2 ``fully_shard``)."""

    world: World
    mode: str
    policy: Callable[..., Any]
    """Called like ``completion_logps`` without its first argument: log-probs of the policy (N, C)."""
    reference: Callable[..., Any] | None
    """The same for pi_ref; ``None`` without a reference model."""
    units: dict[str, list] = None  # FSDP modules per model ("policy", "reference"), root last

    @property
    def loss_scale(self) -> float:
        """DDP and FSDP average gradients over the W processes; each back-propagates W x its loss so that the
        average is the gradient of the global loss (the sum of the processes' losses)."""
        return float(self.world.world_size) if self.mode != "none" else 1.0

    def grad_sync(self, last: bool):
        """Context for one micro-batch's forward/backward: under DDP, gradients are all-reduced only on the
        mini-batch's last micro-batch (``no_sync`` before). FSDP reduce-scatters every micro-batch into its
        sharded gradients, which accumulate."""
        if self.mode == "ddp" and not last:
            return self.policy.no_sync()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def full_weights(self, reference: bool = False) -> Iterator[None]:
        """Under FSDP, every process holds the whole policy (and pi_ref with ``reference``) while inside:
        sampling and ``save_pretrained`` use the model's modules directly. Elsewhere, nothing to do."""
        if self.mode != "fsdp":
            yield
            return
        units = self.units["policy"] + (self.units.get("reference", []) if reference else [])
        for unit in units:
            unit.unshard()
            if unit is not units[-1]:
                unit.set_reshard_after_forward(False)  # a forward of a layer while inside keeps it whole
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
            for unit in self.units["policy"][:-1] + self.units.get("reference", [])[:-1]:
                unit.set_reshard_after_forward(True)

    # ---- checkpoints -------------------------------------------------------------------------------------

    def save_checkpoint(self, save: Callable[..., Path], output_dir, *, optimizer, generator,
                        rollout: dict | None, **kwargs) -> Path:
        """``save(output_dir, optimizer=..., generator=..., rollout=..., **kwargs)`` (``checkpoint.save_checkpoint``)
        on rank 0; every other rank writes ``rank-<r>/`` into the checkpoint before rank 0 commits it. Every
        process must call this; returns the checkpoint path. Under FSDP, ``model`` and ``ref_model`` in
        ``kwargs`` are gathered whole to rank 0 for ``save_pretrained``."""
        if self.mode == "none":
            return save(output_dir, optimizer=optimizer, generator=generator, rollout=rollout, **kwargs)
        own = {"rng": rng_state(generator), "rollout": rollout}
        if self.mode == "fsdp":
            own["optimizer"] = local_optimizer_state(optimizer)
            for key in ("model", "ref_model"):
                if kwargs.get(key) is not None:
                    kwargs[key] = _WholeModel(kwargs[key])  # a collective: every process takes part
        if not self.world.is_main:
            folder = Path(self.world.broadcast_object(None))  # rank 0's folder, not yet committed
            write_rank_files(folder / f"rank-{self.world.rank}", own)
            self.world.barrier()  # files written: rank 0 may commit
            return Path(self.world.broadcast_object(None))

        def before_commit(folder: Path) -> None:
            (folder / WORLD_FILE).write_text(json.dumps({"world_size": self.world.world_size, "mode": self.mode}))
            self.world.broadcast_object(str(folder))
            self.world.barrier()

        if self.mode == "fsdp":
            optimizer = _StateDict(own["optimizer"])
        path = save(output_dir, optimizer=optimizer, generator=generator, rollout=rollout,
                    before_commit=before_commit, **kwargs)
        return Path(self.world.broadcast_object(str(path)))

    def checkpoint_tensors(self, path: Path, tensors: dict[str, Any]) -> dict[str, Any]:
        """``load_checkpoint_state``'s tensors with this process's own (``rank-<r>/``) in place of rank 0's;
        checks the checkpoint was written by as many processes."""
        info = json.loads((path / WORLD_FILE).read_text()) if (path / WORLD_FILE).is_file() else {"world_size": 1}
        saved = int(info["world_size"])
        if saved != self.world.world_size or info.get("mode", "none") != self.mode:
            raise ValueError(
                f"{str(path)!r} was written by {saved} process(es) ({info.get('mode', 'one process')}); this run has "
                f"{self.world.world_size} ({self.mode if self.mode != 'none' else 'one process'}): resume it with "
                f"the same torchrun --nproc-per-node and distributed setting")
        if self.world.is_main:
            return tensors
        folder = path / f"rank-{self.world.rank}"
        load = lambda name: torch.load(folder / f"{name}.pt", weights_only=False) if (folder / f"{name}.pt").exists() \
            else None
        own = {name: load(name) for name in ("rng", "rollout", "optimizer")}
        if own["rng"] is None:
            raise ValueError(f"{str(path)!r} has no {folder.name}/rng.pt: it is incomplete")
        return {**tensors, "rng": own["rng"], "rollout": own["rollout"],
                "optimizer": own["optimizer"] if self.mode == "fsdp" else tensors["optimizer"]}

    def load_weights(self, model: torch.nn.Module, folder: Path, load: Callable[[torch.nn.Module, Path], None]):
        """``load(model, folder)`` (``checkpoint.load_weights``); under FSDP, the saved whole tensors are cut
        into this process's shards."""
        if self.mode != "fsdp":
            return load(model, folder)
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        state = {}
        for file in sorted(Path(folder).glob("*.safetensors")):
            state.update(load_file(str(file)))
        if not state:
            raise ValueError(f"no *.safetensors weights in {str(folder)!r}")
        missing, unexpected = set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True,
                                                                                          strict=False))
        tied = {id(p) for name, p in model.named_parameters() if name in state}
        untied = [k for k in missing if id(model.get_parameter(k)) not in tied] if missing else []
        if untied or unexpected:
            raise ValueError(f"checkpoint {str(folder)!r} does not match the model: missing {untied[:5]}, "
                             f"unexpected {list(unexpected)[:5]}")

    def load_optimizer(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """``optimizer.load_state_dict``; under FSDP the moments come back as shards of the parameters."""
        optimizer.load_state_dict(state)
        if self.mode == "fsdp":
            to_dtensors(optimizer)


def parallelize(model: torch.nn.Module, ref_model: torch.nn.Module | None, mode: str, world: World,
                padding_free: bool = True) -> Parallel:
    """Spread the policy and pi_ref over ``world``'s processes (nothing to do for one process). Every process
    starts from rank 0's weights. Call before building the optimizer (FSDP replaces the parameters).
    ``padding_free``: ``completion_logps``'s switch (FSDP-sharded models always take the padded forward)."""
    check_choice("distributed", mode, DISTRIBUTED)
    if world.world_size == 1:
        logps_of = functools.partial(completion_logps, padding_free=padding_free)
        reference = functools.partial(logps_of, ref_model) if ref_model is not None else None
        return Parallel(world, "none", functools.partial(logps_of, model), reference)
    models = [m for m in (model, ref_model) if m is not None]
    for m in models:
        if world.device.type == "cuda":
            m.to(world.device)
        broadcast_weights(m)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [world.device.index] if world.device.type == "cuda" else None
        # no buffers change during training (no batch norm): no need to broadcast them every forward
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                          inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
        policy = DistributedDataParallel(CompletionLogps(model, padding_free), device_ids=device_ids,
                                         **no_buffer_sync)
        reference = CompletionLogps(ref_model, padding_free) if ref_model is not None else None  # a frozen replica
        return Parallel(world, mode, policy, reference)
    if hasattr(model, "peft_config"):
        raise ValueError("distributed: fsdp does not support LoRA (peft) policies yet; use distributed: ddp (only the "
                         "adapters are trained, so their gradients are small to all-reduce)")
    policy, units = fully_shard_model(model)
    all_units = {"policy": units}
    reference = None
    if ref_model is not None:
        reference, all_units["reference"] = fully_shard_model(ref_model)
    return Parallel(world, mode, policy, reference, all_units)


def broadcast_weights(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every process (models loaded or built on each may differ)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            torch.distributed.broadcast(tensor.data, src=0)


def fully_shard_model(model: torch.nn.Module) -> tuple[CompletionLogps, list]:
    """FSDP2: each transformer block (the classes HF lists in ``_no_split_modules``) is one shard unit, the
    rest (embeddings, final norm, LM head) the root's. Returns the root module and the units, root last."""
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or ())
    units = [fully_shard(m) for m in model.modules() if type(m).__name__ in blocks]
    root = fully_shard(CompletionLogps(model))
    return root, [*units, root]


# ----------------------------------------------------------------------------------------------------------
# per-process state in checkpoints


class _WholeModel:
    """Stands in for an FSDP-sharded Hugging Face model in ``checkpoint.save_model``: its weights are gathered
    whole (to rank 0's CPU) here, and ``save_pretrained`` writes them."""

    def __init__(self, model: torch.nn.Module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        self.model = model
        self.state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_pretrained(self, folder, **kwargs) -> None:
        self.model.save_pretrained(folder, state_dict=self.state, **kwargs)


class _StateDict:
    """Stands in for an optimizer whose ``state_dict()`` is already computed."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded (DTensor) moment replaced by this process's shard."""
    from torch.distributed.tensor import DTensor

    state = optimizer.state_dict()
    local = {k: {name: v.to_local() if isinstance(v, DTensor) else v for name, v in s.items()}
             for k, s in state["state"].items()}
    return {"state": local, "param_groups": state["param_groups"]}


def to_dtensors(optimizer: torch.optim.Optimizer) -> None:
    """After loading ``local_optimizer_state``: the moments of sharded parameters become shards again."""
    from torch.distributed.tensor import DTensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            for name, v in optimizer.state[p].items():
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.to_local().shape and v.dim():
                    optimizer.state[p][name] = DTensor.from_local(v, p.device_mesh, p.placements, run_check=False,
                                                                  shape=p.shape, stride=p.stride())


def write_rank_files(folder: Path, own: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in own.items():
        if value is not None:
            torch.save(value, folder / f"{name}.pt")


class RowsLogger:
    """The metrics rows of a process other than rank 0: kept for ``train``'s return value, written nowhere."""

    def __init__(self, output_dir: str | Path, *, start_step: int = 0, rows: list | None = None, **_: Any):
        if rows is None:  # as MetricsLogger: a checkpoint's rows, or those of rank 0's file
            rows = read_metrics(Path(output_dir) / "metrics.jsonl", upto_step=start_step) if start_step > 0 else []
        self.rows = list(rows)

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)

    def close(self) -> None:
        pass
