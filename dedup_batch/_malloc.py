"""glibc malloc thresholds in Dask worker processes: the one place that changes them.

Dask's nanny starts its workers with ``MALLOC_TRIM_THRESHOLD_=65536``
(``distributed.nanny.pre-spawn-environ``), so that freed memory goes back to the system at
once and a worker's memory limit sees it. Setting it also fixes glibc's mmap threshold at
128 KiB (glibc adapts the threshold only while none of them is set): every array above
128 KiB is then a fresh mmap, page-faulted in page by page and unmapped when freed. Work
that allocates and frees many arrays of a few MB pays for it in system time:

- embedding (:mod:`dedup_batch.embed.run`): PDQ's float luma buffers, 1-2 MB per image,
  doubled the hash time per image (30 ms against 15 ms for a 4 MP JPEG);
- the distributed DBSCAN tiles (:mod:`dedup_batch.cluster_dask`): each leaf-pair block's
  products and masks (1-4 MiB): the in-process engine on 100k x 256 with the nanny's
  setting took 12.6 s (4.1M minor page faults, 7.3 s of system time) against 6.7 s (50k
  faults, 0.4 s) without it, and half of the workers' CPU time was system time.

:func:`keep_heap` raises both thresholds for good (a worker that embeds keeps at most
``TRIM_THRESHOLD_BYTES`` of freed memory); :func:`heap_kept` raises them while tasks run
and, once the worker has run none for ``IDLE_SECONDS``, restores the thresholds the
process started with and gives the freed memory back (``malloc_trim``), so a worker's
memory at rest is what Dask's setting intends. glibc only; elsewhere (musl, macOS) nothing
changes.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "IDLE_SECONDS",
    "MMAP_THRESHOLD_BYTES",
    "TRIM_THRESHOLD_BYTES",
    "heap_kept",
    "keep_heap",
]

# ``mallopt`` parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Allocations below this come from the heap, not from a fresh mmap: 32 MiB (the largest
#: value glibc's adaptive threshold reaches, i.e. what a process without the setting gets).
MMAP_THRESHOLD_BYTES = 32 << 20
#: Free memory at the top of the heap kept for the next allocation rather than given back:
#: 64 MiB (glibc's adaptive trim threshold, twice the mmap threshold).
TRIM_THRESHOLD_BYTES = 64 << 20
# glibc's static defaults, which apply once any threshold is set in the environment
_DEFAULT_BYTES = 128 << 10

#: How long the heap stays kept after the last :func:`heap_kept` block of the process ended:
#: a worker running tasks back to back (tiles: two in flight per thread) keeps it from one
#: task to the next, and one idle this long gets its own thresholds back and gives the freed
#: memory back. Trimming after every task made each tile fault its heap in again: on 100k x
#: 256, 2 workers, 100-134k minor faults and 0.3-0.8 s of system time per worker a fit
#: (5-43k and 0.1-0.4 s without the nanny's setting), ~1 s of the fit's 5-6 s.
IDLE_SECONDS = 1.0

_lock = threading.Lock()
# kept: keep_heap applied (never undone); inside: heap_kept blocks running now; raised: the
# mmap threshold heap_kept set (None: the process's own); entered: blocks started so far
_state: dict[str, Any] = {"kept": False, "inside": 0, "raised": None, "entered": 0}


@functools.cache
def _libc() -> Any:
    """glibc, or None (another C library, another system)."""
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version"):  # musl, ...: other allocators
        return None
    return libc


def _set(mmap_bytes: int, trim_bytes: int) -> bool:
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_bytes) == 1
    return libc.mallopt(_M_TRIM_THRESHOLD, trim_bytes) == 1 and ok


def keep_heap() -> bool:
    """Raise both thresholds for the rest of the process (at most ``TRIM_THRESHOLD_BYTES``
    of freed memory kept). Returns whether they are raised (glibc only)."""
    with _lock:
        if not _state["kept"]:
            _state["kept"] = _set(MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES)
        return _state["kept"]


@contextmanager
def heap_kept(mmap_bytes: int = MMAP_THRESHOLD_BYTES) -> Iterator[None]:
    """Inside: freed memory below ``mmap_bytes`` a piece is reused by the next allocation,
    as in a process started without the nanny's setting (at most twice that kept free at
    the heap's top); larger arrays are still mapped and given back when freed.

    Once no block has been open in this process (threads of one worker) for
    ``IDLE_SECONDS``, the process's own thresholds (``MALLOC_TRIM_THRESHOLD_`` and
    ``MALLOC_MMAP_THRESHOLD_``, or glibc's static 128 KiB) are set again and every free page
    is given back (``malloc_trim(0)``): a worker at rest holds what it held before, and one
    running blocks back to back keeps its heap between them. Nothing is changed where the
    environment sets no threshold (glibc adapts them itself) or after :func:`keep_heap`.
    Memory inside, and until the heap is given back: the blocks' own peak, plus what the
    heap's fragmentation keeps (freed pages are reused, not given back, until then)."""
    env = os.environ
    fixed = "MALLOC_TRIM_THRESHOLD_" in env or "MALLOC_MMAP_THRESHOLD_" in env
    with _lock:
        act = fixed and not _state["kept"] and _libc() is not None
        if act:
            # the first block in sets them for all (until they are given back)
            if _state["inside"] == 0 and _state["raised"] != mmap_bytes:
                _set(mmap_bytes, 2 * mmap_bytes)
                _state["raised"] = mmap_bytes
            _state["inside"] += 1
            _state["entered"] += 1
    try:
        yield
    finally:
        if act:
            with _lock:
                _state["inside"] -= 1
                if _state["inside"] == 0:
                    timer = threading.Timer(IDLE_SECONDS, _give_back, (_state["entered"],))
                    timer.daemon = True
                    timer.start()


def _give_back(entered: int) -> None:
    """The process's own thresholds again, and every free page given back, unless a
    :func:`heap_kept` block has started since the one whose end scheduled this."""
    with _lock:
        if (
            _state["inside"] == 0
            and _state["entered"] == entered
            and _state["raised"] is not None
            and not _state["kept"]
        ):
            env = os.environ
            _set(
                int(env.get("MALLOC_MMAP_THRESHOLD_", _DEFAULT_BYTES)),
                int(env.get("MALLOC_TRIM_THRESHOLD_", _DEFAULT_BYTES)),
            )
            _state["raised"] = None
            _libc().malloc_trim(0)
