"""Where a stage's tasks run: a Dask client's workers, or a local thread pool.

The one owner of "a client, or threads": :func:`run_tasks` submits ``fn(*args, item)`` for each
item, keeps at most ``max_in_flight`` tasks running, yields each finished task's future as it
completes (so results never pile up on the client), advances a progress stage, and on an error
or Ctrl-C starts nothing new: queued thread tasks are cancelled (running ones finish), Dask tasks
still pending are cancelled. Used by every stage (``apply``, ``report``, ``images``, ``sweep``,
``load`` without a client, and ``cluster``'s tiles on threads and its count passes); the
hand-written schedulers left, and why each cannot use it, are named in docs/architecture.md's
Dask section.

Stages take the client as an argument; nothing here looks for a "current" client.
"""

from __future__ import annotations

import concurrent.futures
import gc
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from . import progress as _progress
from .errors import ConfigError
from .progress import Stage

__all__ = [
    "DEFAULT_THREADS",
    "PAUSED_TIMEOUT",
    "finished",
    "gather",
    "run_batches",
    "run_tasks",
    "scatter",
    "total_threads",
]

#: Threads of the local pool when no client is given: the stages that use it (deletes, header
#: and thumbnail reads) mostly wait on storage, so more threads than cores pay off.
DEFAULT_THREADS = 8


#: Seconds a wait on Dask tasks may go without any of them finishing while a worker stays
#: paused (its process memory above Dask's pause threshold, ``distributed.worker.memory.pause``,
#: 80% of its limit by default) before the stage stops with an error. A paused worker runs
#: nothing, and when its own unmanaged memory (Python and its libraries, ~0.3 GB) is what
#: holds it above the threshold, spilling cannot bring it back: it stays paused for good and
#: every task that needs it waits forever. A worker that spills its way back, or resumes
#: once a neighbour's long task ends, does so well within this.
PAUSED_TIMEOUT = 300.0
# How often a quiet wait asks the scheduler for the workers' states (seconds).
_POLL_SECONDS = 2.0


def finished(client: Any, futures: set[Any], *, what: str) -> Iterator[Any]:
    """Each future of ``futures`` as it finishes (done, erred or cancelled: its ``result()``
    says which), removed from the set; futures the caller adds to the set while iterating
    are waited for too (bounded waves).

    Raises :class:`~dedup_batch.errors.ConfigError` naming the workers, their memory and
    what to do when none has finished for :data:`PAUSED_TIMEOUT` seconds while a worker
    stayed paused all that time: a stalled cluster ends the stage instead of hanging it.
    Costs one scheduler call every 2 s of a wait in which nothing finishes.
    """
    from distributed import wait

    last = time.monotonic()  # when a future last finished
    paused_since: dict[str, float] = {}
    while futures:
        try:
            done = wait(list(futures), timeout=_POLL_SECONDS, return_when="FIRST_COMPLETED").done
        except TimeoutError:
            done = set()
        now = time.monotonic()
        if done:
            last = now
            for fut in done:
                futures.discard(fut)
                yield fut
            continue
        workers = client.scheduler_info(n_workers=-1)["workers"]
        paused = {a: w for a, w in workers.items() if w.get("status") == "paused"}
        paused_since = {a: paused_since.get(a, now) for a in paused}
        stuck = [a for a, t in paused_since.items() if now - max(t, last) >= PAUSED_TIMEOUT]
        if stuck:
            raise ConfigError(_paused_message(what, [(a, paused[a]) for a in stuck]))


def _paused_message(what: str, stuck: list[tuple[str, dict[str, Any]]]) -> str:
    def one(address: str, info: dict[str, Any]) -> str:
        rss = (info.get("metrics") or {}).get("memory") or 0
        limit = info.get("memory_limit") or 0
        return f"{address} at {rss / 1e6:.0f} MB of a {limit / 1e6:.0f} MB limit"

    return (
        f"{what}: no Dask task finished in {PAUSED_TIMEOUT:.0f} s while {len(stuck)} worker(s) "
        f"stayed paused, their memory above Dask's pause threshold "
        f"({'; '.join(one(a, i) for a, i in stuck)}). A paused worker runs nothing, and its "
        "own memory (~0.3 GB for Python and its libraries) cannot be spilled: give the "
        "workers a larger --memory-limit, or more workers (see docs/scaling.md)"
    )


