"""Select: one keeper per cluster, by a named policy, with a chain guard.

DBSCAN with ``min_samples=1`` chains: a cluster is a connected component of the eps-graph, so
two of its members can be far apart. Deleting everything but one keeper would then delete images
that do not look like the keeper at all. The chain guard (``max_keeper_distance``) keeps choosing
further keepers, with the same policy, until every deleted member lies within that distance of
its own keeper.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .errors import ConfigError

__all__ = ["PLAN_COLUMNS", "POLICIES", "select_keepers"]

PLAN_COLUMNS = (
    "path",
    "cluster",
    "keep",
    "keeper",
    "distance_to_keeper",
    "size",
    "mtime",
    "etag",
    "exists",
)

#: policy -> (what it needs, human description)
POLICIES: dict[str, str] = {
    "first-path": "smallest path (code-point order)",
    "last-path": "largest path (the seed notebook's choice)",
    "largest-size": "largest object in bytes",
    "smallest-size": "smallest object in bytes",
    "newest": "most recently modified object",
    "oldest": "least recently modified object",
    "centroid": "member nearest the mean vector of the (not yet covered) members",
}


def select_keepers(
    paths: Sequence[str] | np.ndarray,
    X: np.ndarray,
    labels: np.ndarray,
    objects: pd.DataFrame | None = None,
    *,
    policy: str = "first-path",
    protected: np.ndarray | None = None,
    max_keeper_distance: float | None = None,
    metric: str = "euclidean",
) -> pd.DataFrame:
    """Choose the keepers of every cluster and build the plan.

    Parameters
    ----------
    paths : sequence of str, shape (n,)
        Feature paths, unique.
    X : ndarray, shape (n, d)
        The feature vectors (any float dtype; distances are computed in float64).
    labels : ndarray of int, shape (n,)
        DBSCAN labels; -1 is noise (never deleted).
    objects : DataFrame, optional
        Indexed by position ``0..n-1`` (aligned with ``paths``), columns ``size`` (bytes),
        ``mtime`` (seconds), ``etag``, ``exists`` (bool) and optionally ``kind`` (``"file"``
        or ``"link"``). Without it every object is taken as existing and observed, with
        unknown size and time.
    policy : str, default="first-path"
        One of :data:`POLICIES`. Ties are broken by path, never by input order.
    protected : ndarray of bool, shape (n,), optional
        Protected rows are never deleted: each is a keeper, and they are chosen before any
        other member.
    max_keeper_distance : float or None, default=None
        Chain guard. ``None`` keeps one keeper per cluster (the seed notebook's behaviour).
    metric : {"euclidean", "cosine"}, default="euclidean"

    Returns
    -------
    DataFrame with :data:`PLAN_COLUMNS`, sorted by cluster, then path.

    Notes
    -----
    Only what was seen is deleted: a row is deleted only if its object was *observed* at plan
    time (it exists, with a size and an ETag or a modification time, so that apply can tell
    whether it changed). Every other row (missing, or seen without those) is kept as its own
    keeper and never deleted. Keepers are observed regular files: a symbolic link (``kind``
    ``"link"``) may be deleted (the link only) but is never a keeper, since deleting the file
    it points to would leave a keeper with no content. Every deleted row lies within
    ``max_keeper_distance`` of its keeper; a row that no eligible keeper covers is kept.

    Singletons (most rows in a real bucket) are handled in one vectorised pass. Each cluster of
    size m with k keepers costs O(m·k·d) time and O(m) memory beyond its vectors.
    """
    if policy not in POLICIES:
        raise ConfigError(f"unknown keep policy {policy!r}; choose one of {', '.join(POLICIES)}")
    paths = np.asarray(paths, dtype=object)
    labels = np.asarray(labels)
    n = len(paths)
    if X.shape[0] != n or labels.shape[0] != n:
        raise ValueError(f"paths ({n}), X ({X.shape[0]}) and labels ({labels.shape[0]}) differ")
    given, objects = objects, _objects_frame(objects, n)
    protected = np.zeros(n, dtype=bool) if protected is None else np.asarray(protected, bool)
    _check_policy_inputs(policy, objects, labels)

    keeper_idx = np.arange(n)
    distance = np.zeros(n, dtype=np.float64)
    # Group rows by label; singletons and noise are their own keepers.
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    ends = np.r_[starts[1:], n]
    sizes = objects["size"].to_numpy(dtype="float64", na_value=np.nan)
    mtimes = objects["mtime"].to_numpy(dtype="float64", na_value=np.nan)
    exists = objects["exists"].to_numpy(dtype=bool)
    # Without a listing the caller vouches for every object (apply still deletes only rows
    # whose size and version the plan recorded).
    observed = np.ones(n, dtype=bool) if given is None else _observed(objects)
    candidate = observed & (objects["kind"].to_numpy(dtype=object) == "file")
    rank = _policy_rank(policy, paths, sizes, mtimes)
    dist = _DISTANCES[metric]
    limit = np.inf if max_keeper_distance is None else float(max_keeper_distance)

    for s, e in zip(starts, ends, strict=True):
        if e - s < 2 or sorted_labels[s] == -1:
            continue
        members = order[s:e]
        k_of, d_of = _choose(members, X, rank, observed, candidate, protected, policy, dist, limit)
        keeper_idx[members] = k_of
        distance[members] = d_of

    keep = keeper_idx == np.arange(n)
    plan = pd.DataFrame(
        {
            "path": pd.array(paths, dtype="string"),
            "cluster": labels.astype("int64"),
            "keep": keep,
            "keeper": pd.array(paths[keeper_idx], dtype="string"),
            "distance_to_keeper": distance,
            "size": pd.array(objects["size"].to_numpy(), dtype="Int64"),
            "mtime": mtimes,
            "etag": pd.array(objects["etag"].to_numpy(), dtype="string"),
            "exists": exists,
        }
    )
    return plan.sort_values(["cluster", "path"], kind="stable").reset_index(drop=True)


def _objects_frame(objects: pd.DataFrame | None, n: int) -> pd.DataFrame:
    if objects is None:
        return pd.DataFrame(
            {
                "size": pd.array([pd.NA] * n, dtype="Int64"),
                "mtime": np.full(n, np.nan),
                "etag": pd.array([pd.NA] * n, dtype="string"),
                "exists": np.ones(n, dtype=bool),
                "kind": np.full(n, "file", dtype=object),
            }
        )
    if len(objects) != n:
        raise ValueError(f"objects has {len(objects)} rows, expected {n}")
    out = objects.reset_index(drop=True)
    for col, default in (
        ("size", pd.NA),
        ("mtime", np.nan),
        ("etag", pd.NA),
        ("exists", True),
        ("kind", "file"),
    ):
        if col not in out:
            out[col] = default
    out["kind"] = out["kind"].fillna("file")
    return out


def _observed(objects: pd.DataFrame) -> np.ndarray:
    """Rows whose object was seen at plan time well enough to tell later if it changed."""
    exists = objects["exists"].to_numpy(dtype=bool)
    size = objects["size"].notna().to_numpy(dtype=bool)
    version = objects["etag"].notna().to_numpy(dtype=bool) | objects["mtime"].notna().to_numpy(
        dtype=bool
    )
    return exists & size & version


def _check_policy_inputs(policy: str, objects: pd.DataFrame, labels: np.ndarray) -> None:
    need = {"largest-size": "size", "smallest-size": "size", "newest": "mtime", "oldest": "mtime"}
    col = need.get(policy)
    if col is None:
        return
    in_dup = pd.Series(labels).duplicated(keep=False).to_numpy() & (labels != -1)
    missing = objects.loc[in_dup & objects["exists"].to_numpy(bool), col].isna()
    if missing.any():
        raise ConfigError(
            f"--keep {policy} needs the object {col}, which the storage backend did not give "
            f"for {int(missing.sum())} objects; choose another policy (e.g. first-path)"
        )


def _policy_rank(
    policy: str, paths: np.ndarray, sizes: np.ndarray, mtimes: np.ndarray
) -> np.ndarray:
    """A global rank per row: lower is better; ties between equal keys broken by path."""
    by_path = np.argsort(paths, kind="stable")  # Python str order = code-point order
    path_rank = np.empty(len(paths), dtype=np.int64)
    path_rank[by_path] = np.arange(len(paths))
    if policy in ("first-path", "centroid"):
        return path_rank
    if policy == "last-path":
        return -path_rank
    key = {"largest-size": -sizes, "smallest-size": sizes, "newest": -mtimes, "oldest": mtimes}
    order = np.lexsort((path_rank, key[policy]))
    rank = np.empty(len(paths), dtype=np.int64)
    rank[order] = np.arange(len(paths))
    return rank


def _choose(
    members: np.ndarray,
    X: np.ndarray,
    rank: np.ndarray,
    observed: np.ndarray,
    candidate: np.ndarray,
    protected: np.ndarray,
    policy: str,
    dist: Callable[[np.ndarray, np.ndarray], Any],
    limit: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Keepers of one cluster: returns (keeper row index, distance to it) for each member.

    Keepers come from ``candidate`` rows; only ``observed`` rows within ``limit`` of a keeper
    are assigned to it (deleted); every other member keeps itself.
    """
    Xm = np.asarray(X[members], dtype=np.float64)
    m = len(members)
    best_d = np.full(m, np.inf)
    best_k = np.full(m, -1, dtype=np.int64)
    is_keeper = np.zeros(m, dtype=bool)

    def add_keeper(j: int) -> None:
        is_keeper[j] = True
        d = dist(Xm, Xm[j])
        closer = d < best_d  # strict: on equal distance the earlier keeper stays
        best_d[closer] = d[closer]
        best_k[closer] = j

    # Protected members are never deleted, so each is a keeper; chosen first, in policy order.
    prot = np.flatnonzero(protected[members] & candidate[members])
    for j in prot[np.argsort(rank[members[prot]], kind="stable")]:
        add_keeper(int(j))
    deletable = observed[members] & ~protected[members]
    eligible = candidate[members]
    while True:
        uncovered = deletable & eligible & ~is_keeper & ((best_k < 0) | (best_d > limit))
        if not uncovered.any():
            break
        add_keeper(_pick(np.flatnonzero(uncovered), Xm, members, rank, policy, dist))
    # Kept as their own keepers: keepers, and every member that may not be deleted or that no
    # keeper covers (missing or unobserved rows, links far from every keeper, protected links).
    own = is_keeper | ~deletable | (best_k < 0) | (best_d > limit)
    best_d[own] = 0.0
    best_k[own] = np.flatnonzero(own)
    return members[best_k], best_d


def _pick(
    idx: np.ndarray,
    Xm: np.ndarray,
    members: np.ndarray,
    rank: np.ndarray,
    policy: str,
    dist: Callable[[np.ndarray, np.ndarray], Any],
) -> int:
    if policy == "centroid":
        d = dist(Xm[idx], Xm[idx].mean(axis=0))
        # nearest the mean; ties by path (rank is path order for centroid)
        return int(idx[np.lexsort((rank[members[idx]], d))[0]])
    return int(idx[np.argmin(rank[members[idx]])])


def _euclidean(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(((A - b) ** 2).sum(axis=1))


def _cosine(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    na = np.linalg.norm(A, axis=1)
    nb = np.linalg.norm(b)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (A @ b) / (na * nb)
    # sklearn treats a zero vector as having cosine similarity 0 with everything
    cos = np.where((na == 0) | (nb == 0), 0.0, cos)
    return np.clip(1.0 - cos, 0.0, 2.0)


_DISTANCES = {"euclidean": _euclidean, "cosine": _cosine}
