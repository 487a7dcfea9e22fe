"""Tiles that read the input rows in place (no float32 working copy of the whole input, see
``cluster.ROW_BYTES``): the rows they build are the whole copy's bits, the labels are
scikit-learn's on adversarial data (ties at eps, duplicates, flat spectra, dense noisy groups)
whatever the row cache keeps (generated inputs: tests/test_cluster_fused.py), and ``dbscan()``
never builds ``components_``."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from sklearn.cluster import DBSCAN as SkDBSCAN
from sklearn.cluster import dbscan as sk_dbscan

import dedup_batch.cluster as cluster_mod
from dedup_batch.cluster import DBSCAN, dbscan
from tests.test_cluster_fused import isotropic_with_copies as noisy_input

#: ROW_BYTES values: 0 keeps no built leaf (every tile builds its rows), SMALL keeps a few
#: leaves of 32 rows x <= 128 dims in its half (evictions on every fit), WHOLE the whole copy.
NONE, SMALL, WHOLE = 0, 6 * 32 * 130 * 4, 1 << 40


def fit_in_place(X, row_bytes, share=16, n_jobs=None, **params):
    """Our labels and core rows (estimator and functional form) against scikit-learn's, the
    tiles' rows built from the input with ROW_BYTES = ``row_bytes`` and FUSED_SHARE =
    ``share`` (1: the gathered path only, 2**40: the fused path only), small leaves/tiles."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cluster_mod, "ROW_BYTES", row_bytes)
        mp.setattr(cluster_mod, "FUSED_SHARE", share)
        mp.setattr(cluster_mod, "LEAF", 32)
        mp.setattr(cluster_mod, "TILE", 96)
        ours = DBSCAN(n_jobs=n_jobs, **params).fit(X)
        core, labels = dbscan(X, n_jobs=n_jobs, **params)
    ref = SkDBSCAN(**params).fit(X)
    np.testing.assert_array_equal(ours.labels_, ref.labels_)
    np.testing.assert_array_equal(ours.core_sample_indices_, ref.core_sample_indices_)
    np.testing.assert_array_equal(ours.components_, ref.components_)
    np.testing.assert_array_equal(labels, ref.labels_)
    np.testing.assert_array_equal(core, ref.core_sample_indices_)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_built_in_place_are_the_whole_copys_bits(monkeypatch, metric, dtype):
    # Same values as the contiguous copy, bit for bit, so the error bands hold unchanged.
    rng = np.random.default_rng(4)
    X = noisy_input(rng, 700, 48, 0.3, 0.3, dtype) * 3.0 + 0.5
    mode = cluster_mod._resolve_mode(DBSCAN(eps=0.3, metric=metric), X, None)
    monkeypatch.setattr(cluster_mod, "LEAF", 32)
    whole = cluster_mod._prepare(X, 0.3, mode, X.dtype)
    monkeypatch.setattr(cluster_mod, "ROW_BYTES", 0)
    fly = cluster_mod._prepare(X, 0.3, mode, X.dtype)
    assert whole.C is not None and fly.C is None and fly.R is X
    m = len(X)
    np.testing.assert_array_equal(fly.order, whole.order)
    for name in ("csq", "Alo", "Blo", "band", "band_lo"):
        np.testing.assert_array_equal(getattr(fly, name), getattr(whole, name))
    built = cluster_mod._rows(fly, [[0, m]], np.arange(m), 0)
    assert built.dtype == np.float32
    np.testing.assert_array_equal(built.view(np.uint32), whole.C.view(np.uint32))
    # a scattered subset (the gathered path's rows) and a run of a few leaves
    idx = np.sort(rng.choice(m, 90, replace=False))
    np.testing.assert_array_equal(cluster_mod._rows(fly, None, idx, 0), whole.C[idx])
    # a few survivors' rows (built alone) and most of a block's (its leaves built)
    for k in (5, 80):
        pos = rng.integers(0, len(idx), k)
        np.testing.assert_array_equal(
            cluster_mod._some_rows(fly, None, idx, pos, 0), whole.C[idx[pos]]
        )
    run = [[int(fly.bounds[2]), int(fly.bounds[5])]]
    np.testing.assert_array_equal(
        cluster_mod._rows(fly, run, np.arange(*run[0]), 2), whole.C[run[0][0] : run[0][1]]
    )


