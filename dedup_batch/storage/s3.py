"""S3 operations by exact key: DeleteObjects with per-key retry, ranged stats, copies, reads.

Keys are exact byte strings: nothing here parses ``?versionId=`` out of a key or expands glob
characters (s3fs's ``rm``/``open`` would), and no ``VersionId`` is ever sent, so a versioned
bucket gets delete markers and nothing is destroyed for good. Calls go through s3fs's
``call_s3`` (its IO loop is thread-safe and retries whole-request connection errors); every
failure of a whole request is translated once (:mod:`dedup_batch.storage.errors`).
"""

from __future__ import annotations

import io
import logging
import random
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import ScopeError
from .objects import KeyResult, ObjectStat, quote_etag

if TYPE_CHECKING:
    from .store import Store

__all__ = [
    "BACKOFF_BASE_S",
    "BACKOFF_CAP_S",
    "S3_MAX_DELETE_KEYS",
    "S3_MAX_KEY_ATTEMPTS",
    "S3_PRECONDITION_CODES",
    "S3_RETRYABLE_CODES",
]

log = logging.getLogger(__name__)

#: DeleteObjects accepts at most this many keys per request (S3 API limit).
S3_MAX_DELETE_KEYS = 1000
#: Per-key error codes inside a 200 DeleteObjects answer that are worth asking again: botocore
#: retries only whole-request failures, so these would otherwise be dropped.
S3_RETRYABLE_CODES = frozenset(
    {
        "SlowDown",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "RequestThrottled",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "OperationAborted",
        "NoResult",
        "500",
        "502",
        "503",
        "504",
    }
)
#: Per-key codes meaning "the object is not the one the plan saw" (conditional delete refused).
S3_PRECONDITION_CODES = frozenset({"PreconditionFailed", "412"})
#: Attempts per key (first try included) before a retryable error is reported as a failure.
S3_MAX_KEY_ATTEMPTS = 8
#: Backoff between attempts: full jitter over min(cap, base * 2**attempt), in seconds. With 8
#: attempts the worst case waits about 0.1+0.2+...+5 s ≈ 16 s per batch.
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 5.0


def _backoff(attempt: int) -> float:
    """Seconds to wait before attempt ``attempt + 1``: capped exponential, full jitter."""
    # Read from the package at call time: BACKOFF_* are documented (and tuned, in tests) as
    # dedup_batch.storage.BACKOFF_BASE_S / BACKOFF_CAP_S.
    from dedup_batch import storage

    cap = min(storage.BACKOFF_CAP_S, storage.BACKOFF_BASE_S * 2.0**attempt)
    return random.uniform(0.0, cap)


