"""Diagnose a plan before anyone applies it: settings that would delete far too much.

A plan is only as good as its ``eps``. Two signs that it is too large, each cheap to check:

* **one cluster holds a large share of the collection** (``--eps 2`` on unit vectors puts
  everything in one cluster: keep 1, delete the rest);
* **eps lies beyond the knee of the k-distance curve**: sorted ascending, the distance from
  each image to its nearest other image stays on a low floor for near-duplicates, then rises
  where distinct images begin. An eps past that rise links distinct images.

Both give warnings (logged, in ``summary.json`` ``warnings``, and as a banner in the report);
they never stop a plan. ``apply`` refuses by default to delete more than half of a plan
(``max_delete_fraction``), which catches what a warning does not.
"""

from __future__ import annotations

import logging

import numpy as np

__all__ = ["KNEE_SAMPLE", "LARGEST_CLUSTER_SHARE", "knee", "plan_warnings"]

log = logging.getLogger(__name__)

#: Warn when the largest cluster holds more than this share of the images (collections of at
#: least ``MIN_IMAGES``): copies of one image rarely make a fifth of a real collection.
LARGEST_CLUSTER_SHARE = 0.2
MIN_IMAGES = 20
#: Images whose nearest-neighbour distance is computed for the knee: a random sample, so the
#: check costs about ``KNEE_SAMPLE * n * d`` multiply-adds at most ...
KNEE_SAMPLE = 1000
#: ... and never more than this many (about a second or two of BLAS on 2 cores).
KNEE_MAX_WORK = 2e10


def knee(kd: np.ndarray) -> float | None:
    """The distance where an ascending k-distance curve leaves its floor, or None.

    Kneedle on the normalised curve: the point farthest below the chord from the first to the
    last value is where the floor ends; the knee is the first distance *after* it, i.e. the
    smallest distance of the images that are not on the floor. ``None`` for a flat curve or
    fewer than 10 points.
    """
    kd = np.sort(np.asarray(kd, dtype=np.float64))
    if len(kd) < 10 or kd[-1] <= kd[0]:
        return None
    # The top 1% are outliers (images with no near neighbour at all): they would pull the
    # chord up and move the knee to the far right.
    top = max(2, int(np.ceil(len(kd) * 0.99)))
    y = kd[:top]
    if y[-1] <= y[0]:
        return None
    x = np.linspace(0.0, 1.0, len(y))
    yn = (y - y[0]) / (y[-1] - y[0])
    i = int(np.argmax(x - yn))
    return float(y[min(i + 1, len(y) - 1)])


def plan_warnings(
    X: np.ndarray,
    labels: np.ndarray,
    *,
    eps: float,
    metric: str = "euclidean",
    min_samples: int = 1,
    seed: int = 0,
) -> list[str]:
    """Warnings about a clustering that would delete far too much (empty when all is well).

    Parameters
    ----------
    X : ndarray, shape (n, d)
    labels : ndarray of int, shape (n,)
    eps : float
    metric : {"euclidean", "cosine"}
    min_samples : int
        The k of the k-distance curve.

    Notes
    -----
    Time: one nearest-neighbour query for a random sample of at most ``KNEE_SAMPLE`` images
    against all ``n`` (fewer for very large ``n``: at most ``KNEE_MAX_WORK`` multiply-adds).
    Memory: one (sample, chunk) distance block.
    """
    out: list[str] = []
    n = len(labels)
    if n < MIN_IMAGES:
        return out
    clustered = labels[labels >= 0]
    if len(clustered):
        counts = np.bincount(clustered)
        big = int(counts.max())
        if big > LARGEST_CLUSTER_SHARE * n:
            out.append(
                f"the largest cluster holds {big:,} of {n:,} images ({big / n:.0%}): eps "
                f"{eps:g} may be far too large; check the report and 'dedup-batch sweep' "
                "before applying"
            )
    from .sweep import k_distance

    d = max(1, X.shape[1])
    sample = int(max(100, min(KNEE_SAMPLE, KNEE_MAX_WORK / (n * d))))
    kd = k_distance(X, min_samples, metric=metric, sample=sample, seed=seed)
    k = knee(kd)
    if k is not None and eps > k:
        linked = float(np.mean(kd <= eps))
        out.append(
            f"eps {eps:g} lies beyond the knee of the k-distance curve ({k:.4g}): it links "
            f"{linked:.0%} of sampled images to another one, distinct images included; "
            f"try an eps below {k:.4g} (see 'dedup-batch sweep')"
        )
    return out
