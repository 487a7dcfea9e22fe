"""Where a trashed object goes: a one-to-one map from S3 keys to trash paths on any backend."""

from __future__ import annotations

import hashlib

__all__ = ["trash_key"]

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
