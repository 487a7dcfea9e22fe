"""Select on the Dask workers: the plan of a job whose vectors stay on the workers (issue 14).

The rows are grouped by cluster with Dask's own shuffle (``set_index`` on a partition number
with fixed divisions), so that each partition holds whole clusters, and
:func:`dedup_batch.select.select_keepers` (the one implementation of the keep policies and the
chain guard) runs on each partition, on the worker that holds it. Only the vectors of rows in
clusters of two or more travel: a singleton is its own keeper and needs no vector.

A plan of more than :data:`dedup_batch.plandir.PART_ROWS` rows is written by the workers as
the dataset ``plan/part-NNNNN.parquet`` (one part per partition) and never comes to the
client; a smaller one is gathered and written as one ``plan.parquet``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import dask
import numpy as np
import pandas as pd

from . import executor, plandir
from .cluster_dask import ClusteredRows
from .plandir import PlanCounts, PlanDir
from .select import KeepPolicy, check_policy_inputs, parse_policy, select_keepers

__all__ = ["select_on_workers"]

log = logging.getLogger(__name__)

#: The per-row columns of ``objects`` that select reads (see ``select_keepers``).
_OBJECT_COLUMNS = ("size", "mtime", "etag", "exists", "kind", "width", "height")


def select_on_workers(
    X: Any,
    labels: np.ndarray,
    paths: np.ndarray,
    objects: pd.DataFrame,
    protected: np.ndarray,
    *,
    out: PlanDir,
    client: Any,
    policy: str | KeepPolicy,
    max_keeper_distance: float | None,
    metric: str,
) -> tuple[pd.DataFrame | None, PlanCounts]:
    """Choose the keepers on the workers and write the plan.

    Parameters
    ----------
    X : dask.array.Array of shape (n, d)
        The vectors, row blocks on the workers (``load``'s ``DistributedFeatures.X``).
    labels : ndarray of int, shape (n,)
        DBSCAN labels.
    paths : ndarray of str, shape (n,)
    objects : DataFrame
        Rows aligned with ``paths`` (index ``0..n-1``): ``size``, ``mtime``, ``etag``,
        ``exists``, optionally ``kind``, ``width``, ``height`` (see ``select_keepers``).
    protected : ndarray of bool, shape (n,)
    out : PlanDir
        Where the plan goes. Workers write the dataset's parts here, so it must be storage
        they reach (a local folder on one machine, or S3: not ``memory://``).
    client : distributed.Client
    policy, max_keeper_distance, metric
        As ``select_keepers``.

    Returns
    -------
    (plan or None, counts)
        The plan table when it was gathered (at most ``PART_ROWS`` rows, written as
        ``plan.parquet``), else None (written as the dataset); its counts either way.

    Notes
    -----
    Moved between workers: the metadata of every row (~100-200 bytes) and the vectors of the
    rows in clusters of two or more (``4 d`` bytes each), once, by the shuffle. Per worker:
    one partition (at most about ``PART_ROWS`` rows, or ``n / blocks`` for a gathered plan)
    and its clustered vectors. The client holds ``paths``, ``objects`` and ``labels`` (as the
    pipeline already does) and 4 bytes a row for the partition numbers; the plan table only
    when it is gathered.
    """
    import dask.dataframe as dd

    pol = policy if isinstance(policy, KeepPolicy) else parse_policy(policy)
    log.info("keep policy %s: %s", pol.text, pol.describe())
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    check_policy_inputs(pol, objects, labels)  # over every row, as the in-process select
    limit = plandir.PART_ROWS
    dataset = n > limit
    if X.numblocks[1] > 1:
        X = X.rechunk({1: -1})
    n_parts = max(1, math.ceil(n / limit)) if dataset else max(1, X.numblocks[0])
    part = _partitions(labels, n_parts)
    meta = pd.DataFrame(
        {
            "row": np.arange(n, dtype=np.int64),
            "path": pd.array(paths, dtype="string"),
            "cluster": labels,
            "protected": np.asarray(protected, dtype=bool),
            "_part": part,
        }
    )
    for col in _OBJECT_COLUMNS:
        if col in objects:
            meta[col] = objects[col].to_numpy() if col == "kind" else objects[col].array
    rows = dd.from_pandas(meta, npartitions=max(1, X.numblocks[0]), sort=False)
    vectors = _clustered_vectors(X, labels, part)
    divisions = tuple(range(n_parts + 1))  # partition i holds _part i: whole clusters
    rows = rows.set_index("_part", divisions=divisions)
    vectors = vectors.set_index("_part", divisions=divisions)
    if dataset:
        out.start_dataset()
    task = dask.delayed(_select_partition, pure=True)
    kw = {"policy": pol, "max_keeper_distance": max_keeper_distance, "metric": metric}
    tasks = [
        task(r, v, i, out if dataset else None, kw)
        for i, (r, v) in enumerate(zip(rows.to_delayed(), vectors.to_delayed(), strict=True))
    ]
    results = executor.gather(client, client.compute(tasks), what="select (on the workers)")
    counts = PlanCounts()
    for c, _ in results:
        counts += c
    if dataset:
        out.finish_dataset([entry for _, entry in results])
        log.info("select: %d rows in %d parts, written by the workers", n, n_parts)
        return None, counts
    frames = [f for _, f in results]
    table = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    table = table.sort_values(["cluster", "path"], kind="stable").reset_index(drop=True)
    return table, counts


def _partitions(labels: np.ndarray, n_parts: int) -> np.ndarray:
    """The partition of each row (int32): clusters in label order, cut into ranges of about
    equal row counts (so each partition holds a range of clusters); noise rows, which stand
    alone, spread evenly by position."""
    n = len(labels)
    part = np.empty(n, dtype=np.int32)
    clustered = labels >= 0
    sizes = np.bincount(labels[clustered]) if clustered.any() else np.zeros(0, np.int64)
    total = max(1, int(sizes.sum()))
    first_row = np.cumsum(sizes) - sizes  # rows before each cluster, in label order
    of_cluster = np.minimum(first_row * n_parts // total, n_parts - 1)
    part[clustered] = of_cluster[labels[clustered]]
    noise = np.flatnonzero(~clustered)
    part[noise] = noise * n_parts // max(1, n)
    return part


def _clustered_vectors(X: Any, labels: np.ndarray, part: np.ndarray) -> Any:
    """A dask dataframe of the vectors of rows in clusters of two or more (``row``, ``_part``,
    ``v0``..``v{d-1}``), one partition per row block of X, built where the block is."""
    import dask.dataframe as dd

    counts = np.bincount(labels[labels >= 0]) if (labels >= 0).any() else np.zeros(1, np.int64)
    dup = (labels >= 0) & (counts[np.maximum(labels, 0)] > 1)
    starts = np.r_[0, np.cumsum(X.chunks[0])]
    d = X.shape[1]
    frame = dask.delayed(_vector_frame, pure=True)
    pieces = []
    for k, block in enumerate(X.to_delayed().ravel()):
        a, b = int(starts[k]), int(starts[k + 1])
        local = np.flatnonzero(dup[a:b])
        pieces.append(frame(block, local, a, part[a:b][local], d))
    return dd.from_delayed(pieces, meta=_vector_frame(np.empty((0, d), X.dtype), [], 0, [], d))


def _vector_frame(block: np.ndarray, local: Any, start: int, part: Any, d: int) -> pd.DataFrame:
    """Rows ``local`` of one row block (global row ``start + local``) as a frame."""
    local = np.asarray(local, dtype=np.int64)
    values = np.asarray(block)[local]
    out = pd.DataFrame(values, columns=[f"v{j}" for j in range(d)])
    out.insert(0, "_part", np.asarray(part, dtype=np.int32))
    out.insert(0, "row", start + local)
    return out


def _select_partition(
    rows: pd.DataFrame,
    vectors: pd.DataFrame,
    index: int,
    out: PlanDir | None,
    kw: dict[str, Any],
) -> tuple[PlanCounts, Any]:
    """Select one partition (whole clusters) on its worker; write it as part ``index`` when
    ``out`` is given. Returns its counts and its part entry (or its plan table)."""
    rows = rows.sort_values("row", kind="stable").reset_index(drop=True)
    vectors = vectors.sort_values("row", kind="stable")
    here = rows["row"].to_numpy(dtype=np.int64)
    want = vectors["row"].to_numpy(dtype=np.int64)
    pos = np.searchsorted(here, want)
    if len(want) and (
        pos.max() >= len(here) or np.any(here[np.minimum(pos, len(here) - 1)] != want)
    ):
        # the two shuffles disagree on where a cluster went: never guess a keeper
        raise RuntimeError(f"select partition {index}: vectors of rows not in the partition")
    columns = [c for c in vectors.columns if str(c).startswith("v")]  # v0 .. v{d-1}
    d = len(columns)
    values = vectors[columns].to_numpy(dtype=np.float32)
    X = ClusteredRows((len(rows), d), pos.astype(np.int64), np.ascontiguousarray(values))
    objects = rows[[c for c in _OBJECT_COLUMNS if c in rows]].reset_index(drop=True)
    plan = select_keepers(
        rows["path"].to_numpy(dtype=object),
        X,
        rows["cluster"].to_numpy(dtype=np.int64),
        objects,
        protected=rows["protected"].to_numpy(dtype=bool),
        whole=False,
        **kw,
    )
    counts = PlanCounts.of(plan)
    if out is None:
        return counts, plan
    return counts, out.write_part(index, plan)
