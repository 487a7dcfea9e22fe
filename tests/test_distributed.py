"""The vectors stay on the Dask workers: distributed load and DBSCAN on real `dask scheduler` and
`dask worker --memory-limit` processes started here."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tests._shards as sh
from dedup_batch.errors import InputError
from dedup_batch.load import DistributedFeatures, Features, load_features
from dedup_batch.storage import Store
from tests._dask_procs import dask_processes

pytestmark = pytest.mark.cluster
#: Each worker's --memory-limit: above a worker's own footprint (~150 MB with numpy, scipy and
#: scikit-learn loaded), below the size of the X of the memory test.
#: The module's workers: a worker's own ~0.3 GB plus a few small fits. At 400 MiB its 80%
#: pause threshold (335 MB) sat just above that baseline, and with distributed 2026.8.0 a
#: paused worker stalled the plan test after the fits; the test of limits below X is below.
WORKER_LIMIT = 1 << 30


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A `dask scheduler` and two `dask worker --memory-limit` processes (1 thread each)."""
    logs = tmp_path_factory.mktemp("dask-logs")
    with dask_processes(logs, 2, ("--memory-limit", str(WORKER_LIMIT))) as address:
        yield address


@pytest.fixture
def client(scheduler: str) -> Iterator:
    from distributed import Client

    with Client(scheduler, timeout="30s") as c:
        yield c


@pytest.fixture
def root(tmp_path: Path) -> Store:
    (tmp_path / "feat").mkdir()
    return Store(str(tmp_path))


def _shard(root: Store, name: str, paths: list[str], X: np.ndarray) -> str:
    return sh.put(os.path.join(root.root, "feat", name), sh.wide_parquet(paths, X))


# -- load ----------------------------------------------------------------------------------------
def test_load_leaves_validated_blocks_on_the_workers(root, client):
    from distributed import futures_of

    a_paths, a_X = sh.vectors(50, 8, seed=1)
    b_paths, b_X = sh.vectors(30, 8, seed=2, prefix="other")
    b_paths[0], b_X[0] = a_paths[2], a_X[2]  # same object, same vector, in another shard
    b_paths[5], b_X[5] = "./" + a_paths[7], a_X[7]  # another spelling of one object
    _shard(root, "a.parquet", a_paths, a_X)
    _shard(root, "b.parquet", b_paths, b_X)
    _shard(root, "c.parquet", [], np.empty((0, 8), np.float32))
    url = os.path.join(root.root, "feat", "*.parquet")
    f = load_features(url, store=root, client=client, distributed="always")
    assert isinstance(f, DistributedFeatures)
    keep = [i for i in range(30) if i not in (0, 5)]
    assert f.X.chunks == ((50, 28), (8,))  # one block per non-empty shard, kept apart
    # held: every block is in a worker's memory, none computed here; X itself is its lineage
    # (read and select tasks, no futures), so it stays computable once the blocks are released
    assert [fut.status for fut in f.held.futures] == ["finished", "finished"]
    assert futures_of(f.X) == []
    expected = np.concatenate([a_X, b_X[keep]])
    np.testing.assert_array_equal(f.X.compute(), expected)
    assert f.path_array().tolist() == a_paths + [b_paths[i] for i in keep]
    gathered = load_features(url, store=root, client=client, distributed="never")
    assert isinstance(gathered, Features)
    np.testing.assert_array_equal(gathered.X, f.X.compute())
    # auto: these 78 rows fit anywhere, so they are gathered
    assert isinstance(load_features(url, store=root, client=client, distributed="auto"), Features)


