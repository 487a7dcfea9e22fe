"""Issue 10's target: on a photo library made from real photos and the copies people make, the
default plan keeps the original in at least 95% of clusters, and the report says why.

The library is built here, offline: the two photographs scikit-learn ships
(``sklearn.datasets.load_sample_images``: a temple in China, a flower), six 330x330 details of
each and each whole, plus 24 Pillow-made scenes (smooth colour fields with shapes and sensor
noise). Every original gets three copies of the kinds in :data:`EDITS`, named as browsers,
Finder, Explorer and photo editors name them, with modification times as they come out (a
Finder or Explorer copy keeps the original's time, a download or an edit is newer). Features
are the demo's embedding of each written file.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from dedup_batch.config import JobSpec
from dedup_batch.demo import embed_image
from dedup_batch.pipeline import plan
from dedup_batch.select import select_keepers

#: Distinct originals here are >= 0.66 apart; every copy is within 0.30 of its original.
EPS = 0.4
DAY = 86400.0
#: 2019-06-01 UTC: when the originals were taken (one every 7 hours).
TAKEN = 1_559_347_200.0


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _crop(img: Image.Image, frac: float) -> Image.Image:
    w, h = img.size
    return img.crop(
        (round(w * frac), round(h * frac), round(w * (1 - frac)), round(h * (1 - frac)))
    )


@dataclass(frozen=True)
class Edit:
    """One kind of copy: its name (``{d}`` folder, ``{s}`` stem), bytes, and age in days."""

    kind: str
    name: str
    make: Callable[[Image.Image, bytes], bytes]
    days_later: float


SAME = lambda img, original: original  # noqa: E731  (a byte-identical copy)

EDITS = (
    Edit("download ' (1)'", "{d}/{s} (1).jpg", SAME, 3),
    Edit("Finder ' copy'", "{d}/{s} copy.jpg", SAME, 0),  # Finder keeps the time
    Edit("Google Photos '-edited'", "{d}/{s}-edited.jpg", lambda i, o: _jpeg(_bright(i), 88), 40),
    Edit("Drive 'Copy of '", "{d}/Copy of {s}.jpg", SAME, 10),
    Edit("Explorer ' - Copy'", "{d}/{s} - Copy.jpg", SAME, 0),  # so does Explorer
    Edit("'_copy' re-encoded", "{d}/{s}_copy.jpg", lambda i, o: _jpeg(i, 75), 20),
    Edit("re-encoded", "exports/{s}.jpg", lambda i, o: _jpeg(i, 60), 60),
    Edit(
        "resized smaller",
        "web/{s}.jpg",
        lambda i, o: _jpeg(i.resize((i.width // 2, i.height // 2)), 85),
        90,
    ),
    Edit("brightened", "edits/{s}.jpg", lambda i, o: _jpeg(_bright(i), 92), 30),
    Edit("cropped", "crops/{s}.jpg", lambda i, o: _jpeg(_crop(i, 0.02), 92), 15),
    Edit("PNG conversion", "{d}/{s}.png", lambda i, o: _png(i), 5),
)


def _bright(img: Image.Image) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(1.2)


def _originals() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    out = []
    for arr in load_sample_images().images:  # 640x427 each
        photo = Image.fromarray(arr)
        for x, y in ((0, 0), (210, 0), (420, 0), (0, 200), (210, 200), (420, 200)):
            out.append(photo.crop((x, y, x + 220, y + 220)).resize((330, 330)))
        out.append(photo)
    rng = np.random.default_rng(7)
    return out + [_scene(rng) for _ in range(24)]


def _scene(rng: np.random.Generator) -> Image.Image:
    """A made-up photo: a smooth colour field with a few blurred shapes and sensor grain."""
    colours = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
    img = Image.fromarray(colours).resize((400, 300), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x, y, r = (int(v) for v in rng.integers((0, 0, 20), (400, 300, 80)))
        draw.ellipse(
            (x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3))
        )
    img = img.filter(ImageFilter.GaussianBlur(2))
    grain = rng.normal(0, 6, (300, 400, 3))
    return Image.fromarray(np.clip(np.asarray(img) + grain, 0, 255).astype(np.uint8))


#: Photos nobody copied: most of a real library. They keep the diagnosis of eps honest (a
#: library where every image has copies has no "distinct images" part of its k-distance curve).
SINGLETONS = 120


#: Albums of the originals. "Copy of phone" is a folder: copy markers never count on folders.
ALBUMS = ("2019", "family", "Copy of phone")


def build_library(base: Path) -> dict:
    """Write ``photos/`` and ``features/part-0000.parquet``; return the ground truth."""
    photos = base / "photos"
    original_of: dict[str, str] = {}
    kind_of: dict[str, str] = {}
    for i, img in enumerate(_originals()):
        album, stem = ALBUMS[i % len(ALBUMS)], f"IMG_{1000 + i}"
        data = _jpeg(img, 92)
        taken = TAKEN + i * 7 * 3600
        rel = f"{album}/{stem}.jpg"
        _write(photos / rel, data, taken)
        original_of[rel] = rel
        for j in range(3):
            edit = EDITS[(3 * i + j) % len(EDITS)]
            copy = edit.name.format(d=album, s=stem)
            _write(photos / copy, edit.make(img, data), taken + edit.days_later * DAY)
            original_of[copy], kind_of[copy] = rel, edit.kind
    rng = np.random.default_rng(11)
    for i in range(SINGLETONS):
        rel = f"{ALBUMS[i % len(ALBUMS)]}/IMG_{2000 + i}.jpg"
        _write(photos / rel, _jpeg(_scene(rng), 92), TAKEN + (400 + i) * 3600)
        original_of[rel] = rel
    paths = sorted(original_of)
    X = np.stack([embed_image(photos / p) for p in paths])
    (base / "features").mkdir()
    frame = pd.DataFrame(
        X, index=pd.Index(paths, name="path"), columns=[str(c) for c in range(X.shape[1])]
    )
    frame.to_parquet(base / "features" / "part-0000.parquet")
    return {
        "root": str(photos),
        "features": str(base / "features" / "*.parquet"),
        "original_of": original_of,
        "kind_of": kind_of,
        "X": X,
        "paths": paths,
    }


def _write(path: Path, data: bytes, mtime: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return build_library(tmp_path_factory.mktemp("library"))


@pytest.fixture(scope="module")
def default_plan(library: dict, dask_client, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("plan") / "plan"
    spec = JobSpec.from_mapping(
        {
            "features": [library["features"]],
            "root": library["root"],
            "eps": EPS,
            "out": str(out),
        }
    )
    assert spec.keep == "original"  # the default, not asked for
    return plan(spec, dask_client)


def rates(table: pd.DataFrame, library: dict) -> tuple[float, dict[str, float]]:
    """Share of clusters whose keeper is the original; per copy kind, the share of its copies
    deleted in favour of their original."""
    original_of, kind_of = library["original_of"], library["kind_of"]
    in_dups = table.groupby("cluster")["path"].transform("size") > 1
    keepers = table[table["keep"] & in_dups]
    kept_original = keepers["path"].map(lambda p: original_of[p] == p)
    per_kind: Counter[str] = Counter()
    right: Counter[str] = Counter()
    for row in table.itertuples():
        if row.path in kind_of:
            per_kind[kind_of[row.path]] += 1
            right[kind_of[row.path]] += (not row.keep) and row.keeper == original_of[row.path]
    return float(kept_original.mean()), {k: right[k] / per_kind[k] for k in per_kind}


def test_the_library_clusters_into_its_originals(default_plan, library: dict) -> None:
    table = default_plan.plan
    group = table["path"].map(library["original_of"])
    # each original and its copies form exactly one cluster of their own, each singleton one:
    # keepers are then the policy's doing, not the clustering's
    size = table.groupby("cluster")["path"].transform("size")
    assert (size == group.map(group.value_counts())).all()
    assert (size == 4).sum() == 4 * 38 and (size == 1).sum() == SINGLETONS
    assert group.groupby(table["cluster"]).nunique().eq(1).all()
    assert table["cluster"].groupby(group).nunique().eq(1).all()
    assert table.loc[~table["keep"], "distance_to_keeper"].max() <= EPS


def test_the_default_plan_keeps_the_original(default_plan, library: dict) -> None:
    table = default_plan.plan
    overall, per_kind = rates(table, library)
    baseline, _ = rates(
        select_keepers(
            table["path"].to_numpy(),
            np.stack([library["X"][library["paths"].index(p)] for p in table["path"]]),
            table["cluster"].to_numpy(),
            table.drop(columns=["path", "cluster", "keep", "keeper"]),
            policy="first-path",
        ),
        library,
    )
    report = {"original kept (clusters)": overall, "first-path baseline": baseline, **per_kind}
    print("\n" + "\n".join(f"{k:>28}: {v:6.1%}" for k, v in report.items()))
    assert overall >= 0.95
    assert min(per_kind.values()) >= 0.9, per_kind
    assert len(per_kind) == len(EDITS)
    # every keeper says why it won; every member of a cluster with copies has its pixel size
    # from the header, and no singleton's header was read (it is kept whatever its size)
    keepers = table[table["keep"]]
    assert keepers["keep_reason"].str.len().gt(0).all()
    in_dups = table.groupby("cluster")["path"].transform("size") > 1
    assert table.loc[in_dups, ["width", "height"]].notna().all().all()
    assert table.loc[~in_dups, ["width", "height"]].isna().all().all()
    assert (table.loc[~in_dups, "keep_reason"] == "only member").all()
    reasons = " | ".join(keepers["keep_reason"])
    # the runner-up of an original is a full-size copy: the name or the age tells them apart
    for why in ("name without copy marker (vs ", "oldest (2019-"):
        assert why in reasons


def test_the_report_shows_pixels_bytes_and_why(default_plan, library: dict) -> None:
    html = (Path(default_plan.out) / "report.html").read_text()
    assert "kept: name without copy marker (vs &#x27;" in html
    assert "330×330 · " in html and " KiB</span>" in html
    summary = json.loads((Path(default_plan.out) / "summary.json").read_text())
    assert not [w for w in summary["warnings"] if "--protect" in w]  # none was given


def test_protect_globs_and_a_pattern_that_matches_nothing(
    library: dict, dask_client, tmp_path: Path
) -> None:
    spec = JobSpec.from_mapping(
        {
            "features": [library["features"]],
            "root": library["root"],
            "eps": EPS,
            "out": str(tmp_path / "plan"),
            "protect": ["web/*", "*.png", "Family/*"],  # the folder is 'family': case matters
        }
    )
    result = plan(spec, dask_client)
    table = result.plan.set_index("path")
    protected = [p for p in table.index if p.startswith("web/") or p.endswith(".png")]
    assert protected and table.loc[protected, "keep"].all()
    assert (table.loc[protected, "keep_reason"] == "protected").all()
    protect_warnings = [w for w in result.summary["warnings"] if "--protect" in w]
    assert len(protect_warnings) == 1
    assert protect_warnings[0].startswith("--protect 'Family/*' matches none of the 272 ")
    saved = json.loads((tmp_path / "plan" / "summary.json").read_text())
    assert saved["warnings"] == result.summary["warnings"]
    html = (tmp_path / "plan" / "report.html").read_text()
    assert "warning(s) from the plan" in html
    assert "--protect &#x27;Family/*&#x27; matches none" in html
