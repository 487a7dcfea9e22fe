"""Image headers: sizes from the header alone, on threads, on a LocalCluster and on S3 (moto)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dedup_batch.images import HEADER_BYTES, image_size, read_dimensions
from dedup_batch.storage import Store


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    """Noise compresses badly: a JPEG of it is big enough that a header read is a small part."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def rotated_exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    return exif


#: name -> (bytes, expected (width, height) or None)
LIBRARY: dict[str, tuple[bytes, tuple[int, int] | None]] = {
    "a.jpg": (encode(noise(640, 480), "JPEG", quality=90), (640, 480)),
    "b.png": (encode(noise(33, 21), "PNG"), (33, 21)),
    "c.gif": (encode(noise(40, 30).convert("P"), "GIF"), (40, 30)),
    "d.webp": (encode(noise(50, 20), "WEBP"), (50, 20)),
    "e.tif": (encode(noise(20, 10), "TIFF"), (20, 10)),
    # shown rotated: width and height as displayed
    "phone.jpg": (encode(noise(64, 48), "JPEG", exif=rotated_exif()), (48, 64)),
    # a header longer than the first read (a 200 KB ICC profile before the frame header)
    "profiled.jpg": (encode(noise(64, 48), "JPEG", icc_profile=os.urandom(200_000)), (64, 48)),
    "notes.txt": (b"not an image", None),
    "truncated.jpg": (encode(noise(64, 48), "JPEG")[:300], None),
    # glob characters: read exactly this object, never "a1.jpg"
    "a[1].jpg": (encode(noise(12, 34), "JPEG"), (12, 34)),
    "a1.jpg": (encode(noise(99, 99), "JPEG"), (99, 99)),
}


def expected_frame(names: list[str]) -> pd.DataFrame:
    sizes = [LIBRARY[n][1] if n in LIBRARY else None for n in names]
    return pd.DataFrame(
        {
            "width": pd.array([s and s[0] for s in sizes], dtype="Int64"),
            "height": pd.array([s and s[1] for s in sizes], dtype="Int64"),
        }
    )


NAMES = [*LIBRARY, "missing.jpg"]


@pytest.fixture
def local_store(tmp_path: Path) -> Store:
    for name, (data, _) in LIBRARY.items():
        (tmp_path / name).write_bytes(data)
    return Store(str(tmp_path))


@pytest.mark.parametrize("name", [n for n, (_, wh) in LIBRARY.items() if wh])
def test_image_size_of_each_format(name: str) -> None:
    data, wh = LIBRARY[name]
    assert image_size(io.BytesIO(data)) == wh


def test_read_dimensions_on_threads(local_store: Store) -> None:
    got = read_dimensions(local_store, [local_store.resolve(n) for n in NAMES], batch_size=3)
    pd.testing.assert_frame_equal(got, expected_frame(NAMES))


def test_read_dimensions_on_a_local_cluster_equals_threads(local_store: Store, dask_client) -> None:
    paths = [local_store.resolve(n) for n in NAMES]
    on_workers = read_dimensions(local_store, paths, client=dask_client, batch_size=4)
    pd.testing.assert_frame_equal(on_workers, read_dimensions(local_store, paths))
    assert read_dimensions(local_store, [], client=dask_client).shape == (0, 2)


def test_only_the_header_is_read(local_store: Store, monkeypatch) -> None:
    """A 640x480 noise JPEG is ~100s of KB: its size costs one read of HEADER_BYTES."""
    reads: list[tuple] = []
    fs = local_store.fs
    real = fs.cat_file

    def spy(path, start=None, end=None, **kw):
        reads.append((path, start, end))
        return real(path, start=start, end=end, **kw)

    monkeypatch.setattr(fs, "cat_file", spy)
    path = local_store.resolve("a.jpg")
    assert os.path.getsize(path) > 4 * HEADER_BYTES
    assert read_dimensions(local_store, [path]).iloc[0].tolist() == [640, 480]
    assert reads == [(path, 0, HEADER_BYTES)]


def test_read_dimensions_on_s3(s3: dict, s3fs_client) -> None:
    s3fs_client.mkdir("photos")
    for name, (data, _) in LIBRARY.items():
        s3fs_client.pipe(f"photos/lib/{name}", data)
    store = Store("s3://photos/lib", s3)
    got = read_dimensions(store, [store.resolve(n) for n in NAMES], batch_size=5)
    pd.testing.assert_frame_equal(got, expected_frame(NAMES))


def test_a_failed_task_leaves_its_batch_unknown(local_store: Store, dask_client) -> None:
    class Broken(Store):
        def __reduce__(self):  # the worker cannot rebuild it: the task fails as a whole
            return (_explode, ())

    broken = Broken(local_store.root)
    got = read_dimensions(broken, [local_store.resolve("a.jpg")], client=dask_client)
    assert got["width"].isna().all() and got["height"].isna().all()


def _explode() -> Store:
    raise RuntimeError("cannot unpickle this store")
