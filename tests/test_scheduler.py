"""The --scheduler path: real `dask scheduler` and `dask worker` processes started here."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from dedup_batch.cli import main
from dedup_batch.demo import DEMO_EPS, make_demo
from tests._dask_procs import dask_processes, free_port

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with dask_processes(tmp_path_factory.mktemp("dask-logs")) as address:
        yield address


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

    port = free_port()
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
