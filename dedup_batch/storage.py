"""Storage: the only module that talks to fsspec.

A :class:`Store` is one job ``root`` (a local folder, ``s3://bucket/prefix``, ``memory://...``
or any fsspec URL) opened with the job's ``storage_options``. It resolves the paths named in the
feature shards to exact locations under that root, refusing any that escape it, and lists the
objects under it with their size, modification time and ETag.

Paths are always handled as exact names: nothing here expands glob patterns, so an object called
``a[1].jpg`` is that object and never ``a1.jpg``.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Mapping
from typing import Any

import fsspec
import pandas as pd

from .errors import ScopeError, StorageError

__all__ = ["Store", "join_url", "open_store", "read_url", "redact", "url_exists", "write_url"]

log = logging.getLogger(__name__)

#: storage_options keys whose values are secrets: never logged, written or shown in errors.
SECRET_KEYS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "session_token",
        "aws_secret_access_key",
        "aws_access_key_id",
        "aws_session_token",
        "client_kwargs",
        "sas_token",
        "account_key",
    }
)


def redact(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return a copy of ``options`` with every secret value replaced by ``"***"``."""
    out: dict[str, Any] = {}
    for k, v in (options or {}).items():
        if k.lower() in SECRET_KEYS or any(w in k.lower() for w in ("secret", "token", "pass")):
            out[k] = "***"
        elif isinstance(v, Mapping):
            out[k] = redact(v)
        else:
            out[k] = v
    return out


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
            fs, path = fsspec.core.url_to_fs(self.root, **self.storage_options)
        except (ImportError, ValueError) as exc:
            raise StorageError(f"cannot open root {self.root!r}: {_one_line(exc)}") from None
        self.fs: fsspec.AbstractFileSystem = fs
        self.protocols = _protocols(fs)
        self.is_local = "file" in self.protocols or "local" in self.protocols
        self.root_path = path.rstrip("/") or path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Store, (self.root, self.storage_options))

    def __repr__(self) -> str:  # never shows storage_options: they may hold credentials
        return f"Store({self.root!r})"

    # -- paths -----------------------------------------------------------------------------
    def resolve(self, path: str) -> str:
        """Return the exact filesystem path of ``path`` (relative to root, or absolute under it).

        Raises
        ------
        ScopeError
            If ``path`` is empty, contains a ``..`` segment, names another protocol, bucket or
            folder than the root, or is the root itself.
        """
        if not isinstance(path, str) or not path:
            raise ScopeError(f"empty or non-text path {path!r}")
        if "://" in path:
            proto = path.split("://", 1)[0]
            if proto not in self.protocols and not (self.is_local and proto == "file"):
                raise ScopeError(f"path {path!r} is on {proto}://, outside root {self.root!r}")
            full = self.fs._strip_protocol(path)
        elif self.is_local and posixpath.isabs(path):
            full = path
        else:
            rel = path[2:] if path.startswith("./") else path
            if rel.startswith("/"):
                raise ScopeError(f"path {path!r} is absolute but root {self.root!r} is not local")
            full = f"{self.root_path}/{rel}" if self.root_path not in ("", "/") else f"/{rel}"
        if ".." in full.split("/"):
            raise ScopeError(f"path {path!r} contains '..': refusing to leave root {self.root!r}")
        prefix = self.root_path if self.root_path.endswith("/") else self.root_path + "/"
        if not full.startswith(prefix) or len(full) == len(prefix):
            raise ScopeError(f"path {path!r} resolves outside root {self.root!r}")
        return full

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
        ``mtime`` (float64, seconds since the epoch, NaN where the backend gives none) and
        ``etag`` (str or None). One paginated listing: on S3 this costs one request per 1000
        objects instead of one HEAD per object.
        """
        try:
            found = self.fs.find(self.root_path, detail=True)
        except FileNotFoundError:
            raise StorageError(f"root {self.root!r} does not exist") from None
        except PermissionError as exc:
            raise StorageError(
                f"cannot list root {self.root!r}: access denied ({_one_line(exc)}); "
                "check credentials and permissions"
            ) from None
        except OSError as exc:
            raise StorageError(
                f"cannot list root {self.root!r}: {_one_line(exc)}; "
                "check endpoint_url and credentials"
            ) from None
        rows = [
            (name, *_stat(info))
            for name, info in found.items()
            if info.get("type", "file") == "file"
        ]
        df = pd.DataFrame(rows, columns=["fs_path", "size", "mtime", "etag"])
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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def open_store(root: str, storage_options: Mapping[str, Any] | None = None) -> Store:
    """Open ``root`` with ``storage_options`` (see :class:`Store`)."""
    return Store(root, storage_options)


# -- whole-file I/O by URL (plan directories, job specs, reports) ---------------------------
def _url_options(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    # Options such as endpoint_url belong to remote backends: never hand them to local files.
    return {} if "://" not in url or url.startswith("file://") else dict(storage_options or {})


def join_url(base: str, *names: str) -> str:
    """``base`` joined with ``names`` by ``/`` (works for local paths and URLs)."""
    return "/".join([base.rstrip("/"), *names])


def read_url(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The whole content of ``url``; a missing file raises :class:`FileNotFoundError`."""
    fs, path = fsspec.core.url_to_fs(url, **_url_options(url, storage_options))
    return fs.cat_file(path)


def write_url(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``data`` to ``url`` whole, creating parent folders where the backend has them.

    Local files are written to a temporary name and renamed, so a reader never sees half a file.
    """
    fs, path = fsspec.core.url_to_fs(url, **_url_options(url, storage_options))
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if "file" in _protocols(fs) or "local" in _protocols(fs):
        tmp = f"{path}.tmp-{os.getpid()}"
        fs.pipe_file(tmp, data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def url_exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``url`` names an existing file or folder."""
    fs, path = fsspec.core.url_to_fs(url, **_url_options(url, storage_options))
    return bool(fs.exists(path))


# -- reads of single images (report thumbnails, sweep pairs) ---------------------------------
def read_bytes(store: Store, fs_path: str, max_bytes: int | None = None) -> bytes:
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
            f"cannot read {store.url(fs_path)!r}: access denied ({_one_line(exc)})"
        ) from None
    except IsADirectoryError:
        raise FileNotFoundError(fs_path) from None
    except OSError as exc:
        raise StorageError(f"cannot read {store.url(fs_path)!r}: {_one_line(exc)}") from None
    if len(data) > max_bytes:
        from .errors import InputError  # imported here: this block is additive to the module

        raise InputError(f"{store.url(fs_path)!r} is larger than {max_bytes} bytes")
    return data
