"""Benchmark: select on the Dask workers (``plan_dask``) against select on the client after
fetching the clustered rows there (the path ``plan`` took before issue 14 item 3), same data,
same labels, same run, one machine.

One command: ``python benchmarks/bench_select.py [--n 200000] [--d 256] [--workers 2]``.

The data is ``bench_cluster.make_data`` (groups of ~4 near-duplicates), its labels the
in-process DBSCAN's (eps 0.6, min_samples 1), computed once before either side is timed. X is
a dask array whose row blocks the workers read from a ``.npy`` file (the client never holds
it). Both sides run on the same ``LocalCluster`` of ``--workers`` processes x 1 thread:

- ``client``: ``cluster_dask.clustered_rows`` (the clustered rows' vectors fetched to the
  client) then ``select_keepers`` on the client: the old path;
- ``workers``: ``plan_dask.select_on_workers`` (the shuffle by cluster, select per partition,
  the plan gathered as one table) and, with ``--part-rows``, written by the workers as a
  dataset.

Printed: seconds of each side (the second of two runs each) and their ratio, the vector bytes
the old path fetched to the client, whether the plans are equal, and the load average (on a
shared machine the ratio is the figure to read, not the seconds).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--block", type=int, default=25_000, help="rows per row block of X")
    ap.add_argument("--part-rows", type=int, default=None, help="write a dataset of such parts")
    args = ap.parse_args()

    import dask
    import dask.array as da
    import pandas as pd
    from bench_cluster import make_data
    from bench_distributed import _read_rows

    from dedup_batch import plandir
    from dedup_batch.cluster import DBSCAN
    from dedup_batch.cluster_dask import clustered_rows
    from dedup_batch.config import JobSpec
    from dedup_batch.pipeline import dask_client
    from dedup_batch.plan_dask import select_on_workers
    from dedup_batch.plandir import PlanDir
    from dedup_batch.select import select_keepers

    tmp = tempfile.mkdtemp(prefix="bench-select-")
    X = make_data(args.n, d=args.d)
    path = os.path.join(tmp, "X.npy")
    np.save(path, X)
    labels = DBSCAN(eps=0.6, min_samples=1).fit(X).labels_
    del X
    paths = np.array([f"img/{i:08d}.jpg" for i in range(args.n)], dtype=object)
    objects = pd.DataFrame(
        {
            "size": pd.array(np.arange(args.n) % 5000 + 1000, dtype="Int64"),
            "mtime": np.full(args.n, 1.7e9),
            "etag": pd.array([pd.NA] * args.n, dtype="string"),
            "exists": np.ones(args.n, bool),
        }
    )
    protected = np.zeros(args.n, bool)
    kw = {"policy": "original", "max_keeper_distance": 0.6, "metric": "euclidean"}
    # the job's own client factory: a LocalCluster of worker processes on 127.0.0.1
    spec = JobSpec(n_workers=args.workers, threads_per_worker=1)
    with dask_client(spec) as client:
        starts = list(range(0, args.n, args.block))
        blocks = [
            da.from_delayed(
                dask.delayed(_read_rows)(path, s, min(s + args.block, args.n)),
                (min(s + args.block, args.n) - s, args.d),
                np.float32,
            )
            for s in starts
        ]
        Xd = client.persist(da.concatenate(blocks))
        client.run(lambda: __import__("sklearn") and None)  # imports before the clock
        results = {}
        for side in ("client", "workers", "client", "workers"):  # twice: warm, then timed
            t = time.perf_counter()
            if side == "client":
                table = select_keepers(paths, clustered_rows(Xd, labels), labels, objects, **kw)
            else:
                if args.part_rows:
                    plandir.PART_ROWS = args.part_rows
                table, _ = select_on_workers(
                    Xd,
                    labels,
                    paths,
                    objects,
                    protected,
                    out=PlanDir(os.path.join(tmp, "plan")),
                    client=client,
                    **kw,
                )
                if table is None:
                    table = PlanDir(os.path.join(tmp, "plan")).read_plan()
                    table = table.sort_values(["cluster", "path"], kind="stable")
                    table = table.reset_index(drop=True)
            results[side] = (time.perf_counter() - t, table)
        (tc, pc), (tw, pw) = results["client"], results["workers"]
        same = pc.equals(pw)
        clustered = int((pc.groupby("cluster")["path"].transform("size") > 1).sum())
        print(f"n={args.n} d={args.d} workers={args.workers} clustered rows={clustered:,}")
        print(f"load average: {os.getloadavg()}")
        print(f"client select (fetch clustered rows): {tc:.2f} s")
        print(f"select on the workers:               {tw:.2f} s  ratio {tw / tc:.2f}x")
        print(f"vectors the client fetched before: {clustered * args.d * 4 / 2**20:.1f} MiB, now 0")
        print(f"plans equal: {same}")


if __name__ == "__main__":
    main()
