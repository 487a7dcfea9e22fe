"""dedup-batch: remove near-duplicate images from a bucket, in parallel on Dask.

Load sharded embeddings through fsspec, cluster them with DBSCAN, keep one image per cluster by
a named policy, and delete the rest on the storage backend, safely (dry run by default).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["DBSCAN", "JobSpec", "__version__", "dbscan", "select_keepers"]

from .cluster import DBSCAN, dbscan
from .config import JobSpec
from .select import select_keepers
