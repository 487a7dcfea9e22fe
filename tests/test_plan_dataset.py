"""apply, resume, restore and report on a plan written as a dataset (``plan/part-*.parquet``),
against the same plan as one ``plan.parquet``: real files, memory://, real thread pools."""

from __future__ import annotations

import json
import os

import fsspec
import pandas as pd
import pytest
from test_apply import TRICKY, local_files, make_tree, read_report, tricky_names, write_plan

from dedup_batch.apply import _todo_by_part, apply_plan, restore
from dedup_batch.errors import SafetyError
from dedup_batch.plandir import PlanDir
from dedup_batch.report import build_report
from dedup_batch.storage import Store, trash_key

#: Rows per part: every TRICKY cluster (2-3 rows) ends up alone or nearly so in its part.
PART_ROWS = 2


def _job(tmp_path, name: str, *, dataset: bool):
    root = tmp_path / name / "root"
    keepers, dups, decoys = tricky_names()
    make_tree(str(root), keepers + dups + decoys + ["noise.jpg"])
    store = Store(str(root))
    plan_dir = str(tmp_path / name / "plan")
    plan = write_plan(
        plan_dir, {k: v[0] for k, v in TRICKY.items()}, store=store, noise=["noise.jpg"]
    )
    if dataset:
        PlanDir(plan_dir).write_plan(plan, part_rows=PART_ROWS)
        assert PlanDir(plan_dir).plan_layout() == "dataset"
        assert len(list(PlanDir(plan_dir).plan_parts())) >= 4
    return store, plan_dir, root


def test_apply_of_a_dataset_equals_apply_of_one_file(tmp_path):
    results = {}
    for name in ("file", "dataset"):
        store, plan_dir, root = _job(tmp_path, name, dataset=name == "dataset")
        dry = apply_plan(plan_dir, store=store, dry_run=True, batch_size=2)
        res = apply_plan(plan_dir, store=store, batch_size=2, concurrency=3)
        journal = sorted(os.listdir(os.path.join(plan_dir, "journal")))
        report = read_report(os.path.join(plan_dir, "completion-report.csv"))
        would = read_report(os.path.join(plan_dir, "would-delete.csv"))
        results[name] = (dry.counts, res.counts, res.guard, local_files(root), report, would)
        # batch ids continue across parts: one journal file per batch, none overwritten
        assert len([j for j in journal if j.startswith("batch-")]) == res.batches_total
    assert results["file"] == results["dataset"]
    keepers, dups, decoys = tricky_names()
    assert results["dataset"][1] == {"deleted": len(dups)}
    assert results["dataset"][3] == set(keepers + decoys + ["noise.jpg"])


def test_resume_and_restore_a_dataset_plan_on_memory(tmp_path):
    fs = fsspec.filesystem("memory")
    base = "/dataset-resume"
    keepers, dups, decoys = tricky_names()
    make_tree(f"{base}/root", keepers + dups + decoys, fs=fs)
    store = Store(f"memory://{base}/root")
    plan_dir = f"memory://{base}/plan"
    try:
        plan = write_plan(plan_dir, {k: v[0] for k, v in TRICKY.items()}, store=store)
        PlanDir(plan_dir).write_plan(plan, part_rows=PART_ROWS)
        before = {p: fs.cat_file(p) for p in fs.find(f"{base}/root")}
        trash = f"memory://{base}/trash"
        first = apply_plan(plan_dir, store=store, batch_size=1, trash=trash)
        assert first.counts == {"trashed": len(dups)} and first.batches_total == len(dups)
        # the tasks of two batches of different parts moved their objects to the trash, then
        # died before journaling: the re-run finds them there and journals them as trashed
        batches = sorted(f for f in fs.ls(f"{base}/plan/journal", detail=False) if "batch-" in f)
        scope = json.loads(fs.cat_file(f"{base}/plan/journal/manifest.json"))["trash_scope"]
        for name in (batches[0], batches[-1]):
            for path, *_ in json.loads(fs.cat_file(name))["records"]:
                assert fs.exists(f"{base}/trash/{scope}/{trash_key(path)}")
            fs.rm_file(name)
        second = apply_plan(plan_dir, store=store, batch_size=1, trash=trash)
        assert second.batches_run == 2 and second.batches_skipped == first.batches_total - 2
        assert second.counts == first.counts
        back = restore(plan_dir, store=store, trash=trash)
        assert back.counts == {"restored": len(dups)}
        assert {p: fs.cat_file(p) for p in fs.find(f"{base}/root")} == before
    finally:
        fs.rm(base, recursive=True)


def test_one_object_in_two_parts_is_refused_before_anything_is_deleted(tmp_path):
    store, plan_dir, root = _job(tmp_path, "two", dataset=False)
    plan = PlanDir(plan_dir).read_plan()
    # a.jpg's alias spelled differently in a later part, where it is a keeper
    extra = pd.DataFrame(
        {
            "path": pd.array(["./a[1].jpg"], dtype="string"),
            "cluster": [99],
            "keep": [True],
            "keeper": pd.array(["./a[1].jpg"], dtype="string"),
            "distance_to_keeper": [0.0],
            "size": pd.array([7], dtype="Int64"),
            "mtime": [1.0],
            "etag": pd.array([pd.NA], dtype="string"),
            "exists": [True],
        }
    )
    PlanDir(plan_dir).write_plan(pd.concat([plan, extra], ignore_index=True), part_rows=3)
    before = local_files(root)
    with pytest.raises(SafetyError, match=r"part-\d+\.parquet row 0: .*an earlier part"):
        apply_plan(plan_dir, store=store)
    assert local_files(root) == before


def test_a_part_changed_after_the_check_is_refused(tmp_path):
    store, plan_dir, _ = _job(tmp_path, "changed", dataset=True)
    from dedup_batch.apply import ApplyResult

    parts = _todo_by_part(
        PlanDir(plan_dir), store, 2, ["not the digest"], {}, frozenset(), {}, ApplyResult("x")
    )
    with pytest.raises(SafetyError, match="changed while it was being applied"):
        next(parts)


def test_report_of_a_dataset_equals_report_of_one_file(tmp_path):
    made = {}
    for name in ("file", "dataset"):
        store, plan_dir, _ = _job(tmp_path, name, dataset=name == "dataset")
        res = build_report(plan_dir, store=store, clusters_per_page=2)
        with open(res.url, encoding="utf-8") as f:
            html = f.read()
        made[name] = (res.pages, res.clusters_total, res.images_shown, res.thumbnails)
        n = len(PlanDir(plan_dir).read_plan())
        assert f"<b>{n}</b>" in html.replace("\n", "") or f">{n}<" in html
    assert made["file"] == made["dataset"]
