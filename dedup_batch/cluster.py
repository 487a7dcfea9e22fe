"""DBSCAN with scikit-learn's semantics.

Interim engine: delegates to :class:`sklearn.cluster.DBSCAN`. The tiled Dask engine replaces the
internals without changing this surface.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.cluster import DBSCAN as _SkDBSCAN

__all__ = ["DBSCAN", "dbscan"]


class DBSCAN(ClusterMixin, BaseEstimator):
    """Drop-in for :class:`sklearn.cluster.DBSCAN` (same parameters, same results)."""

    def __init__(
        self,
        eps: float = 0.5,
        *,
        min_samples: int = 5,
        metric: Any = "euclidean",
        metric_params: dict | None = None,
        algorithm: str = "auto",
        leaf_size: int = 30,
        p: float | None = None,
        n_jobs: int | None = None,
    ) -> None:
        self.eps = eps
        self.min_samples = min_samples
        self.metric = metric
        self.metric_params = metric_params
        self.algorithm = algorithm
        self.leaf_size = leaf_size
        self.p = p
        self.n_jobs = n_jobs

    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> DBSCAN:
        sk = _SkDBSCAN(**self.get_params()).fit(X, sample_weight=sample_weight)
        self.labels_ = sk.labels_
        self.core_sample_indices_ = sk.core_sample_indices_
        self.components_ = sk.components_
        return self


def dbscan(
    X: Any, eps: float = 0.5, *, min_samples: int = 5, metric: Any = "minkowski", **kwargs: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Functional form: ``(core_sample_indices, labels)``."""
    est = DBSCAN(eps, min_samples=min_samples, metric=metric, **kwargs).fit(X)
    return est.core_sample_indices_, est.labels_
