"""SIGTERM / SIGINT / SIGUSR1 during training: the step finishes, a checkpoint is written, the way to resume is
printed, ``train()`` returns (the CLI exits 0) and ``--resume`` continues to the same final step as an
uninterrupted run; a second signal exits at once and the last complete checkpoint still loads."""

import os
import signal
import threading
import time

import pytest

from grpokit.reporting.metrics import read_metrics
from grpokit.training.checkpoint import list_checkpoints
from grpokit.training.signals import GracefulStop
from tests.training.test_resume import make_trainer, rows_done, spawn, stderr_of, strip, write_run


def test_a_second_sigint_is_a_keyboard_interrupt():
    before = signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) == before


def test_handlers_are_installed_in_the_main_thread_and_restored():
    before = signal.getsignal(signal.SIGUSR1)
    with GracefulStop() as stop:
        assert signal.getsignal(signal.SIGUSR1) == stop._handle
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)  # the handler runs in the main thread, between two bytecodes
        assert stop.requested == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == before

    seen = {}

    def elsewhere():
        with GracefulStop() as stop:
            seen["installed"] = bool(stop._previous)

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert seen == {"installed": False} and signal.getsignal(signal.SIGUSR1) == before


def test_sigterm_in_process_finishes_the_step_checkpoints_and_returns(tmp_path, capfd):
    """SIGTERM sent while the second rollout is scored (it feeds steps 3 and 4, num_iterations 2): step 3 is
    finished, train() returns the rows of steps 1-3, checkpoint-3 holds them with the rollout it is inside
    (save_steps 0), the previous SIGTERM handler is back, and a resumed run equals an uninterrupted one."""
    full = make_trainer(tmp_path / "full", save_steps=0).train()

    def signalling(prompts, completions, **kwargs):
        signalling.calls += 1
        if signalling.calls == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return [c.count("a") / max(len(c), 1) for c in completions]

    signalling.calls = 0
    before = signal.getsignal(signal.SIGTERM)
    trainer = make_trainer(tmp_path / "run", save_steps=0)
    trainer.reward_funcs[0].func = signalling
    rows = trainer.train()
    err = capfd.readouterr().err  # the handler writes to file descriptor 2 itself
    assert [r["step"] for r in rows] == [1, 2, 3] and trainer.stopped_by == "SIGTERM"
    assert "SIGTERM received" in err and "stopped by SIGTERM after step 3 of 4" in err
    assert "train(resume_from_checkpoint=True)" in err
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-3"]
    assert (tmp_path / "run" / "checkpoint-3" / "rollout.pt").is_file()
    assert not (tmp_path / "run" / "final").exists()  # the run is not finished
    assert signal.getsignal(signal.SIGTERM) == before
    resumed = make_trainer(tmp_path / "run", save_steps=0).train(resume_from_checkpoint=True)
    assert strip(resumed) == strip(full)


@pytest.mark.slow
def test_sigterm_to_the_cli_exits_0_and_resume_reaches_the_same_final_step(tmp_path):
    """``grpokit train`` gets SIGTERM after some steps: exit status 0, the resume command on stderr, a
    checkpoint of the step it stopped at; ``--resume`` then ends at max_steps, every step logged once (that
    the continuation is the uninterrupted run is shown in process, above)."""
    config = write_run(tmp_path, save_steps=5, max_steps=12)
    out = tmp_path / "out"
    proc = spawn(config)
    deadline = time.monotonic() + 120
    while rows_done(out) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, stderr_of(proc)
    err = stderr_of(proc)
    assert f"grpokit train --config {config} --resume" in err, err
    stopped = [r["step"] for r in read_metrics(out / "metrics.jsonl")][-1]
    assert 3 <= stopped < 12 and f"checkpoint-{stopped}" in [p.name for p in list_checkpoints(out)]
    resumed = spawn(config, "--resume")
    assert resumed.wait(timeout=120) == 0, stderr_of(resumed)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 13))
    assert (out / "checkpoint-12").is_dir()


@pytest.mark.slow
def test_a_second_sigterm_exits_at_once_and_the_last_checkpoint_loads(tmp_path):
    """Two SIGTERMs in a row, the second while the first's checkpoint may be being written: the process dies of
    the signal at once, every ``checkpoint-*`` left is complete, and ``--resume`` finishes the run. (A second
    SIGINT raises KeyboardInterrupt: exit status 130.)"""
    config = write_run(tmp_path, save_steps=2, max_steps=10)
    out = tmp_path / "out"
    proc = spawn(config)
    deadline = time.monotonic() + 120
    while rows_done(out) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM, stderr_of(proc)
    assert "SIGTERM again: exiting now" in stderr_of(proc)
    assert list_checkpoints(out)  # complete ones only (trainer_state.json is written last)
    resumed = spawn(config, "--resume")
    assert resumed.wait(timeout=120) == 0, stderr_of(resumed)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 11))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_cli_resume_command_keeps_the_overrides():
    from grpokit.cli.main import resume_command

    assert resume_command("run.yaml", {"max_steps": 50, "report_to": "none", "resume_from_checkpoint": True,
                                       "reward_weights": [1, 0.5]}) == \
        "grpokit train --config run.yaml --max_steps 50 --report_to none --reward_weights '[1, 0.5]' --resume"
