"""Select on the Dask workers: the plan of a job whose vectors stay on the workers (issue 14).

The rows are grouped by cluster into partitions that each hold a range of whole clusters, and
:func:`dedup_batch.select.select_keepers` (the one implementation of the keep policies and the
chain guard) runs on each partition, on a worker. Only the vectors of rows in clusters of two
or more travel: a singleton is its own keeper and needs no vector. The client knows every
row's partition (it holds the labels), so the grouping is a plain graph, not a shuffle: each
row block of X is cut on its worker into one piece per partition it has clustered rows in,
and each partition's task takes its pieces (numpy arrays) and its rows' metadata (split on
the client, which holds it already). Dask's dataframe shuffle, used before, carried each
vector as d columns through Arrow and took most of a plan's time on wide vectors (54 of 115 s
at 156,000 x 768).

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
from .cluster_dask import ClusteredRows, _cut
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
    Moved between workers: the vectors of the rows in clusters of two or more (``4 d`` bytes
    each), once (X's row blocks are computed again from their shards, each on one worker, and
    cut there); every row's metadata (~100-200 bytes) goes from the client to its partition's
    worker, as that task's argument. Per worker: one partition (at most about ``PART_ROWS``
    rows, or ``n / blocks`` for a gathered plan) and its clustered vectors, plus the row block
    being cut. The client holds ``paths``, ``objects`` and ``labels`` (as the pipeline
    already does), 4 bytes a row for the partition numbers and 8 for their order; the plan
    table only when it is gathered.
    """
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
        }
    )
    for col in _OBJECT_COLUMNS:
        if col in objects:
            meta[col] = objects[col].to_numpy() if col == "kind" else objects[col].array
    sizes = np.bincount(labels[labels >= 0]) if (labels >= 0).any() else np.zeros(1, np.int64)
    clustered = (labels >= 0) & (sizes[np.maximum(labels, 0)] > 1)
    pieces = _clustered_pieces(X, clustered, part)
    # rows of each partition, ascending: one stable sort instead of a mask per partition
    order = np.argsort(part, kind="stable")
    ends = np.searchsorted(part[order], np.arange(1, n_parts + 1))
    if dataset:
        out.start_dataset()
    task = dask.delayed(_select_partition, pure=True)
    kw = {"policy": pol, "max_keeper_distance": max_keeper_distance, "metric": metric}
    d = int(X.shape[1])
    tasks = []
    for i, rows in enumerate(np.split(order, ends[:-1])):
        want = rows[clustered[rows]]  # ascending: the pieces' rows, in block order
        tasks.append(
            task(meta.iloc[rows], pieces.get(i, []), want, d, i, out if dataset else None, kw)
        )
    del pieces, meta
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


def _clustered_pieces(X: Any, clustered: np.ndarray, part: np.ndarray) -> dict[int, list[Any]]:
    """The vectors of the ``clustered`` rows, per partition: ``{partition: [pieces]}``, each
    piece a ``dask.delayed`` (k, d) array of one row block's clustered rows in that
    partition, in row order; pieces in block order (so a partition's rows ascend). Each row
    block is cut once, on the worker that computes it (:func:`_cut_rows`)."""
    starts = np.r_[0, np.cumsum(X.chunks[0])]
    pieces: dict[int, list[Any]] = {}
    for k, block in enumerate(X.to_delayed().ravel()):
        a, b = int(starts[k]), int(starts[k + 1])
        local = np.flatnonzero(clustered[a:b])
        if len(local) == 0:
            continue
        where = part[a:b][local]
        used = np.unique(where)
        many = len(used) > 1
        cut = dask.delayed(_cut_rows, pure=True, nout=len(used) if many else None)(
            block, local, where, used
        )
        for i, piece in zip(used, cut if many else [cut], strict=True):
            pieces.setdefault(int(i), []).append(piece)
    return pieces


def _cut_rows(block: np.ndarray, local: np.ndarray, where: np.ndarray, used: np.ndarray) -> Any:
    """Dask task: rows ``local`` of one row block, cut by their partition ``where`` into one
    (k, d) array per partition in ``used`` (ascending), rows in order; the one array when
    they all go to one partition."""
    return _cut(np.asarray(block)[local], where, used)


def _select_partition(
    rows: pd.DataFrame,
    pieces: list[np.ndarray],
    want: np.ndarray,
    d: int,
    index: int,
    out: PlanDir | None,
    kw: dict[str, Any],
) -> tuple[PlanCounts, Any]:
    """Select one partition (whole clusters) on its worker; write it as part ``index`` when
    ``out`` is given. ``rows``: its rows' metadata, ascending by ``row``; ``pieces``: the
    vectors (``d`` floats) of its rows ``want`` (those in clusters of two or more, ascending),
    which select compares; the others are each their own keeper. Returns its
    counts and its part entry (or its plan table)."""
    rows = rows.reset_index(drop=True)
    here = rows["row"].to_numpy(dtype=np.int64)
    pos = np.searchsorted(here, want)
    values = np.concatenate(pieces) if pieces else np.empty((0, d), np.float32)
    if len(values) != len(want) or (
        len(want)
        and (pos.max() >= len(here) or np.any(here[np.minimum(pos, len(here) - 1)] != want))
    ):
        # the pieces and the rows disagree on where a cluster went: never guess a keeper
        raise RuntimeError(f"select partition {index}: vectors of rows not in the partition")
    X = ClusteredRows((len(rows), d), pos.astype(np.int64), values)
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
