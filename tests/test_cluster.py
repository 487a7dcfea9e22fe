"""dedup_batch.cluster against scikit-learn: same labels (numbering included), core samples,
components, on generated inputs that hit the hard cases (ties at exactly eps, copies, heavy
repetition, pairs scikit-learn decides by its own rounding), on threads and on Dask workers."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from distributed import get_task_stream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.cluster import DBSCAN as SkDBSCAN
from sklearn.cluster import dbscan as sk_dbscan
from sklearn.metrics import pairwise_distances
from sklearn.metrics._pairwise_distances_reduction import RadiusNeighbors

import dedup_batch.cluster as cluster_mod
from dedup_batch.cluster import DBSCAN, dbscan, eps_graph


def assert_same(X, sample_weight=None, client=None, **params):
    ours = DBSCAN(**params).fit(X, sample_weight=sample_weight, client=client)
    ref = SkDBSCAN(**{k: v for k, v in params.items()}).fit(X, sample_weight=sample_weight)
    np.testing.assert_array_equal(ours.labels_, ref.labels_)
    np.testing.assert_array_equal(ours.core_sample_indices_, ref.core_sample_indices_)
    a, b = ours.components_, ref.components_
    if sp.issparse(a):
        a, b = a.toarray(), b.toarray()
    np.testing.assert_array_equal(a, b)
    assert ours.labels_.dtype == ref.labels_.dtype
    return ours


def clustered(rng, n, d, n_centers, noise, dtype=np.float64, repeat=0.0):
    centers = rng.standard_normal((n_centers, d))
    X = centers[rng.integers(0, n_centers, n)] + noise * rng.standard_normal((n, d)) / np.sqrt(d)
    if repeat:
        X[rng.random(n) < repeat] = X[0]
    return X.astype(dtype)


# ------------------------------------------------------------------------------------------
# Generated inputs (hypothesis): both metrics, all dims, min_samples 1..10, copies
# ------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    d=st.sampled_from([1, 2, 3, 5, 15, 16, 17, 64, 256, 512]),
    n=st.integers(1, 300),
    min_samples=st.integers(1, 10),
    metric=st.sampled_from(["euclidean", "cosine"]),
    dtype=st.sampled_from([np.float32, np.float64]),
    repeat=st.sampled_from([0.0, 0.1, 0.6]),
    scale=st.sampled_from([0.5, 1.0, 2.0]),
)
def test_matches_sklearn_generated(seed, d, n, min_samples, metric, dtype, repeat, scale):
    rng = np.random.default_rng(seed)
    X = clustered(rng, n, d, max(1, n // 10), 0.4, dtype, repeat)
    # eps around the within-cluster distances, so many pairs sit near it
    eps = (0.3 * scale) if metric == "euclidean" else 0.04 * scale
    assert_same(X, eps=eps, min_samples=min_samples, metric=metric)


@pytest.mark.parametrize("d", [1, 2, 3, 16, 40])
@pytest.mark.parametrize("min_samples", [1, 2, 3, 5, 9])
def test_ties_exactly_at_eps_integer_grid(d, min_samples):
    # Integer points: every squared distance is an exact integer, so eps = 1, 2, sqrt(k)
    # places many pairs exactly at eps (sklearn counts them: <=).
    rng = np.random.default_rng(d * 31 + min_samples)
    X = rng.integers(0, 4, size=(400, d)).astype(np.float64)
    for eps in (1.0, 2.0, float(np.sqrt(2.0)), 3.0):
        assert_same(X, eps=eps, min_samples=min_samples)
        assert_same(X.astype(np.float32), eps=eps, min_samples=min_samples)


@pytest.mark.parametrize("eps", [0.1, 0.3, 0.6, 1e-3, 7.25])
def test_two_points_at_eps(eps):
    X = np.array([[0.0], [eps], [2 * eps], [10 * eps]])
    assert_same(X, eps=eps, min_samples=1)
    assert_same(X, eps=eps, min_samples=2)
    X20 = np.zeros((3, 20))
    X20[1, 0] = eps
    X20[2, 5] = -eps
    assert_same(X20, eps=eps, min_samples=1)
    assert_same(X20, eps=eps, min_samples=2, algorithm="brute")


def _sklearn_sq(X, i, j):
    """The squared distance scikit-learn's brute force computes for i -> j (same chunk)."""
    dist, ind = RadiusNeighbors.compute(
        X, X, radius=1e300, metric="sqeuclidean", return_distance=True
    )
    return float(dist[i][list(ind[i]).index(j)])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_eps_set_to_sklearns_own_rounded_distance(dtype):
    # eps chosen as the distance scikit-learn computes for a pair (and the next float on each
    # side): the pair lies within rounding of eps, so only the re-check reproducing
    # scikit-learn's computation (or the delegation) can give its answer.
    rng = np.random.default_rng(7)
    X = clustered(rng, 300, 64, 30, 0.5, dtype)
    hits = 0
    for i, j in [(0, 1), (5, 77), (10, 200)]:
        r = float(np.sqrt(_sklearn_sq(X, i, j)))
        for eps in (np.nextafter(r, 0), r, np.nextafter(r, 10)):
            for ms in (1, 3):
                assert_same(X, eps=eps, min_samples=ms)
                hits += 1
    assert hits == 18


