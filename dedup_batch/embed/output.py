"""The embed output folder: feature shards, their model metadata, and ``embed-errors.csv``.

The one owner of this layout. ``embed`` writes and compacts it; ``plan`` reads the model
metadata of any shards it is given (:func:`default_eps`); ``load`` reads the shards as it reads
any ``path`` + ``embedding`` Parquet.

Layout of ``OUT/``::

    part-<run>-<seq>.parquet      one shard per batch of images, written by a Dask task
    part-<run>-c<seq>.parquet     a shard rewritten without rows that newer shards replace
    embed-errors.csv              path,reason,kind,size,mtime,etag: objects with no vector

``<run>`` is ``YYYYMMDDTHHMMSSZ-xxxxxx`` (UTC start time, random suffix), so the shards sort
by the run that wrote them. Shard columns: ``path`` (relative to the root), ``embedding``
(``fixed_size_list<float32>[dim]``), ``size`` (bytes), ``mtime`` (seconds since the epoch),
``etag`` (as the store gave it, or null), ``width``, ``height`` (pixels of the stored image) and
the model's extra columns (``quality`` for PDQ). The Parquet key-value metadata
``dedup_batch.model`` holds the model as JSON: ``{name, version, dim, default_eps, metric}``.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import logging
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ConfigError, InputError, StorageError
from ..storage import Store, expand_urls

__all__ = [
    "ERRORS_FILE",
    "ERROR_COLUMNS",
    "MODEL_KEY",
    "default_eps",
    "list_shards",
    "model_key",
    "new_run_id",
    "read_errors",
    "read_model",
    "read_state",
    "shard_bytes",
    "shard_name",
    "write_errors",
]

log = logging.getLogger(__name__)

#: Parquet key-value metadata key holding the model's JSON description.
MODEL_KEY = b"dedup_batch.model"
#: The list of objects that got no vector, under ``OUT/``.
ERRORS_FILE = "embed-errors.csv"
ERROR_COLUMNS = ["path", "reason", "kind", "size", "mtime", "etag"]
#: Columns read back from earlier shards to decide what changed (never the vectors).
STATE_COLUMNS = ["path", "size", "mtime", "etag"]
_SHARD_RE = re.compile(r"^part-(\d{8}T\d{6}Z-[0-9a-f]{6})-(c?)(\d{5,})\.parquet$")
#: Shard files whose footer or state columns are read at once (each read is a round trip).
_READ_THREADS = 16
#: Shard suffixes ``plan`` may be given (the rest carry no model metadata).
_PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")


def new_run_id() -> str:
    """A new run id: UTC start time (sorts by time) plus 6 random hex digits."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def shard_name(run_id: str, seq: int, *, compacted: bool = False) -> str:
    """``part-<run>-<seq>.parquet`` (``-c<seq>`` for a compacted shard)."""
    return f"part-{run_id}-{'c' if compacted else ''}{seq:05d}.parquet"


def shard_bytes(columns: Mapping[str, Any], *, dim: int, model_info: Mapping[str, Any]) -> bytes:
    """One shard as Parquet bytes.

    Parameters
    ----------
    columns : mapping
        ``path`` (str), ``embedding`` ((n, dim) float32), ``size``, ``mtime``, ``etag``,
        ``width``, ``height`` and any extra columns (e.g. ``quality``), each of length n.
    dim : int
        Vector length.
    model_info : mapping
        Stored as JSON under :data:`MODEL_KEY`.

    Notes
    -----
    Memory: about twice the vectors (``n × dim × 4`` bytes) while the file is encoded. ±1
    vectors compress to about a bit per value (dictionary encoding).
    """
    X = np.ascontiguousarray(columns["embedding"], dtype=np.float32).reshape(-1, dim)
    arrays = {
        "path": pa.array(list(columns["path"]), type=pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), dim),
        "size": pa.array(np.asarray(columns["size"], dtype=np.int64)),
        "mtime": pa.array(np.asarray(columns["mtime"], dtype=np.float64)),
        "etag": pa.array(list(columns["etag"]), type=pa.string()),
        "width": pa.array(np.asarray(columns["width"], dtype=np.int32)),
        "height": pa.array(np.asarray(columns["height"], dtype=np.int32)),
    }
    for name, values in columns.items():
        if name not in arrays:
            arrays[name] = pa.array(np.asarray(values))
    table = pa.table(arrays).replace_schema_metadata({MODEL_KEY: json.dumps(dict(model_info))})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _open(store: Store, full: str) -> Any:
    # A ranged reader: the footer and the chosen columns only, not the whole file. Storage has
    # no public ranged read yet; Store.fs is the job's filesystem with the job's options, and
    # fs.open takes the path literally (no glob expansion).
    return store.fs.open(full, "rb", block_size=1 << 16)


