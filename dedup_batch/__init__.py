"""dedup-batch: remove near-duplicate images from a bucket, in parallel on Dask.

Load sharded embeddings through fsspec, cluster them with DBSCAN, keep one image per cluster by
a named policy, and delete the rest on the storage backend, safely (dry run by default).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["DBSCAN", "JobSpec", "__version__", "dbscan", "select_keepers"]

from importlib import import_module
from typing import Any

# Names are imported on first use: `dedup-batch --help` (and every command) then starts without
# importing scikit-learn and scipy, which only the cluster stage needs.
_LAZY = {
    "DBSCAN": ".cluster",
    "dbscan": ".cluster",
    "JobSpec": ".config",
    "select_keepers": ".select",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
