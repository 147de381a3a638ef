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
``optimizer.pt`` (its shard of the AdamW moments). ``world.json`` records the process count. On the same
number of processes (and the same ``distributed`` mode) a checkpoint resumes exactly. On another number W'
(2 -> 1, 1 -> 2, 2 -> 4, wherever ``prompts_per_step`` splits; ``Parallel.checkpoint_tensors``) the run
continues with the same global batches and data position, and:

* the optimizer: DDP's (and one process's) state is whole; FSDP shards are joined back into whole moments
  (they are cut along dim 0, in rank order) and cut again for W' processes when loaded;
* the RNGs: every process takes rank 0's Python, NumPy and torch states (as a fresh run seeds every process
  alike), and each process's sampler is seeded afresh from (seed, step, rank) (``resharded_sampler_seed``):
  W' new streams, none a copy of another, since W streams cannot be split into W' others;
* a checkpoint inside a rollout: every process's saved rows are put back into the global rollout's order and
  re-split as W' processes hold them (``reshard_rollout``), re-padded to the widest rows.

The continuation is a valid GRPO run, not the bit-identical one (different sampler streams); with completions
that do not depend on the sampler its updates equal the uninterrupted run's to float rounding.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpokit.config import DISTRIBUTED
from grpokit.losses import BatchTotals
from grpokit.models.forward import completion_logps
from grpokit.reporting.metrics import read_metrics
from grpokit.rewards import RewardError
from grpokit.rollout import select_rows
from grpokit.training.checkpoint import STATE_FILE, CheckpointError, rng_state
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


