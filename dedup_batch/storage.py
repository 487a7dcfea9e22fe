"""Storage: the only module that talks to fsspec.

A :class:`Store` is one job ``root`` (a local folder, ``s3://bucket/prefix``, ``memory://...``
or any fsspec URL) opened with the job's ``storage_options``. It resolves the paths named in the
feature shards to exact locations under that root, refusing any that escape it, and lists the
objects under it with their size, modification time and ETag.

Paths are always handled as exact names: nothing here expands glob patterns, so an object called
``a[1].jpg`` is that object and never ``a1.jpg``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import math
import os
import posixpath
import random
import stat as _stat_mod
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import fsspec
import pandas as pd

from .errors import ScopeError, StorageError, one_line

# redact and secret_values are re-exported: the secrets policy lives in dedup_batch.secrets.
from .secrets import redact, scrub, secret_values, strip_userinfo

__all__ = [
    "KeyResult",
    "ObjectStat",
    "Store",
    "expand_urls",
    "join_url",
    "read_bytes",
    "read_object",
    "read_url",
    "redact",
    "secret_values",
    "trash_key",
    "url_exists",
    "write_url",
]

log = logging.getLogger(__name__)


#: Longest path component a local filesystem takes (NAME_MAX on Linux, macOS and Windows).
LOCAL_NAME_MAX_BYTES = 255
#: Longest path the local OS takes (PATH_MAX on Linux, less the terminating NUL).
LOCAL_PATH_MAX_BYTES = 4095
#: Longest S3 key, in bytes of UTF-8 (S3 API limit).
S3_KEY_MAX_BYTES = 1024
#: Folders whose real path ``resolve`` remembers (one entry per folder, not per file).
_REAL_DIR_CACHE = 1 << 16
#: Control characters S3 cannot carry through DeleteObjects: its request body is XML 1.0,
#: which has no way to write them (and turns a carriage return into a line feed).
_XML_UNSAFE = frozenset(chr(c) for c in (*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0D, 0x20)))


def _fold(full: str) -> str:
    """A local path with ``//``, ``/./`` and a trailing ``/`` folded (no ``..`` here)."""
    norm = posixpath.normpath(full)
    if norm.startswith("//"):  # POSIX keeps a leading '//'; Linux treats it as '/'
        norm = "/" + norm.lstrip("/")
    return norm


def _check_name(path: str, full: str, *, local: bool, s3: bool) -> None:
    """Refuse a name the backend cannot hold, so that no apply ever fails on it midway."""
    try:
        encoded = full.encode("utf-8")
    except UnicodeEncodeError:
        raise ScopeError(
            f"path {path!r} is not valid UTF-8 text; no storage can hold this name: fix the "
            "path in the shard"
        ) from None
    if "\x00" in full:
        raise ScopeError(f"path {path!r} contains a NUL byte; no file can have this name")
    if local:
        if len(encoded) > LOCAL_PATH_MAX_BYTES:
            raise ScopeError(
                f"path {path[:60]!r}... is {len(encoded)} bytes long, more than a local path "
                f"can be ({LOCAL_PATH_MAX_BYTES}); fix the path in the shard"
            )
        for part in full.split("/"):
            if len(part.encode("utf-8")) > LOCAL_NAME_MAX_BYTES:
                raise ScopeError(
                    f"path {path[:60]!r}... has a component of {len(part.encode('utf-8'))} "
                    f"bytes, more than a file name can be ({LOCAL_NAME_MAX_BYTES}); fix the "
                    "path in the shard"
                )
    if s3:
        key = full.partition("/")[2]
        if len(key.encode("utf-8")) > S3_KEY_MAX_BYTES:
            raise ScopeError(
                f"path {path[:60]!r}... is a key of {len(key.encode('utf-8'))} bytes, more "
                f"than S3 allows ({S3_KEY_MAX_BYTES}); fix the path in the shard"
            )
        if _XML_UNSAFE.intersection(key):
            raise ScopeError(
                f"path {path!r} contains a control character that S3's DeleteObjects cannot "
                "carry; rename the object or drop the row"
            )


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


