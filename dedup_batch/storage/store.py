"""The store: one job root, its paths' single identity, listing, stats and small files.

A :class:`Store` is one job ``root`` (a local folder, ``s3://bucket/prefix``, ``memory://...``
or any fsspec URL) opened with the job's ``storage_options``. It resolves the paths named in the
feature shards to exact locations under that root, refusing any that escape it, and lists the
objects under it with their size, modification time and ETag.

Paths are always handled as exact names: nothing here expands glob patterns, so an object called
``a[1].jpg`` is that object and never ``a1.jpg``. S3 calls are in :mod:`.s3`; backend errors are
translated by :mod:`.errors`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import posixpath
import stat as _stat_mod
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import fsspec
import pandas as pd

from ..errors import ScopeError, StorageError, one_line
from ..secrets import scrub
from . import s3
from .errors import is_backend_error, storage_error, translated
from .objects import LINKED_FOLDER, KeyResult, ObjectStat, md5_of_etag
from .options import open_url, protocols

__all__ = ["COPY_BLOCK_BYTES", "Store", "atomic_local_write"]

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
            fs, path = open_url(self.root, self.storage_options)
        except (ImportError, ValueError) as exc:
            raise StorageError(f"cannot open root {self.root!r}: {one_line(exc)}") from None
        self.fs: fsspec.AbstractFileSystem = fs
        self.protocols = protocols(fs)
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
        except OSError as exc:
            raise storage_error(
                f"cannot list root {self.root!r}", exc, self.storage_options
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

    def _scrub(self, text: str) -> str:
        """``text`` with every secret value of the storage options replaced by ``***``."""
        return scrub(text, self.storage_options)

    def _storage_error(self, what: str, exc: BaseException) -> StorageError:
        """``exc`` (raised while doing ``what`` under the root) as a one-line StorageError."""
        return storage_error(f"{what} under {self.root!r}", exc, self.storage_options)

    def _translated(self, what: str) -> Any:
        """A context in which backend errors become :meth:`_storage_error` (see
        :func:`dedup_batch.storage.errors.translated`)."""
        return translated(f"{what} under {self.root!r}", self.storage_options)

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
                out.update(s3.stat_range(self, paths))
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
                return KeyResult("changed", "LinkedFolder", LINKED_FOLDER)
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
            return s3.head(self, full)
        try:
            with self._translated(f"info of {full!r}"):
                info = self.fs.info(full)
        except FileNotFoundError:
            return None
        if info.get("type", "file") != "file":
            return ObjectStat(0, float("nan"), None, "other")
        return ObjectStat(*_stat(info))

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
            for i in range(0, len(fs_paths), s3.S3_MAX_DELETE_KEYS):
                out.update(s3.delete_objects(self, fs_paths[i : i + s3.S3_MAX_DELETE_KEYS], etags))
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

    def copy_exact(
        self, src: str, dst_store: Store, dst: str, *, server_side: bool = True
    ) -> KeyResult:
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
        (server-side ``CopyObject``) and ``server_side``.

        ``server_side=False`` where an object may appear at ``dst`` while this runs (a
        restore into the user's bucket): a ``CopyObject`` is not conditional on the
        destination's absence (not every store honours ``If-None-Match`` on it; moto does
        not), so an object written between the check and the copy would be overwritten. The
        streamed copy's ``PutObject`` is (``If-None-Match: *``).

        A server-side copy of an object whose ETag is no MD5 (multipart) is read back once
        for its MD5: the checksum a restore verifies the trash copy against.
        """
        src_stat = self._stat_one(src)
        if src_stat is None or src_stat.kind not in ("file", "link"):
            return KeyResult("absent", "NoSuchKey", "source object not found")
        if src_stat.kind == "link":
            return KeyResult("failed", "SymbolicLink", "a symbolic link is not copied")
        try:
            if dst_store._stat_one(dst) is not None:
                return KeyResult("exists", "ObjectExists", "an object already exists there")
            same = self.storage_options == dst_store.storage_options
            if server_side and self.is_s3 and dst_store.is_s3 and same:
                # exactly the version we looked at: a concurrent overwrite fails the copy
                s3.copy_object(self, src, dst_store, dst, src_stat.etag)
                got = dst_store._stat_one(dst)
                digest = None
                if got is not None and md5_of_etag(src_stat.etag) is None:
                    digest = dst_store.md5(dst)
            else:
                digest = self._stream_copy(src, dst_store, dst)
                if digest is None:
                    return KeyResult("exists", "ObjectExists", "an object already exists there")
                got = dst_store._stat_one(dst)
        except StorageError as exc:
            return KeyResult("failed", "CopyFailed", str(exc))
        except PermissionError as exc:
            return KeyResult("failed", "AccessDenied", self._scrub(one_line(exc)))
        except Exception as exc:  # a failed copy is this key's outcome, reported, not a crash
            if not is_backend_error(exc):
                raise  # a bug, not the store's answer
            return KeyResult("failed", "CopyFailed", self._scrub(one_line(exc)))
        if got is None:
            return KeyResult("failed", "VerifyFailed", "the copy is not there after copying")
        if got.size != src_stat.size:
            return KeyResult(
                "failed", "VerifyFailed", f"copy has {got.size} bytes, source {src_stat.size}"
            )
        src_md5 = md5_of_etag(src_stat.etag)
        if digest is None:
            if src_md5 is not None and md5_of_etag(got.etag) != src_md5:
                return KeyResult("failed", "VerifyFailed", "copy ETag differs from the source")
            digest = src_md5
        else:
            dst_md5 = md5_of_etag(got.etag)
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
            return s3.get_object(self, full)
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
                if not s3.put_if_absent(dst_store, dst, bytes(body)):
                    return None
                return md5.hexdigest()
            dst_store.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
            # exclusive create ("xb": fsspec's memory://, local, ...), so that an object written
            # there since the caller's check is never overwritten; where a backend has none,
            # the check is made again just before writing (a narrower window, not none)
            try:
                fout = dst_store.fs.open(dst, "xb")
            except FileExistsError:
                return None
            except (ValueError, NotImplementedError, TypeError):
                if dst_store.fs.exists(dst):
                    return None
                fout = dst_store.fs.open(dst, "wb")
            with fout:
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
        known = md5_of_etag(stat.etag) if stat is not None else None
        return f"md5:{known or self.md5(full)}"

    # -- small files (journal, reports) -----------------------------------------------------
    def read_bytes(self, full: str) -> bytes | None:
        """The bytes of the file at exactly ``full``, or ``None`` if there is none.

        ``None`` rather than ``FileNotFoundError``: for the journal and the embed outputs a
        missing file is an ordinary answer ("no record yet"), not an error. Other failures
        raise :class:`StorageError` (see :mod:`dedup_batch.storage.errors`).
        """
        try:
            with self._translated(f"reading {full!r}"), self.fs.open(full, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write_bytes(self, full: str, data: bytes) -> None:
        """Write ``data`` to ``full`` atomically: a reader sees the old file or the new one.

        Local: :func:`atomic_local_write` (a temporary file, fsynced, then ``os.replace``).
        Object stores: one PUT (S3 and memory:// make an object visible only when complete).
        """
        with self._translated(f"writing {full!r}"):
            if self.is_local:
                atomic_local_write(full, data)
            else:
                self.fs.pipe_file(full, data)
                if self.is_s3:
                    self.fs.invalidate_cache()

    def list_files(self, folder: str) -> list[str]:
        """Exact paths of the files directly in ``folder`` (fresh listing, no cache, no globs)."""
        try:
            with self._translated(f"listing {folder!r}"):
                if self.is_local:
                    if not os.path.isdir(folder):
                        return []
                    return sorted(
                        os.path.join(folder, n)
                        for n in os.listdir(folder)
                        if os.path.isfile(os.path.join(folder, n))
                    )
                self.fs.invalidate_cache()
                entries = self.fs.ls(folder, detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"] for e in entries if e.get("type", "file") == "file")


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


#: Block size for streamed copies (trash across backends): bounds memory per copy.
COPY_BLOCK_BYTES = 1 << 20
#: Flags to open a folder on the way to a local file: never through a symbolic link.
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _errno_code(exc: OSError) -> str:
    return type(exc).__name__ if exc.errno is None else f"Errno{exc.errno}"


def atomic_local_write(path: str, data: bytes) -> None:
    """Write a local file atomically and durably: a temporary file next to it, fsynced, then
    ``os.replace``; a reader (or a crash) sees the old file or the new one, never half of one.
    The one implementation behind :meth:`Store.write_bytes` and
    :func:`dedup_batch.storage.write_url`."""
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
