"""grpokit.rewards.runner: per-call timeouts (worker processes killed, threads abandoned, coroutines cancelled),
async reward functions run concurrently, and reward_on_error (raise naming function, sample and row; none
scoring None and counting)."""

import asyncio
import math
import os
import signal
import time

import pytest
import torch

from grpokit.config import REWARD_ON_ERROR
from grpokit.rewards import RewardError, failure_metrics, load_reward_funcs, score
from grpokit.rewards.process import score_steps
from grpokit.rewards.runner import ERROR, ON_ERROR, TIMEOUT, FileFunction, RewardRunner, process_ref

PROMPTS = ["p0", "p1", "p2", "p3"]
COMPLETIONS = ["aa", "hang", "boom", "dd"]
IDS = [[1, 1], [2], [3], [4, 4]]
ROWS = [10, 11, 12, 13]


def length(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


def hangs_on_hang(prompts, completions, **kwargs):
    """Sleeps forever on the sample 'hang'."""
    if "hang" in completions:
        time.sleep(10_000)
    return [float(len(c)) for c in completions]


def raises_on_boom(prompts, completions, **kwargs):
    return [1 / 0 if c == "boom" else 0.5 for c in completions]


def spins_ignoring_sigterm(prompts, completions, pid_file, **kwargs):
    """A pure-Python verifier stuck in a loop that SIGTERM cannot stop; writes its pid first."""
    if "hang" in completions:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with open(pid_file[0], "a") as f:
            f.write(f"{os.getpid()}\n")
        while True:
            pass
    return [1.0] * len(completions)


def non_finite(prompts, completions, **kwargs):
    return [math.inf if c == "boom" else (math.nan if c == "hang" else 1.0) for c in completions]


def run(funcs, runner, completions=COMPLETIONS, columns=None):
    return score(load_reward_funcs(funcs), None, PROMPTS[:len(completions)], completions, IDS[:len(completions)],
                 columns or {}, runner=runner, rows=ROWS[:len(completions)])


@pytest.fixture
def runner():
    made = []

    def make(**kwargs):
        made.append(RewardRunner(**kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_on_error_values_are_the_config_choices():
    assert ON_ERROR == REWARD_ON_ERROR


def test_where_each_function_runs(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text("def f(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")

    def closure(prompts, completions, **kw):
        return [0.0] * len(completions)

    async def coroutine(prompts, completions, **kw):
        return [0.0] * len(completions)

    funcs = load_reward_funcs([length, f"{path}:f", closure, lambda prompts, completions, **kw: [], coroutine])
    timed, direct = RewardRunner(timeout_s=1.0), RewardRunner()
    assert [timed.mode(f) for f in funcs] == ["process", "process", "thread", "thread", "async"]
    assert [direct.mode(f) for f in funcs] == ["direct", "direct", "direct", "direct", "async"]
    assert process_ref(funcs[0]) is length and process_ref(funcs[1]) == FileFunction(str(path.resolve()), "f")


def test_hung_and_raising_functions_are_survived_and_counted(runner):
    """reward_on_error none: the sample a function sleeps forever on and the one another raises on score None
    (NaN); every other sample keeps its value; the counts name each function."""
    r = runner(timeout_s=0.5, on_error="none")
    start = time.perf_counter()
    s = run([hangs_on_hang, raises_on_boom, length], r)
    assert time.perf_counter() - start < 20
    assert s.per_func[:, 0].tolist()[0] == 2.0 and math.isnan(s.per_func[1, 0]) and s.per_func[3, 0] == 2.0
    assert math.isnan(s.per_func[2, 1]) and s.per_func[[0, 1, 3], 1].tolist() == [0.5, 0.5, 0.5]
    assert s.failures.tolist() == [[0, 0, 0], [TIMEOUT, 0, 0], [0, ERROR, 0], [0, 0, 0]]
    assert s.rewards.tolist() == [4.5, 4.5, 8.0, 4.5]  # weighted nansum: the failed entries are left out
    funcs = load_reward_funcs([hangs_on_hang, raises_on_boom, length])
    assert failure_metrics(s.failures, funcs) == {
        "rewards/hangs_on_hang/errors": 0.0, "rewards/hangs_on_hang/timeouts": 1.0,
        "rewards/raises_on_boom/errors": 1.0, "rewards/raises_on_boom/timeouts": 0.0,
        "rewards/length/errors": 0.0, "rewards/length/timeouts": 0.0}
    again = run([hangs_on_hang, length], r, completions=["aa", "dd"])  # the killed worker was replaced
    assert again.per_func[:, 0].tolist() == [2.0, 2.0] and not again.failures.any()


def test_raise_names_function_sample_row_and_exception(runner):
    r = runner(timeout_s=0.5)
    with pytest.raises(RewardError, match=r"'hangs_on_hang' timed out after 0.5 s on sample 1 \(dataset row 11\)"):
        run([hangs_on_hang], r)
    with pytest.raises(RewardError, match=r"'raises_on_boom' raised ZeroDivisionError on sample 2 \(dataset row 12\): "
                                          r"division by zero \(at test_runner.py:\d+\)"):
        run([raises_on_boom], r)
    with pytest.raises(RewardError, match=r"'raises_on_boom' raised ZeroDivisionError on sample 2 \(dataset row 12\)") \
            as error:
        run([raises_on_boom], runner())  # the same without a timeout: direct calls
    assert isinstance(error.value.__cause__, ZeroDivisionError)  # --debug shows the function's own traceback


def test_a_worker_that_ignores_sigterm_is_killed(runner, tmp_path, monkeypatch):
    from pebble.common import types

    monkeypatch.setattr(types.CONSTS, "term_timeout", 0.3)  # SIGKILL after 0.3 s instead of 3 s (test speed)
    r = runner(timeout_s=0.5, on_error="none")
    pid_file = tmp_path / "pids"
    s = run([spins_ignoring_sigterm], r, columns={"pid_file": [str(pid_file)] * 4})
    assert s.failures[:, 0].tolist() == [0, TIMEOUT, 0, 0]
    pids = [int(p) for p in pid_file.read_text().split()]
    assert len(pids) == 2  # the batch call and the call on sample 1 alone
    time.sleep(0.2)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def hangs_always(prompts, completions, **kwargs):
    time.sleep(10_000)


def test_the_calls_on_single_samples_share_a_budget(runner):
    """A function that hangs on every sample, one worker, 8 samples: the retries on single samples would queue
    for 8 timeouts; they share 2 (RETRY_BUDGET), the calls not done by then are cancelled as timeouts."""
    r = runner(timeout_s=0.5, on_error="none", max_workers=1)
    start = time.perf_counter()
    s = score(load_reward_funcs([hangs_always, length]), None, ["p"] * 8, ["a"] * 8, [[1]] * 8, {}, runner=r)
    assert time.perf_counter() - start < 4.0  # batch 0.5 s + budget 1 s + stopping workers; unbounded: > 4.5 s
    assert s.failures[:, 0].tolist() == [TIMEOUT] * 8 and s.per_func[:, 1].tolist() == [1.0] * 8


def test_a_lambda_runs_in_a_thread_under_the_timeout(runner):
    """A lambda cannot reach a worker process: it runs in a daemon thread, no longer waited for once it is
    late (the thread itself sleeps on)."""
    slow = lambda prompts, completions, **kw: [time.sleep(30) if c == "hang" else 1.0 for c in completions]
    r = runner(timeout_s=0.3, on_error="none")
    start = time.perf_counter()
    s = run([slow], r)
    assert time.perf_counter() - start < 3
    assert s.failures[:, 0].tolist() == [0, TIMEOUT, 0, 0] and s.per_func[[0, 2, 3], 0].tolist() == [1.0] * 3


def test_async_functions_run_concurrently_and_time_out(runner):
    async def first(prompts, completions, **kw):
        await asyncio.sleep(0.4)
        return [1.0] * len(completions)

    async def second(prompts, completions, **kw):
        await asyncio.sleep(0.4)
        return [2.0] * len(completions)

    async def stuck(prompts, completions, **kw):
        if "hang" in completions:
            await asyncio.Event().wait()  # forever
        return [3.0] * len(completions)

    start = time.perf_counter()
    s = run([first, second], runner())
    assert time.perf_counter() - start < 0.75  # together, not one after the other
    assert s.per_func[:, 0].tolist() == [1.0] * 4 and s.per_func[:, 1].tolist() == [2.0] * 4
    s = run([stuck], runner(timeout_s=0.3, on_error="none"))
    assert s.failures[:, 0].tolist() == [0, TIMEOUT, 0, 0] and s.per_func[0, 0] == 3.0
    with pytest.raises(RewardError, match=r"'stuck' timed out after 0.3 s on sample 1 \(dataset row 11\)"):
        run([stuck], runner(timeout_s=0.3))


def test_a_timeout_error_raised_by_the_function_is_an_error():
    async def own_timeout(prompts, completions, **kw):
        raise TimeoutError("the judge did not answer")

    with pytest.raises(RewardError, match="raised TimeoutError on sample 0 .*the judge did not answer"):
        run([own_timeout], RewardRunner(timeout_s=5.0))


def test_nan_and_inf_are_errors_or_none(runner):
    with pytest.raises(RewardError, match=r"'non_finite' returned nan for sample 1 \(dataset row 11\); rewards must "
                                          "be finite"):
        run([non_finite], runner())
    with pytest.raises(RewardError, match=r"returned inf for sample 2 \(dataset row 12\)"):
        run([non_finite], runner(), completions=["aa", "dd", "boom"])
    s = run([non_finite, length], runner(on_error="none"))
    assert s.failures[:, 0].tolist() == [0, ERROR, ERROR, 0]
    assert torch.isnan(s.per_func[1:3, 0]).all() and s.rewards.tolist() == [3.0, 4.0, 4.0, 3.0]


def test_a_batch_call_that_fails_only_as_a_batch(runner):
    """Fails on every batch of more than one sample: per sample it works, so ``none`` keeps those values and
    ``raise`` names the batch call."""
    def batch_shy(prompts, completions, **kw):
        if len(completions) > 1:
            raise RuntimeError("one at a time")
        return [7.0]

    assert run([batch_shy], runner(on_error="none")).per_func[:, 0].tolist() == [7.0] * 4
    with pytest.raises(RewardError, match="raised RuntimeError on a batch of 4 completions: one at a time"):
        run([batch_shy], runner())


def test_process_supervision_uses_the_runner(runner):
    funcs = load_reward_funcs([raises_on_boom, length])
    s = score_steps(funcs, None, PROMPTS, COMPLETIONS, IDS, {}, COMPLETIONS, None, runner=runner(on_error="none"),
                    rows=ROWS)
    assert s.failures.tolist() == [[0, 0], [0, 0], [ERROR, 0], [0, 0]]
    assert s.step_rewards[2] == [4.0] and s.step_rewards[0] == [0.5, 2.0]
    with pytest.raises(RewardError, match=r"raised ZeroDivisionError on sample 2 \(dataset row 12\)"):
        score_steps(funcs, None, PROMPTS, COMPLETIONS, IDS, {}, COMPLETIONS, None, rows=ROWS)