def test_taken_blocks_are_freed_and_read_again_when_needed(root, client):
    """A fit takes the loaded blocks over (load.take_blocks): once it drops them no worker
    holds them, and X is still computable, by reading its shards again."""
    import time

    from dedup_batch.load import take_blocks

    a_paths, a_X = sh.vectors(50, 8, seed=1)
    _shard(root, "a.parquet", a_paths, a_X)
    _shard(root, "b.parquet", [p.replace("img", "b") for p in a_paths], a_X + 1)
    f = load_features(
        os.path.join(root.root, "feat", "*.parquet"),
        store=root,
        client=client,
        distributed="always",
    )
    keys = {fut.key for fut in f.held.futures}
    assert keys <= set().union(*client.has_what().values())
    taken = take_blocks(f.X)
    assert {fut.key for fut in taken} == keys and f.held.futures == []
    assert take_blocks(f.X) == []  # taken once
    del taken
    deadline = time.monotonic() + 10
    while keys & set().union(*client.has_what().values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not keys & set().union(*client.has_what().values())
    np.testing.assert_array_equal(f.X.compute(), np.concatenate([a_X, a_X + 1]))


def test_load_on_workers_refuses_what_the_gathered_load_refuses(root, client):
    a_paths, a_X = sh.vectors(40, 4, seed=1)
    b_paths, b_X = sh.vectors(40, 4, seed=2, prefix="other")
    b_paths[3] = a_paths[1]  # the same object with another vector
    b_paths[9] = a_paths[30]
    a = _shard(root, "a.parquet", a_paths, a_X)
    b = _shard(root, "b.parquet", b_paths, b_X)
    url = os.path.join(root.root, "feat", "*.parquet")
    with pytest.raises(InputError) as err:
        load_features(url, store=root, client=client, distributed="always")
    assert str(err.value).startswith(
        f"path 'img/00001.jpg' at {b} row 3 names the same object ('img/00001.jpg') as "
        f"'img/00001.jpg' at {a} row 1, with a different vector"
    )
    bad = a_X.copy()
    bad[17, 2] = np.nan
    _shard(root, "b.parquet", [p.replace("img", "x") for p in a_paths], bad)
    with pytest.raises(InputError, match=r"b\.parquet: row 17 .* nan in column '2'"):
        load_features(url, store=root, client=client, distributed="always")
    _shard(root, "b.parquet", b_paths[:1], np.ones((1, 5), np.float32))
    with pytest.raises(InputError, match="has 5-dimensional vectors but"):
        load_features(url, store=root, client=client, distributed="always")


# -- cluster -------------------------------------------------------------------------------------
def _data(kind: str, seed: int = 0) -> np.ndarray:
    """Named inputs with known hard spots (float32)."""
    rng = np.random.default_rng(seed)
    if kind == "groups":  # noisy copies of 150 centres, a dense near-identical group, copies
        base = rng.standard_normal((150, 24)).astype(np.float32) * 3
        X = np.concatenate(
            [base + 0.35 * rng.standard_normal(base.shape, np.float32) for _ in (0,) * 8]
        )
        X[:200] = X[0] + 1e-4 * rng.standard_normal((200, 24), np.float32)
        X = X[rng.permutation(len(X))]
        X[[7, 611, 1190]] = X[300]  # bitwise copies in three blocks
        return X
    if kind == "lattice":  # 0/1 in 6 of 16 dims, 3 far groups: many ties at eps 1 and sqrt 2
        X = np.zeros((900, 16), np.float32)
        X[:, :6] = rng.integers(0, 2, size=(900, 6))
        X[:, 8] = rng.integers(0, 3, size=900) * 10
        return X
    if kind == "sorted":  # a line of points in spatial order: block balls prune far blocks
        X = 0.15 * rng.standard_normal((1200, 20)).astype(np.float32)
        X[:, 0] = np.sort(rng.uniform(0, 1000, 1200))
        return X
    raise ValueError(kind)


CASES = [
    ("groups", "euclidean", 2.3, 1),
    ("groups", "euclidean", 2.3, 5),
    ("groups", "cosine", 0.03, 1),
    ("groups", "cosine", 0.03, 4),
    ("lattice", "euclidean", 1.0, 1),
    ("lattice", "euclidean", float(np.sqrt(np.float64(2))), 3),
    ("sorted", "euclidean", 1.5, 1),
    ("sorted", "euclidean", 1.5, 3),
]


@pytest.mark.parametrize(("kind", "metric", "eps", "min_samples"), CASES)
def test_fit_equals_scikit_learn(client, monkeypatch, caplog, kind, metric, eps, min_samples):
    import logging

    import dask.array as da
    from sklearn.cluster import DBSCAN as SkDBSCAN

    import dedup_batch.cluster_dask as cd
    from dedup_batch.cluster import DBSCAN

    X = _data(kind)
    d = X.shape[1]
    monkeypatch.setattr(cd, "BLOCK_BYTES", 256 * 4 * d)  # 256-row blocks: many tiles
    Xd = client.persist(da.from_array(X, chunks=(300, d)))
    with caplog.at_level(logging.INFO, "dedup_batch.cluster_dask"):
        est = DBSCAN(eps=eps, min_samples=min_samples, metric=metric).fit(Xd, client=client)
    sk = SkDBSCAN(eps=eps, min_samples=min_samples, metric=metric).fit(X)
    np.testing.assert_array_equal(est.labels_, sk.labels_)
    np.testing.assert_array_equal(est.core_sample_indices_, sk.core_sample_indices_)
    np.testing.assert_array_equal(est.components_.compute(), sk.components_)
    assert len(set(sk.labels_) - {-1}) >= 2  # neither all noise nor one cluster
    if metric == "euclidean":  # euclidean is always decided on the workers
        assert "gathering X" not in caplog.text
        assert "block pairs computed" in caplog.text
    if kind == "sorted":  # blocks in spatial order: far block pairs are never scheduled
        pruned = caplog.text.split("DBSCAN (distributed): ")[1]
        done, total = (int(x) for x in pruned.split("; ")[1].split(" block pairs")[0].split(" of "))
        assert done < total


def _groups_on_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Store, np.ndarray]:
    """The "groups" input as 200-row shards under ``tmp_path``, fitted in 128-row blocks (many
    tiles): blocks lost with a worker are recomputed by reading their shards again."""
    import dedup_batch.cluster_dask as cd

    root = Store(str(tmp_path))
    (tmp_path / "feat").mkdir()
    X = _data("groups")
    for k, s in enumerate(range(0, len(X), 200)):
        paths = [f"img/{i:05d}.jpg" for i in range(s, s + len(X[s : s + 200]))]
        _shard(root, f"part-{k}.parquet", paths, X[s : s + 200])
    monkeypatch.setattr(cd, "BLOCK_BYTES", 128 * 4 * X.shape[1])
    return root, X