def _common_prefix(a: str, b: str) -> str:
    """The longest common leading string of ``a`` and ``b``, character by character."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return a[:n]


def _utf8(text: str) -> bytes:
    # S3 orders keys by their UTF-8 bytes.
    return text.encode("utf-8", "surrogatepass")


def call(store: Store, method: str, **kwargs: Any) -> dict[str, Any]:
    """One S3 API call on ``store``'s client. s3fs raises ``OSError`` subclasses
    (``FileNotFoundError``, ``PermissionError``) for S3 errors it knows."""
    return store.fs.call_s3(method, **kwargs)


def split_key(full: str) -> tuple[str, str]:
    """``(bucket, key)`` of an exact S3 path; a bare bucket is refused."""
    # Split by hand: s3fs.split_path parses "?versionId=" out of a key when version_aware
    # is set, which would turn a literal key into a version-specific (permanent) delete.
    bucket, _, key = full.partition("/")
    if not bucket or not key:
        raise ScopeError(f"{full!r} is a bucket, not an object: refusing to touch it")
    return bucket, key


def head(store: Store, full: str) -> ObjectStat | None:
    """The stat of the object at exactly ``full`` (one HEAD), or ``None`` if there is none."""
    bucket, key = split_key(full)
    try:
        with store._translated(f"HEAD of {key!r}"):
            resp = call(store, "head_object", Bucket=bucket, Key=key)
    except FileNotFoundError:
        return None
    mtime = resp.get("LastModified")
    return ObjectStat(
        int(resp.get("ContentLength", 0)),
        mtime.timestamp() if mtime is not None else float("nan"),
        resp.get("ETag"),
    )


def get_object(store: Store, full: str) -> io.BytesIO:
    """The object at exactly ``full``, read whole into memory (one GetObject)."""
    # fs.open would parse "?versionId=" out of the key and read another object.
    from fsspec.asyn import sync

    bucket, key = split_key(full)
    resp = call(store, "get_object", Bucket=bucket, Key=key)
    return io.BytesIO(sync(store.fs.loop, resp["Body"].read))


def copy_object(src_store: Store, src: str, dst_store: Store, dst: str, etag: str | None) -> None:
    """Server-side CopyObject of exactly ``src`` to exactly ``dst`` (same endpoint), only if
    the source still has ``etag``: a concurrent overwrite fails the copy (412) instead of
    sending a different object to the trash."""
    sb, sk = split_key(src)
    db, dk = split_key(dst)
    extra: dict[str, Any] = {}
    if etag:
        extra["CopySourceIfMatch"] = quote_etag(etag)
    call(src_store, "copy_object", Bucket=db, Key=dk, CopySource={"Bucket": sb, "Key": sk}, **extra)
    dst_store.fs.invalidate_cache()


def put_if_absent(store: Store, full: str, body: bytes) -> bool:
    """PutObject with ``If-None-Match: *``: False (nothing written) when an object is already
    there, on the stores that support conditional writes; the caller checks existence first
    for the rest."""
    bucket, key = split_key(full)
    try:
        call(store, "put_object", Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
    except FileExistsError:  # s3fs's translation of 412 PreconditionFailed
        return False
    except Exception as exc:  # s3fs or botocore, by version: recognised by its code only
        if "PreconditionFailed" in str(exc) or "412" in str(exc):
            return False
        raise
    store.fs.invalidate_cache()
    return True


def stat_range(store: Store, paths: Sequence[str]) -> dict[str, ObjectStat | None]:
    """Stats of exact S3 paths from ranged listings (ListObjectsV2 from just before the first
    key, under their common prefix): one request per 1000 keys in the range."""
    by_bucket: dict[str, list[str]] = {}
    for p in paths:
        by_bucket.setdefault(split_key(p)[0], []).append(p)
    out: dict[str, ObjectStat | None] = {}
    for bucket, fulls in by_bucket.items():
        keys = sorted((split_key(p)[1] for p in fulls), key=_utf8)
        first, last = keys[0], keys[-1]
        prefix = _common_prefix(first, last)
        # The greatest string below ``first`` is not expressible; ``first`` minus its last
        # character is below it and lets at most a few extra keys into the listing.
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 1000}
        if len(first) > 1:
            kwargs["StartAfter"] = first[:-1]
        found: dict[str, ObjectStat] = {}
        last_b = _utf8(last)
        while True:
            with store._translated(f"listing of {prefix!r} in {bucket!r}"):
                page = call(store, "list_objects_v2", **kwargs)
            contents = page.get("Contents") or []
            for c in contents:
                mt = c.get("LastModified")
                found[c["Key"]] = ObjectStat(
                    int(c.get("Size", 0)),
                    mt.timestamp() if mt is not None else float("nan"),
                    c.get("ETag"),
                )
            if not page.get("IsTruncated") or not contents or _utf8(contents[-1]["Key"]) >= last_b:
                break
            kwargs["ContinuationToken"] = page["NextContinuationToken"]
        for p in fulls:
            out[p] = found.get(split_key(p)[1])
    return out


def delete_objects(
    store: Store, fulls: Sequence[str], etags: Mapping[str, str | None]
) -> dict[str, KeyResult]:
    """DeleteObjects by exact key (at most :data:`S3_MAX_DELETE_KEYS` paths), one result each.

    The per-key retry loop is written here rather than left to botocore: a per-key
    ``SlowDown``/``InternalError`` inside a 200 answer is not retried by botocore (only
    whole-request errors are), and a key the store does not answer for must not vanish from
    the report. Retryable codes are asked again with capped, jittered backoff; precondition
    codes become ``changed``; the rest ``failed``.
    """
    out: dict[str, KeyResult] = {}
    by_bucket: dict[str, dict[str, str]] = {}
    for full in fulls:
        bucket, key = split_key(full)
        by_bucket.setdefault(bucket, {})[key] = full
    for bucket, pending in by_bucket.items():
        last_error: dict[str, tuple[str, str]] = {}
        for attempt in range(1, S3_MAX_KEY_ATTEMPTS + 1):
            objects = []
            for key, full in pending.items():
                ident: dict[str, str] = {"Key": key}
                etag = etags.get(full)
                if etag:
                    ident["ETag"] = quote_etag(etag)
                objects.append(ident)
            with store._translated(f"DeleteObjects in bucket {bucket!r}"):
                resp = call(
                    store,
                    "delete_objects",
                    Bucket=bucket,
                    Delete={"Objects": objects, "Quiet": False},
                )
            retry: dict[str, str] = {}
            for d in resp.get("Deleted") or []:
                full = pending.get(d.get("Key", ""))
                if full is not None:
                    out[full] = KeyResult("deleted", "", "")
            for err in resp.get("Errors") or []:
                key = err.get("Key", "")
                full = pending.get(key)
                if full is None or full in out:
                    continue
                code = str(err.get("Code") or "Unknown")
                msg = store._scrub(str(err.get("Message") or ""))
                if code in S3_RETRYABLE_CODES:
                    retry[key] = full
                    last_error[key] = (code, msg)
                elif code in S3_PRECONDITION_CODES:
                    out[full] = KeyResult("changed", code, msg)
                else:
                    out[full] = KeyResult("failed", code, msg)
            # A key with neither a Deleted nor an Errors entry would otherwise vanish from
            # the report: ask again, and report it if the store never answers for it.
            for key, full in pending.items():
                if full not in out and key not in retry:
                    retry[key] = full
                    last_error[key] = ("NoResult", "DeleteObjects returned no result for it")
            if not retry:
                break
            pending = retry
            if attempt < S3_MAX_KEY_ATTEMPTS:
                log.info(
                    "DeleteObjects: retrying %d key(s) in %r (attempt %d, %s)",
                    len(retry),
                    bucket,
                    attempt + 1,
                    last_error[next(iter(retry))][0],
                )
                time.sleep(_backoff(attempt))
        else:
            for key, full in pending.items():
                code, msg = last_error[key]
                out[full] = KeyResult(
                    "failed",
                    code,
                    f"{msg} (gave up after {S3_MAX_KEY_ATTEMPTS} attempts)".strip(),
                )
    return out
