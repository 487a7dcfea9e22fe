"""Benchmark: the in-process engine against the distributed path (vectors on the Dask workers),
same data, same run, one machine.

One command: ``python benchmarks/bench_distributed.py [--n 100000] [--d 256] [--workers 2]``.

Each side runs in its own subprocess. The data (``bench_cluster.make_data``: 256-d unit vectors,
groups of ~4 near-duplicates around decaying-spectrum centres, eps 0.6, min_samples 1) is
written once to a ``.npy`` file by this process.

- ``in-process``: ``np.load`` then ``dedup_batch.cluster.DBSCAN.fit(X)`` on all cores (threads).
- ``distributed``: a ``LocalCluster`` of ``--workers`` processes x 1 thread; each worker reads
  its row blocks from the file (``np.load(mmap_mode="r")`` slices: the client never holds X),
  the blocks are persisted, then ``DBSCAN.fit(dask_array)`` is timed.

Printed: seconds of each side and their ratio (target: distributed <= 1.2x in-process), peak
RSS of the in-process side, of the distributed client and of each worker; the bytes the workers
sent each other during the fit (``Worker.transfer_outgoing_bytes_total``, summed) against the
cost model of docs/scaling.md; the fit's statistics (blocks, block pairs scheduled, tiles run);
whether the labels are identical. The machine's load average is printed too: on a shared
machine the ratio is the figure to read, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _in_process(path: str, eps: float, out: str) -> None:
    from dedup_batch.cluster import DBSCAN

    X = np.load(path)
    t = time.perf_counter()
    labels = DBSCAN(eps=eps, min_samples=1).fit(X).labels_
    secs = time.perf_counter() - t
    np.save(out + ".npy", labels)
    with open(out, "w") as f:
        json.dump({"seconds": secs, "peak_rss": _peak()}, f)


def _read_rows(path: str, s: int, e: int) -> np.ndarray:
    return np.array(np.load(path, mmap_mode="r")[s:e])


def _distributed(path: str, eps: float, workers: int, out: str) -> None:
    import logging

    import dask
    import dask.array as da
    from distributed import Client, LocalCluster, wait

    from dedup_batch.cluster import DBSCAN

    phases: list[str] = []  # the fit's own timing lines (preparation steps)

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            phases.append(record.getMessage())

    log = logging.getLogger("dedup_batch.cluster_dask")
    log.setLevel(logging.DEBUG)
    log.addHandler(_Keep())
    n, d = np.load(path, mmap_mode="r").shape
    rows = 8192
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster) as client,
    ):
        parts = [
            da.from_delayed(
                dask.delayed(_read_rows)(path, s, min(n, s + rows)),
                shape=(min(n, s + rows) - s, d),
                dtype=np.float32,
            )
            for s in range(0, n, rows)
        ]
        X = client.persist(da.concatenate(parts))
        wait(X)
        # the workers import the engine (scikit-learn, SciPy) before the clock starts, as the
        # in-process side has imported it before its clock starts
        client.run(lambda: __import__("dedup_batch.cluster_dask"))

        def sent(dask_worker) -> int:
            return int(dask_worker.transfer_outgoing_bytes_total)

        before = sum(client.run(sent).values())
        t = time.perf_counter()
        est = DBSCAN(eps=eps, min_samples=1).fit(X, client=client)
        secs = time.perf_counter() - t
        moved = sum(client.run(sent).values()) - before
        worker_peaks = list(client.run(_peak).values())
    np.save(out + ".npy", est.labels_)
    with open(out, "w") as f:
        json.dump(
            {
                "seconds": secs,
                "peak_rss": _peak(),
                "worker_peaks": worker_peaks,
                "bytes_moved": moved,
                "stats": getattr(est, "distributed_stats_", {}),
                "phases": [p for p in phases if " at " in p or "block pairs" in p],
            },
            f,
        )


def _run(args: list[str], timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        p = subprocess.run(
            [sys.executable, __file__, "--child", *args, out],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if p.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(p.stderr[-2000:])
        with open(out) as f:
            r = json.load(f)
        r["labels"] = np.load(out + ".npy")
        return r


def _model_bytes(n: int, d: int, workers: int, stats: dict) -> float:
    """docs/scaling.md: the reorder moves X once ((W-1)/W of it crosses), and each tile whose
    two blocks live apart moves one prepared block ((W-1)/W of the off-diagonal tiles)."""
    if not stats:
        return float("nan")
    cross = (workers - 1) / workers
    block = n / stats["blocks"] * stats["prepared_row_bytes"]
    off_diag = max(0, stats["tiles"] - stats["blocks"])
    return cross * n * d * 4 + cross * off_diag * block


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--eps", type=float, default=0.6)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        side, path, eps, *rest = a.child
        if side == "in-process":
            _in_process(path, float(eps), rest[-1])
        else:
            _distributed(path, float(eps), int(rest[0]), rest[-1])
        return
    from bench_cluster import make_data

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "X.npy")
        np.save(path, make_data(a.n, d=a.d))
        load0 = os.getloadavg()[0]
        ours = _run(["in-process", path, str(a.eps)], a.timeout)
        dist = _run(["distributed", path, str(a.eps), str(a.workers)], a.timeout)
        load1 = os.getloadavg()[0]
    gib = 1 << 30
    st = dist["stats"]
    model = _model_bytes(a.n, a.d, a.workers, st)
    print(f"data: make_data({a.n}, d={a.d}) float32 ({a.n * a.d * 4 / gib:.2f} GiB), eps {a.eps}")
    print(f"machine: {os.cpu_count()} cores, load average {load0:.1f} -> {load1:.1f}")
    print(f"in-process : {ours['seconds']:8.2f} s  peak RSS {ours['peak_rss'] / gib:.2f} GiB")
    print(
        f"distributed: {dist['seconds']:8.2f} s  client peak {dist['peak_rss'] / gib:.2f} GiB, "
        "workers " + ", ".join(f"{p / gib:.2f}" for p in dist["worker_peaks"]) + " GiB"
    )
    print(f"ratio distributed / in-process: {dist['seconds'] / ours['seconds']:.2f}x (target 1.2x)")
    print(
        f"bytes moved between workers: {dist['bytes_moved'] / 2**20:.1f} MiB "
        f"(cost model {model / 2**20:.1f} MiB)"
    )
    print(f"fit statistics: {json.dumps(st)}")
    for line in dist["phases"]:
        print(f"  {line}")
    same = np.array_equal(ours["labels"], dist["labels"])
    print(f"labels identical: {same}")


if __name__ == "__main__":
    main()
