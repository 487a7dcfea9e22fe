"""Exact DBSCAN of a ``dask.array`` whose row blocks stay on the Dask workers.

:func:`fit_dask` is what :meth:`dedup_batch.cluster.DBSCAN.fit` runs for a ``dask.array.Array``
input. No process ever holds all of X: the row blocks stay where they are (persisted, ~8 MiB
each), every per-row computation runs on the worker holding the row, a tile task reads two blocks
(Dask moves a block from worker to worker when the two live apart), and the client holds O(n)
small integers (a union-find, per-row counts and labels) plus a few KB per block.

1. Block statistics on the workers: the column sum (the euclidean centre), then per block the
   centroid and radius of its centred (euclidean) or normalised (cosine) rows and its largest
   rounding band. Block pairs whose balls are farther apart than ``eps`` plus every rounding
   bound are never scheduled.
2. Tile tasks (two blocks) compute float32 products and decide each pair by the rigorous bounds
   of :mod:`dedup_batch.cluster` (``_float32_band``): surely in, surely out, or near ``eps``,
   which is re-decided in float64 from the two blocks (``cluster._refine``). A tile returns a
   spanning forest of its edges (``min_samples=1``) or per-row counts / smallest core labels
   (``min_samples > 1``), never its pairs, plus the few pairs still within scikit-learn's own
   rounding of ``eps``.
3. Those pairs are decided by scikit-learn's own computation (``cluster._SkDecider``,
   ``cluster._recheck``), which fetches only the rows it needs: two 256-row chunks per pair for
   euclidean, a padded row subset for cosine.
4. Tasks go out in bounded waves (two per worker thread in flight); for ``min_samples=1`` each
   submission carries the current component roots of its two blocks, so a tile whose rows are
   already one component is skipped and a partly merged one computes only what can still merge.

Exactness: labels, core samples and cluster numbering are scikit-learn's, ties at ``eps``
included. What the distributed engine does not cover is gathered on the client and fitted by the
in-process engine (which may delegate to scikit-learn): input other than float32, metrics other
than euclidean/cosine, euclidean with d <= 15 (scikit-learn decides by a KD-tree),
``sample_weight``, cosine zero vectors, an ``eps`` below the rounding of a self-distance, a
near-eps pair scikit-learn decides asymmetrically, and cosine near-eps pairs on a BLAS whose GEMM
rounds by shape (scikit-learn's whole row chunk is then needed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np

from . import progress
from .cluster import (
    _U32,
    _U64,
    _float32_band,
    _forest,
    _Irregular,
    _Mode,
    _per_row,
    _recheck,
    _refine,
    _resolve_mode,
    _restrict,
    _SkDecider,
    _UnionFind,
)

__all__ = ["BLOCK_BYTES", "ClusteredRows", "clustered_rows", "fit_dask", "sample_rows"]

log = logging.getLogger(__name__)

#: Target bytes of a row block (float32 rows): a tile task holds two blocks, their float32
#: copies and one (rows x rows) float32 product: ~50 MiB at 8 MiB blocks of 512-d rows (4096
#: rows). Blocks from 1/4 to 2x this are used as they are (no data moves); others are rechunked.
BLOCK_BYTES = 8 << 20
#: Tiles in flight per worker thread: enough to hide the client's merge between results,
#: few enough that finished results never pile up (each is O(rows of two blocks)).
IN_FLIGHT_PER_THREAD = 2
# Rows of block A multiplied at once in a tile: a (1024 x rows_B) product and its float64 sums.
_TILE_ROWS = 1024


class _NeedsGather(Exception):
    """This fit needs something only the in-process engine provides: gather X and use it."""


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def fit_dask(est: Any, X: Any, sample_weight: Any = None) -> Any:
    """Fit ``est`` (a :class:`dedup_batch.cluster.DBSCAN`) to the dask array ``X``.

    Parameters
    ----------
    est : dedup_batch.cluster.DBSCAN
        Its parameters as given; ``labels_``, ``core_sample_indices_``, ``components_`` and
        ``n_features_in_`` are set.
    X : dask.array.Array of shape (n, d)
        Rows to cluster, persisted on the workers of the current ``distributed.Client`` (it is
        persisted here if it is not). Without a current client, X is computed here and fitted
        in process.
    sample_weight : array-like of shape (n,), optional
        As in scikit-learn: gathered and fitted in process.

    Returns
    -------
    est

    Notes
    -----
    ``components_`` is a ``dask.array`` (the core rows, lazily selected on the workers): the
    engine never gathers X. Memory on the client: 8 bytes per row for the union-find (plus 8
    per row for counts with ``min_samples > 1``), the block table (d float64 per block) and
    the results of the tiles in flight. Per worker: its share of the blocks plus, per thread,
    one tile (two blocks, their float32 working copies and a rows x rows float32 product).
    Time: O(n_pairs_scheduled x rows^2 x d) multiply-adds, where block pairs are pruned by
    their balls; bytes moved between workers: one block per tile whose blocks live apart.
    """
    from distributed import get_client

    try:
        client = get_client()
    except ValueError:
        client = None
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
        return est.fit(X.compute(), sample_weight=sample_weight)
    labels, core = result
    est.labels_ = labels.astype(np.intp)
    est.core_sample_indices_ = np.flatnonzero(core)
    est.components_ = X[est.core_sample_indices_]
    est.n_features_in_ = X.shape[1]
    return est


def _not_covered(est: Any, X: Any, mode: _Mode | None, client: Any) -> str | None:
    """Why this fit cannot run distributed, or ``None``."""
    if client is None:
        return "no Dask client is current"
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


def _block_sum(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Dask task: ``(column sum in float64, number of all-zero rows)`` of a block."""
    zero = int((~np.any(x != 0, axis=1)).sum())
    return x.sum(axis=0, dtype=np.float64), zero