class Store:
    """One storage root, opened through fsspec.

    Parameters
    ----------
    root : str
        URL of the image collection (``./photos``, ``s3://bucket/prefix``, ...).
    storage_options : mapping, optional
        Passed to fsspec (credentials, ``endpoint_url``, ...). Never logged.

    Notes
    -----
    A ``Store`` pickles as ``(root, storage_options)`` so that Dask workers rebuild their own
    filesystem object (fsspec caches instances per process) instead of receiving a live one.
    """

    def __init__(self, root: str, storage_options: Mapping[str, Any] | None = None) -> None:
        if not root or not str(root).strip():
            raise ScopeError("root is empty: set --root (or 'root:' in the job spec)")
        self.root = str(root)
        self.storage_options = dict(storage_options or {})
        try:
            fs, path = _url_to_fs(self.root, self.storage_options)
        except (ImportError, ValueError) as exc:
            raise StorageError(f"cannot open root {self.root!r}: {one_line(exc)}") from None
        self.fs: fsspec.AbstractFileSystem = fs
        self.protocols = _protocols(fs)
        self.is_local = "file" in self.protocols or "local" in self.protocols
        self.root_path = path.rstrip("/") or path
        if self.is_local:
            # One identity per file: the root itself is taken by its real path, so that a root
            # given through a symbolic link and every path under it compare as the same strings.
            self.root_path = os.path.realpath(self.root_path)
        self._prefix = self.root_path if self.root_path.endswith("/") else self.root_path + "/"
        self._real_dirs: dict[str, str] = {}

    def __reduce__(self) -> tuple[Any, ...]:
        # A local root travels as its absolute real path: a worker (another process, maybe
        # another working directory) must open the same folder, not './photos' of its own.
        root = self.root_path if self.is_local else self.root
        return (Store, (root, self.storage_options))

    def __repr__(self) -> str:  # never shows storage_options: they may hold credentials
        return f"Store({self.root!r})"

    # -- paths -----------------------------------------------------------------------------
    def resolve(self, path: str, *, real: bool = True) -> str:
        """Return the canonical filesystem path of ``path`` (relative to root, or absolute under
        it): the one identity of the object it names.

        This is where every spelling of an object becomes one string, and the only place that
        decides it:

        * **local roots**: ``x//a.jpg``, ``x/./a.jpg`` and ``x/a.jpg/`` are ``x/a.jpg``; every
          folder on the path is replaced by its real path, so a path through a symbolic link to
          a folder names the file where it really is (``album/p.jpg`` with ``album -> 2019`` is
          ``2019/p.jpg``). The last component is not followed: a symbolic link to a file is the
          link itself. A path whose real folder is outside the root is refused.
        * **S3**: keys are exact byte strings (``a//b.jpg``, ``a/b.jpg/`` and ``a/b.jpg`` are
          three objects), so the key is taken literally.
        * **other fsspec backends** (``memory://``, ...): the backend's own normal form.

        ``real=False`` (apply, restore) folds the spellings but follows no link: the plan's
        paths are already real, and a folder that became a link since is then refused at the
        moment of acting, per object, instead of being followed here.

        Raises
        ------
        ScopeError
            If ``path`` is empty, contains a ``..`` segment, names another protocol, bucket or
            folder than the root, is the root itself, leads outside the root through a symbolic
            link, or is a name the backend cannot hold (a NUL byte, text that is not valid
            UTF-8, a path component over 255 bytes on local disks, a key over 1024 bytes or
            with control characters on S3).
        """
        if not isinstance(path, str) or not path:
            raise ScopeError(f"empty or non-text path {path!r}")
        if "://" in path:
            proto = path.split("://", 1)[0]
            if proto not in self.protocols and not (self.is_local and proto == "file"):
                raise ScopeError(f"path {path!r} is on {proto}://, outside root {self.root!r}")
            full = self.fs._strip_protocol(path)
        elif self.is_local:
            # normpath (in _real_path) folds './', '//' and a trailing '/' of either form
            full = path if posixpath.isabs(path) else f"{self.root_path}/{path}"
        else:
            rel = path[2:] if path.startswith("./") else path
            if rel.startswith("/"):
                raise ScopeError(f"path {path!r} is absolute but root {self.root!r} is not local")
            full = f"{self.root_path}/{rel}" if self.root_path not in ("", "/") else f"/{rel}"
        if ".." in full.split("/"):
            raise ScopeError(f"path {path!r} contains '..': refusing to leave root {self.root!r}")
        _check_name(path, full, local=self.is_local, s3=self.is_s3)
        if self.is_local:
            full = self._real_path(full, path) if real else _fold(full)
        elif not self.is_s3:
            full = self.fs._strip_protocol(full)
        if not full.startswith(self._prefix) or len(full) == len(self._prefix):
            raise ScopeError(f"path {path!r} resolves outside root {self.root!r}")
        return full

    def _real_path(self, full: str, path: str) -> str:
        """``full`` with ``//``, ``.`` and a trailing ``/`` folded and every folder real."""
        norm = _fold(full)
        parent, name = posixpath.split(norm)
        real = self._real_dirs.get(parent)
        if real is None:
            lexical = self.root_path if parent + "/" == self._prefix else parent
            real = os.path.realpath(lexical)
            if len(self._real_dirs) < _REAL_DIR_CACHE:
                self._real_dirs[parent] = real
        out = f"{real.rstrip('/')}/{name}"
        if not out.startswith(self._prefix) and norm.startswith(self._prefix):
            raise ScopeError(
                f"path {path!r} leads outside root {self.root!r} through a symbolic link (its "
                f"folder is really {real!r}): choose a root that contains that folder, or drop "
                "these rows"
            )
        return out

    def relative(self, full: str) -> str:
        """The path of ``full`` relative to the root (inverse of :meth:`resolve`)."""
        prefix = self.root_path if self.root_path.endswith("/") else self.root_path + "/"
        if not full.startswith(prefix):
            raise ScopeError(f"{full!r} is not under root {self.root!r}")
        return full[len(prefix) :]

    def url(self, full: str) -> str:
        """A URL for the filesystem path ``full`` (``s3://bucket/key``, ``/abs/path``)."""
        return full if self.is_local else self.fs.unstrip_protocol(full)

    # -- listing ---------------------------------------------------------------------------
    def list_objects(self) -> pd.DataFrame:
        """List every object under the root.

        Returns
        -------
        DataFrame indexed by the exact filesystem path, with columns ``size`` (int64, bytes),
        ``mtime`` (float64, seconds since the epoch, NaN where the backend gives none),
        ``etag`` (str or None) and ``kind`` (``"file"``, or ``"link"`` for a symbolic link on a
        local disk). One paginated listing: on S3 this costs one request per 1000 objects
        instead of one HEAD per object. Local roots are walked without following links to
        folders (see :meth:`resolve`).
        """
        if self.is_local:
            return self._list_local()
        try:
            found = self.fs.find(self.root_path, detail=True)
        except FileNotFoundError:
            raise StorageError(f"root {self.root!r} does not exist") from None
        except PermissionError as exc:
            raise StorageError(
                f"cannot list root {self.root!r}: access denied ({one_line(exc)}); "
                "check credentials and permissions"
            ) from None
        except OSError as exc:
            raise StorageError(
                f"cannot list root {self.root!r}: {one_line(exc)}; "
                "check endpoint_url and credentials"
            ) from None
        rows = [
            (name, *_stat(info))
            for name, info in found.items()
            if info.get("type", "file") == "file"
        ]
        return _listing_frame([(*r, "file") for r in rows])

    def _list_local(self) -> pd.DataFrame:
        # os.walk does not follow symbolic links to folders (fsspec's find does, and loops on
        # a link to an ancestor): what lies behind such a link is listed where it really is,
        # or not at all when it is outside the root. A link to a file is listed as a link
        # (kind "link", its own size and time), never as the file it points to.
        if not os.path.isdir(self.root_path):
            raise StorageError(f"root {self.root!r} does not exist or is not a folder")
        rows: list[tuple[str, int, float, str | None, str]] = []
        errors: list[OSError] = []
        for folder, _dirs, files in os.walk(self.root_path, onerror=errors.append):
            for name in files:
                full = os.path.join(folder, name)
                try:
                    st = os.lstat(full)
                except FileNotFoundError:
                    continue
                kind = _kind(st.st_mode)
                if kind != "other":
                    rows.append((full, int(st.st_size), float(st.st_mtime), None, kind))
        if errors and isinstance(errors[0], PermissionError):
            raise StorageError(
                f"cannot list {errors[0].filename!r} under root {self.root!r}: permission "
                "denied; give the job read access to every folder under the root"
            )
        return _listing_frame(rows)

    # -- exact-key operations (used by apply) -----------------------------------------------
    # Everything below takes exact filesystem paths (from :meth:`resolve`) and never expands
    # glob patterns: fsspec's ``rm``/``copy``/``expand_path`` treat ``[``, ``*`` and ``?`` as
    # patterns on S3 and memory://, so only single-object APIs are used here.

    @property
    def is_s3(self) -> bool:
        """True when the root is on S3 (or an S3-compatible store through s3fs)."""
        return bool({"s3", "s3a"} & set(self.protocols))

    def _split_key(self, full: str) -> tuple[str, str]:
        # Split by hand: s3fs.split_path parses "?versionId=" out of a key when version_aware
        # is set, which would turn a literal key into a version-specific (permanent) delete.
        bucket, _, key = full.partition("/")
        if not bucket or not key:
            raise ScopeError(f"{full!r} is a bucket, not an object: refusing to touch it")
        return bucket, key

    def _scrub(self, text: str) -> str:
        """``text`` with every secret value of the storage options replaced by ``***``."""
        return scrub(text, self.storage_options)

    def _storage_error(self, what: str, exc: BaseException) -> StorageError:
        return StorageError(
            self._scrub(
                f"{what} under {self.root!r} failed: {one_line(exc)}; "
                "check endpoint_url, credentials and permissions"
            )
        )

    def _s3_call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        # s3fs.call_s3 runs on fsspec's IO loop (thread-safe) and already retries whole-request
        # connection errors; it raises OSError subclasses (FileNotFoundError, PermissionError).
        return self.fs.call_s3(method, **kwargs)

    def stat_many(self, groups: Iterable[Sequence[str]]) -> dict[str, ObjectStat | None]:
        """The current size, mtime and ETag of exact paths (``None`` where there is no object).

        Parameters
        ----------
        groups : iterable of sequences of str
            Exact filesystem paths (from :meth:`resolve`). On S3 a group of two or more paths is
            read with one ranged listing (ListObjectsV2 with ``Prefix`` = their common prefix and
            ``StartAfter`` just before the first, one request per 1000 objects in the range), a
            group of one with one HEAD; callers group paths that lie close together in key
            order. Elsewhere each path costs one ``stat``.

        Returns
        -------
        dict mapping every path given to an :class:`ObjectStat` or ``None``.

        Raises
        ------
        StorageError
            If the backend refuses or cannot be reached (not for a missing object).
        """
        out: dict[str, ObjectStat | None] = {}
        for group in groups:
            paths = list(group)
            if not paths:
                continue
            if self.is_s3 and len(paths) > 1:
                out.update(self._s3_stat_range(paths))
            else:
                for p in paths:
                    out[p] = self._stat_one(p)
        return out

    def exists(self, full: str) -> bool:
        """Whether an object exists at exactly ``full`` (one HEAD or stat; no glob expansion)."""
        st = self._stat_one(full)
        return st is not None and st.kind in ("file", "link")

    # -- local files: reached folder by folder, never through a symbolic link ------------------
    def _open_parent(self, full: str, *, create: bool = False) -> tuple[int, str]:
        """An open descriptor of ``full``'s folder and its name in it, reached from the root one
        folder at a time with ``O_NOFOLLOW``: a folder that is (or has become, since the plan)
        a symbolic link raises ``OSError(ELOOP)`` instead of being followed. The caller closes
        the descriptor. ``create`` makes missing folders (restore)."""
        *dirs, name = self.relative(full).split("/")
        if create:
            os.makedirs(self.root_path, exist_ok=True)
        fd = os.open(self.root_path, _DIR_FLAGS)
        try:
            for d in dirs:
                try:
                    nfd = os.open(d, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(d, dir_fd=fd)
                    nfd = os.open(d, _DIR_FLAGS, dir_fd=fd)
                except NotADirectoryError:
                    # Linux answers ENOTDIR, not ELOOP, for a link opened with O_DIRECTORY.
                    st = os.stat(d, dir_fd=fd, follow_symlinks=False)
                    if _stat_mod.S_ISLNK(st.st_mode):
                        raise OSError(errno.ELOOP, "a folder on the path is a link", d) from None
                    raise
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd, name

    def _local_stat(self, full: str) -> ObjectStat | None:
        try:
            fd, name = self._open_parent(full)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return ObjectStat(0, float("nan"), None, "linked-folder")
            raise self._storage_error(f"stat of {self.relative(full)!r}", exc) from None
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._storage_error(f"stat of {self.relative(full)!r}", exc) from None
        finally:
            os.close(fd)
        return ObjectStat(int(st.st_size), float(st.st_mtime), None, _kind(st.st_mode))

    def _local_delete(self, full: str, expect: ObjectStat | None) -> KeyResult:
        """Unlink ``full`` if it is still what ``expect`` says, without following any link."""
        try:
            fd, name = self._open_parent(full)
        except (FileNotFoundError, NotADirectoryError):
            return KeyResult("already_absent", "NoSuchKey", "")
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return KeyResult("changed", "LinkedFolder", _LINKED_FOLDER)
            return KeyResult("failed", _errno_code(exc), self._scrub(one_line(exc)))
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            now = ObjectStat(int(st.st_size), float(st.st_mtime), None, _kind(st.st_mode))
            if now.kind == "other":
                return KeyResult("failed", "NotAFile", "not a file: left alone")
            if expect is not None and (why := expect.differs(now)):
                return KeyResult("changed", "Changed", why)
            os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            return KeyResult("already_absent", "NoSuchKey", "")
        except PermissionError as exc:
            return KeyResult("failed", "AccessDenied", self._scrub(one_line(exc)))
        except OSError as exc:
            return KeyResult("failed", _errno_code(exc), self._scrub(one_line(exc)))
        finally:
            os.close(fd)
        return KeyResult("deleted", "", "")

    def _stat_one(self, full: str) -> ObjectStat | None:
        if self.is_local:
            return self._local_stat(full)
        if self.is_s3:
            bucket, key = self._split_key(full)
            try:
                head = self._s3_call("head_object", Bucket=bucket, Key=key)
            except FileNotFoundError:
                return None
            except Exception as exc:  # botocore/aiohttp errors have no common base
                raise self._storage_error(f"HEAD of {key!r}", exc) from None
            mtime = head.get("LastModified")
            return ObjectStat(
                int(head.get("ContentLength", 0)),
                mtime.timestamp() if mtime is not None else float("nan"),
                head.get("ETag"),
            )
        try:
            info = self.fs.info(full)
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._storage_error(f"info of {full!r}", exc) from None
        if info.get("type", "file") != "file":
            return ObjectStat(0, float("nan"), None, "other")
        return ObjectStat(*_stat(info))

    def _s3_stat_range(self, paths: Sequence[str]) -> dict[str, ObjectStat | None]:
        by_bucket: dict[str, list[str]] = {}
        for p in paths:
            by_bucket.setdefault(self._split_key(p)[0], []).append(p)
        out: dict[str, ObjectStat | None] = {}
        for bucket, fulls in by_bucket.items():
            keys = sorted((self._split_key(p)[1] for p in fulls), key=_utf8)
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
                try:
                    page = self._s3_call("list_objects_v2", **kwargs)
                except Exception as exc:
                    raise self._storage_error(f"listing of {prefix!r} in {bucket!r}", exc) from None
                contents = page.get("Contents") or []
                for c in contents:
                    mt = c.get("LastModified")
                    found[c["Key"]] = ObjectStat(
                        int(c.get("Size", 0)),
                        mt.timestamp() if mt is not None else float("nan"),
                        c.get("ETag"),
                    )
                if (
                    not page.get("IsTruncated")
                    or not contents
                    or _utf8(contents[-1]["Key"]) >= last_b
                ):
                    break
                kwargs["ContinuationToken"] = page["NextContinuationToken"]
            for p in fulls:
                out[p] = found.get(self._split_key(p)[1])
        return out

    def delete_exact(
        self,
        fs_paths: Sequence[str],
        *,
        etags: Mapping[str, str | None] | None = None,
        expect: Mapping[str, ObjectStat] | None = None,
    ) -> dict[str, KeyResult]:
        """Delete exactly the objects named, one result per path.

        Parameters
        ----------
        fs_paths : sequence of str
            Exact filesystem paths under the root. Never expanded as globs.
        etags : mapping, optional
            ``path -> ETag``: on S3 sent in each ``ObjectIdentifier`` so that a store honouring
            conditional deletes refuses a changed object (reported with status ``changed``).
        expect : mapping, optional
            ``path -> ObjectStat`` seen before: local files and other non-S3 backends compare
            the object with it just before removing it (``changed`` if it differs). Local files
            are reached folder by folder without following symbolic links, so a folder that
            became a link is never deleted through (``changed``, code ``LinkedFolder``).

        Returns
        -------
        dict path -> :class:`KeyResult` with ``status`` one of ``deleted``, ``already_absent``
        (only where the backend says so: S3 reports a missing key as deleted), ``changed``
        (precondition failed) or ``failed`` (``code``/``message`` say why).

        Notes
        -----
        S3: ``DeleteObjects`` by exact key, at most 1000 keys a request, ``Quiet=False`` so that
        every key gets an answer; no ``VersionId`` is ever sent (a versioned bucket gets delete
        markers, nothing is destroyed for good). Per-key errors with a retryable code are
        retried with capped, jittered exponential backoff; permanent ones are returned. Local:
        ``os.remove`` of the path. Other fsspec backends: their single-path ``rm_file``.

        Raises
        ------
        StorageError
            If a whole request fails (endpoint unreachable, bad credentials).
        """
        etags = etags or {}
        if self.is_s3:
            out: dict[str, KeyResult] = {}
            for i in range(0, len(fs_paths), S3_MAX_DELETE_KEYS):
                out.update(self._s3_delete(fs_paths[i : i + S3_MAX_DELETE_KEYS], etags))
            self.fs.invalidate_cache()
            return out
        expect = expect or {}
        if self.is_local:
            return {p: self._local_delete(p, expect.get(p)) for p in fs_paths}
        return {p: self._delete_one(p, expect.get(p)) for p in fs_paths}

    def _delete_one(self, full: str, expect: ObjectStat | None) -> KeyResult:
        if expect is not None:
            now = self._stat_one(full)
            if now is None:
                return KeyResult("already_absent", "NoSuchKey", "")
            if why := expect.differs(now):
                return KeyResult("changed", "Changed", why)
        try:
            self.fs.rm_file(full)
        except FileNotFoundError:
            return KeyResult("already_absent", "NoSuchKey", "")
        except IsADirectoryError:
            return KeyResult("failed", "IsADirectory", "a directory, not a file: left alone")
        except PermissionError as exc:
            return KeyResult("failed", "AccessDenied", self._scrub(one_line(exc)))
        except OSError as exc:
            code = type(exc).__name__ if exc.errno is None else f"Errno{exc.errno}"
            return KeyResult("failed", code, self._scrub(one_line(exc)))
        return KeyResult("deleted", "", "")

    def _s3_delete(
        self, fulls: Sequence[str], etags: Mapping[str, str | None]
    ) -> dict[str, KeyResult]:
        out: dict[str, KeyResult] = {}
        by_bucket: dict[str, dict[str, str]] = {}
        for full in fulls:
            bucket, key = self._split_key(full)
            by_bucket.setdefault(bucket, {})[key] = full
        for bucket, pending in by_bucket.items():
            last_error: dict[str, tuple[str, str]] = {}
            for attempt in range(1, S3_MAX_KEY_ATTEMPTS + 1):
                objects = []
                for key, full in pending.items():
                    ident: dict[str, str] = {"Key": key}
                    etag = etags.get(full)
                    if etag:
                        ident["ETag"] = _quote_etag(etag)
                    objects.append(ident)
                try:
                    resp = self._s3_call(
                        "delete_objects",
                        Bucket=bucket,
                        Delete={"Objects": objects, "Quiet": False},
                    )
                except Exception as exc:
                    raise self._storage_error(f"DeleteObjects in bucket {bucket!r}", exc) from None
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
                    msg = self._scrub(str(err.get("Message") or ""))
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

    def copy_exact(self, src: str, dst_store: Store, dst: str) -> KeyResult:
        """Copy the object at exactly ``src`` to exactly ``dst`` in ``dst_store``, then verify.

        Never overwrites: when an object already exists at ``dst`` nothing is written and the
        result is ``("exists", ...)``; the caller decides whether that object is the same
        content (:meth:`same_content`). Verification: the copy's size equals the source's, and
        its ETag (S3 to S3, where the source ETag is a plain MD5, i.e. not multipart) or the MD5
        of the bytes written equals the source's. Returns ``KeyResult("copied", ...)`` with
        ``checksum`` ``"md5:<hex>"`` of the bytes copied where known, ``("absent", ...)`` when
        there is no source object, or ``("failed", code, message)``; never deletes anything.
        Local sources and destinations are reached without following symbolic links. Memory:
        one object is streamed through this process in 1 MiB blocks (S3 destinations: held
        whole, up to the object's size) unless both ends are on the same S3 endpoint
        (server-side ``CopyObject``).
        """
        src_stat = self._stat_one(src)
        if src_stat is None or src_stat.kind not in ("file", "link"):
            return KeyResult("absent", "NoSuchKey", "source object not found")
        if src_stat.kind == "link":
            return KeyResult("failed", "SymbolicLink", "a symbolic link is not copied")
        try:
            if dst_store._stat_one(dst) is not None:
                return KeyResult("exists", "ObjectExists", "an object already exists there")
            if self.is_s3 and dst_store.is_s3 and self.storage_options == dst_store.storage_options:
                sb, sk = self._split_key(src)
                db, dk = dst_store._split_key(dst)
                extra: dict[str, Any] = {}
                if src_stat.etag:
                    # Copy exactly the version we looked at: a concurrent overwrite fails the
                    # copy (412) instead of sending a different object to the trash.
                    extra["CopySourceIfMatch"] = _quote_etag(src_stat.etag)
                self._s3_call(
                    "copy_object", Bucket=db, Key=dk, CopySource={"Bucket": sb, "Key": sk}, **extra
                )
                dst_store.fs.invalidate_cache()
                got = dst_store._stat_one(dst)
                digest = None
            else:
                digest = self._stream_copy(src, dst_store, dst)
                if digest is None:
                    return KeyResult("exists", "ObjectExists", "an object already exists there")
                got = dst_store._stat_one(dst)
        except StorageError as exc:
            return KeyResult("failed", "CopyFailed", str(exc))
        except PermissionError as exc:
            return KeyResult("failed", "AccessDenied", self._scrub(one_line(exc)))
        except Exception as exc:
            return KeyResult("failed", "CopyFailed", self._scrub(one_line(exc)))
        if got is None:
            return KeyResult("failed", "VerifyFailed", "the copy is not there after copying")
        if got.size != src_stat.size:
            return KeyResult(
                "failed", "VerifyFailed", f"copy has {got.size} bytes, source {src_stat.size}"
            )
        src_md5 = _md5_etag(src_stat.etag)
        if digest is None:
            if src_md5 is not None and _md5_etag(got.etag) != src_md5:
                return KeyResult("failed", "VerifyFailed", "copy ETag differs from the source")
            digest = src_md5
        else:
            dst_md5 = _md5_etag(got.etag)
            if dst_store.is_local:
                dst_md5 = dst_store.md5(dst)
            if (src_md5 is not None and digest != src_md5) or (
                dst_md5 is not None and dst_md5 != digest
            ):
                return KeyResult("failed", "VerifyFailed", "copy MD5 differs from the source")
        return KeyResult("copied", "", "", f"md5:{digest}" if digest else "")

    def open_exact(self, full: str) -> Any:
        """A binary reader of exactly ``full`` (local: no symbolic link followed on the way;
        S3: one GetObject by exact key, the object held in memory)."""
        if self.is_s3:
            # fs.open would parse "?versionId=" out of the key and read another object.
            from fsspec.asyn import sync

            bucket, key = self._split_key(full)
            resp = self._s3_call("get_object", Bucket=bucket, Key=key)
            return io.BytesIO(sync(self.fs.loop, resp["Body"].read))
        if not self.is_local:
            return self.fs.open(full, "rb")
        fd, name = self._open_parent(full)
        try:
            return os.fdopen(os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd), "rb")
        finally:
            os.close(fd)

    def _stream_copy(self, src: str, dst_store: Store, dst: str) -> str | None:
        """Copy ``src`` to ``dst`` only if ``dst`` does not exist; the MD5 of the bytes copied,
        or None when an object appeared at ``dst`` first (nothing written)."""
        md5 = hashlib.md5(usedforsecurity=False)
        with self.open_exact(src) as fin:
            if dst_store.is_local:
                return dst_store._local_create(dst, fin, md5)
            if dst_store.is_s3:
                body = bytearray()
                while block := fin.read(COPY_BLOCK_BYTES):
                    md5.update(block)
                    body += block
                bucket, key = dst_store._split_key(dst)
                try:
                    # If-None-Match: * makes the write conditional on the key being free, on
                    # the stores that support it; the existence check above covers the rest.
                    dst_store._s3_call(
                        "put_object", Bucket=bucket, Key=key, Body=bytes(body), IfNoneMatch="*"
                    )
                except Exception as exc:
                    if "PreconditionFailed" in str(exc) or "412" in str(exc):
                        return None
                    raise
                dst_store.fs.invalidate_cache()
                return md5.hexdigest()
            dst_store.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
            with dst_store.fs.open(dst, "wb") as fout:
                while block := fin.read(COPY_BLOCK_BYTES):
                    md5.update(block)
                    fout.write(block)
        return md5.hexdigest()

    def _local_create(self, full: str, source: Any, md5: Any) -> str | None:
        """Write ``source`` to a new local file ``full``: a temporary file, synced, then linked
        to its name, which fails if the name is taken (never overwrites, even in a race)."""
        fd, name = self._open_parent(full, create=True)
        tmp = f".dedup-{uuid.uuid4().hex}.tmp"
        try:
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
            with os.fdopen(out, "wb") as fout:
                while block := source.read(COPY_BLOCK_BYTES):
                    md5.update(block)
                    fout.write(block)
                fout.flush()
                os.fsync(fout.fileno())
            try:
                os.link(tmp, name, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
            except FileExistsError:
                return None
            return md5.hexdigest()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=fd)
            os.close(fd)

    def md5(self, full: str) -> str:
        """MD5 hex digest of the object at exactly ``full`` (read in 1 MiB blocks)."""
        md5 = hashlib.md5(usedforsecurity=False)
        with self.open_exact(full) as f:
            while block := f.read(COPY_BLOCK_BYTES):
                md5.update(block)
        return md5.hexdigest()

    def checksum(self, full: str, stat: ObjectStat | None = None) -> str:
        """``"md5:<hex>"`` of the object at ``full``: from its ETag where that is a plain MD5
        (no read), else by reading it."""
        known = _md5_etag(stat.etag) if stat is not None else None
        return f"md5:{known or self.md5(full)}"

    # -- small files (journal, reports) -----------------------------------------------------
    def read_bytes(self, full: str) -> bytes | None:
        """The bytes of the file at exactly ``full``, or ``None`` if there is none."""
        try:
            with self.fs.open(full, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._storage_error(f"reading {full!r}", exc) from None

    def write_bytes(self, full: str, data: bytes) -> None:
        """Write ``data`` to ``full`` atomically: a reader sees the old file or the new one.

        Local: write a temporary file next to it, then ``os.replace``. Object stores: one PUT
        (S3 and memory:// make an object visible only when it is complete).
        """
        try:
            if self.is_local:
                _atomic_local_write(full, data)
            else:
                self.fs.pipe_file(full, data)
                if self.is_s3:
                    self.fs.invalidate_cache()
        except Exception as exc:
            raise self._storage_error(f"writing {full!r}", exc) from None

    def list_files(self, folder: str) -> list[str]:
        """Exact paths of the files directly in ``folder`` (fresh listing, no cache, no globs)."""
        try:
            if self.is_local:
                if not os.path.isdir(folder):
                    return []
                return sorted(
                    os.path.join(folder, n)
                    for n in os.listdir(folder)
                    if os.path.isfile(os.path.join(folder, n))
                )
            self.fs.invalidate_cache()
            try:
                entries = self.fs.ls(folder, detail=True)
            except FileNotFoundError:
                return []
            return sorted(e["name"] for e in entries if e.get("type", "file") == "file")
        except StorageError:
            raise
        except Exception as exc:
            raise self._storage_error(f"listing {folder!r}", exc) from None


def _kind(mode: int) -> str:
    if _stat_mod.S_ISREG(mode):
        return "file"
    if _stat_mod.S_ISLNK(mode):
        return "link"
    return "other"


def _listing_frame(rows: list[tuple[str, int, float, str | None, str]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["fs_path", "size", "mtime", "etag", "kind"])
    df["size"] = df["size"].astype("int64")
    df["mtime"] = df["mtime"].astype("float64")
    df["etag"] = df["etag"].astype("object")
    return df.set_index("fs_path")


def _stat(info: Mapping[str, Any]) -> tuple[int, float, str | None]:
    size = int(info.get("size") or 0)
    mtime: Any = info.get("mtime", info.get("LastModified", info.get("created")))
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    etag = info.get("ETag") or info.get("etag")
    return size, float(mtime) if mtime is not None else float("nan"), etag


# -- exact-key operations: constants and small types ------------------------------------------

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
#: Block size for streamed copies (trash across backends): bounds memory per copy.
COPY_BLOCK_BYTES = 1 << 20


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
            return _LINKED_FOLDER
        if now.kind not in ("file", "link"):
            return "no longer a file: left alone"
        if self.kind is not None and now.kind != self.kind:
            return f"was a {_KIND_NAMES[self.kind]}, now a {_KIND_NAMES[now.kind]}"
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


_KIND_NAMES = {"file": "file", "link": "symbolic link"}
_LINKED_FOLDER = "a folder on its path is now a symbolic link: left alone"
#: Flags to open a folder on the way to a local file: never through a symbolic link.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
#: mtime values closer than this (seconds) are equal (float round trips through Parquet).
MTIME_TOLERANCE_S = 1e-6


def _errno_code(exc: OSError) -> str:
    return type(exc).__name__ if exc.errno is None else f"Errno{exc.errno}"


class KeyResult(NamedTuple):
    """The outcome of one exact-key operation: ``status``, ``code`` (S3 style, "" when fine),
    ``message`` (one line, no secrets), ``checksum`` (``"md5:<hex>"`` of the bytes copied,
    where a copy knows it)."""

    status: str
    code: str
    message: str
    checksum: str = ""


def _backoff(attempt: int) -> float:
    """Seconds to wait before attempt ``attempt + 1``: capped exponential, full jitter."""
    return random.uniform(0.0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2.0**attempt))


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


def md5_of_etag(etag: str | None) -> str | None:
    """The MD5 hex digest an ETag stands for, or None (multipart, SSE-KMS: opaque tokens)."""
    return _md5_etag(etag)


def _quote_etag(etag: str) -> str:
    return f'"{_bare_etag(etag)}"'


def _md5_etag(etag: str | None) -> str | None:
    """The MD5 hex digest an ETag stands for, or None (multipart, SSE-KMS: opaque tokens)."""
    bare = _bare_etag(etag)
    if bare and len(bare) == 32 and all(c in "0123456789abcdef" for c in bare.lower()):
        return bare.lower()
    return None


# -- trash layout ------------------------------------------------------------------------------
#: Characters written as %XX in trash names: '%' itself and '~' (so that the escapes and the
#: folder marker below are unambiguous), the glob and query characters some fsspec calls parse
#: ('*', '?', '[', ']'), the backslash, and control characters.
_TRASH_ESCAPE = frozenset("%~*?[]\\") | frozenset(chr(c) for c in (*range(0x20), 0x7F))
#: A trash name longer than this (bytes) keeps a readable head and ends in a digest.
_TRASH_NAME_MAX_BYTES = 240
_TRASH_HEAD_BYTES = 160


def trash_key(rel: str) -> str:
    """The path, relative to a trash folder, at which the object ``rel`` (its path relative
    to the root) is kept: one-to-one for every name S3 allows, on every backend.

    Each ``/``-separated part of ``rel`` is escaped (``%XX`` for the characters in
    ``_TRASH_ESCAPE``; an empty part, as in ``a//b.jpg`` or ``a/b.jpg/``, is ``%``; a part
    ``.`` or ``..`` is ``%2E`` or ``%2E%2E``), and every folder part ends in ``~``, which an
    escaped name never does, so an object ``a/b.jpg`` (file ``a~/b.jpg``) and an object
    ``a/b.jpg/c.jpg`` (folder ``a~/b.jpg~``) never collide on a disk. A part whose escaped
    form is longer than 240 bytes is cut to a readable head plus ``%#`` and 40 hex digits of
    its SHA-256, so every part fits a local file name. Distinct keys thus map to distinct trash
    paths (up to a SHA-256 collision for such long parts).
    """
    parts = rel.split("/")
    out = [_trash_part(p) + "~" for p in parts[:-1]]
    out.append(_trash_part(parts[-1]))
    return "/".join(out)


def _trash_part(part: str) -> str:
    if part == "":
        return "%"
    if part in (".", ".."):
        return "%2E" * len(part)
    esc = "".join(
        "".join(f"%{b:02X}" for b in c.encode("utf-8")) if c in _TRASH_ESCAPE else c for c in part
    )
    if len(esc.encode("utf-8")) <= _TRASH_NAME_MAX_BYTES:
        return esc
    head = esc.encode("utf-8")[:_TRASH_HEAD_BYTES].decode("utf-8", "ignore")
    if "%" in head[-2:]:  # never cut an escape in two
        head = head[: head.rindex("%")]
    digest = hashlib.sha256(part.encode("utf-8")).hexdigest()[:40]
    return f"{head}%#{digest}"


# -- whole-file I/O by URL (plan directories, job specs, reports) ---------------------------
def _url_options(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    # Options such as endpoint_url belong to remote backends: never hand them to local files.
    if "://" not in url or url.startswith("file://"):
        return {}
    return _open_options(url, storage_options)


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


def _open_options(url: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The fsspec options a URL is opened with: the job's, plus S3 timeout defaults."""
    out = dict(options or {})
    if url.split("://", 1)[0] in ("s3", "s3a"):
        config = dict(out.get("config_kwargs") or {})
        for k, v in S3_DEFAULT_CONFIG.items():
            config.setdefault(k, v)
        out["config_kwargs"] = config
    return out


def _url_to_fs(url: str, options: Mapping[str, Any] | None) -> tuple[Any, str]:
    """``fsspec.core.url_to_fs`` with the job's options and this module's S3 defaults."""
    fs, path = fsspec.core.url_to_fs(url, **_open_options(url, options))
    if "s3" in _protocols(fs) and getattr(fs, "retries", 0) > S3_DEFAULT_RETRIES:
        fs.retries = S3_DEFAULT_RETRIES  # s3fs's own attempts per call: an attribute only
    return fs, path


def join_url(base: str, *names: str) -> str:
    """``base`` joined with ``names`` by ``/`` (works for local paths and URLs)."""
    return "/".join([base.rstrip("/"), *names])


def read_url(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The whole content of ``url``; a missing file raises :class:`FileNotFoundError`."""
    fs, path = _url_to_fs(url, _url_options(url, storage_options))
    return fs.cat_file(path)


def write_url(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``data`` to ``url`` whole, creating parent folders where the backend has them.

    Local files are written atomically and fsynced (see :func:`_atomic_local_write`).
    """
    fs, path = _url_to_fs(url, _url_options(url, storage_options))
    if "file" in _protocols(fs) or "local" in _protocols(fs):
        _atomic_local_write(path, data)
        return
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, data)


def _atomic_local_write(path: str, data: bytes) -> None:
    """Write a local file atomically and durably: a temporary file next to it, fsynced, then
    ``os.replace``; a reader (or a crash) sees the old file or the new one, never half of one.
    The one implementation behind :meth:`Store.write_bytes` and :func:`write_url`."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    # a unique name: two threads (or processes) writing the same file never share a temp file
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def url_exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``url`` names an existing file or folder."""
    fs, path = _url_to_fs(url, _url_options(url, storage_options))
    return bool(fs.exists(path))


# -- reads of single images (report thumbnails, sweep pairs) ---------------------------------
def read_object(store: Store, fs_path: str, max_bytes: int | None = None) -> bytes:
    """Read the object at ``fs_path`` (from :meth:`Store.resolve`) whole.

    Parameters
    ----------
    store : Store
        The store the path belongs to.
    fs_path : str
        Exact filesystem path; never glob-expanded.
    max_bytes : int, optional
        Refuse objects larger than this many bytes (reads at most ``max_bytes + 1`` bytes, one
        ranged GET on S3, so a huge object costs no more than the cap).

    Raises
    ------
    FileNotFoundError
        The object does not exist.
    InputError
        The object is larger than ``max_bytes``.
    StorageError
        Access denied or the backend failed.
    """
    try:
        if max_bytes is None:
            return store.fs.cat_file(fs_path)
        with store.fs.open(fs_path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise
    except PermissionError as exc:
        raise StorageError(
            f"cannot read {store.url(fs_path)!r}: access denied ({one_line(exc)})"
        ) from None
    except IsADirectoryError:
        raise FileNotFoundError(fs_path) from None
    except OSError as exc:
        raise StorageError(f"cannot read {store.url(fs_path)!r}: {one_line(exc)}") from None
    if len(data) > max_bytes:
        from .errors import InputError  # imported here: this block is additive to the module

        raise InputError(f"{store.url(fs_path)!r} is larger than {max_bytes} bytes")
    return data


# -- reading feature shards (used by the load stage) ------------------------------------------

# Exceptions raised by the storage backends' client libraries that are not OSErrors (botocore's
# EndpointConnectionError, NoCredentialsError, ...): matched by the top-level module of their
# class, so that storage needs no hard import of any optional backend library.
_BACKEND_MODULES = frozenset(
    {
        "botocore",
        "aiobotocore",
        "aiohttp",
        "urllib3",
        "requests",
        "s3fs",
        "gcsfs",
        "adlfs",
        "google",
        "azure",
    }
)

#: Characters that make a URL a glob pattern for fsspec.
_GLOB_CHARS = ("*", "?", "[")


def _is_backend_error(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return True
    return any(c.__module__.split(".")[0] in _BACKEND_MODULES for c in type(exc).__mro__)


# Exception class names (anywhere in the class's MRO) by what the user has to check.
_CREDENTIAL_ERRORS = frozenset(
    {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "ProfileNotFound"}
)
_ENDPOINT_ERRORS = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ClientConnectorError",
        "ConnectionError",
        "ProxyConnectionError",
        "SSLError",
        "InvalidEndpointError",
    }
)


def _advice(exc: BaseException, options: Mapping[str, Any] | None) -> tuple[str, str]:
    """``(kind, what to check)`` for a backend exception; kind is ``credentials``,
    ``denied``, ``not_found``, ``endpoint`` or ``other``."""
    names = {c.__name__ for c in type(exc).__mro__}
    endpoint = (options or {}).get("endpoint_url")
    where = f" {strip_userinfo(endpoint)}" if isinstance(endpoint, str) and endpoint else ""
    if names & _CREDENTIAL_ERRORS:
        return "credentials", (
            "no usable credentials: set key/secret in storage_options, the AWS_* environment "
            "variables, a profile or a role"
        )
    if isinstance(exc, PermissionError):
        return "denied", (
            "access denied: check the credentials (key/secret, profile, role) and that they "
            "may use this bucket"
        )
    if isinstance(exc, FileNotFoundError):
        return "not_found", "not found: check the bucket and the path"
    if isinstance(exc, ConnectionError | TimeoutError) or names & _ENDPOINT_ERRORS:
        return "endpoint", (
            f"cannot reach the storage endpoint{where}: check endpoint_url (-o "
            "endpoint_url=... or $AWS_ENDPOINT_URL) and the network"
        )
    return "other", (
        "the storage backend refused the request: check endpoint_url and the credentials"
    )


def _storage_error(url: str, exc: BaseException, options: Mapping[str, Any] | None) -> StorageError:
    """Translate a backend exception raised while reading ``url`` into a one-line StorageError.

    The message names the URL and what to check; secrets from ``options`` never appear in it.
    """
    _, hint = _advice(exc, options)
    return StorageError(scrub(f"{url}: {hint} ({one_line(exc)})", options))


def setup_error(
    exc: BaseException, options: Mapping[str, Any] | None = None
) -> StorageError | None:
    """A :class:`StorageError` saying what to check when ``exc`` means the storage is set up
    wrong (no credentials, credentials refused, endpoint unreachable), else ``None``.

    For errors that escaped every narrower handler (the CLI's last resort): they are the
    user's to fix, not bugs. Secrets from ``options`` never appear in the message.
    """
    if not _is_backend_error(exc):
        return None
    kind, hint = _advice(exc, options)
    if kind not in ("credentials", "denied", "endpoint"):
        return None
    return StorageError(scrub(f"storage: {hint} ({one_line(exc)})", options))


def _fs_for(url: str, options: Mapping[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return _url_to_fs(url, options)
    except ImportError as exc:
        raise StorageError(
            f"{url}: the filesystem for this URL is not installed ({one_line(exc)}); "
            "install its fsspec backend (e.g. s3fs for s3://)"
        ) from None
    except ValueError as exc:
        raise StorageError(f"{url}: cannot open this URL ({one_line(exc)})") from None


def _as_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    local = {"file", "local"} & set(_protocols(fs))
    return path if local else fs.unstrip_protocol(path)


def expand_urls(
    urls: str | list[str] | tuple[str, ...],
    storage_options: Mapping[str, Any] | None = None,
    *,
    suffixes: tuple[str, ...] | None = None,
) -> list[str]:
    """Expand URLs, globs and folders into the sorted list of the files they name.

    Parameters
    ----------
    urls : str or sequence of str
        File URLs (``./features/a.parquet``, ``s3://bucket/features/part-1.parquet``), glob
        patterns (``s3://bucket/features/part-*.parquet``) or folders.
    storage_options : mapping, optional
        Passed to fsspec (credentials, ``endpoint_url``, ...).
    suffixes : sequence of str, optional
        For a folder, only the files under it (recursively) whose lower-cased name ends with
        one of these are taken; all files when not given. Globs and file URLs are not filtered.

    Returns
    -------
    list of str
        Unique file URLs, sorted (``s3://...`` form for remote files, plain paths for local
        ones). A URL that names an existing file is taken literally even when it contains glob
        characters, so ``a[1].parquet`` works.

    Raises
    ------
    InputError
        If a URL or pattern matches no file.
    StorageError
        If the backend cannot be reached or refuses us, or the bucket does not exist.
    """
    from .errors import InputError

    if isinstance(urls, str):
        urls = [urls]
    found: set[str] = set()
    for url in urls:
        fs, path = _fs_for(url, storage_options)
        try:
            matches = _expand_one(fs, path, suffixes)
            if not matches:
                _check_bucket(fs, url, path, storage_options)
        except StorageError:
            raise
        except Exception as exc:
            if not _is_backend_error(exc):
                raise
            raise _storage_error(url, exc, storage_options) from None
        if not matches:
            raise InputError(f"{url}: matches no file; check the path or pattern")
        found.update(_as_url(fs, p) for p in matches)
    return sorted(found)


def _expand_one(
    fs: fsspec.AbstractFileSystem, path: str, suffixes: tuple[str, ...] | None
) -> list[str]:
    if any(c in path for c in _GLOB_CHARS):
        hits = fs.glob(path, detail=True)
        files = [p for p, info in hits.items() if info.get("type", "file") == "file"]
        if files:
            return files
        # Not a pattern after all: an existing file whose name has '[', '*' or '?' in it.
        return [path] if fs.isfile(path) else []
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return []
    if info.get("type") != "directory":
        return [path]
    ends = tuple(s.lower() for s in suffixes) if suffixes else None
    return [p for p in fs.find(path) if ends is None or p.lower().endswith(ends)]


def _check_bucket(
    fs: fsspec.AbstractFileSystem, url: str, path: str, options: Mapping[str, Any] | None
) -> None:
    """Raise StorageError if ``path`` lies in a bucket that does not exist (remote stores).

    Listing a missing bucket gives an empty answer on S3, which would otherwise read as "no
    shards there" instead of "wrong bucket (or endpoint)".
    """
    protocols = set(_protocols(fs))
    if protocols & {"file", "local", "memory"}:
        return
    bucket = fs._strip_protocol(path).split("/", 1)[0]
    if bucket and not fs.exists(bucket):
        raise StorageError(
            f"{url}: bucket {bucket!r} does not exist or is not visible with these credentials; "
            "check the URL, endpoint_url and the credentials"
        )


def read_bytes(
    url: str, storage_options: Mapping[str, Any] | None = None, *, compression: str | None = None
) -> bytes:
    """Read the whole file at ``url`` into memory, optionally decompressing it.

    Parameters
    ----------
    url : str
        One file URL (as returned by :func:`expand_urls`).
    storage_options : mapping, optional
        Passed to fsspec.
    compression : {None, "infer"} or str
        ``"infer"`` decompresses by the file name's suffix (``.gz``, ``.bz2``, ``.xz``, ...,
        case-insensitive), as fsspec's ``compression="infer"``; a codec name forces that codec.

    Returns
    -------
    bytes
        The (decompressed) content. Memory: the compressed and the decompressed bytes are both
        held while decompressing.

    Notes
    -----
    One whole-object read is one GET on S3, the cheapest way to fetch a file that will be
    parsed in full; a ranged reader would issue several requests per file.

    Raises
    ------
    StorageError
        If the file cannot be read (not found, access denied, endpoint unreachable, ...).
    InputError
        If the content cannot be decompressed with the codec of its suffix.
    """
    import io

    from fsspec.compression import compr
    from fsspec.utils import infer_compression

    from .errors import InputError

    fs, path = _fs_for(url, storage_options)
    try:
        raw = fs.cat_file(path)
    except Exception as exc:
        if not _is_backend_error(exc):
            raise
        raise _storage_error(url, exc, storage_options) from None
    codec = infer_compression(url) if compression == "infer" else compression
    if codec is None:
        return raw
    try:
        with compr[codec](io.BytesIO(raw), mode="rb") as f:
            return f.read()
    except Exception as exc:  # codecs raise OSError, EOFError, zlib.error, lzma.LZMAError, ...
        raise InputError(
            f"{url}: cannot decompress as {codec} ({one_line(exc)}); re-export the file"
        ) from None
