"""Nothing lost: SIGKILL at random instants, resume with ``--resume``, and the run ends bit-identical to one that
was never interrupted; atomic checkpoints and the output-folder guard, in process."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from grpokit import GRPOConfig
from grpokit.cli import main
from grpokit.reporting.metrics import TIMING_KEYS, read_metrics
from grpokit.tasks.demo import char_tokenizer, tiny_model
from grpokit.training.checkpoint import STATE_FILE, delete_checkpoint, list_checkpoints, remove_partial_checkpoints
from grpokit.training.run_dir import OutputDirError
from grpokit.training.trainer import GRPOTrainer, quiet_transformers

TIMING = TIMING_KEYS
MAX_STEPS = 20
PAIRS = [("ab", "aaaa"), ("c", "cccc"), ("dd", "dddd"), ("abc", "bbbb"), ("ba", "aaaa"), ("d", "dddd")]


def write_run(folder: Path, **overrides) -> Path:
    """A complete ``grpokit train --config`` run in ``folder``: tiny saved model, JSONL data, built-in reward.
    beta > 0 (pi_ref) and mu = 2 x 2 mini-batches, so checkpoints every 3 steps fall inside rollouts."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = char_tokenizer("abcd")
    model = tiny_model(tokenizer, hidden_size=32)
    with quiet_transformers():
        model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    (folder / "data.jsonl").write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n" for p, t in PAIRS))
    config = dict(model=str(folder / "model"), dataset=str(folder / "data.jsonl"), reward_funcs=["char_match"],
                  output_dir=str(folder / "out"), seed=3, max_steps=MAX_STEPS, learning_rate=0.01,
                  prompts_per_step=2, num_generations=4, max_completion_length=6, beta=0.1, num_iterations=2,
                  steps_per_rollout=2, save_steps=3, save_total_limit=2, logging_steps=1000)
    config.update(overrides)
    (folder / "cfg.yaml").write_text(yaml.safe_dump(config))
    return folder / "cfg.yaml"