def _prep_block(x: np.ndarray, p: SimpleNamespace) -> tuple[np.ndarray, ...]:
    """A block's float32 working rows and their rounding bounds, as the in-process engine
    prepares them (``cluster._prepare``): ``(C, csq, band, sk_err)``.

    ``C`` (m, d) float32: rows centred on the global mean (euclidean) or normalised (cosine),
    ``csq`` (m,) float64 their squared norms, ``band`` (m,) the bound on |float32 value - exact
    value| of a squared distance near the threshold, ``sk_err`` (m,) scikit-learn's own
    rounding. Memory: one (m, d) float64 temporary.
    """
    x64 = x.astype(np.float64)
    sq = np.einsum("ij,ij->i", x64, x64)
    if p.cosine:
        x64 /= np.sqrt(sq)[:, None]
        sk_err = np.full(len(x), 2.0 * (p.d + 8) * _U32 * 2.0)
    else:
        x64 -= p.mean
        sk_err = (4.0 * (p.d + 8) * _U64) * sq + 64 * _U64 * p.threshold
    csq = np.einsum("ij,ij->i", x64, x64)
    band = _float32_band(csq, p.d + 2, p.threshold) + sk_err
    return x64.astype(np.float32), csq, band, sk_err


def _block_ball(x: np.ndarray, p: SimpleNamespace) -> tuple[np.ndarray, float, float]:
    """Dask task: ``(centroid, radius, largest band)`` of a block's working rows (float64).

    Every pair (i in A, j in B) has |c_i - c_j| >= |centroid_A - centroid_B| - r_A - r_B; the
    radius is rounded up by a relative 1e-9 so the bound stays a bound.
    """
    C, csq, band, _ = _prep_block(x, p)
    c64 = C.astype(np.float64)  # the values the tiles multiply
    centre = c64.mean(axis=0)
    diff = c64 - centre
    r = float(np.sqrt(np.einsum("ij,ij->i", diff, diff).max(initial=0.0)))
    return (
        centre,
        r * (1 + 1e-9) + 1e-9 * (1.0 + float(np.sqrt(csq.max(initial=0.0)))),
        float(band.max(initial=0.0)),
    )