def _fit_killing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, choose: Callable) -> tuple:
    """Fit the shards of :func:`_groups_on_shards` on two worker processes; after each tile
    result ``choose(fit, i, killed)`` names the workers to SIGKILL (or ``None``). Returns the
    fitted estimator, the input, the pids killed and the workers' pids at the end."""
    import signal

    from distributed import Client

    import dedup_batch.cluster_dask as cd
    from dedup_batch.cluster import DBSCAN

    root, X = _groups_on_shards(tmp_path, monkeypatch)
    killed: list[int] = []
    tiles = cd._DaskFit._tiles

    def killing(self, *args, **kwargs):
        for i, out in enumerate(tiles(self, *args, **kwargs)):
            victims = choose(self, i, killed) or []
            for pid in self.client.run(os.getpid, workers=victims).values():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            yield out

    monkeypatch.setattr(cd._DaskFit, "_tiles", killing)
    with dask_processes(tmp_path, 2) as address, Client(address, timeout="30s") as client:
        f = load_features(
            os.path.join(root.root, "feat", "*.parquet"),
            store=root,
            client=client,
            distributed="always",
        )
        est = DBSCAN(eps=2.3, min_samples=1).fit(f.X, client=client)
        pids = set(client.run(os.getpid).values())
    return est, X, killed, pids


def test_a_worker_killed_mid_fit_does_not_change_the_labels(tmp_path, monkeypatch):
    """SIGKILL the worker holding the most prepared blocks once the first tile is back: the
    scheduler recomputes what died with it (the prepared blocks from the reorder's graph,
    their input blocks from the shards' read tasks) and the fit ends with scikit-learn's
    labels."""
    from sklearn.cluster import DBSCAN as SkDBSCAN

    def most_blocks(fit, i, killed):
        if i != 0 or killed:
            return None
        held = {b.key for b in fit.blocks}
        owner = max(fit.client.has_what().items(), key=lambda kv: len(held & set(kv[1])))[0]
        assert held & set(fit.client.has_what()[owner])  # it holds prepared blocks
        return [owner]

    est, X, killed, pids = _fit_killing(tmp_path, monkeypatch, most_blocks)
    assert killed and killed[0] not in pids  # it died mid-fit; its nanny started another
    sk = SkDBSCAN(eps=2.3, min_samples=1).fit(X)
    np.testing.assert_array_equal(est.labels_, sk.labels_)
    assert est.distributed_stats_["tiles"] > 1


def test_every_worker_killed_at_once_during_the_tiles_does_not_change_the_labels(
    tmp_path, monkeypatch
):
    """Both workers die together once the first tile is back (a node lost with all its
    workers): everything the later tiles read (the prepared blocks *and* whatever the fit
    shares among its tiles) must be recomputable from the graph. Data sent to the workers
    without lineage (a scatter, even broadcast) dies with them, and the tiles that need it
    are cancelled ("already forgotten")."""
    from sklearn.cluster import DBSCAN as SkDBSCAN

    def every(fit, i, killed):
        if i == 0 and not killed:
            return list(fit.client.scheduler_info(n_workers=-1)["workers"])
        return None

    est, X, killed, pids = _fit_killing(tmp_path, monkeypatch, every)
    assert len(killed) == 2 and not set(killed) & pids
    sk = SkDBSCAN(eps=2.3, min_samples=1).fit(X)
    np.testing.assert_array_equal(est.labels_, sk.labels_)
    assert est.distributed_stats_["tiles"] > 1


