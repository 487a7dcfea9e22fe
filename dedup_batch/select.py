"""Select: one keeper per cluster, by a keep policy, with a chain guard.

A keep policy is a list of sort keys: the members of a cluster are sorted by them and the first
is kept. Named policies are aliases of key lists (:data:`POLICIES`); the default, ``original``,
prefers the image most likely to be the original a copy was made from: the most pixels, then a
name without a copy marker (:data:`COPY_MARKERS`), then the oldest modification time, then the
largest file, then the first path. A value that is unknown for a member (an image whose header
could not be read, a backend that gives no modification time) sorts last for that key, whatever
its direction, so the next key decides. Ties always end at the path, never at input order.

DBSCAN with ``min_samples=1`` chains: a cluster is a connected component of the eps-graph, so
two of its members can be far apart. Deleting everything but one keeper would then delete images
that do not look like the keeper at all. The chain guard (``max_keeper_distance``) keeps choosing
further keepers, with the same policy, until every deleted member lies within that distance of
its own keeper.
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .errors import ConfigError

# The keep policies are defined in .policies (no numpy/pandas: the CLI's --help and the job
# spec check them without loading the select stage); re-exported here for select's callers.
from .policies import (
    CENTROID,
    DEFAULT_POLICY,
    KEYS,
    POLICIES,
    KeepPolicy,
    parse_policy,
    policy_problem,
)

log = logging.getLogger(__name__)

__all__ = [
    "COPY_MARKERS",
    "KEYS",
    "PLAN_COLUMNS",
    "POLICIES",
    "KeepPolicy",
    "check_policy_inputs",
    "copy_marker",
    "parse_policy",
    "policy_problem",
    "select_keepers",
]

PLAN_COLUMNS = (
    "path",
    "cluster",
    "keep",
    "keeper",
    "keep_reason",
    "distance_to_keeper",
    "size",
    "width",
    "height",
    "mtime",
    "etag",
    "exists",
)

#: Copy markers, as (label, pattern). Matched case-insensitively on the file name without its
#: extension (``IMG_1 (1)`` of ``2019/IMG_1 (1).jpg``), never on folders: an album called
#: ``copy of phone`` marks nothing. Each is what a common tool appends when it copies a file.
COPY_MARKERS: tuple[tuple[str, str], ...] = (
    # browsers and macOS/Windows "keep both": IMG_1 (1), photo(2); 1-3 digits so that a year
    # in brackets, "Holiday (2019)", is not a marker
    ("(N)", r"\s?\(\d{1,3}\)$"),
    # Windows Explorer: "x - Copy", "x - Copy (2)"
    (" - Copy", r"\s-\scopy(\s\(\d+\))?$"),
    # macOS Finder "x copy", "x copy 2"; "x_copy", "x-copy", "x_copy2"
    (" copy", r"[\s_-]copy(\s?\d+)?$"),
    # Windows XP, Google Drive: "Copy of x", "Copy (2) of x"
    ("Copy of ", r"^copy(\s\(\d+\))?\sof\s"),
    # "x (copy)", "x (copy 2)", Dropbox "x (conflicted copy 2024-01-01)"
    ("(copy)", r"\([^)]*\bcopy\b[^)]*\)$"),
    # Google Photos "IMG_1-edited", Lightroom "IMG_1-Edit", "IMG_1-Edit-2", "x_edited", "x edited"
    ("-edited", r"[\s_-]edit(ed)?([\s-]\d+)?$"),
    ("(edited)", r"\(edited\)$"),
    # WordPress and resizing tools: "x-scaled", "x-1024x768", "x_resized", "x (small)"
    ("-scaled", r"-scaled$"),
    ("-WxH", r"-\d+x\d+$"),
    ("_resized", r"[\s_-]resized$"),
)
_MARKER_RES = tuple((label, re.compile(rx, re.IGNORECASE)) for label, rx in COPY_MARKERS)


def copy_marker(path: str) -> str | None:
    """The first copy marker in the file name of ``path`` (see :data:`COPY_MARKERS`), or None.

    Only the last path segment is looked at, without its extension; matching ignores case.

    >>> copy_marker("2019/IMG_1 (1).jpg"), copy_marker("copy of/IMG_1.jpg")
    ('(N)', None)
    """
    name = path.rsplit("/", 1)[-1]
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    for label, rx in _MARKER_RES:
        if rx.search(stem):
            return label
    return None


def select_keepers(
    paths: Sequence[str] | np.ndarray,
    X: np.ndarray,
    labels: np.ndarray,
    objects: pd.DataFrame | None = None,
    *,
    policy: str | KeepPolicy = DEFAULT_POLICY,
    protected: np.ndarray | None = None,
    max_keeper_distance: float | None = None,
    metric: str = "euclidean",
    whole: bool = True,
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
        ``mtime`` (seconds), ``etag``, ``exists`` (bool), optionally ``kind`` (``"file"`` or
        ``"link"``) and, when known, ``width`` and ``height`` (pixels, from the image header).
        Without it every object is taken as existing and observed, with unknown size, time and
        pixels.
    policy : str or KeepPolicy, default="original"
        A named policy (:data:`POLICIES`) or a key list such as ``"-pixels,mtime,path"``
        (see :func:`parse_policy`). Ties are broken by path, never by input order.
    protected : ndarray of bool, shape (n,), optional
        Protected rows are never deleted: each is a keeper, and they are chosen before any
        other member.
    max_keeper_distance : float or None, default=None
        Chain guard. ``None`` keeps one keeper per cluster (the seed notebook's behaviour).
    metric : {"euclidean", "cosine"}, default="euclidean"
    whole : bool, default=True
        The rows are the whole input: check here that the policy's first key is known (see
        :func:`check_policy_inputs`). False for a partition holding whole clusters (the Dask
        workers' select, :mod:`dedup_batch.plan_dask`), whose caller checked every row: each
        cluster is decided from its own rows only, so a partition's plan is the whole plan's
        rows for those clusters.

    Returns
    -------
    DataFrame with :data:`PLAN_COLUMNS`, sorted by cluster, then path. ``keep_reason`` says
    why each keeper was kept: the first key on which it beat the runner-up of its cluster
    (``most pixels (4032×3024 vs 2016×1512)``, ``name without copy marker (vs 'x (1).jpg')``,
    ``oldest (2019-06-01 vs 2024-02-03)``), or ``protected``, ``only member``, ``noise (never
    deleted)``; it is empty for the rows to delete.

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
    size m with k keepers costs O(m·k·d) time and O(m) memory beyond its vectors. Sorting by the
    keys is one global ``lexsort``: O(n log n).
    """
    pol = policy if isinstance(policy, KeepPolicy) else parse_policy(policy)
    if whole:
        log.info("keep policy %s: %s", pol.text, pol.describe())
    paths = np.asarray(paths, dtype=object)
    labels = np.asarray(labels)
    n = len(paths)
    if X.shape[0] != n or labels.shape[0] != n:
        raise ValueError(f"paths ({n}), X ({X.shape[0]}) and labels ({labels.shape[0]}) differ")
    given, objects = objects, _objects_frame(objects, n)
    protected = np.zeros(n, dtype=bool) if protected is None else np.asarray(protected, bool)
    if whole:
        check_policy_inputs(pol, objects, labels)

    keeper_idx = np.arange(n)
    distance = np.zeros(n, dtype=np.float64)
    # Group rows by label; singletons and noise are their own keepers.
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    ends = np.r_[starts[1:], n]
    exists = objects["exists"].to_numpy(dtype=bool)
    # Without a listing the caller vouches for every object (apply still deletes only rows
    # whose size and version the plan recorded).
    observed = np.ones(n, dtype=bool) if given is None else _observed(objects)
    candidate = observed & (objects["kind"].to_numpy(dtype=object) == "file")
    values = _key_values(pol, paths, objects, labels)
    rank = _policy_rank(pol, values)
    ctx = _Context(pol, paths, values, objects, _DISTANCES[metric])
    limit = np.inf if max_keeper_distance is None else float(max_keeper_distance)
    reason = np.full(n, "only member", dtype=object)
    reason[labels == -1] = "noise (never deleted)"

    for s, e in zip(starts, ends, strict=True):
        if e - s < 2 or sorted_labels[s] == -1:
            continue
        members = order[s:e]
        k_of, d_of, why = _choose(
            members, X, rank, exists, observed, candidate, protected, ctx, limit
        )
        keeper_idx[members] = k_of
        distance[members] = d_of
        reason[members] = why

    keep = keeper_idx == np.arange(n)
    reason[~keep] = ""
    plan = pd.DataFrame(
        {
            "path": pd.array(paths, dtype="string"),
            "cluster": labels.astype("int64"),
            "keep": keep,
            "keeper": pd.array(paths[keeper_idx], dtype="string"),
            "keep_reason": pd.array(reason, dtype="string"),
            "distance_to_keeper": distance,
            "size": pd.array(objects["size"].to_numpy(), dtype="Int64"),
            "width": pd.array(objects["width"].to_numpy(), dtype="Int64"),
            "height": pd.array(objects["height"].to_numpy(), dtype="Int64"),
            "mtime": objects["mtime"].to_numpy(dtype="float64", na_value=np.nan),
            "etag": pd.array(objects["etag"].to_numpy(), dtype="string"),
            "exists": exists,
        }
    )
    return plan.sort_values(["cluster", "path"], kind="stable").reset_index(drop=True)


