"""Benchmark: apply_plan on a Dask LocalCluster vs the notebook's one-delete-per-object loop.

Run ``python benchmarks/bench_delete.py`` (``--dups N`` to change the size). It starts its own
moto S3 server on 127.0.0.1, fills a bucket with ``N`` duplicate objects (tiny bodies, in
clusters of one keeper and ``--cluster-dups`` duplicates), writes the plan the plan stage would
write (sizes, mtimes and ETags from one listing), then:

1. deletes the duplicates with ``apply_plan`` on a 2-worker LocalCluster (DeleteObjects of up
   to 1000 keys per request, keeper and ETag checks, journal, completion report);
2. recreates them and deletes them the notebook's way: one ``s3fs.rm_file`` per object in a
   sequential loop (no checks at all);

3. for reference, recreates them and deletes them with ``Store.delete_exact`` alone (1000-key
   DeleteObjects in a sequential loop, no keeper/ETag check, no journal): the bulk-delete part;

and prints objects/s for each, the ratios, and peak RSS. All contenders delete through the S3
HTTP API; objects are created through moto's in-process backend only to keep the set-up short
(HTTP PUTs run at ~150 objects/s here).

Where the time goes against moto (5.2, measured here): the guard lists every duplicate and
keeper once before deleting, and a ListObjectsV2 entry costs ~0.15 ms of server CPU (moto
re-parses each timestamp with dateutil) plus ~0.13 ms of client parsing, while a key inside a
DeleteObjects costs ~0.05 ms and one ``rm_file`` ~5 ms. The server runs in this process and
competes with the workers for the 2 cores, so against moto the guarded apply tops out near
20x; against S3 itself the listing is served by S3, not by the machine running the job.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import socket
import sys
import tempfile
import time

os.environ.update(
    AWS_ACCESS_KEY_ID="bench-key-id",
    AWS_SECRET_ACCESS_KEY="bench-secret",
    AWS_DEFAULT_REGION="us-east-1",
)
os.environ.pop("AWS_PROFILE", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
)

BUCKET = "bench"
PREFIX = "img"
ACCOUNT = "123456789012"  # moto's default account


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _names(n_dups: int, per_cluster: int) -> tuple[dict[str, list[str]], list[str]]:
    clusters: dict[str, list[str]] = {}
    n_clusters = -(-n_dups // per_cluster)
    made = 0
    for c in range(n_clusters):
        k = min(per_cluster, n_dups - made)
        # Keeper and duplicates side by side in key order, as camera rolls and their copies are.
        clusters[f"{PREFIX}/{c // 1000:03d}/{c:07d}.jpg"] = [
            f"{PREFIX}/{c // 1000:03d}/{c:07d}-copy{j}.jpg" for j in range(k)
        ]
        made += k
    dups = [d for v in clusters.values() for d in v]
    return clusters, dups


def _write_plan(plan_dir: str, clusters: dict[str, list[str]], store) -> None:
    """The plan the plan stage writes: one row per path, size/mtime/ETag from one listing."""
    import pandas as pd

    objects = store.list_objects()
    rows = []
    for cid, (keeper, dups) in enumerate(clusters.items()):
        rows.append((keeper, cid, True, keeper, 0.0))
        rows += [(d, cid, False, keeper, 0.1) for d in dups]
    plan = pd.DataFrame(rows, columns=["path", "cluster", "keep", "keeper", "distance_to_keeper"])
    info = objects.reindex([store.resolve(p) for p in plan["path"]])
    plan["size"] = pd.array(info["size"].to_numpy(), dtype="Int64")
    plan["mtime"] = info["mtime"].to_numpy()
    plan["etag"] = pd.array(info["etag"].to_numpy(), dtype="string")
    plan["exists"] = info["size"].notna().to_numpy()
    os.makedirs(plan_dir, exist_ok=True)
    plan.to_parquet(os.path.join(plan_dir, "plan.parquet"), index=False)


def _put_direct(names: list[str]) -> None:
    from moto.backends import get_backend

    backend = get_backend("s3")[ACCOUNT]["global"]
    for n in names:
        backend.put_object(BUCKET, n, n.encode())


def _count(fs, names: list[str]) -> int:
    fs.invalidate_cache()
    present = set(fs.find(f"{BUCKET}/{PREFIX}"))
    return sum(f"{BUCKET}/{n}" in present for n in names)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dups", type=int, default=20_000, help="duplicate objects (default 20000)")
    ap.add_argument("--cluster-dups", type=int, default=4, help="duplicates per keeper")
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    ap.add_argument("--batch-size", type=int, default=1000)
    args = ap.parse_args(argv)

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from distributed import Client
    from moto.server import ThreadedMotoServer

    from dedup_batch.apply import apply_plan
    from dedup_batch.pipeline import local_cluster
    from dedup_batch.storage import Store

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    opts = {"endpoint_url": endpoint, "key": "bench-key-id", "secret": "bench-secret"}
    try:
        import s3fs

        fs = s3fs.S3FileSystem(
            client_kwargs={"endpoint_url": endpoint},
            key=opts["key"],
            secret=opts["secret"],
            skip_instance_cache=True,
        )
        fs.mkdir(BUCKET)
        clusters, dups = _names(args.dups, args.cluster_dups)
        t = time.perf_counter()
        _put_direct(list(clusters) + dups)
        print(
            f"setup: {len(clusters)} keepers + {len(dups)} duplicates in "
            f"{time.perf_counter() - t:.1f}s"
        )
        store = Store(f"s3://{BUCKET}", opts)
        with tempfile.TemporaryDirectory() as tmp:
            plan_dir = os.path.join(tmp, "plan")
            t = time.perf_counter()
            _write_plan(plan_dir, clusters, store)
            print(f"plan written (one listing of the bucket) in {time.perf_counter() - t:.1f}s")
            with (
                local_cluster(args.workers, 1) as cluster,
                Client(cluster) as client,
            ):
                t = time.perf_counter()
                res = apply_plan(plan_dir, store=store, client=client, batch_size=args.batch_size)
                t_apply = time.perf_counter() - t
                worker_rss = max(
                    client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss).values()
                )
        assert res.ok and res.counts == {"deleted": len(dups)}, res.to_dict()
        assert _count(fs, dups) == 0 and _count(fs, list(clusters)) == len(clusters)
        rate_apply = len(dups) / t_apply
        print(
            f"apply_plan ({args.workers} workers, batches of {args.batch_size}, guard "
            f"{res.guard}): {len(dups)} objects in {t_apply:.2f}s = {rate_apply:,.0f} objects/s"
        )

        _put_direct(dups)
        assert _count(fs, dups) == len(dups)
        t = time.perf_counter()
        for d in dups:  # the notebook: one delete call per object, in order
            fs.rm_file(f"{BUCKET}/{d}")
        t_loop = time.perf_counter() - t
        assert _count(fs, dups) == 0
        rate_loop = len(dups) / t_loop
        print(
            f"baseline (sequential s3fs rm_file per key): {len(dups)} objects in "
            f"{t_loop:.2f}s = {rate_loop:,.0f} objects/s"
        )
        print(f"ratio apply_plan / baseline: {rate_apply / rate_loop:.1f}x (target >= 30x)")

        _put_direct(dups)
        fulls = [store.resolve(d) for d in dups]
        t = time.perf_counter()
        for i in range(0, len(fulls), 1000):
            got = store.delete_exact(fulls[i : i + 1000])
            assert {r.status for r in got.values()} == {"deleted"}
        t_bulk = time.perf_counter() - t
        assert _count(fs, dups) == 0
        rate_bulk = len(dups) / t_bulk
        print(
            f"reference (Store.delete_exact alone, sequential, no checks): {rate_bulk:,.0f} "
            f"objects/s = {rate_bulk / rate_loop:.1f}x the baseline"
        )
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"peak RSS: driver + moto server {own:,.0f} MiB, largest worker "
            f"{worker_rss / 1024:,.0f} MiB; {os.cpu_count()} CPUs, load average "
            f"{os.getloadavg()[0]:.1f} (other processes share the CPUs: the ratio is noisy)"
        )
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
