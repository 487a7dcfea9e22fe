"""Benchmark the load stage against a sequential pandas loop, both reading from a local S3.

Writes ``--shards`` wide Parquet shards (the seed notebook's layout: index = path, one float32
column per dimension; ``--rows`` rows in total, ``--dim`` dimensions) to a moto S3 server on
127.0.0.1 (run in a child process, so its CPU and memory do not count against the client), then
reads them all

* baseline: ``pd.read_parquet`` per shard through s3fs, one after the other, then
  ``pd.concat(...).to_numpy(np.float32)``;
* ``load_features`` on a ``LocalCluster`` (``--workers`` processes × ``--threads`` threads);
* ``load_features`` with ``client=None`` (dask's threaded scheduler, in this process).

It prints throughput (MB/s of float32 embeddings delivered; best of ``--repeat`` runs), the
ratio to the baseline and the peak RSS of the first run above the starting RSS of this process
(and of the workers), sampled every 5 ms.

Run from the repository root: ``PYTHONPATH=. python benchmarks/bench_load.py``.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

# Dummy credentials and loopback only, before anything imports boto.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench-key-id")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench-secret-key")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)

import numpy as np
import pandas as pd
import psutil

BUCKET = "bench-features"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_moto(port: int, ready: Any) -> None:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    ready.set()
    threading.Event().wait()  # until the parent terminates this process


class _PeakRSS:
    """Samples the RSS of this process (and of ``pids``) in a thread; peak above the start."""

    def __init__(self, pids: list[int] | None = None, every_s: float = 0.005) -> None:
        self.procs = [psutil.Process()] + [psutil.Process(p) for p in pids or []]
        self.every_s = every_s
        self.start = [p.memory_info().rss for p in self.procs]
        self.peak = list(self.start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for i, p in enumerate(self.procs):
                self.peak[i] = max(self.peak[i], p.memory_info().rss)
            self._stop.wait(self.every_s)

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def client_mb(self) -> float:
        return (self.peak[0] - self.start[0]) / 1e6

    def workers_mb(self) -> float:
        return sum(p - s for p, s in zip(self.peak[1:], self.start[1:], strict=True)) / 1e6


def _write_shards(opts: dict, shards: int, rows: int, dim: int) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
    fs.mkdir(BUCKET)
    rng = np.random.default_rng(0)
    urls = []
    for s, chunk in enumerate(np.array_split(np.arange(rows), shards)):
        X = rng.standard_normal((len(chunk), dim), dtype=np.float32)
        df = pd.DataFrame(
            X, index=[f"images/{i:08d}.jpg" for i in chunk], columns=[str(j) for j in range(dim)]
        )
        buf = io.BytesIO()
        df.to_parquet(buf)
        key = f"{BUCKET}/features/part-{s:05d}.parquet"
        fs.pipe(key, buf.getvalue())
        urls.append(f"s3://{key}")
    return urls


def _pandas_loop(urls: list[str], opts: dict) -> tuple[np.ndarray, np.ndarray]:
    frames = [pd.read_parquet(u, storage_options=opts) for u in urls]
    df = pd.concat(frames)
    del frames
    return df.index.to_numpy(dtype=object), df.to_numpy(dtype=np.float32)


def _timed(
    fn: Callable[[], Any], repeat: int, pids: list[int] | None = None
) -> tuple[float, Any, _PeakRSS]:
    """Best wall time of ``repeat`` runs, the last result, and the first run's peak memory
    (later runs start with whatever the allocators kept from the earlier ones)."""
    best, out, mem = float("inf"), None, None
    for _ in range(repeat):
        out = None  # drop the previous result before measuring the next run
        with _PeakRSS(pids) as m:
            t0 = time.perf_counter()
            out = fn()
            dt = time.perf_counter() - t0
        best, mem = min(best, dt), mem or m
    return best, out, mem


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=32, help="number of Parquet shards (32)")
    ap.add_argument("--rows", type=int, default=200_000, help="rows in all shards (200000)")
    ap.add_argument("--dim", type=int, default=256, help="embedding dimensions (256)")
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (2)")
    # Reading waits on storage more than it computes: more threads than cores pay off.
    ap.add_argument("--threads", type=int, default=4, help="threads per worker (4)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per method; best is kept (1)")
    args = ap.parse_args(argv)

    from distributed import Client

    from dedup_batch.load import load_features
    from dedup_batch.pipeline import local_cluster
    from dedup_batch.storage import Store

    port = _free_port()
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    moto = ctx.Process(target=_serve_moto, args=(port, ready), daemon=True)
    moto.start()
    try:
        if not ready.wait(60):
            raise SystemExit("moto server did not start")
        endpoint = f"http://127.0.0.1:{port}"
        opts = {
            "endpoint_url": endpoint,
            "key": os.environ["AWS_ACCESS_KEY_ID"],
            "secret": os.environ["AWS_SECRET_ACCESS_KEY"],
        }
        t0 = time.perf_counter()
        urls = _write_shards(opts, args.shards, args.rows, args.dim)
        mb = args.rows * args.dim * 4 / 1e6
        print(
            f"data: {args.shards} shards, {args.rows} rows × {args.dim} dims float32 = "
            f"{mb:.1f} MB on moto S3 at {endpoint} (written in {time.perf_counter() - t0:.1f} s)"
        )
        store = Store("s3://bench-images", opts)
        glob = f"s3://{BUCKET}/features/part-*.parquet"

        base_t, base, base_mem = _timed(lambda: _pandas_loop(urls, opts), args.repeat)
        base_paths, base_X = base
        del base
        print(
            f"pandas sequential loop       : {base_t:6.2f} s {mb / base_t:8.1f} MB/s   "
            f"peak RSS +{base_mem.client_mb():.0f} MB"
        )

        thr_t, thr, thr_mem = _timed(
            lambda: load_features(glob, store=store, storage_options=opts), args.repeat
        )
        assert thr.paths.tolist() == base_paths.tolist()
        assert np.array_equal(thr.X, base_X)
        del thr
        print(
            f"load_features, threads       : {thr_t:6.2f} s {mb / thr_t:8.1f} MB/s   "
            f"peak RSS +{thr_mem.client_mb():.0f} MB   ratio {base_t / thr_t:.2f}×"
        )

        with (
            local_cluster(args.workers, args.threads) as cluster,
            Client(cluster) as client,
        ):
            # Workers import the reader stack once, as this process already has.
            client.run(lambda: __import__("dedup_batch.load") and None)
            pids = list(client.run(os.getpid).values())
            dist_t, dist, dist_mem = _timed(
                lambda: load_features(glob, store=store, storage_options=opts, client=client),
                args.repeat,
                pids,
            )
            assert dist.paths.tolist() == base_paths.tolist()
            assert np.array_equal(dist.X, base_X)
            del dist
        print(
            f"load_features, LocalCluster  : {dist_t:6.2f} s {mb / dist_t:8.1f} MB/s   "
            f"peak RSS +{dist_mem.client_mb():.0f} MB (client) "
            f"+{dist_mem.workers_mb():.0f} MB (workers)   ratio {base_t / dist_t:.2f}×  "
            f"[{args.workers} workers × {args.threads} threads, {os.cpu_count()} cores]"
        )
    finally:
        moto.terminate()
        moto.join(10)


if __name__ == "__main__":
    main()
