"""Real `dask scheduler` and `dask worker` processes for the tests that need a separate cluster
(the --scheduler path, vectors left on memory-limited workers): one way to start and stop them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "w") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", *args], env=env, stdout=fh, stderr=subprocess.STDOUT
        )


@contextmanager
def dask_processes(
    logs: Path,
    n_workers: int = 2,
    worker_args: tuple[str, ...] = (),
    worker_env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Start a scheduler and ``n_workers`` one-thread workers on 127.0.0.1 (logs in ``logs``;
    ``worker_env`` added to the workers' environment, e.g. Dask settings as
    ``DASK_DISTRIBUTED__...`` variables), wait until every worker has joined, yield the
    scheduler's address, stop them all."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    scheduler = ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port)]
    scheduler += ["--dashboard-address", "127.0.0.1:0", "--no-show"]
    procs = [_spawn(scheduler, logs / "scheduler.log", env)]
    try:
        time.sleep(1)
        for i in range(n_workers):
            worker = ["distributed.cli.dask_worker", address, "--nthreads", "1", "--nworkers", "1"]
            worker += ["--host", "127.0.0.1", "--no-dashboard", *worker_args]
            worker += ["--local-directory", str(logs / f"w{i}")]
            procs.append(_spawn(worker, logs / f"worker{i}.log", {**env, **(worker_env or {})}))
        with Client(address, timeout="30s") as client:
            # joined, whatever their status: Client.wait_for_workers counts running workers
            # only, and a test may start workers that pause at once
            deadline = time.monotonic() + 60
            while len(client.scheduler_info(n_workers=-1)["workers"]) < n_workers:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{n_workers} dask workers did not join in 60 s: {logs}")
                time.sleep(0.1)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
