"""Exact DBSCAN with scikit-learn's semantics, computed in tiles.

:class:`DBSCAN` is a drop-in for :class:`sklearn.cluster.DBSCAN`: same parameters, same
``labels_`` (numbering included), ``core_sample_indices_`` and ``components_``. It never holds the
neighbourhoods: identical rows collapse to one representative, the eps-graph between
representatives is computed tile by tile (float32 matrix products on a thread pool or on Dask
workers), tiles that cannot hold a pair within ``eps`` are skipped by exact lower bounds, and
components are merged with union-find as tiles finish.

Exactness. A float32 product rounds, so every pair whose float32 value lies within a rigorous
error bound of ``eps`` is re-decided by the computation scikit-learn itself performs for that pair
(same library routine, same chunk geometry): scikit-learn's own rounding decides a pair that is
mathematically at ``eps``, and the result is its result. If such a re-decided pair turns out not to
be uniform (scikit-learn's rounding can make ``j`` a neighbour of ``i`` but not ``i`` of ``j``, or
treat two copies of one vector differently), the fit is delegated to scikit-learn, which is the
only way to reproduce that asymmetry. Inputs the engine does not cover (sparse or precomputed
input, metrics other than euclidean/cosine, ``metric_params``, ``sample_weight``) are delegated to
scikit-learn as well.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.cluster import DBSCAN as _SkDBSCAN

from . import _sklearn_compat as _skc
from . import executor, progress

__all__ = ["DBSCAN", "dbscan", "eps_graph"]

log = logging.getLogger(__name__)

#: Rows per tile side. A tile's float32 products take TILE**2 * 4 bytes (16 MiB at 2048); a
#: worker holds one tile at a time, so memory stays a few tiles whatever n is.
TILE = 2048
#: Leaves of the projection tree hold at most this many representatives: small leaves give
#: tight boxes (more tile pairs skipped); a task multiplies one leaf by up to TILE columns.
LEAF = 256
#: The tree's leaves hold at most LEAF_SCALE * LEAF rows (512), in :func:`_prepare` and in
#: each block of the distributed engine (:mod:`dedup_batch.cluster_dask`'s ``LEAF_ROWS``).
#: On copies200k twice the rows per leaf halve the tile blocks (45k -> 21k), and with them
#: the per-block work (roots, forests, index arrays), and give each product twice the rows,
#: for 1% more pairs through the screen (10.70G vs 10.56G: the box bounds prune about half
#: the pairs there at either size): 12% less CPU time on its first 100,000 rows (11.6 vs
#: 14.3 s, one thread, best of 3 alternating).
LEAF_SCALE = 2
#: Principal directions used for the exact lower bounds: leaf boxes, and a first low-rank
#: product per tile (the distance of the projections never exceeds the distance), so the full
#: d-dimensional product is only computed for the few pairs that pass it.
#: More directions do not help flat spectra: on isotropic 256-d rows (eps 0.6) 58 directions
#: made the screen prune most pairs, but screen plus gathered survivors took 18 s against 13 s
#: for the fused full product without a screen (20,000 rows, one thread, same load).
N_BOUND_DIMS = 32
#: The projection tree splits only along the few leading principal directions, as many as
#: keep at least SPLIT_CELLS leaves per direction: leaves then form a fine grid there (cells
#: much narrower than eps), and the box gap prunes every leaf pair whose leading coordinates
#: differ by more than eps. Splitting along the widest of all 32 directions instead cuts each
#: direction once or twice into cells wider than eps, which prune almost nothing. Measured
#: (fraction of pairs computed, decaying-spectrum rows, eps 0.6): 200k rows (780 leaves): 50%
#: with 2 directions, 52% with 3, 64% with 4, 88% with all 32; 1M rows (3900 leaves): 47% with
#: 2, 45% with 3.
SPLIT_CELLS = 12
#: scikit-learn's pairwise chunk (``pairwise_dist_chunk_size``): the geometry its brute-force
#: euclidean GEMMs use, which the re-check must reproduce bit for bit.
_SK_CHUNK = 256
#: Smallest M*N*K for a GEMM the cosine re-check runs on a subset of scikit-learn's rows: far
#: above OpenBLAS's small-matrix kernels (M*N*K <= 1e6) and single-thread cut-off (M*N*K <=
#: 2^18 per thread), so the subset takes the same kernel path as scikit-learn's whole chunk.
_GEMM_MIN_MNK = 1 << 24
#: A block whose low-rank screen passes more than 1/FUSED_SHARE of its pairs takes the fused
#: path (full product thresholded in place, see :func:`_fused_block`): gathering that many
#: survivors costs more than the full product. Measured on 200k x 512 rows with 60,000 noisy
#: copies of one vector (the copies' noise is isotropic, so no projection prunes their pairs):
#: 595M of the 1.1G pairs in such blocks passed the screen.
FUSED_SHARE = 16
#: The screen's survivors of a block take one product of their distinct rows and columns
#: when it has at most this many pairs per survivor, else a dot product per survivor (see
#: :func:`_survivor_values`): a gathered pair costs ~60-170 pairs of a product.
SUB_PRODUCT_SHARE = 32
#: Columns per product of the low-rank screen: each (SCREEN_CHUNK x leaf) float32 product
#: (1 MiB at 512 x 512) is reduced to its minimum while in cache. Measured on a 2048 x 512
#: block (one thread, best of 20): one product and its min 0.86 ms, four chunks of 512 0.67
#: ms (256: 0.70; 128: 0.80).
SCREEN_CHUNK = 512
#: The float32 working rows of the tiles (centred or normalised, in leaf order) are kept whole
#: when they take at most this many bytes; beyond, each tile builds its leaves' rows from the
#: input in place (:class:`_RowCache`) and at most half this many bytes of them are kept.
#: So the peak never holds a second (m, d) copy of a large input (600k x 512 float32: 1.14 GiB
#: saved), while inputs up to 256k x 512 keep the contiguous copy, which is cheaper: building a
#: leaf's rows (gather, float64 centring, cast) costs ~60% of one 256 x 2048 x 512 product,
#: and a column leaf is multiplied once per leaf that reaches it.
ROW_BYTES = 512 << 20
#: A tile block (min_samples=1) leaves out the pairs inside the largest component among
#: about this many of its rows' roots: sorting all of them (~4,600 in a 512 x 4096 block)
#: measured ~0.1 ms a block; which component is left out changes only the work, not the
#: pairs that are computed outside it.
ROOT_SAMPLE = 512
#: ... and splits the block in two only when that leaves out at least 1/_SPLIT_GAIN of its pairs.
_SPLIT_GAIN = 8
_U32 = 2.0**-24
_U64 = 2.0**-53


# --------------------------------------------------------------------------------------------
# What the engine covers, and how scikit-learn would compute a distance
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Mode:
    """How scikit-learn decides a pair for these parameters.

    ``kind`` is ``"brute"`` (EuclideanRadiusNeighbors: ||x||^2 - 2x.y + ||y||^2 by GEMM in
    256-row chunks), ``"tree"`` (KDTree/BallTree: sum of squared differences, with node bounds)
    or ``"cosine"`` (pairwise_distances_chunked: 1 - x^.y^ by a matmul of row chunks).
    """

    kind: str
    tree: str = ""  # "kd_tree" or "ball_tree" for kind == "tree"


def _resolve_mode(est: DBSCAN, X: Any, sample_weight: Any) -> _Mode | None:
    """The engine's mode for this fit, or ``None`` to delegate to scikit-learn."""
    if sample_weight is not None or sparse.issparse(X) or est.metric_params:
        return None
    if not isinstance(est.metric, str):
        return None
    metric = est.metric
    if metric in ("minkowski", "l2", "euclidean"):
        if metric == "minkowski" and est.p not in (None, 2):
            return None
        if metric == "l2" and est.algorithm in ("auto", "kd_tree", "ball_tree"):
            # sklearn resolves "l2" through DistanceMetric; keep its exact path.
            return None
        d = X.shape[1]
        algo = est.algorithm
        if algo == "auto":
            algo = "brute" if d > 15 else "kd_tree"
        if algo == "brute":
            if X.dtype not in (np.float32, np.float64):
                # scikit-learn's brute force takes another route for other dtypes (integers:
                # pairwise_distances_chunked in float64), which the re-check does not mirror
                return None
            return _Mode("brute")
        return _Mode("tree", algo)
    if metric == "cosine":
        if est.algorithm not in ("auto", "brute"):
            return None  # sklearn raises: trees do not support cosine
        return _Mode("cosine")
    return None


# --------------------------------------------------------------------------------------------
# Duplicates
# --------------------------------------------------------------------------------------------


def _distinct_rows(X: np.ndarray, mode: Any) -> tuple[np.ndarray, ...]:
    """The distinct rows of ``X``: ``first`` (index of each, ascending), ``inverse`` (row ->
    distinct), ``counts``, ``excluded`` (cosine zero vectors, which have no direction) and
    ``subset``: the rows of ``X`` to prepare (``first[~excluded]``), or None for all of
    them. The distinct rows are read where they lie (:func:`_prepare`'s ``subset``): exact
    copies, common in a bucket of duplicates, cost no copy of the input."""
    first, inverse = _unique_rows(X)
    m = len(first)
    counts = np.bincount(inverse, minlength=m)
    excluded = np.zeros(m, bool)
    if mode.kind == "cosine":  # by chunks: X != 0 whole is an (m, d) bool temporary
        step = _chunk_rows(X.shape[1])
        for s in range(0, m, step):
            excluded[s : s + step] = ~np.any(X[first[s : s + step]] != 0, axis=1)
    subset = first[~excluded]
    return first, inverse, counts, excluded, None if len(subset) == X.shape[0] else subset


#: Rows per chunk of :func:`_unique_rows` (its hash's product and its verifying gather each
#: take one): 8 MiB of them.
_HASH_CHUNK_BYTES = 8 << 20


