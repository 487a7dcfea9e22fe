"""Which fsspec options a URL gets, and opening a URL with them: the one rule.

* A local path (or ``file://``) gets no options: ``endpoint_url``, keys and the like belong to
  remote backends and must never reach a local filesystem (or a log line about one).
* Any other URL gets the job's ``storage_options``; S3 URLs also get the timeout and retry
  defaults below unless the job sets its own (``config_kwargs``).

Everything in :mod:`dedup_batch.storage` opens URLs through :func:`open_url`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import fsspec

__all__ = ["S3_DEFAULT_CONFIG", "S3_DEFAULT_RETRIES", "open_url", "protocols", "url_options"]

#: botocore settings for S3 unless the job sets its own (``config_kwargs``): a store that
#: hangs fails within about a minute (s3fs tries a call twice, botocore each time twice, each
#: attempt waiting at most 5 s to connect and 12 s for a read) instead of botocore's default of
#: several minutes. "standard" retry mode backs off on throttling (SlowDown), as "legacy" does
#: not for every error.
S3_DEFAULT_CONFIG: Mapping[str, Any] = {
    "connect_timeout": 5,
    "read_timeout": 12,
    # total_max_attempts counts the first try (max_attempts counts only the retries)
    "retries": {"total_max_attempts": 2, "mode": "standard"},
}
#: s3fs's own attempts per call (its default is 5).
S3_DEFAULT_RETRIES = 2


def url_options(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The fsspec options ``url`` is opened with (see the module docstring for the rule)."""
    if "://" not in url or url.startswith("file://"):
        return {}
    out = dict(storage_options or {})
    if url.split("://", 1)[0] in ("s3", "s3a"):
        config = dict(out.get("config_kwargs") or {})
        for k, v in S3_DEFAULT_CONFIG.items():
            config.setdefault(k, v)
        out["config_kwargs"] = config
    return out


def open_url(url: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    """``(filesystem, path)`` of ``url`` opened with :func:`url_options`.

    Raises ``ImportError`` (backend not installed) or ``ValueError`` (not a URL fsspec knows)
    as fsspec does; callers translate them where they know what the URL was for.
    """
    fs, path = fsspec.core.url_to_fs(url, **url_options(url, storage_options))
    if "s3" in protocols(fs) and getattr(fs, "retries", 0) > S3_DEFAULT_RETRIES:
        fs.retries = S3_DEFAULT_RETRIES  # s3fs's own attempts per call: an attribute only
    return fs, path


def protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    """The protocol names of ``fs`` (``("s3", "s3a")``, ``("file", "local")``, ...)."""
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)
