"""Exact DBSCAN of a ``dask.array`` whose row blocks stay on the Dask workers.

:func:`fit_dask` is what :meth:`dedup_batch.cluster.DBSCAN.fit` runs for a ``dask.array.Array``
input. No process ever holds all of X: every per-row computation runs on the worker holding the
row, a tile task reads two blocks (Dask moves a block from worker to worker when the two live
apart), and the client holds O(n) small integers (a union-find, the reorder's permutation,
per-row counts and labels) plus a few KB per block.

1. Preparation: the column sum (the euclidean centre) and a ~20,000-row sample (at most 32
   MiB), gathered in one round trip; on the client, the sample's principal directions and a
   tree of quantile splits over its projections, whose cells become the new row blocks (16 MiB
   each), so that blocks are spatially compact: a few input blocks at a time are cut on
   their worker into one piece per cell (a task per piece), and each cell's pieces are moved
   to one worker (preparations sent in waves). Each block then builds, on its worker, what
   ``cluster._prepare`` builds for the whole input: leaves of <= LEAF_ROWS rows, low-rank
   factors, rounding bands and leaf boxes. Block pairs whose balls (full space) or boxes (projected)
   are farther apart than ``eps`` plus every rounding bound are never scheduled.
2. A tile task runs the in-process engine's own tile code (``cluster._tile_task``: leaf boxes,
   the low-rank screen, the full float32 product for the pairs that pass it, the rigorous
   ``_float32_band`` bounds) over its two blocks as one small prepared input; pairs near
   ``eps`` get a float64 look from the raw rows (``cluster._refine``). A tile returns a spanning
   forest (``min_samples=1``) or per-row counts / smallest core labels (``min_samples > 1``),
   never its pairs, plus the few pairs still within scikit-learn's own rounding of ``eps``.
3. Those pairs are decided by scikit-learn's own computation (``cluster._SkDecider``,
   ``cluster._recheck``), fetching only the rows it needs: two 256-row chunks per pair for
   euclidean, a padded row subset for cosine.
4. Tasks go out in bounded waves (two per worker thread in flight), each worker sent tiles
   whose blocks it holds as its own earlier tiles finish; each submission carries the
   current component roots of its two blocks (``min_samples=1`` and the core pass), so a
   tile already one component is skipped, and a task-local union-find skips what merges inside
   the task.

Scheduling: the client is an argument (``DBSCAN.fit(X, client=client)``); nothing looks for a
current or default client. The tasks are submitted here rather than through
:func:`dedup_batch.executor.run_tasks`: the preparation steps map one task over every block and
need all the results together (a barrier, run only on a client, so run_tasks' bounded
streaming and thread fallback have nothing to add), the prepared blocks must stay on the
workers as futures for every later tile (run_tasks releases each result once read), and a tile
task carries the component roots as they stand when it is submitted, or is skipped then
(run_tasks takes its items before the first submission). Scatters and the in-flight sizing go
through :mod:`dedup_batch.executor`.

Exactness: labels, core samples and cluster numbering are scikit-learn's, ties at ``eps``
included. What the distributed engine does not cover is gathered on the client and fitted by the
in-process engine (which may delegate to scikit-learn), with a log line saying why: input other
than float32, metrics other than euclidean/cosine, euclidean with d <= 15 (scikit-learn decides
by a KD-tree), ``sample_weight``, cosine zero vectors, an ``eps`` below the rounding of a
self-distance, a near-eps pair scikit-learn decides asymmetrically, and cosine near-eps pairs
whose decision needs all rows (``_SkDecider`` compares against all n rows when n x d <= 2^27,
i.e. X <= 512 MiB, and uses scikit-learn's whole row chunk on a BLAS that rounds by shape).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache, wraps
from types import SimpleNamespace
from typing import Any

import numpy as np

from . import executor, progress
from ._malloc import heap_kept
from .cluster import (
    _U32,
    _U64,
    LEAF,
    LEAF_SCALE,
    N_BOUND_DIMS,
    SPLIT_CELLS,
    _border_min,
    _cat,
    _fill_aug,
    _float32_band,
    _forest,
    _Irregular,
    _LiveRoots,
    _Mode,
    _PassCtx,
    _per_row,
    _Prepared,
    _recheck,
    _refine,
    _resolve_mode,
    _SkDecider,
    _tile_task,
    _union_then_decide,
    _UnionFind,
)
from .load import take_blocks

__all__ = ["BLOCK_BYTES", "ClusteredRows", "clustered_rows", "fit_dask", "sample_rows"]

log = logging.getLogger(__name__)

#: Target bytes of a reordered row block (float32 rows). A tile task holds its two prepared
#: blocks, their float32 working rows and a few LEAF_ROWS x TILE products: ~80 MiB at 16 MiB
#: blocks.
#: Larger blocks mean fewer, larger tiles (the in-process engine's GEMMs get wider and the
#: per-tile costs are amortised: 8 MiB blocks ran ~1.5x the in-process tile time on one
#: worker at 50k x 256, 32 MiB ~1.1x) but fewer tasks to balance over the workers.
BLOCK_BYTES = 16 << 20
#: Input bytes one reorder task cuts at once (a few of a worker's consecutive input blocks,
#: see :func:`_reorder`): each cut task makes one piece (a task and a key) per cell, so
#: batches of blocks make fewer of them; while it runs, the task holds its pieces besides
#: its input blocks, which the worker holds until they are cut anyway.
_CUT_BYTES = 4 * BLOCK_BYTES
#: Tiles in flight per worker thread: enough to hide the client's merge between results,
#: few enough that finished results never pile up (each is O(rows of two blocks)).
IN_FLIGHT_PER_THREAD = 2
#: The sample the principal directions and the cells come from is gathered on the client:
#: 20,000 rows, or as many as fit in this many bytes (float32; 20,000 rows up to 419-d, 8,192
#: at 1024-d, 4,096 at 2048-d), never concatenated there.
_SAMPLE_BYTES = 32 << 20
#: Rows per leaf of a block's tree: the in-process engine's (``cluster._prepare``), so that a
#: tile makes the same number of leaf-pair blocks as the in-process tiles do on those rows.
#: With LEAF (256) rows, 100k x 256 on one thread made 7,087 blocks in 1,826 leaf tasks
#: against the in-process engine's 3,167 in 256: the per-block work (component roots,
#: restrictions, forests) doubled and the products were half as wide.
LEAF_ROWS = LEAF_SCALE * LEAF
#: Tiles of the work looked at when choosing the next one for a worker (its blocks' holder):
#: far enough to find one, near enough that the work's order (diagonal first, then by
#: block) mostly stays, and that a choice costs a few microseconds.
_LOOKAHEAD = 64
#: Blocks whose float32 working rows a worker process keeps for its next tiles (most
#: recently used; a tile keeps its first block's, A, and writes its other block's after them
#: in the same buffer, see :func:`_tile_rows`): each tile used to centre both its blocks
#: afresh (0.67 s of 8.1 s of tiles at one thread, 100k x 256; at 600k x 512 ~10,000 block
#: centrings of ~25 ms). The work is in order of block A and a worker is sent tiles that
#: share its last tile's A (see ``_DaskFit._tiles``). Memory: one buffer of two blocks' rows
#: (~34 MB at 16 MiB blocks, 512-d: what one tile used to allocate for its rows), held
#: between tiles and dropped with the block. Keeping B's rows too, and concatenating A's
#: and B's per tile, took the 600k x 512 workers' tile peaks from 0.60-0.65 to 0.74-0.78
#: GiB (with the heap kept at a 32 MiB mmap threshold), against a 900 MB limit.
_WORKING_BLOCKS = 1
#: Arrays above this are mapped afresh and given back when freed, also while a task keeps
#: its heap (:func:`dedup_batch._malloc.heap_kept`): the tiles' products (up to ~2,560 x 512
#: float32, 5 MiB) and masks reuse the heap, but blocks, their working rows and received
#: replicas (12-34 MB) never sit in it, where they kept freed memory around them.
_TASK_MMAP_BYTES = 8 << 20
# Bytes of rows centred at once in float64 (a block's float64 copy is twice its size): 2048
# rows at 256-d, 512 at 1024-d. A chunk, its difference from the block's centre and
# ``_centred``'s temporaries are alive together: at 2048 rows whatever the width, they were
# ~50 MiB of a 1024-d block's preparation, on 600 MB workers.
_CENTRE_BYTES = 4 << 20


# What a stalled wait names (see executor.finished).
_WHAT = "cluster (distributed DBSCAN)"


class _NeedsGather(Exception):
    """This fit needs something only the in-process engine provides: gather X and use it."""


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def fit_dask(est: Any, X: Any, sample_weight: Any = None, *, client: Any = None) -> Any:
    """Fit ``est`` (a :class:`dedup_batch.cluster.DBSCAN`) to the dask array ``X``.

    Parameters
    ----------
    est : dedup_batch.cluster.DBSCAN
        Its parameters as given; ``labels_``, ``core_sample_indices_``, ``components_`` and
        ``n_features_in_`` are set.
    X : dask.array.Array of shape (n, d)
        Rows to cluster, persisted on the workers of ``client`` (it is persisted here if it is
        not). Without ``client``, X is computed here and fitted in process, on threads.
    sample_weight : array-like of shape (n,), optional
        As in scikit-learn: gathered and fitted in process.
    client : distributed.Client, optional
        The cluster to run on (see :meth:`dedup_batch.cluster.DBSCAN.fit`). A fit gathered on
        the client (inputs this engine does not cover) still runs its tiles on its workers.

    Returns
    -------
    est

    Notes
    -----
    ``components_`` is a ``dask.array`` (the core rows, lazily selected on the workers): the
    engine never gathers X. ``distributed_stats_`` (a dict) gives ``blocks``, ``block_pairs``
    (scheduled after pruning, of ``all_block_pairs``), ``tiles`` (run; the rest were already
    one component), ``prepared_row_bytes``, ``seconds_prepare`` and ``seconds_total``: the
    inputs of the cost model in docs/scaling.md.

    Memory on the client: O(n) small integers (8 bytes per row for the union-find, 16 for the
    reorder's permutation and its inverse, 8 more for counts with ``min_samples > 1``), a
    20,000-row sample during the preparation (float32, at most 32 MiB) and d x d float64 for
    its principal directions, and the results of the tiles in flight. Per worker: its share of X
    once at rest (the prepared blocks: raw rows plus ~330 bytes per row of factors and
    bounds), since the fit takes over the blocks ``load`` left on the workers
    (:func:`dedup_batch.load.take_blocks`) and frees each once it is cut (an X persisted by
    the caller stays held by the caller: twice), plus, per thread, one tile (two blocks'
    float32 working rows and a few LEAF_ROWS x TILE products) and the working rows of the
    block its tiles used last. Time: the in-process engine's work on the
    block pairs that survive pruning, plus O(n d k) preparation. Bytes moved between
    workers: X once by the reorder (its pieces), then at most one prepared block per tile
    whose two blocks live on different workers (a tile runs where one of them is).

    A worker lost mid-fit changes nothing but the time: every prepared block is a key of a
    graph the scheduler keeps until the fit ends (its pieces, their input blocks, the shards'
    read tasks), so Dask recomputes what died with the worker and reruns its tiles.
    """
    mode = _resolve_mode(est, X, sample_weight)
    why = _not_covered(est, X, mode, client)
    result = None
    if why is None:
        try:
            result = _DaskFit(est, X, mode, client).run()
        except (_NeedsGather, _Irregular) as exc:
            why = str(exc) or "scikit-learn decides a near-eps pair asymmetrically"
    if result is None:
        log.info("DBSCAN: %s; gathering X on the client for the in-process engine", why)
        return est.fit(X.compute(), sample_weight=sample_weight, client=client)
    labels, core, stats = result
    est.distributed_stats_ = stats
    est.labels_ = labels.astype(np.intp)
    est.core_sample_indices_ = np.flatnonzero(core)
    est.components_ = X[est.core_sample_indices_]
    est.n_features_in_ = X.shape[1]
    return est


def _not_covered(est: Any, X: Any, mode: _Mode | None, client: Any) -> str | None:
    """Why this fit cannot run distributed, or ``None``."""
    if client is None:
        return "no Dask client was given"
    if X.ndim != 2 or X.shape[0] == 0:
        return "X is not a non-empty 2-d array"
    if mode is None or mode.kind not in ("brute", "cosine"):
        return "these parameters are decided by scikit-learn's tree or another metric"
    if X.dtype != np.float32:
        return f"X is {X.dtype}: the distributed engine's bounds are for float32"
    if not (isinstance(est.min_samples, int | np.integer) and est.min_samples >= 1):
        return "min_samples is checked by scikit-learn"
    if not (isinstance(est.eps, float | int | np.number) and est.eps > 0):
        return "eps is checked by scikit-learn"
    return None


# --------------------------------------------------------------------------------------------
# Per-block work (runs on the workers)
# --------------------------------------------------------------------------------------------


def _on_worker(task: Callable[..., Any]) -> Callable[..., Any]:
    """A per-block task as it runs on a worker: with one BLAS thread and the heap kept.

    One BLAS thread: a Dask worker thread is this engine's unit of parallelism, and
    OpenBLAS's own threads on a block's skinny products (rows x d x 32, a sample's d x d
    gram, a tile's leaf x TILE products) oversubscribe the cores the other worker threads
    use (``cluster._each_chunk`` measured 2-3x slower in process on a loaded 2-core machine;
    the preparation at one thread: 3.1 s with them, 1.1 s without, 100k x 256).

    The heap kept (:func:`dedup_batch._malloc.heap_kept`): the tasks allocate and free
    arrays of a few MB by the thousand, which Dask's nanny setting made fresh mmaps: on two
    workers, 100k x 256, half of their CPU time was system time (page faults), 4.5 s of
    9.5 s each, and 0.8 s of 5.2 s with the heap kept.

    Pickled by reference like the task itself (``wraps`` keeps its name)."""

    @wraps(task)
    def run(*args: Any, **kwargs: Any) -> Any:
        with heap_kept(_TASK_MMAP_BYTES), _blas().limit(limits=1, user_api="blas"):
            return task(*args, **kwargs)

    return run


@cache
def _blas() -> Any:
    """This process's BLAS libraries (``threadpoolctl``), found once: ``threadpool_limits``
    looks for them on every call, 5-6 ms in a worker process (0.2 s of 32 tiles; a 600k x
    512 fit has 6,223), ``ThreadpoolController.limit`` 0.01 ms. Importing this module has
    loaded every BLAS the tasks use (NumPy's and SciPy's OpenBLAS)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


@_on_worker
def _block_first(x: np.ndarray, seed: int, frac: float) -> tuple[np.ndarray, int, np.ndarray]:
    """Dask task: ``(column sum in float64, number of all-zero rows, the block's rows in the
    sample)``: the preparation's one look at the input blocks before the cells."""
    zero = int((~np.any(x != 0, axis=1)).sum())
    return x.sum(axis=0, dtype=np.float64), zero, x[_sample(len(x), frac, seed)]


def _directions(S: list[np.ndarray], g: SimpleNamespace, k: int) -> np.ndarray:
    """(d, k) orthonormal: the k leading principal directions of the sample rows (``S``, in
    parts), centred as the tiles centre (``g``), or the first k axes when there is no
    covariance (k = d, or fewer than two rows): any orthonormal basis gives exact bounds.

    The scatter about the sample's mean is accumulated ``_CENTRE_BYTES`` at a time (no
    float64 copy of the sample), and only its k leading eigenvectors are computed: the
    client holds one d x d float64 (8 MiB at 1024-d), not the four of a full
    eigendecomposition. One BLAS thread for LAPACK, as ``cluster._prepare`` (its threads on a
    256-512 square matrix measured 5-7x slower there on the loaded 2-core machine)."""
    d, m = S[0].shape[1], sum(len(part) for part in S)
    if k >= d or m < 2:
        return np.eye(d)[:, :k]
    from scipy.linalg import eigh
    from threadpoolctl import threadpool_limits

    cov, ssum = np.zeros((d, d)), np.zeros(d)
    for part in S:
        for _, _, c64, _ in _centred_chunks(part, g):
            cov += c64.T @ c64
            ssum += c64.sum(axis=0)
    cov -= np.outer(ssum / m, ssum)
    with threadpool_limits(limits=1, user_api="blas"):
        _, vecs = eigh(cov, subset_by_index=[d - k, d - 1], overwrite_a=True, check_finite=False)
    return np.ascontiguousarray(vecs[:, ::-1])


def _centred(x: np.ndarray, g: SimpleNamespace) -> tuple[np.ndarray, np.ndarray]:
    """``(c64, sq)``: rows centred on the global mean (euclidean) or normalised (cosine) in
    float64, as ``cluster._prepare`` does, and the squared norms of the raw rows."""
    x64 = x.astype(np.float64)
    sq = np.einsum("ij,ij->i", x64, x64)
    if g.cosine:
        x64 /= np.sqrt(sq)[:, None]
    else:
        x64 -= g.mean
    return x64, sq


def _centred_chunks(
    x: np.ndarray, g: SimpleNamespace
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """``(start, end, c64, sq)`` of :func:`_centred` over ``x`` in chunks of
    ``_CENTRE_BYTES`` (in float64): the float64 copy of a whole block (2x its size) is never
    held.
    Row by row the values are :func:`_centred`'s (each row's are computed from it alone)."""
    step = max(1, _CENTRE_BYTES // (8 * max(1, x.shape[1])))
    for s in range(0, len(x), step):
        e = min(len(x), s + step)
        c64, sq = _centred(x[s:e], g)
        yield s, e, c64, sq


def _sample(m: int, frac: float, seed: int) -> np.ndarray:
    """The rows of a block in the global sample (the same rows in every pass)."""
    k = min(m, max(1, round(m * frac))) if m else 0
    return np.sort(np.random.default_rng(seed).choice(m, size=k, replace=False))


@_on_worker
def _block_cells(x: np.ndarray, g: SimpleNamespace, tree: tuple[np.ndarray, ...]) -> np.ndarray:
    """Dask task: the cell (new block) of each row, by the client's tree (:func:`_split_tree`)."""
    P = np.empty((len(x), g.n_split))
    for s, e, c64, _ in _centred_chunks(x, g):
        P[s:e] = c64 @ g.V[:, : g.n_split]
    return _descend(tree, P)


def _descend(tree: tuple[np.ndarray, ...], P: np.ndarray) -> np.ndarray:
    """Leaf number of each row of ``P`` in ``tree`` = ``(axis, threshold, left, right,
    leaf)`` arrays per node (node 0 the root; ``leaf >= 0`` at leaves)."""
    axis, thr, left, right, leaf = tree
    node = np.zeros(len(P), np.int64)
    rows = np.arange(len(P))
    while True:
        inner = leaf[node] < 0
        if not inner.any():
            return leaf[node].astype(np.int32)
        r, nd = rows[inner], node[inner]
        go_left = P[r, axis[nd]] <= thr[nd]
        node[r] = np.where(go_left, left[nd], right[nd])


def _split_tree(P: np.ndarray, parts: int) -> tuple[np.ndarray, ...]:
    """A tree of splits along the widest column of ``P`` into ``parts`` cells of equal
    shares of its rows (the tree for :func:`_descend`): a node to be cut into c cells
    splits at the quantile floor(c / 2) / c of its widest column, its halves getting
    floor(c / 2) and the rest. Fewer cells only where every column is constant.

    Median splits until a cap made a power of two of cells, each between half the cap and
    the cap: 600k x 512 rows (16 MiB blocks, 74 wanted) became 128 blocks of 9.6 MB and
    8,256 block pairs, where 74 blocks make 2,775."""
    axis, thr, left, right, leaf = [], [], [], [], []
    stack = [(np.arange(len(P)), 0, max(1, parts))]
    axis.append(0), thr.append(0.0), left.append(-1), right.append(-1), leaf.append(-1)
    n_leaves = 0
    # columns contiguous: a node's widths are reductions along rows (along the columns of an
    # (n, 2) array they were half of the tree's time)
    PT = np.ascontiguousarray(P.T)
    while stack:
        idx, node, c = stack.pop()
        if c > 1 and len(idx) > 1:
            sub = PT[:, idx]
            width = sub.max(axis=1) - sub.min(axis=1)
        if c == 1 or len(idx) <= 1 or not (width > 0).any():
            leaf[node] = n_leaves
            n_leaves += 1
            continue
        ax = int(np.argmax(width))
        col = sub[ax]
        c_lo = c // 2
        k = min(len(idx) - 1, max(1, round(len(idx) * c_lo / c)))
        # the k-th smallest value (a partition, not a sort: ~1/3 of the time)
        t = float(np.partition(col, k - 1)[k - 1])
        below = col <= t
        if below.all():  # many equal values at the split: split below them
            t = float(np.nextafter(t, -np.inf))
            below = col <= t
        lo, hi = idx[below], idx[~below]
        axis[node], thr[node] = ax, t
        for part, side, cells in ((hi, right, c - c_lo), (lo, left, c_lo)):
            side[node] = len(leaf)
            axis.append(0), thr.append(0.0), left.append(-1), right.append(-1), leaf.append(-1)
            stack.append((part, side[node], cells))
    return tuple(np.asarray(a) for a in (axis, thr, left, right, leaf))


class _Block(SimpleNamespace):
    """A prepared block (:func:`_block_prep`). Sized by its arrays, so that Dask's memory
    manager weighs it right when it spills, pauses or plans transfers (a plain namespace
    counts as a few dozen bytes)."""

    def __sizeof__(self) -> int:
        return 256 + sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray))


def _cut(x: np.ndarray, cells: np.ndarray, used: np.ndarray) -> Any:
    """Dask task: the rows of block ``x`` of each cell in ``used`` (ascending), in row order:
    a tuple of arrays, or the one array when the block lies in one cell."""
    if len(used) == 1:
        return x
    order = np.argsort(cells, kind="stable")
    ends = np.searchsorted(cells[order], used, side="right")
    return tuple(x[o] for o in np.split(order, ends[:-1]))


def _take_rows(xs: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """Dask task: rows ``rows`` (ascending) of the blocks ``xs`` one after the other (one
    worker's input blocks cut together): a reorder's piece. The blocks are never
    concatenated: the piece is filled from them in place."""
    offs = np.cumsum([0] + [len(x) for x in xs])
    piece = np.empty((len(rows), xs[0].shape[1]), xs[0].dtype)
    at = 0
    parts = np.split(rows, np.searchsorted(rows, offs[1:-1]))
    for x, off, part in zip(xs, offs[:-1], parts, strict=True):
        # mode="clip": the rows are in range; "raise" would buffer ``out`` (a copy more)
        np.take(x, part - off, axis=0, out=piece[at : at + len(part)], mode="clip")
        at += len(part)
    return piece


def _loosely_on(w: str | None) -> dict[str, Any]:
    """Submission keywords for a task meant for worker ``w``: a loose restriction (another
    worker runs it if ``w`` is gone or busy); none when the worker is not known."""
    return {} if w is None else {"workers": [w], "allow_other_workers": True}


def _each_block(fn: Callable[..., Any], xs: list[Any], per: list[Any] | None, *common: Any) -> list:
    """Dask task: ``fn(x, p, *common)`` (``fn(x, *common)`` without ``per``) for each block
    ``x`` of a batch (:func:`_map_batches`), in order."""
    if per is None:
        return [fn(x, *common) for x in xs]
    return [fn(x, p, *common) for x, p in zip(xs, per, strict=True)]


def _map_batches(
    client: Any,
    fn: Callable[..., Any],
    blocks: list[Any],
    owner: list[str | None],
    sizes: list[int],
    per: list[Any] | None,
    *common: Any,
) -> list[Any]:
    """``fn`` (a per-block task: ``fn(x, p, *common)``) of each input block, gathered in
    block order: a few of a worker's blocks per task (:func:`_batches`, as the reorder cuts
    them), run where they are (a loose restriction). A task costs the client, the
    scheduler and a worker ~2-3 ms of CPU whatever it does: a task per block was 26 of the
    83 tasks of a 100k x 256 fit, for two passes of a few ms per block."""
    batches = _batches(sizes, owner, _CUT_BYTES)
    futures = []
    for batch in batches:
        w = owner[batch[0]]
        where = _loosely_on(w)
        mine = None if per is None else [per[i] for i in batch]
        xs = [blocks[i] for i in batch]
        futures.append(client.submit(_each_block, fn, xs, mine, *common, pure=False, **where))
    out: list[Any] = [None] * len(blocks)
    for batch, got in zip(batches, executor.gather(client, futures, what=_WHAT), strict=True):
        for i, r in zip(batch, got, strict=True):
            out[i] = r
    return out


def _batches(sizes: list[int], owner: list[str | None], cap: int) -> list[list[int]]:
    """The input blocks (their indices, ascending within a batch) cut together: each batch's
    blocks held by one worker, at most ``cap`` bytes in all unless a block alone is larger; a
    block whose holder is unknown is a batch of its own."""
    out: list[list[int]] = []
    open_: dict[str, tuple[list[int], int]] = {}  # worker -> (its batch being filled, bytes)
    for i, (size, w) in enumerate(zip(sizes, owner, strict=True)):
        if w is None:
            out.append([i])
            continue
        batch, total = open_.get(w, ([], 0))
        if batch and total + size > cap:
            out.append(batch)
            batch, total = [], 0
        open_[w] = ([*batch, i], total + size)
    out.extend(batch for batch, _ in open_.values())
    return sorted(out)


@_on_worker
def _block_prep(pieces: list[np.ndarray], g: SimpleNamespace) -> _Block:
    """Dask task: a block prepared for tiles from its cell's ``pieces`` (rows of each input
    block in this cell, in input order), as ``cluster._prepare`` prepares the whole
    input: its rows in leaf order (as few leaves of equal shares as hold <= LEAF_ROWS rows
    each, by :func:`_split_tree` over the projections), the low-rank factors, the error
    bands and the leaves' boxes.

    Memory (held with the block): the raw rows in leaf order (the block's size) and per row
    two (k + 2) float32 factors and six float64 values (~330 bytes at k = 32). The float32
    working rows are recomputed by each tile (O(rows x d), against the tile's O(rows^2 x d)).
    While it runs: the pieces and their rows in leaf order (2x the block; the pieces are
    never concatenated) plus ``_CENTRE_BYTES`` of rows in float64, a few times: the
    centred rows are never held whole.
    """
    m, d = sum(len(p) for p in pieces), pieces[0].shape[1]
    k = g.V.shape[1]
    P, sq, csq = np.empty((m, k)), np.empty(m), np.empty(m)
    # The block's ball: any centre will do (the radius is measured from it, and rounded up).
    # Its first chunk's mean, so that the rows are centred once (a second pass for the
    # block's own mean was ~12% of a block's preparation).
    centre, radius, at = None, 0.0, 0
    for piece in pieces:
        for s, e, c64, sq_rows in _centred_chunks(piece, g):
            s, e = at + s, at + e
            sq[s:e] = sq_rows
            P[s:e] = c64 @ g.V
            csq[s:e] = np.einsum("ij,ij->i", c64, c64)
            if centre is None:
                centre = c64.mean(axis=0)
            c64 -= centre
            radius = max(radius, float(np.einsum("ij,ij->i", c64, c64).max(initial=0.0)))
        at += len(piece)
    centre = np.zeros(d) if centre is None else centre
    radius = math.sqrt(radius)
    # leaves of equal shares, as few as hold at most LEAF_ROWS rows each
    tree = _split_tree(P[:, : g.n_split], -(-m // LEAF_ROWS))
    cells = _descend(tree, P[:, : g.n_split])
    order = np.argsort(cells, kind="stable")
    bounds = np.zeros(int(cells.max(initial=-1)) + 2, np.int64)
    bounds[1:] = np.cumsum(np.bincount(cells, minlength=len(bounds) - 1))
    sq, csq, P = sq[order], csq[order], P[order]
    t = g.threshold
    psq = np.einsum("ij,ij->i", P, P)
    if g.cosine:
        sk_err = np.full(m, 2.0 * (d + 8) * _U32 * 2.0)
    else:
        sk_err = (4.0 * (d + 8) * _U64) * sq + 64 * _U64 * t
    band = _float32_band(csq, d + 2, t) + sk_err
    Alo = np.empty((m, k + 2), np.float32)
    Blo = np.empty((m, k + 2), np.float32)
    Alo[:, :k], Alo[:, k], Alo[:, k + 1] = P, psq, 1.0
    Blo[:, :k], Blo[:, k], Blo[:, k + 1] = -2.0 * P, 1.0, psq
    starts = bounds[:-1]
    slack = 1e-9 * (1.0 + float(np.sqrt(csq.max(initial=0.0))))
    # the rows in leaf order, taken from the pieces in place (row ``order[i]`` of their
    # concatenation goes to row i)
    x = np.empty((m, d), pieces[0].dtype)
    where = np.empty(m, np.int64)
    where[order] = np.arange(m)
    at = 0
    for piece in pieces:
        x[where[at : at + len(piece)]] = piece
        at += len(piece)
    return _Block(
        x=x,
        order=order.astype(np.int32),
        csq=csq,
        Alo=Alo,
        Blo=Blo,
        band=band,
        band_lo=_float32_band(psq, k + 2, t) + 1e-12 * (1.0 + psq),
        sk_err=sk_err,
        bounds=bounds,
        lo=np.minimum.reduceat(P, starts, axis=0),
        hi=np.maximum.reduceat(P, starts, axis=0),
        centre=centre,
        radius=radius * (1 + 1e-9) + slack,
        slack=slack,
    )


def _block_meta(b: SimpleNamespace) -> SimpleNamespace:
    """Dask task: what the client needs of a prepared block (no per-row vectors)."""
    return SimpleNamespace(
        order=b.order,
        centre=b.centre,
        radius=b.radius,
        bmax=float(b.band.max(initial=0.0)),
        lo=b.lo.min(axis=0),
        hi=b.hi.max(axis=0),
        slack=b.slack,
    )


def _block_rows(b: SimpleNamespace, q: np.ndarray) -> np.ndarray:
    """Dask task: the raw rows at places ``q`` of a prepared block (float32, (len(q), d))."""
    return b.x[q]


class _Pair:
    """The raw rows of one or two prepared blocks as one (m, d) array for ``cluster._refine``,
    which reads a few rows (``pair[idx]``): their concatenation is never made."""

    def __init__(self, parts: list[SimpleNamespace]) -> None:
        self.parts = parts
        self.shape = (sum(len(b.x) for b in parts), parts[0].x.shape[1])

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx)
        if len(self.parts) == 1:
            return self.parts[0].x[idx]
        a, b = self.parts
        out = np.empty((len(idx), self.shape[1]), a.x.dtype)
        first = idx < len(a.x)
        out[first] = a.x[idx[first]]
        out[~first] = b.x[idx[~first] - len(a.x)]
        return out


class _Kept:
    """A block's float32 working rows kept by a worker process for its next tiles, at the
    start of a buffer with room after them for a tile's other block (``lock``: the tile
    using that room)."""

    def __init__(self, buf: np.ndarray) -> None:
        self.buf = buf
        self.lock = threading.Lock()


_working: OrderedDict[int, _Kept] = OrderedDict()  # id(block) -> its kept working rows
_working_lock = threading.Lock()  # the worker's tile threads share the cache


def _forget(key: int) -> None:
    with _working_lock:
        _working.pop(key, None)


def _fill_working(out: np.ndarray, b: _Block, g: SimpleNamespace) -> None:
    """``out`` (rows of ``b``, d + 2) float32 := the block's working rows, augmented ``[c, 1,
    csq]`` as the in-process engine's (one product per leaf pair is then the squared
    distance, with no passes adding the norms: see ``cluster._a_form``). The same bits
    however often: float64 centring, then the cast ``astype`` makes (euclidean: one ufunc
    pass, computed in float64 and cast as it is written, 9 vs 12 ms for 12,500 x 256 through
    a float64 chunk; cosine: ``_CENTRE_BYTES`` at a time through float64)."""
    d = b.x.shape[1]
    if g.cosine:
        for s, e, c64, _ in _centred_chunks(b.x, g):
            _fill_aug(out[s:e], c64, b.csq[s:e])
        return
    np.subtract(b.x, g.mean, out=out[:, :d], dtype=np.float64, casting="unsafe")
    out[:, d] = 1.0
    out[:, d + 1] = b.csq


@contextmanager
def _tile_rows(A: _Block, B: _Block | None, g: SimpleNamespace) -> Iterator[np.ndarray]:
    """The working rows of a tile (:func:`_fill_working`): A's rows, then B's (unless B is
    None: a diagonal tile), (rows, d + 2) float32, for the ``with`` block's duration.

    A's rows are kept for the worker's next tiles (the ``_WORKING_BLOCKS`` most recently
    used blocks A; the work is in order of A), keyed by the block object, which a worker
    holds as one object while it keeps the block: an entry goes when its block does
    (``weakref.finalize``), so a recomputed or fetched-again block is centred afresh. B's
    rows are written after them, in the kept buffer itself (room for 1.25x A's rows): an
    off-diagonal tile neither copies A's rows nor maps a fresh (A + B)-row array (page
    faults on each first touch: a tile's concatenation and A's copy were ~15 ms a tile at
    100k x 256). A tile whose B does not fit, or whose A is in use by another thread of
    the worker, gets rows of its own, A's copied. A's rows are never written once built
    (every later tile reads them). Memory: at most what a tile with rows of its own and
    the kept A took before, ~2.25 blocks' rows, never a second kept buffer."""
    key, ma = id(A), len(A.x)
    mb = 0 if B is None else len(B.x)
    with _working_lock:
        kept = _working.get(key)
        if kept is not None:
            _working.move_to_end(key)
    if kept is None:  # room for a B up to 1.25x A (cells hold equal shares of the sample)
        buf = np.empty((ma + max(ma + ma // 4, mb), A.x.shape[1] + 2), np.float32)
        _fill_working(buf[:ma], A, g)
        kept = _Kept(buf)
        with _working_lock:
            if key not in _working:
                weakref.finalize(A, _forget, key)
            _working[key] = kept
            while len(_working) > _WORKING_BLOCKS:
                _working.popitem(last=False)
    # no room for this B, or another thread's tile is using it: rows of the tile's own
    own = len(kept.buf) < ma + mb or not kept.lock.acquire(blocking=False)
    try:
        if own:
            rows = np.empty((ma + mb, kept.buf.shape[1]), np.float32)
            rows[:ma] = kept.buf[:ma]
        else:
            rows = kept.buf[: ma + mb]
        if B is not None:
            _fill_working(rows[ma:], B, g)
        yield rows
    finally:
        if not own:
            kept.lock.release()


@_on_worker
def _tile(
    A: SimpleNamespace,
    B: SimpleNamespace,
    ga: int,
    gb: int,
    g: SimpleNamespace,
    roots: np.ndarray | None,
    ctx: _PassCtx | None,
) -> tuple[np.ndarray, ...]:
    """Dask task: the pairs within eps between prepared blocks A (positions ``ga + q``) and B
    (``gb + q``; B is A when ``ga == gb``), by the in-process engine's own tile code
    (``cluster._tile_task``: leaf boxes, the low-rank screen, the full product for the pairs
    that pass it) over the two blocks as one small prepared input.

    ``roots`` (``min_samples=1`` and the core pass): the component root of each row of A then
    B when submitted; a union-find local to the task starts from them and is merged as leaves
    finish, so pairs already in one component are skipped (``cluster._restrict``). ``ctx``
    (``min_samples > 1``): the pass, its per-row arrays for A then B.

    Returns ``(i, j, band_i, band_j)`` in positions: for ``min_samples=1`` and ``"core"`` a
    spanning forest of the edges; for ``"count"`` ``(rows, neighbours)``; for ``"border"``
    ``(rows, smallest core label)``; and the pairs still within scikit-learn's rounding of
    eps after a float64 look. Memory: the two blocks' float32 working rows (kept for the
    next tiles, see :func:`_tile_rows`) plus a few (LEAF_ROWS x TILE) products.
    """
    with _tile_rows(A, None if ga == gb else B, g) as C:
        same = ga == gb
        parts = [A] if same else [A, B]
        ma = len(A.x)

        def cat(name: str) -> np.ndarray:
            return np.concatenate([getattr(b, name) for b in parts])

        bounds = A.bounds if same else np.concatenate([A.bounds, ma + B.bounds[1:]])
        band, band_lo = cat("band"), cat("band_lo")
        leaf_band = np.maximum.reduceat(band, bounds[:-1])
        prep = _Prepared(
            C, cat("csq"), cat("Alo"), cat("Blo"), band, band_lo, cat("sk_err"), g.threshold,
            np.arange(len(C)), bounds, cat("lo"), cat("hi"), leaf_band,
            np.maximum.reduceat(band_lo, bounds[:-1]), max(b.slack for b in parts), aug=True,
        )  # fmt: skip
        na = len(A.bounds) - 1
        # the leaves of B (or of A from a on, inside one block) whose boxes may hold a pair
        reach = math.sqrt(g.threshold + float(band.max(initial=0.0)) * 2) + prep.slack
        luf, live = None, None
        if roots is not None:
            # each row's parent is the first row of its component here: a valid union-find
            # forest as it stands (every component's first row is its own parent), set directly
            # rather than merged edge by edge (a sparse connected-components per tile)
            luf = _UnionFind(len(C))
            _, first_of, inv = np.unique(roots, return_index=True, return_inverse=True)
            luf.parent = first_of[inv.ravel()].astype(np.int64)
            live = _LiveRoots(luf.parent)
        out: list[tuple[np.ndarray, ...]] = []
        lo, hi = prep.lo, prep.hi
        for a in range(na):
            lo_b = a if same else na
            gap = np.maximum(0.0, np.maximum(lo[lo_b:] - hi[a], lo[a] - hi[lo_b:]))
            bs = [lo_b + int(b) for b in np.flatnonzero(np.sqrt((gap**2).sum(axis=1)) <= reach)]
            if not bs:
                continue
            res = _tile_task(prep, a, bs, live, ctx)
            if luf is not None:
                luf.union(res[0], res[1])
            out.append(res)
        kind = "edges" if ctx is None else ctx.kind
        si, ui, uj = (_cat([r[k] for r in out]) for k in (0, 2, 3))
        if kind in ("count", "border"):  # a row of B can come back from several leaves of A
            sj = np.concatenate([r[1] for r in out]) if out else np.empty(0, np.int64)
            si, sj = _per_row(si, sj, "sum" if kind == "count" else "min")
        else:
            sj = _cat([r[1] for r in out])
        if len(ui):  # a second look in float64 from the original rows: most pairs settle here
            idx = np.arange(len(C))
            surely, undecided = _refine(_Pair(parts), idx, ui, uj, prep, idx, _Mode(g.kind))
            ri, rj = ui[surely], uj[surely]
            ui, uj = ui[undecided], uj[undecided]
            if kind == "count":
                si, sj = _per_row(
                    np.concatenate([si, ri, rj]), np.concatenate([sj, np.ones(2 * len(ri))]), "sum"
                )
            elif kind == "border":
                bi, bv = _border_min(ctx, ri, rj)
                si, sj = _per_row(np.concatenate([si, bi]), np.concatenate([sj, bv]), "min")
            else:
                si, sj = np.concatenate([si, ri]), np.concatenate([sj, rj])
        if kind in ("edges", "core"):
            si, sj = _forest(si, sj)

        def pos(q: np.ndarray) -> np.ndarray:
            return np.where(q < ma, ga + q, gb + q - ma).astype(np.int64)

        if kind in ("count", "border"):
            return pos(si), sj, pos(ui), pos(uj)
        return pos(si), pos(sj), pos(ui), pos(uj)


# --------------------------------------------------------------------------------------------
# Rows fetched for scikit-learn's own decision
# --------------------------------------------------------------------------------------------


class _Rows:
    """The input rows as ``_SkDecider`` reads them: ``X[a:b]`` and ``X[indices]`` fetch only
    those rows, from the prepared blocks that hold them (the input blocks are released once
    the reorder has consumed them); a slice is cached: scikit-learn's 256-row chunks are read
    again for each pair in them. Anything needing all of X raises :class:`_NeedsGather`: the
    fit is then gathered and run in process."""

    def __init__(self, fit: _DaskFit) -> None:
        self.fit = fit
        self.shape = (fit.n, fit.d)
        self.dtype = np.dtype(np.float32)
        self._slices: dict[tuple[int, int], np.ndarray] = {}

    def _fetch(self, parts: list[np.ndarray]) -> list[np.ndarray]:
        """The rows of each of ``parts`` (arrays of input rows), in one round trip: one task
        per prepared block that holds some of them."""
        fit = self.fit
        rows = np.concatenate(parts)
        pos = fit.where[rows]
        blk = np.searchsorted(fit.starts, pos, side="right") - 1
        out = np.empty((len(rows), fit.d), np.float32)
        owners = np.unique(blk)
        got = executor.gather(
            fit.client,
            [
                fit.client.submit(
                    _block_rows, fit.blocks[b], pos[blk == b] - fit.starts[b], pure=False
                )
                for b in owners
            ],
            what=_WHAT,
        )
        for b, vals in zip(owners, got, strict=True):
            out[blk == b] = vals
        return np.split(out, np.cumsum([len(p) for p in parts])[:-1])

    def prefetch(self, starts: np.ndarray, size: int) -> None:
        """Fetch the slices ``[s, s + size)`` for ``s`` in ``starts`` in one round trip."""
        n = self.shape[0]
        todo = [(int(s), min(n, int(s) + size)) for s in np.unique(starts)]
        todo = [k for k in todo if k not in self._slices]
        if not todo:
            return
        got = self._fetch([np.arange(s, e) for s, e in todo])
        for k, rows in zip(todo, got, strict=True):
            self._slices[k] = rows

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        n = self.shape[0]
        if isinstance(key, slice):
            s, e, step = key.indices(n)
            if step != 1:
                raise _NeedsGather("a strided read of X")
            if (s, e) == (0, n):
                raise _NeedsGather("scikit-learn's decision needs all of X")
            if (s, e) not in self._slices:
                self._slices[(s, e)] = self._fetch([np.arange(s, e)])[0]
            return self._slices[(s, e)]
        idx = np.asarray(key)
        if idx.dtype == bool or idx.ndim != 1:
            raise _NeedsGather("a masked read of X")
        if len(idx) > max(65536, n // 4):
            raise _NeedsGather("scikit-learn's decision needs most of X")
        uniq, inv = np.unique(idx, return_inverse=True)
        return self._fetch([uniq])[0][inv]

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise _NeedsGather("scikit-learn's decision needs all of X")


class _Singletons:
    """``members[k]`` for ``cluster._recheck`` without duplicate collapsing: row k alone."""

    def __getitem__(self, k: int) -> np.ndarray:
        return np.array([k], np.int64)


def _decide(decider: _SkDecider, rows: _Rows, bi: np.ndarray, bj: np.ndarray) -> tuple:
    """The near-eps pairs ``(bi, bj)`` (global rows) that scikit-learn finds within eps, in both
    directions (raises ``_Irregular`` when it decides one asymmetrically)."""
    if len(bi) == 0:
        return bi, bj
    if decider.mode.kind == "brute":
        c = min(rows.shape[0], 256)
        rows.prefetch(np.concatenate([bi, bj]) // c * c, c)
    log.debug("eps-graph: %d pairs within scikit-learn's rounding of eps", len(bi))
    return _recheck(bi, bj, _Singletons(), decider)


def _reorder(
    client: Any,
    blocks: list[Any],
    owner: list[str | None],
    cells_of: list[np.ndarray],
    row_bytes: int,
) -> tuple[dict[int, list[Any]], list[str], np.ndarray]:
    """``(each cell's pieces (futures), the worker to prepare each cell on, the input row at
    each row of the reordered blocks)``: the cut half of a reorder the scheduler keeps as
    the prepared blocks' lineage (:func:`_prepare_blocks` is the other). Each worker's input
    blocks (``blocks``: futures, held by ``owner``) are cut, a few at a time
    (:func:`_batches`), into one piece per cell they have rows in, on that worker; each
    cell's pieces are then moved to one worker and prepared there. Pieces are the only copy
    in flight: no reordered block is held apart from its prepared form.

    Cutting a batch of blocks rather than each block: every piece is a task and a key of its
    own, and there is one per input block and cell it has rows in (91 of the 173 tasks of a
    100k x 256 fit, 13 shards x 7 cells; ~5,500 at 600k x 512), each costing the client, the
    scheduler and a worker ~2-3 ms of CPU. A batch holds at most ``_CUT_BYTES`` of input
    (and its pieces while it is cut), so a worker's memory during the reorder stays what it
    was, plus that.

    Each cell is prepared on the worker that :func:`_placement` gives it (a loose
    restriction: another worker takes it if that one is gone or busy): left to the scheduler,
    which runs a task where most of its inputs are, a worker that had read more shards
    prepared several times its share of the blocks (730 against 420 MiB, 156,000 x 768 on 4
    workers), and the busiest worker sets the memory a fit needs."""
    import dask

    n_cells = 1 + max((int(c.max(initial=-1)) for c in cells_of), default=-1)
    starts = np.zeros(len(cells_of) + 1, np.int64)
    starts[1:] = np.cumsum([len(c) for c in cells_of])
    pieces: dict[int, list[Any]] = {}
    rows_in_order = []  # the input rows, batch after batch: the order the pieces keep
    for batch in _batches([row_bytes * len(c) for c in cells_of], owner, _CUT_BYTES):
        c = np.concatenate([cells_of[i] for i in batch])
        if len(c) == 0:  # blocks of no rows: no pieces
            continue
        rows_in_order += [np.arange(starts[i], starts[i + 1]) for i in batch]
        order = np.argsort(c, kind="stable")  # by cell, and within a cell ascending
        used, first = np.unique(c[order], return_index=True)
        xs = [blocks[i] for i in batch]
        # cut where the batch's blocks are (a loose restriction: left to the scheduler, an
        # idle worker took batches and fetched their blocks, 324 against 180 MiB moved at
        # 100k x 256)
        w = owner[batch[0]]
        where = _loosely_on(w)
        # a task per piece (no task returning the batch's pieces together: that one key,
        # the batch's size, was spilled by a worker at its memory target and read back
        # whole for each piece), one submission per batch
        cut = [dask.delayed(_take_rows)(xs, rows) for rows in np.split(order, first[1:])]
        for a, piece in zip(used, client.compute(cut, **where), strict=True):
            pieces.setdefault(int(a), []).append(piece)
    rows = np.stack([np.bincount(c, minlength=n_cells) for c in cells_of])
    place = _placement(rows, owner, sorted(client.nthreads()))
    # rows by cell, and within a cell in the pieces' order: batch by batch, each batch's
    # blocks in input order
    order = np.concatenate(rows_in_order) if rows_in_order else np.zeros(0, np.int64)
    cells_all = np.concatenate(cells_of) if cells_of else np.zeros(0, np.int32)
    return pieces, place, order[np.argsort(cells_all[order], kind="stable")]


def _prepare_blocks(
    client: Any, pieces: dict[int, list[Any]], place: list[str], g_f: Any
) -> tuple[list[Any], list[SimpleNamespace]]:
    """``(the prepared blocks (futures, in cell order), each one's meta)``: each cell's
    ``pieces`` (taken from the dict: the client's hold on them goes with the submission, so
    each is freed once its block is prepared) prepared (:func:`_block_prep`) on the worker
    ``place`` gives it.

    Each worker is sent ``IN_FLIGHT_PER_THREAD`` preparations per thread at a time, the next
    as one finishes, as tiles are: a worker fetches the pieces of every task it has been
    given, so it receives only those of the preparations in flight while the pieces it
    holds for others shrink as their blocks are prepared. In the memory test (4 workers of
    600 MB) the workers' peaks were the same as with every preparation sent at once
    (0.43-0.49 against 0.44-0.46 GiB, within noise) and the stage was faster (16-20 s
    against 20-24 s, three alternated runs each)."""
    cells = sorted(pieces)
    nthreads = client.nthreads()
    queue: dict[str, list[int]] = {}  # worker -> its cells' places in ``cells``, in order
    for i, a in enumerate(cells):
        queue.setdefault(place[a], []).append(i)
    out: list[Any] = [None] * len(cells)
    metas: list[Any] = [None] * len(cells)
    running, sent = set(), {}

    def submit(w: str) -> None:
        if queue[w]:
            i = queue[w].pop(0)
            where = _loosely_on(w)
            out[i] = client.submit(_block_prep, pieces.pop(cells[i]), g_f, pure=False, **where)
            # the meta asked for with its preparation (no round trip between them)
            m = client.submit(_block_meta, out[i], pure=False)
            sent[m.key] = (i, w)
            running.add(m)

    for w in queue:
        for _ in range(IN_FLIGHT_PER_THREAD * max(1, nthreads.get(w, 1))):
            submit(w)
    for m in executor.finished(client, running, what=_WHAT):
        i, w = sent.pop(m.key)
        metas[i] = m.result()
        submit(w)
    return out, metas


def _placement(rows: np.ndarray, owner: list[str | None], workers: list[str]) -> list[str]:
    """The worker to prepare each cell on: ``rows[i, a]`` rows of input block i (held by
    ``owner[i]``) are in cell a. Cells, largest first, go to the worker holding most of
    their rows among those below an equal share of all rows (plus one cell), else to the
    least loaded: each worker prepares about its share, and most rows do not move."""
    size = rows.sum(axis=0)
    cap = size.sum() / max(1, len(workers)) + size.max(initial=0)
    load = dict.fromkeys(workers, 0)
    local = {w: rows[[i for i, o in enumerate(owner) if o == w]].sum(axis=0) for w in workers}
    place = [workers[0]] * rows.shape[1]
    for a in np.argsort(-size, kind="stable"):
        room = [w for w in workers if load[w] + size[a] <= cap] or workers
        best = max(room, key=lambda w: (local[w][a], -load[w]))
        place[a] = best
        load[best] += int(size[a])
    return place


# --------------------------------------------------------------------------------------------
# The client's side
# --------------------------------------------------------------------------------------------


class _DaskFit:
    """One distributed fit: the reorder into spatial blocks, their bounds, the tile waves and
    the reductions. Rows are numbered by *position* in the reordered array; ``perm[pos]`` is
    the input row, ``where[row]`` its position."""

    def __init__(self, est: Any, X: Any, mode: _Mode, client: Any) -> None:
        self.est, self.mode, self.client = est, mode, client
        self.eps = float(est.eps)
        self.min_samples = int(est.min_samples)
        self.X = X if len(X.chunks[1]) == 1 else X.rechunk({1: -1})
        self.n, self.d = X.shape
        cosine = mode.kind == "cosine"
        self.g = SimpleNamespace(
            kind=mode.kind,
            cosine=cosine,
            threshold=2.0 * self.eps if cosine else self.eps * self.eps,
            mean=None,
            V=None,
            n_split=1,
        )

    # -- preparation ------------------------------------------------------------------------
    def _prepare(self) -> list[tuple[int, int]]:
        """Reorder the rows into spatially compact blocks, prepare each block on its worker
        and return the block pairs to compute (A <= B), diagonal first."""
        from distributed import Future

        client, g, n, d = self.client, self.g, self.n, self.d
        self.t0 = time.perf_counter()
        # X loaded by ``load`` comes with the futures that hold its blocks: the fit takes them
        # over and drops them once the reorder is submitted, so each input block is freed as
        # soon as its pieces are cut (X stays computable: a block is read again if needed)
        held = take_blocks(self.X)
        X = client.persist(self.X)
        blocks = [Future(k, client) for k in _keys(X)]
        # One round trip: each block's column sum and zero rows, and the rows of a sample
        # (~20,000 rows, at most _SAMPLE_BYTES): the client computes the principal directions
        # and the cells' tree from the sample itself. Sums, then grams summed on the workers,
        # then the sample's projections were three round trips and three passes (0.5 of the
        # 1.2 s preparation of 100k x 256 on 2 workers).
        sample_rows = max(2, min(20000, _SAMPLE_BYTES // (4 * d)))
        frac = min(1.0, sample_rows / n)
        seeds = list(range(len(blocks)))
        who = client.who_has(blocks)
        owner = [(who.get(f.key) or [None])[0] for f in blocks]
        sizes = [X.dtype.itemsize * d * m for m in X.chunks[0]]
        firsts = _map_batches(client, _block_first, blocks, owner, sizes, seeds, frac)
        if g.cosine and sum(z for _, z, _ in firsts):
            raise _NeedsGather("cosine zero vectors (distance 1 to everything, themselves too)")
        if not g.cosine:
            g.mean = sum(s for s, _, _ in firsts) / n
        S = [rows for _, _, rows in firsts]  # the sample, block by block
        del firsts
        log.debug("DBSCAN (distributed): sums at %.2f s", time.perf_counter() - self.t0)
        k = min(N_BOUND_DIMS, d)
        g.V = _directions(S, g, k)
        log.debug(
            "DBSCAN (distributed): principal directions at %.2f s", time.perf_counter() - self.t0
        )
        # Cells: equal shares of the sample's projections, one cell per new block.
        rows = max(LEAF_ROWS, BLOCK_BYTES // (4 * d))
        n_cells = max(1, -(-n // rows))
        # split along as many leading directions as the in-process engine's tree over all rows
        # would (see cluster.SPLIT_CELLS): cells, then each block's leaves, cut the same grid
        g.n_split = max(
            1, min(k, int(math.log(max(2, n // LEAF_ROWS)) / math.log(SPLIT_CELLS) + 1e-9))
        )
        # The geometry (mean, directions: d x 33 floats) as a literal of the graph, computed
        # once and held by the fit: every later task (cells, the reorder, each tile of each
        # pass) depends on this one key. Not scattered: scattered data has no lineage, and
        # once the active memory manager has dropped a broadcast's extra replicas, the worker
        # holding the last one may die (or be restarted by its nanny for memory), after which
        # every tile submitted with it is cancelled ("already forgotten"). A literal is
        # recomputed like any other task.
        import dask

        self.g_f = client.compute(
            dask.delayed(g, traverse=False, name=f"dbscan-geometry-{uuid.uuid4().hex}")
        )
        if n_cells > 1:
            P = np.concatenate(
                [c64 @ g.V[:, : g.n_split] for part in S for *_, c64, _ in _centred_chunks(part, g)]
            )
            tree = _split_tree(P, n_cells)
            cells_of = _map_batches(
                client, _block_cells, blocks, owner, sizes, None, self.g_f, tree
            )
            log.debug("DBSCAN (distributed): cells at %.2f s", time.perf_counter() - self.t0)
        else:  # one block's worth of rows: one block, however the input was chunked
            cells_of = [np.zeros(m, np.int32) for m in X.chunks[0]]
        del S
        # perm: the input row at each row of the reordered blocks
        row_bytes = X.dtype.itemsize * d
        pieces, place, perm = _reorder(client, blocks, owner, cells_of, row_bytes)
        # the cuts are on the scheduler: drop every hold on the input blocks, so each is
        # freed once its pieces are cut (the scheduler keeps their tasks as lineage)
        del X, blocks, held
        self.blocks, metas = _prepare_blocks(client, pieces, place, self.g_f)
        log.debug(
            "DBSCAN (distributed): reordered and prepared at %.2f s", time.perf_counter() - self.t0
        )
        sizes = [len(m.order) for m in metas]
        self.starts = np.zeros(len(sizes) + 1, np.int64)
        self.starts[1:] = np.cumsum(sizes)
        # the input row at each position: the reorder, then each block's leaf order
        self.perm = np.concatenate(
            [perm[s + m.order] for s, m in zip(self.starts[:-1], metas, strict=True)]
        )
        self.where = np.empty(n, np.int64)
        self.where[self.perm] = np.arange(n)
        return self._block_pairs(metas)

    def _block_pairs(self, metas: list[SimpleNamespace]) -> list[tuple[int, int]]:
        """Block pairs whose balls (full space) and boxes (projected) may hold a pair within
        eps plus every rounding bound; diagonal first (they merge the most)."""
        t = self.g.threshold
        centre = np.array([m.centre for m in metas])
        radius = np.array([m.radius for m in metas])
        bmax = np.array([m.bmax for m in metas])
        lo = np.array([m.lo for m in metas])
        hi = np.array([m.hi for m in metas])
        slack = max(m.slack for m in metas)
        nb = len(metas)
        work = []
        for a in range(nb):
            reach = np.sqrt(t + bmax[a] + bmax[a:]) + slack
            ball = np.sqrt(((centre[a:] - centre[a]) ** 2).sum(axis=1)) - radius[a] - radius[a:]
            gap = np.maximum(0.0, np.maximum(lo[a:] - hi[a], lo[a] - hi[a:]))
            box = np.sqrt((gap**2).sum(axis=1))
            ok = (ball <= reach) & (box <= reach)
            work += [(a, a + int(b)) for b in np.flatnonzero(ok)]
        log.debug("DBSCAN (distributed): prepared in %.2f s", time.perf_counter() - self.t0)
        log.info(
            "DBSCAN (distributed): %d rows in %d blocks on %d workers; %d of %d block pairs "
            "computed, the rest pruned by the blocks' balls and boxes",
            self.n,
            nb,
            len(self.client.scheduler_info(n_workers=-1)["workers"]),
            len(work),
            nb * (nb + 1) // 2,
        )
        work.sort(key=lambda ab: (ab[0] != ab[1], ab))
        return work

    # -- tiles ------------------------------------------------------------------------------
    def _tiles(
        self,
        work: list[tuple[int, int]],
        extra: Callable[[int, int], tuple[Any, Any] | None],
        n_passes: int,
    ) -> Iterator[tuple[np.ndarray, ...]]:
        """Each tile's result as it finishes, with at most ``IN_FLIGHT_PER_THREAD`` tasks per
        worker thread in flight. ``extra(a, b)`` gives the tile's ``(roots, ctx)`` when it is
        submitted (read after the previous results were merged), or ``None`` to skip it.

        Each worker is sent tiles of its own as its earlier ones finish (:func:`take`): a
        tile goes where its blocks are, rather than where the scheduler finds room (which
        moved 0.8 blocks per tile whose blocks live apart at 100k x 256, against the cost
        model's (W - 1) / W, and made tiles fetch both their blocks)."""
        client = self.client
        # None: no worker known (not one joined yet): the tiles go where the scheduler says
        cap = {w: IN_FLIGHT_PER_THREAD * max(1, t) for w, t in client.nthreads().items()}
        cap = cap or {None: IN_FLIGHT_PER_THREAD}
        # where each prepared block is (its first holder; None while being recomputed)
        held = client.who_has(self.blocks)
        owner = [(held.get(f.key) or [None])[0] for f in self.blocks]
        pending: list[tuple[int, int] | None] = list(work)
        first = 0  # every tile before it is taken
        last: dict[Any, int] = {}  # block A of the tile last sent to each worker
        sent_to: dict[Any, Any] = {}  # future key -> the worker it was sent to

        def take(w: Any) -> tuple[int, int] | None:
            """The tile to send to worker ``w`` among the next ``_LOOKAHEAD`` of the work:
            the first of those whose blocks ``w`` holds (2 points a block) or whose block A
            was its last tile's (1 point: its working rows are kept there): fewer blocks
            move and fewer are centred again, and the work's order (diagonal first) mostly
            stays."""
            nonlocal first
            kept = last.get(w)
            best, best_score = -1, -1
            for i in range(first, min(len(pending), first + _LOOKAHEAD)):
                t = pending[i]
                if t is None:
                    continue
                a, b = t
                score = 2 * ((owner[a] == w) + (owner[b] == w)) + (a == kept)
                if score > best_score:
                    best, best_score = i, score
            if best < 0:
                return None
            t, pending[best] = pending[best], None
            while first < len(pending) and pending[first] is None:
                first += 1
            return t

        def submit_to(w: Any) -> Any:
            while (t := take(w)) is not None:
                a, b = t
                args = extra(a, b)
                progress.advance(1, total=n_passes * len(work))
                if args is None:
                    continue
                roots, ctx = args
                ga, gb = int(self.starts[a]), int(self.starts[b])
                A, B = self.blocks[a], self.blocks[b]
                self.stats["tiles"] += 1
                # a loose restriction: another worker runs it if this one is gone
                where = _loosely_on(w)
                f = client.submit(_tile, A, B, ga, gb, self.g_f, roots, ctx, pure=False, **where)
                sent_to[f.key] = w
                last[w] = a
                return f
            return None

        # each worker's share of tiles in flight; a finished tile's slot is its worker's
        running = set()
        for k in range(max(cap.values())):
            for w in cap:
                if k < cap[w] and (f := submit_to(w)) is not None:
                    running.add(f)
        for f in executor.finished(client, running, what=_WHAT):
            w = sent_to.pop(f.key)
            out = f.result()
            f.release()
            yield out
            nxt = submit_to(w)
            if nxt is not None:
                running.add(nxt)

    def _positions(self, a: int, b: int) -> np.ndarray:
        """Positions of block a's rows, then block b's (unless b is a)."""
        ra = np.arange(self.starts[a], self.starts[a + 1])
        if a == b:
            return ra
        return np.concatenate([ra, np.arange(self.starts[b], self.starts[b + 1])])

    def _decide(self, pi: np.ndarray, pj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The near-eps pairs (positions) scikit-learn finds within eps, as positions."""
        ri, rj = _decide(self.decider, self.decider.X, self.perm[pi], self.perm[pj])
        return self.where[ri], self.where[rj]

    # -- the passes -------------------------------------------------------------------------
    def run(self) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        work = self._prepare()
        nb = len(self.blocks)
        k = self.g.V.shape[1]
        self.stats = {
            "blocks": nb,
            "block_pairs": len(work),
            "all_block_pairs": nb * (nb + 1) // 2,
            "tiles": 0,
            # raw row, two (k + 2) float32 factors, six float64 per-row values
            "prepared_row_bytes": 4 * self.d + 8 * (k + 2) + 48,
            "seconds_prepare": round(time.perf_counter() - self.t0, 3),
        }
        self.decider = _SkDecider(_Rows(self), self.eps, self.mode, self.est.leaf_size, None)
        if self.min_samples == 1:
            labels, core = self._components(work), np.ones(self.n, bool)
        else:
            labels, core = self._counts(work)
            labels, core = labels[self.where], core[self.where]
        self.stats["seconds_total"] = round(time.perf_counter() - self.t0, 3)
        # release the prepared blocks now, not when the garbage collector breaks the cycle
        # through the decider's rows (their memory is the fit's whole footprint on the workers)
        self.blocks, self.decider, self.g_f = [], None, None
        return labels, core, self.stats

    def _components(self, work: list[tuple[int, int]]) -> np.ndarray:
        """``min_samples=1``: labels = connected components, numbered by their lowest row."""
        uf = _UnionFind(self.n)

        def extra(a: int, b: int) -> tuple[Any, None] | None:
            roots = uf.find(self._positions(a, b))
            if (roots == roots[0]).all():
                return None  # already one component: nothing here can change the labels
            return roots, None

        self._merge(uf, work, extra, 1)
        return _number(uf.find(self.where))

    def _merge(
        self,
        uf: _UnionFind,
        work: list[tuple[int, int]],
        extra: Callable[[int, int], tuple[Any, Any] | None],
        n_passes: int,
    ) -> None:
        """Merge the tiles' spanning forests into ``uf`` as they finish, then the near-eps
        pairs scikit-learn finds within eps (only those still joining two components)."""
        _union_then_decide(uf, self._tiles(work, extra, n_passes), self._decide)

    def _counts(self, work: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """``min_samples > 1``: three passes (neighbourhood sizes, components among core
        rows, each border row's first cluster), as ``cluster._cluster_counts``; results by
        position."""
        pos_of = self._positions
        need = self.min_samples
        ones = np.ones(self.n)
        # 1. neighbourhood sizes (the row itself included: self-distances are surely <= eps)
        deg = np.ones(self.n)

        def count_ctx(a: int, b: int) -> tuple[None, _PassCtx] | None:
            r = pos_of(a, b)
            if (deg[r] >= need).all():
                return None  # every row already core: no pair here changes anything
            return None, _PassCtx("count", weight=ones[r], deg=deg[r].copy(), need=need)

        und_i, und_j = [], []
        for rows, add, ui, uj in self._tiles(work, count_ctx, 3):
            deg[rows] += add
            und_i.append(ui)
            und_j.append(uj)
        ei, ej = self._decide(_cat(und_i), _cat(und_j))
        np.add.at(deg, ei, 1)
        np.add.at(deg, ej, 1)
        core = deg >= need
        # 2. components among core rows
        uf = _UnionFind(self.n)

        def core_ctx(a: int, b: int) -> tuple[Any, _PassCtx] | None:
            r = pos_of(a, b)
            c = core[r]
            roots = uf.find(r)
            if not c.any() or (roots[c] == roots[c][0]).all():
                return None  # no core row, or all of them already one component
            return roots, _PassCtx("core", core=c)

        self._merge(uf, work, core_ctx, 3)
        # clusters numbered by their lowest core row in input order
        big = np.iinfo(np.int64).max
        label = np.full(self.n, -1, np.int64)
        core_pos = self.where[np.flatnonzero(core[self.where])]  # in input-row order
        if len(core_pos):
            label[core_pos] = _number(uf.find(core_pos))
        # 3. border rows: non-core rows with a neighbour take the smallest core label
        cand = ~core & (deg > 1)
        border = np.full(self.n, big)
        if cand.any() and len(core_pos):

            def border_ctx(a: int, b: int) -> tuple[None, _PassCtx] | None:
                r = pos_of(a, b)
                c, k = core[r], cand[r]
                if not (c.any() and k.any()):
                    return None
                return None, _PassCtx("border", core=c, rows=k, label=label[r])

            und_i, und_j = [], []
            for rows, low, ui, uj in self._tiles(work, border_ctx, 3):
                np.minimum.at(border, rows, low.astype(np.int64))
                und_i.append(ui)
                und_j.append(uj)
            ei, ej = self._decide(_cat(und_i), _cat(und_j))
            every = _PassCtx("border", core=core, rows=cand, label=label)
            np.minimum.at(border, *_border_min(every, ei, ej))
        else:
            progress.advance(len(work), total=3 * len(work))
        out = np.where(core, label, np.where(border != big, border, -1))
        return out, core


def _number(roots: np.ndarray) -> np.ndarray:
    """Labels from the component root of each row (rows in ascending order), numbered in
    order of each component's first row, as scikit-learn numbers its clusters."""
    uniq, first, inv = np.unique(roots, return_index=True, return_inverse=True)
    number = np.empty(len(uniq), np.int64)
    number[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    return number[inv.ravel()]


def _keys(X: Any) -> list[Any]:
    """The keys of X's row blocks, in order (one column block)."""
    return [k for row in X.__dask_keys__() for k in row]


# --------------------------------------------------------------------------------------------
# Rows the later stages read
# --------------------------------------------------------------------------------------------


class ClusteredRows:
    """The rows of a dask array that belong to clusters with more than one member, fetched
    once; indexing by row numbers of the whole array (``X[members]``) reads from them.

    Attributes
    ----------
    shape : tuple (n, d)
        The whole array's shape.
    rows : ndarray of int64, shape (k,)
        The rows held, ascending. Memory: ``k × d × 4`` bytes, where ``k`` counts the rows in
        clusters of two or more (what ``select`` compares), usually a small part of n.
    """

    def __init__(self, shape: tuple[int, int], rows: np.ndarray, values: np.ndarray) -> None:
        self.shape = shape
        self.rows = rows
        self.values = values
        self.dtype = values.dtype
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: Any) -> np.ndarray:
        idx = np.asarray(idx)
        pos = np.searchsorted(self.rows, idx)
        if np.any(pos >= len(self.rows)) or np.any(
            self.rows[np.minimum(pos, len(self.rows) - 1)] != idx
        ):
            raise IndexError("row not in a cluster of two or more: not fetched from the workers")
        return self.values[pos]


def clustered_rows(X: Any, labels: np.ndarray) -> ClusteredRows:
    """Fetch the rows of ``X`` (a dask array) whose label is shared by another row.

    Parameters
    ----------
    X : dask.array.Array of shape (n, d)
    labels : ndarray of int, shape (n,)
        DBSCAN labels (-1 = noise, never fetched).

    Returns
    -------
    ClusteredRows
    """
    lab = np.asarray(labels)
    counts = np.bincount(lab[lab >= 0], minlength=1)
    rows = np.flatnonzero((lab >= 0) & (counts[np.maximum(lab, 0)] > 1))
    values = X[rows].compute() if len(rows) else np.empty((0, X.shape[1]), X.dtype)
    return ClusteredRows(tuple(X.shape), rows, np.ascontiguousarray(values))


def sample_rows(
    X: Any, labels: np.ndarray, size: int = 20000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A uniform random sample of at most ``size`` rows of ``X`` (a dask array) and their
    labels, for estimates that need vectors (the k-distance knee of ``diagnose``): ``(rows
    (k, d), labels (k,))``. Memory: ``size × d × 4`` bytes (40 MB at 512-d)."""
    n = X.shape[0]
    pick = np.arange(n)
    if n > size:
        pick = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    return np.ascontiguousarray(X[pick].compute()), np.asarray(labels)[pick]