def resharded_sampler_seed(seed: int, rank: int, step: int) -> int:
    """Seed of process ``rank``'s sampler when a run resumes at ``step`` on another number of processes: a hash
    of (seed, rank, step), so that no stream repeats an earlier one of the run nor another process's."""
    digest = hashlib.sha256(f"grpokit-sampler/{seed}/{rank}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def agreed(world: World, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)`` (scoring a rollout); under torchrun, when it raises ``RewardError`` on some
    process, every process raises one after the same collective, so that all can write a checkpoint together
    rather than wait for each other's next collective."""
    error = None
    try:
        result = call(*args, **kwargs)
    except RewardError as e:
        error = e
    if world.world_size > 1 and world.max_float(0.0 if error is None else 1.0) > 0 and error is None:
        error = RewardError("a reward function failed on another process (its error is in that process's output)")
    if error is not None:
        raise error
    return result


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


def shard_rows(num_prompts: int, group_size: int, steps_per_rollout: int, world_size: int, rank: int) -> list[int]:
    """The global rollout rows rank ``rank`` holds, in its local order: the G rows of each of its prompts."""
    return [p * group_size + j for p in shard_prompts(num_prompts, steps_per_rollout, world_size, rank)
            for j in range(group_size)]


def rollout_shard(args, world: World) -> RolloutShard:
    """The ``RolloutShard`` of this process for ``args`` (a ``GRPOConfig``); checks that the batch splits."""
    P, G, S, W = args.prompts_per_step, args.num_generations, args.steps_per_rollout, world.world_size
    check_batch_shape(args, W)
    gathered = torch.tensor([row for rank in range(W) for row in shard_rows(P, G, S, W, rank)])  # (N,)
    return RolloutShard(prompts=tuple(shard_prompts(P, S, W, world.rank)),
                        rows=torch.tensor(shard_rows(P, G, S, W, world.rank)), inverse=torch.argsort(gathered),
                        world=world)


def reshard_rollout(parts: list[dict[str, Any]], num_prompts: int, group_size: int, steps_per_rollout: int,
                    rank: int, world_size: int) -> dict[str, Any]:
    """A rollout saved by ``len(parts)`` processes (``parts[r]``: rank r's ``Batch.state_dict()``) as process
    ``rank`` of ``world_size`` holds it: the rows are put back in the global order, then cut as
    ``shard_rows`` cuts them for ``world_size``. Widths differ between processes: prompts are left-padded,
    completions (and every per-token field) right-padded to the widest, masks with 0."""
    P, G, S = num_prompts, group_size, steps_per_rollout
    saved = torch.tensor([row for r in range(len(parts)) for row in shard_rows(P, G, S, len(parts), r)])
    merged = {}
    for name in parts[0]:
        items = [part[name] for part in parts]
        if items[0] is None:
            merged[name] = None
            continue
        if items[0].dim() == 1:
            merged[name] = torch.cat(items)
            continue
        width = max(x.size(1) for x in items)
        value = _pad_value(parts, name)
        padded = []
        for x in items:
            fill = x.new_full((x.size(0), width - x.size(1)), value)
            padded.append(torch.cat([fill, x] if name.startswith("prompt") else [x, fill], dim=1))
        merged[name] = torch.cat(padded)
    order = torch.argsort(saved)  # position in the rank-major concatenation of each global row
    return select_rows(merged, order[torch.tensor(shard_rows(P, G, S, world_size, rank))])


def _pad_value(parts: list[dict[str, Any]], name: str):
    """What pads ``name``: the padding id already in the saved ids (``*_ids``), else 0."""
    if not name.endswith("_ids"):
        return 0
    mask_name = name.replace("_ids", "_mask")
    for part in parts:
        padding = part[name][part[mask_name] == 0]
        if padding.numel():
            return padding[0].item()
    return 0


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
            return self._add_rank_files(own)
        phase = "writing"  # what the other processes wait for when rank 0's save fails: the folder, or the end

        def before_commit(folder: Path) -> None:
            nonlocal phase
            (folder / WORLD_FILE).write_text(json.dumps({"world_size": self.world.world_size, "mode": self.mode}))
            self.world.broadcast_object(str(folder))
            phase = "ranks"
            if self.world.max_float(0.0) > 0:  # in place of a barrier: did every process write its files?
                raise CheckpointError(errno.EIO, f"another process could not write its rank-<r>/ files into "
                                                 f"{str(folder)!r} (its error is in its output); nothing was "
                                                 "committed and the earlier checkpoints are intact")
            phase = "committing"

        if self.mode == "fsdp":
            optimizer = _StateDict(own["optimizer"])
        try:
            path = save(output_dir, optimizer=optimizer, generator=generator, rollout=rollout,
                        before_commit=before_commit, **kwargs)
        except OSError as e:
            if phase != "ranks":  # the others wait in a broadcast: tell them why the save stopped
                self.world.broadcast_object({"error": str(e), "errno": e.errno})
            raise
        return Path(self.world.broadcast_object(str(path)))

    def _add_rank_files(self, own: dict[str, Any]) -> Path:
        """A process other than rank 0 during a save: write ``rank-<r>/`` into rank 0's temporary folder, then
        wait for the commit; rank 0's failure, or its own, raises ``CheckpointError`` on every process."""
        folder = self.world.broadcast_object(None)  # rank 0's folder, not yet committed (or its error)
        if isinstance(folder, dict):
            raise CheckpointError(folder["errno"], folder["error"])
        failed = None
        try:
            write_rank_files(Path(folder) / f"rank-{self.world.rank}", own)
        except OSError as e:
            failed = CheckpointError(e.errno, f"process {self.world.rank} cannot write {folder}/rank-"
                                              f"{self.world.rank}: {e.strerror or e}; nothing was committed")
        if self.world.max_float(1.0 if failed else 0.0) > 0:
            raise failed or CheckpointError(errno.EIO, "another process could not write its checkpoint files; "
                                                       "nothing was committed")
        path = self.world.broadcast_object(None)
        if isinstance(path, dict):
            raise CheckpointError(path["errno"], path["error"])
        return Path(path)

    def checkpoint_tensors(self, path: Path, tensors: dict[str, Any], device=None) -> dict[str, Any]:
        """``load_checkpoint_state``'s tensors as this process resumes them: on the same number of processes and
        mode, its own (``rank-<r>/``) in place of rank 0's; on another, re-split (``resharded_tensors``)."""
        info = json.loads((path / WORLD_FILE).read_text()) if (path / WORLD_FILE).is_file() else {"world_size": 1}
        saved, mode = int(info["world_size"]), info.get("mode", "none")
        if saved != self.world.world_size or mode != self.mode:
            return self.resharded_tensors(path, tensors, saved, mode, device)
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

    def resharded_tensors(self, path: Path, tensors: dict[str, Any], saved: int, saved_mode: str,
                          device=None) -> dict[str, Any]:
        """The tensors of a checkpoint written by ``saved`` processes (``saved_mode``), for this process of this
        run's W (the module docstring): whole AdamW moments, rank 0's RNGs with a new sampler seed, this
        process's rows of a saved rollout (moved to ``device``)."""
        state = json.loads((path / STATE_FILE).read_text())
        config, step, W = state.get("config") or {}, int(state["step"]), self.world.world_size
        folders = [path] + [path / f"rank-{r}" for r in range(1, saved)]
        missing = [str(f / "rng.pt") for f in folders[1:] if not (f / "rng.pt").is_file()]
        if missing:
            raise ValueError(f"{str(path)!r} has no {missing[0]}: it is incomplete")
        load = lambda folder, name: torch.load(folder / f"{name}.pt", map_location="cpu", weights_only=False)
        optimizer = tensors["optimizer"]
        if saved_mode == "fsdp":
            optimizer = join_optimizer_shards([optimizer] + [load(f, "optimizer") for f in folders[1:]])
        rng = {**tensors["rng"], "sampler_seed": resharded_sampler_seed(int(config.get("seed", 0)), self.world.rank,
                                                                        step)}
        rollout = tensors["rollout"]
        if rollout is not None:
            parts = [rollout["batch"]] + [load(f, "rollout")["batch"] for f in folders[1:]]
            batch = reshard_rollout(parts, config["prompts_per_step"], config["num_generations"],
                                    config["steps_per_rollout"], self.world.rank, W)
            if device is not None:
                batch = {k: None if v is None else v.to(device) for k, v in batch.items()}
            rollout = {"batch": batch, "metrics": rollout["metrics"]}
        if self.world.is_main:
            print(f"grpokit: {str(path)!r} was written by {saved} process(es) ({saved_mode}); continuing on {W} "
                  f"({self.mode}): same batches and data position, the AdamW state re-split, new sampler streams",
                  file=sys.stderr, flush=True)
        return {**tensors, "optimizer": optimizer, "rng": rng, "rollout": rollout}

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
    """After loading ``local_optimizer_state``: the moments of sharded parameters become shards again. Whole
    moments (a checkpoint of another process count, ``join_optimizer_shards``) are cut as the parameter is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            for name, v in optimizer.state[p].items():
                if not torch.is_tensor(v) or isinstance(v, DTensor) or not v.dim():
                    continue
                if v.shape == p.to_local().shape and v.shape != p.shape:
                    optimizer.state[p][name] = DTensor.from_local(v, p.device_mesh, p.placements, run_check=False,
                                                                  shape=p.shape, stride=p.stride())
                elif v.shape == p.shape:  # whole: every process keeps its own shard, no communication
                    optimizer.state[p][name] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements,
                                                                 src_data_rank=None)


def join_optimizer_shards(states: list[dict]) -> dict:
    """FSDP's per-process ``local_optimizer_state`` dicts (rank order) -> one whole ``optimizer.state_dict()``:
    each moment's shards concatenated along dim 0 (FSDP2 cuts parameters there, in rank order); step counts,
    the same on every process, kept."""
    whole = {}
    for key, first in states[0]["state"].items():
        whole[key] = {name: torch.cat([s["state"][key][name] for s in states]) if torch.is_tensor(v) and v.dim()
                      else v for name, v in first.items()}
    return {"state": whole, "param_groups": states[0]["param_groups"]}


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
