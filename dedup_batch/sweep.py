"""Choosing eps: how the clusters and deletions move with eps, read off the data in one pass.

With ``min_samples=1`` DBSCAN's clusters are the connected components of the eps-graph (points
within eps of each other, ``<=``), i.e. single linkage cut at eps. So one minimum spanning
forest of the graph at the largest eps of interest answers every smaller eps at once: the
clusters at eps are the components of the forest's edges of length ``<= eps``, and their number
is ``n_unique - #(forest edges <= eps)``. :func:`eps_forest` builds that forest from the plan's
own graph (:func:`dedup_batch.cluster.eps_graph`, so the sweep's neighbours are the plan's,
ties at exactly eps included); :func:`sweep` reads counts (and, given a truth table,
precision/recall/F1 of the deletions) off it for a whole range of eps.

:func:`run_sweep` is the CLI's entry point: it loads the features (:func:`dedup_batch.load.
load_features`), then :func:`write_sweep` writes into ``out``:

* ``sweep.csv``: one row per eps: ``eps, clusters, duplicate_clusters, largest_cluster,
  deletions`` (+ ``noise`` for ``min_samples > 1``; + ``correct, precision, recall, f1`` with a
  truth table);
* ``sweep.png``: deletions and clusters against eps (and precision/recall/F1 with truth);
* ``k-distance.png``: the sorted distance of each point to its k-th nearest neighbour, the usual
  way to read eps off the data (duplicates sit on the flat floor left of the knee);
* ``pairs.html``: thumbnails of the pairs just inside and just outside a chosen eps: the merges
  (single-linkage forest edges) that lowering or raising eps would undo or add.

Identical rows are collapsed first (the graph is between distinct rows): they are at distance 0,
so in the same cluster at every eps, and a folder of exact copies then costs nothing in the graph.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components, minimum_spanning_tree

from . import storage
from .cluster import DBSCAN, dbscan, eps_graph
from .errors import ConfigError, InputError, one_line
from .progress import Stage, stage

__all__ = [
    "EpsForest",
    "SweepResult",
    "deletion_scores",
    "eps_forest",
    "eps_range",
    "k_distance",
    "read_truth",
    "run_sweep",
    "sweep",
    "write_sweep",
]

log = logging.getLogger(__name__)

#: Distance stored for distinct rows at distance 0 (cosine of parallel vectors): scipy's
#: spanning tree treats a stored 0 as "no edge", and any eps > 0 is >= this.
_TINY = np.finfo(np.float64).tiny
#: Points whose k-distance is computed at most (a random sample; the curve's shape is kept).
K_SAMPLE = 20_000
#: Keeper policies the sweep can score without object metadata (sizes, times).
PATH_POLICIES = ("first-path", "last-path")


# -- the forest ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class EpsForest:
    """The single-linkage merges of the eps-graph at ``max_eps``, as the plan's DBSCAN sees it.

    Attributes
    ----------
    inverse : ndarray of int64, shape (n,)
        Row of ``X`` -> its unique row.
    first : ndarray of int64, shape (n_unique,)
        Unique row -> the first row of ``X`` that has it (a representative, for pairs).
    i, j : ndarray of int64, shape (m,)
        Forest edges between unique rows, ``m <= n_unique - 1``, sorted by ``w``.
    w : ndarray of float64, shape (m,)
        Edge keys, ascending: the squared distance when ``squared`` (euclidean), else the
        distance, both in float64.
    max_eps : float
        The graph's radius: answers are exact for every ``0 < eps <= max_eps``.
    metric : str
    squared : bool
    X : ndarray, shape (n, d), optional
        The features (a reference, not a copy): an eps with a pair within rounding of it is
        answered by the plan's own DBSCAN on them.
    lo, hi : ndarray of float64, shape (n_edges,), optional
        For every edge of the graph (not only the forest), the interval of keys within which
        scikit-learn's rounding may decide it either way. Empty: no such check.
    """

    inverse: np.ndarray
    first: np.ndarray
    i: np.ndarray
    j: np.ndarray
    w: np.ndarray
    max_eps: float
    metric: str
    squared: bool = False
    X: np.ndarray | None = None
    lo: np.ndarray = field(default_factory=lambda: np.empty(0))
    hi: np.ndarray = field(default_factory=lambda: np.empty(0))
    client: Any = None
    _exact: dict[float, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def d(self) -> np.ndarray:
        """Edge lengths in the metric, ascending (shape (m,))."""
        w = np.where(self.w == _TINY, 0.0, self.w)
        return np.sqrt(w) if self.squared else w

    def _key(self, eps: float) -> float:
        return eps * eps if self.squared else eps

    @property
    def n(self) -> int:
        return int(self.inverse.shape[0])

    @property
    def n_unique(self) -> int:
        return int(self.first.shape[0])

    def _check(self, eps: float) -> None:
        if not 0 < eps <= self.max_eps * (1 + 1e-12):
            raise ConfigError(f"eps {eps} is outside (0, {self.max_eps}] of this forest")

    def _tied(self, eps: float) -> bool:
        """Whether some pair lies within rounding of ``eps`` (exactly at it, typically)."""
        key = self._key(eps)
        return self.X is not None and bool(np.any((self.lo <= key) & (key <= self.hi)))

    def _plan_labels(self, eps: float) -> np.ndarray:
        """The plan's partition at ``eps``: :class:`dedup_batch.cluster.DBSCAN` itself, which
        decides pairs at exactly eps as scikit-learn does. Cached per eps."""
        if eps not in self._exact:
            est = DBSCAN(eps=eps, min_samples=1, metric=self.metric)
            labels = est.fit(self.X, client=self.client).labels_
            self._exact[eps] = labels.astype(np.int64)
        return self._exact[eps]

    def n_clusters(self, eps: float) -> int:
        """Number of DBSCAN(min_samples=1) clusters at ``eps``."""
        self._check(eps)
        if self._tied(eps):
            return int(self._plan_labels(eps).max()) + 1
        return self.n_unique - int(np.searchsorted(self.w, self._key(eps), side="right"))

    def labels(self, eps: float) -> np.ndarray:
        """DBSCAN(min_samples=1) partition at ``eps``: int64 labels, shape (n).

        The plan's partition (:class:`dedup_batch.cluster.DBSCAN`, i.e. scikit-learn's),
        numbered in order of each cluster's first row, as scikit-learn numbers them for
        ``min_samples=1``.
        """
        self._check(eps)
        if self._tied(eps):
            return self._plan_labels(eps)
        k = int(np.searchsorted(self.w, self._key(eps), side="right"))
        g = coo_matrix((np.ones(k), (self.i[:k], self.j[:k])), shape=(self.n_unique, self.n_unique))
        _, comp = connected_components(g, directed=False)
        rows = comp[self.inverse]
        # renumber by first appearance so labels match sklearn's order
        _, first_idx, inv = np.unique(rows, return_index=True, return_inverse=True)
        order = np.argsort(np.argsort(first_idx, kind="stable"), kind="stable")
        return order[inv].astype(np.int64)

    def pairs_near(self, eps: float, k: int = 12) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The ``k`` merges just inside (``d <= eps``, largest first) and just outside
        (``d > eps``, smallest first) of ``eps``.

        Returns two DataFrames with columns ``a``, ``b`` (rows of ``X``) and ``distance``.
        Outside pairs exist only up to ``max_eps``.
        """
        cut = int(np.searchsorted(self.w, self._key(eps), side="right"))
        inside = np.arange(max(0, cut - k), cut)[::-1]
        outside = np.arange(cut, min(len(self.w), cut + k))
        d = self.d

        def frame(idx: np.ndarray) -> pd.DataFrame:
            return pd.DataFrame(
                {"a": self.first[self.i[idx]], "b": self.first[self.j[idx]], "distance": d[idx]}
            )

        return frame(inside), frame(outside)


