"""min_samples=1 computes components, not pairs: tiles whose rows are already one component
are skipped, a tile returns a spanning forest, and near-eps pairs inside one component are not
re-checked. Labels stay scikit-learn's; a dense group of noisy copies whose pair list would
need many GB clusters under an address-space limit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from sklearn.cluster import DBSCAN as SkDBSCAN

import dedup_batch.cluster as cluster_mod
from dedup_batch.cluster import DBSCAN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_same(X, **params):
    ours = DBSCAN(**params).fit(X)
    ref = SkDBSCAN(**params).fit(X)
    np.testing.assert_array_equal(ours.labels_, ref.labels_)
    np.testing.assert_array_equal(ours.core_sample_indices_, ref.core_sample_indices_)
    return ours


def noisy_groups(rng, n, d, group_share, n_groups, spread, dtype=np.float32):
    """Background rows plus ``n_groups`` dense groups of noisy copies (each copy at its own
    distance, up to ``spread``, from the group's original): not bit-identical copies."""
    X = rng.standard_normal((n, d))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    idx = rng.permutation(n)[: int(group_share * n)]
    for part in np.array_split(idx, n_groups):
        if len(part) == 0:
            continue
        noise = rng.standard_normal((len(part), d))
        noise *= rng.uniform(0.0, spread, (len(part), 1)) / np.linalg.norm(noise, axis=1)[:, None]
        X[part] = X[part[0]] + noise
    return X.astype(dtype)


@pytest.fixture
def tiny_tiles(monkeypatch):
    monkeypatch.setattr(cluster_mod, "LEAF", 32)
    monkeypatch.setattr(cluster_mod, "TILE", 96)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    d=st.sampled_from([3, 16, 40, 128]),
    n=st.integers(50, 1500),
    share=st.sampled_from([0.3, 0.6, 0.95]),
    n_groups=st.integers(1, 4),
    spread=st.sampled_from([0.05, 0.3, 0.5]),
    metric=st.sampled_from(["euclidean", "cosine"]),
    n_jobs=st.sampled_from([1, 2]),
)
def test_dense_noisy_groups_match_sklearn(seed, d, n, share, n_groups, spread, metric, n_jobs):
    # eps cuts through the groups (some copies beyond eps of the original, chains of copies):
    # components form tile by tile while later tiles are skipped or restricted.
    rng = np.random.default_rng(seed)
    X = noisy_groups(rng, n, d, share, n_groups, spread)
    eps = 0.25 if metric == "euclidean" else 0.03
    old = cluster_mod.LEAF, cluster_mod.TILE
    cluster_mod.LEAF, cluster_mod.TILE = 32, 96
    try:
        assert_same(X, eps=eps, min_samples=1, metric=metric, n_jobs=n_jobs)
    finally:
        cluster_mod.LEAF, cluster_mod.TILE = old


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    d=st.sampled_from([2, 16, 40, 128]),
    n=st.integers(20, 1200),
    share=st.sampled_from([0.3, 0.6, 0.95]),
    n_groups=st.integers(1, 4),
    spread=st.sampled_from([0.05, 0.3, 0.5]),
    metric=st.sampled_from(["euclidean", "cosine"]),
    min_samples=st.integers(2, 12),
    n_jobs=st.sampled_from([1, 2]),
)
def test_min_samples_counts_engine_matches_sklearn(
    seed, d, n, share, n_groups, spread, metric, min_samples, n_jobs
):
    # min_samples > 1 without edge lists: counts (saturated pairs skipped), core components,
    # border rows' smallest cluster; chains of copies make core, border and noise rows.
    rng = np.random.default_rng(seed)
    X = noisy_groups(rng, n, d, share, n_groups, spread)
    eps = 0.25 if metric == "euclidean" else 0.03
    old = cluster_mod.LEAF, cluster_mod.TILE
    cluster_mod.LEAF, cluster_mod.TILE = 32, 96
    try:
        assert_same(X, eps=eps, min_samples=min_samples, metric=metric, n_jobs=n_jobs)
    finally:
        cluster_mod.LEAF, cluster_mod.TILE = old


