"""grpokit.training.distributed: how a rollout is split over processes, and 2 gloo processes under torchrun checked
against 1 process: the same update to float64 rounding, exact resume, rank 0 alone writing files, and checkpoints
resumed on another number of processes (1 -> 2, 2 -> 1) continuing the run's updates."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpokit import GRPOConfig
from grpokit.reporting.metrics import TIMING_KEYS
from grpokit.training.distributed import (
    World,
    check_batch_shape,
    init_world,
    join_optimizer_shards,
    reshard_rollout,
    resharded_sampler_seed,
    rollout_shard,
    sampler_seed,
    shard_prompts,
    shard_rows,
)
from tests.helpers import save_tiny_model
from tests.training import distributed_worker

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(distributed_worker.__file__)

# every loss type; mini-batches (S = 2), several passes (mu = 2, pi_old live, clipping binding), micro-batches,
# pi_ref (beta > 0), batch-std advantages, truncation masking; DDP and FSDP. Gradient clipping is on (0.5).
CASES = [
    dict(name="grpo", loss_type="grpo", micro_batch_size=4),
    dict(name="bnpo", loss_type="bnpo", steps_per_rollout=2, micro_batch_size=2, max_steps=4),
    dict(name="dapo", loss_type="dapo", scale_rewards="batch", steps_per_rollout=2, num_iterations=2, beta=0.05,
         max_steps=4),
    dict(name="dr_grpo", loss_type="dr_grpo", num_iterations=2, mask_truncated_completions=True),
    dict(name="cispo", loss_type="cispo", epsilon_high=5.0, num_iterations=2),
    dict(name="sapo", loss_type="sapo", scale_rewards="none"),
    # FSDP-sharded layers take the padded HF forward; so does the one-process run they are compared with (HF's
    # float32 RMSNorm rounds a shared prompt's gradient differently once it is summed over a group first)
    dict(name="fsdp-grpo", distributed="fsdp", padding_free=False, steps_per_rollout=2, num_iterations=2, beta=0.05,
         micro_batch_size=2, max_steps=4),
    dict(name="fsdp-dapo", distributed="fsdp", padding_free=False, loss_type="dapo", scale_rewards="batch"),
    # per-token advantages (KL as a reward-to-go), truncated importance sampling, the exact KL metrics
    dict(name="kl_in_reward", kl_in_reward=True, beta=0.05, num_iterations=2, tis="token", log_exact_kl=True),
    dict(name="fsdp-exact-kl", distributed="fsdp", padding_free=False, beta=0.05, log_exact_kl=True, tis="sequence"),
]
# real sampling (each process its own generator): a run resumed from the checkpoint of step 1, inside a
# rollout (S = 2), against the same run uninterrupted
RESUME = [dict(name=f"{how}-{mode}", distributed=mode, sample=True, steps_per_rollout=2, max_steps=3, save_steps=1,
               **({"resume_from": f"run-straight-{mode}/checkpoint-1"} if how == "resumed" else {}))
          for mode in ("ddp", "fsdp") for how in ("straight", "resumed")]
# another process count: checkpoint-1 falls inside a rollout (S = 2), so its rows are re-split; written by one
# process (in the fixture, before torchrun) and resumed by two, or written by two and resumed by one (in the test)
RESHARD = dict(steps_per_rollout=2, max_steps=3, save_steps=1)
PADDED = {"ddp": {}, "fsdp": {"distributed": "fsdp", "padding_free": False}}  # as CASES: FSDP takes the padded forward
W_CHANGE = [dict(name=f"two-{mode}", **RESHARD, **PADDED[mode]) for mode in PADDED] + [
    dict(name=f"from-one-{mode}", resume_from=f"run-one-{mode}/checkpoint-1", **RESHARD, **PADDED[mode])
    for mode in PADDED]
# a stop signal on rank 1 only, during step 2's rollout: both processes stop after step 2
SIGNALLED = [dict(name="signal-ddp", signal_on_rank=1, max_steps=4)]
METRICS = ("reward", "reward_std", "frac_zero_std_groups", "completion_length", "truncated_ratio", "loss", "entropy",
           "kl", "clip_ratio", "ratio_mean", "grad_norm", "kl_exact_reverse", "kl_exact_forward", "tis/mean_weight")


def torchrun(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """Every case of CASES and RESUME trained once by 2 gloo processes; their results in the returned folder."""
    out = tmp_path_factory.mktemp("torchrun")
    for mode in PADDED:  # one process's checkpoints, for the 2-process runs that resume them
        one_thread(distributed_worker.run_case, dict(name=f"one-{mode}", **RESHARD, **PADDED[mode]), out)
    (out / "cases.json").write_text(json.dumps(CASES + RESUME + W_CHANGE + SIGNALLED))
    torchrun(str(WORKER), str(out / "cases.json"), str(out), cwd=ROOT)
    return out


def one_thread(call, *args):
    """``call(*args)`` with one torch thread, as each torchrun process runs (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return call(*args)
    finally:
        torch.set_num_threads(threads)


# ---- the split (no processes needed) ---------------------------------------------------------------------


def test_each_mini_batch_is_cut_into_one_block_of_whole_groups_per_process():
    # P = 8 prompts, S = 2 mini-batches of 4 prompts, W = 2: rank r takes prompts 2r, 2r+1 of each mini-batch
    assert shard_prompts(8, 2, 2, 0) == [0, 1, 4, 5]
    assert shard_prompts(8, 2, 2, 1) == [2, 3, 6, 7]
    for P, S, W in [(8, 1, 2), (12, 3, 2), (16, 2, 4), (6, 1, 3)]:
        shares = [shard_prompts(P, S, W, r) for r in range(W)]
        assert sorted(sum(shares, [])) == list(range(P))  # disjoint, and every prompt sampled once
        for share in shares:  # local mini-batch k lies inside global mini-batch k
            per_local = len(share) // S
            assert all(p // (P // S) == k for k in range(S) for p in share[k * per_local:(k + 1) * per_local])


def test_gathered_rows_come_back_in_the_one_process_order():
    args = GRPOConfig(prompts_per_step=8, num_generations=3, steps_per_rollout=2)
    shards = [rollout_shard(args, World(rank=r, world_size=2)) for r in range(2)]
    gathered = torch.cat([s.rows for s in shards])  # what all_gather returns: rank 0's rows, then rank 1's
    assert torch.equal(gathered[shards[0].inverse], torch.arange(24))
    assert shards[1].rows.tolist()[:6] == [6, 7, 8, 9, 10, 11]  # prompts 2, 3: whole groups of G = 3
    one = rollout_shard(args, World())
    x = torch.randn(24)
    assert one.gather(x) is x and one.local(x) is x and one.take([1, 2]) == [1, 2]


def test_batch_shapes_that_cannot_split_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"prompts_per_step=6 must be a multiple of .* = 4 .*prompts_per_step: 8"):
        check_batch_shape(GRPOConfig(prompts_per_step=6, num_generations=4, steps_per_rollout=2), 2)
    with pytest.raises(ValueError, match="micro_batch_size=8 must divide each process's share .* = 4"):
        check_batch_shape(GRPOConfig(prompts_per_step=2, num_generations=4, micro_batch_size=8), 2)
    check_batch_shape(GRPOConfig(prompts_per_step=6, num_generations=4, steps_per_rollout=2), 1)  # one process


def test_one_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = init_world()
    assert world == World() and world.is_main and not torch.distributed.is_initialized()
    x = torch.ones(3)
    assert world.all_reduce_sum(x) is x and world.gather_rows(x) is x and world.sum_floats({"a": 1.0}) == {"a": 1.0}
    assert world.weighted_mean({"kl": 0.5}, 7.0) == {"kl": 0.5}
    assert sampler_seed(42, 0) == 42 and sampler_seed(42, 1) != sampler_seed(43, 0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="launch several processes with torchrun"):
        init_world()


# ---- 2 processes under torchrun --------------------------------------------------------------------------


@pytest.mark.slow
def test_collectives_of_two_processes(two_processes):
    for rank in range(2):
        got = torch.load(two_processes / f"collectives-{rank}.pt", weights_only=False)
        assert got == {"sum": 3.0, "gather": [[0, 0], [0, 0], [1, 1], [1, -1]],
                       "gather_bool": [True, True, False, True], "weighted_mean": {"x": pytest.approx(5 / 3)},
                       "broadcast": "from rank 0"}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_two_processes_make_the_same_updates_as_one(two_processes, case, tmp_path, monkeypatch):
    """Same completions (fixed_generate), float64: parameters after every step of the run and each step's
    metrics agree with one process to rounding; the split, the reward gather, the global loss totals and
    DDP's / FSDP's gradient averaging change nothing else."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process (OMP_NUM_THREADS=1); tiny matrices gain nothing from more
    try:
        one = distributed_worker.run_case(case, tmp_path)
    finally:
        torch.set_num_threads(threads)
    two = torch.load(two_processes / f"{case['name']}.pt", weights_only=False)
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert len(two["history"]) == len(one["history"]) == case.get("max_steps", 2)
    error = max((two["params"][k] - v).abs().max().item() for k, v in one["params"].items())
    assert error < 1e-12, error
    start = distributed_worker.initial_parameters()
    assert max((v - start[k]).abs().max().item() for k, v in one["params"].items()) > 1e-3  # they did move
    for a, b in zip(one["history"], two["history"]):
        for name in METRICS:
            if name in a:
                assert b[name] == pytest.approx(a[name], rel=1e-9, abs=1e-12), (a["step"], name)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_resume_under_torchrun_is_exact(two_processes, mode):
    """Stopped inside a rollout (rank 1's rows in rank-1/rollout.pt, every rank's sampler in its rng.pt) and
    resumed: the same parameters and metrics, bit for bit, as the uninterrupted 2-process run."""
    straight = torch.load(two_processes / f"straight-{mode}.pt", weights_only=False)
    resumed = torch.load(two_processes / f"resumed-{mode}.pt", weights_only=False)
    assert all(torch.equal(straight["params"][k], v) for k, v in resumed["params"].items())
    timing = TIMING_KEYS
    clean = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]
    assert clean(resumed["history"])[-2:] == clean(straight["history"])[1:]  # steps 2, 3
    checkpoint = two_processes / f"run-straight-{mode}" / "checkpoint-1"
    assert json.loads((checkpoint / "world.json").read_text()) == {"world_size": 2, "mode": mode}
    assert (checkpoint / "rank-1" / "rollout.pt").is_file() and (checkpoint / "rank-1" / "rng.pt").is_file()
    assert (checkpoint / "rank-1" / "optimizer.pt").is_file() == (mode == "fsdp")  # DDP: rank 0's is everyone's


@pytest.mark.slow
def test_cli_under_torchrun_trains_and_only_rank_0_writes(tmp_path):
    """``torchrun --nproc-per-node 2 -m grpokit train --config run.yaml``: one progress line per logged step,
    one metrics row per step, an HF-loadable model, and resuming on another process count is refused."""
    from transformers import AutoModelForCausalLM

    save_tiny_model(tmp_path / "init")
    rows = [{"prompt": [{"role": "user", "content": c}], "target": c * 3} for c in "abcdef"]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "run.yaml").write_text(
        f"model: {tmp_path / 'init'}\ndataset: {tmp_path / 'data.jsonl'}\nreward_funcs: [char_match]\n"
        f"output_dir: {tmp_path / 'run'}\nmax_steps: 2\nsave_steps: 1\nlogging_steps: 1\nprompts_per_step: 4\n"
        "num_generations: 4\nmax_completion_length: 3\nlearning_rate: 0.003\n")
    done = torchrun("-m", "grpokit", "train", "--config", str(tmp_path / "run.yaml"), cwd=tmp_path)
    assert done.stdout.count("step 1/2") == 1 and done.stdout.count("grpokit: done") == 1, done.stdout
    run = tmp_path / "run"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (run / "config.yaml").is_file() and (run / "metrics.png").is_file()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-1",
                                                                                      "checkpoint-2"]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    AutoModelForCausalLM.from_pretrained(run / "checkpoint-2")  # rank 0 wrote a complete HF model
    one = subprocess.run([sys.executable, "-m", "grpokit", "train", "--config", str(tmp_path / "run.yaml"),
                          "--resume", "--max_steps", "3"], cwd=tmp_path, capture_output=True, text=True)
    assert one.returncode == 0 and "was written by 2 process(es) (ddp); continuing on 1" in one.stderr, one.stderr
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


# ---- another number of processes -------------------------------------------------------------------------


def close(a: dict, b: dict) -> float:
    return max((a[k] - v).abs().max().item() for k, v in b.items())


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(PADDED))
def test_a_one_process_checkpoint_resumes_on_two(two_processes, mode, tmp_path):
    """Checkpoint-1 of one process, inside a rollout, resumed by 2 processes: its rows re-split between them,
    the AdamW state (under FSDP) cut into shards; the parameters and metrics of steps 2-3 are those of the
    uninterrupted one-process run (completions from fixed_generate, the same whatever the sampler)."""
    straight = one_thread(distributed_worker.run_case, dict(name=f"straight-{mode}", **RESHARD, **PADDED[mode]),
                          tmp_path)
    resumed = torch.load(two_processes / f"from-one-{mode}.pt", weights_only=False)
    assert resumed["world_size"] == 2 and close(resumed["params"], straight["params"]) < 1e-12
    for a, b in zip(straight["history"][1:], resumed["history"][-2:]):
        assert a["step"] == b["step"]
        for name in METRICS:
            if name in a:
                assert b[name] == pytest.approx(a[name], rel=1e-9, abs=1e-12), (a["step"], name)


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(PADDED))
def test_a_two_process_checkpoint_resumes_on_one(two_processes, mode, tmp_path):
    """Checkpoint-1 of 2 processes (rank-1/ holds rank 1's rows, RNG and, under FSDP, its AdamW shard)
    resumed by one process: the same parameters and metrics as the uninterrupted one-process run."""
    checkpoint = two_processes / f"run-two-{mode}" / "checkpoint-1"
    assert (checkpoint / "rank-1" / "rollout.pt").is_file()
    resumed = one_thread(distributed_worker.run_case, dict(name=f"from-two-{mode}", resume_from=str(checkpoint),
                                                           **RESHARD, **PADDED[mode]), tmp_path)
    straight = one_thread(distributed_worker.run_case, dict(name=f"straight-{mode}", **RESHARD, **PADDED[mode]),
                          tmp_path)
    assert resumed["world_size"] == 1 and close(resumed["params"], straight["params"]) < 1e-12
    two = torch.load(two_processes / f"two-{mode}.pt", weights_only=False)
    assert close(two["params"], straight["params"]) < 1e-12  # (and so is the 2-process run itself)
    for a, b in zip(straight["history"][1:], resumed["history"][-2:]):
        for name in METRICS:
            if name in a:
                assert b[name] == pytest.approx(a[name], rel=1e-9, abs=1e-12), (a["step"], name)


def synthetic_rollout(num_rows: int, generator: torch.Generator) -> dict:
    """A ``Batch.state_dict()`` of ``num_rows`` rows of random lengths: prompts left-padded, completions
    right-padded (pad id 9), advantages per row, log-probs per token."""
    P, C = 5, 6
    prompt_len = torch.randint(1, P + 1, (num_rows,), generator=generator)
    completion_len = torch.randint(1, C + 1, (num_rows,), generator=generator)
    prompt_mask = (torch.arange(P) >= P - prompt_len[:, None]).long()
    completion_mask = (torch.arange(C) < completion_len[:, None]).long()
    ids = lambda mask: torch.where(mask.bool(), torch.randint(10, 50, mask.shape, generator=generator), 9)
    return {"prompt_ids": ids(prompt_mask), "prompt_mask": prompt_mask, "completion_ids": ids(completion_mask),
            "completion_mask": completion_mask, "loss_mask": completion_mask.clone(),
            "advantages": torch.randn(num_rows, generator=generator),
            "old_logps": torch.randn(num_rows, C, generator=generator) * completion_mask, "ref_logps": None}


def trimmed(batch: dict) -> dict:
    """The rows with the padding no row needs cut away: what one process saves of its own rows."""
    keep_p = batch["prompt_mask"].any(0).nonzero().min().item()
    keep_c = batch["completion_mask"].any(0).nonzero().max().item() + 1
    out = {}
    for k, v in batch.items():
        if v is None or v.dim() == 1:
            out[k] = v
        else:
            out[k] = v[:, keep_p:] if k.startswith("prompt") else v[:, :keep_c]
    return out


def row_content(batch: dict, i: int) -> tuple:
    """Row ``i`` without its padding: prompt tokens, completion tokens, advantage, log-probs of its tokens."""
    pm, cm = batch["prompt_mask"][i].bool(), batch["completion_mask"][i].bool()
    return (batch["prompt_ids"][i][pm].tolist(), batch["completion_ids"][i][cm].tolist(),
            batch["advantages"][i].item(), batch["old_logps"][i][cm].tolist(), batch["loss_mask"][i][cm].tolist())


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 4), (4, 2)])
def test_a_saved_rollout_is_re_split_for_another_process_count(before, after):
    """The rows each of ``before`` processes saved (trimmed to its own widths) come back as each of ``after``
    processes would have sampled them: the same rows, each with its tokens, advantage and log-probs, and the
    padding ids the rollout used."""
    P, G, S = 8, 2, 2
    whole = synthetic_rollout(P * G, torch.Generator().manual_seed(before * 10 + after))
    parts = [trimmed({k: None if v is None else v[shard_rows(P, G, S, before, r)] for k, v in whole.items()})
             for r in range(before)]
    for rank in range(after):
        got = reshard_rollout(parts, P, G, S, rank, after)
        rows = shard_rows(P, G, S, after, rank)
        assert got["ref_logps"] is None and got["advantages"].shape == (len(rows),)
        assert [row_content(got, i) for i in range(len(rows))] == [row_content(whole, r) for r in rows]
        assert set(got["prompt_ids"][got["prompt_mask"] == 0].tolist()) <= {9}


def test_fsdp_shards_join_into_the_whole_optimizer_state():
    whole = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(5, 3), "exp_avg_sq": torch.rand(5, 3)},
                       1: {"step": torch.tensor(3.0), "exp_avg": torch.randn(1), "exp_avg_sq": torch.rand(1)}},
             "param_groups": [{"lr": 0.1, "params": [0, 1]}]}
    shards = [{"state": {k: {n: v.chunk(2)[r] if v.dim() and r < len(v.chunk(2)) else
                             (v[:0] if v.dim() else v) for n, v in s.items()} for k, s in whole["state"].items()},
               "param_groups": whole["param_groups"]} for r in range(2)]  # torch.chunk: rank 1 of a (1,) is empty
    joined = join_optimizer_shards(shards)
    assert joined["param_groups"] == whole["param_groups"]
    for k, s in whole["state"].items():
        assert all(torch.equal(joined["state"][k][n], v) for n, v in s.items())


def test_resharded_sampler_seeds_are_new_streams():
    seeds = {resharded_sampler_seed(0, rank, step) for rank in range(4) for step in (1, 2, 100)}
    assert len(seeds) == 12 and not seeds & {sampler_seed(0, rank) for rank in range(4)}
    assert all(0 <= s < 2**63 for s in seeds) and resharded_sampler_seed(0, 1, 2) == resharded_sampler_seed(0, 1, 2)


@pytest.mark.slow
def test_a_signal_on_one_process_stops_every_process_after_the_same_step(two_processes):
    """SIGUSR1 reaches rank 1 alone: the all-reduced flag stops both after step 2, and they write checkpoint-2
    together (rank 1's files included); rank 0 says another process was signalled."""
    result = torch.load(two_processes / "signal-ddp.pt", weights_only=False)
    assert [r["step"] for r in result["history"]] == [1, 2]
    assert result["stopped_by"] == "a stop signal on another process"
    checkpoint = two_processes / "run-signal-ddp" / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "rank-1" / "rng.pt").is_file()
    assert not (two_processes / "run-signal-ddp" / "checkpoint-4").exists()
