"""scikit-learn's own DBSCAN tests (``sklearn/cluster/tests/test_dbscan.py``, as installed)
run against ``dedup_batch.cluster``: their module's ``DBSCAN`` and ``dbscan`` are replaced by
ours for every test collected here."""

from __future__ import annotations

import numpy as np
import pytest
import sklearn.cluster.tests.test_dbscan as sk_tests
from sklearn.cluster import DBSCAN as SkDBSCAN
from sklearn.cluster.tests.test_dbscan import *  # noqa: F403  (their tests, collected here)

from dedup_batch import cluster


@pytest.fixture(autouse=True)
def _ours(monkeypatch):
    monkeypatch.setattr(sk_tests, "DBSCAN", cluster.DBSCAN)
    monkeypatch.setattr(sk_tests, "dbscan", cluster.dbscan)


@pytest.fixture(params=[0, 42])
def global_random_seed(request):
    """scikit-learn's conftest fixture (seeds its tests draw from), two of its values."""
    return request.param


def test_their_module_runs_ours():
    # the replacement is in place: their module-level names are ours inside these tests
    assert sk_tests.DBSCAN is cluster.DBSCAN and sk_tests.dbscan is cluster.dbscan
    # and it is scikit-learn's whole suite (18 tests in 1.6, 20+ in 1.9), not an empty module
    assert len([n for n in dir(sk_tests) if n.startswith("test_")]) >= 15


@pytest.mark.parametrize("algorithm", ["auto", "brute", "kd_tree", "ball_tree"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.bool_])
def test_integer_input_as_sklearn(algorithm, metric, dtype):
    # integer grids put many pairs at exactly eps; every route scikit-learn takes for
    # integer input (trees, pairwise chunks for brute force and cosine) gives its labels
    if metric == "cosine" and algorithm in ("kd_tree", "ball_tree"):
        pytest.skip("scikit-learn rejects trees with cosine")
    rng = np.random.default_rng(3)
    for d in (2, 20):
        X = rng.integers(0, 3, size=(300, d)).astype(dtype)
        for eps in (1.0, 2.0**0.5) if metric == "euclidean" else (0.1, 0.2):
            for ms in (1, 4):
                params = dict(eps=eps, min_samples=ms, metric=metric, algorithm=algorithm)
                ours = cluster.DBSCAN(**params).fit(X)
                ref = SkDBSCAN(**params).fit(X)
                np.testing.assert_array_equal(ours.labels_, ref.labels_)
                np.testing.assert_array_equal(ours.core_sample_indices_, ref.core_sample_indices_)
                np.testing.assert_array_equal(ours.components_, ref.components_)
