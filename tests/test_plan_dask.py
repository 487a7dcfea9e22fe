"""Select on the Dask workers (issue 14 item 3): the same plan, row for row, whether the vectors
are gathered (in-process select) or left on the workers (``plan_dask``), with the plan as one
file or as a dataset written by the workers; real `dask scheduler` and `dask worker` processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from dedup_batch import plandir
from dedup_batch.apply import apply_plan
from dedup_batch.config import JobSpec
from dedup_batch.demo import DEMO_EPS, make_demo
from dedup_batch.pipeline import plan
from dedup_batch.plandir import PlanDir
from dedup_batch.report import build_report
from dedup_batch.storage import Store
from tests._dask_procs import dask_processes

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with dask_processes(tmp_path_factory.mktemp("dask-logs"), 2) as address:
        yield address


@pytest.fixture
def client(scheduler: str) -> Iterator:
    from distributed import Client

    with Client(scheduler, timeout="30s") as c:
        yield c


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_demo(tmp_path_factory.mktemp("demo") / "d", n_images=60, seed=3, shards=4)


def _plans(tmp_path: Path, demo: dict, client, **settings) -> dict[str, tuple]:
    base = {"features": [demo["features"]], "root": demo["root"], "eps": DEMO_EPS}
    base.update({"report": False, **settings})
    out = {}
    for mode in ("never", "always"):
        spec = JobSpec.from_mapping({**base, "out": str(tmp_path / mode), "distributed": mode})
        result = plan(spec, client)
        out[mode] = (result, PlanDir(spec.out))
    return out


def _sorted(table: pd.DataFrame) -> pd.DataFrame:
    return table.sort_values(["cluster", "path"], kind="stable").reset_index(drop=True)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"keep": "centroid", "max_keeper_distance": DEMO_EPS / 3},  # the chain guard adds keepers
        {"min_samples": 3, "keep": "-size,path"},  # noise rows, a size-led policy
    ],
    ids=["original", "centroid-chain-guard", "noise"],
)
def test_one_file_plan_is_the_same_on_the_workers(tmp_path, demo, client, settings):
    plans = _plans(tmp_path, demo, client, **settings)
    (gathered, gdir), (spread, sdir) = plans["never"], plans["always"]
    assert gdir.plan_layout() == sdir.plan_layout() == "file"
    assert len(gathered.plan) == demo["images"] and (~gathered.plan["keep"]).sum() > 5
    pd.testing.assert_frame_equal(gathered.plan, spread.plan)
    pd.testing.assert_frame_equal(gdir.read_plan(), sdir.read_plan())
    assert gathered.summary["counts"] == spread.summary["counts"]
    assert gathered.summary["clusters_by_size"] == spread.summary["clusters_by_size"]


def test_dataset_written_by_the_workers_is_the_in_process_plan(tmp_path, demo, client, monkeypatch):
    monkeypatch.setattr(plandir, "PART_ROWS", 7)  # both paths write datasets
    plans = _plans(tmp_path, demo, client, report=True)
    (gathered, gdir), (spread, sdir) = plans["never"], plans["always"]
    assert gdir.plan_layout() == sdir.plan_layout() == "dataset"
    assert spread.plan is None  # never gathered on the client
    parts = list(sdir.plan_parts())
    assert len(parts) >= demo["images"] // 7
    owner: dict[int, int] = {}
    for k, part in enumerate(parts):
        for c in set(part["cluster"]) - {-1}:
            assert owner.setdefault(c, k) == k  # whole clusters
    pd.testing.assert_frame_equal(_sorted(sdir.read_plan()), gathered.plan)
    pd.testing.assert_frame_equal(_sorted(gdir.read_plan()), gathered.plan)
    assert gathered.summary["counts"] == spread.summary["counts"]
    # the plan's own report: from the table in memory, and from the workers' parts
    assert gathered.summary["report"]["clusters_total"] > 0
    for key in ("clusters_total", "clusters_shown", "images_shown"):
        assert gathered.summary["report"][key] == spread.summary["report"][key]
    # apply (dry run) and the report read the workers' dataset part by part
    store = Store(demo["root"])
    a = apply_plan(gdir.url, store=store, dry_run=True)
    b = apply_plan(sdir.url, store=store, dry_run=True)
    assert a.counts == b.counts and a.counts["would_delete"] == gathered.summary["counts"]["delete"]
    ra, rb = build_report(gdir.url, store=store), build_report(sdir.url, store=store)
    assert (ra.clusters_total, ra.images_shown) == (rb.clusters_total, rb.images_shown)
