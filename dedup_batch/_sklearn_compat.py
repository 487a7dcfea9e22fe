"""The private scikit-learn API the clustering engine stands on, in one place.

The engine promises scikit-learn's labels bit for bit, so it reuses scikit-learn's own
parameter checks, input validation and distance routines rather than copies of them. Some of
these are private; each is imported here only, with why it is needed and since which
scikit-learn release it exists under this name, so that a release that moves one breaks this
module at import, with a clear message, instead of a fit half-way.

Lowest scikit-learn with all of them: **1.6** (``validate_data``; the others are older).
Tested with 1.9.1.
"""

from __future__ import annotations

from typing import Any

import sklearn

#: The lowest scikit-learn release that provides every name below.
MIN_SKLEARN = "1.6"

try:
    # Private, 1.2+ (named PairwiseDistancesRadiusNeighborhood in 1.1): the routine behind
    # scikit-learn's brute-force euclidean radius_neighbors. The re-check runs it on
    # scikit-learn's own 256-row chunk pair so that a pair within rounding of eps is decided
    # by the very GEMM expansion, in the same geometry, that decides it in scikit-learn.
    from sklearn.metrics._pairwise_distances_reduction import RadiusNeighbors

    # Private module, 1.5+ (before: ``sklearn.utils.get_chunk_n_rows``): the row chunks of
    # ``pairwise_distances_chunked`` under the current ``working_memory``. Cosine
    # distances are computed per chunk, and their rounding (and the zeroed diagonal of a
    # single-chunk fit) depends on the chunk, so the re-check must cut the rows the same way.
    from sklearn.utils._chunking import get_chunk_n_rows

    # Public since 1.6 (it replaced the private ``BaseEstimator._validate_data``, removed in
    # 1.7): the checks and conversions scikit-learn's DBSCAN.fit applies to X (dtype,
    # sparse format, n_features_in_), so the engine sees the array scikit-learn would.
    from sklearn.utils.validation import validate_data
except ImportError as e:  # pragma: no cover - depends on the installed release
    raise ImportError(
        f"dedup_batch's clustering needs scikit-learn >= {MIN_SKLEARN} "
        f"(found {sklearn.__version__}): {e}"
    ) from e

__all__ = ["MIN_SKLEARN", "RadiusNeighbors", "get_chunk_n_rows", "validate_data", "validate_params"]


def validate_params(estimator: Any) -> None:
    """Run scikit-learn's parameter validation on ``estimator`` (raises as its ``fit`` does).

    ``BaseEstimator._validate_params`` is private (1.2+: the ``_parameter_constraints``
    framework). It is called on a scikit-learn DBSCAN holding the engine's parameters, so a
    bad ``eps`` or ``min_samples`` raises the same error, with the same message, as
    scikit-learn's own fit.
    """
    estimator._validate_params()
