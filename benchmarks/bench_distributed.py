"""Benchmark: the in-process engine against the distributed path (vectors on the Dask workers),
same data, same run, one machine.

One command: ``python benchmarks/bench_distributed.py [--n 100000] [--d 256] [--workers 2]``;
issue 14's large case: ``--case 600k`` (600,000 x 512 float32, 1.2 GB, on 3 workers limited
to 900 MB each; minutes, never part of a quick run).

The data (``bench_cluster.make_data``: unit vectors, groups of ~4 near-duplicates around
decaying-spectrum centres, eps 0.6, min_samples 1) is generated in a process of its own, which
writes it as NPZ feature shards (``--shard-rows`` rows each) and as one ``.npy``: no process
measured here ever held the generator's temporaries. Each side runs in its own subprocess:

- ``in-process``: ``np.load`` then ``dedup_batch.cluster.DBSCAN.fit(X)`` on all cores (threads).
- ``distributed``: a ``LocalCluster`` of ``--workers`` processes x ``--threads`` threads
  (default 1; ``--memory-limit`` each), with the Dask settings of the one a job starts
  (``pipeline.local_cluster``), ``load_features(distributed="always")`` (the workers
  read the shards: the client never holds X), then ``DBSCAN.fit(feats.X)`` is timed, as
  ``plan`` runs it: the fit takes over the loaded blocks (``load.take_blocks``).
- ``--scheduler-process``: the scheduler and the workers as ``dask scheduler`` / ``dask worker``
  processes (as ``--scheduler`` and the Helm chart run them), so that the client's peak RSS is
  the client's alone; without it the LocalCluster's scheduler runs in the client's process.
- ``--compare TREE``: the distributed side again with another checkout's code (e.g. the main
  branch), same data, same run.

``--repeat R`` (default 3; 1 for ``--case 600k``): R runs of each side, alternating (the
sides' order turns from one run to the next), each in fresh processes; each run's seconds and
ratio, then the median ratio, and the details below of the run with the median ratio.

Printed: seconds of each side and their ratio (target: distributed <= 1.2x in-process); the
CPU seconds each side's fit used (in-process: its process; distributed: each worker's, the
client's with a LocalCluster's scheduler, and a scheduler process's), and the ratio the
distributed side could reach at best with that CPU spread over all the machine's cores and
none idle (on one machine the client, the scheduler and the workers share the cores); peak
RSS of the in-process side and of the distributed client; each worker's peak RSS per stage of
the fit (sampled every 0.1 s with psutil: load, sums, directions, cells, reorder+prepare, tiles)
and at rest once the blocks are prepared; the bytes the workers sent each other during the fit
(``Worker.transfer_outgoing_bytes_total``, summed) against the cost model of docs/scaling.md;
the fit's statistics (blocks, block pairs scheduled, tiles run); whether the labels are
identical. The machine's load average is printed too: on a shared machine the ratio is the
figure to read, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
# the tree measured: this checkout, or --compare's (set by the parent for that child)
sys.path.insert(0, os.environ.get("BENCH_TREE") or os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

#: issue 14's target case: 600k x 512 float32 (1.2 GB) on 3 workers limited to 900 MB each
CASES = {"600k": {"n": 600_000, "d": 512, "workers": 3, "memory_limit": "900MB", "repeat": 1}}
#: the fit's own debug lines that end each stage, and the stage they end
STAGES = [
    ("sums at", "persist+sums"),
    ("principal directions at", "directions"),
    ("cells at", "cells"),
    ("reordered and prepared at", "reorder+prepare"),
    ("prepared in", "block pairs"),
]


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu() -> float:
    """CPU seconds (user + system) this process has used: all its threads (in the
    distributed child, the client and a LocalCluster's scheduler)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _worker_cpu(dask_worker: object) -> tuple[float, dict[int, float]]:
    """On a worker: ``(CPU seconds of the process, {thread id: CPU seconds})`` for the threads
    of its task executor (the tasks themselves); the rest is Dask's own (its event loop:
    messages, transfers, heartbeats, monitors)."""
    tick = os.sysconf("SC_CLK_TCK")
    threads = {}
    for t in getattr(dask_worker.executors["default"], "_threads", ()):
        try:
            with open(f"/proc/self/task/{t.native_id}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # not Linux, or the thread has ended
            continue
        threads[t.native_id] = (int(fields[11]) + int(fields[12])) / tick
    return _cpu(), threads


def _generate(n: int, d: int, shard_rows: int, folder: str) -> None:
    """Child: the data as NPZ shards (``folder/shards``) and ``folder/X.npy``."""
    from bench_cluster import make_data

    X = make_data(n, d=d)
    np.save(os.path.join(folder, "X.npy"), X)
    os.makedirs(os.path.join(folder, "shards"))
    for k, s in enumerate(range(0, n, shard_rows)):
        e = min(n, s + shard_rows)
        paths = np.asarray([f"img/{i:08d}.jpg" for i in range(s, e)])
        np.savez(
            os.path.join(folder, "shards", f"part-{k:05d}.npz"), paths=paths, embeddings=X[s:e]
        )


def _in_process(folder: str, eps: float, out: str) -> None:
    from dedup_batch.cluster import DBSCAN

    X = np.load(os.path.join(folder, "X.npy"))
    cpu, t = _cpu(), time.perf_counter()
    labels = DBSCAN(eps=eps, min_samples=1).fit(X).labels_
    secs, cpu = time.perf_counter() - t, _cpu() - cpu
    np.save(out + ".npy", labels)
    with open(out, "w") as f:
        json.dump({"seconds": secs, "cpu": cpu, "peak_rss": _peak()}, f)


class _Sampler:
    """Each worker's RSS every 0.1 s (psutil, by pid: no Dask call in the way), attributed to
    the fit's stage running at the time (from the fit's own debug lines)."""

    def __init__(self, pids: list[int]) -> None:
        import psutil

        self.procs = [psutil.Process(p) for p in pids]
        self.stage = "load"
        self.peaks: dict[str, list[int]] = {}
        self.at_rest: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> list[int]:
        out = []
        for p in self.procs:
            try:
                out.append(p.memory_info().rss)
            except Exception:  # a worker restarted by its nanny: it has no RSS to report
                out.append(0)
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.sample()
            old = self.peaks.setdefault(self.stage, [0] * len(rss))
            self.peaks[self.stage] = [max(a, b) for a, b in zip(old, rss, strict=True)]
            time.sleep(0.1)

    def on_message(self, msg: str) -> None:
        names = [ended for _, ended in STAGES] + ["tiles+merge"]
        for marker, ended in STAGES:
            if marker in msg:
                self.stage = names[names.index(ended) + 1]
                if ended == "reorder+prepare":
                    self.at_rest = self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _distributed(
    folder: str, eps: float, workers: int, threads: int, limit: str, own_scheduler: bool, out: str
) -> None:
    import contextlib
    import logging
    from pathlib import Path

    from distributed import Client, LocalCluster

    from dedup_batch.cluster import DBSCAN
    from dedup_batch.load import load_features
    from dedup_batch.storage import Store

    with contextlib.ExitStack() as stack:
        if own_scheduler:
            # `dask scheduler` and `dask worker` processes (as --scheduler and the Helm chart
            # run them): this process is then the client alone, and its peak is the client's
            sys.path.insert(0, os.path.join(os.environ.get("BENCH_TREE", ""), "tests"))
            from _dask_procs import dask_processes

            logs = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            address = stack.enter_context(
                dask_processes(
                    logs, workers, worker_args=("--memory-limit", limit, "--nthreads", str(threads))
                )
            )
        else:  # the LocalCluster's scheduler runs in this process: its peak includes it
            # the LocalCluster a job starts (its Dask settings), where the tree measured has one
            from dedup_batch import pipeline

            local_cluster = getattr(pipeline, "local_cluster", None)
            if local_cluster is None:
                cluster = LocalCluster(
                    n_workers=workers,
                    threads_per_worker=threads,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address="127.0.0.1:0",
                    memory_limit=limit,
                )
            else:
                cluster = local_cluster(workers, threads, memory_limit=limit)
            address = stack.enter_context(cluster)
        client = stack.enter_context(Client(address))
        # the workers import the engine (scikit-learn, SciPy) before the clock starts, as the
        # in-process side has imported it before its clock starts
        client.run(lambda: __import__("dedup_batch.cluster_dask"))
        sampler = _Sampler(list(client.run(os.getpid).values()))
        phases: list[str] = []  # the fit's own timing lines (preparation steps)

        class _Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                phases.append(record.getMessage())
                sampler.on_message(record.getMessage())

        log = logging.getLogger("dedup_batch.cluster_dask")
        log.setLevel(logging.DEBUG)
        log.addHandler(_Keep())
        t = time.perf_counter()
        feats = load_features(
            os.path.join(folder, "shards", "*.npz"),
            store=Store(folder),
            client=client,
            distributed="always",
        )
        load_secs = time.perf_counter() - t
        sampler.stage = "persist+sums"

        def sent(dask_worker) -> int:
            return int(dask_worker.transfer_outgoing_bytes_total)

        before = sum(client.run(sent).values())
        # CPU of the fit: the workers', this process's (the client, with a LocalCluster's
        # scheduler) and a scheduler process's: the cores all of it shares set the floor
        workers0 = client.run(_worker_cpu)
        sched0 = client.run_on_scheduler(_cpu) if own_scheduler else 0.0
        cpu, t = _cpu(), time.perf_counter()
        est = DBSCAN(eps=eps, min_samples=1).fit(feats.X, client=client)
        secs, cpu = time.perf_counter() - t, _cpu() - cpu
        workers_cpu, tasks_cpu = [], []
        for w, (total, threads) in client.run(_worker_cpu).items():
            total0, threads0 = workers0.get(w, (total, {}))
            workers_cpu.append(total - total0)
            tasks_cpu.append(sum(v - threads0.get(k, 0.0) for k, v in threads.items()))
        sched_cpu = client.run_on_scheduler(_cpu) - sched0 if own_scheduler else 0.0
        sampler.stop()
        moved = sum(client.run(sent).values()) - before
    np.save(out + ".npy", est.labels_)
    with open(out, "w") as f:
        json.dump(
            {
                "seconds": secs,
                "cpu": {
                    "workers": workers_cpu,
                    "tasks": tasks_cpu,
                    "client": cpu,
                    "scheduler": sched_cpu,
                },
                "load_seconds": load_secs,
                "peak_rss": _peak(),
                "stage_peaks": sampler.peaks,
                "at_rest": sampler.at_rest,
                "bytes_moved": moved,
                "stats": getattr(est, "distributed_stats_", {}),
                "phases": [p for p in phases if " at " in p or "block pairs" in p],
            },
            f,
        )


def _run(args: list[str], timeout: float, tree: str | None = None) -> dict:
    # the workers (spawned processes) import the package through PYTHONPATH: the same tree
    tree = os.path.abspath(tree or os.path.join(HERE, ".."))
    path = os.pathsep.join([tree, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "BENCH_TREE": tree, "PYTHONPATH": path}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        p = subprocess.run(
            [sys.executable, __file__, "--child", *args, out],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
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


def _floor(dist: dict, ours: dict) -> tuple[float, float]:
    """``(CPU seconds of the distributed fit, the ratio it could reach at best)``: all its
    processes' CPU spread over every core of the machine with none idle, against the
    in-process side's seconds. On one machine the client, the scheduler and the workers
    share the cores, so no scheduling brings the ratio below this."""
    c = dist["cpu"]
    total = sum(c["workers"]) + c["client"] + c["scheduler"]
    return total, total / (os.cpu_count() or 1) / ours["seconds"]


def _report(name: str, dist: dict, ours: dict, a: argparse.Namespace) -> None:
    gib = 1 << 30
    st = dist["stats"]
    model = _model_bytes(a.n, a.d, a.workers, st)
    print(
        f"{name}: {dist['seconds']:8.2f} s (load {dist['load_seconds']:.1f} s)  client peak "
        f"{dist['peak_rss'] / gib:.2f} GiB; "
        f"ratio to in-process {dist['seconds'] / ours['seconds']:.2f}x (target 1.2x)"
    )
    c = dist["cpu"]
    total, floor = _floor(dist, ours)
    tasks = sum(c["tasks"])
    print(
        f"    CPU seconds of the fit: {total:.2f} against {ours['cpu']:.2f} in process "
        f"({total / ours['cpu']:.2f}x); on {os.cpu_count()} cores with none idle the ratio "
        f"could be {floor:.2f}x at best. The workers' tasks {tasks:.2f} ("
        + ", ".join(f"{w:.2f}" for w in c["tasks"])
        + f"); the rest {total - tasks:.2f}: the workers' Dask event loops "
        f"{sum(c['workers']) - tasks:.2f}, the client {c['client']:.2f} (the fit's merging, "
        f"Dask's client and a LocalCluster's scheduler), a scheduler process "
        f"{c['scheduler']:.2f}"
    )
    for stage, peaks in dist["stage_peaks"].items():
        print(f"    worker peak RSS, {stage:16s}: " + ", ".join(f"{p / gib:.2f}" for p in peaks))
    rest = ", ".join(f"{p / gib:.2f}" for p in dist["at_rest"])
    print(f"    worker RSS at rest (blocks prepared): {rest} GiB")
    print(
        f"    bytes moved between workers: {dist['bytes_moved'] / 2**20:.1f} MiB "
        f"(cost model {model / 2**20:.1f} MiB)"
    )
    print(f"    fit statistics: {json.dumps(st)}")
    for line in dist["phases"]:
        print(f"      {line}")
    print(f"    labels identical to in-process: {np.array_equal(ours['labels'], dist['labels'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", choices=sorted(CASES), help="a named case (sets n, d, workers)")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="threads per worker (default 1)")
    ap.add_argument("--memory-limit", default="auto", help="each worker's, e.g. 900MB")
    ap.add_argument("--shard-rows", type=int, default=8192)
    ap.add_argument("--eps", type=float, default=0.6)
    ap.add_argument("--compare", metavar="TREE", help="also run this checkout's distributed path")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument(
        "--repeat", type=int, default=3, help="runs of each side, alternating (default 3)"
    )
    ap.add_argument(
        "--scheduler-process",
        action="store_true",
        help="run the scheduler and workers as `dask scheduler`/`dask worker` processes, so "
        "that the client's peak is its own (default: a LocalCluster, scheduler in the client)",
    )
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        side, folder, *rest = a.child
        if side == "generate":
            _generate(int(rest[0]), int(rest[1]), int(rest[2]), folder)
        elif side == "in-process":
            _in_process(folder, float(rest[0]), rest[-1])
        else:
            _distributed(
                folder,
                float(rest[0]),
                int(rest[1]),
                int(rest[2]),
                rest[3],
                rest[4] == "1",
                rest[-1],
            )
        return
    for key, value in CASES.get(a.case, {}).items():
        setattr(a, key, value)
    with tempfile.TemporaryDirectory() as tmp:
        gen = [sys.executable, __file__, "--child", "generate", tmp]
        subprocess.run([*gen, str(a.n), str(a.d), str(a.shard_rows)], check=True)
        load0 = os.getloadavg()[0]
        dist_args = ["distributed", tmp, str(a.eps), str(a.workers), str(a.threads)]
        dist_args.append(a.memory_limit)
        dist_args.append("1" if a.scheduler_process else "0")
        # the sides alternate, each run in fresh processes: on a shared machine one run of
        # each can differ by 1.5x from the next, so the medians are the figures to read. Their
        # order turns from run to run: no side always runs first, or right after another.
        sides = [
            lambda: _run(["in-process", tmp, str(a.eps)], a.timeout),
            lambda: _run(dist_args, a.timeout),
        ]
        if a.compare:
            sides.append(lambda: _run(dist_args, a.timeout, a.compare))
        runs = []
        for k in range(a.repeat):
            out: dict[int, dict] = {}
            for i in range(len(sides)):
                j = (i + k) % len(sides)
                out[j] = sides[j]()
            runs.append((out[0], out[1], out.get(2)))
        load1 = os.getloadavg()[0]
    gib = 1 << 30
    print(
        f"data: make_data({a.n}, d={a.d}) float32 ({a.n * a.d * 4 / gib:.2f} GiB) in "
        f"{len(range(0, a.n, a.shard_rows))} NPZ shards, eps {a.eps}; {a.workers} workers x "
        f"{a.threads} thread(s), memory limit {a.memory_limit}, scheduler "
        f"{'in a process of its own' if a.scheduler_process else 'in the client (LocalCluster)'}"
    )
    print(f"machine: {os.cpu_count()} cores, load average {load0:.1f} -> {load1:.1f}")
    for k, (ours, dist, other) in enumerate(runs, 1):
        line = f"run {k}: in-process {ours['seconds']:.2f} s, distributed {dist['seconds']:.2f} s"
        line += f" ({dist['seconds'] / ours['seconds']:.2f}x; CPU {_floor(dist, ours)[0]:.1f} s"
        line += f" against {ours['cpu']:.1f} s, best possible {_floor(dist, ours)[1]:.2f}x)"
        if other is not None:
            secs = other["seconds"]
            line += f", {a.compare} {secs:.2f} s ({secs / ours['seconds']:.2f}x)"
        same = all(np.array_equal(ours["labels"], r["labels"]) for r in (dist, other) if r)
        print(line + f"; labels identical: {same}")
    # the details of the run whose ratio is the median one
    ours, dist, other = sorted(runs, key=lambda r: r[1]["seconds"] / r[0]["seconds"])[
        (len(runs) - 1) // 2
    ]
    med = np.median([d["seconds"] / o["seconds"] for o, d, _ in runs])
    best = np.median([_floor(d, o)[1] for o, d, _ in runs])
    print(
        f"median ratio over {len(runs)} runs: {med:.2f}x (target 1.2x); median of the best "
        f"possible (the fit's CPU over all cores): {best:.2f}x; the median run:"
    )
    print(f"in-process : {ours['seconds']:8.2f} s  peak RSS {ours['peak_rss'] / gib:.2f} GiB")
    _report("distributed", dist, ours, a)
    if other is not None:
        _report(f"distributed ({a.compare})", other, ours, a)


if __name__ == "__main__":
    main()
