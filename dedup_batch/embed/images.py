"""Reading and decoding one image: exact-path reads, Pillow with guards, safe mode conversion.

Everything that can go wrong with one object (missing, unreadable, not an image, truncated, a
decompression bomb, too small, a mode Pillow cannot convert) becomes a :class:`BadImage` with a
``kind`` and a one-line ``reason``; the caller lists it in ``embed-errors.csv`` and carries on.
"""

from __future__ import annotations

import errno
import functools
import io
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ..errors import one_line as _first_line
from ..storage import Store

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "FORMATS",
    "PERMANENT_KINDS",
    "BadImage",
    "Decoded",
    "decode_image",
    "read_image",
    "readable_formats",
]

#: Pillow formats ``embed`` opens. A whitelist: Pillow also opens EPS (through Ghostscript, an
#: external program), PSD, ICO... whatever the file's bytes claim to be, and a bucket's files
#: are untrusted. JPEG includes MPO, the multi-picture JPEG many cameras write; HEIF and AVIF
#: open where a Pillow plugin for them is installed (pillow-heif; Pillow >= 11.3 reads AVIF).
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP", "HEIF", "AVIF")

#: Error kinds that do not change while the object does not: an unchanged object with one of
#: these is not read again by the next run. ``read`` errors (the store failed) are retried.
PERMANENT_KINDS = frozenset({"empty", "too-large", "link", "not-image", "corrupt", "bomb", "small"})

#: 16-bit integer modes: scaled to 8 bits (Pillow's own conversion to "L" clips at 255).
_MODES_16 = ("I;16", "I;16L", "I;16B", "I;16N")


class BadImage(Exception):
    """An object that gets no vector. ``kind`` is one of :data:`PERMANENT_KINDS` or ``read``."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class Decoded(NamedTuple):
    """A decoded image: ``image`` (RGB, at most ``decode_px`` a side, or about) and the
    stored image's own ``width`` and ``height`` in pixels."""

    image: Image.Image
    width: int
    height: int


def read_image(store: Store, fs_path: str, *, max_bytes: int) -> bytes:
    """The bytes of the object at exactly ``fs_path`` (never glob-expanded).

    Local roots: opened without following a symbolic link; S3: one GetObject by the exact key
    (a key holding ``?versionId=`` is that key, not a version). At most ``max_bytes + 1`` bytes
    are kept.

    Raises
    ------
    BadImage
        ``read``: the object vanished, access was denied or the store failed (retried by the
        next run); ``too-large``: more than ``max_bytes`` bytes.
    """
    try:
        # Store.open_exact is the one exact-key reader of the storage module (apply's trash
        # copies use it); read_object's fs.open/cat_file would parse '?versionId=' on S3.
        with store.open_exact(fs_path) as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise BadImage("read", "no longer exists (deleted since it was listed)") from None
    except PermissionError:
        raise BadImage("read", "access denied") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symbolic link appeared on the path since the listing
            raise BadImage("link", "a symbolic link (not followed)") from None
        raise BadImage("read", f"read failed: {_one_line(exc)}") from None
    except Exception as exc:  # botocore errors are not OSErrors
        raise BadImage("read", f"read failed: {_one_line(exc)}") from None
    if len(data) > max_bytes:
        raise BadImage("too-large", f"larger than {max_bytes:,} bytes")
    return data


def decode_image(
    data: bytes, *, max_pixels: int, decode_px: int | None = None, min_px: int = 1
) -> Decoded:
    """Decode ``data`` to an RGB image for a model.

    Parameters
    ----------
    data : bytes
        The file's content.
    max_pixels : int
        Refuse images with more pixels than this, from the header, before decoding
        (decompression bombs: a small file that decodes to gigabytes).
    decode_px : int, optional
        The model's input size: JPEGs are decoded at the largest DCT reduction (1/2, 1/4, 1/8)
        that keeps both sides at least this large (``Image.draft``); other formats at full size.
    min_px : int
        Refuse images smaller than this on a side.

    Returns
    -------
    Decoded

    Raises
    ------
    BadImage
        ``not-image``, ``corrupt`` (truncated, damaged, unsupported mode), ``bomb``, ``small``.

    Notes
    -----
    Memory: the decoded image (``decode_px``-ish squared × 3 bytes for a drafted JPEG, the full
    ``width × height × 3`` for other formats, at most ``max_pixels × 4``). Time: dominated by the
    decoder; ``draft`` makes a 12 MP JPEG about 4-10x cheaper to decode.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadImage("empty", "empty object (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data), formats=readable_formats())
    except UnidentifiedImageError:
        raise BadImage("not-image", "not an image file Pillow can read") from None
    except Image.DecompressionBombError as exc:
        raise BadImage("bomb", f"decompression bomb: {_one_line(exc)}") from None
    except Exception as exc:
        raise BadImage("corrupt", f"unreadable image header: {_one_line(exc)}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise BadImage(
            "bomb",
            f"decompression bomb: {width}x{height} = {width * height:,} px, over the limit of "
            f"{max_pixels:,} px",
        )
    if min(width, height) < min_px:
        raise BadImage("small", f"{width}x{height} px: smaller than {min_px} px on a side")
    try:
        if decode_px and img.format in ("JPEG", "MPO"):
            img.draft("RGB", (decode_px, decode_px))
        img.load()
        rgb = _to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise BadImage("bomb", f"decompression bomb: {_one_line(exc)}") from None
    except MemoryError:
        raise BadImage("corrupt", "out of memory while decoding") from None
    except Exception as exc:  # OSError (truncated), SyntaxError, ValueError, struct.error...
        raise BadImage("corrupt", f"cannot decode: {_one_line(exc)}") from None
    return Decoded(rgb, width, height)


@functools.cache
def readable_formats() -> tuple[str, ...]:
    """:data:`FORMATS` that this Pillow can open (``Image.open`` fails on an unknown name).

    Registers pillow-heif's opener first, where it is installed (once per process: each Dask
    worker does it on its first image)."""
    from PIL import Image

    try:  # HEIC/HEIF photos (iPhones), where the plugin is installed
        import pillow_heif

        pillow_heif.register_heif_opener()
    except ImportError:
        pass
    Image.init()
    return tuple(f for f in FORMATS if f in Image.OPEN)


def _to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB: 16-bit and float grey scaled (not clipped), palettes expanded,
    transparency composited over white, CMYK/YCbCr/LAB converted by Pillow."""
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _MODES_16 or mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = float(a.max()) if a.size else 0.0
        if mode in _MODES_16 or (mode == "I" and top > 255):
            a = a * (255.0 / 65535.0)
        elif mode == "F" and top <= 1.0:
            a = a * 255.0
        grey = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode in ("P", "PA"):
        if mode == "P" and "transparency" not in img.info:
            return img.convert("RGB")
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


#: Longest reason text kept from an exception (a CSV cell, not a log).
_REASON_CHARS = 200


def _one_line(exc: BaseException) -> str:
    text = _first_line(exc)
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."
