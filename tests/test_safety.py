"""Nothing is lost: the invariants of plan + apply (+ restore), each tried on every backend.

Named tests reproduce each way the first version deleted what it promised to keep (issue 9);
the property tests generate collections mixing all of them (alias spellings, linked folders,
rows missing at plan time, objects created, changed or replaced between plan and apply, shared
trash, keys with ``//`` and glob characters) and check the invariants after a real plan and a
real apply:

* no keeper of the plan is deleted, nor changed;
* nothing outside the root is touched;
* only objects that the plan observed, unchanged since, are deleted;
* every trashed object restores byte for byte.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator

import _shards as sh
import fsspec
import numpy as np
import pandas as pd
import pytest
from fsspec.asyn import sync
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dedup_batch import pipeline, plandir
from dedup_batch.apply import apply_plan, restore
from dedup_batch.config import JobSpec
from dedup_batch.errors import ConfigError, SafetyError, ScopeError, StorageError
from dedup_batch.plandir import PlanDir
from dedup_batch.storage import Store, trash_key

DIM = 4
EPS = 1.0


def vec(group: int, jitter: float = 0.0) -> np.ndarray:
    """A vector of ``group``: groups lie 10 apart, members within ``jitter`` (< EPS / 2)."""
    v = np.zeros(DIM, np.float32)
    v[group % DIM] = 10.0 * (1 + group // DIM)
    v[(group + 1) % DIM] += jitter
    return v


def write_features(url: str, rows: list[tuple[str, np.ndarray]], options=None) -> None:
    paths = [p for p, _ in rows]
    X = np.stack([v for _, v in rows]).astype(np.float32)
    sh.put(url, sh.wide_parquet(paths, X, how="column"), options)


def plan_job(root: str, features: str, out: str, options=None, **kw) -> pd.DataFrame:
    spec = JobSpec(
        features=[features],
        root=root,
        eps=EPS,
        out=out,
        report=False,
        storage_options=dict(options or {}),
        **kw,
    )
    spec.validate()
    return pipeline.plan(spec).plan


def snapshot(folder: str) -> dict[str, bytes]:
    """Every regular file under ``folder`` (links not followed) -> its bytes."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            full = os.path.join(d, f)
            if os.path.isfile(full) and not os.path.islink(full):
                with open(full, "rb") as fh:
                    out[os.path.relpath(full, folder)] = fh.read()
    return out