def _objects_frame(objects: pd.DataFrame | None, n: int) -> pd.DataFrame:
    defaults = (
        ("size", pd.NA),
        ("mtime", np.nan),
        ("etag", pd.NA),
        ("exists", True),
        ("kind", "file"),
        ("width", pd.NA),
        ("height", pd.NA),
    )
    if objects is None:
        return pd.DataFrame({col: [default] * n for col, default in defaults}).astype(
            {"size": "Int64", "mtime": "float64", "etag": "string", "exists": bool}
        )
    if len(objects) != n:
        raise ValueError(f"objects has {len(objects)} rows, expected {n}")
    out = objects.reset_index(drop=True)
    for col, default in defaults:
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


def _in_duplicate_cluster(labels: np.ndarray) -> np.ndarray:
    return pd.Series(labels).duplicated(keep=False).to_numpy() & (labels != -1)


def check_policy_inputs(
    policy: str | KeepPolicy, objects: pd.DataFrame, labels: np.ndarray
) -> None:
    """Refuse (:class:`ConfigError`) a policy led by ``size`` or ``mtime`` when the backend
    gave that value for none of the objects in clusters with duplicates.

    ``objects`` (rows aligned with ``labels``, shape (n,)) and ``labels`` are every row of the
    plan: a partition could lack the value where the whole plan has it.
    """
    # A policy led by size or mtime on a backend that gives neither would silently become path
    # order: say so. Later keys (and pixels, which is per image) fall back quietly instead.
    pol = policy if isinstance(policy, KeepPolicy) else parse_policy(policy)
    col = pol.keys[0][0]
    if col not in ("size", "mtime"):
        return
    rows = _in_duplicate_cluster(labels) & objects["exists"].to_numpy(bool)
    if rows.any() and objects.loc[rows, col].isna().all():
        raise ConfigError(
            f"--keep {pol.text} needs the object {col}, which the storage backend did not give "
            f"for any of the {int(rows.sum())} objects in clusters with duplicates; choose "
            f"another policy (e.g. {DEFAULT_POLICY} or first-path)"
        )