@pytest.mark.parametrize("min_samples", [2, 3, 7])
def test_min_samples_ties_at_eps(min_samples):
    # integer grid: many pairs exactly at eps decide core and border status
    rng = np.random.default_rng(min_samples)
    for d in (2, 20):
        X = rng.integers(0, 4, size=(500, d)).astype(np.float32)
        for eps in (1.0, 2.0**0.5, 2.0):
            assert_same(X, eps=eps, min_samples=min_samples)


def _cells(monkeypatch, X, eps, skip):
    """Low-rank products' cells computed by a fit (rows x columns of every tile block)."""
    cells = []
    block = cluster_mod._pairs_block

    def spy(prep, a, ia, ib, *args):
        cells.append(len(ia) * len(ib))  # a block's products (screen, full or both)
        return block(prep, a, ia, ib, *args)

    monkeypatch.setattr(cluster_mod, "_pairs_block", spy)
    if not skip:  # every row its own component as far as the tiles can tell
        monkeypatch.setattr(cluster_mod._LiveRoots, "__call__", lambda self, a, rows: -1 - rows)
    # one thread: each tile sees every earlier merge (with threads, how much is skipped
    # depends on timing; correctness does not, see the hypothesis test)
    labels = DBSCAN(eps=eps, min_samples=1, n_jobs=1).fit(X).labels_
    monkeypatch.undo()
    return sum(cells), labels


def test_tiles_inside_one_component_are_skipped(monkeypatch):
    # 3000 noisy copies of one vector in 4000 rows: with skipping, the blocks computed are a
    # small fraction of those computed when every tile is evaluated; same labels.
    rng = np.random.default_rng(0)
    X = noisy_groups(rng, 4000, 48, 0.75, 1, 0.2)
    monkeypatch.setattr(cluster_mod, "LEAF", 64)
    monkeypatch.setattr(cluster_mod, "TILE", 256)
    with_skip, lab1 = _cells(monkeypatch, X, 0.3, True)
    monkeypatch.setattr(cluster_mod, "LEAF", 64)
    monkeypatch.setattr(cluster_mod, "TILE", 256)
    without, lab2 = _cells(monkeypatch, X, 0.3, False)
    np.testing.assert_array_equal(lab1, lab2)
    np.testing.assert_array_equal(lab1, SkDBSCAN(eps=0.3, min_samples=1).fit(X).labels_)
    assert with_skip < 0.25 * without


def test_tile_returns_a_spanning_forest(tiny_tiles):
    # A tile over a dense group returns at most one edge per row it touches, not its pairs.
    rng = np.random.default_rng(1)
    X = noisy_groups(rng, 600, 16, 1.0, 1, 0.05)
    mode = cluster_mod._resolve_mode(DBSCAN(eps=0.3), X, None)
    prep = cluster_mod._prepare(X, 0.3, mode, X.dtype)
    luf = cluster_mod._UnionFind(len(X))
    roots = cluster_mod._LiveRoots(luf.parent)
    for a, bs in cluster_mod._leaf_pairs(prep):
        si = cluster_mod._tile_task(prep, a, bs, roots)[0]
        touched = int(prep.bounds[a + 1] - prep.bounds[a]) + sum(
            int(prep.bounds[b + 1] - prep.bounds[b]) for b in bs
        )
        assert len(si) < touched
        full = cluster_mod._tile_task(prep, a, bs, None)[0]
        assert len(full) > 2 * len(si) or len(full) == len(si)
    assert len(cluster_mod._leaf_pairs(prep)) > 5


