"""Load stage: read sharded feature files in parallel into one ``(n, d)`` float32 array.

Each shard is read, parsed and validated by one task (on a worker of the
``distributed.Client`` passed in, or on a local thread pool through
:func:`dedup_batch.executor.run_tasks`); the client only concatenates the validated pieces, in
shard order then row order, and collapses paths listed twice.

Accepted shard layouts, chosen by the file name's suffix (case-insensitive):

* ``.parquet`` / ``.pq`` / ``.parq``: "wide" (the path in a ``path`` column or the pandas
  index, every other column one numeric dimension: the seed notebook's layout) or "list"
  (``path`` + ``embedding``, a list or fixed-size-list column of numbers);
* ``.npz``: arrays ``paths`` (unicode) and ``embeddings`` (2-D numeric), read without pickle;
* ``.csv`` (also ``.csv.gz``, ``.csv.bz2``, ``.csv.xz``, ...): a ``path`` column (or else the
  first column) and numeric columns;
* ``.pkl`` / ``.pickle``: a pandas DataFrame as the wide layout, only with ``allow_pickle=True``
  because unpickling runs code from the file.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import uuid
import weakref
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from . import executor, storage
from .config import DISTRIBUTED
from .errors import ConfigError, DedupError, InputError, ScopeError, one_line
from .progress import Stage
from .storage import Store

if TYPE_CHECKING:
    import distributed

__all__ = ["SHARD_SUFFIXES", "DistributedFeatures", "Features", "load_features", "take_blocks"]

log = logging.getLogger(__name__)

#: Shard layouts by file-name suffix (lower case). CSV and pickle may also carry a compression
#: suffix (``.gz``, ``.bz2``, ``.xz``, ...); Parquet and NPZ compress internally.
SHARD_SUFFIXES: Mapping[str, str] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".parq": "parquet",
    ".npz": "npz",
    ".csv": "csv",
    ".pkl": "pickle",
    ".pickle": "pickle",
}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".lzma", ".zip")
_STREAM_LAYOUTS = ("csv", "pickle")
# What a folder URL expands to: every shard suffix, and the compressed stream layouts.
_FOLDER_SUFFIXES = (
    *SHARD_SUFFIXES,
    *(
        s + c
        for s, k in SHARD_SUFFIXES.items()
        if k in _STREAM_LAYOUTS
        for c in _COMPRESSION_SUFFIXES
    ),
)

#: Files that sit beside shards in an 'embed' output folder but are not shards (matched by
#: name when a folder or glob is expanded; a file named explicitly is read as given).
_NOT_SHARDS = frozenset({"embed-errors.csv"})

# Wide columns are interleaved into rows block by block: a (d, block) float32 scratch of about
# 1 MiB stays in cache while it is transposed, instead of d strided passes over the whole shard.
_BLOCK_BYTES = 1 << 20

# The client fetches pieces from the workers in batches of about this many bytes: several
# pieces travel at once (from several workers), while the client holds at most one batch
# besides the result.
_FETCH_BYTES = 64 << 20

# Duplicate vectors are compared in chunks of this many rows, so that comparing a whole shard
# listed twice never copies more than ~this × d × 8 bytes at once.
_DUP_CHUNK = 65536

# Threads for the local pool: the concurrent.futures default. Reading is mostly waiting on
# storage and pyarrow/numpy release the GIL while parsing, so more threads than cores pay off.
_LOCAL_THREADS = min(32, (os.cpu_count() or 1) + 4)

# 'auto' keeps the vectors on the workers when X would take more than this share of the
# smallest worker's memory limit or of the client's available memory: the in-process engine
# holds X, its float32 prepared copy and factors (about 2.3 X) plus tiles, and under Dask it
# broadcasts the prepared copy to every worker, whose nanny restarts it at 95% of its limit.
_AUTO_SHARE = 0.25

# Buckets of the distributed duplicate-path check: each shard splits its canonical paths by
# hash into this many buckets (at most), and one task per bucket finds the paths listed twice.
# Paths move once between workers (about 100 bytes per row); the client receives only the
# row numbers of duplicates.
_DUP_BUCKETS = 32

_PICKLE_REFUSED = (
    "{url}: pickle shards run code when read; pass --allow-pickle only if you trust this file, "
    "or convert it to Parquet"
)


@dataclass(frozen=True, eq=False)
class Features:
    """The loaded embeddings.

    Attributes
    ----------
    paths : ndarray of object, shape (n,)
        The image paths (``str``) relative to the root, in canonical form (see
        :meth:`~dedup_batch.storage.Store.resolve`): each object listed once, by one spelling.
    X : ndarray of float32, shape (n, d)
        The embeddings, C-contiguous; row ``i`` belongs to ``paths[i]``.
    shards : tuple of str
        URLs of the shards read, in read order (sorted).
    """

    paths: np.ndarray
    X: np.ndarray
    shards: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class DistributedFeatures:
    """The loaded embeddings, left on the Dask workers (``distributed`` chosen).

    Attributes
    ----------
    paths : dask.dataframe.DataFrame
        One ``path`` column (``string``): the canonical paths relative to the root, one
        partition per non-empty shard, aligned row for row with ``X``'s row blocks.
    X : dask.array.Array of float32, shape (n, d)
        Each row block is one shard's validated vectors (duplicates removed), computed by the
        worker that read the shard. Its graph is the pure read and select tasks (no futures):
        while ``held`` holds them the blocks are in worker memory and reused by anything
        computed from ``X``; once released (a fit takes them, see :func:`take_blocks`), or
        lost with a worker, a block is recomputed by reading its shard again.
    shards : tuple of str
        URLs of the shards read, in read order (sorted).
    held : _Held
        The futures keeping ``X``'s blocks in worker memory until a fit takes them.

    Notes
    -----
    Memory: ``n × d × 4`` bytes spread over the workers (each block where it was read) while
    held, and about 100 bytes per path; the client holds the task graph only (a few KB per
    shard).
    """

    paths: Any
    X: Any
    shards: tuple[str, ...]
    held: _Held | None = field(default=None, repr=False)

    def path_array(self) -> np.ndarray:
        """The paths on the client: (n,) object array of ``str`` (about 100 bytes per row)."""
        return self.paths["path"].compute().to_numpy(dtype=object)


def load_features(
    urls: str | Sequence[str],
    *,
    store: Store,
    storage_options: Mapping[str, Any] | None = None,
    allow_pickle: bool = False,
    client: distributed.Client | None = None,
    distributed: str = "never",
) -> Features | DistributedFeatures:
    """Read feature shards in parallel and gather them into one array, or leave them on the
    workers.

    Parameters
    ----------
    urls : str or sequence of str
        URLs, glob patterns or folders of shards (``./features/*.parquet``,
        ``s3://bucket/features/part-*.parquet``, ``memory://features``). Expanded through
        fsspec and sorted; each must match at least one file.
    store : Store
        The job's root. Every path in the shards must resolve under it (``store.resolve``).
    storage_options : mapping, optional
        fsspec options for reading the shards (credentials, ``endpoint_url``); none when not
        given. Workers receive them with the tasks.
    allow_pickle : bool, default False
        Read ``.pkl``/``.pickle`` shards. Unpickling runs code from the file: only for files
        you trust.
    client : distributed.Client, optional
        Read one shard per task on this cluster's workers; without it, a local thread pool
        (:func:`dedup_batch.executor.run_tasks`) reads them in this process. With a client the
        reads are submitted here, not through ``run_tasks``: their pieces must stay on the
        workers as futures (fetched in bounded batches below, or left there as
        :class:`DistributedFeatures`), while ``run_tasks`` releases each result once read.
    distributed : {"never", "auto", "always"}, default "never"
        ``always`` (needs ``client``): return :class:`DistributedFeatures`, whose vectors
        stay on the workers that read and validated them; the duplicate-path check runs there
        too (paths bucketed by hash, one task per bucket). ``auto``: the same when ``X``
        (``n × d × 4`` bytes, known once the shards are read) would take more than a quarter
        of the smallest worker's memory limit or of the client's available memory, else
        gathered. ``never``: gathered.

    Returns
    -------
    Features or DistributedFeatures
        ``paths`` (n,), ``X`` (n, d) float32 C-contiguous, ``shards``. Rows come in shard
        order, then row order. A path listed twice (also as two spellings of one object, e.g.
        ``a.jpg``, ``./a.jpg`` and ``x/../a.jpg``-free forms like ``x//a.jpg``) with identical
        vectors is kept once, at its first place, under its canonical relative path.

    Raises
    ------
    InputError
        No shard or no row at all; an unknown suffix; a corrupt file; a shard without a path
        column or with a non-numeric feature column; non-text paths; NaN or infinite values;
        dimensions that differ between shards; a path listed twice with different vectors;
        a pickle shard without ``allow_pickle``.
    ScopeError
        A path that resolves outside ``store``'s root.
    StorageError
        The storage cannot be reached or refuses us (endpoint, credentials, bucket).

    Notes
    -----
    Memory on the client: the result, ``n × d × 4`` bytes for ``X`` plus about 100 bytes per
    path; ``X`` is allocated once and filled, never concatenated from a list of pieces, and
    removing duplicate paths compacts it in place.

    * With ``client``: workers keep their finished pieces (``n × d × 4`` bytes over the
      whole cluster) until the client fetches them, in batches of about 64 MB (at least one
      shard), each copied into ``X`` and freed before the next: the client's peak is about
      ``X`` plus one batch.
    * Without: the pieces are read into this process, then copied into ``X`` one by one,
      each freed once copied; since the pages of ``X`` are committed as they are written, the
      peak stays near one copy of ``X`` plus the reading threads' working memory.

    Memory per task: about three times the shard's decoded size (the file's bytes, the
    decoded table and the float32 piece), for one shard per thread (a worker's threads, or
    ``min(32, cores + 4)`` threads here without ``client``).

    Time: one whole-object read per shard, parsing in pyarrow/numpy (no per-row Python loops
    over the vectors), plus one Python call per path to check it against the root.
    """
    if distributed not in DISTRIBUTED:
        raise ValueError(f"distributed must be one of {DISTRIBUTED}, got {distributed!r}")
    if distributed == "always" and client is None:
        raise ConfigError(
            "distributed: always needs a Dask cluster (--scheduler, or the LocalCluster the "
            "CLI starts); use 'auto' or 'never' without one"
        )
    if isinstance(urls, str):
        urls = [urls]
    if not urls:
        raise InputError("no feature shards given: pass one or more shard URLs or globs")
    opts = dict(storage_options or {})
    shards = [
        u
        for u in storage.expand_urls(list(urls), opts, suffixes=_FOLDER_SUFFIXES)
        if u in urls or u.rsplit("/", 1)[-1] not in _NOT_SHARDS
    ]
    if not shards:
        raise InputError(f"{urls[0]}: holds no feature shard; check the path or pattern")
    for url in shards:
        # Refuse unknown formats and unwanted pickles before reading anything.
        if _layout(url) == "pickle" and not allow_pickle:
            raise InputError(_PICKLE_REFUSED.format(url=url))
    log.info(
        "load: reading %d shard(s) (%s%s)",
        len(shards),
        shards[0],
        ", ..." if len(shards) > 1 else "",
    )

    if client is not None:
        # One pure read task per shard, named for this load (a shard rewritten since an
        # earlier load is read again): the scheduler keeps these tasks as the lineage of the
        # blocks left on the workers, so a block lost with its worker is read again.
        reads = _read_tasks(shards, opts, allow_pickle, store)
        futures = client.compute(reads)
        # Only the pieces' shapes travel first (computed where the pieces are): the client then
        # allocates the result once and fetches the pieces in bounded batches, copying and
        # freeing each batch before the next, so it never holds the pieces and X at once.
        metas = executor.gather(client, client.map(_piece_meta, futures, pure=False), what="load")
        _raise_first_error(metas)
        if distributed == "always" or (distributed == "auto" and _too_big_to_gather(client, metas)):
            return _on_workers(client, shards, metas, reads, futures)

        def fetch(rows: list[int]) -> list[Any]:
            got = client.gather([futures[i] for i in rows])
            for i in rows:
                futures[i] = None  # the worker may drop its copy now
            return got

    else:

        def read(i: int) -> Any:
            return _read_shard_task(
                shards[i], storage_options=opts, allow_pickle=allow_pickle, store=store
            )

        # In-process pieces are separate allocations, each freed as soon as it is copied. The
        # shards' progress goes to a detached stage: the load stage's display is unchanged.
        pieces: list[Any] = [None] * len(shards)
        for i, fut in executor.run_tasks(
            read,
            range(len(shards)),
            threads=min(_LOCAL_THREADS, len(shards)),
            progress=Stage("load", unit="shards"),
            name="load",
        ):
            pieces[i] = fut.result()
        metas = [_piece_meta(p) for p in pieces]
        # Arrow's memory pool keeps what the reading threads freed (their tables: several
        # shards' worth); hand it back once before X is allocated. Once per load: the call is
        # too slow to make per shard.
        pa.default_memory_pool().release_unused()

        def fetch(rows: list[int]) -> list[Any]:
            got = [pieces[i] for i in rows]
            for i in rows:
                pieces[i] = None
            return got

    _raise_first_error(metas)
    return _gather(shards, metas, fetch)


def _raise_first_error(metas: list[Any]) -> None:
    """The first failing shard in read order decides the error, whatever finished first."""
    for meta in metas:
        if isinstance(meta, DedupError):
            raise meta


def _piece_meta(res: Any) -> tuple[int, int] | DedupError:
    """``(rows, dims)`` of a shard's piece, or its error."""
    return res if isinstance(res, DedupError) else (len(res[0]), res[1].shape[1])


# -- vectors left on the workers --------------------------------------------------------------
class _Held:
    """The futures that keep a loaded ``X``'s blocks in worker memory (one per block)."""

    def __init__(self, futures: list[Any]) -> None:
        self.futures = futures


# X's name -> what holds its blocks; weak: the blocks live as long as their DistributedFeatures
# (or until a fit takes them), never because of this table.
_HELD: weakref.WeakValueDictionary[str, _Held] = weakref.WeakValueDictionary()


def take_blocks(X: Any) -> list[Any]:
    """Take over the futures that hold the blocks of ``X`` (a ``DistributedFeatures.X``) in
    worker memory; ``[]`` for any other array or when already taken.

    The caller becomes their only holder: once it drops them, each block's memory is freed as
    soon as no pending task needs it, and ``X`` stays usable (a block computed again reads
    its shard again). ``cluster_dask`` takes them so that a worker holds its share of X once
    (the reordered blocks) rather than twice while it fits.
    """
    held = _HELD.get(getattr(X, "name", ""))
    if held is None:
        return []
    futures, held.futures = held.futures, []
    return futures


def _read_tasks(
    shards: list[str], opts: dict[str, Any], allow_pickle: bool, store: Store
) -> list[Any]:
    """One ``dask.delayed`` read-and-validate task per shard, keyed by this load and the
    shard's place (pure: running it again gives the same piece)."""
    import dask

    tag = uuid.uuid4().hex
    read = dask.delayed(_read_shard_task, pure=True)
    return [
        read(
            url,
            storage_options=opts,
            allow_pickle=allow_pickle,
            store=store,
            dask_key_name=f"load-read-{tag}-{i}",
        )
        for i, url in enumerate(shards)
    ]


def _too_big_to_gather(client: distributed.Client, metas: list[tuple[int, int]]) -> bool:
    """``auto``: would X take more than ``_AUTO_SHARE`` of the smallest worker's memory limit
    or of the client's available memory?"""
    import psutil

    n = sum(m for m, _ in metas)
    d = max((dm for m, dm in metas if m), default=0)
    nbytes = n * d * 4
    limits = [
        w.get("memory_limit") or 0
        for w in client.scheduler_info(n_workers=-1).get("workers", {}).values()
    ]
    room = min([x for x in limits if x > 0] + [psutil.virtual_memory().available])
    big = nbytes > _AUTO_SHARE * room
    log.info(
        "load: X is %.1f MB, %s a quarter of %.1f MB (smallest worker limit or client's free "
        "memory): %s",
        nbytes / 1e6,
        "over" if big else "within",
        room / 1e6,
        "the vectors stay on the workers" if big else "gathered on the client",
    )
    return big


def _on_workers(
    client: distributed.Client,
    shards: list[str],
    metas: list[tuple[int, int]],
    reads: list[Any],
    futures: list[Any],
) -> DistributedFeatures:
    """The read pieces (``reads``, one delayed task per shard, computed as ``futures``) as a
    ``dask.array`` whose blocks are held on the workers, and a dask dataframe of paths,
    duplicates removed by a check that runs on the workers."""
    import dask
    import dask.array as da
    import dask.dataframe as dd
    from distributed import futures_of

    sizes = [m for m, _ in metas]
    n, d = _shape(shards, metas)
    starts = np.zeros(len(shards) + 1, dtype=np.int64)
    starts[1:] = np.cumsum(sizes)
    drop = _distributed_duplicates(client, shards, starts, futures)
    blocks, paths = [], []
    vectors = dask.delayed(_piece_vectors, pure=True)
    for i, (read, fut) in enumerate(zip(reads, futures, strict=True)):
        rows = drop[(drop >= starts[i]) & (drop < starts[i + 1])] - starts[i]
        m = sizes[i] - len(rows)
        if m == 0:
            continue
        # from the read *task*, not its future: X's graph is its own lineage, so a block lost
        # with its worker (or released by a fit) is computed again from its shard
        x = vectors(read, rows, dask_key_name=f"{read.key}-vectors")
        blocks.append(da.from_delayed(x, shape=(m, d), dtype=np.float32))
        paths.append(client.submit(_piece_paths, fut, rows, pure=False))
    X = da.concatenate(blocks, axis=0)
    # the blocks are computed where their piece is (the worker that read the shard) and held
    # by ``held``; the pieces they came from are released with ``futures``
    held = _Held(futures_of(client.persist(X)))
    _HELD[X.name] = held
    for _ in executor.finished(client, set(held.futures), what="load"):
        pass  # the load stage ends when the blocks are in place
    meta = pd.DataFrame({"path": pd.array([], dtype="string")})
    frame = dd.from_delayed(paths, meta=meta, verify_meta=False)
    log.info(
        "load: %d rows × %d dims (%.1f MB) from %d shard(s), left on the workers in %d blocks",
        n - len(drop),
        d,
        (n - len(drop)) * d * 4 / 1e6,
        len(shards),
        len(blocks),
    )
    return DistributedFeatures(paths=frame, X=X, shards=tuple(shards), held=held)


def _distributed_duplicates(
    client: distributed.Client, shards: list[str], starts: np.ndarray, reads: list[Any]
) -> np.ndarray:
    """Global row numbers to drop (each a later listing of an object with an identical
    vector), found on the workers; raises :class:`InputError` for an object listed twice with
    different vectors (the first such row in read order), as :func:`_drop_duplicates` does.

    Each shard splits its canonical paths by hash into ``b`` buckets; one task per bucket
    finds the paths listed more than once (exact string comparison) and returns ``(row,
    first row)`` pairs; one task per pair of shards compares those rows' vectors. Bytes moved:
    the paths once (~100 bytes per row); the client receives two int64 per duplicate row.
    """
    import operator

    nb = max(1, min(_DUP_BUCKETS, len(shards)))
    split = client.map(_split_keys, reads, [int(x) for x in starts[:-1]], nb=nb, pure=False)
    buckets = [
        client.submit(
            _bucket_duplicates, *[client.submit(operator.getitem, f, b, pure=False) for f in split]
        )
        for b in range(nb)
    ]
    pairs = executor.gather(client, buckets, what="load")
    del split, buckets
    dup = np.concatenate([p[0] for p in pairs])
    orig = np.concatenate([p[1] for p in pairs])
    if len(dup) == 0:
        return dup
    shard_of = np.searchsorted(starts, np.stack([dup, orig]), side="right") - 1
    checks = []
    for sa, sb in {(int(a), int(b)) for a, b in shard_of.T}:
        sel = (shard_of[0] == sa) & (shard_of[1] == sb)
        checks.append(
            client.submit(
                _first_differing,
                reads[sa],
                reads[sb],
                dup[sel] - starts[sa],
                orig[sel] - starts[sb],
                dup[sel],
                orig[sel],
                pure=False,
            )
        )
    found = [c for c in executor.gather(client, checks, what="load") if c is not None]
    if found:
        r, o, path_r, path_o, key = min(found)
        raise InputError(
            f"path {path_r!r} at {_where(r, shards, starts)} names the same object "
            f"({key!r}) as {path_o!r} at {_where(o, shards, starts)}, with a "
            "different vector; remove one of the two rows"
        )
    first = int(dup.argmin())
    log.info(
        "load: %d path(s) listed more than once with identical vectors: kept the first "
        "occurrence of each (e.g. row %s)",
        len(dup),
        _where(int(dup[first]), shards, starts),
    )
    return np.sort(dup)


def _canonical(piece: tuple[np.ndarray, np.ndarray, dict[int, str]]) -> np.ndarray:
    """A piece's canonical paths (the written path unless ``aliases`` says otherwise)."""
    paths, _, aliases = piece
    if not aliases:
        return paths
    keys = paths.copy()
    for row, rel in aliases.items():
        keys[row] = rel
    return keys


def _split_keys(piece: Any, start: int, *, nb: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Dask task: a shard's ``(canonical paths, global rows)`` split into ``nb`` buckets by
    hash (the same path lands in the same bucket from every shard)."""
    keys = _canonical(piece)
    rows = np.arange(start, start + len(keys), dtype=np.int64)
    if nb == 1:
        return [(keys, rows)]
    bucket = pd.util.hash_array(keys) % np.uint64(nb)
    return [(keys[bucket == b], rows[bucket == b]) for b in range(nb)]


def _bucket_duplicates(*parts: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Dask task: ``(rows, first rows)`` of the paths listed more than once in a bucket."""
    keys = np.concatenate([k for k, _ in parts]) if parts else np.empty(0, object)
    rows = np.concatenate([r for _, r in parts]) if parts else np.empty(0, np.int64)
    order = np.argsort(rows, kind="stable")
    keys, rows = keys[order], rows[order]
    codes, uniques = pd.factorize(keys)
    if len(uniques) == len(keys):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    _, first = np.unique(codes, return_index=True)
    dup = np.flatnonzero(first[codes] != np.arange(len(keys)))
    return rows[dup], rows[first[codes[dup]]]


def _first_differing(
    a: Any,
    b: Any,
    rows_a: np.ndarray,
    rows_b: np.ndarray,
    global_a: np.ndarray,
    global_b: np.ndarray,
) -> tuple[int, int, str, str, str] | None:
    """Dask task: of the pairs (row ``rows_a[k]`` of shard piece ``a``, row ``rows_b[k]`` of
    piece ``b``) naming one object, the first in read order whose vectors differ, as ``(global
    row, global row of the first listing, its path, the first listing's path, canonical
    path)``; ``None`` when every pair is identical."""
    differs = np.flatnonzero(np.any(a[1][rows_a] != b[1][rows_b], axis=1))
    if len(differs) == 0:
        return None
    k = int(differs[np.argmin(global_a[differs])])
    key = str(_canonical(a)[rows_a[k]])
    return int(global_a[k]), int(global_b[k]), str(a[0][rows_a[k]]), str(b[0][rows_b[k]]), key


def _piece_vectors(piece: Any, drop: np.ndarray) -> np.ndarray:
    """Dask task: a piece's vectors without the rows ``drop`` (m, d) float32 C-contiguous."""
    X = piece[1]
    return np.delete(X, drop, axis=0) if len(drop) else X


def _piece_paths(piece: Any, drop: np.ndarray) -> pd.DataFrame:
    """Dask task: a piece's canonical paths without the rows ``drop``, as a one-column frame."""
    keys = _canonical(piece)
    if len(drop):
        keys = np.delete(keys, drop)
    return pd.DataFrame({"path": pd.array(keys, dtype="string")})


# -- client side ----------------------------------------------------------------------------
def _gather(
    shards: list[str], metas: list[tuple[int, int]], fetch: Callable[[list[int]], list[Any]]
) -> Features:
    """Copy the shards' pieces into one array, then collapse duplicate paths.

    ``fetch(rows)`` returns the pieces ``(paths, X, aliases)`` of the shards numbered
    ``rows`` and drops every other reference to them, so that each batch is freed as soon as
    it has been copied. Batches hold about ``_FETCH_BYTES`` of vectors (at least one shard).
    """
    sizes = [m for m, _ in metas]
    n, d = _shape(shards, metas)
    # np.empty commits pages only as they are written: with each piece freed once copied,
    # the process holds about one copy of X (plus one piece), not two.
    X = np.empty((n, d), dtype=np.float32)
    paths = np.empty(n, dtype=object)
    aliases: dict[int, str] = {}
    starts = np.zeros(len(shards) + 1, dtype=np.int64)
    starts[1:] = np.cumsum(sizes)
    for batch in _batches(sizes, d):
        pieces = fetch(batch)
        for i, piece in zip(batch, pieces, strict=True):
            at, m = int(starts[i]), sizes[i]
            if m:
                p, x, a = piece
                X[at : at + m] = x
                paths[at : at + m] = p
                aliases.update((at + r, v) for r, v in a.items())
        del pieces, piece

    X, paths = _drop_duplicates(X, paths, aliases, shards, starts)
    log.info(
        "load: %d rows × %d dims (%.1f MB) from %d shard(s)",
        X.shape[0],
        d,
        X.nbytes / 1e6,
        len(shards),
    )
    return Features(paths=paths, X=X, shards=tuple(shards))


def _shape(shards: list[str], metas: list[tuple[int, int]]) -> tuple[int, int]:
    """``(n, d)`` over all shards; refuses no rows at all and dimensions that differ."""
    sizes = [m for m, _ in metas]
    n = sum(sizes)
    if n == 0:
        raise InputError(
            f"no feature rows in {len(shards)} shard(s) ({shards[0]}"
            f"{', ...' if len(shards) > 1 else ''}); check that the export wrote any data"
        )
    first = next(i for i, m in enumerate(sizes) if m)
    d = metas[first][1]
    for url, (m, dm) in zip(shards, metas, strict=True):
        if m and dm != d:
            raise InputError(
                f"{url} has {dm}-dimensional vectors but {shards[first]} has {d}; "
                "all shards must come from the same model: re-export the odd one"
            )
        if not m:
            log.warning("load: %s has no rows", url)
    return n, d


def _batches(sizes: list[int], d: int) -> list[list[int]]:
    """Consecutive shard numbers grouped into batches of about ``_FETCH_BYTES`` of vectors."""
    batches: list[list[int]] = [[]]
    held = 0
    for i, m in enumerate(sizes):
        if batches[-1] and held + m * d * 4 > _FETCH_BYTES:
            batches.append([])
            held = 0
        batches[-1].append(i)
        held += m * d * 4
    return batches


def _drop_duplicates(
    X: np.ndarray,
    paths: np.ndarray,
    aliases: Mapping[int, str],
    shards: list[str],
    starts: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first row of each object; refuse the same object with differing vectors.

    Objects are compared by their canonical path relative to the root (see
    :meth:`Store.resolve`; ``aliases`` gives it for the rows where it differs from the written
    path), so two spellings of one object (``a.jpg``, ``./a.jpg``, ``x//a.jpg`` on a disk,
    ``album/a.jpg`` through a linked folder) count as one: keeping both would let the plan
    delete the object it keeps. Returns the canonical paths: from here on every stage names
    each object by exactly one string.
    """
    n = len(paths)
    if aliases:
        keys = paths.copy()  # a copy of n pointers, not of the strings
        for row, rel in aliases.items():
            keys[row] = rel
    else:
        keys = paths
    codes, uniques = pd.factorize(keys)
    if len(uniques) == n:
        return X, keys
    # factorize numbers objects in order of first appearance, so return_index gives each
    # object's first row.
    _, first_row = np.unique(codes, return_index=True)
    dup_rows = np.flatnonzero(first_row[codes] != np.arange(n))
    for lo in range(0, len(dup_rows), _DUP_CHUNK):
        rows = dup_rows[lo : lo + _DUP_CHUNK]
        orig = first_row[codes[rows]]
        differs = np.flatnonzero(np.any(X[rows] != X[orig], axis=1))
        if len(differs):
            r, o = int(rows[differs[0]]), int(orig[differs[0]])
            raise InputError(
                f"path {paths[r]!r} at {_where(r, shards, starts)} names the same object "
                f"({keys[r]!r}) as {paths[o]!r} at {_where(o, shards, starts)}, with a "
                "different vector; remove one of the two rows"
            )
    log.info(
        "load: %d path(s) listed more than once with identical vectors: kept the first "
        "occurrence of each (e.g. %r at %s)",
        len(dup_rows),
        paths[dup_rows[0]],
        _where(int(dup_rows[0]), shards, starts),
    )
    keep = np.ones(n, dtype=bool)
    keep[dup_rows] = False
    kept = np.flatnonzero(keep)
    # Compact in place, front to back: row kept[j] >= j, so each chunk reads only rows that
    # no earlier chunk has overwritten, and no second n × d array is allocated.
    step = max(1, _BLOCK_BYTES // max(1, X.shape[1] * 4))
    for lo in range(0, len(kept), step):
        rows = kept[lo : lo + step]
        X[lo : lo + len(rows)] = X[rows]
    return X[: len(kept)], keys[kept]


def _where(row: int, shards: list[str], starts: np.ndarray) -> str:
    """``<shard> row <i>`` for a global row number."""
    s = int(np.searchsorted(starts, row, side="right")) - 1
    return f"{shards[s]} row {row - int(starts[s])}"


# -- worker side ----------------------------------------------------------------------------
def _layout(url: str) -> str:
    """The layout of a shard by its suffix (compression suffix allowed for CSV and pickle)."""
    name = url.lower()
    for comp in _COMPRESSION_SUFFIXES:
        if name.endswith(comp):
            base = name[: -len(comp)]
            for suffix, kind in SHARD_SUFFIXES.items():
                if base.endswith(suffix) and kind in _STREAM_LAYOUTS:
                    return kind
    for suffix, kind in SHARD_SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    raise InputError(
        f"{url}: unknown shard format; expected one of {', '.join(SHARD_SUFFIXES)} "
        "(CSV and pickle may be compressed, e.g. .csv.gz)"
    )


def _read_shard_task(
    url: str, *, storage_options: Mapping[str, Any], allow_pickle: bool, store: Store
) -> tuple[np.ndarray, np.ndarray, dict[int, str]] | DedupError:
    """Dask task: read and validate one shard.

    Returns ``(paths, X, aliases)`` (paths as written, float32 (m, d) C-contiguous, and
    ``{row: path relative to the root}`` for the rows written otherwise), or the
    ``DedupError`` describing what is wrong with the shard: returned, not raised, so the
    client reports the first bad shard in read order and the workers do not log user errors
    as task failures.
    """
    try:
        return _read_shard(url, storage_options, allow_pickle, store)
    except DedupError as exc:
        return exc


def _read_shard(
    url: str, storage_options: Mapping[str, Any], allow_pickle: bool, store: Store
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    kind = _layout(url)
    if kind == "pickle" and not allow_pickle:
        raise InputError(_PICKLE_REFUSED.format(url=url))
    if kind == "parquet":
        paths, X, columns = _read_parquet(url, storage.read_bytes(url, storage_options))
    elif kind == "npz":
        paths, X, columns = _read_npz(url, storage.read_bytes(url, storage_options))
    elif kind == "csv":
        raw = storage.read_bytes(url, storage_options, compression="infer")
        paths, X, columns = _read_csv(url, raw)
    else:
        raw = storage.read_bytes(url, storage_options, compression="infer")
        paths, X, columns = _read_pickle(url, raw)
    _check_finite(url, paths, X, columns)
    return paths, X, _check_paths(url, paths, store)


def _read_parquet(url: str, raw: bytes) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    try:
        pf = pq.ParquetFile(pa.BufferReader(raw))
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InputError(
            f"{url} is not a valid Parquet file ({one_line(exc)}); re-export it"
        ) from None
    names = list(schema.names)
    _check_unique(url, names)
    bad_meta = InputError(
        f"{url}: its pandas metadata (the Parquet key b'pandas') is not what pandas writes; "
        "re-export the shard with pandas, or drop that key (pyarrow: "
        "table.replace_schema_metadata())"
    )
    try:
        meta = schema.pandas_metadata or {}
    except ValueError:  # not JSON
        raise bad_meta from None
    index_cols = meta.get("index_columns", []) if isinstance(meta, dict) else None
    if not isinstance(index_cols, list):
        raise bad_meta
    index_cols = [c for c in index_cols if isinstance(c, str)]
    if "path" in names:
        path_col = "path"
    elif len(index_cols) == 1:
        path_col = index_cols[0]
    else:
        raise InputError(
            f"{url}: no path column; name the column of image paths 'path' "
            "(or store the paths as the DataFrame's index)"
        )
    is_list = "embedding" in names and _is_list_type(schema.field("embedding").type)
    if is_list:
        columns = [path_col, "embedding"]
    else:
        columns = [c for c in names if c != path_col and c not in index_cols]
        if not columns:
            raise InputError(f"{url}: no feature columns besides {path_col!r}")
        for c in columns:
            t = schema.field(c).type
            if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
                raise InputError(
                    f"{url}: column {c!r} is {t}, not numeric; every column besides the path "
                    "must hold one embedding dimension (drop it, or use 'path' + 'embedding')"
                )
        columns = [path_col, *columns]
    try:
        table = pf.read(columns=columns)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InputError(
            f"{url} is not a valid Parquet file ({one_line(exc)}); re-export it"
        ) from None
    del pf, raw
    paths = _text_column(url, table.column(path_col), path_col)
    if is_list:
        return paths, _list_to_matrix(url, table.column("embedding"), paths), None
    features = columns[1:]
    return paths, _columns_to_matrix([table.column(c) for c in features]), features


def _is_list_type(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _text_column(url: str, col: pa.ChunkedArray, name: str) -> np.ndarray:
    """An Arrow column of paths as an object array of ``str``."""
    if len(col) == 0:  # an empty pandas index is stored with type null: nothing to check
        return np.empty(0, dtype=object)
    t = col.type
    if pa.types.is_dictionary(t) and (
        pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)
    ):
        col = col.cast(t.value_type)
        t = col.type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)):
        raise InputError(
            f"{url}: path column {name!r} is {t}, not text; store the paths as strings"
        )
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputError(f"{url}: row {row} has no path (null); fill in or drop the row")
    return col.to_numpy(zero_copy_only=False).astype(object, copy=False)


def _columns_to_matrix(cols: list[pa.ChunkedArray]) -> np.ndarray:
    """Interleave ``d`` numeric columns into an ``(n, d)`` float32 C-contiguous array.

    Nulls become NaN (rejected afterwards). Works in row blocks of about ``_BLOCK_BYTES``.
    """
    arrays = [c.to_numpy() for c in cols]  # zero-copy for float columns without nulls
    d = len(arrays)
    n = len(arrays[0]) if arrays else 0
    out = np.empty((n, d), dtype=np.float32)
    step = max(1, _BLOCK_BYTES // (4 * d))
    block = np.empty((d, step), dtype=np.float32)
    # float64 beyond float32 range casts to inf, which _check_finite reports with its row.
    with np.errstate(over="ignore"):
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            for k, a in enumerate(arrays):
                block[k, : hi - lo] = a[lo:hi]
            out[lo:hi] = block[:, : hi - lo].T
    return out


def _list_to_matrix(url: str, col: pa.ChunkedArray, paths: np.ndarray) -> np.ndarray:
    """A list / fixed-size-list column of numbers as ``(n, d)`` float32, without row loops."""
    arr = col.combine_chunks()
    n = len(arr)
    if arr.null_count:
        row = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputError(
            f"{url}: row {row} (path {paths[row]!r}) has no embedding (null); "
            "fill in or drop the row"
        )
    vt = arr.type.value_type
    if not (pa.types.is_integer(vt) or pa.types.is_floating(vt)):
        raise InputError(
            f"{url}: column 'embedding' holds {vt}, not numbers; store lists of floats"
        )
    if pa.types.is_fixed_size_list(arr.type):
        d = arr.type.list_size
    else:
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        d = int(lengths[0]) if n else 0
        bad = np.flatnonzero(lengths != d)
        if len(bad):
            row = int(bad[0])
            raise InputError(
                f"{url}: row {row} (path {paths[row]!r}) has a {int(lengths[row])}-dimensional "
                f"embedding but row 0 has {d}; all embeddings must have the same length"
            )
    if n and d == 0:
        raise InputError(
            f"{url}: row 0 (path {paths[0]!r}) has an empty embedding (0 dimensions); "
            "re-export the shard with the vectors"
        )
    values = arr.flatten().to_numpy(zero_copy_only=False)  # nulls -> NaN, rejected afterwards
    # Always copy into numpy's own memory, even for float32 values that could be viewed in
    # place: a view would keep the whole Arrow table alive (and Arrow's memory pool keeps
    # what it frees), so the pieces waiting to be gathered would cost twice their size.
    out = np.empty((n, d), dtype=np.float32)
    with np.errstate(over="ignore"):  # beyond float32 range -> inf, rejected afterwards
        out.reshape(-1)[:] = values
    return out


def _read_npz(url: str, raw: bytes) -> tuple[np.ndarray, np.ndarray, None]:
    # np.load takes anything that is not a zip for a pickle: check the zip signature first so
    # that a damaged file reads as damaged, not as "pickled data".
    if not raw.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise InputError(f"{url} is not a valid NPZ (zip) file; re-export it with np.savez")
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            missing = {"paths", "embeddings"} - set(npz.files)
            if missing:
                raise InputError(
                    f"{url}: NPZ shard has arrays {sorted(npz.files)}; expected 'paths' and "
                    "'embeddings' (np.savez(f, paths=..., embeddings=...))"
                )
            paths = _npz_array(url, npz, "paths")
            emb = _npz_array(url, npz, "embeddings")
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise InputError(f"{url} is not a valid NPZ file ({one_line(exc)}); re-export it") from None
    if paths.ndim != 1:
        raise InputError(f"{url}: 'paths' has shape {paths.shape}; expected one dimension")
    if paths.dtype.kind != "U":
        raise InputError(
            f"{url}: 'paths' holds {paths.dtype}, not text; save the paths as a unicode array "
            "(np.asarray(paths, dtype=str))"
        )
    if emb.ndim != 2 or emb.shape[0] != paths.shape[0]:
        raise InputError(
            f"{url}: 'embeddings' has shape {emb.shape} for {paths.shape[0]} paths; expected "
            f"({paths.shape[0]}, d)"
        )
    if emb.dtype.kind not in "fiu":
        raise InputError(f"{url}: 'embeddings' holds {emb.dtype}, not numbers")
    if emb.shape[0] and emb.shape[1] == 0:
        raise InputError(
            f"{url}: 'embeddings' has shape {emb.shape}: empty vectors (0 dimensions); "
            "re-export the shard with the vectors"
        )
    with np.errstate(over="ignore"):  # beyond float32 range -> inf, rejected afterwards
        X = np.ascontiguousarray(emb, dtype=np.float32)
    return paths.astype(object), X, None


def _npz_array(url: str, npz: Any, name: str) -> np.ndarray:
    try:
        value = npz[name]
    except ValueError as exc:
        if "pickle" not in str(exc):
            raise
        raise InputError(
            f"{url}: {name!r} is an object array, which needs pickle to load; save the paths "
            "as a unicode array (np.asarray(paths, dtype=str)) and the embeddings as floats"
        ) from None
    if not isinstance(value, np.ndarray):  # a zip member without .npy is returned as bytes
        raise InputError(
            f"{url}: {name!r} is a raw file in the zip, not a NumPy array; write the shard "
            "with np.savez(f, paths=..., embeddings=...)"
        )
    return value


def _read_csv(url: str, raw: bytes) -> tuple[np.ndarray, np.ndarray, list[str]]:
    first_line = raw.split(b"\n", 1)[0].decode("utf-8", errors="replace")
    header = next(csv.reader([first_line]), [])
    if not raw.strip() or not header:
        raise InputError(f"{url}: empty CSV file; expected a header line and rows")
    _check_unique(url, header)
    path_col = "path" if "path" in header else header[0]
    try:
        table = pacsv.read_csv(
            pa.BufferReader(raw),
            # The path column is text even when the names look like numbers.
            convert_options=pacsv.ConvertOptions(column_types={path_col: pa.string()}),
        )
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InputError(f"{url} is not a valid CSV file ({one_line(exc)}); re-export it") from None
    features = [c for c in table.column_names if c != path_col]
    if not features:
        raise InputError(f"{url}: no feature columns besides {path_col!r}")
    for c in features:
        t = table.schema.field(c).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)):
            raise InputError(
                f"{url}: column {c!r} holds {t}, not numbers; every column besides the path "
                "must hold one embedding dimension"
            )
    paths = _text_column(url, table.column(path_col), path_col)
    cols = [table.column(c) for c in features]
    # An all-empty column reads as type null: as floats it is all NaN, reported as such.
    cols = [c.cast(pa.float32()) if pa.types.is_null(c.type) else c for c in cols]
    return paths, _columns_to_matrix(cols), features


def _read_pickle(url: str, raw: bytes) -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        df = pd.read_pickle(io.BytesIO(raw))
    except Exception as exc:  # unpickling can fail in any way the file's content dictates
        raise InputError(
            f"{url} is not a readable pandas pickle ({one_line(exc)}); re-export it"
        ) from None
    if not isinstance(df, pd.DataFrame):
        raise InputError(f"{url}: pickle holds a {type(df).__name__}, not a DataFrame of features")
    _check_unique(url, [str(c) for c in df.columns])
    if "path" in df.columns:
        path_values = df["path"].to_numpy(dtype=object)
        feat = df.drop(columns=["path"])
    else:
        path_values = df.index.to_numpy(dtype=object)
        feat = df
    for c, t in feat.dtypes.items():
        if not pd.api.types.is_numeric_dtype(t) or pd.api.types.is_bool_dtype(t):
            raise InputError(
                f"{url}: column {c!r} holds {t}, not numbers; every column besides the path "
                "must hold one embedding dimension"
            )
    if feat.shape[1] == 0:
        raise InputError(f"{url}: no feature columns")
    with np.errstate(over="ignore"):  # beyond float32 range -> inf, rejected afterwards
        X = np.ascontiguousarray(feat.to_numpy(dtype=np.float32, na_value=np.nan))
    return path_values, X, [str(c) for c in feat.columns]


def _check_unique(url: str, columns: Sequence[str]) -> None:
    """Refuse a shard with two columns of one name: which one holds the paths is a guess."""
    seen: set[str] = set()
    for c in columns:
        if c in seen:
            raise InputError(
                f"{url}: column {c!r} appears more than once; rename or drop one and re-export"
            )
        seen.add(c)


def _check_finite(url: str, paths: np.ndarray, X: np.ndarray, columns: list[str] | None) -> None:
    """Refuse NaN and ±inf, naming the first bad row and column."""
    # A float64 row sum of float32 values cannot overflow and is non-finite exactly when the
    # row holds a NaN or an inf: one pass, no n × d boolean temporary.
    bad = np.flatnonzero(~np.isfinite(X.sum(axis=1, dtype=np.float64)))
    if len(bad):
        row = int(bad[0])
        k = int(np.flatnonzero(~np.isfinite(X[row]))[0])
        col = f"column {columns[k]!r}" if columns else f"dimension {k}"
        raise InputError(
            f"{url}: row {row} (path {paths[row]!r}) has {X[row, k]} in {col} (or a value "
            "beyond float32 range); fix or drop the row and re-export"
        )


def _check_paths(url: str, paths: np.ndarray, store: Store) -> dict[int, str]:
    """Check every path is text under the root.

    Returns ``{row: path relative to the root}`` for the rows whose path is written another
    way (``./a.jpg``, absolute, with the root's URL): usually empty, so that the client
    receives no second array of n strings.
    """
    aliases: dict[int, str] = {}
    resolve = store.resolve
    root = store.root_path if store.root_path.endswith("/") else store.root_path + "/"
    for i, p in enumerate(paths):
        if type(p) is not str:
            raise InputError(
                f"{url}: row {i} has path {p!r} of type {type(p).__name__}, not text; store "
                "the paths as strings"
            )
        try:
            full = resolve(p)
        except ScopeError as exc:
            raise ScopeError(
                f"{url}: row {i}: {exc}; fix the path in the shard or choose a root that "
                "contains it"
            ) from None
        if full != root + p:
            aliases[i] = full[len(root) :]
    return aliases
