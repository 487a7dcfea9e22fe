"""apply_plan / restore on local folders and memory://, with real files and real thread pools.

S3 (moto server) and Dask-cluster tests are in ``test_apply_s3.py``; both use ``write_plan``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence

import fsspec
import pandas as pd
import pytest

from dedup_batch.apply import _make_batches, apply_plan, restore
from dedup_batch.errors import ConfigError, InputError, SafetyError, ScopeError
from dedup_batch.storage import Store, trash_key

# Names that glob-expanding APIs get wrong: each decoy matches the pattern its duplicate's
# name forms ("a[1].jpg" matches "a1.jpg", "b*.jpg" matches "bx.jpg", ...).
TRICKY = {
    # keeper: (duplicates, decoys that must survive)
    "k1.jpg": (["a[1].jpg"], ["a1.jpg"]),
    "k2.jpg": (["b*.jpg"], ["bx.jpg", "b.jpg"]),
    "k3.jpg": (["c?.jpg"], ["cc.jpg"]),
    "dir one/k4.jpg": (["dir one/copy of d.jpg", "dir one/d [2].jpg"], ["dir one/d 2.jpg"]),
    "ünï/k5.jpg": (["ünï/é%20+.jpg", "ünï/é+.jpg"], ["ünï/é .jpg", "ünï/é%2520+.jpg"]),
}


def write_plan(
    plan_dir: str,
    clusters: Mapping[str, Sequence[str]],
    *,
    store: Store | None = None,
    noise: Sequence[str] = (),
    storage_options: Mapping | None = None,
) -> pd.DataFrame:
    """Write ``plan_dir/plan.parquet`` (docs/architecture.md schema) and return it.

    ``clusters`` maps each keeper to its duplicates. With ``store``, size/mtime/etag/exists
    come from ``store.list_objects()`` as the plan stage records them.
    """
    rows = []
    for cid, (keeper, dups) in enumerate(clusters.items()):
        rows.append((keeper, cid, True, keeper, 0.0))
        rows += [(d, cid, False, keeper, 0.1) for d in dups]
    rows += [(p, -1, True, p, 0.0) for p in noise]
    plan = pd.DataFrame(rows, columns=["path", "cluster", "keep", "keeper", "distance_to_keeper"])
    objects = store.list_objects() if store is not None else None
    size, mtime, etag, exists = [], [], [], []
    for p in plan["path"]:
        info = None
        if objects is not None:
            fs_path = store.resolve(p)
            info = objects.loc[fs_path] if fs_path in objects.index else None
        size.append(pd.NA if info is None else int(info["size"]))
        mtime.append(float("nan") if info is None else float(info["mtime"]))
        etag.append(pd.NA if info is None or info["etag"] is None else info["etag"])
        exists.append(info is not None)
    plan["size"] = pd.array(size, dtype="Int64")
    plan["mtime"] = pd.array(mtime, dtype="float64")
    plan["etag"] = pd.array(etag, dtype="string")
    plan["exists"] = exists
    plan["path"] = plan["path"].astype("string")
    plan["keeper"] = plan["keeper"].astype("string")
    plan = plan.sort_values(["cluster", "path"], kind="stable").reset_index(drop=True)
    fs, root = fsspec.core.url_to_fs(plan_dir, **dict(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root.rstrip('/')}/plan.parquet", "wb") as f:
        plan.to_parquet(f, index=False)
    return plan


def make_tree(root: str, names: Sequence[str], fs: fsspec.AbstractFileSystem | None = None):
    """Create one small file per name under ``root``; the body is the name (bytes differ)."""
    for n in names:
        path = f"{root.rstrip('/')}/{n}"
        if fs is None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(n.encode())
        else:
            fs.pipe_file(path, n.encode())


def in_trash(plan_dir: str, names) -> set[str]:
    """Where ``names`` lie in the trash folder after an apply of ``plan_dir``."""
    with open(os.path.join(plan_dir, "journal", "manifest.json")) as f:
        scope = json.load(f)["trash_scope"]
    return {f"{scope}/{trash_key(n)}" for n in names}


def local_files(root) -> set[str]:
    out = set()
    for d, _, files in os.walk(root):
        for f in files:
            out.add(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/"))
    return out


def tricky_names() -> tuple[list[str], list[str], list[str]]:
    keepers = list(TRICKY)
    dups = [d for v in TRICKY.values() for d in v[0]]
    decoys = [d for v in TRICKY.values() for d in v[1]]
    return keepers, dups, decoys


def read_report(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def local_job(tmp_path):
    """A local root with the tricky names, its plan (sizes and mtimes recorded) and plan dir."""
    root = tmp_path / "root"
    keepers, dups, decoys = tricky_names()
    make_tree(str(root), keepers + dups + decoys + ["noise.jpg"])
    store = Store(str(root))
    plan_dir = str(tmp_path / "plan")
    write_plan(plan_dir, {k: v[0] for k, v in TRICKY.items()}, store=store, noise=["noise.jpg"])
    return store, plan_dir, root


def test_local_deletes_exactly_the_duplicates(local_job):
    store, plan_dir, root = local_job
    keepers, dups, decoys = tricky_names()
    res = apply_plan(plan_dir, store=store, batch_size=2, concurrency=3)
    assert res.ok
    assert res.counts == {"deleted": len(dups)}
    assert local_files(root) == set(keepers + decoys + ["noise.jpg"])
    assert res.guard == "compare-then-delete"
    assert res.bytes_done == sum(len(d.encode()) for d in dups)
    report = read_report(os.path.join(plan_dir, "completion-report.csv"))
    assert sorted(r["path"] for r in report) == sorted(dups)
    assert {r["status"] for r in report} == {"deleted"}
    journal = os.listdir(os.path.join(plan_dir, "journal"))
    assert "manifest.json" in journal
    assert len([j for j in journal if j.startswith("batch-")]) == res.batches_total
    summary = res.to_dict()
    assert summary["ok"] and summary["counts"] == {"deleted": len(dups)}
    json.dumps(summary)


def test_memory_glob_names_delete_exactly():
    fs = fsspec.filesystem("memory")
    root = "memory://apply-glob"
    keepers, dups, decoys = tricky_names()
    make_tree(root, keepers + dups + decoys, fs)
    # The hazard this guards against: fsspec's own rm() would expand the pattern.
    assert "/apply-glob/a1.jpg" in fs.expand_path("/apply-glob/a[1].jpg")
    try:
        store = Store(root)
        write_plan("memory://apply-glob-plan", {k: v[0] for k, v in TRICKY.items()}, store=store)
        res = apply_plan("memory://apply-glob-plan", store=store, batch_size=3)
        assert res.ok and res.counts == {"deleted": len(dups)}
        left = {p[len("/apply-glob/") :] for p in fs.find("/apply-glob")}
        assert left == set(keepers + decoys)
        report = fs.cat_file("/apply-glob-plan/completion-report.csv").decode()
        assert sorted(r["path"] for r in csv.DictReader(io.StringIO(report))) == sorted(dups)
    finally:
        fs.rm("/apply-glob", recursive=True)
        fs.rm("/apply-glob-plan", recursive=True)


def test_keeper_missing_cluster_is_skipped(tmp_path):
    root = tmp_path / "root"
    make_tree(str(root), ["k1.jpg", "d1.jpg", "d2.jpg", "k2.jpg", "e1.jpg"])
    store = Store(str(root))
    plan_dir = str(tmp_path / "plan")
    write_plan(plan_dir, {"k1.jpg": ["d1.jpg", "d2.jpg"], "k2.jpg": ["e1.jpg"]}, store=store)
    os.remove(root / "k1.jpg")
    res = apply_plan(plan_dir, store=store)
    assert not res.ok
    assert res.counts == {"skipped_keeper_missing": 2, "deleted": 1}
    assert local_files(root) == {"d1.jpg", "d2.jpg", "k2.jpg"}
    rows = {r["path"]: r for r in read_report(os.path.join(plan_dir, "completion-report.csv"))}
    assert rows["d1.jpg"]["status"] == "skipped_keeper_missing"
    assert rows["d1.jpg"]["error_code"] == "KeeperMissing"


@pytest.mark.parametrize("bad", ["../outside.jpg", "sub/../../outside.jpg", "/etc/passwd"])
def test_scope_escape_refused_before_anything(tmp_path, bad):
    root = tmp_path / "root"
    make_tree(str(root), ["k.jpg", "d.jpg"])
    (tmp_path / "outside.jpg").write_bytes(b"x")
    store = Store(str(root))
    plan_dir = str(tmp_path / "plan")
    write_plan(plan_dir, {"k.jpg": ["d.jpg", bad]})
    with pytest.raises(ScopeError, match="nothing was deleted"):
        apply_plan(plan_dir, store=store)
    assert local_files(root) == {"k.jpg", "d.jpg"}
    assert (tmp_path / "outside.jpg").exists()
    assert not (tmp_path / "plan" / "journal").exists()


def test_keeper_in_delete_set_is_refused(tmp_path):
    root = tmp_path / "root"
    make_tree(str(root), ["k.jpg", "d.jpg", "e.jpg"])
    store = Store(str(root))
    plan_dir = str(tmp_path / "plan")
    plan = write_plan(plan_dir, {"k.jpg": ["d.jpg"], "d.jpg_": []})
    # Corrupt the plan: e.jpg is deleted in favour of d.jpg, which is itself deleted.
    plan = plan[plan["path"] != "d.jpg_"]
    extra = pd.DataFrame({"path": ["e.jpg"], "cluster": [0], "keep": [False], "keeper": ["d.jpg"]})
    pd.concat([plan, extra]).to_parquet(os.path.join(plan_dir, "plan.parquet"))
    with pytest.raises(SafetyError, match="both to be deleted and a keeper"):
        apply_plan(plan_dir, store=store)
    assert local_files(root) == {"k.jpg", "d.jpg", "e.jpg"}


def test_alias_of_a_keeper_is_refused(tmp_path):
    root = tmp_path / "root"
    make_tree(str(root), ["k.jpg"])
    store = Store(str(root))
    plan_dir = str(tmp_path / "plan")
    write_plan(plan_dir, {"k.jpg": ["./k.jpg"]})
    with pytest.raises(InputError, match="same object"):
        apply_plan(plan_dir, store=store)
    assert local_files(root) == {"k.jpg"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"max_delete": 2}, "max_delete=2"), ({"max_delete_fraction": 0.4}, "max_delete_fraction")],
)
def test_limits_refuse_before_anything(tmp_path, kwargs, match):
    root = tmp_path / "root"
    make_tree(str(root), ["k.jpg", "d1.jpg", "d2.jpg", "d3.jpg", "n.jpg"])
    store = Store(str(root))
    plan_dir = str(tmp_path / "plan")
    write_plan(plan_dir, {"k.jpg": ["d1.jpg", "d2.jpg", "d3.jpg"], "n.jpg": []}, store=store)
    with pytest.raises(SafetyError, match=match):
        apply_plan(plan_dir, store=store, **kwargs)
    assert len(local_files(root)) == 5
    assert os.listdir(plan_dir) == ["plan.parquet"]
    # At the limit it goes through: 3 of 5 rows.
    res = apply_plan(plan_dir, store=store, max_delete=3, max_delete_fraction=0.6)
    assert res.counts == {"deleted": 3}


def test_dry_run_touches_nothing(local_job):
    store, plan_dir, root = local_job
    before = local_files(root)
    _, dups, _ = tricky_names()
    res = apply_plan(plan_dir, store=store, dry_run=True)
    assert res.dry_run and res.ok and res.report == os.path.join(plan_dir, "would-delete.csv")
    assert res.counts == {"would_delete": len(dups)}
    assert res.planned_bytes == sum(len(d.encode()) for d in dups)
    assert local_files(root) == before
    assert sorted(os.listdir(plan_dir)) == ["plan.parquet", "would-delete.csv"]
    listed = read_report(res.report)
    assert sorted(r["path"] for r in listed) == sorted(dups)
    assert all(r["keeper"] and r["size"] for r in listed)


def test_changed_after_plan_is_skipped(tmp_path):
    root = tmp_path / "root"
    make_tree(str(root), ["k.jpg", "same.jpg", "grown.jpg", "touched.jpg"])
    store = Store(str(root))
    plan_dir = str(tmp_path / "plan")
    write_plan(plan_dir, {"k.jpg": ["same.jpg", "grown.jpg", "touched.jpg"]}, store=store)
    (root / "grown.jpg").write_bytes(b"a different, longer body")
    st = os.stat(root / "touched.jpg")
    os.utime(root / "touched.jpg", (st.st_atime, st.st_mtime + 5))
    res = apply_plan(plan_dir, store=store)
    assert res.counts == {"deleted": 1, "skipped_changed": 2}
    assert local_files(root) == {"k.jpg", "grown.jpg", "touched.jpg"}
    assert not res.ok


def test_second_run_is_a_no_op(local_job):
    store, plan_dir, root = local_job
    first = apply_plan(plan_dir, store=store, batch_size=2)
    assert first.ok
    # Something new appears at a deleted path: a finished plan must never touch it again.
    (root / "a[1].jpg").write_bytes(b"new upload")
    second = apply_plan(plan_dir, store=store, batch_size=2)
    assert second.ok and second.batches_run == 0
    assert second.batches_skipped == first.batches_total
    assert second.counts == first.counts
    assert (root / "a[1].jpg").read_bytes() == b"new upload"


def test_resume_runs_only_unfinished_batches(local_job):
    store, plan_dir, root = local_job
    times = {n: os.stat(root / n).st_mtime for n in local_files(root)}
    first = apply_plan(plan_dir, store=store, batch_size=1)
    journal = os.path.join(plan_dir, "journal")
    # Pretend the run died with two batches unjournaled: one had deleted its object, the other
    # had not started (its object is back as it was); everything else must be left alone.
    batches = sorted(f for f in os.listdir(journal) if f.startswith("batch-"))
    redo = []
    for name in batches[:2]:
        with open(os.path.join(journal, name)) as f:
            redo += [r[0] for r in json.load(f)["records"]]
        os.remove(os.path.join(journal, name))
    make_tree(str(root), redo[1:])
    os.utime(root / redo[1], (times[redo[1]], times[redo[1]]))
    (root / "a1.jpg").unlink()  # a decoy gone meanwhile: still never a target
    second = apply_plan(plan_dir, store=store, batch_size=7)  # the journal's size wins
    assert second.batches_run == 2 and second.batches_skipped == first.batches_total - 2
    assert second.ok
    assert second.counts == {"deleted": first.counts["deleted"] - 1, "already_absent": 1}
    rows = {
        r["path"]: r["status"] for r in read_report(os.path.join(plan_dir, "completion-report.csv"))
    }
    assert rows[redo[0]] == "already_absent" and rows[redo[1]] == "deleted"
    _, dups, decoys = tricky_names()
    assert not (set(dups) & local_files(root))
    assert set(decoys) - {"a1.jpg"} <= local_files(root)


def test_journal_of_another_plan_is_refused(local_job, tmp_path):
    store, plan_dir, root = local_job
    apply_plan(plan_dir, store=store, dry_run=False)
    write_plan(plan_dir, {"k1.jpg": ["a1.jpg"]}, store=store)
    with pytest.raises(SafetyError, match="another plan"):
        apply_plan(plan_dir, store=store)
    assert (root / "a1.jpg").exists()


def test_batches_are_deterministic_and_keep_clusters_together():
    from dedup_batch.apply import _Item

    def item(p, k):
        return _Item(p, "/r/" + p, 0, k, "/r/" + k, None, None, None)

    clusters = {
        f"k{c}": [f"c{c}-{j}" for j in range(n)] for c, n in enumerate([3, 1, 5, 2, 2, 9, 1])
    }
    items = [item(d, k) for k, ds in clusters.items() for d in ds]
    a = _make_batches(items, 4, None)
    b = _make_batches(list(reversed(items)), 4, None)
    assert [[it.path for it in x.items] for x in a] == [[it.path for it in x.items] for x in b]
    assert [x.id for x in a] == list(range(len(a)))
    assert all(len(x.items) <= 4 for x in a)
    for k, ds in clusters.items():
        holding = {x.id for x in a for it in x.items if it.keeper == k}
        assert len(holding) == -(-len(ds) // 4)  # ceil: as few batches as the size allows


def test_trash_and_restore_local(local_job, tmp_path):
    store, plan_dir, root = local_job
    keepers, dups, decoys = tricky_names()
    before = {n: (root / n).read_bytes() for n in local_files(root)}
    trash = str(tmp_path / "trash")
    res = apply_plan(plan_dir, store=store, trash=trash, batch_size=2)
    assert res.ok and res.counts == {"trashed": len(dups)}
    assert local_files(root) == set(keepers + decoys + ["noise.jpg"])
    assert local_files(trash) == in_trash(plan_dir, dups)
    assert all(
        (tmp_path / "trash" / t).read_bytes() == before[d]
        for d in dups
        for t in in_trash(plan_dir, [d])
    )
    # The apply journal says "trash": finishing it without is refused.
    with pytest.raises(SafetyError, match="trash"):
        apply_plan(plan_dir, store=store)
    back = restore(plan_dir, store=store, trash=trash)
    assert back.ok and back.counts == {"restored": len(dups)}
    assert {n: (root / n).read_bytes() for n in local_files(root)} == before
    assert local_files(trash) == set()
    again = restore(plan_dir, store=store, trash=trash)
    assert again.ok and again.batches_run == 0


def test_restore_leaves_a_new_object_alone(tmp_path):
    root = tmp_path / "root"
    make_tree(str(root), ["k.jpg", "d1.jpg", "d2.jpg"])
    store = Store(str(root))
    plan_dir = str(tmp_path / "plan")
    write_plan(plan_dir, {"k.jpg": ["d1.jpg", "d2.jpg"]}, store=store)
    trash = str(tmp_path / "trash")
    apply_plan(plan_dir, store=store, trash=trash)
    (root / "d1.jpg").write_bytes(b"someone uploaded a new d1")
    res = restore(plan_dir, store=store, trash=trash)
    assert res.counts == {"restored": 1, "skipped_exists": 1} and not res.ok
    assert (root / "d1.jpg").read_bytes() == b"someone uploaded a new d1"
    assert (root / "d2.jpg").read_bytes() == b"d2.jpg"
    assert local_files(trash) == in_trash(plan_dir, ["d1.jpg"])


@pytest.mark.parametrize("where", ["inside", "contains"])
def test_trash_overlapping_root_is_refused(local_job, tmp_path, where):
    store, plan_dir, root = local_job
    trash = str(root / ".trash") if where == "inside" else str(tmp_path)
    with pytest.raises(ConfigError, match="overlaps root"):
        apply_plan(plan_dir, store=store, trash=trash)
    assert os.listdir(plan_dir) == ["plan.parquet"]


def test_missing_plan_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match=r"no plan\.parquet"):
        apply_plan(str(tmp_path / "nope"), store=Store(str(tmp_path)))


def test_local_apply_on_dask_matches_threads(dask_client, tmp_path):
    root = tmp_path / "root"
    clusters = {f"k{c:02d}.jpg": [f"k{c:02d}-dup{j}.jpg" for j in range(c % 4)] for c in range(20)}
    make_tree(str(root), list(clusters) + [d for v in clusters.values() for d in v])
    store = Store(str(root))
    plan_dir = str(tmp_path / "plan")
    write_plan(plan_dir, clusters, store=store)
    res = apply_plan(plan_dir, store=store, client=dask_client, batch_size=5)
    assert res.ok and res.counts == {"deleted": sum(len(v) for v in clusters.values())}
    assert local_files(root) == set(clusters)
    assert res.batches_run == res.batches_total > 1


def test_apply_advances_the_running_stage(tmp_path):
    from dedup_batch import progress

    root = tmp_path / "lib"
    root.mkdir()
    clusters = {f"k{i}.jpg": [f"d{i}a.jpg", f"d{i}b.jpg"] for i in range(5)}
    for k, dups in clusters.items():
        for name in (k, *dups):
            (root / name).write_bytes(name.encode())
    store = Store(str(root))
    write_plan(str(tmp_path / "plan"), clusters, store=store)
    with progress.stage("apply", unit="batches") as st:
        res = apply_plan(str(tmp_path / "plan"), store=store, batch_size=2)
    assert res.ok
    assert st.total == res.to_dict()["batches"]["total"] >= 3
    assert st.done == st.total