def write(path, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def apply_killed(monkeypatch, after: int, plan: str, store: Store, **kw) -> None:
    """``apply_plan(plan, store=store, **kw)`` killed (KeyboardInterrupt) once ``after``
    batches are journaled, before the next batch's journal file (its deletes done), one batch
    at a time so that no other is in flight; the apply as it was afterwards."""
    import dedup_batch.apply as apply_mod

    journal, done = apply_mod._journal, []

    def killed(*args, **kwargs):
        if len(done) >= after:
            raise KeyboardInterrupt("killed before a batch's journal file")
        done.append(1)
        return journal(*args, **kwargs)

    monkeypatch.setattr(apply_mod, "_journal", killed)
    try:
        with contextlib.suppress(KeyboardInterrupt):  # none if every batch is journaled first
            apply_plan(plan, store=store, concurrency=1, **kw)
    finally:
        monkeypatch.setattr(apply_mod, "_journal", journal)


# -- 1. alias spellings of one object ----------------------------------------------------------
@pytest.mark.parametrize("alias", ["x//a.jpg", "x/./a.jpg", "x/a.jpg/", "./x/a.jpg"])
def test_alias_spelling_never_deletes_the_keeper_local(tmp_path, alias):
    root = tmp_path / "root"
    write(root / "x" / "a.jpg", b"the only copy")
    feats = str(tmp_path / "f.parquet")
    write_features(feats, [("x/a.jpg", vec(0)), (alias, vec(0))])
    plan = plan_job(str(root), feats, str(tmp_path / "plan"))
    assert plan["path"].tolist() == ["x/a.jpg"]  # one object, one row
    res = apply_plan(str(tmp_path / "plan"), store=Store(str(root)))
    assert res.counts == {} and (root / "x" / "a.jpg").read_bytes() == b"the only copy"


def test_alias_spellings_on_memory_and_s3_are_never_deleted_unseen(s3, s3fs_client, tmp_path):
    # On object stores 'x//a.jpg' is another key: absent here, so seen missing, never deleted.
    s3fs_client.mkdir("bkt")
    s3fs_client.pipe({"bkt/r/x/a.jpg": b"only"})
    fsspec.filesystem("memory").pipe({"/safety-mem/x/a.jpg": b"only"})
    for root, opts, check in [
        ("s3://bkt/r", s3, lambda: s3fs_client.cat_file("bkt/r/x/a.jpg")),
        (
            "memory://safety-mem",
            None,
            lambda: fsspec.filesystem("memory").cat("/safety-mem/x/a.jpg"),
        ),
    ]:
        feats = str(tmp_path / f"{len(root)}.parquet")
        write_features(feats, [("x/a.jpg", vec(0)), ("x//a.jpg", vec(0, 0.1))])
        out = str(tmp_path / f"plan-{len(root)}")
        plan = plan_job(root, feats, out, opts)
        row = plan.set_index("path")
        assert not row.loc["x//a.jpg", "exists"] and row.loc["x//a.jpg", "keep"]
        res = apply_plan(out, store=Store(root, opts))
        assert res.counts == {} and check() == b"only"


# -- 2. linked folders inside a local root -----------------------------------------------------
def test_linked_folder_to_outside_is_refused_at_plan(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    write(outside / "o.jpg", b"outside")
    write(root / "k.jpg", b"keeper")
    os.symlink(outside, root / "ext")
    feats = str(tmp_path / "f.parquet")
    write_features(feats, [("k.jpg", vec(0)), ("ext/o.jpg", vec(0, 0.1))])
    with pytest.raises(ScopeError, match=r"row 1: path 'ext/o\.jpg' leads outside root"):
        plan_job(str(root), feats, str(tmp_path / "plan"))
    assert (outside / "o.jpg").read_bytes() == b"outside"


def test_linked_folder_inside_root_is_one_object(tmp_path):
    root = tmp_path / "root"
    write(root / "2019" / "p.jpg", b"the only p")
    os.symlink(root / "2019", root / "album")
    feats = str(tmp_path / "f.parquet")
    write_features(feats, [("album/p.jpg", vec(0)), ("2019/p.jpg", vec(0))])
    plan = plan_job(str(root), feats, str(tmp_path / "plan"))
    assert plan["path"].tolist() == ["2019/p.jpg"]
    assert apply_plan(str(tmp_path / "plan"), store=Store(str(root))).counts == {}
    assert (root / "2019" / "p.jpg").read_bytes() == b"the only p"


def test_folder_swapped_for_a_link_after_the_plan_is_not_deleted_through(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    write(root / "a.jpg", b"keeper")
    write(root / "d" / "dup.jpg", b"dup")
    write(outside / "dup.jpg", b"dup")  # same size; a different file outside the root
    feats = str(tmp_path / "f.parquet")
    write_features(feats, [("a.jpg", vec(0)), ("d/dup.jpg", vec(0, 0.1))])
    plan_job(str(root), feats, str(tmp_path / "plan"), keep="first-path")
    st = os.stat(root / "d" / "dup.jpg")
    os.utime(outside / "dup.jpg", ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and time
    shutil.rmtree(root / "d")
    os.symlink(outside, root / "d")
    res = apply_plan(str(tmp_path / "plan"), store=Store(str(root)))
    assert res.counts == {"skipped_changed": 1}
    assert (outside / "dup.jpg").read_bytes() == b"dup"


def test_linked_file_is_never_a_keeper_and_deleting_it_removes_the_link_only(tmp_path):
    root = tmp_path / "root"
    write(root / "real.jpg", b"content")
    os.symlink(root / "real.jpg", root / "a-link.jpg")
    feats = str(tmp_path / "f.parquet")
    write_features(feats, [("a-link.jpg", vec(0)), ("real.jpg", vec(0))])
    plan = plan_job(str(root), feats, str(tmp_path / "plan"), keep="first-path")
    row = plan.set_index("path")
    assert row.loc["real.jpg", "keep"] and not row.loc["a-link.jpg", "keep"]
    res = apply_plan(str(tmp_path / "plan"), store=Store(str(root)))
    assert res.counts == {"deleted": 1}
    assert (
        not os.path.lexists(root / "a-link.jpg") and (root / "real.jpg").read_bytes() == b"content"
    )


# -- 3. objects missing at plan time -----------------------------------------------------------
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_object_missing_at_plan_time_is_never_deleted(backend, tmp_path, request):
    if backend == "s3":
        s3 = request.getfixturevalue("s3")
        fs = request.getfixturevalue("s3fs_client")
        fs.mkdir("bkt")
        root, opts, base = "s3://bkt/r", s3, "bkt/r"
    else:
        fs, root, opts = fsspec.filesystem("file", auto_mkdir=True), str(tmp_path / "root"), None
        base = root
    fs.pipe({f"{base}/k.jpg": b"keeper"})
    feats = str(tmp_path / "f.parquet")
    write_features(feats, [("k.jpg", vec(0)), ("late.jpg", vec(0, 0.1)), ("far.jpg", vec(0, 0.4))])
    plan = plan_job(root, feats, str(tmp_path / "plan"), opts, max_keeper_distance=0.2)
    assert plan["keep"].all()  # nothing seen to delete
    fs.pipe({f"{base}/late.jpg": b"uploaded after the plan", f"{base}/far.jpg": b"too"})
    res = apply_plan(str(tmp_path / "plan"), store=Store(root, opts))
    assert res.counts == {}
    fs.invalidate_cache()
    assert fs.cat_file(f"{base}/late.jpg") == b"uploaded after the plan"


def test_old_plan_rows_without_an_observation_are_left_alone(tmp_path):
    from test_apply import write_plan

    root = tmp_path / "root"
    write(root / "k.jpg", b"k")
    write(root / "d.jpg", b"d")
    write_plan(str(tmp_path / "plan"), {"k.jpg": ["d.jpg"]})  # no sizes, no times
    res = apply_plan(str(tmp_path / "plan"), store=Store(str(root)))
    assert res.counts == {"skipped_unobserved": 1} and not res.ok
    assert (root / "d.jpg").read_bytes() == b"d"


# -- 4 and 5. the trash: scoped per plan, one location per key ---------------------------------
def test_two_plans_sharing_a_trash_keep_both_versions(tmp_path):
    root, trash = tmp_path / "root", str(tmp_path / "trash")
    write(root / "k.jpg", b"keeper")
    write(root / "x.jpg", b"first x")
    feats = str(tmp_path / "f.parquet")
    write_features(feats, [("k.jpg", vec(0)), ("x.jpg", vec(0, 0.1))])
    plan_job(str(root), feats, str(tmp_path / "A"), keep="first-path")
    assert apply_plan(str(tmp_path / "A"), store=Store(str(root)), trash=trash).counts == {
        "trashed": 1
    }
    write(root / "x.jpg", b"second x, longer")
    plan_job(str(root), feats, str(tmp_path / "B"), keep="first-path")
    assert apply_plan(str(tmp_path / "B"), store=Store(str(root)), trash=trash).counts == {
        "trashed": 1
    }
    assert sorted(snapshot(trash).values()) == [b"first x", b"second x, longer"]
    back = restore(str(tmp_path / "A"), store=Store(str(root)), trash=trash)
    assert back.counts == {"restored": 1}
    assert (root / "x.jpg").read_bytes() == b"first x"
    # B's copy is still there; restoring it would overwrite A's object: refused.
    assert restore(str(tmp_path / "B"), store=Store(str(root)), trash=trash).counts == {
        "skipped_exists": 1
    }
    assert (root / "x.jpg").read_bytes() == b"first x"


def test_keys_that_differ_only_by_slashes_never_share_a_trash_file(s3, s3fs_client, tmp_path):
    s3fs_client.mkdir("bkt")
    names = ["k.jpg", "a/b.jpg", "a//b.jpg", "a/b.jpg/c", "x?versionId=1", "d*[1].jpg"]
    for n in names:  # by exact key: s3fs would parse "?versionId=" out of a path
        s3fs_client.call_s3("put_object", Bucket="bkt", Key=f"r/{n}", Body=f"<{n}>".encode())
    feats = str(tmp_path / "f.parquet")
    write_features(feats, [(n, vec(0, 0.01 * i)) for i, n in enumerate(names)])
    out, trash = str(tmp_path / "plan"), str(tmp_path / "trash")
    plan = plan_job("s3://bkt/r", feats, out, s3, keep="first-path", max_keeper_distance="none")
    assert (~plan["keep"]).sum() == len(names) - 1
    res = apply_plan(out, store=Store("s3://bkt/r", s3), trash=trash)
    assert res.counts == {"trashed": len(names) - 1}
    assert len(snapshot(trash)) == len(names) - 1
    back = restore(out, store=Store("s3://bkt/r", s3), trash=trash)
    assert back.counts == {"restored": len(names) - 1}
    for n in names:
        got = s3fs_client.call_s3("get_object", Bucket="bkt", Key=f"r/{n}")
        assert sync(s3fs_client.loop, got["Body"].read) == f"<{n}>".encode()


def _s3_put(client, key: str, body: bytes, how: str) -> None:
    """``key`` in bucket ``bkt`` by PutObject, or by a one-part multipart upload (an ETag
    ``<hex>-1``, no MD5 of the object)."""
    if how == "put":
        client.call_s3("put_object", Bucket="bkt", Key=key, Body=body)
        return
    up = client.call_s3("create_multipart_upload", Bucket="bkt", Key=key)
    part = client.call_s3(
        "upload_part", Bucket="bkt", Key=key, UploadId=up["UploadId"], PartNumber=1, Body=body
    )
    client.call_s3(
        "complete_multipart_upload",
        Bucket="bkt",
        Key=key,
        UploadId=up["UploadId"],
        MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
    )


def _s3_get(client, key: str) -> bytes | None:
    try:
        got = client.call_s3("get_object", Bucket="bkt", Key=key)
    except FileNotFoundError:
        return None
    return sync(client.loop, got["Body"].read)


@pytest.mark.parametrize("how", ["put", "multipart"])
@pytest.mark.parametrize("tamper", [False, True])
@pytest.mark.parametrize("killed", [False, True])
def test_s3_trash_copy_restores_byte_for_byte_or_not_at_all(
    s3, s3fs_client, tmp_path, monkeypatch, how, tamper, killed
):
    """A duplicate moved to an S3 trash in the same bucket (a server-side copy) comes back
    byte for byte, however it was uploaded, also when the apply was killed before its
    journal file; a trash copy changed since (same size) is never put back. A multipart
    object's ETag is no MD5: its copy is read once for the checksum the restore verifies."""
    s3fs_client.mkdir("bkt")
    _s3_put(s3fs_client, "lib/a.jpg", b"keeper bytes AAA", "put")
    _s3_put(s3fs_client, "lib/b.jpg", b"original bytes B", how)
    feats = str(tmp_path / "f.parquet")
    write_features(feats, [("a.jpg", vec(0)), ("b.jpg", vec(0, 0.1))])
    out, store = str(tmp_path / "plan"), Store("s3://bkt/lib", s3)
    plan_job("s3://bkt/lib", feats, out, s3, keep="first-path")
    if killed:
        apply_killed(monkeypatch, 0, out, store, trash="s3://bkt/trash")
        assert _s3_get(s3fs_client, "lib/b.jpg") is None
    else:
        assert apply_plan(out, store=store, trash="s3://bkt/trash").counts == {"trashed": 1}
    (copy,) = s3fs_client.find("bkt/trash")
    if tamper:
        _s3_put(s3fs_client, copy.split("/", 1)[1], b"TAMPERED bytes!!", "put")
    back = restore(out, store=store, trash="s3://bkt/trash")
    if tamper:
        assert back.counts == {"failed": 1}
        assert _s3_get(s3fs_client, "lib/b.jpg") is None
    else:
        assert back.counts == {"restored": 1}
        assert _s3_get(s3fs_client, "lib/b.jpg") == b"original bytes B"
        left = s3fs_client.call_s3("list_objects_v2", Bucket="bkt", Prefix="trash/")
        assert left.get("KeyCount") == 0


@pytest.mark.parametrize("trash", ["s3://bkt/trash", "local"])
def test_s3_restore_never_overwrites_an_object_uploaded_while_it_runs(
    s3, s3fs_client, tmp_path, monkeypatch, trash
):
    """An object uploaded at the original key after restore found the key free, before its
    copy is written: the upload stays, the trash copy is kept (``skipped_exists``)."""
    import dedup_batch.storage.s3 as s3mod

    s3fs_client.mkdir("bkt")
    _s3_put(s3fs_client, "lib/a.jpg", b"keeper", "put")
    _s3_put(s3fs_client, "lib/b.jpg", b"copy of the keeper", "put")
    feats = str(tmp_path / "f.parquet")
    write_features(feats, [("a.jpg", vec(0)), ("b.jpg", vec(0, 0.1))])
    out, store = str(tmp_path / "plan"), Store("s3://bkt/lib", s3)
    trash = trash if trash.startswith("s3://") else str(tmp_path / "trash")
    plan_job("s3://bkt/lib", feats, out, s3, keep="first-path")
    assert apply_plan(out, store=store, trash=trash).counts == {"trashed": 1}

    def racing(real):
        def call(*args, **kwargs):
            if "bkt/lib/b.jpg" in args:  # the user uploads just before the write lands
                _s3_put(s3fs_client, "lib/b.jpg", b"NEW photo from the user", "put")
            return real(*args, **kwargs)

        return call

    for name in ("copy_object", "put_if_absent"):
        monkeypatch.setattr(s3mod, name, racing(getattr(s3mod, name)))
    back = restore(out, store=store, trash=trash)
    assert back.counts == {"skipped_exists": 1}
    assert _s3_get(s3fs_client, "lib/b.jpg") == b"NEW photo from the user"


@pytest.mark.parametrize("stopped", ["killed before its journal", "delete answer lost"])
def test_s3_restore_resume_restore_ends_with_everything_back(
    s3, s3fs_client, tmp_path, monkeypatch, stopped
):
    """An apply to an S3 trash stopped after its delete (killed before its journal, or the
    delete's answer lost: exit 4, "re-run to resume"); restore; the apply resumed as told
    (the restored object is unchanged by ETag, so it is moved again); restore again: the
    object is back at its path, not reported restored from the first restore's journal."""
    from dedup_batch.errors import IncompleteError

    s3fs_client.mkdir("bkt")
    s3fs_client.pipe({"bkt/r/a.jpg": b"bytes of a.jpg", "bkt/r/d.jpg": b"bytes of d.jpg"})
    root, trash, plan = "s3://bkt/r", "s3://bkt/trash", str(tmp_path / "p")
    feats = str(tmp_path / "f.parquet")
    write_features(feats, [("a.jpg", vec(0)), ("d.jpg", vec(0, 0.1))])
    plan_job(root, feats, plan, s3, keep="first-path")
    delete = Store.delete_exact

    def answer_lost(self, paths, **kwargs):
        out = delete(self, paths, **kwargs)
        if paths and all(p.startswith("bkt/r/") for p in paths):
            raise StorageError("DeleteObjects: read timeout")
        return out

    if stopped == "killed before its journal":
        apply_killed(monkeypatch, 0, plan, Store(root, s3), trash=trash)
    else:
        monkeypatch.setattr(Store, "delete_exact", answer_lost)
        with contextlib.suppress(IncompleteError):
            apply_plan(plan, store=Store(root, s3), trash=trash)
        monkeypatch.undo()
    assert _s3_get(s3fs_client, "r/d.jpg") is None
    assert restore(plan, store=Store(root, s3), trash=trash).counts == {"restored": 1}
    assert apply_plan(plan, store=Store(root, s3), trash=trash).counts == {"trashed": 1}
    back = restore(plan, store=Store(root, s3), trash=trash)
    assert back.counts == {"restored": 1}
    assert _s3_get(s3fs_client, "r/d.jpg") == b"bytes of d.jpg"
    assert s3fs_client.call_s3("list_objects_v2", Bucket="bkt", Prefix="trash/")["KeyCount"] == 0


def test_s3_resume_on_another_endpoint_is_refused(s3, s3fs_client, tmp_path, monkeypatch):
    """The journal records the endpoint beside the root: an interrupted apply resumed with
    another ``endpoint_url`` (a mirror of the bucket on a second server: same keys, same
    bytes, same ETags) is refused, and nothing is deleted on the mirror."""
    import subprocess
    import sys

    import s3fs

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        backup = {**s3, "endpoint_url": f"http://127.0.0.1:{port}"}
        mirror = s3fs.S3FileSystem(
            client_kwargs={"endpoint_url": backup["endpoint_url"]},
            key=s3["key"],
            secret=s3["secret"],
            skip_instance_cache=True,
        )
        for _ in range(200):  # the second server starting
            try:
                mirror.mkdir("bkt")
                break
            except Exception:
                time.sleep(0.1)
        bodies = {"a.jpg": b"keeper", "d1.jpg": b"dup one", "d2.jpg": b"dup two"}
        s3fs_client.mkdir("bkt")
        for n, b in bodies.items():
            s3fs_client.pipe(f"bkt/lib/{n}", b)
            mirror.pipe(f"bkt/lib/{n}", b)
        feats = str(tmp_path / "f.parquet")
        write_features(feats, [(n, vec(0, 0.01 * k)) for k, n in enumerate(bodies)])
        out = str(tmp_path / "plan")
        plan_job("s3://bkt/lib", feats, out, s3, keep="first-path")
        apply_killed(monkeypatch, 1, out, Store("s3://bkt/lib", s3), batch_size=1)
        with pytest.raises(SafetyError, match="endpoint"):
            apply_plan(out, store=Store("s3://bkt/lib", backup), batch_size=1)
        mirror.invalidate_cache()
        assert sorted(p.rsplit("/", 1)[-1] for p in mirror.find("bkt/lib")) == sorted(bodies)
        # the plan's own endpoint still resumes
        res = apply_plan(out, store=Store("s3://bkt/lib", s3), batch_size=1)
        assert res.ok, res.counts
    finally:
        server.terminate()
        server.wait(10)


@pytest.mark.parametrize(
    "keys",
    [
        ["a/b.jpg", "a//b.jpg", "a/b.jpg/", "a/./b.jpg", "a/b.jpg/c.jpg", "a/b.jpg~/c.jpg"],
        ["%", "%25", "~", "%7E", ".", "..", "...", "", "x?versionId=2", "x%3FversionId=2"],
    ],
)
def test_trash_key_is_one_to_one_and_tree_safe(keys):
    out = [trash_key(k) for k in keys]
    assert len(set(out)) == len(keys)
    for t in out:  # no component a disk refuses, no file also used as a folder
        assert all(p not in ("", ".", "..") and len(p.encode()) <= 255 for p in t.split("/"))
    files, folders = set(out), {t.rsplit("/", 1)[0] for t in out if "/" in t}
    assert not files & folders


@given(st.lists(st.text(min_size=0, max_size=300), min_size=1, max_size=12, unique=True))
@settings(max_examples=200, deadline=None)
def test_trash_key_property(keys):
    out = [trash_key(k) for k in keys if "\x00" not in k]
    assert len(set(out)) == len(out)
    prefixes = {"/".join(t.split("/")[:i]) for t in out for i in range(1, t.count("/") + 1)}
    assert not set(out) & prefixes  # a trash file is never a folder of another
    for t in out:
        assert all(p not in ("", ".", "..") and len(p.encode()) <= 255 for p in t.split("/"))


def test_restore_refuses_a_trash_copy_that_changed(tmp_path):
    root, trash = tmp_path / "root", tmp_path / "trash"
    write(root / "k.jpg", b"keeper")
    write(root / "x.jpg", b"xxxx")
    feats = str(tmp_path / "f.parquet")
    write_features(feats, [("k.jpg", vec(0)), ("x.jpg", vec(0, 0.1))])
    plan_job(str(root), feats, str(tmp_path / "p"), keep="first-path")
    apply_plan(str(tmp_path / "p"), store=Store(str(root)), trash=str(trash))
    (copy,) = [os.path.join(d, f) for d, _, fs in os.walk(trash) for f in fs]
    write(copy, b"yyyy")  # same size, other bytes
    res = restore(str(tmp_path / "p"), store=Store(str(root)), trash=str(trash))
    assert res.counts == {"failed": 1} and "TrashChanged" in res.outcomes["error_code"].tolist()
    assert not (root / "x.jpg").exists()


# -- 7. names the backend cannot take ----------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "match"),
    [("bad\x00name.jpg", "NUL byte"), ("d/" + "n" * 256 + ".jpg", "component of 260 bytes")],
)
def test_poison_names_are_refused_at_plan_time(tmp_path, name, match):
    root = tmp_path / "root"
    write(root / "k.jpg", b"k")
    feats = str(tmp_path / "f.parquet")
    write_features(feats, [("k.jpg", vec(0)), (name, vec(0, 0.1))])
    with pytest.raises(ScopeError, match=rf"f\.parquet: row 1: .*{match}"):
        plan_job(str(root), feats, str(tmp_path / "plan"))


def test_s3_key_too_long_or_with_control_characters_is_refused(s3, s3fs_client, tmp_path):
    s3fs_client.mkdir("bkt")
    store = Store("s3://bkt/r", s3)
    with pytest.raises(ScopeError, match="more than S3 allows"):
        store.resolve("k" * 1030)
    with pytest.raises(ScopeError, match="control character"):
        store.resolve("a\rb.jpg")
    assert store.resolve("a\tb.jpg") == "bkt/r/a\tb.jpg"


def test_one_failing_object_does_not_stop_the_apply(tmp_path):
    root = tmp_path / "root"
    for n in ("k.jpg", "a.jpg", "locked/b.jpg", "c.jpg"):
        write(root / n, n.encode())
    feats = str(tmp_path / "f.parquet")
    write_features(
        feats,
        [(n, vec(0, 0.01 * i)) for i, n in enumerate(["k.jpg", "a.jpg", "locked/b.jpg", "c.jpg"])],
    )
    plan_job(str(root), feats, str(tmp_path / "p"), keep="first-path", batch_size=1)
    os.chmod(root / "locked", 0o555)
    try:
        res = apply_plan(str(tmp_path / "p"), store=Store(str(root)), batch_size=1)
    finally:
        os.chmod(root / "locked", 0o755)
    if os.geteuid() == 0:  # root may delete anyway: then everything is deleted
        assert res.counts == {"deleted": 3}
    else:
        assert res.counts == {"deleted": 2, "failed": 1}


# -- 8. resume in another root -----------------------------------------------------------------
def test_resume_against_another_root_is_refused(tmp_path):
    root, backup = tmp_path / "root", tmp_path / "backup"
    for n in ("k.jpg", "a.jpg", "b.jpg"):
        write(root / n, n.encode())
    shutil.copytree(root, backup, copy_function=shutil.copy2)
    feats = str(tmp_path / "f.parquet")
    write_features(feats, [("k.jpg", vec(0)), ("a.jpg", vec(0, 0.1)), ("b.jpg", vec(0, 0.2))])
    plan_job(str(root), feats, str(tmp_path / "p"), keep="first-path")
    apply_plan(str(tmp_path / "p"), store=Store(str(root)), max_delete=5, batch_size=1)
    # Pretend it was interrupted: drop one batch from the journal, then point at the backup.
    journal = tmp_path / "p" / "journal"
    os.remove(sorted(journal.glob("batch-*.json"))[-1])
    with pytest.raises(SafetyError, match="was written for root"):
        apply_plan(str(tmp_path / "p"), store=Store(str(backup)), batch_size=1)
    assert snapshot(str(backup)) == {"k.jpg": b"k.jpg", "a.jpg": b"a.jpg", "b.jpg": b"b.jpg"}


@pytest.mark.parametrize("how", ["root is now a link", "a parent is now a link", "link retargeted"])
def test_resume_where_the_root_now_resolves_elsewhere_is_refused(tmp_path, how):
    """The journal's root is compared as the root resolves now, not as it is spelled: the
    same spelling leading to a backup copy since the apply began is another root."""
    real = tmp_path / "disk" / "root"
    for n in ("k.jpg", "a.jpg", "b.jpg"):
        write(real / n, n.encode())
    backup = tmp_path / "backup" / "root"
    shutil.copytree(real, backup, copy_function=shutil.copy2)  # same sizes and mtimes
    spelled = tmp_path / "via" if how == "link retargeted" else real
    if how == "link retargeted":
        os.symlink(real, spelled)
    feats = str(tmp_path / "f.parquet")
    write_features(feats, [("k.jpg", vec(0)), ("a.jpg", vec(0, 0.1)), ("b.jpg", vec(0, 0.2))])
    plan_job(str(spelled), feats, str(tmp_path / "p"), keep="first-path")
    apply_plan(str(tmp_path / "p"), store=Store(str(spelled)), batch_size=1)
    os.remove(sorted((tmp_path / "p" / "journal").glob("batch-*.json"))[-1])  # interrupted
    if how == "root is now a link":
        os.rename(real, tmp_path / "disk" / "old")
        os.symlink(backup, real)
    elif how == "a parent is now a link":
        os.rename(tmp_path / "disk", tmp_path / "old-disk")
        os.symlink(tmp_path / "backup", tmp_path / "disk")
    else:
        os.remove(spelled)
        os.symlink(backup, spelled)
    for op in (apply_plan, restore):
        kw = {"trash": str(tmp_path / "t")} if op is restore else {"batch_size": 1}
        with pytest.raises((SafetyError, ConfigError)):
            op(str(tmp_path / "p"), store=Store(str(spelled)), **kw)
    assert snapshot(str(backup)) == {"k.jpg": b"k.jpg", "a.jpg": b"a.jpg", "b.jpg": b"b.jpg"}


def _trash_files(trash: str) -> list[str]:
    return sorted(f for _, _, fs in os.walk(trash) for f in fs)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    n_dups=st.integers(1, 4),
    batch=st.integers(1, 2),
    killed_after=st.integers(0, 3),
    lost_answer=st.booleans(),
    then=st.sampled_from(["nothing", "keeper removed", "path reused", "copy tampered"]),
    resume=st.booleans(),
)
def test_trashed_objects_always_come_back_or_are_reported(
    monkeypatch, n_dups, batch, killed_after, lost_answer, then, resume
):
    """An apply to a trash stopped after ``killed_after`` journaled batches (killed before
    its next journal file, or a delete whose answer is lost), then a change (the keeper
    removed, a duplicate's path reused by a new file, a trash copy altered at the same size),
    then maybe a resumed apply, then ``restore``. Whatever the order: every duplicate's bytes
    are back at its path or still in the trash with restore saying so (``skipped_exists``,
    ``failed``); a new file at a reused path is never overwritten; an altered copy is never
    put back; nothing left the root without a copy."""
    from dedup_batch.errors import IncompleteError

    with tempfile.TemporaryDirectory() as tmp:
        root, trash, plan = (os.path.join(tmp, n) for n in ("root", "trash", "p"))
        names = ["a.jpg"] + [f"d{k}.jpg" for k in range(n_dups)]
        for n in names:
            write(os.path.join(root, n), f"bytes of {n}".encode())
        before = snapshot(root)
        feats = os.path.join(tmp, "f.parquet")
        write_features(feats, [(n, vec(0, 0.01 * k)) for k, n in enumerate(names)])
        plan_job(root, feats, plan, keep="first-path")
        delete = Store.delete_exact

        def answer_lost(self, paths, **kwargs):
            out = delete(self, paths, **kwargs)
            if paths and self.root_path == os.path.realpath(root):
                raise StorageError("DeleteObjects: read timeout")
            return out

        if lost_answer:
            monkeypatch.setattr(Store, "delete_exact", answer_lost)
            with contextlib.suppress(IncompleteError, StorageError):  # one batch in flight
                apply_plan(plan, store=Store(root), trash=trash, batch_size=batch, concurrency=1)
            monkeypatch.setattr(Store, "delete_exact", delete)
        else:
            apply_killed(
                monkeypatch, killed_after, plan, Store(root), trash=trash, batch_size=batch
            )
        gone = sorted(set(before) - set(snapshot(root)))
        assert set(gone) <= set(_trash_files(trash))  # nothing left its path without a copy
        new = {}
        if then == "keeper removed":
            os.remove(os.path.join(root, "a.jpg"))
            before.pop("a.jpg")
        elif then == "path reused" and gone:
            new[gone[0]] = b"a new photo saved at that name"
            write(os.path.join(root, gone[0]), new[gone[0]])
        elif then == "copy tampered" and gone:
            (copy,) = [
                os.path.join(d, f) for d, _, fs in os.walk(trash) for f in fs if f == gone[0]
            ]
            with open(copy, "r+b") as f:
                f.write(b"X")
        if resume:
            with contextlib.suppress(IncompleteError):
                apply_plan(plan, store=Store(root), trash=trash, batch_size=batch)
        back = restore(plan, store=Store(root), trash=trash)
        after = snapshot(root)
        for name, data in new.items():
            assert after[name] == data  # never overwritten
        for name, data in before.items():
            if after.get(name) == data or name in new:
                continue
            # not back: then restore says so, and it was an altered copy, or not yet moved
            assert not back.ok, (name, back.counts)
            assert then == "copy tampered" and name == gone[0], (name, back.counts)
        for name in new:  # the original of a reused path is still in the trash
            assert name in _trash_files(trash), back.counts


def test_resume_with_a_relative_trash_from_another_folder_is_refused(tmp_path, monkeypatch):
    """A relative ``--trash`` is journaled where it resolves: resumed (or restored) from
    another working folder it names another trash, and is refused."""

    root = tmp_path / "root"
    for n in ("a.jpg", "d1.jpg", "d2.jpg"):
        write(root / n, n.encode())
    feats = str(tmp_path / "f.parquet")
    write_features(feats, [("a.jpg", vec(0)), ("d1.jpg", vec(0, 0.1)), ("d2.jpg", vec(0, 0.2))])
    plan, store = str(tmp_path / "p"), Store(str(root))
    plan_job(str(root), feats, plan, keep="first-path")
    for cwd in ("one", "two"):
        os.makedirs(tmp_path / cwd)
    monkeypatch.chdir(tmp_path / "one")
    apply_killed(monkeypatch, 1, plan, store, trash="trash", batch_size=1)
    monkeypatch.chdir(tmp_path / "two")
    with pytest.raises(SafetyError, match="same trash setting"):
        apply_plan(plan, store=store, trash="trash", batch_size=1)
    with pytest.raises(ConfigError, match="pass that trash URL"):
        restore(plan, store=store, trash="trash")
    monkeypatch.chdir(tmp_path / "one")
    assert restore(plan, store=store, trash="trash").counts == {"restored": 2}
    assert snapshot(str(root)) == {n: n.encode() for n in ("a.jpg", "d1.jpg", "d2.jpg")}


def test_memory_restore_never_overwrites_an_object_written_while_it_runs(monkeypatch):
    """memory:// (any fsspec backend with exclusive create): an object written at the path
    after restore found it free, before its copy lands, is kept (``skipped_exists``)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    base = f"/restore-race-{time.monotonic_ns()}"
    fs.pipe({f"{base}/root/a.jpg": b"keeper", f"{base}/root/b.jpg": b"copy of the keeper"})
    feats = f"memory://{base}/f.parquet"
    write_features(feats, [("a.jpg", vec(0)), ("b.jpg", vec(0, 0.1))])
    out, root, trash = f"memory://{base}/plan", f"memory://{base}/root", f"memory://{base}/t"
    plan_job(root, feats, out, keep="first-path")
    store = Store(root)
    assert apply_plan(out, store=store, trash=trash).counts == {"trashed": 1}
    real, reads = Store.open_exact, []

    def racing(self, full):
        if full.startswith(f"{base}/t/"):
            reads.append(full)
            if len(reads) == 2:  # the copy back, after restore checked the path is free
                fs.pipe_file(f"{base}/root/b.jpg", b"NEW photo from the user")
        return real(self, full)

    monkeypatch.setattr(Store, "open_exact", racing)
    back = restore(out, store=store, trash=trash)
    assert back.counts == {"skipped_exists": 1}
    assert fs.cat_file(f"{base}/root/b.jpg") == b"NEW photo from the user"


@pytest.mark.parametrize("missing", [0, 3, 30])
def test_delete_fraction_is_of_the_images_that_exist(tmp_path, missing):
    """``--max-delete-fraction`` weighs what would go against the images there are: feature
    rows with no object (``exists = false``) do not dilute it."""
    root = tmp_path / "root"
    for n in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        write(root / n, n.encode())
    rows = [("a.jpg", vec(0)), ("b.jpg", vec(0, 0.1)), ("c.jpg", vec(0, 0.2)), ("d.jpg", vec(1))]
    rows += [(f"gone-{k}.jpg", vec(2 + k)) for k in range(missing)]
    feats = str(tmp_path / "f.parquet")
    write_features(feats, rows)
    plan = plan_job(str(root), feats, str(tmp_path / "p"), keep="first-path")
    assert int((~plan["keep"]).sum()) == 2 and int((~plan["exists"]).sum()) == missing
    with pytest.raises(SafetyError, match="deletes 2 of 4 objects"):
        apply_plan(str(tmp_path / "p"), store=Store(str(root)), max_delete_fraction=0.4)
    assert snapshot(str(root)) == {n: n.encode() for n in ("a.jpg", "b.jpg", "c.jpg", "d.jpg")}


# -- 9. a keeper replaced since the plan -------------------------------------------------------
@pytest.mark.parametrize("how", ["other size", "same size"])
def test_changed_keeper_skips_its_cluster(tmp_path, how):
    root = tmp_path / "root"
    write(root / "a-keeper.jpg", b"keeper")
    write(root / "d.jpg", b"dup")
    feats = str(tmp_path / "f.parquet")
    write_features(feats, [("a-keeper.jpg", vec(0)), ("d.jpg", vec(0, 0.1))])
    plan_job(str(root), feats, str(tmp_path / "p"), keep="first-path")
    time.sleep(0.01)
    write(root / "a-keeper.jpg", b"a different image" if how == "other size" else b"KEEPER")
    res = apply_plan(str(tmp_path / "p"), store=Store(str(root)))
    assert res.counts == {"skipped_keeper_changed": 1}
    assert (root / "d.jpg").read_bytes() == b"dup"


# -- 10. writing a plan deletes nothing of the user's ------------------------------------------
_USER_NAME = st.text(
    st.characters(codec="utf-8", exclude_characters="/\\\x00"), min_size=1, max_size=40
).filter(lambda n: n not in (".", "..") and len(n.encode()) <= 200)


@settings(
    max_examples=25,
    deadline=None,
    # PART_ROWS is set for each plan written, so the fixture's state between inputs is moot
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    names=st.lists(_USER_NAME, min_size=1, max_size=6, unique=True),
    layouts=st.lists(st.sampled_from(["file", "dataset"]), min_size=1, max_size=3),
    out_is_root=st.booleans(),
)
def test_writing_plans_deletes_nothing_of_the_users(monkeypatch, names, layouts, out_is_root):
    """A plan (a dry run) replaces only what a plan writes (``plan.parquet``, or ``plan/`` with
    ``_parts.json`` and ``part-NNNNN.parquet``): files of the user's in ``--out`` and in a
    folder of theirs called ``plan`` (an ``--out`` that is the image folder itself) stay,
    byte for byte, through plans written one over another in either layout."""
    reserved = {"plan", "plan.parquet", "summary.json", "job.yaml", "report.html", "journal"}
    names = [n for n in names if n not in reserved and not plandir.PART_NAME.fullmatch(n)]
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "photos")
        write(os.path.join(root, "a.jpg"), b"A")
        write(os.path.join(root, "b.jpg"), b"A copy")
        out = root if out_is_root else os.path.join(tmp, "work")
        mine = {}
        for k, n in enumerate(names):
            for folder in ("plan", "plan/sub") if k % 2 else ("plan", "."):
                path = os.path.normpath(os.path.join(out, folder, n))
                mine[path] = f"the user's own {n!r}".encode()
                write(path, mine[path])
        feats = os.path.join(tmp, "f.parquet")
        write_features(feats, [("a.jpg", vec(0)), ("b.jpg", vec(0, 0.1)), ("c.jpg", vec(1))])
        for layout in layouts:  # dataset: one row a part
            monkeypatch.setattr(plandir, "PART_ROWS", 1 if layout == "dataset" else 10**6)
            plan = plan_job(root, feats, out)
            assert PlanDir(out).plan_layout() == layout
            assert len(PlanDir(out).read_plan()) == len(plan) == 3
        for path, data in mine.items():
            with open(path, "rb") as f:
                assert f.read() == data, path


# -- timeouts ----------------------------------------------------------------------------------
@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """An HTTP endpoint on 127.0.0.1 that accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join()
    for c in held:
        c.close()
    srv.close()


def test_a_hung_endpoint_fails_in_bounded_time(silent_endpoint, tmp_path):
    from test_apply import write_plan

    opts = {
        "endpoint_url": silent_endpoint,
        "key": "k",
        "secret": "s",
        "config_kwargs": {"read_timeout": 1, "connect_timeout": 1},
    }
    write_plan(str(tmp_path / "plan"), {"k.jpg": ["d.jpg"]})
    df = pd.read_parquet(tmp_path / "plan" / "plan.parquet")
    df["size"], df["etag"], df["exists"] = pd.array([1, 1], dtype="Int64"), '"e"', True
    df.to_parquet(tmp_path / "plan" / "plan.parquet")
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="nothing was deleted"):
        apply_plan(str(tmp_path / "plan"), store=Store("s3://bkt/r", opts))
    assert time.monotonic() - t0 < 20  # 2 s3fs x 2 botocore attempts of 1 s, plus backoff


def test_s3_calls_get_bounded_timeouts_by_default():
    # 2 s3fs attempts x 2 botocore attempts x (5 s connect or 12 s read): under a minute.
    store = Store("s3://bkt/r", {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"})
    assert store.fs.retries == 2
    config = store.fs.config_kwargs
    assert config["read_timeout"] == 12 and config["connect_timeout"] == 5
    assert config["retries"] == {"total_max_attempts": 2, "mode": "standard"}
    # The job's own settings win.
    mine = Store("s3://bkt/r", {"config_kwargs": {"read_timeout": 300}, "key": "k", "secret": "s"})
    assert mine.fs.config_kwargs["read_timeout"] == 300


# -- the invariants, on generated collections --------------------------------------------------
NAMES = st.text(alphabet=st.sampled_from(list("ab x[]*?é-_.()")), min_size=1, max_size=6).filter(
    lambda s: s not in (".", "..") and not s.startswith(" ")
)


@st.composite
def collections(draw):
    """Objects in groups of near-duplicates, the rows the features list for them (with alias
    spellings, linked folders and rows for missing objects), and what happens between the plan
    and the apply."""
    n_groups = draw(st.integers(1, 3))
    objects: dict[str, tuple[int, bytes]] = {}
    for g in range(n_groups):
        for i in range(draw(st.integers(1, 4))):
            folder = draw(st.sampled_from(["", "f/", "f/g/", "h/"]))
            name = f"{folder}{draw(NAMES)}{g}{i}.jpg"
            objects[name] = (g, f"<{name}>".encode() * draw(st.integers(1, 3)))
    rows = []
    for j, (name, (g, _)) in enumerate(sorted(objects.items())):
        rows.append((name, vec(g, 0.05 * (j % 5))))
        alias = draw(st.sampled_from([None, "//", "./", "/.", "link", "trail"]))
        if alias == "//" and "/" in name:
            rows.append((name.replace("/", "//", 1), vec(g, 0.05 * (j % 5))))
        elif alias == "./":
            rows.append(("./" + name, vec(g, 0.05 * (j % 5))))
        elif alias == "/." and "/" in name:
            rows.append((name.replace("/", "/./", 1), vec(g, 0.05 * (j % 5))))
        elif alias == "link" and name.startswith("f/"):
            rows.append(("linked/" + name[2:], vec(g, 0.05 * (j % 5))))
        elif alias == "trail":
            rows.append((name + "/", vec(g, 0.05 * (j % 5))))
    missing = [f"gone{k}.jpg" for k in range(draw(st.integers(0, 2)))]
    rows += [(m, vec(draw(st.integers(0, n_groups - 1)), 0.1)) for m in missing]
    names = sorted(objects)
    change = draw(st.lists(st.sampled_from(names), max_size=3, unique=True))
    remove = draw(st.lists(st.sampled_from(names), max_size=2, unique=True))
    create = draw(st.lists(st.sampled_from(missing), unique=True)) if missing else []
    trash = draw(st.booleans())
    return objects, rows, change, remove, create, trash


#: Each property runs on both plan layouts: one plan.parquet, and a dataset of parts of about
#: two rows (whole clusters each), so that apply, resume and restore work part by part.
LAYOUTS = pytest.mark.parametrize("part_rows", [None, 2], ids=["one-file", "dataset"])


def use_layout(monkeypatch, part_rows) -> None:
    if part_rows is not None:
        monkeypatch.setattr(plandir, "PART_ROWS", part_rows)


def check_layout(out: str, plan: pd.DataFrame, part_rows, options=None) -> None:
    dataset = part_rows is not None and len(plan) > part_rows
    assert PlanDir(out, options).plan_layout() == ("dataset" if dataset else "file")


@LAYOUTS
@given(collections())
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_invariants_local(monkeypatch, part_rows, case):
    use_layout(monkeypatch, part_rows)
    objects, rows, change, remove, create, use_trash = case
    tmp = tempfile.mkdtemp()
    try:
        root, outside = os.path.join(tmp, "root"), os.path.join(tmp, "outside")
        for name, (_, body) in objects.items():
            write(os.path.join(root, name), body)
        write(os.path.join(outside, "o.jpg"), b"outside")
        os.makedirs(os.path.join(root, "f"), exist_ok=True)
        os.symlink(os.path.join(root, "f"), os.path.join(root, "linked"))
        feats = os.path.join(tmp, "f.parquet")
        write_features(feats, rows)
        out = os.path.join(tmp, "plan")
        plan = plan_job(root, feats, out, max_keeper_distance="none")
        check_layout(out, plan, part_rows)
        at_plan = snapshot(root)
        keepers = set(plan.loc[plan["keep"], "path"])
        # Between plan and apply: objects change, disappear, appear.
        time.sleep(0.01)
        for name in change:
            write(os.path.join(root, name), b"changed " + objects[name][1])
        for name in remove:
            if os.path.exists(os.path.join(root, name)):
                os.remove(os.path.join(root, name))
        for name in create:
            write(os.path.join(root, name), b"new object")
        before = snapshot(root)
        trash = os.path.join(tmp, "trash") if use_trash else None
        res = apply_plan(out, store=Store(root), trash=trash)
        after = snapshot(root)
        gone = set(before) - set(after)
        assert not keepers & gone, "a keeper was deleted"
        assert all(after[k] == before[k] for k in keepers if k in after), "a keeper changed"
        assert snapshot(outside) == {"o.jpg": b"outside"}
        for name in gone:  # only what the plan saw, unchanged since
            assert name in at_plan and at_plan[name] == before[name], name
        assert set(after) <= set(before)
        assert res.counts.get("deleted", 0) + res.counts.get("trashed", 0) == len(gone)
        if use_trash and gone:
            back = restore(out, store=Store(root), trash=trash)
            assert back.counts.get("restored", 0) == len(gone)
            assert snapshot(root) == before  # byte for byte
    finally:
        shutil.rmtree(tmp)


@LAYOUTS
@given(collections())
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
def test_invariants_memory(monkeypatch, part_rows, case):
    use_layout(monkeypatch, part_rows)
    objects, rows, change, remove, create, use_trash = case
    rows = [(p, v) for p, v in rows if not p.startswith("linked/")]
    fs = fsspec.filesystem("memory")
    base = f"/inv-{time.monotonic_ns()}"
    try:
        fs.pipe({f"{base}/root/{n}": body for n, (_, body) in objects.items()})
        feats = f"memory://{base}/f.parquet"
        write_features(feats, rows)
        out = f"memory://{base}/plan"
        plan = plan_job(f"memory://{base}/root", feats, out, max_keeper_distance="none")
        check_layout(out, plan, part_rows)
        keepers = {f"{base}/root/{p}" for p in plan.loc[plan["keep"], "path"]}

        def snap() -> dict[str, bytes]:
            return {p: fs.cat_file(p) for p in fs.find(f"{base}/root")}

        at_plan = snap()
        for name in change:
            fs.pipe_file(f"{base}/root/{name}", b"changed " + objects[name][1])
        for name in remove:
            fs.rm_file(f"{base}/root/{name}")
        for name in create:
            fs.pipe_file(f"{base}/root/{name}", b"new object")
        before = snap()
        trash = f"memory://{base}/trash" if use_trash else None
        store = Store(f"memory://{base}/root")
        apply_plan(out, store=store, trash=trash)
        after = snap()
        gone = set(before) - set(after)
        assert not keepers & gone
        for name in gone:
            assert name in at_plan and at_plan[name] == before[name], name
        if use_trash and gone:
            restore(out, store=store, trash=trash)
            assert snap() == before
    finally:
        fs.rm(base, recursive=True)


def test_manifest_records_the_canonical_root(tmp_path):
    root = tmp_path / "root"
    for n in ("k.jpg", "a.jpg"):
        write(root / n, n.encode())
    os.symlink(root, tmp_path / "via-link")
    feats = str(tmp_path / "f.parquet")
    write_features(feats, [("k.jpg", vec(0)), ("a.jpg", vec(0, 0.1))])
    plan_job(str(tmp_path / "via-link"), feats, str(tmp_path / "p"), keep="first-path")
    res = apply_plan(str(tmp_path / "p"), store=Store(str(tmp_path / "via-link")))
    assert res.counts == {"deleted": 1}
    manifest = json.loads((tmp_path / "p" / "journal" / "manifest.json").read_text())
    assert manifest["root"] == str(root)


S3_KEYS = st.lists(
    st.tuples(
        st.sampled_from(["", "a/", "a//", "a/b.jpg/", "x y/", "é/"]),
        st.text(alphabet=st.sampled_from(list("ab[]*?. %~")), min_size=1, max_size=5),
    ).map(lambda t: t[0] + t[1]),
    min_size=2,
    max_size=7,
    unique=True,
    # '..' is refused at plan time (tested above), '.' folds on some backends: not generated
).filter(
    lambda ks: all(
        not k.endswith("/") and all(p not in (".", "..") for p in k.split("/")) for k in ks
    )
)


@LAYOUTS
@given(keys=S3_KEYS, data=st.data())
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
def test_invariants_s3_with_a_trash_shared_by_two_plans(
    monkeypatch, part_rows, s3_server, keys, data
):
    """Two plans over one bucket share a local trash; objects change, appear and vanish
    between plan and apply. No keeper or unseen object is deleted, and both plans' trashed
    objects restore byte for byte."""
    use_layout(monkeypatch, part_rows)
    import requests
    import s3fs

    requests.post(f"{s3_server}/moto-api/reset", timeout=10)
    s3fs.S3FileSystem.clear_instance_cache()
    opts = {"endpoint_url": s3_server, "key": "k", "secret": "s"}
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, key="k", secret="s")
    fs.mkdir("bkt")

    def put(key: str, body: bytes) -> None:
        fs.call_s3("put_object", Bucket="bkt", Key=f"r/{key}", Body=body)

    def listing() -> dict[str, bytes]:
        out = {}
        for c in fs.call_s3("list_objects_v2", Bucket="bkt").get("Contents", []):
            got = fs.call_s3("get_object", Bucket="bkt", Key=c["Key"])
            out[c["Key"][2:]] = sync(fs.loop, got["Body"].read)
        return out

    tmp = tempfile.mkdtemp()
    try:
        present = data.draw(st.lists(st.sampled_from(keys), min_size=1, unique=True))
        for k in present:
            put(k, f"<{k}>".encode())
        feats = os.path.join(tmp, "f.parquet")
        write_features(feats, [(k, vec(0, 0.01 * i)) for i, k in enumerate(keys)])
        trash = os.path.join(tmp, "trash")
        taken: dict[str, bytes] = {}
        for run in ("A", "B"):
            out = os.path.join(tmp, run)
            plan = plan_job("s3://bkt/r", feats, out, opts, max_keeper_distance="none")
            check_layout(out, plan, part_rows)
            keepers = set(plan.loc[plan["keep"], "path"])
            at_plan = listing()
            for k in data.draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
                put(k, f"new {run} <{k}>".encode())  # changed, or appeared after the plan
            before = listing()
            apply_plan(out, store=Store("s3://bkt/r", opts), trash=trash)
            after = listing()
            gone = set(before) - set(after)
            assert not gone & keepers
            for k in gone:
                assert at_plan.get(k) == before[k], k  # seen, unchanged
                taken[f"{run}:{k}"] = before[k]
        # Every trashed version is in the trash, under its own name.
        assert sorted(snapshot(trash).values()) == sorted(taken.values())
        for run in ("B", "A"):
            out = os.path.join(tmp, run)
            if any(t.startswith(run + ":") for t in taken):
                restore(out, store=Store("s3://bkt/r", opts), trash=trash)
        now = listing()
        for t, body in taken.items():
            k = t.split(":", 1)[1]
            # Restored byte for byte, unless a later version was put back first (then the
            # copy stays in the trash, never overwriting).
            assert now.get(k) == body or body in snapshot(trash).values(), t
    finally:
        shutil.rmtree(tmp)
