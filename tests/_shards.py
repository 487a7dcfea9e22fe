"""Writers of feature shards in every layout the load stage reads (test and benchmark helpers).

Each writer returns the shard's bytes; :func:`put` stores them at any fsspec URL, so the same
shard can be written to a local folder, ``memory://`` or the moto S3 server.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def vectors(
    n: int, d: int = 8, *, seed: int = 0, prefix: str = "img"
) -> tuple[list[str], np.ndarray]:
    """``n`` distinct paths ``{prefix}/{i:05d}.jpg`` and an (n, d) float32 array of known values."""
    rng = np.random.default_rng(seed)
    return [f"{prefix}/{i:05d}.jpg" for i in range(n)], rng.standard_normal(
        (n, d), dtype=np.float32
    )


def put(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> str:
    """Write ``data`` at ``url`` (any fsspec URL) and return the URL."""
    with fsspec.open(url, "wb", **dict(storage_options or {})) as f:
        f.write(data)
    return url


def frame(paths: Sequence[Any], X: np.ndarray, *, int_columns: bool = False) -> pd.DataFrame:
    """The seed notebook's layout: index = path, one column per dimension."""
    columns = list(range(X.shape[1])) if int_columns else [str(i) for i in range(X.shape[1])]
    return pd.DataFrame(X, index=pd.Index(list(paths)), columns=columns)


def wide_parquet(paths: Sequence[Any], X: np.ndarray, *, how: str = "index") -> bytes:
    """Wide Parquet. ``how``: ``index`` (unnamed index), ``named-index``, ``column`` (a
    ``path`` column, default RangeIndex) or ``int-columns`` (index, int column names)."""
    df = frame(paths, X, int_columns=how == "int-columns")
    if how == "named-index":
        df.index.name = "image"
    elif how == "column":
        df = df.reset_index(names="path")
    buf = io.BytesIO()
    df.to_parquet(buf)
    return buf.getvalue()


def list_parquet(paths: Sequence[Any], X: np.ndarray, *, list_type: str = "list") -> bytes:
    """``path`` + ``embedding`` Parquet; ``list_type``: ``list``, ``large_list``, ``fixed``."""
    n, d = X.shape
    values = pa.array(X.reshape(-1), type=pa.float32())
    if list_type == "fixed":
        emb = pa.FixedSizeListArray.from_arrays(values, d)
    elif list_type == "large_list":
        emb = pa.LargeListArray.from_arrays(pa.array(np.arange(n + 1) * d, pa.int64()), values)
    else:
        emb = pa.ListArray.from_arrays(pa.array(np.arange(n + 1) * d, pa.int32()), values)
    table = pa.table({"path": pa.array(list(paths), pa.string()), "embedding": emb})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def npz(paths: Sequence[Any], X: np.ndarray, *, paths_dtype: Any = str) -> bytes:
    """NPZ with ``paths`` (unicode unless told) and ``embeddings``."""
    buf = io.BytesIO()
    np.savez(buf, paths=np.asarray(list(paths), dtype=paths_dtype), embeddings=X)
    return buf.getvalue()


def csv(
    paths: Sequence[Any], X: np.ndarray, *, path_column: bool = True, gz: bool = False
) -> bytes:
    """Wide CSV: a ``path`` column (or the unnamed pandas index as first column)."""
    df = frame(paths, X)
    if path_column:
        data = df.reset_index(names="path").to_csv(index=False).encode()
    else:
        data = df.to_csv().encode()
    return gzip.compress(data) if gz else data


def pickle(paths: Sequence[Any], X: np.ndarray) -> bytes:
    """The seed notebook's ``features.pkl``: ``DataFrame.to_pickle`` of :func:`frame`."""
    buf = io.BytesIO()
    frame(paths, X, int_columns=True).to_pickle(buf)
    return buf.getvalue()