def test_recheck_path_is_exercised(monkeypatch):
    # The near-eps re-check must actually be reached by the case above (else the test above
    # would not test it): count decider calls.
    calls = []
    orig = cluster_mod._SkDecider.decide

    def spy(self, qi, tj):
        calls.append(len(qi))
        return orig(self, qi, tj)

    monkeypatch.setattr(cluster_mod._SkDecider, "decide", spy)
    rng = np.random.default_rng(7)
    X = clustered(rng, 300, 64, 30, 0.5)
    r = float(np.sqrt(_sklearn_sq(X, 0, 1)))
    # min_samples > 1: every pair counts (with min_samples=1 a near-eps pair whose rows are
    # already one component is dropped before the re-check, see test_cluster_components.py)
    assert_same(X, eps=r, min_samples=3)
    assert calls


def test_exact_duplicates_and_heavy_repetition():
    rng = np.random.default_rng(3)
    X = clustered(rng, 3000, 256, 100, 0.5, np.float32)
    X[rng.random(3000) < 0.5] = X[11]  # one image repeated ~1500 times
    X[100:200] = X[5]
    for ms in (1, 2, 10, 2000):
        assert_same(X, eps=0.35, min_samples=ms)
    assert_same(X, eps=0.02, min_samples=1, metric="cosine")


def test_border_points_take_first_cluster():
    # Point 2 is within eps of two clusters' cores; it is not core itself (min_samples=3):
    # sklearn gives it the cluster numbered first (lowest core index), not the nearer one.
    X = np.array([[10.0], [10.5], [11.0], [11.4], [11.9], [0.0], [0.1]])
    ours = assert_same(X, eps=0.6, min_samples=3)
    assert ours.labels_.tolist() == [0, 0, 0, 0, 0, -1, -1]
    X2 = np.array([[0.0], [0.1], [0.2], [1.0], [0.95], [0.9], [0.6]])
    assert_same(X2, eps=0.4, min_samples=3)
    assert_same(X2[::-1].copy(), eps=0.4, min_samples=3)


@pytest.mark.parametrize("n", [5, 300])
@pytest.mark.parametrize("eps", [0.3, 1.0, 1.5])
def test_cosine_zero_vectors(n, eps):
    # sklearn: a zero vector is at cosine distance 1 from everything, itself included unless
    # all rows fit one chunk (then the diagonal is set to 0).
    rng = np.random.default_rng(n)
    X = clustered(rng, n, 20, 3, 0.3)
    X[::4] = 0.0
    for ms in (1, 2):
        assert_same(X, eps=eps, min_samples=ms, metric="cosine")