def _key_values(
    pol: KeepPolicy, paths: np.ndarray, objects: pd.DataFrame, labels: np.ndarray
) -> dict[str, np.ndarray]:
    """Each key's value per row as float64, NaN where unknown (``path``: its code-point rank)."""
    by_path = np.argsort(paths, kind="stable")  # Python str order = code-point order
    path_rank = np.empty(len(paths), dtype=np.float64)
    path_rank[by_path] = np.arange(len(paths))
    width = objects["width"].to_numpy(dtype="float64", na_value=np.nan)
    height = objects["height"].to_numpy(dtype="float64", na_value=np.nan)
    values = {
        "path": path_rank,
        "size": objects["size"].to_numpy(dtype="float64", na_value=np.nan),
        "mtime": objects["mtime"].to_numpy(dtype="float64", na_value=np.nan),
        "pixels": width * height,
        "copy": np.zeros(len(paths)),
    }
    if "copy" in pol.key_names:  # only rows that can lose to another member need a look
        for i in np.flatnonzero(_in_duplicate_cluster(labels)):
            values["copy"][i] = copy_marker(paths[i]) is not None
    return values


def _policy_rank(pol: KeepPolicy, values: dict[str, np.ndarray]) -> np.ndarray:
    """A global rank per row from the policy's keys (lower is better; unknown values last)."""
    cols: list[np.ndarray] = []
    for name, desc in reversed([k for k in pol.keys if k[0] != CENTROID]):
        v = values[name]
        unknown = np.isnan(v)
        cols.append(np.where(unknown, 0.0, -v if desc else v))
        cols.append(unknown)  # more significant than the value: unknown sorts last
    order = np.lexsort(cols)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