def _unique_rows(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(first, inverse)``: representative row indices (the lowest index of each group of
    bitwise-identical rows, ascending) and each row's representative number.

    Rows are hashed in chunks (8 bytes per row held), grouped by hash, then verified equal to
    their representative; a hash collision (never seen) falls back to an exact sort.
    """
    n = X.shape[0]
    raw = np.ascontiguousarray(X).view(np.uint8).reshape(n, -1)
    step = max(1, _HASH_CHUNK_BYTES // max(1, raw.shape[1] + 8))
    h = _row_hashes(raw, step)
    _, first_of_hash, inverse = np.unique(h, return_index=True, return_inverse=True)
    # np.unique orders groups by hash; renumber them by their first row so that representative
    # k is the k-th new vector in input order.
    order = np.argsort(first_of_hash, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    first = first_of_hash[order]
    inverse = rank[inverse.ravel()]
    for s in range(0, n, step):
        # a row that is its own representative (the first of its hash) has nothing to verify:
        # an input without copies is not gathered again (0.36 of 0.56 s at 200k x 512)
        rep = first[inverse[s : s + step]]
        later = np.flatnonzero(rep != np.arange(s, s + len(rep)))
        if len(later) and not np.array_equal(raw[s + later], raw[rep[later]]):
            _, first, inverse = np.unique(raw, axis=0, return_index=True, return_inverse=True)
            order = np.argsort(first, kind="stable")
            rank = np.empty_like(order)
            rank[order] = np.arange(len(order))
            return first[order], rank[inverse.ravel()]
    return first, inverse


def _row_hashes(raw: np.ndarray, step: int) -> np.ndarray:
    """(n,) uint64 hash of each row of ``raw`` (n, width) uint8, ``step`` rows at a time:
    a random odd multiplier per 8-byte word, summed, then mixed."""
    n, width = raw.shape
    pad = (-width) % 8
    rng = np.random.default_rng(0x5EED)
    mult = rng.integers(1, 2**63, size=(width + pad) // 8, dtype=np.uint64) | np.uint64(1)
    h = np.empty(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for s in range(0, n, step):
            block = raw[s : s + step]
            if pad:
                block = np.concatenate([block, np.zeros((len(block), pad), np.uint8)], axis=1)
            words = np.ascontiguousarray(block).view(np.uint64)
            acc = (words * mult).sum(axis=1, dtype=np.uint64)
            acc ^= acc >> np.uint64(29)
            h[s : s + step] = acc
    return h


# --------------------------------------------------------------------------------------------
# Union-find over representative numbers (vectorised)
# --------------------------------------------------------------------------------------------


class _UnionFind:
    """Disjoint sets of ``0..n-1``; ``union(i, j)`` takes whole edge arrays at once."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: np.ndarray) -> np.ndarray:
        p = self.parent
        r = p[x]
        while True:
            rr = p[r]
            if np.array_equal(rr, r):
                break
            r = rr
        p[x] = r  # path compression for the queried nodes
        return r

    def union(self, i: np.ndarray, j: np.ndarray) -> None:
        if len(i) == 0:
            return
        ri, rj = self.find(i), self.find(j)
        keep = ri != rj
        if not keep.any():
            return
        ri, rj = ri[keep], rj[keep]
        nodes, inv = np.unique(np.concatenate([ri, rj]), return_inverse=True)
        k = len(nodes)
        g = sparse.coo_matrix(
            (np.ones(len(ri), np.int8), (inv[: len(ri)], inv[len(ri) :])), shape=(k, k)
        )
        _, comp = connected_components(g, directed=False)
        # each component's root becomes its smallest node (deterministic)
        root = np.full(comp.max() + 1, np.iinfo(np.int64).max)
        np.minimum.at(root, comp, nodes)
        self.parent[nodes] = root[comp]

    def roots(self) -> np.ndarray:
        return self.find(np.arange(len(self.parent)))


# --------------------------------------------------------------------------------------------
# The tiled eps-graph
# --------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    """Per-representative data shipped to tile tasks (scattered once under Dask).

    ``C`` (m, d) float32: the centred (euclidean) or normalised (cosine) vectors (with ``aug``,
    (m, d + 2): each followed by 1 and its squared norm), ``csq`` (m,) float64 their squared
    norms, so that |c_i - c_j|^2 = csq_i + csq_j - 2 c_i.c_j. ``Alo``,
    ``Blo`` (m, k+2) float32 rows ``[p, |p|^2, 1]`` and ``[-2p, 1, |p|^2]`` of the projections
    ``p`` on the k leading principal directions: one small GEMM gives |p_i - p_j|^2, a lower
    bound of |c_i - c_j|^2. ``band``/``band_lo`` (m,) float64: half-widths of each row's
    rigorous error bounds on the two values (``band`` includes scikit-learn's own rounding,
    ``sk_err``, which stays in input order for :func:`_refine`).

    Every per-row array except ``sk_err`` is stored in *leaf order*: row ``q`` here is input row
    ``order[q]``, and leaf ``l`` is the contiguous range ``bounds[l]:bounds[l + 1]`` (<=
    LEAF_SCALE * LEAF rows, in-process and in :mod:`dedup_batch.cluster_dask`'s blocks), so tile
    tasks slice instead of gathering. ``lo``/``hi`` (n_leaves, k) are the leaves' boxes in the
    projected space; ``leaf_band``/``leaf_band_lo`` (n_leaves,) each leaf's largest
    ``band``/``band_lo``.

    Rows read in place: when ``C`` is None (the working rows would exceed ``ROW_BYTES``) the
    tiles build them per leaf from ``R`` (the caller's rows, never copied: leaf-order row ``q``
    is ``R[src[q]]``), centred on ``mean`` (euclidean) or divided by the square root of ``sq``
    (cosine: raw squared norms, leaf order) exactly as :func:`_prepare` would have built ``C``
    (:func:`_centre`), so the values and the error bands are the same bits. ``cache`` keeps
    at most ``ROW_BYTES / 2`` of built leaves (see :func:`_rows`).
    """

    C: np.ndarray | None
    csq: np.ndarray
    Alo: np.ndarray
    Blo: np.ndarray
    band: np.ndarray
    band_lo: np.ndarray
    sk_err: np.ndarray
    threshold: float  # |c_i - c_j|^2 <= threshold  <=>  neighbour (before rounding)
    order: np.ndarray
    bounds: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    leaf_band: np.ndarray
    leaf_band_lo: np.ndarray
    slack: float  # absolute slack on the projection bounds
    #: whether tiles run the low-rank screen first (None: not measured yet, see
    #: :func:`_screen_pays`)
    screen: bool | None = None
    R: np.ndarray | None = None
    src: np.ndarray | None = None
    mean: np.ndarray | None = None
    sq: np.ndarray | None = None
    cache: _RowCache | None = None
    #: ``C`` (and the leaves built in place) hold d + 2 columns ``[c, 1, fl32(csq)]``: one
    #: product with a leaf's ``[-2c, fl32(csq), 1]`` is the squared distance (see
    #: :func:`_a_form`). False where a caller builds ``C`` as the plain (m, d) rows.
    aug: bool = False

    @property
    def n_leaves(self) -> int:
        return len(self.bounds) - 1


def _centre(rows: np.ndarray, mean: np.ndarray | None, sq: np.ndarray | None) -> np.ndarray:
    """The working rows in float64: ``rows`` minus ``mean`` (euclidean), or divided by the
    square roots of their squared norms ``sq`` (cosine, ``mean`` None). One owner: the
    float32 cast of this result is the tiles' ``C`` however it is built (whole in
    :func:`_prepare`, or per leaf in :func:`_rows`), bit for bit. Memory: (len(rows), d)
    float64."""
    r64 = rows.astype(np.float64)
    if mean is None:
        r64 /= np.sqrt(sq)[:, None]
    else:
        r64 -= mean
    return r64


class _RowCache:
    """Float32 working rows of leaves built from the input (:func:`_leaf_rows`), at most
    ``limit`` bytes of them kept.

    Tiles run in increasing order of their row leaf ``a`` and reach only leaves ``b >= a``,
    each scanning its partners in increasing order: a leaf below the calling tile's is not
    needed again in this pass (dropped first), and among the rest the highest is needed last
    (Belady's choice: evicted, or not kept when it is itself the highest). Shared by the
    tile threads under a lock; a leaf built by two threads at once is harmless (same bits).
    Pickled empty (each Dask worker builds its own)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.blocks: dict[int, np.ndarray] = {}
        self.nbytes = 0
        self.lock = threading.Lock()
        self.built = self.reused = 0  # leaves built / found (debug log; races lose counts)

    def __getstate__(self) -> dict[str, Any]:
        return {"limit": self.limit}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["limit"])

    def get(self, leaf: int) -> np.ndarray | None:
        return self.blocks.get(leaf)

    def put(self, leaf: int, block: np.ndarray, caller: int) -> None:
        with self.lock:
            if leaf in self.blocks:
                return
            if self.nbytes + block.nbytes > self.limit:
                for b in [b for b in self.blocks if b < caller]:
                    self.nbytes -= self.blocks.pop(b).nbytes
            while self.nbytes + block.nbytes > self.limit and self.blocks:
                top = max(self.blocks)
                if top < leaf:
                    return
                self.nbytes -= self.blocks.pop(top).nbytes
            if self.nbytes + block.nbytes <= self.limit:
                self.blocks[leaf] = block
                self.nbytes += block.nbytes


def _leaf_rows(prep: _Prepared, leaf: int, caller: int) -> np.ndarray:
    """The float32 working rows of one leaf (its rows of ``C``), from the cache or built from
    the input in place. Memory: (leaf rows, d + 2) float32 (d float64 while built)."""
    block = prep.cache.get(leaf)
    if block is not None:
        prep.cache.reused += 1
    else:
        prep.cache.built += 1
        s0, s1 = int(prep.bounds[leaf]), int(prep.bounds[leaf + 1])
        sq = None if prep.sq is None else prep.sq[s0:s1]
        c64 = _centre(prep.R[prep.src[s0:s1]], prep.mean, sq)
        block = np.empty((s1 - s0, c64.shape[1] + 2), np.float32)
        _fill_aug(block, c64, prep.csq[s0:s1])
        prep.cache.put(leaf, block, caller)
    return block


def _fill_aug(out: np.ndarray, c64: np.ndarray, csq: np.ndarray) -> None:
    """``out`` (rows, d + 2) float32 := ``[c, 1, csq]`` rounded to float32 (the augmented
    working rows, see :func:`_a_form`)."""
    d = c64.shape[1]
    out[:, :d] = c64
    out[:, d] = 1.0
    out[:, d + 1] = csq


def _a_form(rows: np.ndarray) -> np.ndarray:
    """The row side of the augmented product: ``[-2c, fl32(csq), 1]`` from augmented rows
    ``[c, 1, fl32(csq)]`` (n, d + 2) float32, so that ``_a_form(x) @ y.T`` is, for each pair,
    ``fl32(csq_i) + fl32(csq_j) - 2 c_i.c_j``: the squared distance in one float32 product,
    with no pass over the block to add the norms.

    Why the error bands still hold: scaling by -2 is exact, so the product is a float32 dot
    product of d + 2 terms, whose error in any summation order (BLAS blocking, FMA) is at
    most gamma_(d+2) times the sum of the terms' magnitudes, 2|c_i||c_j| + csq_i + csq_j <=
    2 (csq_i + csq_j) (each csq rounded to float32 by <= u32 csq). That is <= (2 (d + 2) + 1)
    u32 (csq_i + csq_j) in all, while each pair's band (``_float32_band`` with d + 2 terms,
    for row i plus row j) allows 4 (d + 8) u32 (csq_i + csq_j) for it, besides the float32
    rounding of the vectors themselves (the same term as before). Memory: (n, d + 2)."""
    d = rows.shape[1] - 2
    out = np.empty_like(rows)
    np.multiply(rows[:, :d], np.float32(-2.0), out=out[:, :d])
    out[:, d] = rows[:, d + 1]
    out[:, d + 1] = 1.0
    return out


def _some_rows(
    prep: _Prepared, runs: list[list[int]] | None, idx: np.ndarray, pos: np.ndarray, caller: int
) -> np.ndarray:
    """``_rows(prep, runs, idx, caller)[pos]`` without building (nor caching) the leaves of
    ``idx`` when the positions ``pos`` need at most half of its rows: those rows alone are
    built, row by row the same bits (:func:`_centre` and :func:`_fill_aug` work per row).
    Measured on 60,000 rows of copies200k with nothing cached: whole leaves per block cost
    2.2x the fit's CPU time, most blocks' screen passing a few pairs. With the whole copy
    ``C``: its rows, gathered."""
    if prep.C is not None:
        return prep.C[idx[pos]]
    u, inv = np.unique(pos, return_inverse=True)
    if 2 * len(u) > len(idx):
        return _rows(prep, runs, idx, caller)[pos]
    rows = idx[u]
    src = prep.src[rows]
    c64 = _centre(prep.R[src], prep.mean, None if prep.sq is None else prep.sq[rows])
    out = np.empty((len(rows), c64.shape[1] + 2), np.float32)
    _fill_aug(out, c64, prep.csq[rows])
    return out[inv]


def _rows(
    prep: _Prepared, runs: list[list[int]] | None, idx: np.ndarray, caller: int
) -> np.ndarray:
    """Rows ``idx`` (leaf order) of the float32 working rows ``C``: (len(idx), d + 2) float32
    (augmented, see :func:`_a_form`; d without ``prep.aug``), a slice of ``prep.C`` where it
    can be (see :func:`_take`), else assembled from the leaves that hold them (``runs``:
    ``idx`` is exactly these runs of rows). ``caller``: the tile's row leaf (for
    :class:`_RowCache`'s eviction)."""
    if prep.C is not None:
        return _take(prep.C, runs, idx)
    bnd = prep.bounds
    if runs is not None:
        leaves = []
        for x, y in runs:
            lx, ly = np.searchsorted(bnd, [x, y], side="right") - 1
            leaves.extend(range(int(lx), int(ly)))
        parts = [_leaf_rows(prep, lf, caller) for lf in leaves]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
    leaf_of = np.searchsorted(bnd, idx, side="right") - 1
    leaves_u = np.unique(leaf_of)
    parts = [_leaf_rows(prep, int(lf), caller) for lf in leaves_u]
    block = parts[0] if len(parts) == 1 else np.concatenate(parts)
    offset = np.zeros(len(bnd), np.int64)
    offset[leaves_u] = np.cumsum([0] + [len(p) for p in parts[:-1]])
    return block[offset[leaf_of] + idx - bnd[leaf_of]]


def _float32_band(sq: np.ndarray, n_terms: int, threshold: float) -> np.ndarray:
    """Bound on |float32 value - exact value| of |x_i - x_j|^2 near ``threshold``, per row.

    Rounding a vector to float32 moves it by <= u32 |x| (term in |x|); a dot product of n terms
    in float32 errs by <= gamma_n sum|terms| <= gamma_n (|x_i|^2 + |x_j|^2)/... (term in sq),
    whatever the summation order (BLAS kernels, einsum). Doubled for margin.
    """
    return (
        2.0
        * (
            (n_terms + 6) * _U32 * 2.0 * sq
            + 2.0 * _U32 * np.sqrt(sq) * (2.0 * math.sqrt(threshold) + 1e-30)
            + 4.0 * _U32 * _U32 * sq
        )
        + 1e-30
    )


def _chunk_rows(d: int) -> int:
    """Rows per float64 working chunk of ``_prepare``: ~8 MiB whatever d."""
    return max(256, (8 << 20) // (8 * max(1, d)))


def _n_threads(n_jobs: int | None) -> int:
    """Threads for this process's work: every core for None (as scikit-learn's OpenMP brute
    force), else joblib's reading of ``n_jobs``."""
    from joblib import effective_n_jobs

    return (os.cpu_count() or 1) if n_jobs is None else max(1, effective_n_jobs(n_jobs))


def _each_chunk(fn: Any, m: int, step: int, n_threads: int) -> list[Any]:
    """``[fn(s) for s in range(0, m, step)]`` on ``n_threads`` threads, one BLAS thread each,
    results in chunk order (so sums over them do not depend on the scheduling).

    The chunks' GEMMs are skinny (~2048 x d x 32) and LAPACK's on a d x d matrix small:
    OpenBLAS's own threads on them measured 2-3x slower than one thread per chunk on the
    loaded 2-core machine (``_prepare`` of 200k x 512: 12.6-16.4 s vs 4.7-6.2 s).
    """
    from threadpoolctl import threadpool_limits

    starts = range(0, m, step)
    with threadpool_limits(limits=1, user_api="blas"):
        if n_threads <= 1 or len(starts) <= 1:
            return [fn(s) for s in starts]
        with ThreadPoolExecutor(n_threads) as pool:
            return list(pool.map(fn, starts))


def _prepare(
    R: np.ndarray,
    eps: float,
    mode: _Mode,
    sk_dtype: np.dtype,
    n_threads: int | None = None,
    subset: np.ndarray | None = None,
) -> _Prepared:
    """Centre/normalise the representatives, build the float32 factors, the error bands and
    the projection tree.

    ``subset`` (ascending row numbers of ``R``): prepare those rows only, read in place
    (row ``q`` of the prepared input is ``R[subset[q]]``): the distinct rows of an input
    with exact copies, less any cosine zero vectors, without a copy of them.

    Memory: one float32 copy of R (``C``, in leaf order), (m, k) float64 projections (k = 32;
    freed once the leaves are built) and two (m, k+2) float32 factors. Every float64 working
    array is one chunk of ~8 MiB (``_chunk_rows``), the principal directions come from the
    covariance of a 20,000-row sample accumulated chunk by chunk (d x d float64), and the
    passes over R are fused: one for norms and mean, one for projections, one (in leaf order)
    for ``C``, its norms and the factors. Time: O(m d k) for the projections, O(m log m) for
    the tree. The chunked passes run on ``n_threads`` threads (default: every core), one
    BLAS thread each (see :func:`_each_chunk`).
    """
    from threadpoolctl import threadpool_limits

    m, d = R.shape if subset is None else (len(subset), R.shape[1])

    def rows_of(idx: Any) -> np.ndarray:  # prepared rows idx (a slice or positions)
        return R[idx] if subset is None else R[subset[idx]]

    step = _chunk_rows(d)
    k = min(N_BOUND_DIMS, d)
    cosine = mode.kind == "cosine"
    n_threads = _n_threads(None) if n_threads is None else n_threads
    sq_orig = np.empty(m)

    def norms(s: int) -> np.ndarray:
        r64 = rows_of(slice(s, s + step)).astype(np.float64)
        sq_orig[s : s + step] = np.einsum("ij,ij->i", r64, r64)
        return r64.sum(axis=0)

    total = np.zeros(d)
    for part in _each_chunk(norms, m, step, n_threads):
        total += part
    mean = np.zeros(d) if cosine else total / max(m, 1)

    def centred(rows: np.ndarray, sq: np.ndarray) -> np.ndarray:
        return _centre(rows, None if cosine else mean, sq)

    if cosine:
        threshold = 2.0 * eps  # |x^ - y^|^2 = 2 (1 - cos)
        sk_u = _U32 if sk_dtype == np.float32 else _U64
        # sklearn: normalise, matmul, 1 - S, in the input dtype: error <= ~(d + 8) u on
        # 1 - cos, i.e. 2x that on the squared-distance scale (and doubled for margin).
        sk_err = np.full(m, 2.0 * (d + 8) * sk_u * 2.0)
    else:
        threshold = eps * eps
        # brute: GEMM expansion on the raw vectors in float64 (float32 input is upcast).
        # tree: sequential sum of squared differences plus node-bound rounding (sqrt/pow).
        sk_err = (4.0 * (d + 8) * _U64) * sq_orig + 64 * _U64 * threshold
    # Principal directions of a sample (orthonormal: eigh of the covariance, accumulated by
    # chunks of the sample: no (sample x d) float64 copy).
    if k < d and m >= 2:
        pick = np.sort(np.random.default_rng(0).choice(m, size=min(m, 20000), replace=False))
        smean = np.zeros(d)
        gram = np.zeros((d, d))

        def moments(s: int) -> tuple[np.ndarray, np.ndarray]:
            c64 = centred(rows_of(pick[s : s + step]), sq_orig[pick[s : s + step]])
            return c64.sum(axis=0), c64.T @ c64

        for part_sum, part_gram in _each_chunk(moments, len(pick), step, n_threads):
            smean += part_sum
            gram += part_gram
        smean /= len(pick)
        cov = (gram - len(pick) * np.outer(smean, smean)) / (len(pick) - 1)
        # One BLAS thread: LAPACK's threaded tridiagonalisation of a 256-512 square matrix
        # measured 5-7x slower than one thread on a loaded 2-core machine (0.36 vs 0.07 s at
        # d = 256, 1.45 vs 0.21 s at 512): too small a matrix for threads to share.
        with threadpool_limits(limits=1, user_api="blas"):
            _, vecs = np.linalg.eigh(cov)
        V = np.ascontiguousarray(vecs[:, ::-1][:, :k])
        del gram, cov, vecs
    else:  # any orthonormal basis gives an exact bound; one row has no covariance
        V = np.eye(d)[:, : min(k, d)]
    P = np.empty((m, k))

    def project(s: int) -> None:
        c64 = centred(rows_of(slice(s, s + step)), sq_orig[s : s + step])
        P[s : s + step] = c64 if k == d else c64 @ V

    _each_chunk(project, m, step, n_threads)
    # Projection tree: recursive median splits along the widest of the n_split leading
    # projected directions (see SPLIT_CELLS).
    leaf = LEAF_SCALE * LEAF
    n_leaves = max(1, m // leaf)
    n_split = max(1, min(k, int(math.log(n_leaves) / math.log(SPLIT_CELLS) + 1e-9)))
    leaves = []
    stack = [np.arange(m)]
    # the splitting columns contiguous: a node's widths are reductions along rows (along
    # the columns of an (n, 2) gather they took ~40% of the tree's time)
    PT = np.ascontiguousarray(P[:, :n_split].T)
    while stack:
        idx = stack.pop()
        if len(idx) <= leaf:
            leaves.append(np.sort(idx))
            continue
        sub = PT[:, idx]
        axis = int(np.argmax(sub.max(axis=1) - sub.min(axis=1)))
        order = np.argsort(sub[axis], kind="stable")
        half = len(idx) // 2
        stack.append(idx[order[half:]])
        stack.append(idx[order[:half]])
        del sub
    del PT
    lo = np.array([P[lf].min(axis=0) for lf in leaves])
    hi = np.array([P[lf].max(axis=0) for lf in leaves])
    bounds = np.zeros(len(leaves) + 1, np.int64)
    bounds[1:] = np.cumsum([len(lf) for lf in leaves])
    order = np.concatenate(leaves)
    del leaves
    P = None  # (m, k) float64: freed before C is built (a closure holds the name)
    # Leaf order: each leaf's rows contiguous (slices, not gathers, in the tile tasks). The
    # projections are computed again per chunk here rather than permuted (no second copy).
    # Above ROW_BYTES the tiles build their rows from R in place instead (no (m, d) copy).
    C = np.empty((m, d + 2), np.float32) if m * (d + 2) * 4 <= ROW_BYTES else None
    csq = np.empty(m)
    psq = np.empty(m)
    Alo = np.empty((m, k + 2), np.float32)
    Blo = np.empty((m, k + 2), np.float32)

    def factors(s: int) -> None:
        rows = order[s : s + step]
        c64 = centred(rows_of(rows), sq_orig[rows])
        csq[s : s + step] = np.einsum("ij,ij->i", c64, c64)
        if C is not None:
            _fill_aug(C[s : s + step], c64, csq[s : s + step])
        p = c64 if k == d else c64 @ V
        pq = np.einsum("ij,ij->i", p, p)
        psq[s : s + step] = pq
        Alo[s : s + step, :k] = p
        Alo[s : s + step, k] = pq
        Alo[s : s + step, k + 1] = 1.0
        p *= -2.0
        Blo[s : s + step, :k] = p
        Blo[s : s + step, k] = 1.0
        Blo[s : s + step, k + 1] = pq

    _each_chunk(factors, m, step, n_threads)
    band = _float32_band(csq, d + 2, threshold) + sk_err[order]
    band_lo = _float32_band(psq, k + 2, threshold) + 1e-12 * (1.0 + psq)
    psq = None
    leaf_band = np.maximum.reduceat(band, bounds[:-1])
    leaf_band_lo = np.maximum.reduceat(band_lo, bounds[:-1])
    # Projection errors (float64, V orthonormal to ~1e-15) are ~1e-15 |c|: a generous absolute
    # slack keeps the bounds true lower bounds.
    slack = 1e-9 * (1.0 + float(np.sqrt(csq.max(initial=0.0))))
    in_place: dict[str, Any] = {}
    if C is None:
        in_place = {
            "R": R,
            "src": order if subset is None else subset[order],
            "mean": None if cosine else mean,
            "sq": sq_orig[order] if cosine else None,
            # half: 600k x 512 peaked at 2.42-2.53 GiB with a 512 MiB cache (2.5 GiB target)
            "cache": _RowCache(ROW_BYTES // 2),
        }
    return _Prepared(
        C,
        csq,
        Alo,
        Blo,
        band,
        band_lo,
        sk_err,
        threshold,
        order,
        bounds,
        lo,
        hi,
        leaf_band,
        leaf_band_lo,
        slack,
        aug=True,
        **in_place,
    )


def _leaf_pairs(prep: _Prepared) -> list[tuple[int, list[int]]]:
    """For each leaf a, the leaves b >= a whose boxes may hold a pair within eps (exact lower
    bound: the box gap in an orthonormal subspace never exceeds the full distance)."""
    lo, hi = prep.lo, prep.hi
    r = math.sqrt(prep.threshold + float(prep.band.max(initial=0.0)) * 2) + prep.slack
    out = []
    for a in range(prep.n_leaves):
        gap = np.maximum(0.0, np.maximum(lo[a:] - hi[a], lo[a] - hi[a:]))
        lb = np.sqrt(np.einsum("ij,ij->i", gap, gap))
        out.append((a, [a + int(b) for b in np.nonzero(lb <= r)[0]]))
    return out


class _LiveRoots:
    """Component roots of leaf-order rows read from the union-find while the main thread
    merges into it (thread pool). Read-only: every parent points to a smaller node of the same
    set, so a stale read gives a valid, possibly older, root; rows reported in one component
    always are (a stale read can only miss a merge, i.e. compute a tile for nothing)."""

    def __init__(self, parent: np.ndarray) -> None:
        self.parent = parent

    def __call__(self, a: int, rows: np.ndarray) -> np.ndarray:
        p = self.parent
        r = p[rows]
        while True:
            rr = p[r]
            if np.array_equal(rr, r):
                return r
            r = rr


class _LeafRoots:
    """Component roots from a snapshot per leaf (Dask tasks: a few KB shipped per task): the
    root of a leaf whose rows were all in one component when the task was submitted, else a
    distinct negative number per row (never equal to another row's)."""

    def __init__(self, leaf_root: np.ndarray, bounds: np.ndarray) -> None:
        self.leaf_root = leaf_root
        self.bounds = bounds

    def __call__(self, a: int, rows: np.ndarray) -> np.ndarray:
        leaf = np.searchsorted(self.bounds, rows, side="right") - 1
        r = self.leaf_root[leaf]
        return np.where(r >= 0, r, -1 - rows)


def _forest(
    i: np.ndarray, j: np.ndarray, nodes: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A spanning forest of the graph with edges ``(i, j)``: every node joined to its
    component's smallest node (at most one edge per distinct node). ``nodes``: a sorted array
    holding every endpoint, when known (saves sorting the edges)."""
    if len(i) <= 64:
        return i, j
    if nodes is None:
        nodes, inv = np.unique(np.concatenate([i, j]), return_inverse=True)
        li, lj = inv[: len(i)], inv[len(i) :]
    else:
        k = len(nodes)
        if len(i) < k // 2:
            return i, j
        lo, span = int(nodes[0]), int(nodes[-1] - nodes[0]) + 1
        if span <= max(64 * k, 1 << 20):
            # a position table over the nodes' range (<= 8 MiB, or 512 bytes a node):
            # searchsorted of ~6,400 unsorted edges in 4,600 nodes took 0.9 ms of the 1.5 ms
            # forest of a copies200k block, the table 0.03 ms
            pos = np.empty(span, np.int64)
            pos[nodes - lo] = np.arange(k)
            li, lj = pos[i - lo], pos[j - lo]
            del pos
        else:
            li, lj = np.searchsorted(nodes, i), np.searchsorted(nodes, j)
    k = len(nodes)
    if len(i) < k // 2:
        return i, j
    root = _lowest_in_component(li, lj, k)
    sel = root != np.arange(k)  # a node without edges is its own root
    return nodes[sel], nodes[root[sel]]


def _lowest_in_component(li: np.ndarray, lj: np.ndarray, k: int, rounds: int = 12) -> np.ndarray:
    """For each node ``0..k-1`` of the graph with edges ``(li, lj)``, the smallest node of its
    component. Memory and time O(k + edges) per round.

    Minimum-label propagation with pointer jumping: each round every node takes the smallest
    label among its own and its neighbours', then labels follow labels until they stop
    changing. A label is always a node of the same component no larger than the node, so the
    component's smallest node keeps its own, and once every edge has equal labels at both ends
    that is everyone's. A tile block's graph (a dense group's edges, or a few copies') settles
    in 2-6 rounds: 25 vs 47 ms on 512 x 2048 all-edges, 0.6 vs 0.9 ms on 6,400 random edges
    over 4,600 nodes, against SciPy's ``connected_components`` with its CSR build. A graph
    still unsettled after ``rounds`` (long chains) is finished by SciPy on the labels so far.
    """
    lab = np.arange(k)
    for _ in range(rounds):
        np.minimum.at(lab, li, lab[lj])
        np.minimum.at(lab, lj, lab[li])
        while True:
            jumped = lab[lab]
            if np.array_equal(jumped, lab):
                break
            lab = jumped
        if np.array_equal(lab[li], lab[lj]):
            return lab
    g = sparse.csr_matrix((np.ones(len(li), np.int8), (lab[li], lab[lj])), shape=(k, k))
    _, comp = connected_components(g, directed=False)
    # a node's component is its label's (each label is a node of the same component)
    comp = comp[lab]
    low = np.full(comp.max() + 1, k)
    np.minimum.at(low, comp, np.arange(k))
    return low[comp]


def _take(arr: np.ndarray, runs: list[list[int]] | None, idx: np.ndarray) -> np.ndarray:
    """Rows of ``arr``: the runs of contiguous rows (a slice, or a concatenation of slices)
    when given, else a gather of ``idx``."""
    if runs is None:
        return arr[idx]
    if len(runs) == 1:
        return arr[runs[0][0] : runs[0][1]]
    return np.concatenate([arr[x:y] for x, y in runs])


@dataclass
class _PassCtx:
    """What a tile computes in one pass of the ``min_samples > 1`` engine (leaf-order arrays).

    ``kind`` is ``"count"`` (neighbourhood sizes: each row's sure neighbours weighted by their
    copies, ``weight``; rows whose ``deg`` already reaches ``need`` are saturated, and a pair
    of saturated rows is not computed), ``"core"`` (components among ``core`` rows, as with
    ``min_samples=1``) or ``"border"`` (for each ``rows`` row, the smallest ``label`` among its
    core neighbours). Passes return per-row results or a spanning forest, never pairs.
    """

    kind: str
    weight: np.ndarray | None = None
    deg: np.ndarray | None = None
    need: int = 0
    core: np.ndarray | None = None
    rows: np.ndarray | None = None
    label: np.ndarray | None = None


def _restrict(
    ctx: _PassCtx | None, roots: Any, a: int, ia: np.ndarray, ib: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The blocks (rows of leaf ``a``, columns of a group) that this pass needs; together they
    hold each needed pair once."""
    if ctx is not None:
        if ctx.kind == "count":
            sat_a, sat_b = ctx.deg[ia] >= ctx.need, ctx.deg[ib] >= ctx.need
            if sat_a.all():
                ib = ib[~sat_b]
            elif sat_b.all():
                ia = ia[~sat_a]
        elif ctx.kind == "core":
            ia, ib = ia[ctx.core[ia]], ib[ctx.core[ib]]
        else:  # border: candidate rows against core rows, either side of the tile
            ca, cb = ctx.rows[ia], ctx.rows[ib]
            if not ca.any():
                ia, ib = ia[ctx.core[ia]], ib[cb]
            elif not cb.any():
                ia, ib = ia[ca], ib[ctx.core[ib]]
            else:
                ia, ib = ia[ca | ctx.core[ia]], ib[cb | ctx.core[ib]]
    if roots is None or len(ia) == 0 or len(ib) == 0:
        return [(ia, ib)]
    # Pairs inside one component add nothing: with the largest component here, r, compute the
    # rows outside r against every column, and the rows in r against the columns outside r.
    ra, rb = roots(a, ia), roots(a, ib)
    both = np.concatenate([ra, rb])
    if (both == both[0]).all():
        return []
    # Any component r gives exactly the pairs needed; the largest saves the most, found in a
    # sample of the rows (see ROOT_SAMPLE).
    vals, cnt = np.unique(both[:: max(1, len(both) // ROOT_SAMPLE)], return_counts=True)
    r = vals[np.argmax(cnt)]
    in_a, in_b = ra == r, rb == r
    if _SPLIT_GAIN * np.count_nonzero(in_a) * np.count_nonzero(in_b) < len(ia) * len(ib):
        # r is a small component (a few copies among rows that are otherwise apart): the
        # pairs inside it are not worth a second block (its own products, and gathered rows
        # where the whole block is slices); computing them is harmless (edges inside one
        # component). On copies200k most groups were split this way for nothing.
        return [(ia, ib)]
    return [(ia[~in_a], ib), (ia[in_a], ib[~in_b])]


def _border_min(ctx: _PassCtx, i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, smallest label)``: for each candidate row among the edges ``(i, j)``, the
    smallest label of its core neighbours (edges in either orientation)."""
    m1 = ctx.rows[i] & ctx.core[j]
    m2 = ctx.rows[j] & ctx.core[i]
    rows = np.concatenate([i[m1], j[m2]])
    return _per_row(rows, np.concatenate([ctx.label[j[m1]], ctx.label[i[m2]]]), "min")


def _per_row(idx: np.ndarray, val: np.ndarray, how: str) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, value)``: ``val`` summed (``how="sum"``) or minimised per distinct ``idx``."""
    rows, inv = np.unique(idx, return_inverse=True)
    if how == "sum":
        return rows, np.bincount(inv, weights=val, minlength=len(rows))
    out = np.full(len(rows), np.iinfo(np.int64).max)
    np.minimum.at(out, inv, val)
    return rows, out


def _tile_task(
    prep: _Prepared, a: int, bs: list[int], roots: Any = None, ctx: _PassCtx | None = None
) -> tuple[np.ndarray, ...]:
    """Edges from leaf ``a`` to leaves ``bs``: ``(sure_i, sure_j, band_i, band_j)``, in leaf
    order (row ``q`` is input row ``prep.order[q]``).

    The leaves ``bs`` are multiplied in groups of about TILE columns, so one task holds one
    (leaf x TILE) float32 block at a time. Leaves are contiguous, so a group's factors are a
    slice (consecutive leaves) or a concatenation of slices, never a row gather.

    ``roots`` (``min_samples=1``: only components matter): a callable giving the component
    root of leaf-order rows (:class:`_LiveRoots` or :class:`_LeafRoots`). A group whose rows
    and leaf ``a``'s are all in one component is skipped; when leaf ``a`` (or the group) is in
    one component, only the columns (rows) outside it are computed; and the sure edges come
    back as a spanning forest, at most one edge per row touched. Memory is then a few
    (leaf x TILE) blocks per task whatever the number of pairs within eps (a group of copies).

    ``ctx`` (``min_samples > 1``, see :class:`_PassCtx`): ``"count"`` returns ``(rows,
    neighbour weight, band_i, band_j)``; ``"core"`` a spanning forest among core rows and
    their band pairs; ``"border"`` ``(rows, smallest core label, band_i, band_j)``.
    """
    bnd = prep.bounds
    a0, a1 = int(bnd[a]), int(bnd[a + 1])
    rows_a = np.arange(a0, a1)
    out: tuple[list, list, list, list] = ([], [], [], [])
    # groups of ~TILE columns: (runs of contiguous rows, largest band, largest band_lo)
    groups: list[tuple[list[list[int]], float, float]] = []
    runs: list[list[int]] = []
    size, bmax, blomax = 0, 0.0, 0.0
    for b in bs:
        s0, s1 = int(bnd[b]), int(bnd[b + 1])
        if runs and runs[-1][1] == s0:
            runs[-1][1] = s1
        else:
            runs.append([s0, s1])
        size += s1 - s0
        bmax = max(bmax, float(prep.leaf_band[b]))
        blomax = max(blomax, float(prep.leaf_band_lo[b]))
        if size >= TILE:
            groups.append((runs, bmax, blomax))
            runs, size, bmax, blomax = [], 0, 0.0, 0.0
    if runs:
        groups.append((runs, bmax, blomax))
    task: dict[str, np.ndarray] = {}  # leaf a's row side of the products, once per task
    for runs, bmax_b, blo_b in groups:
        ib_all = np.concatenate([np.arange(x, y) for x, y in runs])
        for ia, ib in _restrict(ctx, roots, a, rows_a, ib_all):
            if len(ib) and len(ia):
                _pairs_block(prep, a, ia, ib, runs, bmax_b, blo_b, ctx, roots, out, task)
    return _task_result(ctx, roots, out)


def _pairs_block(
    prep: _Prepared,
    a: int,
    ia: np.ndarray,
    ib: np.ndarray,
    runs: list[list[int]],
    bmax_b: float,
    blo_b: float,
    ctx: _PassCtx | None,
    roots: Any,
    out: tuple[list, list, list, list],
    task: dict[str, np.ndarray],
) -> None:
    """One block of a tile (rows ``ia`` of leaf ``a`` x columns ``ib`` of a group made of
    ``runs``): its pairs within eps, reduced as the pass needs, appended to ``out``.
    ``task``: what the tile's blocks share (leaf a's :func:`_a_form`, built once)."""
    sure_i, sure_j, band_i, band_j = out
    bnd = prep.bounds
    a0, a1 = int(bnd[a]), int(bnd[a + 1])
    t = prep.threshold
    bmax_a = float(prep.leaf_band[a])
    blo_a = float(prep.leaf_band_lo[a])
    whole_a, whole_b = len(ia) == a1 - a0, len(ib) == sum(y - x for x, y in runs)

    runs_a = [[a0, a1]] if whole_a else None
    runs_b = runs if whole_b else None

    hi = t + bmax_a + bmax_b
    hi_lo = hi + blo_a + blo_b + prep.slack
    nr, nb = len(ia), len(ib)
    if prep.screen is False:  # measured not to pay on this data (flat spectrum)
        passed = None
    else:
        # Low-rank lower bound first: |P(c_i - c_j)|^2 <= |c_i - c_j|^2. Columns x rows
        # (the block transposed): OpenBLAS's SGEMM measured 15% faster so at K = 34 (0.375
        # vs 0.441 ms for 2048 x 195), and the output is the same bound (a dot product in any
        # order, inside band_lo). Most screened blocks pass nothing (copies200k: 27k of 45k
        # blocks, 5.2G of 9.8G pairs): a min pass settles them, on chunks of SCREEN_CHUNK
        # columns while each is in cache.
        # A chunk that passes something gives its survivors' positions at once (one compare
        # and one nonzero pass while it is in cache, no block-sized mask to count and scan
        # again), and once more than 1/FUSED_SHARE of the block has passed the full product
        # is decided: the rest of the screen would be spent for nothing.
        bl, al = _take(prep.Blo, runs_b, ib), _take(prep.Alo, runs_a, ia).T
        passed, n_pass = [], 0
        for k0 in range(0, nb, SCREEN_CHUNK):
            L = bl[k0 : k0 + SCREEN_CHUNK] @ al
            if L.min() <= hi_lo:
                f = np.flatnonzero(np.less_equal(L, hi_lo))
                f += k0 * nr
                passed.append(f)
                n_pass += len(f)
                if n_pass > nr * nb // FUSED_SHARE:
                    passed = None
                    break
        del L, bl, al
        if passed is not None and n_pass == 0:
            return
    arows = None
    if prep.aug:
        if "a" not in task:
            task["a"] = _a_form(_rows(prep, [[a0, a1]], np.arange(a0, a1), a))
        arows = task["a"] if whole_a else task["a"][ia - a0]
    if passed is None:
        # The screen does not pay here (flat spectra, a group of noisy copies): the full
        # product of the block, thresholded in place, and only the pairs within eps and the
        # bands leave the block (int32 positions). Gathering the screen's survivors and
        # their values cost ~25 ns per pair, as much as the product itself.
        gi, gj, s32 = _fused_block(prep, a, runs_a, runs_b, ia, ib, hi, arows)
    else:
        # Full value for the survivors only (flat positions in the block, columns x rows).
        f = passed[0] if len(passed) == 1 else np.concatenate(passed)
        del passed
        c, r = np.divmod(f, nr)
        del f
        if arows is not None:  # the squared distance in one float32 dot (see _a_form)
            s32 = _survivor_values(prep, runs_b, ib, a, arows, r, c)
        else:
            # the survivors' rows only (built from the input when rows are read in place)
            xb = _some_rows(prep, runs_b, ib, c, a)
            dots = np.einsum("ij,ij->i", prep.C[ia[r]], xb)
            s32 = (prep.csq[ia[r]] + prep.csq[ib[c]]).astype(np.float32) - 2.0 * dots
            del dots, xb
        gi, gj = ia[r], ib[c]
        del r, c
        sel = s32 <= hi
        gi, gj, s32 = gi[sel], gj[sel], s32[sel]
    # pairs inside leaf a (its diagonal block): each unordered pair once
    sel = (gj >= a1) | (gi < gj)
    gi, gj, s32 = gi[sel], gj[sel], s32[sel]
    if len(gi) == 0:
        return
    s = s32.astype(np.float64)
    w = prep.band[gi] + prep.band[gj]
    sure = s < t - w
    unsure = ~sure & (s <= t + w)
    si, sj = gi[sure], gj[sure]
    kind = "edges" if ctx is None else ctx.kind
    if kind == "count":  # both ends gain the other's copies
        si, sj = _per_row(
            np.concatenate([si, sj]),
            np.concatenate([ctx.weight[sj], ctx.weight[si]]),
            "sum",
        )
    elif kind == "border":
        si, sj = _border_min(ctx, si, sj)
    elif roots is not None:
        # ia and ib ascending; they overlap only on the tile's diagonal leaf (union1d's
        # sort measured ~2 ms a block, 5% of a copies200k fit, for a concatenation)
        nodes = np.concatenate([ia, ib]) if ia[-1] < ib[0] else np.union1d(ia, ib)
        si, sj = _forest(si, sj, nodes)
    sure_i.append(si)
    sure_j.append(sj)
    band_i.append(gi[unsure])
    band_j.append(gj[unsure])


def _survivor_values(
    prep: _Prepared,
    runs_b: list[list[int]] | None,
    ib: np.ndarray,
    a: int,
    arows: np.ndarray,
    r: np.ndarray,
    c: np.ndarray,
) -> np.ndarray:
    """The float32 squared distances of the screen's survivors: rows ``r`` of ``arows`` (leaf
    ``a``'s :func:`_a_form`) against columns ``c`` of ``ib``, (len(r),) float32.

    Survivors crowd on a few rows and columns of a block (decay 100k x 256: 4.5M survivors,
    a median 14% of a block's rows and 3% of its columns): then one small product of the
    distinct rows and columns, read at the survivors, gathers each row once instead of twice
    per pair (a gathered pair measured 250-1,200 ns, a product ~4-7 ns per pair at d =
    256-512). Scattered survivors (as many distinct rows and columns as pairs) keep the
    per-pair dot. Either way each value is a float32 dot product of the same d + 2 terms as
    :func:`_fused_block`'s, inside the same error bands."""
    nr, nb = len(arows), len(ib)
    seen_r, seen_c = np.zeros(nr, bool), np.zeros(nb, bool)
    seen_r[r] = True
    seen_c[c] = True
    ur, uc = np.flatnonzero(seen_r), np.flatnonzero(seen_c)
    if len(ur) * len(uc) <= SUB_PRODUCT_SHARE * len(r):
        xb = _some_rows(prep, runs_b, ib, uc, a)
        at_r = np.cumsum(seen_r) - 1  # block row -> its place among the distinct rows
        at_c = np.cumsum(seen_c) - 1
        return (xb @ arows[ur].T)[at_c[c], at_r[r]]
    # the survivors' rows only (built from the input when rows are read in place)
    xb = _some_rows(prep, runs_b, ib, c, a)
    return np.einsum("ij,ij->i", arows[r], xb)


def _fused_block(
    prep: _Prepared,
    a: int,
    runs_a: list[list[int]] | None,
    runs_b: list[list[int]] | None,
    ia: np.ndarray,
    ib: np.ndarray,
    hi: float,
    arows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(gi, gj, s32)``: the pairs of rows ``ia`` x columns ``ib`` whose float32 squared
    distance ``s32`` is at most ``hi``, from one full product of the block.

    ``arows`` (augmented rows, ``prep.aug``): the rows' :func:`_a_form`, whose product with
    the columns' augmented rows is the squared distance itself: one GEMM, then one compare
    pass (the three passes below measured ~1/3 of the product's time).

    ``csq_i + csq_j - 2 c_i.c_j`` is formed in place in the product (float32): a few more
    roundings of the norms than the gathered path's float64 sum, each <= u32 (csq_i + csq_j),
    well inside ``_float32_band``'s (d + 8) terms, so every pair within eps is still either
    sure or in the band and re-decided. Memory: one (len(ib), len(ia)) float32 block (4 MiB
    at 2048 x 512) and the survivors' int32 positions.
    """
    # Columns x rows (the block transposed): the rows are often few (those of leaf a outside
    # a group's component), and OpenBLAS's SGEMM with few rows on the right measured up to
    # 1.9x faster (2048 x 514 x 16: 0.66 vs 1.25 ms; x 64: 1.6 vs 2.2 ms; x 195: 4.5 vs 4.8).
    if arows is not None:
        prod = _rows(prep, runs_b, ib, a) @ arows.T
    else:
        prod = _rows(prep, runs_b, ib, a) @ _rows(prep, runs_a, ia, a).T
        prod *= np.float32(-2.0)
        prod += prep.csq[ib].astype(np.float32)[:, None]
        prod += prep.csq[ia].astype(np.float32)[None, :]
    nr = prod.shape[1]
    prod = prod.ravel()
    f = np.flatnonzero(prod <= hi)
    if len(prod) < 2**31:
        f = f.astype(np.int32)
    s32 = prod[f]
    del prod
    c, r = np.divmod(f, nr)
    return ia[r], ib[c], s32


def _task_result(
    ctx: _PassCtx | None, roots: Any, out: tuple[list, list, list, list]
) -> tuple[np.ndarray, ...]:
    """A task's result from its blocks' parts (see :func:`_tile_task`)."""
    sure_i, sure_j, band_i, band_j = out
    if ctx is not None and ctx.kind in ("count", "border"):
        rows, val = _cat(sure_i), (np.concatenate(sure_j) if sure_j else np.empty(0))
        si, sj = _per_row(rows, val, "sum" if ctx.kind == "count" else "min")
        return si, sj, _cat(band_i), _cat(band_j)
    si, sj = _cat(sure_i), _cat(sure_j)
    if roots is not None:
        si, sj = _forest(si, sj)
    return si, sj, _cat(band_i), _cat(band_j)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)


def _union_then_decide(
    uf: _UnionFind,
    tiles: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    decide: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
) -> None:
    """Merge tiles into ``uf`` as they finish, then the near-eps pairs scikit-learn puts within eps.

    Each tile gives its sure edges ``(fi, fj)`` (unioned at once) and its pairs within
    scikit-learn's rounding of eps ``(ui, uj)``; of those only the pairs still joining two
    components are kept (a pair inside one component cannot change a partition), and once every
    tile is in they are decided together by ``decide`` (scikit-learn's own computation, each of
    its chunks once) and the edges it returns are unioned. Memory: the kept pairs only.
    """
    und_i, und_j = [], []
    for fi, fj, ui, uj in tiles:
        uf.union(fi, fj)
        keep = uf.find(ui) != uf.find(uj)
        und_i.append(ui[keep])
        und_j.append(uj[keep])
    bi, bj = _cat(und_i), _cat(und_j)
    keep = uf.find(bi) != uf.find(bj)
    uf.union(*decide(bi[keep], bj[keep]))


def _run_tiles(
    prep: _Prepared,
    n_jobs: int | None,
    client: Any = None,
    uf: _UnionFind | None = None,
    ctx: _PassCtx | None = None,
    work: list[tuple[int, list[int]]] | None = None,
    passes: int = 1,
) -> Iterator[tuple[np.ndarray, ...]]:
    """Yield each task's edges as it finishes: on ``client``'s workers (the prepared arrays
    scattered once, broadcast) or, without one, on a local pool of ``n_jobs`` threads.

    ``uf`` (``min_samples=1``): the union-find over leaf-order rows that the caller merges
    each yielded result into before asking for the next; tasks read it to skip what is already
    one component (see :func:`_tile_task`). At most a few tasks are in flight (2 per thread
    or worker), so finished results never pile up whatever their size. ``ctx``: the pass of
    the ``min_samples > 1`` engine; ``work``: the leaf pairs (computed once for all passes);
    ``passes``: how many passes the fit makes (progress total)."""
    if work is None:
        work = _work(prep)
    if prep.screen is None:
        prep.screen = _screen_pays(prep, work)
        log.debug("eps-graph: low-rank screen %s", "on" if prep.screen else "off")
    skipped = sum(prep.n_leaves - a for a in range(prep.n_leaves)) - sum(len(bs) for _, bs in work)
    log.debug(
        "eps-graph: %d leaves, %d leaf pairs computed, %d skipped by bounds",
        prep.n_leaves,
        sum(len(bs) for _, bs in work),
        skipped,
    )
    # one unit of the running stage's progress (bar, heartbeat, JSON event) per tile task
    for out in _tile_outputs(prep, work, n_jobs, client, uf, ctx):
        progress.advance(1, total=passes * len(work))
        yield out


def _screen_pays(prep: _Prepared, work: list[tuple[int, list[int]]]) -> bool:
    """Does the low-rank screen prune enough to pay for itself on this data?

    The screen costs ~1.5 ns per pair; where it prunes a block (passes at most
    1/FUSED_SHARE of it) it saves the full product, 10-20 ns per pair at d = 256-512. So it
    pays when it prunes more than ~1/8 of the blocks. Measured on up to 128 leaf pairs of the
    work drawn at random (fixed seed): a leaf of rows against one of its candidate leaves.
    On isotropic 256-d rows no sampled pair is pruned (the projections keep 32/256 of the
    variance); on 200k CLIP-like rows with 60,000 noisy copies ~80% are. Only speed depends
    on the answer: both paths classify every pair the same way.
    """
    from threadpoolctl import threadpool_limits

    # the k-th leaf pair of the work, without listing them (millions at 1M rows)
    ends = np.cumsum([len(bs) for _, bs in work])
    total = int(ends[-1]) if len(ends) else 0
    if total == 0:
        return True
    rng = np.random.default_rng(0)
    pick = rng.choice(total, size=min(total, 128), replace=False)
    bnd = prep.bounds
    pruned = 0
    # one BLAS thread: 128 small products, where OpenBLAS's threads measured 5x slower
    with threadpool_limits(limits=1, user_api="blas"):
        for k in pick.tolist():
            t = int(np.searchsorted(ends, k, side="right"))
            a, bs = work[t]
            b = bs[k - (int(ends[t - 1]) if t else 0)]
            la, lb = prep.Alo[bnd[a] : bnd[a + 1]], prep.Blo[bnd[b] : bnd[b + 1]]
            hi_lo = (
                prep.threshold
                + float(prep.leaf_band[a] + prep.leaf_band[b])
                + float(prep.leaf_band_lo[a] + prep.leaf_band_lo[b])
                + prep.slack
            )
            n_pass = int(np.count_nonzero((la @ lb.T) <= hi_lo))
            pruned += n_pass <= len(la) * len(lb) // FUSED_SHARE
    return pruned * 8 > len(pick)


def _work(prep: _Prepared) -> list[tuple[int, list[int]]]:
    """The tile tasks: each leaf with the leaves its box may reach (see :func:`_leaf_pairs`)."""
    return [(a, bs) for a, bs in _leaf_pairs(prep) if bs]


def _tile_item(
    prep: _Prepared, roots: Any, ctx: _PassCtx | None, item: tuple[int, list[int]]
) -> tuple[np.ndarray, ...]:
    """:func:`_tile_task` for one ``(a, bs)`` of the work, in :func:`executor.run_tasks`'
    argument order (the shared arguments first, the item last)."""
    a, bs = item
    return _tile_task(prep, a, bs, roots, ctx)


def _tile_outputs(
    prep: _Prepared,
    work: list[tuple[int, list[int]]],
    n_jobs: int | None,
    client: Any,
    uf: _UnionFind | None,
    ctx: _PassCtx | None,
) -> Iterator[tuple[np.ndarray, ...]]:
    """The tiles' results as they finish, 2 tasks per thread (local or worker) in flight.

    Scheduled by :func:`executor.run_tasks`, except on Dask workers with ``uf`` (see
    :func:`_dask_outputs`): there each task carries the components as they stand when it is
    submitted, which ``run_tasks`` (items fixed before the first submission) cannot express.
    Threads need no snapshot: they read the live union-find (:class:`_LiveRoots`)."""
    # the tiles advance the caller's stage (passes x tiles); run_tasks counts on a detached one
    counted = progress.Stage("tiles", unit="tiles")
    if client is not None:
        if uf is not None:
            yield from _dask_outputs(client, prep, work, uf, ctx)
            return
        prep_f = executor.scatter(client, prep)
        # the pass's arrays once per pass (their state when scattered: a task sees fewer rows
        # saturated than threads would, never more)
        ctx_f = None if ctx is None else executor.scatter(client, ctx)
        for _, fut in executor.run_tasks(
            _tile_item,
            work,
            prep_f,
            None,
            ctx_f,
            client=client,
            max_in_flight=2 * executor.total_threads(client),
            progress=counted,
            name="tile",
        ):
            yield fut.result()
        return
    from threadpoolctl import threadpool_limits

    roots = None if uf is None else _LiveRoots(uf.parent)
    # None: every core, as scikit-learn's OpenMP brute force does. Each tile runs a
    # single-threaded BLAS: OpenBLAS threads on tile-sized products cost more than they give.
    n_threads = _n_threads(n_jobs)
    with threadpool_limits(limits=1, user_api="blas"):
        if n_threads == 1:
            # in this thread, in order: each tile sees every earlier merge (no pool to run)
            for a, bs in work:
                yield _tile_task(prep, a, bs, roots, ctx)
            return
        for _, fut in executor.run_tasks(
            _tile_item,
            work,
            prep,
            roots,
            ctx,
            threads=n_threads,
            max_in_flight=2 * n_threads,
            progress=counted,
            name="tile",
        ):
            yield fut.result()


def _dask_outputs(
    client: Any,
    prep: _Prepared,
    work: list[tuple[int, list[int]]],
    uf: _UnionFind,
    ctx: _PassCtx | None,
) -> Iterator[tuple[np.ndarray, ...]]:
    """Tiles as tasks on the client's workers, 2 per worker thread in flight, each with a
    per-leaf snapshot of the components (:class:`_LeafRoots`) taken when it is submitted.

    Scheduled here rather than by :func:`executor.run_tasks`: a task's roots depend on the
    results merged before its submission (that is what lets a tile inside one component be
    skipped), while ``run_tasks`` takes its items, arguments included, before the first
    submission."""
    from distributed import as_completed

    # hash=False (executor.scatter): a fresh key per fit, so a previous fit's release cannot
    # race this one
    fut = executor.scatter(client, prep)
    ctx_f = None if ctx is None else executor.scatter(client, ctx)
    n_slots = 2 * executor.total_threads(client)
    snapshot: _LeafRoots | None = None
    merged_at_snapshot = -1
    merged = 0

    def submit(a: int, bs: list[int]) -> Any:
        nonlocal snapshot, merged_at_snapshot
        if merged != merged_at_snapshot:
            r = uf.roots()
            lo = np.minimum.reduceat(r, prep.bounds[:-1])
            hi = np.maximum.reduceat(r, prep.bounds[:-1])
            snapshot = _LeafRoots(np.where(lo == hi, lo, -1), prep.bounds)
            merged_at_snapshot = merged
        return client.submit(_tile_task, fut, a, bs, snapshot, ctx_f, pure=False)

    todo = iter(work)
    running = as_completed([submit(a, bs) for a, bs in itertools.islice(todo, n_slots)])
    for f in running:
        out = f.result()
        f.release()
        yield out  # the caller merges it before the next submission reads the components
        merged += 1
        for a, bs in itertools.islice(todo, 1):
            running.add(submit(a, bs))


# --------------------------------------------------------------------------------------------
# Re-deciding pairs near eps exactly as scikit-learn does
# --------------------------------------------------------------------------------------------


class _Irregular(Exception):
    """scikit-learn decides some re-checked pair asymmetrically or per copy: delegate."""


class _SkDecider:
    """Decides directed pairs ``i -> j`` (original row numbers) exactly as scikit-learn's
    ``radius_neighbors`` would in this fit, by running its own routine on the same chunk."""

    def __init__(
        self, X: np.ndarray, eps: float, mode: _Mode, leaf_size: int, n_jobs: int | None = None
    ) -> None:
        self.X, self.eps, self.mode, self.leaf_size = X, eps, mode, leaf_size
        self.n = X.shape[0]
        self.n_jobs = n_jobs
        self._tree = None
        self._cache: dict = {}
        self._subset_ok: bool | None = None

    def decide(self, qi: np.ndarray, tj: np.ndarray) -> np.ndarray:
        """Boolean array: is ``tj[k]`` in scikit-learn's eps-neighbourhood of ``qi[k]``."""
        out = np.empty(len(qi), bool)
        if self.mode.kind == "brute":
            c = min(self.n, _SK_CHUNK)
            key = (qi // c) * (self.n // c + 2) + tj // c
            for k in np.unique(key):
                sel = np.nonzero(key == k)[0]
                bi, bj = int(qi[sel[0]] // c), int(tj[sel[0]] // c)
                mask = self._brute_block(bi, bj)
                out[sel] = mask[qi[sel] - bi * c, tj[sel] - bj * c]
        elif self.mode.kind == "tree":
            # Copies of the query vector traverse the tree identically: query each distinct
            # query row once (the caller passes representatives' rows as queries).
            for q in np.unique(qi):
                sel = np.nonzero(qi == q)[0]
                out[sel] = np.isin(tj[sel], self._tree_query(int(q)))
        else:
            rows = self._cosine_rows()
            which = np.searchsorted(rows[1:], qi, side="right")
            for c in np.unique(which):
                # every pair queried from one chunk at once: at most one pass over the chunk
                sel = np.nonzero(which == c)[0]
                out[sel] = self._cosine_pairs(int(rows[c]), int(rows[c + 1]), qi[sel], tj[sel])
        return out

    def _brute_block(self, bi: int, bj: int) -> np.ndarray:
        """scikit-learn's neighbour mask for its chunk pair (bi, bj): (<=256, <=256) bool."""
        key = ("b", bi, bj)
        if key not in self._cache:
            if len(self._cache) > 4096:
                self._cache.clear()
            c = min(self.n, _SK_CHUNK)
            Xi = self.X[bi * c : (bi + 1) * c]
            Xj = self.X[bj * c : (bj + 1) * c]
            ind = _skc.RadiusNeighbors.compute(
                Xi, Xj, radius=self.eps, metric="euclidean", return_distance=False
            )
            mask = np.zeros((len(Xi), len(Xj)), bool)
            lens = [len(r) for r in ind]
            if sum(lens):
                mask[np.repeat(np.arange(len(Xi)), lens), np.concatenate(ind)] = True
            self._cache[key] = mask
        return self._cache[key]

    def _tree_query(self, q: int) -> np.ndarray:
        from sklearn.neighbors import NearestNeighbors

        if self._tree is None:
            self._tree = NearestNeighbors(
                radius=self.eps, algorithm=self.mode.tree, leaf_size=self.leaf_size
            ).fit(self.X)
        return self._tree.radius_neighbors(self.X[q : q + 1], return_distance=False)[0]

    def _cosine_rows(self) -> np.ndarray:
        from sklearn.utils import gen_batches

        rows = _skc.get_chunk_n_rows(row_bytes=8 * self.n, max_n_rows=self.n)
        return np.array([s.start for s in gen_batches(self.n, rows)] + [self.n])

    def _cosine_chunk(self, s: int, e: int) -> np.ndarray:
        """scikit-learn's cosine distances for its row chunk ``s:e`` against all rows, by its
        own call (``pairwise_distances`` with this fit's ``n_jobs``): (e - s, n) float64."""
        from sklearn.metrics import pairwise_distances

        Xc = self.X if (s == 0 and e == self.n) else self.X[s:e]
        return pairwise_distances(Xc, self.X, metric="cosine", n_jobs=self.n_jobs)

    def _cosine_pairs(self, s: int, e: int, qi: np.ndarray, tj: np.ndarray) -> np.ndarray:
        """Is ``tj[k]`` within eps of ``qi[k]`` (all ``qi`` in scikit-learn's row chunk
        ``s:e``) in scikit-learn's cosine distances: bool array.

        scikit-learn computes ``clip(1 - normalize(X[s:e]) @ normalize(X).T, 0, 2)`` in the
        input dtype (float64 for non-float32 input). Normalisation is per row; the product is
        a BLAS GEMM whose value for one entry depends on the kernel path it takes (small-matrix
        kernels, single- or multi-threaded K blocking), not on the other rows and columns, as
        long as the path is the same (measured for OpenBLAS's SGEMM; its DGEMM edge kernels
        round differently, so float64 input, whose near-eps pairs are rare exact ties, always
        takes scikit-learn's whole chunk). So only the needed rows and columns are multiplied,
        padded to a product large enough for the same path (``_GEMM_MIN_MNK``), with the
        caller's BLAS threads, as scikit-learn would run. That independence is verified once
        per fit against scikit-learn's own operands (its chunk normalised as it does, against
        all columns); a difference, a small chunk, or ``n_jobs`` splitting the columns over
        threads falls back to scikit-learn's own call on the whole chunk.

        Memory: (<= 2048 rows) x (<= 2048 + padding columns) per block, plus the verification
        (a few rows against all columns). Time: O(pairs d) instead of O((e - s) n d).
        """
        from joblib import effective_n_jobs

        n, d = self.X.shape
        if (
            (e - s) * n * d <= 4 * _GEMM_MIN_MNK
            or self.X.dtype != np.float32
            or effective_n_jobs(self.n_jobs) != 1
            or not self._cosine_subset_ok(s, e, qi, tj)
        ):
            # small chunk (its own kernel path), scikit-learn splitting the columns over
            # threads, or a BLAS whose rounding depends on the shape: its own whole chunk
            key = ("c", s)
            if key not in self._cache:
                self._cache.clear()  # one row chunk (<= working_memory) held at a time
                self._cache[key] = self._cosine_chunk(s, e)
            return self._cache[key][qi - s, tj] <= self.eps
        out = np.empty(len(qi), bool)
        order = np.argsort(qi, kind="stable")
        for b in range(0, len(qi), 2048):
            sel = order[b : b + 2048]
            D, pos_q, pos_t = self._cosine_sub(s, e, qi[sel], tj[sel])
            out[sel] = D[pos_q, pos_t] <= self.eps
        return out

    def _cosine_sub(
        self, s: int, e: int, qi: np.ndarray, tj: np.ndarray, wide: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """scikit-learn's cosine distances between the rows ``qi`` and columns ``tj`` (padded
        to a large GEMM): ``(D, pos_q, pos_t)`` with ``D[pos_q[k], pos_t[k]]`` the value for
        pair k. ``wide``: scikit-learn's operands, the query rows normalised as part of their
        whole chunk, against all n rows normalised at once (or, when that copy would exceed
        ~512 MiB, against 65,536 columns normalised at once)."""
        from sklearn.preprocessing import normalize

        n, d = self.X.shape

        def conv(a: np.ndarray) -> np.ndarray:
            return a if a.dtype == np.float32 else a.astype(np.float64)

        q = np.unique(qi)
        m_min = min(e - s, max(4, -(-_GEMM_MIN_MNK // (n * d))))
        if len(q) < m_min:  # pad with other rows of the chunk (same path as its GEMM)
            q = np.union1d(q, np.setdiff1d(np.arange(s, e), q)[: m_min - len(q)])
        if wide:
            Qn = normalize(conv(self.X[s:e]))[q - s]
            if n * d <= 1 << 27:
                t = np.arange(n)
                Tn = normalize(conv(self.X))
            else:
                t = np.unique(tj)
                t = np.union1d(t, np.setdiff1d(np.arange(65536 + len(t)), t)[: 65536 - len(t)])
                Tn = normalize(conv(self.X[t]))
        else:
            Qn = normalize(conv(self.X[q]))
            t = np.unique(tj)
            n_min = min(n, max(64, -(-_GEMM_MIN_MNK // (len(q) * d))))
            if len(t) < n_min:
                t = np.union1d(t, np.setdiff1d(np.arange(n_min + len(t)), t)[: n_min - len(t)])
            Tn = normalize(conv(self.X[t]))
        D = Qn @ Tn.T
        D *= -1
        D += 1
        np.clip(D, 0.0, 2.0, out=D)  # in scikit-learn's dtype: eps is compared in it, as there
        return D, np.searchsorted(q, qi), np.searchsorted(t, tj)

    def _cosine_subset_ok(self, s: int, e: int, qi: np.ndarray, tj: np.ndarray) -> bool:
        """Once per fit: do a few pairs' values from a small padded GEMM equal the values from
        scikit-learn's operands (its chunk's rows against all columns)?"""
        if self._subset_ok is None:
            # up to 16 query rows (<= 1024 pairs): 16 rows x n columns in the wide product
            k = np.nonzero(np.isin(qi, np.unique(qi)[:16]))[0][:1024]
            sub, pq, pt = self._cosine_sub(s, e, qi[k], tj[k])
            full, fq, ft = self._cosine_sub(s, e, qi[k], tj[k], wide=True)
            self._subset_ok = bool(np.array_equal(sub[pq, pt], full[fq, ft]))
            if not self._subset_ok:
                log.info(
                    "DBSCAN: this BLAS rounds a GEMM entry differently by shape; re-deciding "
                    "cosine pairs with scikit-learn's whole row chunks"
                )
        return self._subset_ok


def _refine(
    X: np.ndarray,
    first: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    prep: _Prepared,
    active_pos: np.ndarray,
    mode: _Mode,
) -> tuple[np.ndarray, np.ndarray]:
    """Second look at representative pairs whose float32 value is near eps, in float64 from the
    original rows: ``(surely_in, undecided)`` masks. Only pairs within scikit-learn's own
    rounding of eps stay undecided. Memory: two (len(a), d) float64 blocks per 4096 pairs."""
    sure = np.zeros(len(a), bool)
    undecided = np.zeros(len(a), bool)
    d = X.shape[1]
    t = prep.threshold
    for s in range(0, len(a), 4096):
        xa = X[first[a[s : s + 4096]]].astype(np.float64)
        xb = X[first[b[s : s + 4096]]].astype(np.float64)
        if mode.kind == "cosine":
            na = np.sqrt(np.einsum("ij,ij->i", xa, xa))
            nb = np.sqrt(np.einsum("ij,ij->i", xb, xb))
            v = 2.0 * (1.0 - np.einsum("ij,ij->i", xa, xb) / (na * nb))
            err = np.full(len(v), 4.0 * (d + 8) * _U64)
        else:
            diff = xa - xb
            v = np.einsum("ij,ij->i", diff, diff)
            err = 4.0 * (d + 8) * _U64 * v + 1e-300
        w = (
            err
            + prep.sk_err[active_pos[a[s : s + 4096]]]
            + prep.sk_err[active_pos[b[s : s + 4096]]]
        )
        sure[s : s + 4096] = v < t - w
        undecided[s : s + 4096] = (v >= t - w) & (v <= t + w)
    return sure, undecided


def _recheck(
    band_i: np.ndarray, band_j: np.ndarray, members: list[np.ndarray], decider: _SkDecider
) -> tuple[np.ndarray, np.ndarray]:
    """Resolve representative pairs near eps: returns the ones that are edges.

    Every directed pair of copies is decided by scikit-learn's computation (copies can sit in
    chunks of different shapes, whose GEMM kernels round differently). Raises
    :class:`_Irregular` unless the decision is the same for both directions and all copies.
    """
    if len(band_i) == 0:
        return band_i, band_j
    tree = decider.mode.kind == "tree"
    qs, ts, owner = [], [], []
    for k, (a, b) in enumerate(zip(band_i.tolist(), band_j.tolist(), strict=True)):
        ma, mb = members[a], members[b]
        if len(ma) * len(mb) > 1_000_000:
            raise _Irregular
        for src, dst in ((ma, mb), (mb, ma)):
            q = src[:1] if tree else src  # copies query a tree identically
            qs.append(np.repeat(q, len(dst)))
            ts.append(np.tile(dst, len(q)))
            owner.append(np.full(len(q) * len(dst), k))
    owner_a = np.concatenate(owner)
    dec = decider.decide(np.concatenate(qs), np.concatenate(ts))
    n_pairs = len(band_i)
    yes = np.bincount(owner_a, weights=dec, minlength=n_pairs)
    tot = np.bincount(owner_a, minlength=n_pairs)
    if np.any((yes > 0) & (yes < tot)):
        raise _Irregular
    edge = yes == tot
    return band_i[edge], band_j[edge]


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


@dataclass
class _Graph:
    """The eps-graph between representatives, reduced as requested."""

    first: np.ndarray  # (m,) lowest row of each representative
    inverse: np.ndarray  # (n,) representative of each row
    counts: np.ndarray  # (m,) copies of each representative
    excluded: np.ndarray  # (m,) bool: cosine zero vectors, handled by rule
    uf: _UnionFind | None  # components (min_samples == 1)
    edges: tuple[np.ndarray, np.ndarray] | None  # all edges (min_samples > 1 / eps_graph)


def _build_graph(
    X: np.ndarray,
    eps: float,
    mode: _Mode,
    *,
    keep_edges: bool,
    n_jobs: int | None,
    client: Any = None,
    leaf_size: int = 30,
) -> _Graph:
    first, inverse, counts, excluded, subset = _distinct_rows(X, mode)
    m = len(first)
    active = np.nonzero(~excluded)[0]
    uf = None if keep_edges else _UnionFind(m)
    ei, ej = [], []
    if len(active):
        # the distinct rows (cosine zero vectors left out) read where they lie: no copy
        prep = _prepare(X, eps, mode, X.dtype, _n_threads(n_jobs), subset)
        _check_self_pairs(prep, eps, mode, X.dtype)
        active_pos = np.full(m, -1, np.int64)
        active_pos[active] = np.arange(len(active))
        to_rep = active[prep.order]  # leaf order -> representative number
        # min_samples=1: components over leaf-order rows, read by the tiles to skip work
        luf = None if keep_edges else _UnionFind(len(active))
        und_i, und_j = [], []
        for si, sj, bi, bj in _run_tiles(prep, n_jobs, client, luf):
            if len(bi):
                sure, und = _refine(X, first, to_rep[bi], to_rep[bj], prep, active_pos, mode)
                si = np.concatenate([si, bi[sure]])
                sj = np.concatenate([sj, bj[sure]])
                bi, bj = bi[und], bj[und]
            if luf is None:
                ei.append(to_rep[si])
                ej.append(to_rep[sj])
            else:
                luf.union(si, sj)
                # a pair already inside one component cannot change the labels
                keep = luf.find(bi) != luf.find(bj)
                bi, bj = bi[keep], bj[keep]
            und_i.append(bi)
            und_j.append(bj)
        if prep.cache is not None:
            log.debug(
                "eps-graph: rows read in place: %d leaves built, %d reused (of %d leaves)",
                prep.cache.built,
                prep.cache.reused,
                prep.n_leaves,
            )
        del prep
        # Pairs within scikit-learn's own rounding of eps, from every tile, decided together
        # once the tiles are done: each of scikit-learn's chunks is computed once per fit, and
        # with the caller's BLAS threads (scikit-learn's GEMM rounds by its kernel path).
        bi, bj = _cat(und_i), _cat(und_j)
        if luf is not None and len(bi):
            keep = luf.find(bi) != luf.find(bj)
            bi, bj = bi[keep], bj[keep]
        log.debug("eps-graph: %d pairs within scikit-learn's rounding of eps", len(bi))
        if len(bi):
            order = np.argsort(inverse, kind="stable")
            members = np.split(order, np.cumsum(counts)[:-1])
            decider = _SkDecider(X, eps, mode, leaf_size, n_jobs)
            t0 = time.perf_counter()
            ri, rj = _recheck(to_rep[bi], to_rep[bj], members, decider)
            log.debug("eps-graph: re-check %.2f s", time.perf_counter() - t0)
            if luf is None:
                ei.append(ri)
                ej.append(rj)
            else:
                pos = np.empty(m, np.int64)
                pos[to_rep] = np.arange(len(to_rep))
                luf.union(pos[ri], pos[rj])
        if luf is not None:
            uf.union(to_rep, to_rep[luf.roots()])
    edges = None
    if keep_edges:
        i, j = _cat(ei), _cat(ej)
        swap = i > j
        i[swap], j[swap] = j[swap], i[swap]
        edges = (i, j)
    return _Graph(first, inverse, counts, excluded, uf, edges)


class _Rechecker:
    """Decides a pass's near-eps pairs (leaf order) once the pass is done, in one batch: the
    pairs ``_refine`` settles in float64 at once, the rest by scikit-learn's computation."""

    def __init__(
        self,
        X: np.ndarray,
        eps: float,
        mode: _Mode,
        leaf_size: int,
        n_jobs: int | None,
        first: np.ndarray,
        inverse: np.ndarray,
        counts: np.ndarray,
        to_rep: np.ndarray,
        active_pos: np.ndarray,
    ) -> None:
        self.X, self.eps, self.mode, self.leaf_size, self.n_jobs = X, eps, mode, leaf_size, n_jobs
        self.first, self.inverse, self.counts = first, inverse, counts
        self.to_rep, self.active_pos = to_rep, active_pos
        self.pos = np.empty(len(first), np.int64)
        self.pos[to_rep] = np.arange(len(to_rep))
        self._decider: _SkDecider | None = None
        self._members: list[np.ndarray] | None = None

    def refine(
        self, prep: _Prepared, bi: np.ndarray, bj: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(sure_i, sure_j, undecided_i, undecided_j)`` of a tile's band pairs."""
        if len(bi) == 0:
            return bi, bj, bi, bj
        tr = self.to_rep
        sure, und = _refine(self.X, self.first, tr[bi], tr[bj], prep, self.active_pos, self.mode)
        return bi[sure], bj[sure], bi[und], bj[und]

    def decide(self, bi: np.ndarray, bj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The undecided pairs that are edges for scikit-learn (raises :class:`_Irregular`
        when it decides one asymmetrically)."""
        log.debug("eps-graph: %d pairs within scikit-learn's rounding of eps", len(bi))
        if len(bi) == 0:
            return bi, bj
        if self._decider is None:
            order = np.argsort(self.inverse, kind="stable")
            self._members = np.split(order, np.cumsum(self.counts)[:-1])
            self._decider = _SkDecider(self.X, self.eps, self.mode, self.leaf_size, self.n_jobs)
        t0 = time.perf_counter()
        ri, rj = _recheck(self.to_rep[bi], self.to_rep[bj], self._members, self._decider)
        log.debug("eps-graph: re-check %.2f s", time.perf_counter() - t0)
        return self.pos[ri], self.pos[rj]


def _cluster_counts(
    X: np.ndarray,
    eps: float,
    mode: _Mode,
    min_samples: int,
    *,
    n_jobs: int | None,
    client: Any = None,
    leaf_size: int = 30,
) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's DBSCAN for ``min_samples > 1`` without any neighbourhood or edge list:
    ``(labels, is_core)`` over the rows.

    Three passes over the tiles (see :class:`_PassCtx`): neighbourhood sizes (a pair of rows
    already known to be core is not computed), components among core rows (tiles already one
    component skipped, spanning forests), then each non-core row's smallest cluster number
    among its core neighbours (a border row joins the first cluster, in scikit-learn's
    numbering, that reaches it). Memory: the tiles' working set plus O(m) per-row arrays,
    whatever the number of pairs within eps.
    """
    first, inverse, counts, excluded, subset = _distinct_rows(X, mode)
    m = len(first)
    if mode.kind == "cosine" and excluded.any() and eps >= 1.0:
        raise _Irregular  # cosine zero vectors at distance 1 <= eps from everything
    active = np.nonzero(~excluded)[0]
    big = np.iinfo(np.int64).max
    labels_rep = np.full(m, -1, np.int64)
    core_rep = np.zeros(m, bool)
    if len(active):
        prep = _prepare(X, eps, mode, X.dtype, _n_threads(n_jobs), subset)
        _check_self_pairs(prep, eps, mode, X.dtype)
        active_pos = np.full(m, -1, np.int64)
        active_pos[active] = np.arange(len(active))
        to_rep = active[prep.order]
        rc = _Rechecker(X, eps, mode, leaf_size, n_jobs, first, inverse, counts, to_rep, active_pos)
        work = _work(prep)
        ma = len(active)

        def run(ctx: _PassCtx, luf: _UnionFind | None = None) -> Iterator[tuple]:
            for out in _run_tiles(prep, n_jobs, client, luf, ctx, work, passes=3):
                si, sj, ui, uj = rc.refine(prep, out[2], out[3])
                yield out[0], out[1], si, sj, ui, uj

        # 1. neighbourhood sizes, in rows (copies included, the row itself included)
        weight = counts[to_rep].astype(np.float64)
        deg = weight.copy()
        und_i, und_j = [], []
        for rows, add, si, sj, ui, uj in run(
            _PassCtx("count", weight=weight, deg=deg, need=min_samples)
        ):
            deg[rows] += add
            np.add.at(deg, si, weight[sj])
            np.add.at(deg, sj, weight[si])
            und_i.append(ui)
            und_j.append(uj)
        ei, ej = rc.decide(_cat(und_i), _cat(und_j))
        np.add.at(deg, ei, weight[ej])
        np.add.at(deg, ej, weight[ei])
        core = deg >= min_samples
        # 2. components among core rows
        luf = _UnionFind(ma)
        _union_then_decide(
            luf,
            (
                (np.concatenate([fi, si]), np.concatenate([fj, sj]), ui, uj)
                for fi, fj, si, sj, ui, uj in run(_PassCtx("core", core=core), luf)
            ),
            rc.decide,
        )
        # clusters numbered by their lowest core row (copies of a row share its core status)
        core_q = np.nonzero(core)[0]
        label = np.full(ma, big)
        if len(core_q):
            uniq, inv = np.unique(luf.find(core_q), return_inverse=True)
            low = np.full(len(uniq), big)
            np.minimum.at(low, inv, first[to_rep[core_q]])
            number = np.empty(len(uniq), np.int64)
            number[np.argsort(low, kind="stable")] = np.arange(len(uniq))
            label[core_q] = number[inv]
        # 3. border rows: non-core rows with a neighbour, the smallest core label reaching them
        border = np.full(ma, big)
        cand = ~core & (deg > weight)
        if cand.any() and len(core_q):
            und_i, und_j = [], []
            ctx = _PassCtx("border", core=core, rows=cand, label=label)
            for rows, low_lab, si, sj, ui, uj in run(ctx):
                np.minimum.at(border, rows, low_lab.astype(np.int64))
                np.minimum.at(border, *_border_min(ctx, si, sj))
                und_i.append(ui)
                und_j.append(uj)
            np.minimum.at(border, *_border_min(ctx, *rc.decide(_cat(und_i), _cat(und_j))))
        else:  # no border pass: its share of the progress is done
            progress.advance(len(work), total=3 * len(work))
        lab_q = np.where(core, label, np.where(border != big, border, -1))
        labels_rep[to_rep] = lab_q
        core_rep[to_rep] = core
    return labels_rep[inverse], core_rep[inverse]


def _check_self_pairs(prep: _Prepared, eps: float, mode: _Mode, dtype: np.dtype) -> None:
    """Identical vectors collapse to one only if scikit-learn surely finds them within eps
    (its rounding gives them a tiny non-zero distance): else delegate."""
    if mode.kind == "tree":
        return  # exact zero differences
    if float(prep.band.max(initial=0.0)) >= prep.threshold:
        raise _Irregular


def _labels_from_graph(
    g: _Graph, min_samples: int, cosine_single_chunk: bool, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's ``dbscan_inner`` result from the representative graph: ``(labels,
    is_core)`` over the original rows.

    Clusters are the components of the graph among core points, numbered in the order of their
    lowest core row; a border row takes the lowest-numbered cluster among its core neighbours
    (the first cluster whose depth-first search reaches it).
    """
    m = len(g.first)
    big = np.iinfo(np.int64).max
    if g.excluded.any() and eps >= 1.0:
        raise _Irregular  # cosine zero vectors at distance 1 <= eps from everything
    if g.edges is None:
        roots = g.uf.roots()  # min_samples == 1: every row is its own neighbour, so core
        rep_core = ~g.excluded
    else:
        i, j = g.edges
        # A representative's neighbourhood size in rows: its own copies plus its neighbours'.
        deg = g.counts.astype(np.int64).copy()
        np.add.at(deg, i, g.counts[j])
        np.add.at(deg, j, g.counts[i])
        rep_core = (deg >= min_samples) & ~g.excluded
        cc = rep_core[i] & rep_core[j]
        graph = sparse.coo_matrix((np.ones(int(cc.sum()), np.int8), (i[cc], j[cc])), shape=(m, m))
        _, roots = connected_components(graph, directed=False)
    # Cosine zero rows: at distance 1 > eps from every row, and from themselves too unless
    # sklearn computed all rows as one chunk (it then zeroes the diagonal). Each zero row is
    # then a cluster of its own when min_samples <= 1, noise otherwise; copies stay apart.
    zero_rows = np.nonzero(g.excluded[g.inverse])[0]
    zero_core = cosine_single_chunk and min_samples <= 1
    core_reps = np.nonzero(rep_core)[0]
    keys = roots[core_reps].astype(np.int64)
    lows = g.first[core_reps]
    if zero_core and len(zero_rows):
        keys = np.concatenate([keys, -1 - zero_rows])
        lows = np.concatenate([lows, zero_rows])
    labels_rep = np.full(m, -1, np.int64)
    zero_labels = np.full(len(zero_rows), -1, np.int64)
    if len(keys):
        uniq, inv = np.unique(keys, return_inverse=True)
        low = np.full(len(uniq), big)
        np.minimum.at(low, inv, lows)
        number = np.empty(len(uniq), np.int64)
        number[np.argsort(low, kind="stable")] = np.arange(len(uniq))
        lab = number[inv]
        labels_rep[core_reps] = lab[: len(core_reps)]
        if zero_core and len(zero_rows):
            zero_labels = lab[len(core_reps) :]
    if g.edges is not None:
        i, j = g.edges
        border = np.full(m, big)
        for a, b in ((i, j), (j, i)):
            sel = ~rep_core[a] & rep_core[b]
            np.minimum.at(border, a[sel], labels_rep[b[sel]])
        has = border != big
        labels_rep[has] = border[has]
    labels = labels_rep[g.inverse]
    is_core = rep_core[g.inverse]
    labels[zero_rows] = zero_labels
    is_core[zero_rows] = zero_core
    return labels, is_core


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


class DBSCAN(ClusterMixin, BaseEstimator):
    """Exact DBSCAN, a drop-in for :class:`sklearn.cluster.DBSCAN`.

    Parameters
    ----------
    eps : float, default=0.5
        Neighbourhood radius; points at distance exactly ``eps`` are neighbours (``<=``).
    min_samples : int, default=5
        Rows (the point itself included, copies counted) within ``eps`` for a core point.
    metric : str or callable, default="euclidean"
        ``"euclidean"`` (also ``"minkowski"`` with ``p`` 2 or None) and ``"cosine"`` (1 - cos of
        the raw vectors) run on the tiled engine; anything else is delegated to scikit-learn.
    metric_params : dict, default=None
        Delegated to scikit-learn when given.
    algorithm : {"auto", "ball_tree", "kd_tree", "brute"}, default="auto"
        Does not change the result; it tells the engine which of scikit-learn's distance
        computations decides pairs that lie within rounding of ``eps``.
    leaf_size : int, default=30
        As in scikit-learn (used only when re-deciding near-eps pairs with a tree).
    p : float, default=None
        Minkowski power; only ``None`` or 2 run on the engine.
    n_jobs : int, default=None
        Threads for the tiles when ``fit`` is given no Dask client (None or -1: every core, like
        scikit-learn's OpenMP brute force; k: k tiles at once). Each tile uses a
        single-threaded BLAS, so threads are never oversubscribed.

    Attributes
    ----------
    core_sample_indices_ : ndarray of shape (n_core_samples,)
        Indices of core samples.
    components_ : ndarray of shape (n_core_samples, n_features)
        Copy of each core sample.
    labels_ : ndarray of shape (n_samples,)
        Cluster labels, numbered as scikit-learn numbers them (order of each cluster's
        lowest-index core sample); noise is -1.

    Notes
    -----
    Memory and complexity: peak memory is O(n d) plus a few tiles per thread, independent of
    how many pairs lie within ``eps``, for every ``min_samples``. Identical rows collapse first
    (8 bytes per row for the hashes; the m distinct rows are read where they lie, never
    copied out, and so are the rows left when cosine zero vectors are set aside); the tiles
    need the rows' projections on 32
    principal directions ((m, 32) float64 while the tree is built, then two (m, 34) float32
    factors), ~10 float64 values per row, and a few 512 x ~2048 float32 blocks per thread
    (leaves of 512 rows against groups of ~2048 columns, the low-rank bound 512 columns at a
    time);
    preparation works in ~8 MiB float64 chunks. The tiles' float32 working rows (centred or
    normalised, in leaf order) are one contiguous copy when it takes at most ``ROW_BYTES``
    (512 MiB); beyond, each tile builds its leaves' rows from the input in place and at most
    256 MiB of built leaves are kept for the next tiles, so the peak never holds a second
    (n, d) copy: at 600k x 512 float32 (1.14 GiB of input) it measured 2.21 GiB in all.
    No neighbourhood and no edge list is stored: with
    ``min_samples=1`` a tile returns a spanning forest of its edges (at most one per row) that
    is merged by union-find as it finishes, and a tile whose rows are already one component
    is skipped (a group of near-identical rows costs about O(group) instead of O(group^2));
    with ``min_samples > 1`` three passes over the tiles return per-row results only:
    neighbourhood sizes (pairs of rows already known to be core skipped), components among
    core rows (as for ``min_samples=1``), and each border row's first cluster. Time is
    O(m^2 k) for the low-rank lower bound (k = 32) over the tile pairs the projection tree
    cannot prune, plus O(d) per pair that passes it; the tree cuts the 2-3 leading principal
    directions into a fine grid of leaves whose box gaps skip whole tile pairs. Where the
    low-rank bound passes most pairs of a block (flat spectra, groups of noisy copies) the
    block is one full float32 product thresholded in place, and when a sample of leaf pairs
    shows the bound pruning almost nowhere it is not computed at all: flat spectra cost
    O(m^2 d) then, as scikit-learn's brute force does, in float32 and without neighbourhoods.
    ``components_`` (a copy of every core row, i.e. of all of ``X`` with ``min_samples=1``,
    as scikit-learn's contract has it) is built by :meth:`fit` after the tiles' memory is
    freed, and adds the input's size to what the fitted estimator holds; the functional
    :func:`dbscan`, which returns only the indices and labels, never builds it.
    scikit-learn by contrast holds every neighbourhood, O(sum of neighbourhood sizes) memory,
    quadratic in a group of copies (10.5 GB for 20,000 copies of one vector).

    Pairs whose float32 value lies within a rigorous rounding bound of ``eps`` are checked again
    in float64, and those still within scikit-learn's own rounding of ``eps`` are decided by
    scikit-learn's computation for that pair (its GEMM on the same 256-row chunk, its tree, or
    its cosine chunk), so ties at exactly ``eps`` come out as in scikit-learn. These pairs are
    collected from all tiles and decided in one batch per pass; for cosine on float32 input
    only the needed entries of scikit-learn's row chunks are computed (verified once per fit
    to round as scikit-learn's whole chunk does, else the whole chunk).

    Given a ``distributed.Client`` (``fit(X, client=client)``), the prepared rows are scattered
    once (broadcast) and tiles run as tasks on its workers; the client process only merges
    components. The client is an argument of :meth:`fit`, not an estimator parameter: it is a
    connection, not a hyperparameter, and as a parameter ``clone`` would deep-copy it,
    ``get_params`` would report it and pickling the estimator would try to pickle a socket;
    as a keyword of ``fit`` the estimator's parameters stay exactly scikit-learn's DBSCAN's
    (what its own test suite, run against this class, checks). Nothing looks for a current or
    default client: without ``client`` the tiles run on threads.
    """

    def __init__(
        self,
        eps: float = 0.5,
        *,
        min_samples: int = 5,
        metric: Any = "euclidean",
        metric_params: dict | None = None,
        algorithm: str = "auto",
        leaf_size: int = 30,
        p: float | None = None,
        n_jobs: int | None = None,
    ) -> None:
        self.eps = eps
        self.min_samples = min_samples
        self.metric = metric
        self.metric_params = metric_params
        self.algorithm = algorithm
        self.leaf_size = leaf_size
        self.p = p
        self.n_jobs = n_jobs

    def fit(
        self, X: Any, y: Any = None, sample_weight: Any = None, *, client: Any = None
    ) -> DBSCAN:
        """Cluster ``X`` (n_samples, n_features); see :class:`sklearn.cluster.DBSCAN.fit`.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features) or (n_samples,
            n_samples)
            Rows to cluster, or distances when ``metric="precomputed"``.
        y : Ignored
        sample_weight : array-like of shape (n_samples,), default=None
            As in scikit-learn (delegated to it when given).
        client : distributed.Client, default=None
            Run the tiles as tasks on this cluster's workers; with a ``dask.array`` ``X``, the
            distributed engine (:mod:`dedup_batch.cluster_dask`) runs there. Without it the
            tiles run on ``n_jobs`` threads here (and a ``dask.array`` is computed here).

        Returns
        -------
        self : DBSCAN
        """
        return self._fit(X, sample_weight, client, components=True)

    def _fit(self, X: Any, sample_weight: Any, client: Any, *, components: bool) -> DBSCAN:
        """:meth:`fit`; ``components=False`` (:func:`dbscan`, which returns only the indices
        and labels) leaves ``components_`` unset: on the engine it is a copy of every core
        row, as large as ``X`` with ``min_samples=1``."""
        if type(X).__module__.startswith("dask.array"):  # rows on Dask workers: never gathered
            from .cluster_dask import fit_dask

            return fit_dask(self, X, sample_weight, client=client)
        sk = _SkDBSCAN(**self.get_params())
        _skc.validate_params(sk)
        Xv = _skc.validate_data(sk, X, accept_sparse="csr")
        mode = _resolve_mode(self, Xv, sample_weight)
        result = None
        if mode is not None:
            try:
                result = self._fit_engine(Xv, mode, client)
            except _Irregular:
                log.info(
                    "DBSCAN: a pair within rounding of eps is decided asymmetrically by "
                    "scikit-learn; delegating this fit to scikit-learn for its exact result"
                )
        if result is None:
            sk.fit(X, sample_weight=sample_weight)
            self.labels_ = sk.labels_
            self.core_sample_indices_ = sk.core_sample_indices_
            self.components_ = sk.components_
        else:
            self.labels_, core = result
            self.core_sample_indices_ = np.nonzero(core)[0]
            if components:
                # fancy indexing already copies: a further .copy() held X twice more (2 GiB
                # at 1M rows, where every row is core with min_samples=1)
                core_idx = self.core_sample_indices_
                self.components_ = Xv[core_idx] if len(core_idx) else np.empty((0, Xv.shape[1]))
        self.n_features_in_ = Xv.shape[1]
        return self

    def _fit_engine(self, X: np.ndarray, mode: _Mode, client: Any) -> tuple[np.ndarray, np.ndarray]:
        X = np.ascontiguousarray(X)
        if self.min_samples > 1:
            labels, core = _cluster_counts(
                X,
                float(self.eps),
                mode,
                int(self.min_samples),
                n_jobs=self.n_jobs,
                client=client,
                leaf_size=self.leaf_size,
            )
            return labels.astype(np.intp), core
        g = _build_graph(
            X,
            float(self.eps),
            mode,
            keep_edges=False,
            n_jobs=self.n_jobs,
            client=client,
            leaf_size=self.leaf_size,
        )
        single = False
        if mode.kind == "cosine" and g.excluded.any():
            single = len(_SkDecider(X, self.eps, mode, self.leaf_size)._cosine_rows()) == 2
        labels, core = _labels_from_graph(g, int(self.min_samples), single, float(self.eps))
        return labels.astype(np.intp), core

    def fit_predict(
        self, X: Any, y: Any = None, sample_weight: Any = None, *, client: Any = None
    ) -> np.ndarray:
        """Fit (``client`` as in :meth:`fit`) and return ``labels_`` (n_samples,)."""
        return self.fit(X, sample_weight=sample_weight, client=client).labels_


def dbscan(
    X: Any,
    eps: float = 0.5,
    *,
    min_samples: int = 5,
    metric: Any = "minkowski",
    metric_params: dict | None = None,
    algorithm: str = "auto",
    leaf_size: int = 30,
    p: float = 2,
    sample_weight: Any = None,
    n_jobs: int | None = None,
    client: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Functional form, as :func:`sklearn.cluster.dbscan`: ``(core_sample_indices, labels)``.

    Parameters are those of :class:`DBSCAN` (same defaults as scikit-learn's function: metric
    ``"minkowski"`` with ``p=2``, i.e. euclidean), and ``client`` (a ``distributed.Client``,
    optional) those of :meth:`DBSCAN.fit`. Memory and time as :class:`DBSCAN`, without
    ``components_`` (a copy of every core row, i.e. of ``X`` with ``min_samples=1``), which
    this function does not return and so never builds.
    """
    est = DBSCAN(
        eps,
        min_samples=min_samples,
        metric=metric,
        metric_params=metric_params,
        algorithm=algorithm,
        leaf_size=leaf_size,
        p=p,
        n_jobs=n_jobs,
    )
    est._fit(X, sample_weight, client, components=False)
    return est.core_sample_indices_, est.labels_


def eps_graph(
    X: Any,
    eps: float,
    *,
    metric: str = "euclidean",
    n_jobs: int | None = None,
    client: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The eps-neighbourhood graph between distinct rows, as scikit-learn's DBSCAN sees it.

    Parameters
    ----------
    X : array-like of shape (n, d)
        Rows (float32 or float64).
    eps : float
        Radius (``<=``), in the metric's units.
    metric : {"euclidean", "cosine"}, default="euclidean"
        Euclidean decisions follow scikit-learn's brute-force computation for d > 15 and its
        KD-tree for d <= 15 (``algorithm="auto"``).
    n_jobs : int, default=None
        Threads when no Dask client is given (as :class:`DBSCAN`).
    client : distributed.Client, default=None
        Run the tiles on its workers (as :meth:`DBSCAN.fit`); without it, on threads here.

    Returns
    -------
    inverse : ndarray of shape (n,), int64
        Each row's representative: the index of the first row with bitwise the same vector.
    i, j : ndarray of shape (n_edges,), int64
        Edges between representatives (row indices, ``i < j``, sorted), exactly the pairs
        scikit-learn finds within ``eps``.
    d : ndarray of shape (n_edges,), float64
        Their distance in float64 (euclidean: from the differences; cosine: ``1 - cos``).

    Notes
    -----
    Memory: the edge list (24 bytes per edge) plus the engine's working set (see
    :class:`DBSCAN`). Raises ``ValueError`` for other metrics, and for the rare input whose
    near-eps pairs scikit-learn itself decides asymmetrically (no symmetric graph exists).
    Cosine zero vectors (distance 1 to everything, themselves included) have no edges.
    """
    from sklearn.utils import check_array

    X = check_array(X, dtype=[np.float64, np.float32], order="C")
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"eps_graph: metric must be 'euclidean' or 'cosine', got {metric!r}")
    est = DBSCAN(eps, metric=metric)
    mode = _resolve_mode(est, X, None)
    try:
        g = _build_graph(X, float(eps), mode, keep_edges=True, n_jobs=n_jobs, client=client)
    except _Irregular as e:
        raise ValueError(
            "eps_graph: scikit-learn decides a pair within rounding of eps "
            "asymmetrically for this input; no symmetric graph exists"
        ) from e
    i, j = g.first[g.edges[0]], g.first[g.edges[1]]
    order = np.lexsort((j, i))
    i, j = i[order], j[order]
    Xi = X[i].astype(np.float64)
    Xj = X[j].astype(np.float64)
    if metric == "euclidean":
        d = np.sqrt(np.einsum("ij,ij->i", Xi - Xj, Xi - Xj))
    else:
        ni = np.sqrt(np.einsum("ij,ij->i", Xi, Xi))
        nj = np.sqrt(np.einsum("ij,ij->i", Xj, Xj))
        d = np.clip(1.0 - np.einsum("ij,ij->i", Xi, Xj) / (ni * nj), 0.0, 2.0)
    return g.first[g.inverse], i, j, d