def test_a_cluster_whose_workers_stay_paused_ends_the_stage_with_an_error(tmp_path, monkeypatch):
    """Workers paused for good (their memory above Dask's pause threshold, here set to 1% of
    the limit) run nothing: the load and the fit each stop with an error naming the paused
    workers and what to do, instead of waiting forever."""
    import time

    import dask.array as da
    from distributed import Client

    from dedup_batch import executor
    from dedup_batch.cluster import DBSCAN
    from dedup_batch.errors import ConfigError

    monkeypatch.setattr(executor, "PAUSED_TIMEOUT", 4.0)
    root, X = _groups_on_shards(tmp_path, monkeypatch)
    paused = {"DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE": "0.01"}
    with (
        dask_processes(tmp_path, 2, ("--memory-limit", "1GiB"), paused) as address,
        Client(address, timeout="30s") as client,
    ):
        url = os.path.join(root.root, "feat", "*.parquet")
        t = time.monotonic()
        with pytest.raises(ConfigError, match=r"^load: no Dask task finished in 4 s while 2 "):
            load_features(url, store=root, client=client, distributed="always")
        with pytest.raises(ConfigError, match=r"^cluster \(distributed DBSCAN\): .* paused") as err:
            DBSCAN(eps=2.3, min_samples=1).fit(da.from_array(X, chunks=(300, -1)), client=client)
        assert time.monotonic() - t < 60
    assert "MB of a 1074 MB limit" in str(err.value) and "--memory-limit" in str(err.value)


#: the memory test: 150,000 x 1024 float32 (X = 614 MB, 37 NPZ shards) on 4 workers limited to
#: 600 MB each (each worker's own footprint is 0.25-0.3 GB: its share of X must be held once,
#: not twice, and a tile's working memory stays ~0.1 GB). At 128,000 rows and 500 MB a worker
#: peaked at 0.35-0.40 GiB against the nanny's restart at 0.44 GiB: alone the test passed, but
#: in the whole suite a worker was restarted three times (the plan still completed); at 600 MB
#: the restart is at 0.53 GiB, for ~0.02 GiB more of X per worker. There the reorder peaked at
#: 0.47-0.51 GiB until its spilled transients were cut (docs/scaling.md): 0.43-0.49 GiB. Few
#: rows of many dimensions: X stays above a worker's limit while the per-row work (paths,
#: listing, select) stays small.
BIG_N, BIG_D, BIG_LIMIT, BIG_SHARD = 150_000, 1024, 600_000_000, 4096
#: The memory test's workers do not pause. Dask pauses a worker at 80% of its limit to stop it
#: taking new work while its managed data grows; the threshold is sized for real workers (the
#: chart's are 8 GiB), where a worker's own ~0.25 GB (Python, NumPy, SciPy, scikit-learn,
#: pandas, pyarrow: unmanaged, spilling cannot free it) is a few percent of the limit. At 500-
#: 600 MB it is 40-60%, and the 80% threshold (381-458 MiB) sits among or near a worker's
#: per-stage peaks (0.34-0.40 GiB measured at 500 MB): at 450 MB with distributed 2026.8.0,
#: workers paused on their own footprint and the plan stalled. Spilling (60-70%) and the
#: nanny's restart at 95% stay as Dask sets them, and the test fails on any restart: the bound
#: tested is the limit itself.
#: (A cluster that does stay paused now ends the stage with an error: see the paused test.)
BIG_WORKER_ENV = {"DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE": "False"}