@dataclass
class _Context:
    policy: KeepPolicy
    paths: np.ndarray
    values: dict[str, np.ndarray]
    objects: pd.DataFrame
    dist: Callable[[np.ndarray, np.ndarray], Any]


def _choose(
    members: np.ndarray,
    X: np.ndarray,
    rank: np.ndarray,
    exists: np.ndarray,
    observed: np.ndarray,
    candidate: np.ndarray,
    protected: np.ndarray,
    ctx: _Context,
    limit: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keepers of one cluster: (keeper row index, distance to it, keep reason) per member.

    Keepers come from ``candidate`` rows; only ``observed`` rows within ``limit`` of a keeper
    are assigned to it (deleted); every other member keeps itself.
    """
    Xm = np.asarray(X[members], dtype=np.float64)
    m = len(members)
    best_d = np.full(m, np.inf)
    best_k = np.full(m, -1, dtype=np.int64)
    is_keeper = np.zeros(m, dtype=bool)
    why = np.full(m, "", dtype=object)

    def add_keeper(j: int, reason: str) -> None:
        is_keeper[j] = True
        why[j] = reason
        d = ctx.dist(Xm, Xm[j])
        closer = d < best_d  # strict: on equal distance the earlier keeper stays
        best_d[closer] = d[closer]
        best_k[closer] = j

    # Protected members are never deleted, so each is a keeper; chosen first, in policy order.
    prot = np.flatnonzero(protected[members] & candidate[members])
    for j in prot[np.argsort(rank[members[prot]], kind="stable")]:
        add_keeper(int(j), "protected")
    deletable = observed[members] & ~protected[members]
    eligible = candidate[members]
    while True:
        uncovered = deletable & eligible & ~is_keeper & ((best_k < 0) | (best_d > limit))
        if not uncovered.any():
            break
        idx = np.flatnonzero(uncovered)
        guard = ""
        if is_keeper.any():  # the chain guard: these members are too far from every keeper
            guard = f"chain guard: {best_d[idx].min():.4g} from the nearest keeper > {limit:.4g}; "
        j, reason = _pick(idx, Xm, members, rank, ctx, first=not guard)
        add_keeper(j, guard + reason)
    # Kept as their own keepers: keepers, and every member that may not be deleted or that no
    # keeper covers (missing or unobserved rows, links far from every keeper, protected links).
    own = is_keeper | ~deletable | (best_k < 0) | (best_d > limit)
    rows = members
    why[own & ~is_keeper & protected[rows]] = "protected"
    why[own & ~is_keeper & ~protected[rows] & ~exists[rows]] = "not found (never deleted)"
    why[own & ~is_keeper & ~protected[rows] & exists[rows] & ~observed[rows]] = (
        "not observed at plan time (never deleted)"
    )
    why[own & ~is_keeper & deletable] = "no keeper within reach (never deleted)"
    best_d[own] = 0.0
    best_k[own] = np.flatnonzero(own)
    return members[best_k], best_d, why


def _pick(
    idx: np.ndarray,
    Xm: np.ndarray,
    members: np.ndarray,
    rank: np.ndarray,
    ctx: _Context,
    *,
    first: bool,
) -> tuple[int, str]:
    """The best of the candidates ``idx`` (positions in ``members``) and why it won.

    ``first``: this is the cluster's first keeper by the policy (not one the chain guard adds).
    """
    d = None
    if ctx.policy.centroid:
        d = ctx.dist(Xm[idx], Xm[idx].mean(axis=0))
        order = np.lexsort((rank[members[idx]], d))  # nearest the mean; ties by the other keys
    else:
        order = np.argsort(rank[members[idx]], kind="stable")
    w = int(order[0])
    if len(idx) == 1:  # the others are missing, unobserved, links or (chain guard) covered
        return int(idx[w]), "only member that can be kept" if first else "only candidate"
    r = int(order[1])
    dw_dr = None if d is None else (float(d[w]), float(d[r]))
    return int(idx[w]), _reason(int(members[idx[w]]), int(members[idx[r]]), ctx, dw_dr)


def _reason(w: int, r: int, ctx: _Context, d: tuple[float, float] | None) -> str:
    """The first key on which row ``w`` (the keeper) beats row ``r`` (the runner-up), in words."""
    for name, desc in ctx.policy.keys:
        if name == CENTROID:
            if d is not None and d[0] != d[1]:
                return f"nearest the cluster's mean vector ({d[0]:.4g} vs {d[1]:.4g})"
            continue
        vw, vr = ctx.values[name][w], ctx.values[name][r]
        if vw == vr or (np.isnan(vw) and np.isnan(vr)):
            continue
        return KEYS[name][desc] + _detail(name, w, r, ctx)
    return KEYS["path"][0]  # unreachable: paths are unique


def _detail(name: str, w: int, r: int, ctx: _Context) -> str:
    obj = ctx.objects
    if name == "pixels":
        return f" ({_wxh(obj, w)} vs {_wxh(obj, r)})"
    if name == "copy":
        loser = w if ctx.values["copy"][w] else r
        return f" (vs '{str(ctx.paths[loser]).rsplit('/', 1)[-1]}')" if loser == r else ""
    if name == "mtime":
        a, b = ctx.values["mtime"][w], ctx.values["mtime"][r]
        return f" ({_when(a, b)} vs {_when(b, a)})"
    if name == "size":
        a, b = ctx.values["size"][w], ctx.values["size"][r]
        return f" ({_int_or_unknown(a)} vs {_int_or_unknown(b)} bytes)"
    return " (every other key ties)" if len(ctx.policy.keys) > 1 else ""


def _wxh(obj: pd.DataFrame, i: int) -> str:
    w, h = obj["width"].iloc[i], obj["height"].iloc[i]
    return "unknown" if pd.isna(w) or pd.isna(h) else f"{int(w)}×{int(h)}"


def _int_or_unknown(v: float) -> str:
    return "unknown" if np.isnan(v) else f"{int(v):,}"


def _when(t: float, other: float) -> str:
    """``t`` as a UTC date, with the time when ``other`` falls on the same day."""
    if np.isnan(t):
        return "unknown"
    a = _dt.datetime.fromtimestamp(t, _dt.timezone.utc)
    same_day = not np.isnan(other) and (
        a.date() == _dt.datetime.fromtimestamp(other, _dt.timezone.utc).date()
    )
    return a.strftime("%Y-%m-%d %H:%M:%S UTC" if same_day else "%Y-%m-%d")


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
