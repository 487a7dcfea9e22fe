"""Image headers: the pixel size of each image, read from its header alone.

The keep policy ``original`` prefers the member of a cluster with the most pixels (a resized or
cropped copy has fewer). Pillow's ``Image.open`` parses only the header (for a JPEG, the markers
up to the first scan; for a PNG, the IHDR chunk), so the size costs one small ranged read of
the object's first :data:`HEADER_BYTES`, not a download and a decode. A header that does not fit
there (a JPEG with a large ICC profile or XMP packet, a TIFF whose directory sits at the end) is
read again through a buffered file, ``HEADER_BYTES`` a request, until Pillow has what it needs.

Reads run where the images are read anyway: one task per :data:`HEADER_BATCH` paths on the Dask
workers when a client is given, a small thread pool otherwise. An image that cannot be read or
parsed (missing, access denied, not an image, a decompression bomb) gets an unknown size: it is
never an error, and the keep policy falls back to its next key.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from typing import IO, Any

import numpy as np
import pandas as pd

from .executor import run_batches
from .progress import Stage
from .storage import Store

__all__ = ["HEADER_BATCH", "HEADER_BYTES", "image_size", "read_dimensions"]

log = logging.getLogger(__name__)

#: Bytes read first from each image: a JPEG's EXIF block is at most 64 KiB and usually comes
#: before the frame header; PNG, GIF, WebP and BMP need under 100 bytes.
HEADER_BYTES = 64 * 1024
#: Paths per task: enough to make task overhead (~1 ms) small against the reads (one request of
#: ~5-50 ms each on S3), few enough to spread a few thousand duplicates over many workers.
HEADER_BATCH = 256
#: Threads when no Dask client is given (the reads are mostly waiting on storage).
HEADER_THREADS = 8
#: EXIF orientations that turn the stored image by 90 degrees (width and height swap on display).
_TRANSPOSED = frozenset({5, 6, 7, 8})


def image_size(fp: IO[bytes]) -> tuple[int, int]:
    """``(width, height)`` in pixels of the image in ``fp``, as displayed (EXIF orientation).

    Reads the header only. Raises whatever Pillow raises for data it cannot parse
    (``UnidentifiedImageError``, ``OSError``, ``SyntaxError`` for a truncated header,
    ``DecompressionBombError``...).
    """
    from PIL import Image

    with Image.open(fp) as im:
        width, height = im.size
        orientation = None
        # Only EXIF that the header parse already holds: im.getexif() may decode a PNG whole.
        exif = im.info.get("exif")
        if isinstance(exif, bytes):
            parsed = Image.Exif()
            parsed.load(exif)
            orientation = parsed.get(0x0112)
        elif hasattr(im, "tag_v2"):  # TIFF: the orientation is a tag of the first directory
            orientation = im.tag_v2.get(0x0112)
    if orientation in _TRANSPOSED:
        width, height = height, width
    return int(width), int(height)


def _size_one(store: Store, fs_path: str) -> tuple[int, int] | None:
    if "?versionId=" in fs_path and store.is_s3:
        # s3fs parses '?versionId=' out of a key: it would read another object. Size unknown.
        return None
    try:
        # One ranged GET on object stores (open() would add a HEAD for the size first);
        # cat_file takes the path literally, never as a glob pattern.
        head = store.fs.cat_file(fs_path, start=0, end=HEADER_BYTES)
    except Exception as exc:  # missing, access denied, a backend error: size unknown
        log.debug("header of %s not read: %s", fs_path, exc)
        return None
    try:
        return image_size(io.BytesIO(head))
    except Exception:
        if len(head) < HEADER_BYTES:  # that was the whole file: not an image Pillow knows
            return None
    try:  # the header is longer than the first read: let Pillow read on as far as it needs
        with store.fs.open(fs_path, "rb", block_size=HEADER_BYTES) as fh:
            return image_size(fh)
    except Exception as exc:
        log.debug("header of %s not parsed: %s", fs_path, exc)
        return None


def _size_batch(store: Store, fs_paths: Sequence[str]) -> list[tuple[int, int] | None]:
    """One task: the sizes of a batch of images (runs on a Dask worker or a thread)."""
    return [_size_one(store, p) for p in fs_paths]


def read_dimensions(
    store: Store,
    fs_paths: Sequence[str],
    *,
    client: Any = None,
    batch_size: int = HEADER_BATCH,
    progress: Stage | str | None = None,
) -> pd.DataFrame:
    """Width and height of each image, read from its header.

    Parameters
    ----------
    store : Store
        Where the images are; pickled to the workers as ``(root, storage_options)``.
    fs_paths : sequence of str, shape (n,)
        Exact filesystem paths (from :meth:`Store.resolve`); never glob-expanded.
    client : distributed.Client, optional
        Run one task per ``batch_size`` paths on its workers; without one, a thread pool.
    batch_size : int
        Paths per task.
    progress : Stage or str or None
        A running stage to advance (by images), the name of a stage to open, or ``None``.

    Returns
    -------
    DataFrame, shape (n, 2)
        Columns ``width`` and ``height`` (nullable ``Int64``, pixels as displayed), in the
        order of ``fs_paths``; ``<NA>`` where the header could not be read or parsed. A task
        that fails as a whole (a worker died twice) leaves its batch unknown.

    Notes
    -----
    Cost: one ranged read of :data:`HEADER_BYTES` per image (rarely more), and memory for one
    header per running task. The client holds two integers per path.
    """
    n = len(fs_paths)
    width = np.full(n, -1, dtype=np.int64)
    height = np.full(n, -1, dtype=np.int64)
    starts = list(range(0, n, batch_size))
    batches = [list(fs_paths[s : s + batch_size]) for s in starts]
    start_of = {id(b): s for b, s in zip(batches, starts, strict=True)}
    for batch, fut in run_batches(
        _size_batch,
        batches,
        store,
        client=client,
        threads=HEADER_THREADS,
        progress=progress,
        name="headers",
    ):
        s = start_of[id(batch)]
        try:
            sizes = fut.result()
        except Exception as exc:  # the task as a whole failed (a worker died twice)
            log.warning("image header task failed (%s): sizes unknown for a batch", exc)
            continue
        for i, wh in enumerate(sizes, start=s):
            if wh is not None:
                width[i], height[i] = wh
    unknown = int((width < 0).sum())
    if unknown:
        log.info("pixel size unknown for %d of %d images (unreadable or not images)", unknown, n)
    known = width >= 0
    return pd.DataFrame(
        {
            "width": pd.arrays.IntegerArray(np.where(known, width, 0), ~known),
            "height": pd.arrays.IntegerArray(np.where(known, height, 0), ~known),
        }
    )
