"""Storage: the only code that talks to fsspec, one module per concern.

* :mod:`.store`: :class:`Store`, one job root: every path's one identity (``resolve``, which
  refuses paths that escape the root), listing, stats, exact-key delete/copy, small files and
  the one atomic write (:func:`~.store.atomic_local_write`).
* :mod:`.s3`: S3 by exact key: DeleteObjects with the per-key retry loop, ranged stats, copies.
* :mod:`.objects`: :class:`ObjectStat` (the one "unchanged since the plan" test),
  :class:`KeyResult`, ETag comparison.
* :mod:`.options`: the one rule for which fsspec options a URL gets (none for local paths; the
  job's, plus S3 timeouts, for remote ones).
* :mod:`.urls`: whole files by URL (plan directories, shards, job specs) and URL expansion.
* :mod:`.errors`: the one translator from backend exceptions to :class:`StorageError`.
* :mod:`.trash`: the one-to-one layout of trashed objects.

Secrets (redaction, scrubbing) live in :mod:`dedup_batch.secrets`; ``redact`` and
``secret_values`` are re-exported here. Every name other modules import from
``dedup_batch.storage`` stays importable from here.
"""

from __future__ import annotations

from ..secrets import redact, secret_values
from .errors import is_backend_error, setup_error, storage_error, translated
from .objects import MTIME_TOLERANCE_S, KeyResult, ObjectStat, etags_equal, md5_of_etag
from .options import S3_DEFAULT_CONFIG, S3_DEFAULT_RETRIES, url_options
from .s3 import (
    BACKOFF_BASE_S,
    BACKOFF_CAP_S,
    S3_MAX_DELETE_KEYS,
    S3_MAX_KEY_ATTEMPTS,
    S3_PRECONDITION_CODES,
    S3_RETRYABLE_CODES,
)
from .store import (
    COPY_BLOCK_BYTES,
    LOCAL_NAME_MAX_BYTES,
    LOCAL_PATH_MAX_BYTES,
    S3_KEY_MAX_BYTES,
    Store,
    atomic_local_write,
)
from .trash import trash_key
from .urls import expand_urls, join_url, read_bytes, read_object, read_url, url_exists, write_url

__all__ = [
    "BACKOFF_BASE_S",
    "BACKOFF_CAP_S",
    "COPY_BLOCK_BYTES",
    "LOCAL_NAME_MAX_BYTES",
    "LOCAL_PATH_MAX_BYTES",
    "MTIME_TOLERANCE_S",
    "S3_DEFAULT_CONFIG",
    "S3_DEFAULT_RETRIES",
    "S3_KEY_MAX_BYTES",
    "S3_MAX_DELETE_KEYS",
    "S3_MAX_KEY_ATTEMPTS",
    "S3_PRECONDITION_CODES",
    "S3_RETRYABLE_CODES",
    "KeyResult",
    "ObjectStat",
    "Store",
    "atomic_local_write",
    "etags_equal",
    "expand_urls",
    "is_backend_error",
    "join_url",
    "md5_of_etag",
    "read_bytes",
    "read_object",
    "read_url",
    "redact",
    "secret_values",
    "setup_error",
    "storage_error",
    "translated",
    "trash_key",
    "url_exists",
    "url_options",
    "write_url",
]
