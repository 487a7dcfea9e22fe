"""What to embed: the images under the root, compared with what earlier runs wrote.

An image is *unchanged* when a shard row has its path and the object still matches the row's
ETag (or, where the store gives none, its size and modification time): the one comparison of
"unchanged" in :meth:`dedup_batch.storage.ObjectStat.differs`. Everything else listed is
embedded, except objects known to be bad and unchanged since, and objects that need no read to
be refused (symbolic links, empty and oversized objects).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pandas as pd

from ..errors import ConfigError
from ..storage import ObjectStat, Store
from .images import PERMANENT_KINDS
from .output import ERROR_COLUMNS

__all__ = [
    "DEFAULT_EXTENSIONS",
    "OPTIONAL_EXTENSIONS",
    "Work",
    "batches",
    "default_extensions",
    "list_images",
    "parse_extensions",
    "plan_work",
]

#: File-name extensions embedded by default (compared case-insensitively).
DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "tif", "tiff", "bmp")
#: Extensions added to the defaults where this Pillow reads their format (Pillow format name):
#: HEIC/HEIF through the pillow-heif plugin, AVIF natively since Pillow 11.3.
OPTIONAL_EXTENSIONS = {"heic": "HEIF", "heif": "HEIF", "avif": "AVIF"}


def default_extensions() -> tuple[str, ...]:
    """:data:`DEFAULT_EXTENSIONS`, plus those of :data:`OPTIONAL_EXTENSIONS` this machine's
    Pillow can read (so a HEIC photo is embedded where pillow-heif is installed, and not listed
    as an error where it is not)."""
    from .images import readable_formats

    formats = readable_formats()
    extra = tuple(ext for ext, fmt in OPTIONAL_EXTENSIONS.items() if fmt in formats)
    return DEFAULT_EXTENSIONS + extra


def parse_extensions(extensions: str | Iterable[str]) -> tuple[str, ...]:
    """``"jpg,PNG, .webp"`` or a sequence -> ``(".jpg", ".png", ".webp")`` (lower case)."""
    items = extensions.split(",") if isinstance(extensions, str) else list(extensions)
    out: list[str] = []
    for item in items:
        ext = str(item).strip().lower().lstrip(".")
        if not ext:
            continue
        if "/" in ext or "*" in ext:
            raise ConfigError(f"--extensions: {item!r} is not a file-name extension (e.g. jpg)")
        if "." + ext not in out:
            out.append("." + ext)
    if not out:
        raise ConfigError("--extensions is empty: give e.g. jpg,png")
    return tuple(out)


def list_images(store: Store, extensions: Sequence[str]) -> pd.DataFrame:
    """The objects under the root whose name ends with one of ``extensions``.

    Returns
    -------
    DataFrame
        Indexed by the exact filesystem path (as :meth:`Store.list_objects`), with ``size``,
        ``mtime``, ``etag``, ``kind`` and ``path`` (relative to the root), sorted by path.
        One listing of the root: on S3 one request per 1000 objects.
    """
    listing = store.list_objects()
    ends = tuple(e.lower() for e in extensions)
    keep = [str(p).lower().endswith(ends) for p in listing.index]
    images = listing.loc[keep].copy()
    images["path"] = [store.relative(str(p)) for p in images.index]
    return images.sort_values("path", kind="stable")


@dataclass
class Work:
    """What a run has to do.

    Attributes
    ----------
    todo : DataFrame
        The images to read and embed (rows of :func:`list_images`).
    unchanged : int
        Images with a current row in the shards: not read.
    known_bad : DataFrame
        Earlier errors (``ERROR_COLUMNS``) of objects unchanged since: not read again.
    refused : DataFrame
        Errors decided from the listing alone (links, empty and oversized objects).
    stale : DataFrame
        Shard rows (``shard``, ``row``, ``path``) that newer rows or changed objects replace:
        removed from their shards before the new shards are written.
    """

    todo: pd.DataFrame
    unchanged: int
    known_bad: pd.DataFrame
    refused: pd.DataFrame
    stale: pd.DataFrame


def _stat(size: object, mtime: object, etag: object, kind: str | None = "file") -> ObjectStat:
    return ObjectStat(
        None if pd.isna(size) else int(size),  # type: ignore[call-overload]
        float("nan") if pd.isna(mtime) else float(mtime),  # type: ignore[arg-type]
        etag if isinstance(etag, str) and etag else None,
        kind,
    )


def plan_work(
    images: pd.DataFrame, state: pd.DataFrame, old_errors: pd.DataFrame, *, max_bytes: int
) -> Work:
    """Compare the listing with the shards' state and the earlier errors.

    Parameters
    ----------
    images : DataFrame
        From :func:`list_images`.
    state : DataFrame
        From :func:`dedup_batch.embed.output.read_state` (shard order, then row order).
    old_errors : DataFrame
        ``embed-errors.csv`` of the previous run.
    max_bytes : int
        Objects larger than this are refused without a read.

    Notes
    -----
    Per path, the last row (in shard order) that matches the object is kept; every other row
    of that path is stale. A path no longer listed keeps its last row (``plan`` reports it as
    missing). Time: one Python comparison per shard row and per listed image.
    """
    now = {
        p: _stat(s, m, e, k)
        for p, s, m, e, k in zip(
            images["path"],
            images["size"],
            images["mtime"],
            images["etag"],
            images["kind"],
            strict=True,
        )
    }
    stale = state.iloc[0:0][["shard", "row", "path"]]
    done: set[str] = set()
    if len(state):
        current = [
            p in now and _stat(s, m, e).differs(now[p]) is None
            for p, s, m, e in zip(
                state["path"], state["size"], state["mtime"], state["etag"], strict=True
            )
        ]
        listed = state["path"].isin(now.keys()).to_numpy()
        cur = pd.Series(current, index=state.index, dtype=bool)
        keep = state[cur | ~listed].groupby("path", sort=False).tail(1).index
        stale = state.drop(index=keep)[["shard", "row", "path"]]
        done = set(state.loc[keep[cur.loc[keep].to_numpy()], "path"])

    refused_rows = []
    for p, size, mtime, etag, kind in zip(
        images["path"],
        images["size"],
        images["mtime"],
        images["etag"],
        images["kind"],
        strict=True,
    ):
        if kind != "file":
            why = ("link", "a symbolic link (not followed; its target is embedded where it lies)")
        elif int(size) == 0:
            why = ("empty", "empty object (0 bytes)")
        elif int(size) > max_bytes:
            why = ("too-large", f"larger than {max_bytes:,} bytes")
        else:
            continue
        refused_rows.append((p, why[1], why[0], size, mtime, etag))
    refused = pd.DataFrame(refused_rows, columns=ERROR_COLUMNS)

    known = old_errors[old_errors["kind"].isin(PERMANENT_KINDS)]
    keep_bad = [
        p in now and p not in done and _stat(s, m, e, now[p].kind).differs(now[p]) is None
        for p, s, m, e in zip(
            known["path"], known["size"], known["mtime"], known["etag"], strict=True
        )
    ]
    known_bad = known.loc[pd.Series(keep_bad, index=known.index, dtype=bool)]
    known_bad = known_bad[~known_bad["path"].isin(set(refused["path"]))]

    skip = done | set(known_bad["path"]) | set(refused["path"])
    todo = images[~images["path"].isin(skip)]
    return Work(
        todo=todo,
        unchanged=len(done),
        known_bad=known_bad.reset_index(drop=True),
        refused=refused,
        stale=stale,
    )


def batches(todo: pd.DataFrame, batch_size: int) -> list[list[tuple]]:
    """``todo`` as lists of ``(fs_path, path, size, mtime, etag)``, ``batch_size`` each."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    rows = [
        (str(fs), p, int(s), float(m), e if isinstance(e, str) and e else None)
        for fs, p, s, m, e in zip(
            todo.index, todo["path"], todo["size"], todo["mtime"], todo["etag"], strict=True
        )
    ]
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
