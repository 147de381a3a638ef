"""grpokit.util: the shared checks name the culprit; freed memory goes back to the system."""

import math
import os
import sys

import pytest
import torch

from grpokit.util import check_bool, check_choice, check_int, check_keys, check_real, closest, nan_to_none


def test_checks_name_the_field():
    with pytest.raises(ValueError, match=r"^steps must be an integer >= 1 \(why\), got True$"):
        check_int("steps", True, low=1, why="why")
    with pytest.raises(ValueError, match=r"^lr must be a finite number > 0.0, got inf$"):
        check_real("lr", math.inf, low=0.0, strict=True)
    with pytest.raises(ValueError, match=r"^w must be a finite number, got nan$"):
        check_real("w", math.nan, low=float("-inf"))
    with pytest.raises(ValueError, match="^mode must be one of a, b; got 'c'$"):
        check_choice("mode", "c", ("a", "b"))
    with pytest.raises(ValueError, match="^flag must be true or false, got 1$"):
        check_bool("flag", 1)
    check_int("n", 3, low=1), check_real("x", 0.0, low=0.0), check_choice("m", "a", "ab"), check_bool("f", False)


def test_unknown_keys_get_the_closest_name():
    assert closest("learnig_rate", ["learning_rate", "seed"]) == "learning_rate"
    assert closest("zzz", ["learning_rate"]) is None
    with pytest.raises(ValueError, match="^unknown config key 'betta'; did you mean 'beta'\\?$"):
        check_keys({"betta": 1}, ["beta", "seed"])


def test_nan_to_none():
    assert nan_to_none(float("nan")) is None and nan_to_none(2) == 2.0


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc_trim: Linux only")
def test_release_freed_memory_returns_freed_heap_blocks():
    """Every other one of 4,000 tensors of 100 KB (below glibc's mmap threshold, so on the heap) is freed:
    the heap keeps their pages until ``release_freed_memory`` hands them back."""
    from grpokit.util import release_freed_memory

    release_freed_memory()
    blocks = [torch.ones(25_600) for _ in range(4_000)]  # 400 MB
    del blocks[::2]
    before = resident_mb()
    release_freed_memory()
    assert before - resident_mb() > 100, (before, resident_mb())
    del blocks


HUGE_PAGES_PROBE = """
import os, sys
import torch
import grpokit
block = torch.ones(64 * 2**20 // 4)  # 64 MB, one allocation of torch's CPU allocator
with open("/proc/self/smaps_rollup") as f:
    huge = next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), huge)
"""


def thp_mode() -> str:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        return f.read().split("[")[1].split("]")[0]


@pytest.mark.skipif(sys.platform != "linux" or not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
                    reason="transparent huge pages: Linux only")
def test_importing_grpokit_backs_large_tensors_with_huge_pages_unless_told_not_to():
    """``import grpokit`` (after torch, before any tensor) sets THP_MEM_ALLOC_ENABLE: a 64 MB tensor then sits
    on 2 MB pages. An explicit 0 in the environment is kept (with the kernel in ``madvise`` mode, that means no
    huge pages)."""
    import subprocess

    if thp_mode() == "never":
        pytest.skip("this kernel has transparent huge pages switched off (/sys/kernel/mm/transparent_hugepage)")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", HUGE_PAGES_PROBE], env=env, capture_output=True, text=True, check=True)
    setting, huge_kb = out.stdout.split()
    assert setting == "1" and int(huge_kb) >= 32 * 1024, out.stdout
    out = subprocess.run([sys.executable, "-c", HUGE_PAGES_PROBE], env={**env, "THP_MEM_ALLOC_ENABLE": "0"},
                         capture_output=True, text=True, check=True)
    setting, huge_kb = out.stdout.split()
    assert setting == "0", out.stdout
    if thp_mode() == "madvise":
        assert int(huge_kb) == 0, out.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc_trim: Linux only")
def test_freed_memory_is_released_during_the_backward_every_so_many_gradient_bytes(monkeypatch):
    """Three 400-byte weights and a frozen one, a 700-byte budget: the running total reaches it at the second
    gradient (800 bytes), one release, and the third (400 more) does not reach it again; a frozen weight gets no
    hook."""
    import grpokit.util as util

    calls = []
    monkeypatch.setattr(util, "release_freed_memory", lambda: calls.append(len(calls)))
    weights = [torch.ones(100, requires_grad=True) for _ in range(3)]
    frozen = torch.ones(100)
    handles = util.release_during_backward([*weights, frozen], every_bytes=700)
    assert len(handles) == 3
    sum((w * (i + 1)).sum() for i, w in enumerate(weights)).backward()
    assert len(calls) == 1
    assert [w.grad[0].item() for w in weights] == [1.0, 2.0, 3.0]  # the hooks leave the gradients alone
    for handle in handles:
        handle.remove()