def _tile(
    xa: np.ndarray,
    xb: np.ndarray,
    ga: int,
    gb: int,
    p: SimpleNamespace,
    roots: np.ndarray | None,
    ctx: SimpleNamespace | None,
) -> tuple[np.ndarray, ...]:
    """Dask task: the pairs within eps between blocks A (global rows ``ga + k``) and B (``gb +
    k``; B is A when ``ga == gb``), reduced as the pass needs.

    ``roots`` (``min_samples=1``): the component root of each row of A then B when submitted;
    only pairs that can still merge two components are computed (``cluster._restrict``).
    ``ctx`` (``min_samples > 1``): ``kind`` ``"count"``, ``"core"`` (with ``core`` per row of
    A then B) or ``"border"`` (``core``, ``label``, ``cand``).

    Returns ``(i, j, band_i, band_j)`` in global rows: for ``min_samples=1`` and ``"core"`` a
    spanning forest of the sure edges; for ``"count"`` ``(rows, neighbours)``; for
    ``"border"`` ``(rows, smallest core label)``; and the pairs still within scikit-learn's
    rounding of eps after a float64 look. Memory: two blocks, their float32 working copies and
    a (rows_A x rows_B) float32 product.
    """
    from threadpoolctl import threadpool_limits

    same = ga == gb
    ma = len(xa)
    A = _prep_block(xa, p)
    B = A if same else _prep_block(xb, p)
    # local numbering: A's rows 0..ma-1, then B's (B's rows are A's when same)
    off = 0 if same else ma
    C = [A[0], B[0]]
    csq = np.concatenate([A[1], B[1]]) if not same else A[1]
    band = np.concatenate([A[2], B[2]]) if not same else A[2]
    t = p.threshold
    ia, ib = np.arange(ma), off + np.arange(len(xb))
    if ctx is not None:
        if ctx.kind == "core":
            ia, ib = ia[ctx.core[ia]], ib[ctx.core[ib]]
        elif ctx.kind == "border":
            # candidate rows against core rows, either side of the tile
            ca, cb = ctx.cand[ia], ctx.cand[ib]
            ia, ib = ia[ca | ctx.core[ia]], ib[cb | ctx.core[ib]]
    blocks = [(ia, ib)]
    if roots is not None and len(ia) and len(ib):
        blocks = _restrict(None, lambda _a, rows: roots[rows], 0, ia, ib)
    hi = t + float(band.max(initial=0.0)) * 2
    sure_i, sure_j, und_i, und_j = [], [], [], []
    with threadpool_limits(limits=1, user_api="blas"):
        for bi_all, bj in blocks:
            # _TILE_ROWS rows at a time: the float64 sums and the mask stay ~8 MiB each
            for lo in range(0, len(bi_all) if len(bj) else 0, _TILE_ROWS):
                bi = bi_all[lo : lo + _TILE_ROWS]
                S = C[0][bi] @ C[1][bj - off].T
                s32 = (csq[bi][:, None] + csq[bj][None, :]).astype(np.float32)
                s32 -= 2.0 * S
                del S
                r, c = np.nonzero(s32 <= hi)
                gi, gj = bi[r], bj[c]
                s = s32[r, c].astype(np.float64)
                del s32, r, c
                if same:  # pairs inside one block: each unordered pair once
                    keep = gi < gj
                    gi, gj, s = gi[keep], gj[keep], s[keep]
                w = band[gi] + band[gj]
                sure = s < t - w
                near = ~sure & (s <= t + w)
                sure_i.append(gi[sure])
                sure_j.append(gj[sure])
                und_i.append(gi[near])
                und_j.append(gj[near])
    si, sj = _cat(sure_i), _cat(sure_j)
    ui, uj = _cat(und_i), _cat(und_j)
    if len(ui):  # a second look in float64 from the original rows: most pairs settle here
        Xl = xa if same else np.concatenate([xa, xb])
        sk = A[3] if same else np.concatenate([A[3], B[3]])
        idx = np.arange(len(Xl))
        prep = SimpleNamespace(threshold=t, sk_err=sk)
        surely, undecided = _refine(Xl, idx, ui, uj, prep, idx, _Mode(p.kind))
        si, sj = np.concatenate([si, ui[surely]]), np.concatenate([sj, uj[surely]])
        ui, uj = ui[undecided], uj[undecided]
    kind = "edges" if ctx is None else ctx.kind
    if kind == "count":  # both ends gain a neighbour
        si, sj = _per_row(np.concatenate([si, sj]), np.ones(2 * len(si)), "sum")
    elif kind == "border":
        si, sj = _border_min(ctx, si, sj)
    else:
        si, sj = _forest(si, sj)

    def glob(k: np.ndarray) -> np.ndarray:
        return np.where(k < ma, ga + k, gb + k - off).astype(np.int64)

    ui, uj = glob(ui), glob(uj)
    if kind == "count":
        return glob(si), sj, ui, uj
    if kind == "border":
        return glob(si), sj.astype(np.int64), ui, uj
    return glob(si), glob(sj), ui, uj