def _model_from(metadata: Mapping[bytes, bytes] | None, url: str) -> dict[str, Any] | None:
    raw = (metadata or {}).get(MODEL_KEY)
    if raw is None:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        info = None
    if not isinstance(info, dict) or not isinstance(info.get("name"), str):
        raise InputError(
            f"{url}: its {MODEL_KEY.decode()} metadata is not what dedup-batch embed writes; "
            "re-run 'dedup-batch embed' into a new folder"
        )
    return info


def list_shards(out: Store) -> list[str]:
    """Exact paths of the embed shards directly in ``out`` (by name), sorted by run."""
    names = out.list_files(out.root_path)
    shards = [p for p in names if _SHARD_RE.match(p.rsplit("/", 1)[-1])]
    others = [p for p in names if p.endswith(".parquet") and p not in shards]
    if others:
        log.warning(
            "embed: %d other Parquet file(s) in %s (e.g. %s) are not embed shards: ignored here, "
            "but a glob such as '*.parquet' would give them to plan",
            len(others),
            out.root,
            others[0],
        )
    return sorted(shards, key=lambda p: p.rsplit("/", 1)[-1])


def read_state(out: Store, shards: Sequence[str]) -> tuple[pd.DataFrame, dict[str, dict]]:
    """What earlier runs embedded: the state columns of every shard, and each shard's model.

    Returns
    -------
    state : DataFrame
        ``path, size, mtime, etag, shard, row``: one row per shard row, in shard order.
    models : dict
        Shard path -> model info (``None`` for a shard without the metadata).

    Notes
    -----
    Reads each shard's footer and its four state columns, never the vectors, ``_READ_THREADS``
    shards at a time. Memory: about 150 bytes per row (the paths as Python strings).
    """

    def one(full: str) -> tuple[pd.DataFrame, dict | None]:
        try:
            with _open(out, full) as fh:
                pf = pq.ParquetFile(fh)
                model = _model_from(pf.schema_arrow.metadata, out.url(full))
                missing = [c for c in STATE_COLUMNS if c not in pf.schema_arrow.names]
                if missing:
                    raise InputError(
                        f"{out.url(full)}: no {missing[0]!r} column: not an embed shard; move "
                        "it out of the output folder"
                    )
                table = pf.read(columns=STATE_COLUMNS)
        except (pa.ArrowException, ValueError) as exc:
            raise InputError(
                f"{out.url(full)} is not a readable Parquet file ({exc}); move it out of the "
                "output folder (its images are embedded again)"
            ) from None
        df = table.to_pandas()
        df["shard"] = full
        df["row"] = np.arange(len(df), dtype=np.int64)
        return df, model

    if not shards:
        empty = pd.DataFrame(columns=[*STATE_COLUMNS, "shard", "row"])
        return empty, {}
    with concurrent.futures.ThreadPoolExecutor(min(_READ_THREADS, len(shards))) as pool:
        got = list(pool.map(one, shards))
    state = pd.concat([df for df, _ in got], ignore_index=True)
    return state, {s: m for s, (_, m) in zip(shards, got, strict=True)}


def read_model(url: str, storage_options: Mapping[str, Any] | None = None) -> dict | None:
    """The model info in the footer of the Parquet shard at ``url`` (``None`` if it has none).

    Reads the footer only (a few KB), not the data.
    """
    store = Store(url, storage_options)
    try:
        with _open(store, store.root_path) as fh:
            meta = pq.read_metadata(fh).metadata
    except (pa.ArrowException, ValueError):
        return None  # not Parquet after all: load reports it, with its own message
    return _model_from(meta, url)