@pytest.mark.parametrize("row_bytes", [WHOLE, NONE])
def test_a_subset_is_prepared_as_its_copy_would_be(monkeypatch, row_bytes):
    # Cosine input with zero vectors: the other rows are prepared where they lie (`subset`),
    # the same bits as a prepared copy of them, whether the tiles' rows are one float32 copy
    # or built per leaf from the input.
    rng = np.random.default_rng(11)
    X = noisy_input(rng, 600, 40, 0.3, 0.3, np.float32)
    subset = np.sort(rng.choice(len(X), 450, replace=False))
    mode = cluster_mod._resolve_mode(DBSCAN(eps=0.3, metric="cosine"), X, None)
    monkeypatch.setattr(cluster_mod, "LEAF", 32)
    monkeypatch.setattr(cluster_mod, "ROW_BYTES", row_bytes)
    copy = cluster_mod._prepare(X[subset], 0.3, mode, X.dtype)
    kept = cluster_mod._prepare(X, 0.3, mode, X.dtype, subset=subset)
    for name in ("order", "bounds", "csq", "Alo", "Blo", "band", "band_lo", "lo", "hi"):
        np.testing.assert_array_equal(getattr(kept, name), getattr(copy, name))
    m = len(subset)
    np.testing.assert_array_equal(
        cluster_mod._rows(kept, [[0, m]], np.arange(m), 0).view(np.uint32),
        cluster_mod._rows(copy, [[0, m]], np.arange(m), 0).view(np.uint32),
    )
    if row_bytes == NONE:
        assert kept.R is X  # read in place: no copy of the rows
        np.testing.assert_array_equal(kept.src, subset[copy.src])


@pytest.mark.parametrize("row_bytes", [NONE, SMALL, WHOLE])
@pytest.mark.parametrize("min_samples", [1, 4])
def test_cosine_with_zero_vectors_in_place(row_bytes, min_samples):
    # zero vectors among noisy copies: scikit-learn's labels, the others prepared in place
    rng = np.random.default_rng(row_bytes % 97 + min_samples)
    X = noisy_input(rng, 500, 32, 0.3, 0.3, np.float32)
    X[rng.choice(len(X), 40, replace=False)] = 0.0
    fit_in_place(X, row_bytes, eps=0.05, min_samples=min_samples, metric="cosine")


@pytest.mark.parametrize("row_bytes", [NONE, SMALL])
@pytest.mark.parametrize("min_samples", [1, 3])
@pytest.mark.parametrize("share", [1, 2**40])
def test_in_place_ties_exactly_at_eps(row_bytes, min_samples, share):
    # Integer points: squared distances are exact integers, many pairs exactly at eps; a
    # fifth of the rows are copies of others.
    rng = np.random.default_rng(min_samples + 7 * share % 5)
    X = rng.integers(0, 3, size=(500, 24)).astype(np.float32)
    X[rng.choice(500, 100, replace=False)] = X[:100]
    for eps in (2.0, float(np.sqrt(5.0)), 3.0):
        fit_in_place(X, row_bytes, share, eps=eps, min_samples=min_samples)


@pytest.mark.parametrize("n_jobs", [1, 2])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_in_place_dense_group_on_threads(n_jobs, metric):
    # One vector and 600 noisy copies among 1,500 rows: the row cache shared by two tile
    # threads, evicting as they go, and component skipping.
    rng = np.random.default_rng(12)
    X = noisy_input(rng, 1500, 64, 0.4, 0.3, np.float32)
    X[:5] = 0.0 if metric == "euclidean" else X[:5]  # cosine zero rows stay out of it
    eps = 0.25 if metric == "euclidean" else 0.03
    for row_bytes in (NONE, SMALL):
        fit_in_place(X, row_bytes, n_jobs=n_jobs, eps=eps, min_samples=1, metric=metric)
        fit_in_place(X, row_bytes, n_jobs=n_jobs, eps=eps, min_samples=4, metric=metric)


def test_row_cache_keeps_its_limit_and_the_leaves_needed_next():
    block = np.zeros((4, 4), np.float32)  # 64 bytes
    cache = cluster_mod._RowCache(3 * block.nbytes)
    for leaf in (5, 6, 7):
        cache.put(leaf, block.copy(), caller=5)
    assert sorted(cache.blocks) == [5, 6, 7]
    # full: a leaf above every cached one is needed last, so it is not kept ...
    cache.put(9, block.copy(), caller=5)
    assert sorted(cache.blocks) == [5, 6, 7]
    # ... one below the highest replaces it
    cache.put(4, block.copy(), caller=4)
    assert sorted(cache.blocks) == [4, 5, 6]
    # leaves below the calling tile's are dropped first (not needed again in this pass)
    cache.put(8, block.copy(), caller=6)
    assert sorted(cache.blocks) == [6, 8]
    assert cache.nbytes == 2 * block.nbytes <= cache.limit
    assert cluster_mod._RowCache(0).limit == 0
    empty = cluster_mod._RowCache(0)
    empty.put(1, block, caller=0)
    assert empty.blocks == {} and empty.nbytes == 0


