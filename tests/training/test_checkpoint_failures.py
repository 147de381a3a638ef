"""Checkpoints under pressure: a full disk or a permission error during a save leaves the previous checkpoint
loadable and stops with one line naming the folder and the space; save_total_limit with the best checkpoint
by a metric; the checkpoint a resume needs is never deleted."""

import errno
import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from grpokit.cli import main
from grpokit.reporting.metrics import read_metrics
from grpokit.training import checkpoint as checkpoint_module
from grpokit.training.checkpoint import (
    STATE_FILE,
    CheckpointError,
    best_checkpoint,
    checkpoints_to_delete,
    list_checkpoints,
)
from tests.training.test_resume import make_trainer, write_run


def failing_on_call(n: int, error: OSError, real):
    """``real``, except that its ``n``-th call writes a little and then raises ``error``."""
    calls = {"n": 0}

    def save(model, folder, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "model.safetensors").write_bytes(b"half a tensor")
            raise error
        return real(model, folder, *args, **kwargs)

    return save


def test_a_full_disk_keeps_the_previous_checkpoint_and_names_folder_and_space(tmp_path, monkeypatch):
    """ENOSPC while writing checkpoint-3 (the policy's weights): the run stops with a CheckpointError of one line
    (folder, size of a checkpoint, free space, the checkpoint kept), no temporary folder is left, and
    checkpoint-2 loads with from_pretrained and resumes the run to its end."""
    real = checkpoint_module.save_model
    full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint_module, "save_model", failing_on_call(3, full, real))  # beta 0: one model
    with pytest.raises(CheckpointError) as error:
        make_trainer(tmp_path, max_steps=4, save_steps=1, beta=0.0).train()
    message = str(error.value)
    size = checkpoint_module.format_size(checkpoint_module.folder_bytes(tmp_path / "checkpoint-2"))
    assert "\n" not in message and error.value.errno == errno.ENOSPC
    assert f"cannot write checkpoint-3 in {str(tmp_path)!r}: No space left on device" in message
    assert f"a checkpoint of this run takes about {size} and " in message and " is free there" in message
    assert "the previous checkpoint, checkpoint-2, is intact" in message and "--resume" in message
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-2")
    monkeypatch.setattr(checkpoint_module, "save_model", real)
    resumed = make_trainer(tmp_path, max_steps=4, save_steps=1, beta=0.0).train(resume_from_checkpoint=True)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]


def test_a_permission_error_before_any_checkpoint_and_the_cli_exit_status(tmp_path, monkeypatch, capsys):
    real = checkpoint_module.save_model
    denied = PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(checkpoint_module, "save_model", failing_on_call(1, denied, real))
    config = write_run(tmp_path, max_steps=2, save_steps=1, num_iterations=1, steps_per_rollout=1, beta=0.0)
    assert main(["train", "--config", str(config)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("grpokit: error: cannot write checkpoint-1 in"), err
    assert "Permission denied; no checkpoint had been written yet" in err and "free there" not in err


def test_save_total_limit_keeps_the_best_checkpoint_by_a_metric(tmp_path):
    """save_total_limit 1 with metric_for_best_model: the newest checkpoint and the one of the best logged
    value; each trainer_state.json names the best so far (transformers' best_model_checkpoint, best_metric)."""
    rows = make_trainer(tmp_path, max_steps=5, save_steps=1, save_total_limit=1, metric_for_best_model="loss",
                        num_iterations=1).train()
    losses = {r["step"]: r["loss"] for r in rows}
    best = min(losses, key=losses.get)  # a name ending in "loss": lower is better
    assert [p.name for p in list_checkpoints(tmp_path)] == sorted({f"checkpoint-{best}", "checkpoint-5"},
                                                                  key=lambda n: int(n.split("-")[1]))
    state = json.loads((tmp_path / "checkpoint-5" / STATE_FILE).read_text())
    assert state["best_model_checkpoint"] == str(tmp_path / f"checkpoint-{best}")
    assert state["best_metric"] == losses[best]


def test_an_unknown_metric_is_refused_at_the_first_step(tmp_path):
    with pytest.raises(ValueError, match="metric_for_best_model 'rewrd' is not a key of the metrics rows; did you "
                                         "mean 'reward'"):
        make_trainer(tmp_path, max_steps=3, metric_for_best_model="rewrd").train()
    assert not list_checkpoints(tmp_path)


def test_an_eval_metric_is_accepted_before_its_first_evaluation():
    from grpokit.training.checkpoint import check_best_metric

    check_best_metric("eval/reward", [{"step": 1, "reward": 0.5}], evaluating=True)
    with pytest.raises(ValueError, match="'eval/reward' is not a key"):
        check_best_metric("eval/reward", [{"step": 1, "reward": 0.5}], evaluating=False)


def fake_checkpoints(folder: Path, steps: list[int]) -> None:
    for step in steps:
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        (folder / f"checkpoint-{step}" / STATE_FILE).write_text(json.dumps({"step": step}))


def test_retention_keeps_the_newest_the_best_and_what_is_not_this_runs(tmp_path):
    fake_checkpoints(tmp_path, [10, 20, 30, 40, 90])  # 90: a later step, from before a resume at an earlier one
    names = lambda paths: [p.name for p in paths]
    assert names(checkpoints_to_delete(tmp_path, 40, 2)) == ["checkpoint-10", "checkpoint-20"]
    assert names(checkpoints_to_delete(tmp_path, 40, 1, best="checkpoint-20")) == ["checkpoint-10", "checkpoint-30"]
    # resumed at 20 and just wrote 30: 40 and 90 are of another branch, neither counted nor deleted
    assert names(checkpoints_to_delete(tmp_path, 30, 1)) == ["checkpoint-10", "checkpoint-20"]
    logged = [(10, 0.2), (20, 0.9), (30, None), (40, 0.5)]
    history = [{"step": s, "reward": r, "loss": None if r is None else -r} for s, r in logged]
    assert best_checkpoint(tmp_path, 40, history, "reward") == ("checkpoint-20", 0.9)
    assert best_checkpoint(tmp_path, 40, history, "loss") == ("checkpoint-20", -0.9)  # lower is better
    assert best_checkpoint(tmp_path, 40, history, "reward", greater_is_better=False) == ("checkpoint-10", 0.2)
    assert best_checkpoint(tmp_path, 30, history, "reward") == ("checkpoint-20", 0.9)
    assert best_checkpoint(tmp_path, 40, history, None) is None
    shutil.rmtree(tmp_path / "checkpoint-20")  # the best is only ever among the checkpoints that exist
    assert best_checkpoint(tmp_path, 40, history, "reward") == ("checkpoint-40", 0.5)


def test_metrics_rows_and_checkpoint_agree_after_a_failed_save(tmp_path, monkeypatch):
    """The rows logged before the failed save are kept in metrics.jsonl; a resume from the intact checkpoint
    cuts them back to its step and logs each later step once."""
    real = checkpoint_module.save_model
    monkeypatch.setattr(checkpoint_module, "save_model",
                        failing_on_call(2, OSError(errno.ENOSPC, "No space left on device"), real))
    with pytest.raises(CheckpointError):
        make_trainer(tmp_path, max_steps=3, save_steps=1, beta=0.0).train()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    monkeypatch.setattr(checkpoint_module, "save_model", real)
    make_trainer(tmp_path, max_steps=3, save_steps=1, beta=0.0).train(resume_from_checkpoint=True)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
