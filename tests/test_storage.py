"""Store's exact-key operations: one contract, run on local files, memory:// and S3 (moto)."""

from __future__ import annotations

import os
import uuid

import fsspec
import pytest

from dedup_batch.errors import ScopeError, StorageError
from dedup_batch.storage import Store, redact, secret_values

# Each pair: (the object to act on, a decoy a glob of its name would match).
PAIRS = [
    ("a[1].jpg", "a1.jpg"),
    ("b*.jpg", "bx.jpg"),
    ("c?.jpg", "cc.jpg"),
    ("sp ace [x].jpg", "sp ace x.jpg"),
    ("ünï/%41+é.jpg", "ünï/A+é.jpg"),
    ("d/**", "d/deep/file"),
]
NAMES = [n for pair in PAIRS for n in pair] + ["other/keep.jpg"]


@pytest.fixture(params=["local", "memory", "s3"])
def backend(request, tmp_path):
    """A Store whose root holds NAMES (body = name), per backend."""
    if request.param == "local":
        root = str(tmp_path / "root")
        for n in NAMES:
            os.makedirs(os.path.dirname(os.path.join(root, n)), exist_ok=True)
            with open(os.path.join(root, n), "wb") as f:
                f.write(n.encode())
        yield Store(root)
    elif request.param == "memory":
        root = f"memory://store-{uuid.uuid4().hex[:8]}"
        fs = fsspec.filesystem("memory")
        for n in NAMES:
            fs.pipe_file(f"{root}/{n}", n.encode())
        yield Store(root)
        fs.rm(fs._strip_protocol(root), recursive=True)
    else:
        opts = request.getfixturevalue("s3")
        s3fs_client = request.getfixturevalue("s3fs_client")
        s3fs_client.mkdir("store-bkt")
        s3fs_client.pipe({f"store-bkt/root/{n}": n.encode() for n in NAMES})
        yield Store("s3://store-bkt/root", opts)


def listing(store: Store) -> set[str]:
    return {store.relative(p) for p in store.list_objects().index}


def test_delete_exact_takes_names_literally(backend):
    targets = [backend.resolve(a) for a, _ in PAIRS]
    got = backend.delete_exact(targets)
    assert {backend.relative(p) for p in got} == {a for a, _ in PAIRS}
    assert {r.status for r in got.values()} == {"deleted"}
    assert listing(backend) == {d for _, d in PAIRS} | {"other/keep.jpg"}


def test_delete_exact_missing_object(backend):
    got = backend.delete_exact([backend.resolve("never-there.jpg")])
    status = next(iter(got.values())).status
    # S3 answers "Deleted" for a key that does not exist; the others can tell.
    assert status == ("deleted" if backend.is_s3 else "already_absent")
    assert listing(backend) == set(NAMES)


@pytest.mark.parametrize("grouped", [True, False])
def test_stat_many_exact(backend, grouped):
    names = ["a[1].jpg", "b*.jpg", "c?.jpg", "ünï/%41+é.jpg", "missing[1].jpg", "d/**"]
    fulls = sorted(backend.resolve(n) for n in names)
    groups = [fulls] if grouped else [[f] for f in fulls]
    got = backend.stat_many(groups)
    assert set(got) == set(fulls)
    for n in names:
        st = got[backend.resolve(n)]
        if n.startswith("missing"):
            assert st is None
        else:
            assert st is not None and st.size == len(n.encode())
            assert (st.etag is not None) == backend.is_s3
    assert backend.exists(backend.resolve("a[1].jpg"))
    assert not backend.exists(backend.resolve("a[2].jpg"))


def test_copy_exact_and_verify(backend, tmp_path):
    dst = Store(str(tmp_path / "copies"))
    src = backend.resolve("a[1].jpg")
    r = backend.copy_exact(src, dst, dst.resolve("x/a[1].jpg"))
    assert r.status == "copied", r
    assert (tmp_path / "copies" / "x" / "a[1].jpg").read_bytes() == b"a[1].jpg"
    assert not (tmp_path / "copies" / "x" / "a1.jpg").exists()
    assert backend.copy_exact(backend.resolve("nope.jpg"), dst, dst.resolve("n")).status == (
        "absent"
    )
    # Back again, into the backend itself (same-S3 copies are server-side).
    r = dst.copy_exact(dst.resolve("x/a[1].jpg"), backend, backend.resolve("again/a[1].jpg"))
    assert r.status == "copied", r
    assert backend.stat_many([[backend.resolve("again/a[1].jpg")]])[
        backend.resolve("again/a[1].jpg")
    ].size == len(b"a[1].jpg")


def test_write_read_list_small_files(backend):
    d = backend.resolve("journal")
    assert backend.list_files(d) == []
    backend.write_bytes(backend.resolve("journal/b-1.json"), b"one")
    backend.write_bytes(backend.resolve("journal/b-1.json"), b"two")
    backend.write_bytes(backend.resolve("journal/b[2].json"), b"three")
    assert [backend.relative(p) for p in backend.list_files(d)] == [
        "journal/b-1.json",
        "journal/b[2].json",
    ]
    assert backend.read_bytes(backend.resolve("journal/b-1.json")) == b"two"
    assert backend.read_bytes(backend.resolve("journal/none.json")) is None


def test_bucket_is_never_an_object(s3, s3fs_client):
    s3fs_client.mkdir("bucket-only")
    store = Store("s3://bucket-only/p", s3)
    with pytest.raises(ScopeError):
        store.delete_exact(["bucket-only"])


def test_unreachable_s3_is_one_line_storage_error_without_secrets():
    opts = {
        "endpoint_url": "http://127.0.0.1:9",
        "key": "AKIDUNREACHABLE1",
        "secret": "unreachable-secret-value",
        "config_kwargs": {"retries": {"max_attempts": 1}},
    }
    store = Store("s3://bkt/root", opts)
    store.fs.retries = 1
    with pytest.raises(StorageError) as exc:
        store.delete_exact([store.resolve("a.jpg")])
    msg = str(exc.value)
    assert "\n" not in msg and "DeleteObjects" in msg
    assert "AKIDUNREACHABLE1" not in msg and "unreachable-secret-value" not in msg


def testsecret_values_follow_redact():
    opts = {
        "key": "k-123",
        "secret": "s-456",
        "endpoint_url": "http://x",
        "client_kwargs": {"aws_session_token": "tok-789", "region_name": "eu"},
    }
    # Values under 4 characters are not scrubbed from messages: too likely to be ordinary text.
    assert set(secret_values(opts)) == {"k-123", "s-456", "tok-789"}
    assert "http://x" not in secret_values(opts)
    assert redact(opts)["secret"] == "***"