def _border_min(ctx: SimpleNamespace, i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(rows, smallest label)`` over edges ``(i, j)`` (local rows): for each candidate row,
    the smallest label of its core neighbours, edges in either orientation."""
    m1 = ctx.cand[i] & ctx.core[j]
    m2 = ctx.cand[j] & ctx.core[i]
    rows = np.concatenate([i[m1], j[m2]])
    return _per_row(rows, np.concatenate([ctx.label[j[m1]], ctx.label[i[m2]]]), "min")


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)


# --------------------------------------------------------------------------------------------
# Rows fetched for scikit-learn's own decision
# --------------------------------------------------------------------------------------------


class _Rows:
    """The rows of a dask array as ``_SkDecider`` reads them: ``X[a:b]`` and ``X[indices]``
    fetch only those rows from the workers (a slice is cached: scikit-learn's 256-row chunks
    are read again for each pair in them). Anything needing all of X raises
    :class:`_NeedsGather`: the fit is then gathered and run in process."""

    def __init__(self, X: Any) -> None:
        self.X = X
        self.shape = X.shape
        self.dtype = X.dtype
        self._slices: dict[tuple[int, int], np.ndarray] = {}

    def prefetch(self, starts: np.ndarray, size: int) -> None:
        """Fetch the slices ``[s, s + size)`` for ``s`` in ``starts`` in one round trip."""
        import dask

        n = self.shape[0]
        todo = [(int(s), min(n, int(s) + size)) for s in np.unique(starts)]
        todo = [k for k in todo if k not in self._slices]
        if not todo:
            return
        got = dask.compute(*[self.X[s:e] for s, e in todo])
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
                self._slices[(s, e)] = self.X[s:e].compute()
            return self._slices[(s, e)]
        idx = np.asarray(key)
        if idx.dtype == bool or idx.ndim != 1:
            raise _NeedsGather("a masked read of X")
        if len(idx) > max(65536, n // 4):
            raise _NeedsGather("scikit-learn's decision needs most of X")
        uniq, inv = np.unique(idx, return_inverse=True)
        return self.X[uniq].compute()[inv]

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


# --------------------------------------------------------------------------------------------
# The client's side
# --------------------------------------------------------------------------------------------


class _DaskFit:
    """One distributed fit: the blocks, their bounds, the tile waves and the reductions."""

    def __init__(self, est: Any, X: Any, mode: _Mode, client: Any) -> None:
        self.est, self.mode, self.client = est, mode, client
        self.eps = float(est.eps)
        self.min_samples = int(est.min_samples)
        n, d = X.shape
        rows = max(256, BLOCK_BYTES // (4 * d))
        sizes = X.chunks[0]
        if len(X.chunks[1]) > 1 or any(s > 2 * rows or s < rows // 4 for s in sizes[:-1]):
            X = X.rechunk({0: rows, 1: -1})
        self.X = client.persist(X)
        self.n, self.d = n, d
        starts = np.zeros(len(self.X.chunks[0]) + 1, np.int64)
        starts[1:] = np.cumsum(self.X.chunks[0])
        self.starts = starts
        from distributed import Future

        self.blocks = [Future(k, client) for (k,) in zip(_keys(self.X), strict=True)]
        cosine = mode.kind == "cosine"
        self.p = SimpleNamespace(
            kind=mode.kind,
            cosine=cosine,
            d=d,
            threshold=2.0 * self.eps if cosine else self.eps * self.eps,
            mean=None,
        )

    # -- preparation ------------------------------------------------------------------------
    def _prepare(self) -> list[tuple[int, int]]:
        """The block pairs to compute (A <= B), diagonal first; fills ``self.p``."""
        client, p = self.client, self.p
        sums = client.gather(client.map(_block_sum, self.blocks, pure=False))
        if p.cosine and sum(z for _, z in sums):
            raise _NeedsGather("cosine zero vectors (distance 1 to everything, themselves too)")
        if not p.cosine:
            p.mean = sum(s for s, _ in sums) / self.n
        balls = client.gather(client.map(_block_ball, self.blocks, p=p, pure=False))
        centre = np.array([b[0] for b in balls])
        radius = np.array([b[1] for b in balls])
        bmax = np.array([b[2] for b in balls])
        if bmax.max() >= p.threshold:
            # identical rows are neighbours only if scikit-learn surely finds them within eps
            raise _NeedsGather("eps is within the rounding of a self-distance")
        scale = 1e-9 * (1.0 + float(np.sqrt((centre**2).sum(axis=1).max())))
        work = []
        nb = len(self.blocks)
        for a in range(nb):
            gap = np.sqrt(((centre[a:] - centre[a]) ** 2).sum(axis=1)) - radius[a] - radius[a:]
            gap -= scale
            reach = p.threshold + bmax[a] + bmax[a:]
            ok = (gap <= 0) | (gap * gap <= reach)
            work += [(a, a + int(b)) for b in np.flatnonzero(ok)]
        log.info(
            "DBSCAN (distributed): %d rows in %d blocks on %d workers; %d of %d block pairs "
            "computed, the rest pruned by the blocks' balls",
            self.n,
            nb,
            len(client.scheduler_info(n_workers=-1)["workers"]),
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
        submitted (read after the previous results were merged), or ``None`` to skip it."""
        from distributed import as_completed

        client = self.client
        slots = IN_FLIGHT_PER_THREAD * max(1, sum(client.nthreads().values()))
        p_f = client.scatter(self.p, broadcast=True, hash=False)  # d floats: once per fit
        todo = iter(work)

        def submit_next() -> Any:
            for a, b in todo:
                args = extra(a, b)
                progress.advance(1, total=n_passes * len(work))
                if args is None:
                    continue
                roots, ctx = args
                ga, gb = int(self.starts[a]), int(self.starts[b])
                xa, xb = self.blocks[a], self.blocks[b]
                return client.submit(_tile, xa, xb, ga, gb, p_f, roots, ctx, pure=False)
            return None

        running = as_completed([f for f in (submit_next() for _ in range(slots)) if f])
        for f in running:
            out = f.result()
            f.release()
            yield out
            nxt = submit_next()
            if nxt is not None:
                running.add(nxt)

    def _rows(self, a: int, b: int) -> np.ndarray:
        """Global rows of block a, then of block b (unless b is a)."""
        ra = np.arange(self.starts[a], self.starts[a + 1])
        if a == b:
            return ra
        return np.concatenate([ra, np.arange(self.starts[b], self.starts[b + 1])])

    # -- the passes -------------------------------------------------------------------------
    def run(self) -> tuple[np.ndarray, np.ndarray]:
        work = self._prepare()
        decider = _SkDecider(_Rows(self.X), self.eps, self.mode, self.est.leaf_size, None)
        if self.min_samples == 1:
            return self._components(work, decider), np.ones(self.n, bool)
        return self._counts(work, decider)

    def _components(self, work: list[tuple[int, int]], decider: _SkDecider) -> np.ndarray:
        """``min_samples=1``: labels = connected components, numbered by their lowest row."""
        uf = _UnionFind(self.n)

        def extra(a: int, b: int) -> tuple[Any, None] | None:
            roots = uf.find(self._rows(a, b))
            if (roots == roots[0]).all():
                return None  # already one component: nothing here can change the labels
            return roots, None

        und_i, und_j = [], []
        for fi, fj, ui, uj in self._tiles(work, extra, 1):
            uf.union(fi, fj)
            keep = uf.find(ui) != uf.find(uj)
            und_i.append(ui[keep])
            und_j.append(uj[keep])
        bi, bj = _cat(und_i), _cat(und_j)
        keep = uf.find(bi) != uf.find(bj)
        uf.union(*_decide(decider, decider.X, bi[keep], bj[keep]))
        return _number(uf.roots())

    def _counts(
        self, work: list[tuple[int, int]], decider: _SkDecider
    ) -> tuple[np.ndarray, np.ndarray]:
        """``min_samples > 1``: three passes (neighbourhood sizes, components among core
        rows, each border row's first cluster), as ``cluster._cluster_counts``."""
        rows_of = self._rows
        # 1. neighbourhood sizes (the row itself included: self-distances are surely <= eps)
        deg = np.ones(self.n, np.int64)
        count = SimpleNamespace(kind="count")
        und_i, und_j = [], []
        for rows, add, ui, uj in self._tiles(work, lambda a, b: (None, count), 3):
            deg[rows] += add.astype(np.int64)
            und_i.append(ui)
            und_j.append(uj)
        ei, ej = _decide(decider, decider.X, _cat(und_i), _cat(und_j))
        np.add.at(deg, ei, 1)
        np.add.at(deg, ej, 1)
        core = deg >= self.min_samples
        # 2. components among core rows
        uf = _UnionFind(self.n)

        def core_ctx(a: int, b: int) -> tuple[Any, Any] | None:
            r = rows_of(a, b)
            c = core[r]
            roots = uf.find(r)
            if not c.any() or (roots[c] == roots[c][0]).all():
                return None  # no core row, or all of them already one component
            return roots, SimpleNamespace(kind="core", core=c)

        und_i, und_j = [], []
        for fi, fj, ui, uj in self._tiles(work, core_ctx, 3):
            uf.union(fi, fj)
            keep = uf.find(ui) != uf.find(uj)
            und_i.append(ui[keep])
            und_j.append(uj[keep])
        bi, bj = _cat(und_i), _cat(und_j)
        keep = uf.find(bi) != uf.find(bj)
        uf.union(*_decide(decider, decider.X, bi[keep], bj[keep]))
        big = np.iinfo(np.int64).max
        label = np.full(self.n, -1, np.int64)
        core_rows = np.flatnonzero(core)
        if len(core_rows):
            label[core_rows] = _number(uf.find(core_rows))
        # 3. border rows: non-core rows with a neighbour take the smallest core label
        cand = ~core & (deg > 1)
        border = np.full(self.n, big)
        if cand.any() and len(core_rows):

            def border_ctx(a: int, b: int) -> tuple[Any, Any] | None:
                r = rows_of(a, b)
                c, k = core[r], cand[r]
                if not (c.any() and k.any()):
                    return None
                return None, SimpleNamespace(kind="border", core=c, cand=k, label=label[r])

            und_i, und_j = [], []
            for rows, low, ui, uj in self._tiles(work, border_ctx, 3):
                np.minimum.at(border, rows, low)
                und_i.append(ui)
                und_j.append(uj)
            ei, ej = _decide(decider, decider.X, _cat(und_i), _cat(und_j))
            glob = SimpleNamespace(cand=cand, core=core, label=label)
            np.minimum.at(border, *_border_min(glob, ei, ej))
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