def test_forest_keeps_the_components():
    rng = np.random.default_rng(2)
    i = rng.integers(0, 300, 5000)
    j = rng.integers(0, 300, 5000) // 3 * 3
    fi, fj = cluster_mod._forest(i, j)
    assert len(fi) < 300
    a, b = cluster_mod._UnionFind(300), cluster_mod._UnionFind(300)
    a.union(i, j)
    b.union(fi, fj)
    np.testing.assert_array_equal(a.roots(), b.roots())


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_nodes=st.integers(2, 400),
    n_edges=st.integers(0, 3000),
    # node numbers in a narrow range (position table) or spread far apart (searchsorted)
    spread=st.sampled_from([1, 3, 1 << 16, 1 << 30]),
)
def test_forest_with_known_nodes_keeps_the_components(seed, n_nodes, n_edges, spread):
    # _forest given the sorted nodes (as a tile block passes them): the same components as
    # all the edges, at most one edge per node, whichever way the endpoints are located
    rng = np.random.default_rng(seed)
    nodes = np.unique(rng.integers(0, n_nodes * spread, n_nodes)) + 7
    k = len(nodes)
    li, lj = rng.integers(0, k, n_edges), rng.integers(0, k, n_edges) // 2 * 2
    fi, fj = cluster_mod._forest(nodes[li], nodes[lj], nodes)
    # a computed forest has under one edge per node; small or sparse edge sets come back whole
    assert len(fi) == n_edges or len(fi) < k
    pos = {int(v): q for q, v in enumerate(nodes)}
    a, b = cluster_mod._UnionFind(k), cluster_mod._UnionFind(k)
    a.union(li, lj)
    b.union(
        np.array([pos[int(v)] for v in fi], np.int64), np.array([pos[int(v)] for v in fj], np.int64)
    )
    np.testing.assert_array_equal(a.roots(), b.roots())


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    k=st.integers(1, 300),
    n_edges=st.integers(0, 2000),
    shape=st.sampled_from(["random", "chain", "shuffled chain", "stars"]),
    rounds=st.integers(0, 4),
)
def test_lowest_in_component_matches_scipy(seed, k, n_edges, shape, rounds):
    # the propagation's answer, settled or finished by SciPy after `rounds` (0: SciPy alone
    # on the starting labels), is each node's smallest component member, as SciPy finds it
    rng = np.random.default_rng(seed)
    if shape == "random":
        li, lj = rng.integers(0, k, n_edges), rng.integers(0, k, n_edges)
    elif shape == "stars":
        li, lj = rng.integers(0, k, n_edges), rng.integers(0, max(1, k // 20), n_edges)
    else:  # a path: many rounds of propagation unless the nodes are in order
        path = rng.permutation(k) if shape == "shuffled chain" else np.arange(k)
        li, lj = path[:-1], path[1:]
    got = cluster_mod._lowest_in_component(li, lj, k, rounds=rounds)
    g = sparse.coo_matrix((np.ones(len(li)), (li, lj)), shape=(k, k))
    _, comp = connected_components(g, directed=False)
    low = np.full(comp.max() + 1, k)
    np.minimum.at(low, comp, np.arange(k))
    np.testing.assert_array_equal(got, low[comp])


_CAPPED = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    from dedup_batch.cluster import DBSCAN
    X = np.load(sys.argv[2])
    # warm up (libraries, BLAS buffers, thread stacks), then cap the address space at what
    # that took plus the headroom given: independent of the machine's core count
    DBSCAN(eps=0.3, min_samples=1).fit(X[:2000])
    status = open("/proc/self/status").read()
    vm_peak = int(status.split("VmPeak:")[1].split()[0]) * 1024
    limit = vm_peak + int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    ms = int(sys.argv[5])
    labels = DBSCAN(eps=float(sys.argv[3]), min_samples=ms).fit(X).labels_
    np.save(sys.argv[4], labels)
    """
)


def _reference_labels(X, eps, original, copies):
    """Brute-force float64 union-find for rows made of one group (``copies``, each checked
    within eps of ``original``, so the group is one component whatever its inner pairs) and
    other rows: every pair involving a non-copy row is computed in float64."""
    X64 = X.astype(np.float64)
    n = len(X)
    parent = np.arange(n)

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a, b):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    d0 = np.sqrt(((X64[copies] - X64[original]) ** 2).sum(axis=1))
    assert (d0 <= eps * (1 - 1e-6)).all()  # well inside: no rounding question
    for c in copies:
        union(c, original)
    others = np.setdiff1d(np.arange(n), copies)
    sq = (X64**2).sum(axis=1)
    for s in range(0, len(others), 256):
        o = others[s : s + 256]
        D = sq[o][:, None] + sq[None, :] - 2.0 * X64[o] @ X64.T
        # no distance within 1e-6 of eps: float64 rounding cannot decide any pair here
        assert not (np.abs(np.sqrt(np.maximum(D, 0)) - eps) < 1e-6).any()
        oi, oj = np.nonzero(eps * eps >= D)
        for a, b in zip(o[oi].tolist(), oj.tolist(), strict=True):
            union(a, b)
    roots = np.array([find(x) for x in range(n)])
    _, first, inv = np.unique(roots, return_index=True, return_inverse=True)
    number = np.empty(len(first), np.int64)
    number[np.argsort(first)] = np.arange(len(first))
    return number[inv]


def _fit_capped(tmp_path, X: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """Labels of ``X`` fitted in a child process with 640 MiB of address space beyond the
    warm-up's (``_CAPPED``)."""
    np.save(tmp_path / "X.npy", X)
    args = [str(640 << 20), str(tmp_path / "X.npy"), repr(eps), str(tmp_path / "labels.npy")]
    p = subprocess.run(
        [sys.executable, "-c", _CAPPED, *args, str(min_samples)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return np.load(tmp_path / "labels.npy")


def test_dense_noisy_group_under_address_space_limit(tmp_path):
    # 30,000 noisy copies of one image (each at distance 0.02-0.3 from the original, eps
    # sqrt(0.1) ~ 0.316; copies up to 0.6 apart, so the group is not a clique) among 32,000
    # rows: ~4.5e8 pairs within eps, 7.2 GB as an int64 pair list (scikit-learn's
    # neighbourhoods alone). The fit runs with 640 MiB of address space beyond what the
    # libraries and a small warm-up fit took (the engine before component skipping needed
    # 1.2 GB more than that on this data, and 80 s).
    rng = np.random.default_rng(15)
    n, k, d = 32_000, 30_000, 64
    X = rng.standard_normal((n, d))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    copies = rng.permutation(n)[:k]
    original = int(copies[0])
    copies = copies[1:]
    noise = rng.standard_normal((len(copies), d))
    noise *= rng.uniform(0.02, 0.3, (len(copies), 1)) / np.linalg.norm(noise, axis=1)[:, None]
    X[copies] = X[original] + noise
    X = X.astype(np.float32)
    eps = float(np.sqrt(0.1))
    labels = _fit_capped(tmp_path, X, eps, 1)
    np.testing.assert_array_equal(labels, _reference_labels(X, eps, original, copies))
    assert (labels[copies] == labels[original]).all()


def test_dense_group_min_samples_under_address_space_limit(tmp_path):
    # min_samples=5: 30,000 copies within 0.15 of one vector (all ~4.5e8 pairs within eps
    # sqrt(0.1): 7.2 GB as a pair list) among 2,000 isolated rows. The group is one cluster
    # of core rows, the isolated rows noise; the fit runs with 640 MiB of address space
    # beyond the warm-up's (the edge-list engine needed the pair list).
    rng = np.random.default_rng(16)
    n, k, d = 32_000, 30_000, 64
    X = rng.standard_normal((n, d))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    copies = rng.permutation(n)[:k]
    noise = rng.standard_normal((k - 1, d))
    noise *= rng.uniform(0.0, 0.15, (k - 1, 1)) / np.linalg.norm(noise, axis=1)[:, None]
    X[copies[1:]] = X[copies[0]] + noise
    X = X.astype(np.float32)
    eps = float(np.sqrt(0.1))
    others = np.setdiff1d(np.arange(n), copies)
    X64 = X.astype(np.float64)
    sq = (X64**2).sum(axis=1)
    for s in range(0, len(others), 256):  # float64: no other row within 1.5 eps of any row
        o = others[s : s + 256]
        D = sq[o][:, None] + sq[None, :] - 2.0 * X64[o] @ X64.T
        D[np.arange(len(o)), o] = np.inf
        assert D.min() > (1.5 * eps) ** 2
    expected = np.full(n, -1)
    expected[copies] = 0
    np.testing.assert_array_equal(_fit_capped(tmp_path, X, eps, 5), expected)
