"""glibc malloc thresholds (dedup_batch._malloc), in processes started as Dask's nanny starts
its workers: with ``MALLOC_TRIM_THRESHOLD_=65536`` in their environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"),
    reason="glibc's malloc only",
)

# Allocates and frees 200 arrays of 2 MiB (each written, as a product would be) outside and
# inside heap_kept, counting minor page faults; right after the block ends (the heap still
# kept for a next task) and once the process has run no block for IDLE_SECONDS; RSS inside
# and then.
_CHILD = """
import json, resource, sys, time
import numpy as np
from dedup_batch import _malloc
from dedup_batch._malloc import heap_kept, keep_heap

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def churn():
    before = faults()
    for _ in range(200):
        a = np.empty(1 << 19, np.float32)
        a.fill(1.0)
        del a
    return faults() - before

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

out = {"outside": churn()}
with heap_kept():
    out["inside"] = churn()
    big = [np.ones(1 << 20, np.float32) for _ in range(40)]  # 160 MiB, freed inside
    out["rss_inside"] = rss()
    del big
out["between"] = churn()
with heap_kept():  # a next task soon after: it finds the heap kept
    out["next"] = churn()
time.sleep(_malloc.IDLE_SECONDS / 2)
with heap_kept():  # and another: the idle time counts from the last one's end
    pass
time.sleep(_malloc.IDLE_SECONDS / 2 + 0.05)
out["not_yet"] = churn()
time.sleep(_malloc.IDLE_SECONDS + 0.5)
out["rss_after"] = rss()
out["outside_again"] = churn()
if sys.argv[1] == "keep":
    keep_heap()
    with heap_kept():
        pass
    out["kept"] = churn()
print(json.dumps(out))
"""


def _run(mode: str, env: dict[str, str]) -> dict:
    """The child's output; its environment is this one's without glibc's MALLOC_ settings,
    plus ``env``."""
    repo = str(Path(__file__).resolve().parents[1])
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    base["PYTHONPATH"] = os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, mode],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_heap_kept_reuses_freed_memory_inside_and_gives_it_back_after():
    env = {"MALLOC_TRIM_THRESHOLD_": "65536"}  # what Dask's nanny sets
    r = _run("scoped", env)
    # outside: each 2 MiB array is a fresh mmap, its 512 pages faulted in every time
    assert r["outside"] > 200 * 400, r
    # inside: the heap's freed pages are reused (a few arrays' worth of faults in all)
    assert r["inside"] < r["outside"] / 20, r
    # blocks back to back, and the time between them, keep the heap
    for between in ("between", "next", "not_yet"):
        assert r[between] < r["outside"] / 20, r
    # idle for IDLE_SECONDS: the process's own thresholds again, the freed 160 MiB given back
    assert r["outside_again"] > 200 * 400, r
    assert r["rss_inside"] - r["rss_after"] > 100 << 20, r


def test_keep_heap_lasts_and_heap_kept_leaves_it_alone():
    r = _run("keep", {"MALLOC_TRIM_THRESHOLD_": "65536"})
    assert r["kept"] < r["outside"] / 20, r  # a heap_kept block ending did not undo it


def test_heap_kept_changes_nothing_where_glibc_adapts_its_thresholds_itself():
    r = _run("scoped", {})  # no threshold in the child's environment: glibc's adaptive ones
    # glibc raised its own threshold at the first free: few faults outside the block too
    assert r["outside"] < 200 * 400 / 20 and r["outside_again"] < 200 * 400 / 20, r