def test_label_numbering_follows_lowest_core_index():
    rng = np.random.default_rng(11)
    X = clustered(rng, 500, 32, 40, 0.3)
    X = X[rng.permutation(500)]
    ours = assert_same(X, eps=0.3, min_samples=1)
    seen = []
    for lab in ours.labels_:
        if lab >= 0 and lab not in seen:
            seen.append(lab)
    assert seen == sorted(seen)
    assert ours.labels_.max() > 5


def test_single_row_and_all_identical():
    assert_same(np.zeros((1, 3)), eps=0.5, min_samples=1)
    assert_same(np.ones((50, 300)), eps=0.5, min_samples=5)
    assert_same(np.ones((50, 300)), eps=0.5, min_samples=60)


# ------------------------------------------------------------------------------------------
# Parallel execution: threads, Dask workers, many tiles
# ------------------------------------------------------------------------------------------


@pytest.fixture
def small_tiles(monkeypatch):
    """Force many leaves/tiles so the bounds and the merging across tasks are exercised."""
    monkeypatch.setattr(cluster_mod, "LEAF", 64)


@pytest.mark.parametrize("min_samples", [1, 4])
def test_threads_and_many_tiles(small_tiles, min_samples):
    rng = np.random.default_rng(5)
    X = clustered(rng, 2000, 48, 150, 0.4, np.float32, repeat=0.05)
    for n_jobs in (1, 2, -1):
        assert_same(X, eps=0.3, min_samples=min_samples, n_jobs=n_jobs)


@pytest.mark.parametrize(("metric", "eps"), [("euclidean", 0.3), ("cosine", 0.004)])
@pytest.mark.parametrize("min_samples", [1, 3])
def test_grid_tree_over_several_directions(monkeypatch, metric, eps, min_samples):
    """Tiny leaves and tiles, the tree split along several leading directions: tile groups
    made of leaves that are not contiguous (pruned leaves between them) are exercised."""
    monkeypatch.setattr(cluster_mod, "LEAF", 32)
    monkeypatch.setattr(cluster_mod, "TILE", 96)
    monkeypatch.setattr(cluster_mod, "SPLIT_CELLS", 2)
    rng = np.random.default_rng(11)
    X = clustered(rng, 2000, 48, 150, 0.4, np.float32, repeat=0.02)
    # preconditions: some leaf pairs are pruned, and some partner lists skip leaves
    first, _ = cluster_mod._unique_rows(X)
    mode = cluster_mod._resolve_mode(DBSCAN(eps=eps, metric=metric), X, None)
    prep = cluster_mod._prepare(X[first], eps, mode, X.dtype)
    pairs = cluster_mod._leaf_pairs(prep)
    assert any(len(bs) > 1 and np.diff(bs).max() > 1 for _, bs in pairs)
    assert 0 < sum(len(bs) for _, bs in pairs) < prep.n_leaves * (prep.n_leaves + 1) // 2
    assert_same(X, eps=eps, min_samples=min_samples, metric=metric, n_jobs=2)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_dask_workers_same_result(dask_client, small_tiles, metric):
    rng = np.random.default_rng(9)
    X = clustered(rng, 1500, 40, 120, 0.4, np.float32, repeat=0.05)
    eps = 0.3 if metric == "euclidean" else 0.04
    local = DBSCAN(eps=eps, min_samples=3, metric=metric).fit(X)
    ours = assert_same(X, eps=eps, min_samples=3, metric=metric, client=dask_client)
    ours1 = assert_same(X, eps=eps, min_samples=1, metric=metric, client=dask_client)
    np.testing.assert_array_equal(ours.labels_, local.labels_)
    assert ours1.labels_.max() >= 0