def gather(client: Any, futures: Sequence[Any], *, what: str) -> list[Any]:
    """``client.gather(futures)`` once every one has finished, waited for by
    :func:`finished` (a cluster whose workers stay paused raises instead of hanging)."""
    for _ in finished(client, set(futures), what=what):
        pass
    return client.gather(list(futures))


def total_threads(client: Any) -> int:
    """Worker threads of ``client``'s cluster (at least 1); :data:`DEFAULT_THREADS` without
    a client. For sizing how many tasks to keep in flight."""
    if client is None:
        return DEFAULT_THREADS
    return max(1, sum(client.nthreads().values()))


def scatter(client: Any, obj: Any) -> Any:
    """``obj`` sent once to every worker (a future to pass to tasks), or ``obj`` itself
    without a client.

    ``hash=False``: a fresh key each call, so a previous call's release cannot race this one.
    A broadcast puts a full copy on every worker: it caps the job at the smallest worker's
    memory.
    """
    if client is None:
        return obj
    return client.scatter(obj, broadcast=True, hash=False)


def run_tasks(
    fn: Callable[..., Any],
    items: Sequence[Any],
    *args: Any,
    client: Any = None,
    threads: int = DEFAULT_THREADS,
    max_in_flight: int | None = None,
    progress: Stage | str | None = None,
    weights: Sequence[int] | None = None,
    unit: str = "tasks",
    name: str = "task",
) -> Iterator[tuple[Any, Any]]:
    """Run ``fn(*args, item)`` for every item; yield ``(item, future)`` as each finishes.

    Parameters
    ----------
    fn : callable
        The task; pickled to the workers with ``args`` when ``client`` is given.
    items : sequence
        One task per item, submitted in order.
    *args
        Leading arguments of every task (a :class:`~dedup_batch.storage.Store`, a scattered
        future, ...).
    client : distributed.Client, optional
        Run on its workers (``pure=False`` and a per-call key: a re-run executes again, never
        reuses an earlier result). Without one, a thread pool of ``min(threads, len(items))``.
    threads : int
        Pool size without a client.
    max_in_flight : int, optional
        Tasks submitted but not yet yielded, at most (default: all at once). Bounds the memory
        of finished-but-unread results and, for deletes, the request rate.
    progress : Stage or str or None
        A running stage to advance (by each task's weight), the name of a stage to open, or
        ``None``: advance the innermost running stage, if any.
    weights : sequence of int, optional
        Items each task stands for (e.g. images per batch); default 1 each.
    unit : str
        Display unit when a stage is opened.
    name : str
        Part of the Dask keys and thread names (``dedup-<name>-000012-<run>``).

    Yields
    ------
    (item, future)
        The future is done; ``future.result()`` returns the task's value or raises its error,
        for the caller to handle. A Dask future is released once the caller moves on.

    Notes
    -----
    Memory on the client: the futures in flight and whatever results the caller keeps.
    """
    if not items:
        return
    weights = [1] * len(items) if weights is None else list(weights)
    if len(weights) != len(items):
        raise ValueError(f"run_tasks: {len(weights)} weights for {len(items)} items")
    total = int(sum(weights))
    limit = len(items) if max_in_flight is None else max(1, int(max_in_flight))
    cm: AbstractContextManager[Stage | None]
    if isinstance(progress, str):
        cm = _progress.stage(progress, total=total, unit=unit)
    else:
        cm = nullcontext(progress)
    with cm as st:
        if st is not None and st.total is None:
            st.set_total(total)

        def advance(w: int) -> None:
            if st is not None:
                st.advance(w)
            else:
                _progress.advance(w, total=total)

        if client is None:
            n = min(threads, len(items))
            yield from _run_threads(fn, items, args, n, limit, weights, advance, name)
        else:
            yield from _run_dask(fn, items, args, client, limit, weights, advance, name)


