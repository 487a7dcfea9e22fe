"""PlanDir: the plan directory's files, schema checks and summary updates, locally and on S3."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from dedup_batch.errors import InputError
from dedup_batch.plandir import (
    PARTS_FILE,
    PLAN_DATASET,
    PLAN_FILE,
    SUMMARY_FILE,
    PlanCounts,
    PlanDir,
)
from dedup_batch.storage import Store


def _plan() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "path": ["a.jpg", "b.jpg", "c.jpg"],
            "cluster": [0, 0, 1],
            "keep": [True, False, True],
            "keeper": ["a.jpg", "a.jpg", "c.jpg"],
        }
    )


def test_plan_round_trip_and_summary_update(tmp_path) -> None:
    pdir = PlanDir(str(tmp_path / "out"))
    url = pdir.write_plan(_plan())
    assert url == str(tmp_path / "out" / PLAN_FILE)
    pd.testing.assert_frame_equal(pdir.read_plan(), _plan())
    assert pdir.update_summary({"report": {"html": "report.html"}}) is False  # no summary yet
    assert not pdir.exists(SUMMARY_FILE)
    pdir.write_summary({"counts": {"paths": 3}})
    assert pdir.update_summary({"report": {"html": "report.html"}}) is True
    assert pdir.read_summary() == {"counts": {"paths": 3}, "report": {"html": "report.html"}}
    # atomic writes leave no temporary files behind
    assert sorted(os.listdir(tmp_path / "out")) == [PLAN_FILE, SUMMARY_FILE]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, r"no plan\.parquet .*no plan here"),
        (b"not parquet", "not a readable Parquet plan"),
    ],
)
def test_unreadable_plans_name_the_file(tmp_path, content, match) -> None:
    if content is not None:
        (tmp_path / PLAN_FILE).write_bytes(content)
    with pytest.raises(InputError, match=match):
        PlanDir(str(tmp_path)).read_plan()


def test_schema_checks_name_column_and_row(tmp_path) -> None:
    pdir = PlanDir(str(tmp_path))
    pdir.write_plan(_plan().drop(columns="keeper"))
    with pytest.raises(InputError, match=r"lacks column\(s\) keeper"):
        pdir.read_plan()
    bad = _plan().astype({"path": object})
    bad.loc[2, "path"] = None
    pdir.write_plan(bad)
    with pytest.raises(InputError, match="row 2: path is empty"):
        pdir.read_plan()


def test_job_yaml_required_or_optional(tmp_path) -> None:
    pdir = PlanDir(str(tmp_path))
    assert pdir.read_job() == {}
    with pytest.raises(InputError, match="not a plan directory"):
        pdir.read_job(required=True)
    pdir.write_job("root: /photos\neps: 0.3\n")
    assert pdir.read_job(required=True) == {"root": "/photos", "eps": 0.3}
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot parse"):
        pdir.read_summary()


def test_options_follow_the_image_store_only_on_its_protocol(tmp_path) -> None:
    local = Store(str(tmp_path))
    assert PlanDir.beside(str(tmp_path), local).storage_options == {}
    mem = Store("memory://imgs", {"skip_instance_cache": True})
    assert PlanDir.beside("memory://plans", mem).storage_options == {"skip_instance_cache": True}
    assert PlanDir.beside(str(tmp_path), mem).storage_options == {}  # local: never remote options
    assert PlanDir.beside("memory://p", mem, {"x": 1}).storage_options == {"x": 1}


@pytest.mark.s3
def test_on_s3(s3, s3fs_client) -> None:
    s3fs_client.mkdir("plans")
    pdir = PlanDir("s3://plans/run1", s3)
    pdir.write_plan(_plan())
    pdir.write_summary({"counts": {"paths": 3}})
    assert pdir.update_summary({"apply": {"ok": True}})
    pd.testing.assert_frame_equal(pdir.read_plan(), _plan())
    assert json.loads(pdir.read_bytes(SUMMARY_FILE))["apply"] == {"ok": True}
    assert not pdir.has_journal()


# -- the dataset layout: plan/part-*.parquet + plan/_parts.json ----------------------------------
def _big_plan() -> pd.DataFrame:
    """Clusters of 3, 1, 4 and 2 rows and two noise rows, sorted by cluster then path."""
    rows = [(-1, "n1"), (-1, "n2"), (0, "a1"), (0, "a2"), (0, "a3"), (1, "b1")]
    rows += [(2, "c1"), (2, "c2"), (2, "c3"), (2, "c4"), (3, "d1"), (3, "d2")]
    first = {}
    for c, p in rows:
        first.setdefault(c, p)
    return pd.DataFrame(
        {
            "path": [f"{p}.jpg" for _, p in rows],
            "cluster": [c for c, _ in rows],
            "keep": [c == -1 or first[c] == p for c, p in rows],
            "keeper": [f"{p if c == -1 else first[c]}.jpg" for c, p in rows],
        }
    )


@pytest.mark.parametrize("part_rows", [1, 3, 5])
def test_dataset_round_trip_keeps_every_cluster_in_one_part(tmp_path, part_rows) -> None:
    pdir = PlanDir(str(tmp_path))
    pdir.write_plan(_plan())  # a one-file plan first: the dataset replaces it
    url = pdir.write_plan(_big_plan(), part_rows=part_rows)
    assert url.endswith(PARTS_FILE) and pdir.plan_layout() == "dataset"
    assert not (tmp_path / PLAN_FILE).exists()
    parts = list(pdir.plan_parts())
    assert len(parts) > 1
    owner: dict[int, int] = {}
    for k, part in enumerate(parts):
        # whole clusters only; a part exceeds part_rows only by the cluster that crosses it
        for c in set(part["cluster"]) - {-1}:
            assert owner.setdefault(c, k) == k
        assert len(part) < part_rows + 4
    pd.testing.assert_frame_equal(pdir.read_plan(), _big_plan())
    assert pdir.plan_rows() == len(_big_plan())
    # back to one file: the dataset goes
    pdir.write_plan(_plan())
    assert pdir.plan_layout() == "file"
    assert not list((tmp_path / PLAN_DATASET).glob("*"))
    pd.testing.assert_frame_equal(pdir.read_plan(), _plan())


def test_dataset_checks_refuse_what_could_split_a_cluster(tmp_path) -> None:
    pdir = PlanDir(str(tmp_path))
    pdir.write_plan(_big_plan(), part_rows=3)
    doc = json.loads(pdir.read_bytes(PARTS_FILE))
    # a part whose rows leave its declared cluster range
    bad = json.loads(json.dumps(doc))
    bad["parts"][1]["clusters"] = [bad["parts"][1]["clusters"][0], -5 + 10**6]
    bad["parts"][1]["clusters"][0] = bad["parts"][1]["clusters"][1]
    pdir.write_text(PARTS_FILE, json.dumps(bad))
    with pytest.raises(InputError, match="lies outside the part's clusters"):
        list(pdir.plan_parts())
    # two parts claiming overlapping ranges
    bad = json.loads(json.dumps(doc))
    bad["parts"][0]["clusters"] = [0, 3]
    pdir.write_text(PARTS_FILE, json.dumps(bad))
    with pytest.raises(InputError, match="overlap"):
        list(pdir.plan_parts())
    with pytest.raises(InputError, match="overlap"):
        pdir.finish_dataset(bad["parts"])
    # a part that is not what _parts.json says
    bad = json.loads(json.dumps(doc))
    bad["parts"][0]["rows"] += 1
    pdir.write_text(PARTS_FILE, json.dumps(bad))
    with pytest.raises(InputError, match=r"rows, .*_parts\.json says"):
        list(pdir.plan_parts())
    # parts without _parts.json: their writing did not finish
    (tmp_path / PARTS_FILE).unlink()
    with pytest.raises(InputError, match="writing did not finish"):
        pdir.read_plan()
    # both layouts at once
    pdir.write_text(PARTS_FILE, json.dumps(doc))
    (tmp_path / PLAN_FILE).write_bytes(b"x")
    with pytest.raises(InputError, match=r"both plan\.parquet and plan/_parts\.json"):
        pdir.read_plan()


def test_counts_add_up_over_parts(tmp_path) -> None:
    pdir = PlanDir(str(tmp_path))
    pdir.write_plan(_big_plan(), part_rows=2)
    whole = PlanCounts.of(_big_plan())
    assert PlanCounts.total(pdir.plan_parts()) == whole
    assert (whole.paths, whole.noise, whole.keep, whole.delete) == (12, 2, 6, 6)
    assert dict(whole.sizes) == {1: 1, 2: 1, 3: 1, 4: 1}
    assert (whole.clusters, whole.duplicate_clusters) == (4, 3)


@pytest.mark.s3
def test_dataset_on_s3(s3, s3fs_client) -> None:
    s3fs_client.mkdir("plans")
    pdir = PlanDir("s3://plans/run2", s3)
    pdir.write_plan(_big_plan(), part_rows=4)
    pd.testing.assert_frame_equal(pdir.read_plan(), _big_plan())
    pdir.write_plan(_plan())
    assert pdir.plan_layout() == "file"
    assert not s3fs_client.exists("plans/run2/plan/_parts.json")