def spawn(config: Path, *extra: str) -> subprocess.Popen:
    """``grpokit train --config config`` in a child process; its stderr goes to a file beside the config."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with open(config.parent / f"stderr-{len(list(config.parent.glob('stderr-*')))}.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "grpokit", "train", "--config", str(config), *extra],
                                stdout=subprocess.DEVNULL, stderr=err, env=env)
    proc.err_path = Path(err.name)
    return proc


def stderr_of(proc: subprocess.Popen) -> str:
    return proc.err_path.read_text()


def rows_done(out: Path) -> int:
    try:
        return len((out / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def saving(out: Path) -> bool:
    try:
        return any(name.startswith(".tmp-checkpoint-") for name in os.listdir(out))
    except FileNotFoundError:
        return False


def kill_when(proc: subprocess.Popen, ready, timeout: float = 60.0) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` holds (polled every ~0.5 ms); False if it ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.0005)
    proc.wait()
    return False


def strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_sigkill_at_random_instants_then_resume_is_bit_identical(tmp_path):
    """Kills: after a random number of logged steps (plus a random delay), in the middle of writing a
    checkpoint, and at a random instant after a restart (often before its first step). Each restart is
    ``grpokit train --config cfg.yaml --resume``. The final metrics (each step once) and weights (pi_theta,
    pi_ref, AdamW moments) equal those of an uninterrupted run bit for bit."""
    reference_config = write_run(tmp_path / "reference")
    config = write_run(tmp_path / "killed")
    out = tmp_path / "killed" / "out"
    reference = spawn(reference_config)  # runs beside the kill chain (the machine has two cores)
    rng = random.Random(int(os.environ.get("GRPOKIT_KILL_SEED", "0")))

    def after_rows_then_delay():
        target, delay = rows_done(out) + rng.randint(1, 4), rng.uniform(0.0, 0.2)
        return lambda: rows_done(out) >= target and (time.sleep(delay) or True)

    def mid_checkpoint():
        return lambda: saving(out)

    def random_instant():
        deadline = time.monotonic() + rng.uniform(0.5, 6.0)
        return lambda: time.monotonic() >= deadline

    kills, history = 0, []
    for attempt, trigger in enumerate([after_rows_then_delay, mid_checkpoint, random_instant]):
        proc = spawn(config, *(["--resume"] if attempt else []))
        killed = kill_when(proc, trigger())
        kills += killed
        history.append((trigger.__name__, killed, rows_done(out), [p.name for p in list_checkpoints(out)]))
        if not killed:
            assert proc.returncode == 0, stderr_of(proc)
    final = spawn(config, "--resume")
    assert final.wait(timeout=120) == 0, stderr_of(final)
    assert reference.wait(timeout=120) == 0, stderr_of(reference)
    assert kills >= 3, history

    ref_out = tmp_path / "reference" / "out"
    rows, ref_rows = read_metrics(out / "metrics.jsonl"), read_metrics(ref_out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1)), history
    assert strip(rows) == strip(ref_rows), history
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-18", "checkpoint-20"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "leftover temporary folders"
    last, ref_last = out / "checkpoint-20", ref_out / "checkpoint-20"
    for name in ("model.safetensors", "ref_model/model.safetensors"):
        mine, theirs = load_file(str(last / name)), load_file(str(ref_last / name))
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name
        assert (last / name).read_bytes() == (ref_last / name).read_bytes(), name
    moments = lambda path: torch.load(path / "optimizer.pt", weights_only=False)["state"]
    for key, state in moments(ref_last).items():
        for field, value in state.items():
            assert torch.equal(moments(last)[key][field], value), (key, field)


# ----------------------------------------------------------------------------------------------------------
# in process: the pieces the kill test relies on


def count_a(prompts, completions, **kwargs):
    return [c.count("a") / max(len(c), 1) for c in completions]


def make_trainer(folder: Path, **config) -> GRPOTrainer:
    tokenizer = char_tokenizer("abcd")
    fields = dict(output_dir=str(folder), seed=0, max_steps=4, learning_rate=1e-2, prompts_per_step=2,
                  num_generations=4, max_completion_length=5, save_steps=1, logging_steps=1000, beta=0.1,
                  num_iterations=2)
    fields.update(config)
    return GRPOTrainer(tiny_model(tokenizer, hidden_size=32), count_a, [{"prompt": p} for p in ["ab", "c", "dd"]],
                       args=GRPOConfig(**fields), tokenizer=tokenizer)


def test_a_checkpoint_holds_everything_that_shapes_the_future(tmp_path):
    make_trainer(tmp_path, max_steps=3, save_steps=3).train()
    folder = tmp_path / "checkpoint-3"  # step 3 is inside the second rollout (mu = 2)
    state = json.loads((folder / STATE_FILE).read_text())
    assert state["step"] == 3 and state["data_order"]["position"] == 4 % 3 and state["data_order"]["epoch"] == 1
    rng = torch.load(folder / "rng.pt", weights_only=False)
    assert {"python", "numpy", "torch", "sampler"} <= set(rng)
    optimizer = torch.load(folder / "optimizer.pt", weights_only=False)
    assert optimizer["state"] and all(int(s["step"]) == 3 for s in optimizer["state"].values())
    assert torch.load(folder / "scheduler.pt", weights_only=False)["last_epoch"] == 3
    rollout = torch.load(folder / "rollout.pt", weights_only=False)["batch"]
    assert rollout["old_logps"] is not None and rollout["ref_logps"] is not None
    for name in ("model.safetensors", "ref_model/model.safetensors", "tokenizer.json"):
        assert (folder / name).is_file(), name


def test_save_total_limit_keeps_the_newest(tmp_path):
    make_trainer(tmp_path, max_steps=5, save_steps=1, save_total_limit=2).train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-5"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_only_complete_checkpoints_count_and_torn_ones_are_swept(tmp_path):
    make_trainer(tmp_path, max_steps=2, save_steps=1).train()
    (tmp_path / "checkpoint-7").mkdir()  # no trainer_state.json: never complete
    (tmp_path / "checkpoint-7" / "model.safetensors").write_bytes(b"torn")
    (tmp_path / ".tmp-checkpoint-3-1").mkdir()  # a save killed before its rename
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2"]
    # a save_total_limit deletion killed half way: renamed out of the namespace first, so never picked
    os.replace(tmp_path / "checkpoint-1", tmp_path / ".deleting-checkpoint-1-5")
    # a re-save of step 2 killed between its two renames: the old one is put back
    os.replace(tmp_path / "checkpoint-2", tmp_path / ".old-checkpoint-2-9")
    remove_partial_checkpoints(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and p.name != "final") == ["checkpoint-2",
                                                                                         "checkpoint-7"]
    delete_checkpoint(tmp_path / "checkpoint-7")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]


def test_resume_before_any_checkpoint_restarts_the_same_run(tmp_path, capsys):
    """A run killed before its first checkpoint: ``resume_from_checkpoint=True`` starts at step 0 and, from
    the same seed, is the same run; its earlier metrics rows are replaced, not duplicated."""
    full = make_trainer(tmp_path / "full", save_steps=0).train()
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "metrics.jsonl").write_text('{"step": 1, "reward": -5}\n{"step": 2, "rew')
    resumed = make_trainer(tmp_path / "part", save_steps=0).train(resume_from_checkpoint=True)
    assert "no checkpoint in" in capsys.readouterr().err
    assert strip(resumed) == strip(full)
    assert [r["step"] for r in read_metrics(tmp_path / "part" / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_checkpoint_keeps_the_metrics_rows_and_rebuilds_a_lost_metrics_file(tmp_path):
    first = make_trainer(tmp_path, max_steps=2).train()
    assert json.loads((tmp_path / "checkpoint-2" / STATE_FILE).read_text())["log_history"] == first
    (tmp_path / "metrics.jsonl").unlink()
    resumed = make_trainer(tmp_path, max_steps=3).train(resume_from_checkpoint=True)
    assert resumed[:2] == first and [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_resume_with_other_batch_shapes_is_an_error_naming_them(tmp_path):
    make_trainer(tmp_path, max_steps=1).train()
    with pytest.raises(ValueError, match=r"written with num_generations=4 \(now 2\), beta=0.1 \(now 0.0\)"):
        make_trainer(tmp_path, max_steps=2, num_generations=2, beta=0.0).train(resume_from_checkpoint=True)


def test_resume_from_an_explicit_missing_checkpoint_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="is not a grpokit checkpoint"):
        make_trainer(tmp_path).train(resume_from_checkpoint=tmp_path / "checkpoint-9")


def test_a_new_run_over_an_earlier_one_is_refused_and_changes_nothing(tmp_path):
    make_trainer(tmp_path, max_steps=2).train()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(OutputDirError) as error:
        make_trainer(tmp_path, max_steps=2).train()
    message = str(error.value)
    assert str(tmp_path) in message and "--resume" in message and "--overwrite" in message
    assert "overwrite_output_dir: true" in message
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_overwrite_replaces_the_earlier_run_only_once_a_step_is_done(tmp_path):
    make_trainer(tmp_path, max_steps=3).train()
    earlier = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def broken(prompts, completions, **kwargs):
        raise RuntimeError("boom")

    failing = make_trainer(tmp_path, max_steps=2, overwrite_output_dir=True)
    failing.reward_funcs[0].func = broken
    with pytest.raises(ValueError, match="'count_a' raised RuntimeError"):
        failing.train()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == earlier  # config.yaml too

    make_trainer(tmp_path, max_steps=2, overwrite_output_dir=True).train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2"]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_cli_resume_and_overwrite_flags(tmp_path, capsys):
    config = write_run(tmp_path, max_steps=4, save_steps=2, num_iterations=1, steps_per_rollout=1, beta=0.0)
    assert main(["train", "--config", str(config)]) == 0
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "out") in err and "--resume" in err and "--overwrite" in err
    assert main(["train", "--config", str(config), "--resume", "--max_steps", "6"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert main(["train", "--config", str(config), "--overwrite", "--max_steps", "2"]) == 0
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["checkpoint-2"]
    assert [r["step"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl")] == [1, 2]