def test_dask_tasks_actually_run_on_workers(dask_client, small_tiles):
    rng = np.random.default_rng(2)
    X = clustered(rng, 800, 30, 60, 0.4)
    # the task stream records this block's tasks only (a worker's own log is a bounded deque
    # that earlier tests may have filled)
    with get_task_stream(dask_client) as stream:
        assert_same(X, eps=0.3, min_samples=1, client=dask_client)
    workers = {t["worker"] for t in stream.data}
    assert stream.data and workers <= set(dask_client.scheduler_info()["workers"])


@pytest.mark.parametrize("min_samples", [1, 3])
def test_without_a_client_argument_nothing_runs_on_workers(dask_client, small_tiles, min_samples):
    # The client is an argument: a client that merely exists in the process (here the
    # session's, the default one) is never picked up; tiles then run on threads here.
    rng = np.random.default_rng(2)
    X = clustered(rng, 800, 30, 60, 0.4)
    with get_task_stream(dask_client) as stream:
        assert_same(X, eps=0.3, min_samples=min_samples, n_jobs=2)
        eps_graph(X, 0.3)
        dbscan(X, 0.3, min_samples=min_samples)
    assert stream.data == []
    with get_task_stream(dask_client) as stream:
        eps_graph(X, 0.3, client=dask_client)
        dbscan(X, 0.3, min_samples=min_samples, client=dask_client)
    assert len(stream.data) > 0


def test_client_is_a_fit_argument_not_a_parameter(dask_client, small_tiles):
    # the estimator's parameters stay scikit-learn's: clone, get_params and pickling never
    # meet the client, before or after a fit on it
    import pickle

    from sklearn.base import clone

    X = clustered(np.random.default_rng(5), 300, 20, 20, 0.4)
    est = DBSCAN(eps=0.3, min_samples=2)
    assert est.fit(X, client=dask_client) is est
    assert set(est.get_params()) == set(SkDBSCAN().get_params())
    assert clone(est).get_params() == est.get_params()
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(again.labels_, est.labels_)
    np.testing.assert_array_equal(
        est.fit_predict(X, client=dask_client), SkDBSCAN(eps=0.3, min_samples=2).fit_predict(X)
    )


# ------------------------------------------------------------------------------------------
# Fallbacks: what the engine does not cover gives scikit-learn's result
# ------------------------------------------------------------------------------------------


def test_fallback_precomputed_sparse_weight_callable():
    rng = np.random.default_rng(4)
    X = clustered(rng, 200, 8, 20, 0.4)
    D = pairwise_distances(X)
    assert_same(D, eps=0.3, min_samples=2, metric="precomputed")
    S = sp.csr_matrix(np.where(rng.random(X.shape) < 0.5, X, 0.0))
    assert_same(S, eps=0.4, min_samples=2)
    w = rng.integers(0, 4, 200).astype(float)
    assert_same(X, sample_weight=w, eps=0.3, min_samples=3)
    assert_same(X, eps=0.3, min_samples=2, metric=lambda a, b: float(np.abs(a - b).sum()))
    assert_same(X, eps=0.6, min_samples=2, metric="manhattan")
    assert_same(X, eps=0.3, min_samples=2, metric="minkowski", p=3)


@pytest.mark.parametrize("algorithm", ["auto", "brute", "kd_tree", "ball_tree"])
def test_algorithms(algorithm):
    rng = np.random.default_rng(6)
    for d in (3, 20):
        X = clustered(rng, 300, d, 30, 0.4)
        assert_same(X, eps=0.3, min_samples=2, algorithm=algorithm)


