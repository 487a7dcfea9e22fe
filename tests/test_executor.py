"""run_tasks: the same results on threads and on a real Dask cluster, bounded in flight, errors
surface at .result(), nothing new starts after the caller stops."""

from __future__ import annotations

import threading
import time

import pytest

from dedup_batch.executor import run_tasks, scatter, total_threads
from dedup_batch.progress import Stage

_lock = threading.Lock()
_running = {"now": 0, "max": 0, "started": 0}


def _square(offset: int, x: int) -> int:
    return offset + x * x


def _slow(x: int) -> int:
    with _lock:
        _running["now"] += 1
        _running["started"] += 1
        _running["max"] = max(_running["max"], _running["now"])
    time.sleep(0.02)
    with _lock:
        _running["now"] -= 1
    return x


def _fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return x


def test_threads_results_progress_and_bound() -> None:
    st = Stage("t", unit="items")
    got = {
        item: fut.result()
        for item, fut in run_tasks(_square, list(range(10)), 100, progress=st, weights=[2] * 10)
    }
    assert got == {x: 100 + x * x for x in range(10)}
    assert (st.done, st.total) == (20, 20)
    _running.update(now=0, max=0, started=0)
    assert sorted(i for i, _ in run_tasks(_slow, list(range(12)), max_in_flight=3)) == list(
        range(12)
    )
    assert _running["max"] <= 3


def test_errors_surface_at_result_and_stop_new_work() -> None:
    seen = []
    for item, fut in run_tasks(_fail_on_three, [1, 2, 3, 4], threads=1, max_in_flight=1):
        if item == 3:
            with pytest.raises(ValueError, match="three"):
                fut.result()
            break
        seen.append(fut.result())
    assert seen == [1, 2]
    _running.update(now=0, max=0, started=0)
    for _ in run_tasks(_slow, list(range(20)), threads=2, max_in_flight=2):
        break  # the caller stops: queued tasks never start
    assert _running["started"] <= 3


@pytest.mark.parametrize("collector", ["another thread", "the thread that iterated"])
def test_a_loop_left_in_a_reference_cycle_is_collected_without_waiting(collector) -> None:
    """A caller's loop ended by an error that a reference cycle holds leaves the task
    generator to whichever thread's allocation starts the next garbage collection. That
    collection must not wait for the pool's running tasks (in a CI run it waited inside
    ``threading``'s own lock and hung for good), yet the running task still finishes and
    the queued ones never start."""
    import gc

    release, done, started = threading.Event(), [], []

    def task(x: int) -> int:
        started.append(x)
        if x == 1:
            release.wait(30)
        done.append(x)
        return x

    gc.disable()  # the collection is this test's, at the moment it chooses
    try:
        tasks = run_tasks(task, list(range(6)), threads=2, max_in_flight=2)
        assert next(tasks)[0] == 0  # task 1 is running and blocked, 2-5 wait their turn
        cycle: list = [tasks]
        cycle.append(cycle)  # the generator is now reachable only through a cycle
        del tasks, cycle
        if collector == "another thread":
            t = threading.Thread(target=gc.collect)
            t.start()
            t.join(10)
            assert not t.is_alive(), "the collection waited for the running task"
        else:
            t0 = time.monotonic()
            gc.collect()
            assert time.monotonic() - t0 < 10
    finally:
        release.set()
        gc.enable()
    deadline = time.monotonic() + 10
    while 1 not in done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert 1 in done  # the running task finished after all
    time.sleep(0.1)
    assert set(started) <= {0, 1}  # nothing queued started once the loop was left


def test_no_items_no_tasks() -> None:
    assert list(run_tasks(_square, [], 0)) == []
    assert scatter(None, [1, 2]) == [1, 2]
    assert total_threads(None) >= 1


def test_dask_equals_threads(dask_client) -> None:
    offset = scatter(dask_client, 7)
    remote = {
        i: f.result()
        for i, f in run_tasks(_square, list(range(9)), offset, client=dask_client, max_in_flight=2)
    }
    local = {i: f.result() for i, f in run_tasks(_square, list(range(9)), 7)}
    assert remote == local
    assert total_threads(dask_client) == 2
    failed = [
        i
        for i, f in run_tasks(_fail_on_three, [1, 3], client=dask_client)
        if f.exception() is not None
    ]
    assert failed == [3]