def _write_big(folder: Path) -> np.ndarray:
    """Shards of rows whose answer is known without computing it: 5% of the rows are copies
    (groups of 2-4) of a centre, the others lone centres; centres are distinct points of a
    3-d lattice of step 0.25 (so at least 0.25 apart) in an orthonormal 3-d subspace, each row
    is its centre plus 1e-3 noise per dimension (about 0.04 between two rows of a group).
    Embeddings spread along a few leading directions, as real ones mostly are: the blocks'
    bounds prune most block pairs. Written shard by shard (the test process never holds X);
    returns each row's group (rows of one group share it)."""
    rng = np.random.default_rng(0)
    group = np.arange(BIG_N)
    copies = rng.choice(BIG_N, BIG_N // 20, replace=False)
    group[copies] = rng.choice(np.setdiff1d(group, copies), len(copies) // 3)[
        rng.integers(0, len(copies) // 3, len(copies))
    ]
    side = int(np.ceil(BIG_N ** (1 / 3))) + 1
    cells = rng.choice(side**3, size=BIG_N, replace=False)  # distinct lattice points
    centres = np.stack(np.unravel_index(cells, (side,) * 3), axis=1) * 0.25
    basis = np.linalg.qr(rng.standard_normal((BIG_D, 3)))[0].T
    for k, s in enumerate(range(0, BIG_N, BIG_SHARD)):
        e = min(BIG_N, s + BIG_SHARD)
        x = (centres[group[s:e]] @ basis).astype(np.float32)
        x += 1e-3 * rng.standard_normal(x.shape, dtype=np.float32)
        paths = np.asarray([f"img/{i:07d}.jpg" for i in range(s, e)])
        np.savez(folder / f"part-{k:05d}.npz", paths=paths, embeddings=x)
    return group


# The client: a process of its own, so that its peak RSS is its own; its RSS is also sampled
# every 20 ms during the cluster stage (load + listing before it hold the paths and the
# listing: O(n), not X), from the stage's own log lines.
_PLAN_CLIENT = """
import json, logging, re, sys, threading, time, psutil
from distributed import Client
from dedup_batch.config import JobSpec
from dedup_batch.pipeline import plan
# this process's own high-water mark (VmHWM), not ru_maxrss: Linux starts a child's ru_maxrss
# at its parent's RSS when it was spawned (a whole suite's pytest: 1.25 GB in the CI rehearsal)
hwm = re.compile(r"VmHWM:\\s+(\\d+) kB")
peak = lambda: int(hwm.search(open("/proc/self/status").read()).group(1)) * 1024
rss = lambda: psutil.Process().memory_info().rss
fit = {}
def sample():
    while "end" not in fit:
        fit["max"] = max(fit.get("max", 0), rss())
        time.sleep(0.02)
class Stages(logging.Handler):
    def emit(self, record):
        if record.getMessage() == "cluster: started":
            fit["start"] = rss()
            threading.Thread(target=sample, daemon=True).start()
        elif record.getMessage().startswith("cluster: done"):
            fit["end"] = rss()
logging.getLogger("dedup_batch").addHandler(Stages())
logging.getLogger("dedup_batch").setLevel(logging.INFO)
with Client(sys.argv[1], timeout="30s") as client:
    base = rss()
    spec = JobSpec.from_mapping({"features": [sys.argv[2] + "/feat/*.npz"], "root": sys.argv[2],
        "eps": 0.1, "report": False, "out": sys.argv[2] + "/out", "distributed": "always"})
    plan(spec, client)
print(json.dumps({"base": base, "fit": fit["max"] - fit["start"], "peak": peak()}))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~60 s on 2 cores; 4 worker processes under load take more
def test_workers_limited_below_x_run_a_whole_plan_the_client_never_holding_x(tmp_path):
    """Four `dask worker --memory-limit 600MB` processes and X of 614 MB: load, fit and the
    whole `plan` complete, the clusters are the known ones (scikit-learn's partition: every
    within-group distance < eps < every other), and the client process (a child of this one,
    whose peak RSS is measured) never held X."""
    import json
    import subprocess
    import sys

    import pandas as pd

    from dedup_batch.cluster_dask import _number

    (tmp_path / "feat").mkdir()
    (tmp_path / "img").mkdir()
    for i in range(100):  # plan needs some of the objects to exist
        (tmp_path / "img" / f"{i:07d}.jpg").write_bytes(b"x")
    group = _write_big(tmp_path / "feat")
    nbytes = BIG_N * BIG_D * 4
    assert nbytes > BIG_LIMIT
    limit = ("--memory-limit", str(BIG_LIMIT))
    with dask_processes(tmp_path, 4, limit, BIG_WORKER_ENV) as address:
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        child = [sys.executable, "-c", _PLAN_CLIENT, address, str(tmp_path)]
        done = subprocess.run(child, capture_output=True, text=True, env=env, timeout=480)
        assert done.returncode == 0, done.stderr[-3000:]
        restarts = [
            line
            for log in tmp_path.glob("worker*.log")
            for line in log.read_text().splitlines()
            if "Restarting worker" in line
        ]
    assert restarts == []  # no worker went over 95% of its limit
    rss = json.loads(done.stdout.splitlines()[-1])
    # the client never held X: during the fit it grew by less than a quarter of X (O(n)
    # integers and a d x d gram); the whole plan (the listing, paths, the plan table, select's
    # clustered rows, a 20,000-row sample for the warnings and their k-distances in
    # scikit-learn's chunks) by less than X
    assert rss["fit"] < nbytes / 4, rss
    assert rss["peak"] - rss["base"] < nbytes, rss
    table = pd.read_parquet(tmp_path / "out" / "plan.parquet")
    table = table.set_index("path").loc[[f"img/{i:07d}.jpg" for i in range(BIG_N)]]
    np.testing.assert_array_equal(table["cluster"].to_numpy(), _number(group))


def test_not_covered_inputs_are_gathered_and_still_exact(client, caplog):
    import logging

    import dask.array as da
    from sklearn.cluster import DBSCAN as SkDBSCAN

    from dedup_batch.cluster import DBSCAN

    X = _data("groups")[:400]
    for Xn, kw in [
        (X.astype(np.float64), {"metric": "euclidean"}),  # float64
        (X[:, :8], {"metric": "euclidean"}),  # d <= 15: scikit-learn's KD-tree decides
        (X, {"metric": "manhattan"}),
        (np.vstack([X, np.zeros((2, 24), np.float32)]), {"metric": "cosine"}),  # zero rows
    ]:
        caplog.clear()
        with caplog.at_level(logging.INFO, "dedup_batch.cluster_dask"):
            Xd = da.from_array(Xn, chunks=(150, -1))
            est = DBSCAN(eps=0.9, min_samples=2, **kw).fit(Xd, client=client)
        sk = SkDBSCAN(eps=0.9, min_samples=2, **kw).fit(Xn)
        np.testing.assert_array_equal(est.labels_, sk.labels_)
        assert "gathering X on the client" in caplog.text


# -- the whole plan ------------------------------------------------------------------------------
def test_plan_is_the_same_in_process_and_distributed(tmp_path, scheduler, client):
    """Through the public entry point: the demo planned with the vectors gathered and with
    them left on the workers gives the same plan, row for row."""
    import pandas as pd

    from dedup_batch.config import JobSpec
    from dedup_batch.demo import DEMO_EPS, make_demo
    from dedup_batch.pipeline import plan

    info = make_demo(tmp_path / "demo", n_images=60, seed=3, shards=4)
    base = {"features": [info["features"]], "root": info["root"], "eps": DEMO_EPS}
    base["report"] = False
    results = {}
    for mode in ("never", "always"):
        spec = JobSpec.from_mapping({**base, "out": str(tmp_path / mode), "distributed": mode})
        results[mode] = plan(spec, client)
    gathered, spread = results["never"].plan, results["always"].plan
    assert len(gathered) == info["images"] and (~gathered["keep"]).sum() > 10  # it deletes
    pd.testing.assert_frame_equal(gathered, spread)
    assert pd.read_parquet(tmp_path / "always" / "plan.parquet").equals(spread)


@pytest.mark.parametrize("cosine", [False, True])
def test_a_tiles_working_rows_are_its_blocks_own_kept_per_block_and_gone_with_it(cosine):
    """A tile's working rows (cluster_dask._tile_rows): the augmented rows ``[c, 1, csq]``
    of block A then block B, as the in-process engine builds them (float64 centring or
    normalising, then float32). A's are kept for the worker's next tiles with room after
    them for B's (one entry per live block, at most _WORKING_BLOCKS), never written again
    (B's are written after them; a B too large gets rows of its own), the same bits when
    built again; a second thread's tile with the same A gets its own rows; an entry goes
    with its block."""
    import gc
    import threading

    import dedup_batch.cluster_dask as cd

    X = _data("groups")[:700]
    g = SimpleNamespace(cosine=cosine, mean=None if cosine else X.mean(0, dtype=np.float64))
    g.V = np.linalg.qr(np.random.default_rng(0).standard_normal((X.shape[1], 4)))[0]
    g.n_split, g.threshold, g.kind = 1, 4.0, "cosine" if cosine else "brute"
    blocks = [cd._block_prep([X[s:e]], g) for s, e in ((0, 200), (200, 400), (400, 700))]

    def expected(b: SimpleNamespace) -> np.ndarray:
        x64 = b.x.astype(np.float64)
        c64 = x64 / np.sqrt(np.einsum("ij,ij->i", x64, x64))[:, None] if cosine else x64 - g.mean
        return np.column_stack([c64, np.ones(len(c64)), b.csq]).astype(np.float32)

    want = [expected(b) for b in blocks]
    cd._working.clear()
    with cd._tile_rows(blocks[0], None, g) as rows:
        np.testing.assert_array_equal(rows, want[0])
        first = rows
    with cd._tile_rows(blocks[0], blocks[1], g) as rows:
        np.testing.assert_array_equal(rows, np.concatenate([want[0], want[1]]))
        assert np.shares_memory(rows, first)  # A's kept: not centred again
        kept = cd._working[id(blocks[0])].buf
        # a second thread's tile on the same A while this one writes after A's rows
        seen = []

        def other(a: SimpleNamespace, b: SimpleNamespace) -> None:
            with cd._tile_rows(a, b, g) as mine:
                seen.append((np.shares_memory(mine, kept), mine.copy()))

        t = threading.Thread(target=other, args=(blocks[0], blocks[2]))
        t.start()
        t.join()
        assert not seen[0][0]
        np.testing.assert_array_equal(seen[0][1], np.concatenate([want[0], want[2]]))
        np.testing.assert_array_equal(rows[200:], want[1])  # untouched by the other
    with cd._tile_rows(blocks[0], blocks[2], g) as rows:  # a B too large: rows of its own
        np.testing.assert_array_equal(rows, np.concatenate([want[0], want[2]]))
        assert not np.shares_memory(rows, kept)
    assert cd._working[id(blocks[0])].buf is kept  # the kept rows stay
    assert cd._WORKING_BLOCKS == 1
    with cd._tile_rows(blocks[1], blocks[0], g) as rows:
        np.testing.assert_array_equal(rows, np.concatenate([want[1], want[0]]))
    assert list(cd._working) == [id(blocks[1])]  # the least recently used went
    with cd._tile_rows(blocks[0], None, g) as rows:  # so it is built again, same bits
        assert not np.shares_memory(rows, kept)
        np.testing.assert_array_equal(rows, want[0])
    with cd._tile_rows(blocks[2], None, g):
        pass
    assert list(cd._working) == [id(blocks[2])]
    del blocks[2]
    gc.collect()
    assert list(cd._working) == []  # its block gone, so is its entry


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3000),
    parts=st.integers(1, 80),
    cols=st.integers(1, 3),
    levels=st.sampled_from([None, 1, 3, 50]),
    seed=st.integers(0, 2**16),
)
def test_split_tree_cuts_equal_shares_and_descend_finds_them(n, parts, cols, levels, seed):
    """cluster_dask._split_tree: ``parts`` cells (fewer only where the rows left are all
    equal) of equal shares of the rows, to within the rows tied at a split; :func:`_descend`
    puts every row in a cell whose bounds hold it, the same cell for equal rows."""
    from dedup_batch.cluster_dask import _descend, _split_tree

    rng = np.random.default_rng(seed)
    P = rng.standard_normal((n, cols))
    if levels is not None:  # ties: few distinct values per column
        P = np.round(P * levels) / levels
    tree = _split_tree(P, parts)
    cells = _descend(tree, P)
    count = np.bincount(cells)
    distinct = len(np.unique(P, axis=0))
    assert len(count) <= min(parts, n) and (count > 0).all()
    if levels is None:  # distinct values: exactly parts cells (or one per row), equal shares
        assert len(count) == min(parts, n)
        assert count.max() - count.min() <= parts.bit_length() + 1, count  # rounding a level
    else:
        assert len(count) >= min(parts, distinct, 2) if n > 1 else len(count) == 1
    # equal rows, one cell
    _, first, inv = np.unique(P, axis=0, return_index=True, return_inverse=True)
    np.testing.assert_array_equal(cells, cells[first][inv.ravel()])


@settings(max_examples=80, deadline=None)
@given(
    blocks=st.lists(
        st.tuples(st.integers(0, 100), st.sampled_from([None, "w0", "w1", "w2"])), max_size=40
    ),
    cap=st.integers(1, 250),
)
def test_reorder_batches_cover_each_block_once_on_one_worker(blocks, cap):
    """cluster_dask._batches: every input block in exactly one batch; a batch's blocks on one
    worker, ascending, within ``cap`` bytes unless it is one block; an unknown holder's
    block alone; batches in order of their first block (the order the pieces keep)."""
    from dedup_batch.cluster_dask import _batches

    sizes = [s for s, _ in blocks]
    owner = [w for _, w in blocks]
    out = _batches(sizes, owner, cap)
    assert sorted(i for b in out for i in b) == list(range(len(blocks)))
    assert out == sorted(out)
    for b in out:
        assert b == sorted(b) and len({owner[i] for i in b}) == 1
        assert len(b) == 1 or (owner[b[0]] is not None and sum(sizes[i] for i in b) <= cap)


@settings(max_examples=80, deadline=None)
@given(
    lens=st.lists(st.integers(0, 30), min_size=1, max_size=5),
    frac=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_a_piece_is_the_rows_of_its_blocks_concatenated(lens, frac, seed):
    """cluster_dask._take_rows fills a reorder's piece from a batch's blocks in place: the
    same rows, in the same order, as indexing their concatenation (which it never makes)."""
    from dedup_batch.cluster_dask import _take_rows

    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((m, 3)).astype(np.float32) for m in lens]
    whole = np.concatenate(xs)
    rows = np.flatnonzero(rng.random(len(whole)) < frac)
    got = _take_rows(xs, rows)
    assert got.dtype == whole.dtype
    np.testing.assert_array_equal(got, whole[rows])


@contextmanager
def _two_workers() -> Iterator[tuple[Any, list[str]]]:
    """A LocalCluster of two one-thread workers in this process: its client and the workers'
    addresses, sorted (tests place blocks on each in turn)."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as lc,
        Client(lc) as client,
    ):
        yield client, sorted(client.scheduler_info()["workers"])


def _first_rows(x: np.ndarray, k: int, scale: float) -> np.ndarray:
    return x[:k] * scale


def test_per_block_tasks_in_batches_answer_in_block_order():
    """cluster_dask._map_batches runs a per-block task a few blocks at a time on the worker
    holding them: with blocks spread over two workers in turn, unknown holders among them
    and several batches per worker, each block's answer comes back at its block's place."""
    import dedup_batch.cluster_dask as cd

    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((int(rng.integers(1, 40)), 4)) for _ in range(11)]
    with _two_workers() as (client, workers):
        blocks = [client.scatter(x, workers=[workers[i % 2]]) for i, x in enumerate(xs)]
        who = client.who_has(blocks)
        owner = [(who.get(f.key) or [None])[0] for f in blocks]
        assert owner == [workers[i % 2] for i in range(11)]
        owner[4] = owner[7] = None  # holder unknown: a batch of its own
        sizes = [x.nbytes for x in xs]
        ks = list(range(11))
        old = cd._CUT_BYTES
        cd._CUT_BYTES = 3 * 40 * 4 * 8  # a few blocks per batch
        try:
            got = cd._map_batches(client, _first_rows, blocks, owner, sizes, ks, 2.0)
        finally:
            cd._CUT_BYTES = old
    assert len(got) == len(xs)
    for x, k, g in zip(xs, ks, got, strict=True):
        np.testing.assert_array_equal(g, x[:k] * 2.0)


def test_reorder_in_batches_keeps_labels_with_blocks_interleaved_across_workers(tmp_path):
    """A worker's input blocks are cut a batch at a time: with the shards spread over two
    workers in turn (so a batch's blocks are not consecutive in the input) and a cut size
    that makes several batches per worker, the reordered rows still map to their input rows:
    labels equal scikit-learn's."""
    import dask.array as da
    from sklearn.cluster import DBSCAN as SkDBSCAN

    import dedup_batch.cluster_dask as cd
    from dedup_batch.cluster import DBSCAN

    rng = np.random.default_rng(5)
    centres = rng.standard_normal((300, 16)).astype(np.float32)
    X = centres[rng.integers(0, 300, 3000)] + 0.05 * rng.standard_normal((3000, 16)).astype(
        np.float32
    )
    want = SkDBSCAN(eps=0.5, min_samples=1).fit(X).labels_
    with _two_workers() as (client, workers):
        parts = [
            client.persist(da.from_array(X[s : s + 250], chunks=(250, 16)), workers=workers[k % 2])
            for k, s in enumerate(range(0, 3000, 250))
        ]
        Xd = da.concatenate(parts)
        old = (cd._CUT_BYTES, cd.BLOCK_BYTES)
        cd._CUT_BYTES, cd.BLOCK_BYTES = 2 * 250 * 16 * 4, 400 * 16 * 4  # 2 shards, 8 cells
        try:
            got = DBSCAN(eps=0.5, min_samples=1).fit(Xd, client=client).labels_
        finally:
            cd._CUT_BYTES, cd.BLOCK_BYTES = old
    np.testing.assert_array_equal(got, want)
