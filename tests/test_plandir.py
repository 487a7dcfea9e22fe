"""PlanDir: the plan directory's files, schema checks and summary updates, locally and on S3."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from dedup_batch.errors import InputError
from dedup_batch.plandir import PLAN_FILE, SUMMARY_FILE, PlanDir
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