def default_eps(
    features: Sequence[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    metric: str = "euclidean",
) -> tuple[float, dict[str, Any]] | None:
    """The default eps of the model that made the shards ``features``, if they say.

    Parameters
    ----------
    features : sequence of str
        Shard URLs, globs or folders, as ``plan --features`` takes them.
    storage_options : mapping, optional
        fsspec options.
    metric : str, default "euclidean"
        The plan's metric: the model's eps is only meaningful in the model's metric.

    Returns
    -------
    (eps, model info), or None
        ``None`` unless every shard is a Parquet file that records a model (shards from
        elsewhere carry none: then ``--eps`` is required as before), or when ``features``
        cannot be expanded (``load`` then reports why, after the missing ``--eps``).

    Raises
    ------
    InputError
        Two shards record different models (name, version or dimension): vectors of
        different models cannot be compared; the message names both shards.
    ConfigError
        ``metric`` is not the model's metric (its eps would mean something else).

    Notes
    -----
    One footer read per shard (``_READ_THREADS`` at a time); the vectors are read by ``load``.
    """
    try:
        urls = expand_urls(list(features), storage_options, suffixes=_PARQUET_SUFFIXES)
    except (InputError, StorageError):
        return None  # no eps from here; '--eps is required' first, then load says what is wrong
    if not urls or not all(u.lower().endswith(_PARQUET_SUFFIXES) for u in urls):
        return None
    with concurrent.futures.ThreadPoolExecutor(min(_READ_THREADS, len(urls))) as pool:
        models = list(pool.map(lambda u: read_model(u, storage_options), urls))
    first: tuple[str, dict] | None = None
    for url, info in zip(urls, models, strict=True):
        if info is None:
            continue
        if first is None:
            first = (url, info)
        elif model_key(info) != model_key(first[1]):
            raise InputError(
                f"{first[0]} was made with model {_label(first[1])} but {url} with "
                f"{_label(info)}: vectors of different models cannot be compared; plan the "
                "shards of one model at a time (or re-embed them all with one model)"
            )
    if first is None or any(m is None for m in models):
        return None
    info = first[1]
    eps = info.get("default_eps")
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
        return None
    if info.get("metric", "euclidean") != metric:
        raise ConfigError(
            f"the shards' model {info.get('name')} sets its default eps for the "
            f"{info.get('metric')} metric, not {metric}: pass --eps, or drop --metric"
        )
    return float(eps), info


def model_key(info: Mapping[str, Any]) -> tuple[Any, ...]:
    """What must agree for two shards' vectors to be comparable: name, version, dimension."""
    return info.get("name"), info.get("version"), info.get("dim")


def _label(info: Mapping[str, Any]) -> str:
    return f"{info.get('name')} {info.get('version')} ({info.get('dim')} dims)"


def read_errors(out: Store) -> pd.DataFrame:
    """``embed-errors.csv`` of an earlier run (empty, with :data:`ERROR_COLUMNS`, if none)."""
    raw = out.read_bytes(f"{out.root_path}/{ERRORS_FILE}")
    if not raw:
        return pd.DataFrame(columns=ERROR_COLUMNS)
    try:
        df = pd.read_csv(io.BytesIO(raw), dtype={"path": str, "reason": str, "kind": str})
    except (ValueError, pd.errors.ParserError):
        log.warning("embed: %s is not readable: its objects are tried again", ERRORS_FILE)
        return pd.DataFrame(columns=ERROR_COLUMNS)
    for c in ERROR_COLUMNS:
        if c not in df.columns:
            df[c] = None
    return df[ERROR_COLUMNS]


def write_errors(out: Store, errors: pd.DataFrame) -> str:
    """Write ``embed-errors.csv`` (header only when there are none); returns its URL."""
    full = f"{out.root_path}/{ERRORS_FILE}"
    frame = errors.reindex(columns=ERROR_COLUMNS).sort_values("path", kind="stable")
    out.write_bytes(full, frame.to_csv(index=False).encode("utf-8"))
    return out.url(full)
