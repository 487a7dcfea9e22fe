"""What the store says about an object, and what an operation on one key did.

:class:`ObjectStat` (size, mtime, ETag, kind) carries the one definition of "unchanged since
the plan" (:meth:`ObjectStat.differs`); :class:`KeyResult` is the outcome of an exact-key
operation. ETags are compared here once: quotes and weak markers ignored, and only a plain
32-hex-digit ETag taken for an MD5 (multipart and SSE-KMS ETags are opaque tokens).
"""

from __future__ import annotations

import math
from typing import NamedTuple

__all__ = ["MTIME_TOLERANCE_S", "KeyResult", "ObjectStat", "etags_equal", "md5_of_etag"]

#: mtime values closer than this (seconds) are equal (float round trips through Parquet).
MTIME_TOLERANCE_S = 1e-6


KIND_NAMES = {"file": "file", "link": "symbolic link"}
LINKED_FOLDER = "a folder on its path is now a symbolic link: left alone"


class ObjectStat(NamedTuple):
    """What the store says (or said at plan time) about one object: ``size`` (bytes),
    ``mtime`` (seconds since the epoch, NaN if unknown), ``etag`` (as the store gives it, quotes
    included; None if none) and ``kind``: ``"file"``, ``"link"`` (a symbolic link on a local
    disk, never followed), ``"other"`` (a folder, a device...), ``"linked-folder"`` (a folder on
    the way to it is a symbolic link) or, in an expectation, ``None`` for "file or link"."""

    size: int | None
    mtime: float
    etag: str | None
    kind: str | None = "file"

    def differs(self, now: ObjectStat, *, compare_mtime: bool = True) -> str | None:
        """Why the object ``now`` is not the one this stat describes, or None if it is.

        The one comparison of "unchanged" for every check before acting: the ETag when this
        stat has one (S3), else the size and the modification time (to the microsecond;
        ``compare_mtime=False`` where the backend reports it at different resolutions).
        """
        if now.kind == "linked-folder":
            return LINKED_FOLDER
        if now.kind not in ("file", "link"):
            return "no longer a file: left alone"
        if self.kind is not None and now.kind != self.kind:
            return f"was a {KIND_NAMES[self.kind]}, now a {KIND_NAMES[now.kind]}"
        if self.etag:
            if etags_equal(self.etag, now.etag):
                return None
            return "ETag differs from the plan: the object was overwritten"
        if self.size is not None and int(now.size or 0) != int(self.size):
            return f"size {now.size} differs from the plan's {self.size}"
        if (
            compare_mtime
            and not math.isnan(self.mtime)
            and not math.isnan(now.mtime)
            and abs(now.mtime - self.mtime) > MTIME_TOLERANCE_S
        ):
            return "modification time differs from the plan: the object was modified"
        return None


class KeyResult(NamedTuple):
    """The outcome of one exact-key operation: ``status``, ``code`` (S3 style, "" when fine),
    ``message`` (one line, no secrets), ``checksum`` (``"md5:<hex>"`` of the bytes copied,
    where a copy knows it)."""

    status: str
    code: str
    message: str
    checksum: str = ""


def _bare_etag(etag: str | None) -> str | None:
    if etag is None:
        return None
    text = str(etag).strip()
    if text.startswith("W/"):
        text = text[2:]
    return text.strip('"') or None


def etags_equal(a: str | None, b: str | None) -> bool:
    """Whether two ETags name the same content (quotes and weak markers ignored)."""
    return _bare_etag(a) is not None and _bare_etag(a) == _bare_etag(b)


def quote_etag(etag: str) -> str:
    """``etag`` in the quoted form S3 requests take."""
    return f'"{_bare_etag(etag)}"'


def md5_of_etag(etag: str | None) -> str | None:
    """The MD5 hex digest an ETag stands for, or None (multipart, SSE-KMS: opaque tokens)."""
    bare = _bare_etag(etag)
    if bare and len(bare) == 32 and all(c in "0123456789abcdef" for c in bare.lower()):
        return bare.lower()
    return None