def _forest(
    i: np.ndarray, j: np.ndarray, d: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimum spanning forest of an edge list (no duplicate pairs), as an edge list.

    Relabels to the nodes present, so the cost is O(E log E), independent of n.
    """
    if len(i) == 0:
        return i, j, d
    nodes, inv = np.unique(np.concatenate([i, j]), return_inverse=True)
    a, b = inv[: len(i)], inv[len(i) :]
    g = coo_matrix((np.maximum(d, _TINY), (a, b)), shape=(len(nodes), len(nodes))).tocsr()
    t = minimum_spanning_tree(g).tocoo()
    return nodes[t.row].astype(np.int64), nodes[t.col].astype(np.int64), t.data.astype(np.float64)


def eps_forest(
    X: np.ndarray,
    max_eps: float,
    *,
    metric: str = "euclidean",
    client: Any = None,
    chunk_rows: int | None = None,
    progress: Stage | str | None = "eps-graph",
) -> EpsForest:
    """Build the single-linkage forest of the eps-graph of ``X`` at ``max_eps``.

    The graph is :func:`dedup_batch.cluster.eps_graph`: the pairs the plan's DBSCAN finds,
    computed by the same tiled engine (on the client's workers when one is given), so the
    sweep and the plan cannot disagree about which pairs are neighbours.

    Parameters
    ----------
    X : ndarray, shape (n, d)
        Feature vectors (float32 or float64).
    max_eps : float
        Largest eps that will be asked about (> 0).
    metric : {"euclidean", "cosine"}
    client : distributed.Client, optional
        Run the distance tiles on its workers (and the exact re-runs of tied eps values).
    chunk_rows : int, optional
        Accepted for compatibility and ignored: the engine sizes its own tiles.
    progress : Stage or str or None
        The name of a stage to open (advanced by tiles), a running stage, or ``None``.

    Returns
    -------
    EpsForest

    Notes
    -----
    Memory: the graph's edge list at ``max_eps`` (24 bytes an edge, plus 16 for each edge's
    rounding interval) and the engine's working set (see :class:`dedup_batch.cluster.DBSCAN`);
    the forest itself has fewer than ``n_unique`` edges. A swept eps with a pair within
    rounding of it (ties at exactly eps: integer or binary features) is answered by running
    the plan's DBSCAN at that eps, so its partition is the plan's whatever the rounding.
    """
    del chunk_rows  # the engine sizes its own tiles
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] == 0:
        raise InputError(f"features must be a non-empty 2-d array, got shape {X.shape}")
    if not (max_eps > 0 and math.isfinite(max_eps)):
        raise ConfigError(f"eps must be a positive number, got {max_eps}")
    if metric not in ("euclidean", "cosine"):
        raise ConfigError(f"sweep: metric must be 'euclidean' or 'cosine', got {metric!r}")
    shown = stage(progress, unit="tiles") if isinstance(progress, str) else nullcontext()
    with shown:
        try:
            rep, gi, gj, gd = eps_graph(X, float(max_eps), metric=metric, client=client)
        except ValueError as exc:
            raise InputError(f"sweep: {exc}") from None
    # eps_graph names each row's representative by the first row with the same vector: in
    # ascending order they are the unique rows by first appearance (readable pairs).
    first, inverse = np.unique(rep, return_inverse=True)
    ui, uj = np.searchsorted(first, gi), np.searchsorted(first, gj)
    squared = metric == "euclidean"
    w, tol = _keys(X, gi, gj, gd, squared)
    i, j, fw = _forest(ui, uj, w)
    o = np.lexsort((j, i, fw))
    log.info(
        "eps-graph: %d rows, %d unique, %d merges up to eps %g",
        len(X),
        len(first),
        len(fw),
        max_eps,
        extra={"event": "eps_forest", "rows": len(X), "unique": len(first), "merges": len(fw)},
    )
    return EpsForest(
        inverse.reshape(-1).astype(np.int64),
        first.astype(np.int64),
        i[o],
        j[o],
        fw[o],
        float(max_eps),
        metric,
        squared,
        X=X,
        lo=w - tol,
        hi=w + tol,
        client=client,
    )


def _keys(
    X: np.ndarray, i: np.ndarray, j: np.ndarray, d: np.ndarray, squared: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Each graph edge's key and the half-width of the interval in which rounding may decide
    it either way, both float64, shape (n_edges,).

    Euclidean: the squared distance from the float64 differences (what scikit-learn's trees
    compare against ``eps * eps``); its brute force computes ``|x|^2 - 2 x.y + |y|^2`` in
    float64 (float32 input is upcast by chunks), off by at most ``(d + 6) u (|x|^2 + |y|^2)``
    with ``u = 2**-53``; four times that is the margin. Cosine: ``1 - cos``, which scikit-learn
    computes in the input's precision (float32 stays float32).
    """
    dims = X.shape[1]
    if not squared:
        u = 2.0**-24 if X.dtype == np.float32 else 2.0**-53
        return d.astype(np.float64), np.full(len(d), 4.0 * (dims + 6) * u * 2.0 + 4.0 * u)
    w = np.empty(len(i), np.float64)
    n2 = np.empty(len(i), np.float64)
    step = max(1, 4_000_000 // max(1, dims))  # bounds the (edges x dims) float64 block
    for a in range(0, len(i), step):
        xi = X[i[a : a + step]].astype(np.float64)
        xj = X[j[a : a + step]].astype(np.float64)
        diff = xi - xj
        w[a : a + step] = np.einsum("ij,ij->i", diff, diff)
        n2[a : a + step] = np.einsum("ij,ij->i", xi, xi) + np.einsum("ij,ij->i", xj, xj)
    u = 2.0**-53
    return w, 4.0 * (dims + 6) * u * n2 + 4.0 * u * w


# -- the sweep -----------------------------------------------------------------------------------
def eps_range(eps_min: float, eps_max: float, steps: int = 20) -> np.ndarray:
    """``steps`` evenly spaced eps values from ``eps_min`` to ``eps_max`` (both included)."""
    if not (0 < eps_min <= eps_max and math.isfinite(eps_max)):
        raise ConfigError(f"sweep: need 0 < eps-min <= eps-max, got {eps_min} and {eps_max}")
    if steps < 1:
        raise ConfigError(f"sweep: steps must be >= 1, got {steps}")
    return np.linspace(eps_min, eps_max, steps) if steps > 1 else np.array([eps_max], float)


def deletion_scores(
    labels: np.ndarray,
    paths: Sequence[str] | np.ndarray,
    groups: np.ndarray,
    *,
    keep: str = "first-path",
) -> dict[str, float]:
    """Score the deletions of one partition against truth groups.

    One keeper per cluster (``first-path``: the smallest path; ``last-path``: the largest);
    every other member is deleted; noise (label -1) is never deleted. A deletion is correct if
    the deleted image has the same truth group as its keeper.

    Parameters
    ----------
    labels : ndarray of int, shape (n,)
    paths : sequence of str, shape (n,)
    groups : ndarray of int, shape (n,)
        Truth group codes (an unlabelled image gets a group of its own).
    keep : {"first-path", "last-path"}

    Returns
    -------
    dict
        ``deletions``, ``correct``, ``ideal`` (deletions a perfect plan makes: the sum over
        truth groups of their size minus one), ``precision`` (correct / deletions), ``recall``
        (correct / ideal), ``f1``; a ratio with a zero denominator is NaN.
    """
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    n = len(labels)
    prank = np.empty(n, np.int64)
    prank[np.argsort(np.asarray(paths, dtype=object), kind="stable")] = np.arange(n)
    if keep == "last-path":
        prank = n - 1 - prank
    elif keep != "first-path":
        raise ConfigError(f"sweep scores keep policies {', '.join(PATH_POLICIES)}, not {keep!r}")
    member = labels >= 0
    lab = labels[member]
    order = np.lexsort((prank[member], lab))
    ls = lab[order]
    heads = np.r_[True, ls[1:] != ls[:-1]]
    keeper_rows = np.flatnonzero(member)[order][heads]  # rows of X, one per cluster
    cluster_of = np.searchsorted(ls[heads], lab)
    keeper_group = groups[keeper_rows][cluster_of]
    is_keeper = np.zeros(n, bool)
    is_keeper[keeper_rows] = True
    deleted = member.copy()
    deleted[is_keeper] = False
    correct = int((groups[member] == keeper_group)[deleted[member]].sum())
    n_del = int(deleted.sum())
    _, gcounts = np.unique(groups, return_counts=True)
    ideal = int((gcounts - 1).sum())
    precision = correct / n_del if n_del else math.nan
    recall = correct / ideal if ideal else math.nan
    f1 = (
        2 * precision * recall / (precision + recall)
        if n_del and ideal and (precision + recall) > 0
        else math.nan
    )
    if n_del and ideal and correct == 0:
        f1 = 0.0
    return {
        "deletions": n_del,
        "correct": correct,
        "ideal": ideal,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def sweep(
    X: np.ndarray,
    eps_values: Sequence[float] | np.ndarray,
    *,
    metric: str = "euclidean",
    min_samples: int = 1,
    paths: Sequence[str] | np.ndarray | None = None,
    truth: Mapping[str, Any] | None = None,
    keep: str = "first-path",
    client: Any = None,
    forest: EpsForest | None = None,
) -> pd.DataFrame:
    """Clusters and deletions of DBSCAN at every eps in ``eps_values``.

    Parameters
    ----------
    X : ndarray, shape (n, d)
    eps_values : sequence of float
        Each > 0; answered in ascending order.
    metric : str
    min_samples : int
        1 (the usual setting) answers every eps from one forest; larger values run one
        :func:`dedup_batch.cluster.dbscan` per eps (exact, but each costs a full clustering).
    paths, truth : optional
        With both, score the deletions (see :func:`deletion_scores`); ``truth`` maps a path to
        its group. Paths missing from ``truth`` are their own group.
    keep : {"first-path", "last-path"}
        Keeper policy used for the scores.
    client : distributed.Client, optional
        The clustering (the forest's eps-graph, or each eps's DBSCAN) on its workers.
    forest : EpsForest, optional
        A forest already built for this ``X`` at an eps >= ``max(eps_values)``.

    Returns
    -------
    DataFrame, one row per eps: ``eps``, ``clusters`` (noise excluded), ``duplicate_clusters``
    (size > 1), ``largest_cluster``, ``deletions`` (one keeper per cluster: non-noise rows
    minus clusters), ``noise`` (only when ``min_samples > 1``), and with a truth table
    ``correct``, ``precision``, ``recall``, ``f1``.

    Notes
    -----
    The pipeline's chain guard (``max_keeper_distance``) can keep extra images in long, thin
    clusters; the counts here are DBSCAN's, an upper bound on the plan's deletions.
    """
    eps = np.sort(np.asarray(eps_values, dtype=np.float64).ravel())
    if eps.size == 0 or not np.all(eps > 0) or not np.all(np.isfinite(eps)):
        raise ConfigError("sweep: eps values must be positive numbers")
    if truth is not None and paths is None:
        raise ConfigError("sweep: scoring against a truth table needs the paths")
    groups = None
    if truth is not None:
        codes: dict[Any, int] = {}
        groups = np.empty(len(paths), np.int64)  # type: ignore[arg-type]
        unlabelled = 0
        for r, p in enumerate(paths):  # type: ignore[arg-type]
            if p in truth:
                groups[r] = codes.setdefault(("g", truth[p]), len(codes))
            else:
                groups[r] = codes.setdefault(("u", r), len(codes))
                unlabelled += 1
        if unlabelled:
            log.warning(
                "sweep: %d of %d paths are not in the truth table; each counts as a "
                "group of its own",
                unlabelled,
                len(groups),
            )
    if min_samples == 1 and forest is None:
        forest = eps_forest(X, float(eps[-1]), metric=metric, client=client)
    rows = []
    with stage("sweep", total=len(eps), unit="eps values") as st:
        for e in eps:
            if min_samples == 1:
                labels = forest.labels(float(e))  # type: ignore[union-attr]
            else:
                labels = dbscan(X, float(e), min_samples=min_samples, metric=metric, client=client)[
                    1
                ]
            member = labels >= 0
            sizes = np.bincount(labels[member]) if member.any() else np.zeros(0, np.int64)
            row: dict[str, Any] = {
                "eps": float(e),
                "clusters": len(sizes),
                "duplicate_clusters": int((sizes > 1).sum()),
                "largest_cluster": int(sizes.max()) if len(sizes) else 0,
                "deletions": int(member.sum()) - len(sizes),
            }
            if min_samples > 1:
                row["noise"] = int((~member).sum())
            if groups is not None:
                sc = deletion_scores(labels, paths, groups, keep=keep)  # type: ignore[arg-type]
                row.update({k: sc[k] for k in ("correct", "precision", "recall", "f1")})
            rows.append(row)
            st.advance()
    return pd.DataFrame(rows)


def k_distance(
    X: np.ndarray,
    k: int = 1,
    *,
    metric: str = "euclidean",
    sample: int | None = K_SAMPLE,
    seed: int = 0,
) -> np.ndarray:
    """Sorted (ascending) distance of each point to its k-th nearest other point.

    Parameters
    ----------
    X : ndarray, shape (n, d)
    k : int
        Which neighbour (1 = the nearest other point: the one that matters for
        ``min_samples=1``; use ``min_samples`` otherwise).
    sample : int or None
        Query at most this many random points (against all of ``X``); ``None`` = all.

    Returns
    -------
    ndarray of float64, shape (min(n, sample),)
    """
    from sklearn.neighbors import NearestNeighbors

    X = np.asarray(X)
    n = len(X)
    if n < 2:
        return np.zeros(0)
    k = max(1, min(int(k), n - 1))
    rows = np.arange(n)
    if sample is not None and n > sample:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))
    nn = NearestNeighbors(n_neighbors=k + 1, metric=metric).fit(X)
    dist, _ = nn.kneighbors(X[rows])  # column 0 is the point itself (or an exact copy)
    return np.sort(dist[:, k].astype(np.float64))


def read_truth(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Read a truth CSV with columns ``path`` and ``group`` into ``{path: group}``."""
    try:
        raw = storage.read_url(url, storage_options)
    except FileNotFoundError:
        raise InputError(f"{url}: truth file not found") from None
    try:
        df = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
    except Exception as exc:
        raise InputError(f"{url}: not a readable CSV ({one_line(exc)})") from None
    if not {"path", "group"} <= set(df.columns):
        raise InputError(
            f"{url}: needs columns 'path' and 'group', has {', '.join(map(str, df.columns))}"
        )
    dup = df["path"].duplicated()
    if dup.any():
        r = int(np.flatnonzero(dup.to_numpy())[0])
        raise InputError(f"{url}: row {r + 2}: path {df['path'].iloc[r]!r} listed twice")
    return dict(zip(df["path"], df["group"], strict=True))


# -- outputs -------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    """What :func:`write_sweep` produced: the table and the files (URLs) it wrote."""

    table: pd.DataFrame
    files: dict[str, str] = field(default_factory=dict)
    pairs_eps: float | None = None

    def summary_entry(self) -> dict[str, Any]:
        """The ``sweep`` entry of ``summary.json``: file names and the eps range."""
        return {
            **{k: v.rsplit("/", 1)[-1] for k, v in self.files.items()},
            "eps_min": float(self.table["eps"].min()),
            "eps_max": float(self.table["eps"].max()),
            "steps": len(self.table),
            "pairs_eps": self.pairs_eps,
        }

    def format_table(self) -> str:
        """The table as aligned text for the terminal."""
        df = self.table.copy()
        for c in ("precision", "recall", "f1"):
            if c in df:
                df[c] = df[c].map(lambda v: "-" if pd.isna(v) else f"{v:.3f}")
        df["eps"] = df["eps"].map(lambda v: f"{v:.4g}")
        return df.to_string(index=False)


def write_sweep(
    paths: Sequence[str] | np.ndarray,
    X: np.ndarray,
    out: str,
    *,
    eps_values: Sequence[float] | np.ndarray,
    metric: str = "euclidean",
    min_samples: int = 1,
    k: int | None = None,
    truth: Mapping[str, Any] | None = None,
    keep: str = "first-path",
    pairs_eps: float | None = None,
    n_pairs: int = 12,
    store: storage.Store | None = None,
    storage_options: Mapping[str, Any] | None = None,
    client: Any = None,
) -> SweepResult:
    """Sweep ``eps_values`` over ``X`` and write the CSV, plots and pairs page into ``out``.

    Parameters
    ----------
    paths, X : the features (``X`` shape (n, d)).
    out : str
        Folder or URL for ``sweep.csv``, ``sweep.png``, ``k-distance.png``, ``pairs.html``.
    eps_values : sequence of float
    metric, min_samples, truth, keep : see :func:`sweep`.
    k : int, optional
        Neighbour rank of the k-distance plot (default ``min_samples``).
    pairs_eps : float, optional
        The eps whose neighbouring pairs are shown (default: the middle of the sweep). The
        forest is built up to ``max(max(eps_values), 1.5 * pairs_eps)`` so pairs just outside
        exist. ``pairs.html`` needs ``store`` (where the images are) and ``min_samples == 1``.
    n_pairs : int
        Pairs shown on each side of ``pairs_eps``.
    store : Store, optional
        Image root for the pairs page thumbnails.
    storage_options : mapping, optional
        fsspec options for ``out``.
    client : distributed.Client, optional

    Returns
    -------
    SweepResult
    """
    paths = np.asarray(paths, dtype=object)
    X = np.asarray(X)
    if len(paths) != len(X):
        raise InputError(f"sweep: {len(paths)} paths for {len(X)} feature rows")
    eps = np.sort(np.asarray(eps_values, dtype=np.float64).ravel())
    if eps.size == 0:
        raise ConfigError("sweep: no eps values")
    if pairs_eps is None:
        pairs_eps = float(eps[len(eps) // 2])
    forest = None
    if min_samples == 1:
        top = max(float(eps[-1]), 1.5 * pairs_eps)
        forest = eps_forest(X, top, metric=metric, client=client)
    table = sweep(
        X,
        eps,
        metric=metric,
        min_samples=min_samples,
        paths=paths,
        truth=truth,
        keep=keep,
        client=client,
        forest=forest,
    )
    options = dict(storage_options or {})
    files: dict[str, str] = {}

    def put(key: str, name: str, data: bytes) -> None:
        url = storage.join_url(out, name)
        storage.write_url(url, data, options)
        files[key] = url

    put("csv", "sweep.csv", table.to_csv(index=False).encode())
    put("plot", "sweep.png", _sweep_png(table, pairs_eps))
    kd = k_distance(X, k or min_samples, metric=metric)
    put("k_distance", "k-distance.png", _kdist_png(kd, k or min_samples, eps, pairs_eps))
    if forest is not None and store is not None:
        inside, outside = forest.pairs_near(pairs_eps, n_pairs)
        put(
            "pairs",
            "pairs.html",
            _pairs_html(paths, inside, outside, pairs_eps, metric, store, client).encode(),
        )
    elif store is None:
        log.info("sweep: no image root given, so no pairs.html")
    result = SweepResult(table, files, pairs_eps)
    log.info(
        "sweep: %d eps values from %g to %g -> %s",
        len(table),
        eps[0],
        eps[-1],
        out,
        extra={"event": "sweep_written", "files": sorted(files)},
    )
    return result


def run_sweep(
    features: Sequence[str],
    *,
    out: str,
    store: storage.Store | None = None,
    eps_values: Sequence[float] | None = None,
    eps_min: float | None = None,
    eps_max: float | None = None,
    steps: int = 20,
    metric: str = "euclidean",
    min_samples: int = 1,
    k: int | None = None,
    truth: str | None = None,
    keep: str = "first-path",
    pairs_eps: float | None = None,
    n_pairs: int = 12,
    storage_options: Mapping[str, Any] | None = None,
    allow_pickle: bool = False,
    client: Any = None,
) -> SweepResult:
    """Load features (:func:`dedup_batch.load.load_features`) and :func:`write_sweep` them.

    The eps values are ``eps_values`` if given, else :func:`eps_range` ``(eps_min, eps_max,
    steps)``. ``truth`` is the URL of a ``path,group`` CSV (read with ``storage_options``).
    Features load under ``store``'s root (required: paths are checked against it).
    """
    from .load import load_features  # the load stage; imported late: a sibling module

    if eps_values is None:
        if eps_min is None or eps_max is None:
            raise ConfigError("sweep: give --eps-min and --eps-max (or a list of eps values)")
        eps_values = eps_range(eps_min, eps_max, steps)
    if store is None:
        raise ConfigError("sweep: 'root' is required: pass --root or set it in --config")
    feats = load_features(
        list(features),
        store=store,
        storage_options=storage_options,
        allow_pickle=allow_pickle,
        client=client,
    )
    truth_map = read_truth(truth, storage_options) if truth else None
    return write_sweep(
        feats.paths,
        feats.X,
        out,
        eps_values=eps_values,
        metric=metric,
        min_samples=min_samples,
        k=k,
        truth=truth_map,
        keep=keep,
        pairs_eps=pairs_eps,
        n_pairs=n_pairs,
        store=store,
        storage_options=storage_options,
        client=client,
    )


# -- plots and the pairs page --------------------------------------------------------------------
def _sweep_png(table: pd.DataFrame, mark: float | None) -> bytes:
    from .report import _figure, _png

    scored = "f1" in table
    fig = _figure(7.0, 5.4 if scored else 3.2)
    ax = fig.add_subplot(211 if scored else 111)
    ax.plot(table["eps"], table["deletions"], "o-", color="#cf222e", ms=3, label="deletions")
    ax.set_ylabel("deletions", color="#cf222e")
    ax2 = ax.twinx()
    ax2.plot(
        table["eps"],
        table["duplicate_clusters"],
        "s--",
        color="#0969da",
        ms=3,
        label="clusters with duplicates",
    )
    ax2.set_ylabel("clusters with duplicates", color="#0969da")
    ax.set_xlabel("eps")
    ax.set_title("Deletions and duplicate clusters against eps", fontsize=10)
    if mark is not None:
        ax.axvline(mark, color="#1f2328", ls=":", lw=1)
    if scored:
        bx = fig.add_subplot(212, sharex=ax)
        for col, colour in (("precision", "#1a7f37"), ("recall", "#8250df"), ("f1", "#1f2328")):
            bx.plot(table["eps"], table[col], "o-", ms=3, color=colour, label=col)
        bx.set_ylim(-0.02, 1.02)
        bx.set_xlabel("eps")
        bx.legend(fontsize=8, loc="lower left")
        bx.set_title("Deletions against the truth table", fontsize=10)
        if mark is not None:
            bx.axvline(mark, color="#1f2328", ls=":", lw=1)
    return _png(fig)


def _kdist_png(kd: np.ndarray, k: int, eps: np.ndarray, mark: float | None) -> bytes:
    from .report import _figure, _png

    fig = _figure(7.0, 3.2)
    ax = fig.add_subplot()
    if len(kd):
        ax.plot(np.linspace(0, 100, len(kd)), kd, color="#0969da", lw=1.5)
    ax.axhspan(float(eps[0]), float(eps[-1]), color="#bf8700", alpha=0.12, label="swept eps")
    if mark is not None:
        ax.axhline(mark, color="#1f2328", ls=":", lw=1, label=f"eps {mark:.4g}")
    ax.set_xlabel("points, sorted (%)")
    ax.set_ylabel(f"distance to neighbour #{k}")
    ax.set_title(f"k-distance plot (k={k}): near-duplicates sit left of the knee", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


def _pairs_html(
    paths: np.ndarray,
    inside: pd.DataFrame,
    outside: pd.DataFrame,
    eps: float,
    metric: str,
    store: storage.Store,
    client: Any,
) -> str:
    from .report import make_thumbnails, render

    want = [str(paths[r]) for df in (inside, outside) for r in (*df["a"], *df["b"])]
    thumbs = make_thumbnails(store, want, client=client, progress="pairs")

    def pairs(df: pd.DataFrame) -> list[dict[str, Any]]:
        return [
            {
                "d": f"{row.distance:.5g}",
                "pct": f"{100 * row.distance / eps:.0f}",
                "paths": (str(paths[row.a]), str(paths[row.b])),
            }
            for row in df.itertuples(index=False)
        ]

    blocks = [
        {
            "title": "Just inside eps (merged: their groups become one cluster)",
            "cls": "keep",
            "empty": "no merges at or below this eps",
            "pairs": pairs(inside),
        },
        {
            "title": "Just outside eps (not merged)",
            "cls": "del",
            "empty": "no merges within 1.5 x eps above it",
            "pairs": pairs(outside),
        },
    ]
    return render(
        "pairs.html.j2",
        title=f"dedup-batch: pairs near eps {eps:.5g}",
        eps_text=f"{eps:.5g}",
        root=store.root,
        metric=metric,
        blocks=blocks,
        thumbs=thumbs,
    )
