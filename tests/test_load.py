"""Tests of the load stage: every layout, every bad-input class, local / memory / S3, threads
and a real distributed cluster."""

from __future__ import annotations

import io
import logging
import os
import pickle as pickle_module
import socket

import _shards as sh
import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from dedup_batch import load as load_module
from dedup_batch.errors import InputError, ScopeError, StorageError
from dedup_batch.load import Features, load_features
from dedup_batch.storage import Store

SECRET = "very-secret-value-0123456789"


def _check(f: Features, paths: list[str], X: np.ndarray) -> None:
    assert isinstance(f.paths, np.ndarray) and f.paths.dtype == object
    assert [type(p) for p in f.paths] == [str] * len(paths)
    assert f.paths.tolist() == list(paths)
    assert f.X.dtype == np.float32 and f.X.flags.c_contiguous
    np.testing.assert_array_equal(f.X, X)


@pytest.fixture
def root(tmp_path):
    """A local root with the features in ``feat/`` under it."""
    (tmp_path / "feat").mkdir()
    return Store(str(tmp_path))


def _local(root: Store, name: str, data: bytes) -> str:
    return sh.put(os.path.join(root.root, "feat", name), data)


# -- layouts ---------------------------------------------------------------------------------
LAYOUTS = {
    "parquet-index": ("a.parquet", lambda p, X: sh.wide_parquet(p, X, how="index")),
    "parquet-named-index": ("a.parquet", lambda p, X: sh.wide_parquet(p, X, how="named-index")),
    "parquet-path-column": ("a.pq", lambda p, X: sh.wide_parquet(p, X, how="column")),
    "parquet-int-columns": ("a.PARQUET", lambda p, X: sh.wide_parquet(p, X, how="int-columns")),
    "parquet-list": ("a.parquet", lambda p, X: sh.list_parquet(p, X)),
    "parquet-large-list": ("a.parquet", lambda p, X: sh.list_parquet(p, X, list_type="large_list")),
    "parquet-fixed-list": ("a.parquet", lambda p, X: sh.list_parquet(p, X, list_type="fixed")),
    "npz": ("a.npz", sh.npz),
    "csv-path-column": ("a.csv", sh.csv),
    "csv-first-column": ("a.csv", lambda p, X: sh.csv(p, X, path_column=False)),
    "csv-gz": ("a.CSV.GZ", lambda p, X: sh.csv(p, X, gz=True)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_round_trip(root, layout):
    name, write = LAYOUTS[layout]
    paths, X = sh.vectors(20, 16, seed=1)
    url = _local(root, name, write(paths, X))
    f = load_features(url, store=root)
    _check(f, paths, X)
    assert f.shards == (url,)


def test_list_layout_float64_values_become_float32(root):
    paths, X = sh.vectors(5, 4)
    table = pa.table({"path": paths, "embedding": [list(map(float, r)) for r in X]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    f = load_features(_local(root, "a.parquet", buf.getvalue()), store=root)
    _check(f, paths, X)


def test_wide_layout_extra_numeric_index_is_ignored(root):
    # A 'path' column next to a stored (non-range) integer index: the index is no dimension.
    paths, X = sh.vectors(6, 3)
    df = sh.frame(paths, X).reset_index(names="path")
    df.index = [10, 11, 12, 13, 14, 15]
    buf = io.BytesIO()
    df.to_parquet(buf)
    _check(load_features(_local(root, "a.parquet", buf.getvalue()), store=root), paths, X)


def test_notebook_pickle_needs_allow_pickle(root):
    paths, X = sh.vectors(12, 256, seed=2)
    url = _local(root, "features.pkl", sh.pickle(paths, X))
    with pytest.raises(InputError) as err:
        load_features(url, store=root)
    assert str(err.value) == (
        f"{url}: pickle shards run code when read; pass --allow-pickle only if you trust this "
        "file, or convert it to Parquet"
    )
    _check(load_features(url, store=root, allow_pickle=True), paths, X)


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_is_never_unpickled_without_allow_pickle(root, tmp_path):
    marker = tmp_path / "pwned"
    url = _local(root, "evil.pickle", pickle_module.dumps(_RunsCode(str(marker))))
    with pytest.raises(InputError, match="pickle shards run code"):
        load_features([str(tmp_path / "feat" / "*")], store=root)
    assert not marker.exists()
    # The same file does run its code once allowed: the refusal above is what protected us.
    with pytest.raises(InputError, match=r"evil\.pickle: pickle holds a NoneType"):
        load_features(url, store=root, allow_pickle=True)
    assert marker.is_dir()


# -- globs, ordering, literal names ----------------------------------------------------------
def test_glob_expansion_sorted_and_rows_in_shard_order(root):
    shards = {}
    for name, seed in (("part-2.parquet", 2), ("part-0.parquet", 0), ("part-1.parquet", 1)):
        shards[name] = sh.vectors(4, 8, seed=seed, prefix=name[:-8])
        _local(root, name, sh.wide_parquet(*shards[name]))
    _local(root, "notes.txt", b"not a shard")
    feat = os.path.join(root.root, "feat")
    # Overlapping patterns: each shard is read once, in sorted order.
    f = load_features([f"{feat}/part-*.parquet", f"{feat}/part-1.parquet"], store=root)
    order = ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    assert f.shards == tuple(f"{feat}/{n}" for n in order)
    _check(
        f, [p for n in order for p in shards[n][0]], np.concatenate([shards[n][1] for n in order])
    )
    # A folder takes the shard files under it and skips other files.
    assert load_features(feat, store=root).shards == f.shards


def test_folder_takes_shards_recursively_and_skips_other_files(root):
    a = sh.vectors(3, 4, seed=1, prefix="a")
    z = sh.vectors(2, 4, seed=2, prefix="z")
    os.makedirs(os.path.join(root.root, "feat", "sub"))
    _local(root, "sub/z.CSV.GZ", sh.csv(*z, gz=True))
    _local(root, "a.parquet", sh.wide_parquet(*a))
    _local(root, "README.md", b"# features")
    f = load_features(os.path.join(root.root, "feat") + "/", store=root)
    _check(f, a[0] + z[0], np.concatenate([a[1], z[1]]))
    assert [os.path.basename(u) for u in f.shards] == ["a.parquet", "z.CSV.GZ"]


def test_mixed_layouts_in_one_load(root):
    a = sh.vectors(3, 8, seed=1, prefix="a")
    b = sh.vectors(4, 8, seed=2, prefix="b")
    c = sh.vectors(5, 8, seed=3, prefix="c")
    _local(root, "a.npz", sh.npz(*a))
    _local(root, "b.csv", sh.csv(*b))
    _local(root, "c.parquet", sh.list_parquet(*c))
    f = load_features(os.path.join(root.root, "feat", "*"), store=root)
    _check(f, a[0] + b[0] + c[0], np.concatenate([a[1], b[1], c[1]]))


def test_odd_paths_and_shard_names_are_taken_literally(root):
    odd = [
        "with space.jpg",
        "ünïcödé/日本.jpg",
        "a[1].jpg",
        "star*.jpg",
        "what?.jpg",
        "[abc]/x.jpg",
        "1.jpg",
        'comma,quote".jpg',
    ]
    X = np.arange(len(odd) * 4, dtype=np.float32).reshape(-1, 4)
    for i, (name, data) in enumerate(
        [
            ("s[1].parquet", sh.wide_parquet(odd, X)),
            ("s[1].csv", sh.csv(odd, X)),
            ("s[1].npz", sh.npz(odd, X)),
            ("s[1] list.parquet", sh.list_parquet(odd, X)),
        ]
    ):
        url = _local(root, name, data)  # '[1]' is no glob here: the file exists by that name
        f = load_features(url, store=root)
        _check(f, odd, X)
        assert f.shards == (url,), i


def test_glob_matching_nothing_names_it(root):
    url = os.path.join(root.root, "feat", "*.parquet")
    with pytest.raises(InputError, match=r"feat/\*\.parquet: matches no file"):
        load_features(url, store=root)
    with pytest.raises(InputError, match="no feature shards given"):
        load_features([], store=root)


# -- bad input -------------------------------------------------------------------------------
def test_empty_input(root):
    url = _local(root, "a.parquet", sh.wide_parquet([], np.zeros((0, 8), np.float32)))
    with pytest.raises(InputError, match="no feature rows in 1 shard"):
        load_features(url, store=root)


def test_empty_shard_among_others_is_skipped(root, caplog):
    paths, X = sh.vectors(3, 8)
    _local(root, "a.npz", sh.npz([], np.zeros((0, 4), np.float32)))  # no rows: d does not count
    _local(root, "b.npz", sh.npz(paths, X))
    with caplog.at_level(logging.WARNING, "dedup_batch.load"):
        f = load_features(os.path.join(root.root, "feat", "*.npz"), store=root)
    _check(f, paths, X)
    assert "a.npz has no rows" in caplog.text


def test_unknown_suffix(root):
    url = _local(root, "a.json", b"{}")
    with pytest.raises(InputError, match=r"a\.json: unknown shard format"):
        load_features(url, store=root)


def test_no_path_column(root):
    buf = io.BytesIO()
    pd.DataFrame(np.ones((3, 2), np.float32), columns=["0", "1"]).to_parquet(buf)
    url = _local(root, "a.parquet", buf.getvalue())
    with pytest.raises(InputError, match=rf"{url}: no path column"):
        load_features(url, store=root)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "pkl"])
def test_non_numeric_feature_column_is_named(root, fmt):
    paths, X = sh.vectors(3, 2)
    df = sh.frame(paths, X).assign(label=["cat", "dog", "cow"])
    buf = io.BytesIO()
    if fmt == "parquet":
        df.to_parquet(buf)
    elif fmt == "csv":
        buf.write(df.reset_index(names="path").to_csv(index=False).encode())
    else:
        df.to_pickle(buf)
    url = _local(root, f"a.{fmt}", buf.getvalue())
    with pytest.raises(InputError, match=rf"{url}: column 'label' .*not"):
        load_features(url, store=root, allow_pickle=True)


def test_mixed_dimensions_name_both_shards(root):
    a = _local(root, "a.parquet", sh.wide_parquet(*sh.vectors(3, 8, prefix="a")))
    b = _local(root, "b.parquet", sh.wide_parquet(*sh.vectors(3, 16, prefix="b")))
    with pytest.raises(InputError) as err:
        load_features(os.path.join(root.root, "feat", "*.parquet"), store=root)
    assert str(err.value).startswith(f"{b} has 16-dimensional vectors but {a} has 8;")


def test_ragged_list_embeddings(root):
    table = pa.table({"path": ["a.jpg", "b.jpg"], "embedding": [[1.0, 2.0], [1.0, 2.0, 3.0]]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    url = _local(root, "a.parquet", buf.getvalue())
    with pytest.raises(InputError, match=rf"{url}: row 1 \(path 'b.jpg'\) has a 3-dimensional"):
        load_features(url, store=root)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("layout", ["parquet-index", "parquet-list", "npz", "csv-path-column"])
def test_non_finite_values_name_first_bad_row(root, bad, layout):
    name, write = LAYOUTS[layout]
    paths, X = sh.vectors(10, 4)
    X[7, 2] = bad
    X[9, 0] = np.nan
    url = _local(root, name, write(paths, X))
    with pytest.raises(InputError, match=rf"^{url}: row 7 \(path 'img/00007.jpg'\) has"):
        load_features(url, store=root)


def test_float64_beyond_float32_range_is_refused(root):
    paths, X = sh.vectors(3, 2)
    df = sh.frame(paths, X.astype(np.float64))
    df.iloc[1, 1] = 1e300
    buf = io.BytesIO()
    df.to_parquet(buf)
    url = _local(root, "a.parquet", buf.getvalue())
    with pytest.raises(InputError, match=r"row 1 \(path 'img/00001.jpg'\).*column '1'"):
        load_features(url, store=root)


def test_truncated_parquet(root):
    data = sh.wide_parquet(*sh.vectors(50, 8))
    url = _local(root, "a.parquet", data[: len(data) // 2])
    with pytest.raises(InputError, match=rf"^{url} is not a valid Parquet file .*; re-export it$"):
        load_features(url, store=root)


def test_corrupt_npz_and_csv_gz(root):
    data = sh.npz(*sh.vectors(50, 8))
    url = _local(root, "a.npz", data[: len(data) // 2])
    with pytest.raises(InputError, match=rf"^{url} is not a valid NPZ"):
        load_features(url, store=root)
    url = _local(root, "b.npz", b"\x80\x04not a zip at all")
    with pytest.raises(InputError, match=rf"^{url} is not a valid NPZ"):
        load_features(url, store=root)
    url = _local(root, "c.csv.gz", b"plain text, not gzip")
    with pytest.raises(InputError, match=rf"^{url}: cannot decompress as gzip"):
        load_features(url, store=root)


def test_npz_object_paths_need_unicode(root):
    paths, X = sh.vectors(3, 2)
    url = _local(root, "a.npz", sh.npz(paths, X, paths_dtype=object))
    with pytest.raises(InputError, match=rf"{url}: 'paths' is an object array.*unicode array"):
        load_features(url, store=root)


def test_npz_missing_arrays(root):
    buf = io.BytesIO()
    np.savez(buf, names=np.array(["a"]), X=np.zeros((1, 2)))
    url = _local(root, "a.npz", buf.getvalue())
    with pytest.raises(InputError, match=rf"{url}: NPZ shard has arrays \['X', 'names'\]"):
        load_features(url, store=root)


@pytest.mark.parametrize("fmt", ["pkl", "parquet", "npz"])
def test_non_string_paths(root, fmt):
    X = np.ones((3, 2), np.float32)
    if fmt == "pkl":
        data, match = sh.pickle(["a.jpg", 7, "c.jpg"], X), r"row 1 has path 7 of type int"
    elif fmt == "parquet":
        data, match = sh.wide_parquet([1, 2, 3], X, how="column"), "path column 'path' is int64"
    else:
        data, match = sh.npz([1, 2, 3], X, paths_dtype=np.int64), "'paths' holds int64, not text"
    url = _local(root, f"a.{fmt}", data)
    with pytest.raises(InputError, match=rf"{url}: {match}"):
        load_features(url, store=root, allow_pickle=True)


def test_null_path(root):
    table = pa.table({"path": ["a.jpg", None], "embedding": [[1.0], [2.0]]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    url = _local(root, "a.parquet", buf.getvalue())
    with pytest.raises(InputError, match=rf"{url}: row 1 has no path"):
        load_features(url, store=root)


def test_duplicate_path_with_different_vectors_names_both_places(root):
    a_paths, a_X = sh.vectors(5, 4, seed=1)
    b_paths, b_X = sh.vectors(5, 4, seed=2, prefix="other")
    b_paths[3] = a_paths[1]
    a = _local(root, "a.parquet", sh.wide_parquet(a_paths, a_X))
    b = _local(root, "b.parquet", sh.wide_parquet(b_paths, b_X))
    with pytest.raises(InputError) as err:
        load_features(os.path.join(root.root, "feat", "*.parquet"), store=root)
    assert str(err.value).startswith(
        f"path 'img/00001.jpg' at {b} row 3 names the same object ('img/00001.jpg') as "
        f"'img/00001.jpg' at {a} row 1, with a different vector"
    )


@pytest.mark.parametrize(
    "spelling", ["./x/a.jpg", "{root}/x/a.jpg", "x//a.jpg", "x/./a.jpg", "x/a.jpg/", ".//x/a.jpg"]
)
def test_two_spellings_of_one_object_are_one_path(root, spelling):
    X = np.array([[1, 2], [3, 4]], np.float32)
    other = spelling.format(root=root.root)
    url = _local(root, "a.parquet", sh.wide_parquet(["x/a.jpg", other], X))
    with pytest.raises(InputError, match=r"\('x/a\.jpg'\) as 'x/a\.jpg' .*different vector"):
        load_features(url, store=root)
    # The same vector: one row, under the canonical spelling.
    url = _local(root, "a.parquet", sh.wide_parquet([other, "x/a.jpg"], X[[0, 0]]))
    assert load_features(url, store=root).paths.tolist() == ["x/a.jpg"]


def test_identical_duplicates_collapse_to_first(root, caplog):
    a_paths, a_X = sh.vectors(4, 4, seed=1)
    b_paths, b_X = sh.vectors(4, 4, seed=2, prefix="other")
    b_paths[0], b_X[0] = a_paths[2], a_X[2]  # same path, same vector, in another shard
    b_paths[2], b_X[2] = "./" + a_paths[3], a_X[3]  # another spelling of the same object
    _local(root, "a.parquet", sh.wide_parquet(a_paths, a_X))
    b = _local(root, "b.parquet", sh.wide_parquet(b_paths, b_X))
    with caplog.at_level(logging.INFO, "dedup_batch.load"):
        f = load_features(os.path.join(root.root, "feat", "*.parquet"), store=root)
    keep = [1, 3]  # b rows 0 and 2 repeat a rows 2 and 3
    _check(f, a_paths + [b_paths[i] for i in keep], np.concatenate([a_X, b_X[keep]]))
    assert "2 path(s) listed more than once with identical vectors" in caplog.text
    assert f"{b} row 0" in caplog.text


@pytest.mark.parametrize("bad", ["../outside.jpg", "x/../../outside.jpg", "/etc/passwd", ""])
def test_scope_escape_local(root, bad):
    paths, X = sh.vectors(4, 2)
    paths[2] = bad
    url = _local(root, "a.parquet", sh.wide_parquet(paths, X))
    with pytest.raises(ScopeError, match=rf"^{url}: row 2: .*fix the path in the shard"):
        load_features(url, store=root)


def test_absolute_path_inside_local_root_is_fine(root):
    paths, X = sh.vectors(2, 2)
    written = list(paths)
    written[0] = os.path.join(root.root, "img", "a.jpg")
    url = _local(root, "a.parquet", sh.wide_parquet(written, X))
    # Loaded under its canonical name: relative to the root.
    _check(load_features(url, store=root), ["img/a.jpg", *paths[1:]], X)


# -- memory:// and S3 ------------------------------------------------------------------------
def test_memory_filesystem():
    paths, X = sh.vectors(9, 4)
    sh.put("memory://loadtest/feat/a.npz", sh.npz(paths[:4], X[:4]))
    sh.put("memory://loadtest/feat/b.parquet", sh.list_parquet(paths[4:], X[4:]))
    try:
        f = load_features("memory://loadtest/feat/*", store=Store("memory://loadtest"))
        _check(f, paths, X)
        assert f.shards == ("memory:///loadtest/feat/a.npz", "memory:///loadtest/feat/b.parquet")
    finally:
        fsspec.filesystem("memory").rm("/loadtest", recursive=True)


@pytest.fixture
def s3_shards(s3, s3fs_client):
    """Three shards of 30 rows × 8 dims in s3://feat-bucket/features/, root s3://img-bucket."""
    s3fs_client.mkdir("feat-bucket")
    s3fs_client.mkdir("img-bucket")
    all_paths, all_X = [], []
    for i, (name, write) in enumerate(
        [
            ("part-0.parquet", sh.wide_parquet),
            ("part-1.npz", sh.npz),
            ("part-2.csv.gz", lambda p, X: sh.csv(p, X, gz=True)),
        ]
    ):
        paths, X = sh.vectors(30, 8, seed=i, prefix=f"s{i}")
        s3fs_client.pipe(f"feat-bucket/features/{name}", write(paths, X))
        all_paths += paths
        all_X.append(X)
    return all_paths, np.concatenate(all_X)


@pytest.mark.s3
def test_s3_round_trip(s3, s3_shards):
    paths, X = s3_shards
    f = load_features(
        "s3://feat-bucket/features/part-*", store=Store("s3://img-bucket", s3), storage_options=s3
    )
    _check(f, paths, X)
    assert f.shards == (
        "s3://feat-bucket/features/part-0.parquet",
        "s3://feat-bucket/features/part-1.npz",
        "s3://feat-bucket/features/part-2.csv.gz",
    )


@pytest.mark.s3
def test_s3_path_in_other_bucket_is_out_of_scope(s3, s3fs_client):
    s3fs_client.mkdir("feat-bucket")
    paths, X = sh.vectors(3, 2)
    paths[1] = "s3://other-bucket/img/00001.jpg"
    s3fs_client.pipe("feat-bucket/a.parquet", sh.wide_parquet(paths, X))
    with pytest.raises(ScopeError, match=r"^s3://feat-bucket/a.parquet: row 1: .*outside root"):
        load_features(
            "s3://feat-bucket/a.parquet", store=Store("s3://img-bucket/img", s3), storage_options=s3
        )


@pytest.mark.s3
def test_s3_missing_bucket(s3):
    with pytest.raises(
        StorageError,
        match=r"^s3://no-such-bucket/f/\*.parquet: bucket "
        r"'no-such-bucket' does not exist",
    ):
        load_features(
            "s3://no-such-bucket/f/*.parquet", store=Store("s3://img", s3), storage_options=s3
        )


@pytest.mark.s3
def test_s3_wrong_endpoint(s3):
    with socket.socket() as s:  # a loopback port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = {
        **s3,
        "endpoint_url": f"http://127.0.0.1:{port}",
        "secret": SECRET,
        # one attempt: botocore's default retries only make the test slower
        "config_kwargs": {"retries": {"max_attempts": 1}},
    }
    with pytest.raises(StorageError) as err:
        load_features(
            "s3://feat-bucket/features/*.parquet",
            store=Store("s3://img", opts),
            storage_options=opts,
        )
    msg = str(err.value)
    assert msg.startswith(
        "s3://feat-bucket/features/*.parquet: cannot reach the storage "
        f"endpoint http://127.0.0.1:{port}: check endpoint_url"
    )
    assert SECRET not in msg and "\n" not in msg


@pytest.mark.s3
def test_s3_bad_credentials_and_access_denied(s3, s3_shards, s3_server):
    import boto3

    # A real IAM user without any policy: known credentials, but no right to read.
    iam = boto3.client("iam", endpoint_url=s3_server, region_name="us-east-1")
    iam.create_user(UserName="nobody")
    key = iam.create_access_key(UserName="nobody")["AccessKey"]
    no_rights = {
        "endpoint_url": s3_server,
        "key": key["AccessKeyId"],
        "secret": key["SecretAccessKey"],
        "skip_instance_cache": True,
    }
    unknown = {
        "endpoint_url": s3_server,
        "key": "AKIAUNKNOWNKEY000000",
        "secret": SECRET,
        "skip_instance_cache": True,
    }
    url = "s3://feat-bucket/features/part-0.parquet"
    requests.post(f"{s3_server}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
    try:
        for opts, secret in ((unknown, SECRET), (no_rights, key["SecretAccessKey"])):
            with pytest.raises(StorageError) as err:
                load_features(url, store=Store("s3://img-bucket", opts), storage_options=opts)
            msg = str(err.value)
            assert msg.startswith(f"{url}: access denied: check the credentials"), msg
            assert secret not in msg and "\n" not in msg
    finally:
        requests.post(f"{s3_server}/moto-api/reset-auth", data=b"inf", timeout=10)


# -- parallel: threads vs a distributed cluster ----------------------------------------------
@pytest.mark.s3
@pytest.mark.cluster
@pytest.mark.parametrize("fetch_bytes", [1, 64 << 20], ids=["one-shard-batches", "one-batch"])
def test_distributed_equals_threaded(s3, s3_shards, dask_client, monkeypatch, fetch_bytes):
    monkeypatch.setattr(load_module, "_FETCH_BYTES", fetch_bytes)
    paths, X = s3_shards
    store = Store("s3://img-bucket", s3)
    urls = "s3://feat-bucket/features/*"
    local = load_features(urls, store=store, storage_options=s3)
    remote = load_features(urls, store=store, storage_options=s3, client=dask_client)
    _check(local, paths, X)
    _check(remote, paths, X)
    assert remote.shards == local.shards


@pytest.mark.cluster
def test_distributed_reports_first_bad_shard(root, dask_client):
    good = sh.vectors(3, 2)
    _local(root, "a.parquet", sh.wide_parquet(*good))
    bad_paths, bad_X = sh.vectors(3, 2, prefix="b")
    bad_X[1, 1] = np.nan
    b = _local(root, "b.parquet", sh.wide_parquet(bad_paths, bad_X))
    c = sh.vectors(3, 2, prefix="c")
    c[0][0] = "../escape.jpg"
    _local(root, "c.parquet", sh.wide_parquet(*c))
    with pytest.raises(InputError, match=rf"^{b}: row 1 \(path 'b/00001.jpg'\)"):
        load_features(os.path.join(root.root, "feat", "*"), store=root, client=dask_client)


# -- malformed shards: each one an InputError naming the file, exit 2 from the CLI ---------------
def _parquet_with_metadata(pandas_meta: bytes) -> bytes:
    table = pa.table({"path": ["a.jpg", "b.jpg"], "x0": [1.0, 2.0]})
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata({b"pandas": pandas_meta}), buf)
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _list_parquet(rows: list[list[float]], value_type: pa.DataType) -> bytes:
    table = pa.table({"path": [f"{i}.jpg" for i in range(len(rows))], "embedding": rows})
    table = table.cast(pa.schema([("path", pa.string()), ("embedding", value_type)]))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


MALFORMED = {
    "pandas-metadata-not-json": (
        "a.parquet",
        lambda: _parquet_with_metadata(b"{not json"),
        "its pandas metadata .* is not what pandas writes",
    ),
    "pandas-metadata-not-an-object": (
        "a.parquet",
        lambda: _parquet_with_metadata(b"[1, 2]"),
        "its pandas metadata .* is not what pandas writes",
    ),
    "pandas-metadata-odd-index": (
        "a.parquet",
        lambda: _parquet_with_metadata(b'{"index_columns": 5}'),
        "its pandas metadata .* is not what pandas writes",
    ),
    "csv-two-path-headers": (
        "a.csv",
        lambda: b"path,x0,path\na.jpg,1.0,b.jpg\n",
        "column 'path' appears more than once",
    ),
    "csv-two-feature-headers": (
        "a.csv",
        lambda: b"path,x0,x0\na.jpg,1.0,2.0\n",
        "column 'x0' appears more than once",
    ),
    "parquet-two-path-columns": (
        "a.parquet",
        lambda: _table_bytes(pa.table([["a.jpg"], ["b.jpg"], [1.0]], names=["path", "path", "x"])),
        "column 'path' appears more than once",
    ),
    "npz-raw-members": (
        "a.npz",
        lambda: _zip({"paths": b"a.jpg\n", "embeddings": b"\x00" * 8}),
        "'paths' is a raw file in the zip, not a NumPy array",
    ),
    "npz-raw-embeddings": (
        "a.npz",
        lambda: _zip({"paths.npy": _npy(np.array(["a.jpg"])), "embeddings": b"\x00" * 8}),
        "'embeddings' is a raw file in the zip",
    ),
    "npz-zero-length-embeddings": (
        "a.npz",
        lambda: sh.npz(["a.jpg", "b.jpg"], np.zeros((2, 0), np.float32)),
        r"'embeddings' has shape \(2, 0\): empty vectors",
    ),
    "list-zero-length-embeddings": (
        "a.parquet",
        lambda: _list_parquet([[], []], pa.list_(pa.float32())),
        "row 0 .* has an empty embedding",
    ),
}


def _table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_shard_names_the_file(root, case):
    name, make, match = MALFORMED[case]
    url = _local(root, name, make())
    with pytest.raises(InputError, match=rf"^{url}: {match}"):
        load_features(url, store=root)


def test_malformed_shards_exit_2_with_one_line_from_the_cli(tmp_path, dask_client, capsys):
    # The real CLI, in this process, on the session's cluster (a LocalCluster per case would
    # cost seconds each).
    from dedup_batch.cli import main

    (tmp_path / "photos").mkdir()
    for case, (name, make, _) in MALFORMED.items():
        shard = tmp_path / case / name
        shard.parent.mkdir()
        shard.write_bytes(make())
        code = main(
            [
                *("plan", "--features", str(shard), "--root", str(tmp_path / "photos")),
                *("--eps", "0.5", "--out", str(tmp_path / "plan")),
                *("--scheduler", dask_client.scheduler.address),
            ]
        )
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2, (case, err[-2000:])
        assert len(errors) == 1 and str(shard) in errors[0], (case, err[-2000:])
        assert "unexpected" not in errors[0]


def test_an_embed_output_folder_loads_without_its_errors_file(root):
    paths, X = sh.vectors(3, 4)
    _local(root, "part-1.parquet", sh.list_parquet(paths, X))
    _local(root, "embed-errors.csv", b"path,reason\nbad.jpg,corrupt\n")
    got = load_features(os.path.join(root.root, "feat"), store=root)
    assert got.paths.tolist() == list(paths)
    # Named explicitly, it is read as a shard (and refused as one).
    with pytest.raises(InputError, match=r"embed-errors\.csv"):
        load_features(os.path.join(root.root, "feat", "embed-errors.csv"), store=root)
