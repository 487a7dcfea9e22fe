"""Benchmark ``embed`` (PDQ) against sequential loops, on JPEGs of 1 to 12 megapixels.

Writes ``--per-size`` JPEGs of each size in ``--sizes`` (megapixels, 4:3, photo-like: a smooth
colour field, shapes and grain, quality 90) to a temporary folder, then hashes them all:

* baseline "naive": the loop a notebook would write, one image after another in this process:
  ``pdqhash.compute(np.asarray(Image.open(path).convert("RGB")))`` (full-size decode and hash);
* baseline "sequential": embed's own per-image code (exact-path read, ``Image.draft`` decode to
  >= 512 px, 512 x 512 resample, PDQ) in a plain loop in this process;
* ``embed_images`` on a ``LocalCluster`` of 1 and of 2 worker processes (1 thread each), which
  also writes the shards (Parquet) and reads nothing twice.

It prints images/s (best of ``--repeat``; each embed run writes to a fresh folder), the ratios
to both baselines, and where a worker's time goes (read, decode, hash, write: the sums of the
tasks' own timers), so that "the decode, not the hash, is the bound" can be checked.

Then the quality target (``--photos``, 0 to skip): held-out photos (``demo.photo``, seeds no
test uses) and their edited copies (``demo.EDITS``: resized, re-encoded, brightened, 1% crop,
PNG; plus WebP, and a 2% crop to show where PDQ stops), embedded with ``pdq`` and clustered at
its default eps: precision (no cluster holding two different photos) and, per edit, recall
(the copy in its original's cluster), the share within eps of the original itself (not through
a chain of other copies) and the Hamming distances to the original.

Run from the repository root: ``PYTHONPATH=. python benchmarks/bench_embed.py [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def _photo(seed: int, w: int, h: int) -> object:
    """A photo-like RGB image of ``w`` x ``h`` pixels (cheap to make at 12 MP)."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    lw, lh = 64, 48
    yy, xx = np.mgrid[0:lh, 0:lw] / lw
    field = np.empty((lh, lw, 3))
    for c in range(3):
        a, b = rng.uniform(-1, 1, 2)
        fx, fy = rng.uniform(1, 5, 2)
        field[..., c] = (
            128
            + 60 * (a * xx + b * yy)
            + 50 * np.sin(2 * np.pi * fx * xx) * np.cos(2 * np.pi * fy * yy)
        )
    img = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).resize(
        (w, h), Image.Resampling.BICUBIC
    )
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(w // 16, w // 3)), y0 + int(rng.integers(h // 16, h // 3))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.BoxBlur(1))
    grain = rng.integers(-6, 7, (h, w, 3), dtype=np.int16)
    return Image.fromarray(np.clip(np.asarray(img, np.int16) + grain, 0, 255).astype(np.uint8))


def make_images(folder: Path, sizes_mp: list[float], per_size: int, distinct: int = 3) -> int:
    """``per_size`` JPEGs per size (``distinct`` different pictures, the rest copies)."""
    n = 0
    for mp in sizes_mp:
        w = round((mp * 1e6 * 4 / 3) ** 0.5)
        h = round(w * 3 / 4)
        first: list[Path] = []
        for i in range(per_size):
            path = folder / f"{mp:g}MP" / f"img {i:04d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            if i < distinct:
                _photo(int(mp * 1000) + i, w, h).save(path, format="JPEG", quality=90)  # type: ignore[attr-defined]
                first.append(path)
            else:
                shutil.copyfile(first[i % len(first)], path)
            n += 1
    return n


def naive_loop(paths: list[Path]) -> float:
    """Seconds for the notebook loop: full decode, full-size hash, one after another."""
    import pdqhash
    from PIL import Image

    t0 = time.perf_counter()
    for p in paths:
        with Image.open(p) as img:
            pdqhash.compute(np.asarray(img.convert("RGB")))
    return time.perf_counter() - t0


def sequential_loop(
    root: Path, paths: list[Path]
) -> tuple[float, dict[str, float], dict[str, tuple[float, float]]]:
    """Seconds for embed's per-image code in a loop here, its read/decode/hash split, and
    per size folder the mean decode and hash milliseconds per image."""
    from dedup_batch.embed.images import decode_image, read_image
    from dedup_batch.embed.models import get_model
    from dedup_batch.storage import Store

    store = Store(str(root))
    model = get_model("pdq")
    split = {"read_s": 0.0, "decode_s": 0.0, "embed_s": 0.0}
    per_size: dict[str, list[tuple[float, float]]] = {}
    t0 = time.perf_counter()
    for p in paths:
        t = time.perf_counter()
        data = read_image(store, str(p), max_bytes=1 << 30)
        t2 = time.perf_counter()
        dec = decode_image(data, max_pixels=10**9, decode_px=model.decode_px, min_px=model.min_px)
        t3 = time.perf_counter()
        model.embed([dec.image])
        t4 = time.perf_counter()
        split["read_s"] += t2 - t
        split["decode_s"] += t3 - t2
        split["embed_s"] += t4 - t3
        per_size.setdefault(p.parent.name, []).append((t3 - t2, t4 - t3))
    means = {
        k: (1e3 * float(np.mean([d for d, _ in v])), 1e3 * float(np.mean([h for _, h in v])))
        for k, v in per_size.items()
    }
    return time.perf_counter() - t0, split, means


def dask_run(root: Path, workers: int, repeat: int) -> tuple[float, dict[str, float]]:
    """Best embed-stage images/s on a LocalCluster of ``workers`` processes, and its split."""
    from distributed import Client

    from dedup_batch.embed import embed_images, get_model
    from dedup_batch.pipeline import local_cluster

    best, split = 0.0, {}
    with (
        local_cluster(workers, 1) as cluster,
        Client(cluster) as client,
    ):
        client.run(get_model, "pdq")  # imports (Pillow, pdqhash) are not what is measured
        for _ in range(repeat):
            out = Path(tempfile.mkdtemp(prefix="bench-embed-out-"))
            try:
                res = embed_images(str(root), str(out), client=client, batch_size=16)
            finally:
                shutil.rmtree(out, ignore_errors=True)
            if res.images_per_s > best:
                best, split = res.images_per_s, res.work
    return best, split


def _trim_2pct(img: object) -> object:
    w, h = img.size  # type: ignore[attr-defined]
    dx, dy = int(w * 0.02), int(h * 0.02)
    return img.crop((dx, dy, w - dx, h - dy))  # type: ignore[attr-defined]


def quality(n_photos: int, w: int, h: int) -> None:
    """Print PDQ's precision and per-edit recall at its default eps (see the module doc)."""
    from dedup_batch.cluster import DBSCAN
    from dedup_batch.demo import EDITS, photo
    from dedup_batch.embed import PdqModel, embed_images
    from dedup_batch.load import load_features
    from dedup_batch.storage import Store

    edits = {
        **EDITS,
        "webp": (lambda im: im, ".webp", 80),
        "cropped 2% (beyond target)": (_trim_2pct, ".jpg", 90),
    }
    root = Path(tempfile.mkdtemp(prefix="bench-embed-quality-"))
    try:
        group: dict[str, tuple[str, str]] = {}
        for i in range(n_photos):
            img = photo(50_000 + i, w, h)  # tests use seeds below 2000
            name = f"p{i:04d}.jpg"
            img.save(root / name, quality=92)  # type: ignore[attr-defined]
            group[name] = (name, "original")
            for k, (kind, (edit, suffix, q)) in enumerate(edits.items()):
                copy = f"p{i:04d}-e{k}{suffix}"
                edit(img).save(root / copy, **({} if q is None else {"quality": q}))
                group[copy] = (name, kind)
        res = embed_images(str(root), str(root / "features"))
        feats = load_features(str(root / "features" / "*.parquet"), store=Store(str(root)))
        eps = PdqModel.default_eps
        labels = DBSCAN(eps=eps, min_samples=1).fit(feats.X).labels_
        row = {p: i for i, p in enumerate(feats.paths.tolist())}
        mixed = sum(
            len({group[p][0] for p in feats.paths[labels == c]}) > 1 for c in np.unique(labels)
        )
        print(
            f"\nquality: {n_photos} held-out {w}x{h} photos x {len(edits)} edits "
            f"({res.embedded} images, {res.errors} errors), pdq at its default eps {eps:.2f} "
            f"(Hamming <= 31): clusters holding two different photos: {mixed} "
            f"(precision {'1.0' if mixed == 0 else '< 1'})"
        )
        print(f"{'edit':<28}{'recall':>8}{'within eps':>12}{'Hamming: median':>17}{'max':>6}")
        for kind in edits:
            pairs = [(row[p], row[o]) for p, (o, k) in group.items() if k == kind]
            joined = np.mean([labels[a] == labels[b] for a, b in pairs])
            ham = [int((feats.X[a] != feats.X[b]).sum()) for a, b in pairs]
            direct = np.mean([d <= 31 for d in ham])  # the pair itself, not through a chain
            print(f"{kind:<28}{joined:>8.1%}{direct:>12.1%}{np.median(ham):>17.0f}{max(ham):>6}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _shares(split: dict[str, float]) -> str:
    total = sum(split.values()) or 1.0
    names = {"read_s": "read", "decode_s": "decode", "embed_s": "hash", "write_s": "write"}
    return ", ".join(f"{names[k]} {v / total:.0%}" for k, v in split.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,4,12", help="megapixels, comma-separated")
    parser.add_argument("--per-size", type=int, default=24, help="JPEGs per size")
    parser.add_argument("--workers", default="1,2", help="LocalCluster sizes to run")
    parser.add_argument("--repeat", type=int, default=2, help="embed runs per cluster (best)")
    parser.add_argument("--quick", action="store_true", help="8 images per size, one run")
    parser.add_argument(
        "--photos", type=int, default=100, help="held-out photos for the quality target (0: skip)"
    )
    parser.add_argument("--photo-size", default="1024x768", help="their size, WxH")
    args = parser.parse_args()
    per_size, repeat = (8, 1) if args.quick else (args.per_size, args.repeat)
    sizes = [float(s) for s in args.sizes.split(",")]
    root = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    try:
        t0 = time.perf_counter()
        n = make_images(root, sizes, per_size)
        mb = sum(p.stat().st_size for p in root.rglob("*.jpg")) / 1e6
        print(
            f"{n} JPEGs ({', '.join(f'{s:g}' for s in sizes)} MP, {per_size} each, "
            f"{mb:.0f} MB) made in {time.perf_counter() - t0:.1f}s; cores: {os.cpu_count()}"
        )
        paths = sorted(root.rglob("*.jpg"))
        naive = n / naive_loop(paths)
        seq_s, seq_split, per_size = sequential_loop(root, paths)
        seq = n / seq_s
        print(f"{'run':<34}{'images/s':>10}{'vs naive':>10}{'vs seq':>9}  where the time goes")
        print(f"{'naive loop (full decode + hash)':<34}{naive:>10.1f}{1:>10.2f}{naive / seq:>9.2f}")
        print(
            f"{'sequential loop (embed code)':<34}{seq:>10.1f}{seq / naive:>10.2f}{1:>9.2f}  "
            f"{_shares(seq_split)}"
        )
        for w in [int(x) for x in args.workers.split(",")]:
            rate, split = dask_run(root, w, repeat)
            label = f"embed, {w} worker{'s' if w > 1 else ''} x 1 thread"
            print(
                f"{label:<34}{rate:>10.1f}{rate / naive:>10.2f}{rate / seq:>9.2f}  {_shares(split)}"
            )
        print("sequential loop, per image:")
        for size, (dec_ms, hash_ms) in per_size.items():
            print(f"  {size:>6}: decode {dec_ms:6.1f} ms, hash {hash_ms:5.1f} ms")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.photos:
        pw, ph = (int(v) for v in args.photo_size.lower().split("x"))
        quality(20 if args.quick else args.photos, pw, ph)


if __name__ == "__main__":
    main()
