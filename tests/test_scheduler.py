"""The --scheduler path: real `dask scheduler` and `dask worker` processes started here."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from dedup_batch.cli import main
from dedup_batch.demo import DEMO_EPS, make_demo

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_workers(address: str, n: int, timeout: float = 60) -> None:
    from distributed import Client

    with Client(address, timeout="30s") as client:
        client.wait_for_workers(n, timeout=timeout)


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "w") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", *args], env=env, stdout=fh, stderr=subprocess.STDOUT
        )


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    logs = tmp_path_factory.mktemp("dask-logs")
    procs = [
        _spawn(
            [
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--dashboard-address",
                "127.0.0.1:0",
                "--no-show",
            ],
            logs / "scheduler.log",
            env,
        )
    ]
    try:
        time.sleep(1)
        for i in range(2):
            procs.append(
                _spawn(
                    [
                        "distributed.cli.dask_worker",
                        address,
                        "--nthreads",
                        "1",
                        "--nworkers",
                        "1",
                        "--host",
                        "127.0.0.1",
                        "--no-dashboard",
                        "--local-directory",
                        str(logs / f"w{i}"),
                    ],
                    logs / f"worker{i}.log",
                    env,
                )
            )
        _wait_for_workers(address, 2)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_plan_and_apply_on_an_external_cluster_match_the_local_cluster(
    scheduler: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = make_demo(tmp_path / "a", n_images=20, seed=5)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    local_args = ["--features", info["features"], "--root", info["root"], "--eps", str(DEMO_EPS)]
    assert main(["plan", *local_args, "--out", str(tmp_path / "local"), "--n-workers", "1"]) == 0

    photos_b = tmp_path / "b" / "photos"
    remote_args = [
        "--features",
        str(tmp_path / "b" / "features" / "part-*.parquet"),
        "--root",
        str(photos_b),
        "--eps",
        str(DEMO_EPS),
    ]
    assert (
        main(["plan", *remote_args, "--out", str(tmp_path / "remote"), "--scheduler", scheduler])
        == 0
    )
    local = pd.read_parquet(tmp_path / "local" / "plan.parquet")
    remote = pd.read_parquet(tmp_path / "remote" / "plan.parquet")
    cols = ["path", "cluster", "keep", "keeper"]
    pd.testing.assert_frame_equal(local[cols], remote[cols])

    # the environment variable works as --scheduler does; the workers do the deleting
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", scheduler)
    assert main(["apply", str(tmp_path / "remote")]) == 0
    left = {p.relative_to(photos_b).as_posix() for p in photos_b.rglob("*") if p.is_file()}
    assert left == set(remote.loc[remote["keep"], "path"])


def test_unreachable_scheduler_is_a_clear_error(capsys) -> None:
    import dask

    port = _free_port()
    args = [
        "plan",
        "--features",
        "x",
        "--root",
        ".",
        "--eps",
        "1",
        "--scheduler",
        f"tcp://127.0.0.1:{port}",
    ]
    with dask.config.set({"distributed.comm.timeouts.connect": "3s"}):
        assert main(args) == 2
    assert "cannot reach the Dask scheduler" in capsys.readouterr().err
