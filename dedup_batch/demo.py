"""The built-in example: a folder of images with near-duplicates, and their features.

Each distinct image is a generated photo (:func:`photo`: a smooth colour field with shapes, blur
and grain); some get near-duplicates (re-encoded at another JPEG quality, brightened, slightly
cropped, or saved as PNG), as a real photo library has: named as copies usually are
(``IMG_0007 (1).jpg``, ``Copy of IMG_0007.jpg``, ``IMG_0007-edited.jpg``, ``IMG_0007.png``) and
modified after the original, so the default keep policy, ``original``, keeps the originals.

``dedup-batch demo`` (:func:`run_demo`) computes the features the real way: ``run --embed pdq``
embeds the photos on the Dask workers, then plans with PDQ's default eps. :func:`make_demo`
can also write a quick feature set without Dask (``features=True``, for tests): the 16x16 grey
thumbnail of each written file, centred and scaled to unit length (256 dimensions, as in the
seed notebook), clustered at :data:`DEMO_EPS`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import JobSpec
from .errors import ConfigError

__all__ = ["DEMO_EPS", "EDITS", "embed_image", "make_demo", "photo", "run_demo"]

#: For make_demo's thumbnail features: distinct demo images sit ~1.4 apart (random unit
#: vectors); their edits within ~0.15.
DEMO_EPS = 0.3
_MARKER = ".dedup-batch-demo"
_ALBUMS = ("holiday 2024", "family", "scans [old]")
#: How each kind of copy is named: what browsers, Finder, Explorer and photo editors write.
_COPY_NAMES = {
    "recompressed": ("{} (1)", "Copy of {}", "{} - Copy", "{} copy"),
    "brighter": ("{}-edited", "{}_edited"),
    "cropped": ("{}_copy", "{} (2)"),
    "png": ("{}",),  # a format conversion keeps the name: only the date tells it apart
}
#: The originals were taken in 2019, one an hour; copies are made months later.
_TAKEN = 1_560_000_000.0
_HOUR, _DAY = 3600.0, 86400.0
#: Demo photos are 160 x 120: large enough for PDQ (it filters to 64 x 64), small enough that
#: 200 of them are written and hashed in about a second.
_SIDE = (240, 180)
#: A "slightly cropped" copy loses this many pixels on each side (0.6%).
_CROP_PX = 1


def _crop(img: Any) -> Any:
    w, h = img.size
    return img.crop((_CROP_PX, _CROP_PX, w - _CROP_PX, h - _CROP_PX))


def photo(seed: int, w: int = 512, h: int = 384) -> Any:
    """A photo-like PIL image (RGB, ``w`` x ``h``): a smooth colour field (low resolution,
    upsampled), shapes, a slight blur and grain. Different seeds give PDQ hashes ~100+ bits
    apart; re-encodes, resizes, brightening and 1% crops stay within PDQ's threshold."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    lw, lh = 48, 36
    yy, xx = np.mgrid[0:lh, 0:lw] / lw
    field = np.empty((lh, lw, 3))
    for c in range(3):
        a, b, off = rng.uniform(-1, 1, 3)
        fx, fy = rng.uniform(1, 4, 2)
        px, py = rng.uniform(0, 2 * np.pi, 2)
        field[..., c] = (
            128
            + 60 * (a * xx + b * yy)
            + 50 * np.sin(2 * np.pi * fx * xx + px) * np.cos(2 * np.pi * fy * yy + py)
            + 20 * off
        )
    small = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    img = small.resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(w // 16, w // 2)), y0 + int(rng.integers(h // 16, h // 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    grain = rng.integers(-8, 9, (h, w, 3), dtype=np.int16)
    return Image.fromarray(np.clip(np.asarray(img, np.int16) + grain, 0, 255).astype(np.uint8))


def _half_size(img: Any) -> Any:
    from PIL import Image

    return img.resize((img.width // 2, img.height // 2), Image.Resampling.LANCZOS)


def _brighter(img: Any) -> Any:
    from PIL import ImageEnhance

    return ImageEnhance.Brightness(img).enhance(1.25)


def _trim_1pct(img: Any) -> Any:
    dx, dy = int(img.width * 0.01), int(img.height * 0.01)
    return img.crop((dx, dy, img.width - dx, img.height - dy))


#: The edits a photo library's copies go through, as the tests and ``benchmarks/bench_embed.py``
#: measure PDQ's recall on them: kind -> (edit, file suffix, JPEG quality or None for PNG).
#: "Slightly cropped" is 1% off each side.
EDITS: dict[str, tuple[Callable[[Any], Any], str, int | None]] = {
    "resized": (_half_size, ".jpg", 90),
    "reencoded": (lambda im: im, ".jpg", 40),
    "brightened": (_brighter, ".jpg", 90),
    "cropped": (_trim_1pct, ".jpg", 90),
    "png": (lambda im: im, ".png", None),
}


def embed_image(data: Any) -> np.ndarray:
    """256-d embedding of an image (file path or PIL image): unit-length centred 16x16 grey."""
    from PIL import Image

    img = data if isinstance(data, Image.Image) else Image.open(data)
    grey = np.asarray(img.convert("L").resize((16, 16), Image.Resampling.BILINEAR), np.float64)
    v = grey.ravel() - grey.mean()
    norm = np.linalg.norm(v)
    return (v / norm if norm else v).astype(np.float32)


def make_demo(
    directory: str | Path,
    *,
    n_images: int = 120,
    seed: int = 0,
    shards: int = 4,
    features: bool = True,
) -> dict[str, Any]:
    """Build the example under ``directory``: ``photos/`` and, with ``features``, the thumbnail
    features in ``features/part-*.parquet`` (``dedup-batch demo`` embeds them with PDQ instead).

    ``directory`` is wiped and rebuilt, but only if it is empty or was made by this function
    (it holds a marker file): the demo never deletes a folder it did not create.

    Also writes ``truth.csv`` (``path,group``: each file's original) for ``sweep --truth``.

    Returns a dict with ``root``, ``features`` (glob), ``images``, ``duplicates`` (how many
    near-duplicate files were written) and ``groups`` (relative path -> original's path).
    """
    from PIL import ImageEnhance

    base = Path(directory)
    if base.exists() and any(base.iterdir()):
        if not (base / _MARKER).exists():
            raise ConfigError(
                f"{base} exists and was not made by 'dedup-batch demo': choose an "
                "empty or new --dir"
            )
        shutil.rmtree(base)
    photos, feats = base / "photos", base / "features"
    photos.mkdir(parents=True)
    (base / _MARKER).write_text("made by dedup-batch demo; safe to delete\n")

    rng = np.random.default_rng(seed)
    groups: dict[str, str] = {}
    n_dupes = 0
    for i in range(n_images):
        album = _ALBUMS[i % len(_ALBUMS)]
        (photos / album).mkdir(exist_ok=True)
        img = photo(int(rng.integers(0, 2**31)), _SIDE[0], _SIDE[1])
        name = f"{album}/IMG_{i:04d}.jpg"
        img.save(photos / name, quality=92)
        taken = _TAKEN + i * _HOUR
        os.utime(photos / name, (taken, taken))
        groups[name] = name
        used: set[str] = set()
        # about a third of the images get 1-3 near-duplicates
        for k in range(int(rng.integers(1, 4)) if rng.random() < 0.35 else 0):
            kind = ("recompressed", "brighter", "cropped", "png")[int(rng.integers(0, 4))]
            if kind == "recompressed":
                dup, ext = img, ".jpg"
            elif kind == "brighter":
                dup, ext = ImageEnhance.Brightness(img).enhance(1.15), ".jpg"
            elif kind == "cropped":
                dup, ext = _crop(img), ".jpg"  # a crop has fewer pixels
            else:
                dup, ext = img, ".png"
            styles = _COPY_NAMES[kind][i % len(_COPY_NAMES[kind]) :] + _COPY_NAMES[kind]
            stem = next(
                f.format(f"IMG_{i:04d}")
                for f in (*styles, "{} (" + str(k + 3) + ")")
                if f.format(f"IMG_{i:04d}") + ext not in used
            )
            used.add(stem + ext)
            dname = f"{album}/{stem}{ext}"
            dup.save(photos / dname, **({"quality": 60} if ext == ".jpg" else {}))
            copied = taken + (30 + 7 * k) * _DAY
            os.utime(photos / dname, (copied, copied))
            groups[dname] = name
            n_dupes += 1

    paths = sorted(groups)
    if features:
        feats.mkdir()
        X = np.stack([embed_image(photos / p) for p in paths])
        frame = pd.DataFrame(
            X, index=pd.Index(paths, name="path"), columns=[str(c) for c in range(X.shape[1])]
        )
        for s, part in enumerate(np.array_split(np.arange(len(paths)), shards)):
            frame.iloc[part].to_parquet(feats / f"part-{s:04d}.parquet")
    # the ground truth, for `dedup-batch sweep --truth`: each file's original
    pd.DataFrame({"path": paths, "group": [groups[p] for p in paths]}).to_csv(
        base / "truth.csv", index=False
    )
    return {
        "root": str(photos),
        "features": str(feats / "part-*.parquet"),
        "images": len(paths),
        "duplicates": n_dupes,
        "groups": groups,
    }


def run_demo(
    directory: str | Path = "./demo-data",
    *,
    n_images: int = 120,
    apply_now: bool = False,
    n_workers: int | None = None,
) -> tuple[Any, Any]:
    """Build the example's photos, then ``run --embed pdq`` on a LocalCluster: embed them into
    ``features/``, plan with PDQ's default eps into ``plan/`` (and apply when ``apply_now``)."""
    from .pipeline import dask_client, run

    info = make_demo(directory, n_images=n_images, features=False)
    spec = JobSpec.from_mapping(
        {
            "root": info["root"],
            "embed": "pdq",
            "embed_out": str(Path(directory) / "features"),
            "out": str(Path(directory) / "plan"),
            "n_workers": n_workers,
        },
        source="demo",
    )
    with dask_client(spec) as client:
        return run(spec, client, apply_now=apply_now)