def test_row_cache_pickles_empty():
    import pickle

    cache = cluster_mod._RowCache(1 << 20)
    cache.put(0, np.ones((8, 8), np.float32), caller=0)
    back = pickle.loads(pickle.dumps(cache))
    assert back.limit == cache.limit and back.blocks == {} and back.nbytes == 0
    back.put(1, np.ones((8, 8), np.float32), caller=0)  # its lock works
    assert list(back.blocks) == [1]


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_dbscan_function_matches_sklearn_function(metric):
    rng = np.random.default_rng(3)
    X = noisy_input(rng, 800, 32, 0.3, 0.3, np.float32)
    eps = 0.3 if metric == "euclidean" else 0.04
    for ms in (1, 4):
        ours = dbscan(X, eps, min_samples=ms, metric=metric)
        ref = sk_dbscan(X, eps, min_samples=ms, metric=metric)
        for a, b in zip(ours, ref, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_dbscan_function_holds_no_copy_of_the_input(monkeypatch, metric):
    # What a fit allocates at its peak per input row, from two sizes (fixed chunk buffers
    # cancel out): with the rows read in place, well under the row itself (256 float32,
    # 1 KiB, against ~0.5 KiB of factors, bands and projections); with the whole float32
    # working copy (the control: what this test must catch), over a row. And dbscan()
    # keeps no components_, while DBSCAN.fit keeps a copy of every core row (all of them
    # at min_samples=1). 2% of the rows are exact copies, and with cosine 1% are zero
    # vectors: the engine prepares the other distinct rows where they lie, not a copy of them.
    rng = np.random.default_rng(0)
    scale = np.arange(1, 257) ** -0.6
    centres = rng.standard_normal((5000, 256)) * scale

    def traced(fn):
        """(peak, still allocated, result) of fn()."""
        tracemalloc.start()
        try:
            out = fn()
            now, peak = tracemalloc.get_traced_memory()
            return peak, now, out
        finally:
            tracemalloc.stop()

    seen = {}
    p = {"eps": 0.05 if metric == "euclidean" else 0.002, "min_samples": 1, "metric": metric}
    for n in (20_000, 40_000):
        X = centres[rng.integers(0, 5000, n)] + 0.01 * rng.standard_normal((n, 256)) * scale
        X = X.astype(np.float32)
        X[-n // 50 :] = X[: n // 50]  # exact copies: the distinct rows are not copied out
        if metric == "cosine":
            X[::100] = 0.0
        monkeypatch.setattr(cluster_mod, "ROW_BYTES", 1 << 20)
        in_place, kept_fn, (_, labels) = traced(lambda X=X: dbscan(X, **p))
        _, kept_fit, est = traced(lambda X=X: DBSCAN(**p).fit(X))
        monkeypatch.setattr(cluster_mod, "ROW_BYTES", 1 << 40)
        whole, _, (_, labels_whole) = traced(lambda X=X: dbscan(X, **p))
        np.testing.assert_array_equal(labels, est.labels_)
        np.testing.assert_array_equal(labels, labels_whole)
        assert kept_fn < 0.1 * X.nbytes < X.nbytes <= kept_fit, (kept_fn, kept_fit)
        seen[n] = (in_place, whole, X.nbytes)
    np.testing.assert_array_equal(labels, SkDBSCAN(**p).fit(X).labels_)
    (p1, w1, x1), (p2, w2, x2) = seen[20_000], seen[40_000]
    assert (p2 - p1) / (x2 - x1) < 0.75, seen
    assert (w2 - w1) / (x2 - x1) > 1.0, seen
    assert not hasattr(DBSCAN(**p)._fit(X, None, None, components=False), "components_")


@pytest.mark.parametrize("min_samples", [1, 3])
def test_in_place_rows_on_dask_workers(dask_client, min_samples):
    # The prepared input travels to the workers with its (empty) row cache; each worker
    # builds its tiles' rows from the shipped input, with the same labels as scikit-learn.
    rng = np.random.default_rng(21)
    X = noisy_input(rng, 1200, 48, 0.3, 0.3, np.float32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cluster_mod, "ROW_BYTES", SMALL)
        mp.setattr(cluster_mod, "LEAF", 32)
        mp.setattr(cluster_mod, "TILE", 96)
        ours = DBSCAN(eps=0.25, min_samples=min_samples).fit(X, client=dask_client)
    ref = SkDBSCAN(eps=0.25, min_samples=min_samples).fit(X)
    np.testing.assert_array_equal(ours.labels_, ref.labels_)
    np.testing.assert_array_equal(ours.core_sample_indices_, ref.core_sample_indices_)
