"""apply_plan / restore against a real S3 server (moto, loopback) and real Dask clusters."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from test_apply import TRICKY, in_trash, read_report, tricky_names, write_plan

import dedup_batch.storage as storage_mod
from dedup_batch.apply import apply_plan, restore
from dedup_batch.errors import SafetyError, StorageError
from dedup_batch.storage import Store

pytestmark = pytest.mark.s3

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def keys(s3fs_client, bucket: str, prefix: str = "lib/") -> set[str]:
    s3fs_client.invalidate_cache()
    found = s3fs_client.find(f"{bucket}/{prefix}")
    return {p[len(bucket) + 1 + len(prefix) :] for p in found}


def put(s3fs_client, bucket: str, names, prefix: str = "lib/") -> None:
    s3fs_client.pipe({f"{bucket}/{prefix}{n}": n.encode() for n in names})


@pytest.fixture
def tricky_bucket(s3, s3fs_client):
    """Bucket ``photos`` with the tricky names under ``lib/``; the Store for it."""
    s3fs_client.mkdir("photos")
    keepers, dups, decoys = tricky_names()
    put(s3fs_client, "photos", keepers + dups + decoys)
    return Store("s3://photos/lib", s3)


def test_s3_on_dask_deletes_exactly_the_duplicates(tricky_bucket, s3, s3fs_client, dask_client):
    store = tricky_bucket
    keepers, dups, decoys = tricky_names()
    s3fs_client.mkdir("plans")
    plan_dir = "s3://plans/run1"  # the journal and report live on S3 too (single PUTs)
    write_plan(plan_dir, {k: v[0] for k, v in TRICKY.items()}, store=store, storage_options=s3)
    res = apply_plan(plan_dir, store=store, client=dask_client, batch_size=2, concurrency=3)
    assert res.ok, res.to_dict()
    assert res.counts == {"deleted": len(dups)}
    assert res.guard == "conditional+compare-then-delete"
    assert keys(s3fs_client, "photos") == set(keepers + decoys)
    report = s3fs_client.cat_file("plans/run1/completion-report.csv").decode()
    rows = list(csv.DictReader(io.StringIO(report)))
    assert sorted(r["path"] for r in rows) == sorted(dups)
    again = apply_plan(plan_dir, store=store, client=dask_client, batch_size=2)
    assert again.ok and again.batches_run == 0 and again.counts == res.counts


def test_s3_keeper_missing_and_changed_are_skipped(s3, s3fs_client, tmp_path):
    s3fs_client.mkdir("photos")
    put(s3fs_client, "photos", ["k1.jpg", "k1-d.jpg", "k2.jpg", "k2-d.jpg", "k2-e.jpg", "k3.jpg"])
    s3fs_client.pipe({"photos/lib/zz/k3-far.jpg": b"isolated key: read with one HEAD"})
    store = Store("s3://photos/lib", s3)
    plan_dir = str(tmp_path / "plan")
    write_plan(
        plan_dir,
        {"k1.jpg": ["k1-d.jpg"], "k2.jpg": ["k2-d.jpg", "k2-e.jpg"], "k3.jpg": ["zz/k3-far.jpg"]},
        store=store,
    )
    s3fs_client.rm_file("photos/lib/k1.jpg")
    # Overwritten after the plan with a body of the same size: only the ETag tells.
    s3fs_client.pipe({"photos/lib/k2-e.jpg": b"K2-E.JPG"})
    res = apply_plan(plan_dir, store=store)
    assert res.counts == {"skipped_keeper_missing": 1, "skipped_changed": 1, "deleted": 2}
    assert not res.ok
    assert keys(s3fs_client, "photos") == {"k1-d.jpg", "k2.jpg", "k2-e.jpg", "k3.jpg"}
    rows = {r["path"]: r for r in read_report(os.path.join(plan_dir, "completion-report.csv"))}
    assert rows["k2-e.jpg"]["status"] == "skipped_changed"
    assert "ETag" in rows["k2-e.jpg"]["message"]


def test_versioned_bucket_gets_delete_markers(s3, s3fs_client, tmp_path):
    s3fs_client.mkdir("vers")
    s3fs_client.call_s3(
        "put_bucket_versioning", Bucket="vers", VersioningConfiguration={"Status": "Enabled"}
    )
    put(s3fs_client, "vers", ["k.jpg", "d[1].jpg", "d1.jpg"])
    store = Store("s3://vers/lib", s3)
    plan_dir = str(tmp_path / "plan")
    write_plan(plan_dir, {"k.jpg": ["d[1].jpg"]}, store=store)
    assert apply_plan(plan_dir, store=store).counts == {"deleted": 1}
    v = s3fs_client.call_s3("list_object_versions", Bucket="vers", Prefix="lib/")
    assert [m["Key"] for m in v.get("DeleteMarkers", [])] == ["lib/d[1].jpg"]
    kept = {x["Key"] for x in v["Versions"]}
    assert kept == {"lib/k.jpg", "lib/d[1].jpg", "lib/d1.jpg"}  # old version recoverable


def test_legal_hold_gets_a_delete_marker_not_an_error(s3, s3fs_client, tmp_path):
    # FIELD_NOTES says a legal hold makes DeleteObjects answer AccessDenied per key. That holds
    # only for a version-specific delete; apply never sends a VersionId, so S3 (and moto 5.2)
    # adds a delete marker and the held version stays. Checked here; per-key AccessDenied is
    # produced with a bucket policy in the next test.
    s3fs_client.call_s3("create_bucket", Bucket="locked", ObjectLockEnabledForBucket=True)
    put(s3fs_client, "locked", ["k.jpg", "held.jpg"])
    s3fs_client.call_s3(
        "put_object_legal_hold", Bucket="locked", Key="lib/held.jpg", LegalHold={"Status": "ON"}
    )
    store = Store("s3://locked/lib", s3)
    plan_dir = str(tmp_path / "plan")
    write_plan(plan_dir, {"k.jpg": ["held.jpg"]}, store=store)
    res = apply_plan(plan_dir, store=store)
    assert res.counts == {"deleted": 1}
    v = s3fs_client.call_s3("list_object_versions", Bucket="locked", Prefix="lib/held")
    assert [m["Key"] for m in v["DeleteMarkers"]] == ["lib/held.jpg"]
    assert [x["Key"] for x in v["Versions"]] == ["lib/held.jpg"]


def _deny_delete(s3fs_client, bucket: str, keys_denied) -> None:
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:DeleteObject",
                "Resource": [f"arn:aws:s3:::{bucket}/{k}" for k in keys_denied],
            }
        ],
    }
    s3fs_client.call_s3("put_bucket_policy", Bucket=bucket, Policy=json.dumps(policy))


def test_per_key_access_denied_is_reported(s3, s3fs_client, tmp_path):
    s3fs_client.mkdir("photos")
    names = ["k.jpg", "d1.jpg", "d2.jpg", "d3.jpg"]
    put(s3fs_client, "photos", names)
    _deny_delete(s3fs_client, "photos", ["lib/d2.jpg"])
    store = Store("s3://photos/lib", s3)
    plan_dir = str(tmp_path / "plan")
    write_plan(plan_dir, {"k.jpg": ["d1.jpg", "d2.jpg", "d3.jpg"]}, store=store)
    res = apply_plan(plan_dir, store=store)
    assert not res.ok and res.not_done == 1  # the CLI's exit 4
    assert res.counts == {"deleted": 2, "failed": 1}
    assert keys(s3fs_client, "photos") == {"k.jpg", "d2.jpg"}
    rows = {r["path"]: r for r in read_report(os.path.join(plan_dir, "completion-report.csv"))}
    assert rows["d2.jpg"]["status"] == "failed"
    assert rows["d2.jpg"]["error_code"] == "AccessDenied"
    assert res.to_dict()["examples_not_done"][0]["path"] == "d2.jpg"
    # A re-run tries the failed key again (the policy may have been fixed) and nothing else.
    s3fs_client.call_s3("delete_bucket_policy", Bucket="photos")
    again = apply_plan(plan_dir, store=store)
    assert again.ok and again.counts == {"deleted": 3}
    assert keys(s3fs_client, "photos") == {"k.jpg"}


class FlakyDeletes:
    """botocore event hooks on a live s3fs client: the first ``times`` requests that carry a
    flaky key answer it with ``code`` inside a 200 DeleteObjects response, without deleting it
    (the key is taken out of the request before it is sent)."""

    def __init__(self, fs, flaky: dict[str, int], code: str = "SlowDown") -> None:
        self.left = dict(flaky)
        self.code = code
        self.injected = 0
        fs.connect()
        events = fs.s3.meta.events
        events.register("before-parameter-build.s3.DeleteObjects", self.before)
        events.register("after-call.s3.DeleteObjects", self.after)

    def before(self, params, context, **kwargs):
        objs, hit = [], []
        for o in params["Delete"]["Objects"]:
            if self.left.get(o["Key"], 0) > 0:
                self.left[o["Key"]] -= 1
                hit.append(o["Key"])
            else:
                objs.append(o)
        if hit and not objs:  # an empty request is invalid: keep a harmless missing key
            objs.append({"Key": "lib/__never_there__"})
        params["Delete"]["Objects"] = objs
        context["flaky_hit"] = hit

    def after(self, parsed, context, **kwargs):
        hit = context.get("flaky_hit") or []
        hidden = {*hit, "lib/__never_there__"}
        parsed["Deleted"] = [d for d in parsed.get("Deleted", []) if d["Key"] not in hidden]
        parsed.setdefault("Errors", []).extend(
            {"Key": k, "Code": self.code, "Message": "Please reduce your request rate."}
            for k in hit
        )
        self.injected += len(hit)


@pytest.mark.parametrize("code", ["SlowDown", "InternalError"])
def test_transient_per_key_errors_are_retried(s3, s3fs_client, tmp_path, monkeypatch, code):
    monkeypatch.setattr(storage_mod, "BACKOFF_CAP_S", 0.02)
    s3fs_client.mkdir("photos")
    dups = [f"d{i}.jpg" for i in range(6)]
    put(s3fs_client, "photos", ["k.jpg", *dups])
    store = Store("s3://photos/lib", s3)
    plan_dir = str(tmp_path / "plan")
    write_plan(plan_dir, {"k.jpg": dups}, store=store)
    flaky = FlakyDeletes(store.fs, {"lib/d1.jpg": 2, "lib/d4.jpg": 3}, code)
    res = apply_plan(plan_dir, store=store, batch_size=1000)
    assert flaky.injected == 5
    assert res.ok and res.counts == {"deleted": 6}
    assert keys(s3fs_client, "photos") == {"k.jpg"}


def test_persistent_throttling_is_reported_not_dropped(s3, s3fs_client, tmp_path, monkeypatch):
    monkeypatch.setattr(storage_mod, "BACKOFF_CAP_S", 0.01)
    s3fs_client.mkdir("photos")
    put(s3fs_client, "photos", ["k.jpg", "d1.jpg", "d2.jpg"])
    store = Store("s3://photos/lib", s3)
    plan_dir = str(tmp_path / "plan")
    write_plan(plan_dir, {"k.jpg": ["d1.jpg", "d2.jpg"]}, store=store)
    FlakyDeletes(store.fs, {"lib/d2.jpg": 10**6})
    res = apply_plan(plan_dir, store=store)
    assert res.counts == {"deleted": 1, "failed": 1}
    rows = {r["path"]: r for r in read_report(os.path.join(plan_dir, "completion-report.csv"))}
    assert rows["d2.jpg"]["error_code"] == "SlowDown"
    assert f"{storage_mod.S3_MAX_KEY_ATTEMPTS} attempts" in rows["d2.jpg"]["message"]
    assert keys(s3fs_client, "photos") == {"k.jpg", "d2.jpg"}


def test_trash_and_restore_on_s3(tricky_bucket, s3, s3fs_client, tmp_path):
    store = tricky_bucket
    keepers, dups, decoys = tricky_names()
    s3fs_client.mkdir("trash-bkt")
    plan_dir = str(tmp_path / "plan")
    write_plan(plan_dir, {k: v[0] for k, v in TRICKY.items()}, store=store)
    trash = "s3://trash-bkt/dedup"
    res = apply_plan(plan_dir, store=store, trash=trash, batch_size=3)
    assert res.ok and res.counts == {"trashed": len(dups)}
    assert keys(s3fs_client, "photos") == set(keepers + decoys)
    assert keys(s3fs_client, "trash-bkt", "dedup/") == in_trash(plan_dir, dups)
    for d in dups:
        (t,) = in_trash(plan_dir, [d])
        assert s3fs_client.cat_file(f"trash-bkt/dedup/{t}") == d.encode()
    back = restore(plan_dir, store=store, trash=trash)
    assert back.ok and back.counts == {"restored": len(dups)}
    assert keys(s3fs_client, "photos") == set(keepers + dups + decoys)
    assert keys(s3fs_client, "trash-bkt", "dedup/") == set()
    for d in dups:
        assert s3fs_client.cat_file(f"photos/lib/{d}") == d.encode()


def test_secrets_never_written_or_logged(s3_server, s3fs_client, tmp_path, caplog):
    key_id, secret = "AKIDSECRETSCAN0042", "s3cr3t-Value-Never-Logged-7"
    opts = {"endpoint_url": s3_server, "key": key_id, "secret": secret}
    s3fs_client.mkdir("photos")
    put(s3fs_client, "photos", ["k.jpg", "d1.jpg", "d2.jpg", "gone-keeper.jpg", "o.jpg"])
    _deny_delete(s3fs_client, "photos", ["lib/d2.jpg"])
    store = Store("s3://photos/lib", opts)
    plan_dir = tmp_path / "plan"
    write_plan(
        str(plan_dir), {"k.jpg": ["d1.jpg", "d2.jpg"], "gone-keeper.jpg": ["o.jpg"]}, store=store
    )
    s3fs_client.rm_file("photos/lib/gone-keeper.jpg")
    s3fs_client.mkdir("trash-bkt")
    caplog.set_level(logging.DEBUG, logger="dedup_batch")
    res = apply_plan(str(plan_dir), store=store, trash="s3://trash-bkt/t")
    assert res.counts == {"trashed": 1, "failed": 1, "skipped_keeper_missing": 1}
    no_retry = {"retries": {"max_attempts": 1}}
    bad = Store(
        "s3://photos/lib",
        {**opts, "endpoint_url": "http://127.0.0.1:9", "config_kwargs": no_retry},
    )
    bad.fs.retries = 1
    # resuming on another endpoint is refused (another root), naming both endpoints
    with pytest.raises(SafetyError, match="endpoint") as refused:
        apply_plan(str(plan_dir), store=bad, trash="s3://trash-bkt/t")
    # the same plan, never applied, against the unreachable endpoint: its error message
    fresh = tmp_path / "fresh-plan"
    shutil.copytree(plan_dir, fresh, ignore=shutil.ignore_patterns("journal"))
    with pytest.raises(StorageError) as err:
        apply_plan(str(fresh), store=bad, trash="s3://trash-bkt/t")
    texts = [caplog.text, str(err.value), str(refused.value), json.dumps(res.to_dict())]
    texts += [repr(store), repr(res)]
    for d, _, files in os.walk(plan_dir):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                texts.append(fh.read().decode("utf-8", "replace"))
    assert len(texts) > 6
    for t in texts:
        assert key_id not in t and secret not in t


DRIVER = textwrap.dedent(
    """
    import json, sys
    from dedup_batch.apply import apply_plan
    from dedup_batch.storage import Store
    plan_dir, root, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    res = apply_plan(plan_dir, store=Store(root, opts), batch_size=1, concurrency=1)
    print(json.dumps(res.counts))
    """
)


def _journaled(plan_dir) -> int:
    try:
        return len(
            [n for n in os.listdir(os.path.join(plan_dir, "journal")) if n.startswith("batch-")]
        )
    except FileNotFoundError:
        return 0


def _cluster_bucket(s3fs_client, n_clusters: int, n_dups: int):
    s3fs_client.mkdir("photos")
    clusters = {
        f"c{c:03d}.jpg": [f"c{c:03d}-dup{j}.jpg" for j in range(n_dups)] for c in range(n_clusters)
    }
    decoys = [f"c{c:03d}-dup[0].jpg" for c in range(0, n_clusters, 10)]
    put(s3fs_client, "photos", list(clusters) + [d for v in clusters.values() for d in v] + decoys)
    return clusters, decoys


@pytest.mark.slow
def test_killed_apply_resumes_and_then_is_a_no_op(s3, s3fs_client, tmp_path):
    clusters, decoys = _cluster_bucket(s3fs_client, 60, 2)
    store = Store("s3://photos/lib", s3)
    plan_dir = str(tmp_path / "plan")
    write_plan(plan_dir, clusters, store=store)
    total = sum(len(v) for v in clusters.values())
    env = {**os.environ, "PYTHONPATH": REPO}
    args = [sys.executable, "-c", DRIVER, plan_dir, "s3://photos/lib", json.dumps(s3)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while _journaled(plan_dir) < 5 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done_at_kill = _journaled(plan_dir)
    assert 5 <= done_at_kill < total
    assert not os.path.exists(os.path.join(plan_dir, "completion-report.csv"))
    out = subprocess.run(args, env=env, capture_output=True, timeout=120, check=True)
    counts = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert sum(counts.values()) == total
    assert set(counts) <= {"deleted", "already_absent"}
    expected = set(clusters) | set(decoys)
    assert keys(s3fs_client, "photos") == expected
    res = apply_plan(plan_dir, store=store, batch_size=1)
    assert res.ok and res.batches_run == 0 and res.counts == counts
    assert keys(s3fs_client, "photos") == expected


@pytest.mark.slow
@pytest.mark.cluster
def test_worker_killed_during_apply(s3, s3fs_client, tmp_path):
    from distributed import Client, LocalCluster

    clusters, decoys = _cluster_bucket(s3fs_client, 50, 2)
    store = Store("s3://photos/lib", s3)
    plan_dir = str(tmp_path / "plan")
    write_plan(plan_dir, clusters, store=store)
    total = sum(len(v) for v in clusters.values())
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
        ) as cluster,
        Client(cluster) as client,
    ):
        outcome: dict = {}

        def run():
            try:
                outcome["result"] = apply_plan(
                    plan_dir, store=store, client=client, batch_size=1, concurrency=2
                )
            except Exception as exc:  # a KilledWorker is allowed: the re-run must finish
                outcome["error"] = exc

        t = threading.Thread(target=run)
        t.start()
        deadline = time.monotonic() + 60
        while _journaled(plan_dir) < 5 and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        pids = client.run(os.getpid)
        victim = sorted(pids.values())[0]
        killed_at = _journaled(plan_dir)
        os.kill(victim, signal.SIGKILL)
        t.join(timeout=120)
        assert killed_at < total, "the apply finished before the worker could be killed"
        res = outcome.get("result")
        if res is None:
            res = apply_plan(plan_dir, store=store, client=client, batch_size=1)
        assert res.ok, res.to_dict()
        assert sum(res.counts.values()) == total
        assert set(res.counts) <= {"deleted", "already_absent"}
    assert keys(s3fs_client, "photos") == set(clusters) | set(decoys)
