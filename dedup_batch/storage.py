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

__all__ = [
    "Store",
    "expand_urls",
    "join_url",
    "open_store",
    "read_bytes",
    "read_object",
    "read_url",
    "redact",
    "url_exists",
    "write_url",
]

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


# -- reading feature shards (used by the load stage) ------------------------------------------

# Exceptions raised by the storage backends' client libraries that are not OSErrors (botocore's
# EndpointConnectionError, NoCredentialsError, ...): matched by the top-level module of their
# class, so that storage needs no hard import of any optional backend library.
_BACKEND_MODULES = frozenset(
    {"botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "s3fs", "gcsfs", "adlfs",
     "google", "azure"}
)

#: Characters that make a URL a glob pattern for fsspec.
_GLOB_CHARS = ("*", "?", "[")


def _is_backend_error(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return True
    return any(c.__module__.split(".")[0] in _BACKEND_MODULES for c in type(exc).__mro__)


def _secret_values(options: Mapping[str, Any] | None) -> list[str]:
    """Every string value under a secret key of ``options`` (nested mappings included)."""
    found: list[str] = []
    for k, v in (options or {}).items():
        if isinstance(v, Mapping):
            found += _secret_values(v)
        elif isinstance(v, str) and redact({k: v})[k] == "***" and len(v) >= 4:
            found.append(v)
    return found


def _scrub(text: str, options: Mapping[str, Any] | None) -> str:
    """``text`` with every secret value of ``options`` replaced by ``***``."""
    for secret in _secret_values(options):
        text = text.replace(secret, "***")
    return text


def _storage_error(url: str, exc: BaseException,
                   options: Mapping[str, Any] | None) -> StorageError:
    """Translate a backend exception raised while reading ``url`` into a one-line StorageError.

    The message names the URL and what to check; secrets from ``options`` never appear in it.
    """
    names = {c.__name__ for c in type(exc).__mro__}
    detail = _scrub(_one_line(exc), options)
    endpoint = (options or {}).get("endpoint_url")
    where = f" {endpoint}" if endpoint else ""
    if names & {"NoCredentialsError", "PartialCredentialsError"}:
        hint = ("no usable credentials: set key/secret in storage_options, the AWS_* environment "
                "variables, a profile or a role")
    elif isinstance(exc, PermissionError):
        hint = ("access denied: check the credentials (key/secret, profile, role) and that they "
                "may read this bucket")
    elif isinstance(exc, FileNotFoundError):
        hint = "not found: check the bucket and the path"
    elif isinstance(exc, ConnectionError | TimeoutError) or names & {
        "EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
        "ConnectionError", "ProxyConnectionError", "SSLError",
    }:
        hint = f"cannot reach the storage endpoint{where}: check endpoint_url and the network"
    else:
        hint = "the storage backend refused the request: check endpoint_url and the credentials"
    return StorageError(f"{url}: {hint} ({detail})")


def _fs_for(url: str, options: Mapping[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(url, **dict(options or {}))
    except ImportError as exc:
        raise StorageError(
            f"{url}: the filesystem for this URL is not installed ({_one_line(exc)}); "
            "install its fsspec backend (e.g. s3fs for s3://)"
        ) from None
    except ValueError as exc:
        raise StorageError(f"{url}: cannot open this URL ({_one_line(exc)})") from None


def _as_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    local = {"file", "local"} & set(_protocols(fs))
    return path if local else fs.unstrip_protocol(path)


def expand_urls(urls: str | list[str] | tuple[str, ...],
                storage_options: Mapping[str, Any] | None = None,
                *, suffixes: tuple[str, ...] | None = None) -> list[str]:
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


def _expand_one(fs: fsspec.AbstractFileSystem, path: str,
                suffixes: tuple[str, ...] | None) -> list[str]:
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


def _check_bucket(fs: fsspec.AbstractFileSystem, url: str, path: str,
                  options: Mapping[str, Any] | None) -> None:
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


def read_bytes(url: str, storage_options: Mapping[str, Any] | None = None, *,
               compression: str | None = None) -> bytes:
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
            f"{url}: cannot decompress as {codec} ({_one_line(exc)}); re-export the file"
        ) from None
