"""The exactness re-check: pairs within scikit-learn's own rounding of eps are decided by the
values scikit-learn computes, in one batch per fit. Cosine computes only the needed entries of
scikit-learn's row chunks; these tests pin that those entries are bit for bit scikit-learn's and
that the labels equal scikit-learn's when eps is set to such a value (ties at exactly eps)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn import config_context
from sklearn.cluster import DBSCAN as SkDBSCAN
from sklearn.metrics import pairwise_distances

import dedup_batch.cluster as cluster_mod
from dedup_batch.cluster import DBSCAN


def assert_same(X, **params):
    ours = DBSCAN(**params).fit(X)
    ref = SkDBSCAN(**params).fit(X)
    np.testing.assert_array_equal(ours.labels_, ref.labels_)
    np.testing.assert_array_equal(ours.core_sample_indices_, ref.core_sample_indices_)
    np.testing.assert_array_equal(ours.components_, ref.components_)
    return ours


def clip_like(rng, n, d, dtype=np.float32):
    """Unit vectors in groups of ~4 copies, each copy with its own noise level, so pair
    distances spread continuously through eps (variance of direction k ~ k^-0.5)."""
    scale = np.arange(1, d + 1) ** -0.25
    centres = rng.standard_normal((max(1, n // 4), d)) * scale
    X = centres[rng.integers(0, len(centres), n)]
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    X += rng.uniform(0.02, 0.35, (n, 1)) / np.sqrt(d) * rng.standard_normal((n, d))
    return X.astype(dtype)


@pytest.fixture
def spy_sub(monkeypatch):
    """Records every cosine sub-GEMM (``wide`` or not) and every whole-chunk fallback."""
    calls = {"sub": 0, "wide": 0, "chunk": 0}
    sub, chunk = cluster_mod._SkDecider._cosine_sub, cluster_mod._SkDecider._cosine_chunk

    def spy_s(self, s, e, qi, tj, wide=False):
        calls["wide" if wide else "sub"] += 1
        return sub(self, s, e, qi, tj, wide)

    def spy_c(self, s, e):
        calls["chunk"] += 1
        return chunk(self, s, e)

    monkeypatch.setattr(cluster_mod._SkDecider, "_cosine_sub", spy_s)
    monkeypatch.setattr(cluster_mod._SkDecider, "_cosine_chunk", spy_c)
    return calls


@pytest.mark.parametrize("d", [16, 64, 300, 512, 768])
def test_cosine_sub_gemm_equals_sklearns_chunk(d):
    # The claim the cosine re-check rests on, checked against scikit-learn's own call: the
    # padded sub-GEMM's entries are bit for bit those of scikit-learn's row chunk.
    rng = np.random.default_rng(d)
    X = clip_like(rng, 1500, d)
    dec = cluster_mod._SkDecider(X, 0.05, cluster_mod._Mode("cosine"), 30)
    s, e = 300, 1100
    ref = pairwise_distances(X[s:e], X, metric="cosine")
    qi = rng.integers(s, e, 500)
    tj = rng.integers(0, len(X), 500)
    D, pq, pt = dec._cosine_sub(s, e, qi, tj)
    assert D.dtype == ref.dtype
    np.testing.assert_array_equal(D[pq, pt], ref[qi - s, tj])
    Dw, pq, pt = dec._cosine_sub(s, e, qi, tj, wide=True)
    np.testing.assert_array_equal(Dw[pq, pt], ref[qi - s, tj])


def _tie_eps(X, rng, dtype):
    """eps equal to a distance scikit-learn computes (in its dtype) for a near pair."""
    D = pairwise_distances(X[:200], X, metric="cosine")
    i, j = np.nonzero((D > 0.01) & (D < 0.08))
    k = int(rng.integers(0, len(i)))
    return float(D[i[k], j[k]])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    d=st.sampled_from([17, 64, 300, 512]),
    min_samples=st.integers(1, 5),
    dtype=st.sampled_from([np.float32, np.float64]),
    nudge=st.sampled_from([-1, 0, 1]),
    working_memory=st.sampled_from([2, 5, 1024]),
)
def test_cosine_ties_at_sklearns_own_value(seed, d, min_samples, dtype, nudge, working_memory):
    # eps is scikit-learn's own computed distance for a pair (or the next float either side):
    # that pair is decided by scikit-learn's rounding, from row chunks of several sizes.
    rng = np.random.default_rng(seed)
    X = clip_like(rng, 1200, d, dtype)
    eps = _tie_eps(X, rng, dtype)
    eps = float(np.nextafter(eps, 10.0 * nudge)) if nudge else eps
    with config_context(working_memory=working_memory):
        assert_same(X, eps=eps, min_samples=min_samples, metric="cosine")


def test_cosine_recheck_uses_sub_gemms_and_is_batched(spy_sub):
    # Many chunks (working_memory 3 MiB: 200 rows each, the last one 160), several near-eps
    # pairs: every chunk is visited at most once, by sub-GEMMs, never by a whole-chunk product.
    rng = np.random.default_rng(3)
    X = clip_like(rng, 1960, 512)
    with config_context(working_memory=3):
        eps = _tie_eps(X, rng, np.float32)
        assert_same(X, eps=eps, min_samples=2, metric="cosine")
        n_chunks = (
            len(cluster_mod._SkDecider(X, eps, cluster_mod._Mode("cosine"), 30)._cosine_rows()) - 1
        )
    assert spy_sub["wide"] == 1  # the once-per-fit verification
    assert 1 <= spy_sub["sub"] <= n_chunks + 1
    assert spy_sub["chunk"] == 0


def test_cosine_recheck_falls_back_to_whole_chunks(monkeypatch, spy_sub):
    # A BLAS whose entries depended on the GEMM's shape would fail the verification: the
    # re-check then runs scikit-learn's own call per chunk, and the labels stay exact.
    monkeypatch.setattr(cluster_mod._SkDecider, "_cosine_subset_ok", lambda self, *a: False)
    rng = np.random.default_rng(4)
    X = clip_like(rng, 1500, 300)
    with config_context(working_memory=3):
        eps = _tie_eps(X, rng, np.float32)
        for ms in (1, 3):
            assert_same(X, eps=eps, min_samples=ms, metric="cosine")
    assert spy_sub["chunk"] >= 1 and spy_sub["sub"] == 0


def test_cosine_float64_uses_whole_chunks(spy_sub):
    # DGEMM edge kernels round by position: float64 input is re-decided by scikit-learn's
    # own call on each chunk that holds a near-eps pair (once per chunk).
    rng = np.random.default_rng(6)
    X = clip_like(rng, 1500, 300, np.float64)
    with config_context(working_memory=3):
        eps = _tie_eps(X, rng, np.float64)
        assert_same(X, eps=eps, min_samples=2, metric="cosine")
    assert spy_sub["sub"] == 0 and spy_sub["wide"] == 0 and spy_sub["chunk"] >= 1


def test_cosine_n_jobs_splits_columns_like_sklearn(spy_sub):
    # scikit-learn splits the columns over n_jobs threads: the re-check then calls it as is.
    rng = np.random.default_rng(5)
    X = clip_like(rng, 1500, 300)
    with config_context(working_memory=3):
        eps = _tie_eps(X, rng, np.float32)
        assert_same(X, eps=eps, min_samples=2, metric="cosine", n_jobs=2)
    assert spy_sub["chunk"] >= 1 and spy_sub["sub"] == 0
