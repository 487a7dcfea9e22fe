"""Whole files by URL (plan directories, job specs, shards, reports) and URL expansion.

Every URL is opened with the options :func:`.options.url_options` gives it, and every backend
failure is translated once (:mod:`.errors`): a missing file is ``FileNotFoundError`` where the
caller decides what that means (:func:`read_url`, :func:`read_object`), a
:class:`StorageError` where it is an error (:func:`read_bytes` of a shard).
"""

from __future__ import annotations

import io
import lzma
import posixpath
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import fsspec

from ..errors import InputError, StorageError, one_line
from .errors import storage_error, translated
from .options import open_url, protocols
from .store import atomic_local_write

if TYPE_CHECKING:
    from .store import Store

__all__ = [
    "expand_urls",
    "join_url",
    "read_bytes",
    "read_object",
    "read_url",
    "url_exists",
    "write_url",
]

#: What the decompressors raise for a corrupt or truncated stream (gzip and bz2 raise OSError
#: or EOFError, zlib its own error, lzma LZMAError, and bad arguments ValueError).
_CODEC_ERRORS = (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError)


def join_url(base: str, *names: str) -> str:
    """``base`` joined with ``names`` by ``/`` (works for local paths and URLs)."""
    return "/".join([base.rstrip("/"), *names])


def read_url(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The whole content of ``url``; a missing file raises :class:`FileNotFoundError`, other
    failures :class:`StorageError`."""
    fs, path = _fs_for(url, storage_options)
    with translated(url, storage_options):
        return fs.cat_file(path)


def write_url(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``data`` to ``url`` whole, creating parent folders where the backend has them.

    Local files are written atomically and fsynced (see :func:`.store.atomic_local_write`).
    """
    fs, path = _fs_for(url, storage_options)
    with translated(url, storage_options):
        if {"file", "local"} & set(protocols(fs)):
            atomic_local_write(path, data)
            return
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(path, data)


def url_exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``url`` names an existing file or folder."""
    fs, path = _fs_for(url, storage_options)
    with translated(url, storage_options):
        return bool(fs.exists(path))


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
        where = f"cannot read {store.url(fs_path)!r}"
        passthrough = (FileNotFoundError, IsADirectoryError)
        with translated(where, store.storage_options, passthrough=passthrough):
            if max_bytes is None:
                return store.fs.cat_file(fs_path)
            with store.fs.open(fs_path, "rb") as fh:
                data = fh.read(max_bytes + 1)
    except IsADirectoryError:  # a folder where an image was expected: no such image
        raise FileNotFoundError(fs_path) from None
    if len(data) > max_bytes:
        raise InputError(f"{store.url(fs_path)!r} is larger than {max_bytes} bytes")
    return data


#: Characters that make a URL a glob pattern for fsspec.
_GLOB_CHARS = ("*", "?", "[")


def _fs_for(url: str, options: Mapping[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return open_url(url, options)
    except ImportError as exc:
        raise StorageError(
            f"{url}: the filesystem for this URL is not installed ({one_line(exc)}); "
            "install its fsspec backend (e.g. s3fs for s3://)"
        ) from None
    except ValueError as exc:
        raise StorageError(f"{url}: cannot open this URL ({one_line(exc)})") from None


def _as_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    local = {"file", "local"} & set(protocols(fs))
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
    if isinstance(urls, str):
        urls = [urls]
    found: set[str] = set()
    for url in urls:
        fs, path = _fs_for(url, storage_options)
        with translated(url, storage_options):
            matches = _expand_one(fs, path, suffixes)
            if not matches:
                _check_bucket(fs, url, path, storage_options)
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
    if set(protocols(fs)) & {"file", "local", "memory"}:
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
    from fsspec.compression import compr
    from fsspec.utils import infer_compression

    fs, path = _fs_for(url, storage_options)
    try:
        with translated(url, storage_options):
            raw = fs.cat_file(path)
    except FileNotFoundError as exc:  # a shard that vanished: the store's answer, exit 2
        raise storage_error(url, exc, storage_options) from None
    codec = infer_compression(url) if compression == "infer" else compression
    if codec is None:
        return raw
    try:
        with compr[codec](io.BytesIO(raw), mode="rb") as f:
            return f.read()
    except _CODEC_ERRORS as exc:
        raise InputError(
            f"{url}: cannot decompress as {codec} ({one_line(exc)}); re-export the file"
        ) from None