def run_batches(
    fn: Callable[..., Any],
    batches: Sequence[Sequence[Any]],
    *args: Any,
    client: Any = None,
    threads: int = DEFAULT_THREADS,
    progress: Stage | str | None = None,
    unit: str = "images",
    name: str = "batches",
) -> Iterator[tuple[Any, Any]]:
    """:func:`run_tasks` over batches of items (``fn(*args, batch)``), each task weighing its
    batch's length. ``progress=None`` counts on a detached stage that is never displayed
    (unlike :func:`run_tasks`, which then advances the running stage)."""
    st = Stage(name, unit=unit) if progress is None else progress
    return run_tasks(
        fn,
        batches,
        *args,
        client=client,
        threads=threads,
        progress=st,
        weights=[len(b) for b in batches],
        unit=unit,
        name=name,
    )


# The thread running a garbage collection, while it runs (see :func:`_may_wait`).
_collecting: int | None = None


def _note_collection(phase: str, info: dict[str, Any]) -> None:
    global _collecting
    _collecting = threading.get_ident() if phase == "start" else None


gc.callbacks.append(_note_collection)


def _may_wait(owner: int) -> bool:
    """Whether a task generator's cleanup may wait for its running tasks here: only in the
    thread that iterated it, and not in a garbage collection's pass. A generator the caller
    left unfinished (its loop ended by an error held in a reference cycle) is closed by
    whichever thread's allocation starts a collection, anywhere: in one of the pool's own
    threads, waiting is waiting for itself, and in a thread being started, inside
    ``threading``'s own lock, joining the pool's threads needs that same lock (a CI run hung
    there for good). Not waiting changes nothing for the tasks: those running still finish
    (the pool's threads are not daemons) and queued ones are cancelled either way."""
    me = threading.get_ident()
    return me == owner and _collecting != me


def _run_threads(
    fn: Callable[..., Any],
    items: Sequence[Any],
    args: tuple[Any, ...],
    n_threads: int,
    limit: int,
    weights: Sequence[int],
    advance: Callable[[int], None],
    name: str,
) -> Iterator[tuple[Any, Any]]:
    pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=max(1, n_threads), thread_name_prefix=f"dedup-{name}"
    )
    pending: dict[Any, int] = {}
    queue = iter(range(len(items)))
    owner = threading.get_ident()
    try:
        for i in _take(queue, limit):
            pending[pool.submit(fn, *args, items[i])] = i
        while pending:
            finished, _ = concurrent.futures.wait(
                pending, return_when=concurrent.futures.FIRST_COMPLETED
            )
            for fut in finished:
                i = pending.pop(fut)
                advance(weights[i])
                yield items[i], fut
                for j in _take(queue, 1):
                    pending[pool.submit(fn, *args, items[j])] = j
    finally:
        # Tasks already running finish (a delete batch journals itself); queued ones never
        # start. Waited for where that is safe (:func:`_may_wait`).
        pool.shutdown(wait=False, cancel_futures=True)
        if _may_wait(owner):
            pool.shutdown(wait=True)


def _run_dask(
    fn: Callable[..., Any],
    items: Sequence[Any],
    args: tuple[Any, ...],
    client: Any,
    limit: int,
    weights: Sequence[int],
    advance: Callable[[int], None],
    name: str,
) -> Iterator[tuple[Any, Any]]:
    from distributed import as_completed

    run = uuid.uuid4().hex[:8]
    pending: dict[Any, int] = {}  # every key is unique (index and run), so futures hash apart
    queue = iter(range(len(items)))
    # raise_errors=False: a failed task is yielded like any other and raises at .result()
    ac = as_completed(raise_errors=False)

    def submit(i: int) -> None:
        fut = client.submit(fn, *args, items[i], key=f"dedup-{name}-{i:06d}-{run}", pure=False)
        pending[fut] = i
        ac.add(fut)

    try:
        for i in _take(queue, limit):
            submit(i)
        for fut in ac:
            i = pending.pop(fut)
            advance(weights[i])
            yield items[i], fut
            fut.release()
            for j in _take(queue, 1):
                submit(j)
    finally:
        if pending:
            client.cancel(list(pending))


def _take(it: Iterator[int], n: int) -> list[int]:
    out = []
    for _ in range(n):
        i = next(it, None)
        if i is None:
            break
        out.append(i)
    return out
