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


# -- the package's single owners: options rule, error translator, atomic write ----------------
def test_one_rule_for_url_options():
    from dedup_batch.storage import S3_DEFAULT_CONFIG, url_options

    opts = {"endpoint_url": "http://127.0.0.1:9", "key": "k"}
    assert url_options("/data/plan", opts) == {}
    assert url_options("file:///data/plan", opts) == {}
    assert url_options("memory://p", opts) == opts
    s3 = url_options("s3://b/p", {**opts, "config_kwargs": {"read_timeout": 99}})
    assert s3["config_kwargs"]["read_timeout"] == 99  # the job's own setting wins
    assert s3["config_kwargs"]["connect_timeout"] == S3_DEFAULT_CONFIG["connect_timeout"]


def test_one_translator_names_what_and_hides_secrets():
    from dedup_batch.storage import translated

    opts = {"secret": "hush-hush-1234", "endpoint_url": "http://127.0.0.1:9"}
    with pytest.raises(StorageError) as exc, translated("reading s3://b/k", opts):
        raise PermissionError("denied for hush-hush-1234")
    msg = str(exc.value)
    assert msg.startswith("reading s3://b/k: access denied: check the credentials")
    assert "hush-hush-1234" not in msg and "\n" not in msg
    with pytest.raises(FileNotFoundError), translated("x", opts):  # the caller's to decide
        raise FileNotFoundError("k")
    with pytest.raises(TypeError), translated("x", opts):  # a bug is not the store's answer
        raise TypeError("bug")


def test_store_and_url_errors_share_the_translator():
    """A Store call and a URL read against an unreachable endpoint: one wording, no secrets."""
    from dedup_batch.storage import read_bytes

    opts = {
        "endpoint_url": "http://127.0.0.1:9",
        "key": "AKIDUNREACHABLE2",
        "secret": "unreachable-secret-2",
        "config_kwargs": {"retries": {"max_attempts": 1}},
    }
    store = Store("s3://bkt/root", opts)
    store.fs.retries = 1
    hint = "cannot reach the storage endpoint http://127.0.0.1:9: check endpoint_url"
    with pytest.raises(StorageError) as by_store:
        store.read_bytes(store.resolve("journal/x.json"))
    with pytest.raises(StorageError) as by_url:
        read_bytes("s3://bkt/root/journal/x.json", opts)
    for msg, where in ((str(by_store.value), "under 's3://bkt/root': "), (str(by_url.value), "")):
        assert f"{where}{hint}" in msg, msg
        assert "unreachable-secret-2" not in msg and "AKIDUNREACHABLE2" not in msg


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    from dedup_batch.storage import write_url

    target = tmp_path / "d" / "summary.json"
    write_url(str(target), b"one")
    Store(str(tmp_path)).write_bytes(str(target), b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(target.parent) == ["summary.json"]