def test_estimator_surface():
    est = DBSCAN(eps=0.7, min_samples=3, n_jobs=2)
    assert est.get_params()["eps"] == 0.7
    est.set_params(eps=0.3)
    assert est.eps == 0.3
    X = clustered(np.random.default_rng(0), 100, 20, 10, 0.4)
    np.testing.assert_array_equal(est.fit_predict(X), est.fit(X).labels_)
    core, labels = dbscan(X, eps=0.3, min_samples=3)
    sk_core, sk_labels = sk_dbscan(X, eps=0.3, min_samples=3)
    np.testing.assert_array_equal(core, sk_core)
    np.testing.assert_array_equal(labels, sk_labels)
    with pytest.raises(ValueError):
        DBSCAN(eps=-1.0).fit(X)
    with pytest.raises(ValueError):
        DBSCAN(eps=0.5).fit(np.array([[np.nan, 1.0]]))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 300),
    d=st.integers(1, 9),
    n_distinct=st.integers(1, 40),
    weak_hash=st.booleans(),
    chunk=st.sampled_from([None, 1, 100]),
)
def test_unique_rows_exact(seed, n, d, n_distinct, weak_hash, chunk):
    # Representatives are each group's first row, ascending, whatever the hash: with a weak
    # hash (byte sum mod 3) distinct rows collide and the exact fallback must answer; -0.0
    # and 0.0 differ bit for bit, so they are distinct rows.
    rng = np.random.default_rng(seed)
    pool = rng.choice(np.array([0.0, -0.0, 1.0, 2.5]), size=(n_distinct, d))
    X = pool[rng.integers(0, n_distinct, n)].astype(np.float32)
    with pytest.MonkeyPatch.context() as mp:
        if weak_hash:
            mp.setattr(
                cluster_mod, "_row_hashes", lambda raw, step: raw.sum(axis=1).astype(np.uint64) % 3
            )
        if chunk is not None:  # hash and verify one row or a few at a time
            mp.setattr(cluster_mod, "_HASH_CHUNK_BYTES", chunk)
        first, inverse = cluster_mod._unique_rows(X)
    seen: dict[bytes, int] = {}
    want_first, want_inverse = [], []
    for r in range(n):
        key = X[r].tobytes()
        if key not in seen:
            seen[key] = len(want_first)
            want_first.append(r)
        want_inverse.append(seen[key])
    np.testing.assert_array_equal(first, want_first)
    np.testing.assert_array_equal(inverse, want_inverse)


# ------------------------------------------------------------------------------------------
# eps_graph against brute force
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("d", [2, 64])
def test_eps_graph_brute_force(metric, d):
    rng = np.random.default_rng(d)
    X = clustered(rng, 400, d, 40, 0.4, repeat=0.1)
    X[7] = X[3]
    eps = 0.3 if metric == "euclidean" else 0.04
    inverse, i, j, dist = eps_graph(X, eps, metric=metric)
    # representatives: first row with the same vector
    for r in range(len(X)):
        assert inverse[r] == np.nonzero((X[r] == X).all(axis=1))[0][0]
    reps = np.unique(inverse)
    D = pairwise_distances(X[reps], metric=metric)
    ii, jj = np.nonzero(np.triu(eps >= D, k=1))
    expected = sorted(zip(reps[ii].tolist(), reps[jj].tolist(), strict=True))
    assert expected == list(zip(i.tolist(), j.tolist(), strict=True))
    np.testing.assert_allclose(
        dist, D[np.searchsorted(reps, i), np.searchsorted(reps, j)], atol=1e-12
    )
    assert (i < j).all() and (dist <= eps).all()


def test_fit_advances_the_running_stage(small_tiles):
    from dedup_batch import progress

    X = clustered(np.random.default_rng(9), 600, 20, 30, 0.4)
    with progress.stage("cluster", unit="tiles") as st:
        DBSCAN(eps=0.3, min_samples=1).fit(X)
    assert st.total and st.done == st.total
    # min_samples > 1: three passes over the tiles, or two and the third's share (no border)
    for eps, ms in ((0.3, 4), (100.0, 2)):
        with progress.stage("cluster", unit="tiles") as st:
            DBSCAN(eps=eps, min_samples=ms).fit(X)
        assert st.total and st.done == st.total
