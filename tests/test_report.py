"""The HTML report: built from small plans over real images (local and moto S3), checked by
reading the HTML and by opening it in headless Chromium."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image, ImageDraw

from dedup_batch import storage
from dedup_batch.errors import ConfigError, InputError
from dedup_batch.report import (
    Thumb,
    build_report,
    make_thumbnails,
    thumbnail_jpeg,
    write_report,
)
from dedup_batch.storage import Store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium not installed (Debian: apt-get install -y chromium)",
)

EVIL = "x<script>alert(1)</script>&\"q'.png"  # a legal file name that must stay text


def picture(
    seed: int, size: tuple[int, int] = (200, 150), fmt: str = "JPEG", alpha: bool = False
) -> bytes:
    """A distinct little picture (gradient + shapes keyed by ``seed``) as encoded bytes."""
    w, h = size
    mode = "RGBA" if alpha else "RGB"
    im = Image.new(mode, size, (255, 255, 255, 0) if alpha else (255, 255, 255))
    d = ImageDraw.Draw(im)
    base = ((seed * 67) % 256, (seed * 131) % 256, (seed * 29) % 256)
    for y in range(h):
        d.line([(0, y), (w, y)], fill=(*(int(c * y / h) for c in base), 255))
    d.ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=(255 - base[0], 200, base[2], 255))
    d.rectangle([10 + seed % 40, 10, 40 + seed % 40, 40], fill=(20, 20, 20, 255))
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


# path -> (cluster, keep, keeper, distance, content) ; content None = not written (missing)
PLAN_ROWS = [
    ("a0.jpg", 0, True, "a0.jpg", 0.0, picture(1)),
    ("a1.jpg", 0, False, "a0.jpg", 0.10, picture(1)),
    ("sub/a2.jpg", 0, False, "a0.jpg", 0.45, picture(2)),
    ("b0.png", 1, True, "b0.png", 0.0, picture(3, fmt="PNG", alpha=True)),
    ("b1.jpg", 1, False, "b0.png", 0.30, b"\xff\xd8\xff\xe0 this is not really a jpeg"),
    ("c0.jpg", 2, True, "c0.jpg", 0.0, picture(4, size=(1600, 1200))),
    ("c1.jpg", 2, False, "c0.jpg", 0.20, picture(5)),
    ("c2.jpg", 2, False, "c0.jpg", 0.35, None),
    (EVIL, 2, False, "c0.jpg", 0.05, picture(6, fmt="PNG")),
    ("d0.jpg", 3, True, "d0.jpg", 0.0, picture(7)),
    ("e0.jpg", -1, True, "e0.jpg", 0.0, picture(8)),
]


def plan_frame(rows=PLAN_ROWS) -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "path": [r[0] for r in rows],
            "cluster": pd.array([r[1] for r in rows], dtype="int64"),
            "keep": [r[2] for r in rows],
            "keeper": [r[3] for r in rows],
            "distance_to_keeper": [float(r[4]) for r in rows],
            "size": pd.array(
                [len(r[5]) if r[5] is not None else None for r in rows], dtype="Int64"
            ),
            "mtime": [1.7e9] * len(rows),
            "etag": pd.array([None] * len(rows), dtype="string"),
            "exists": [r[5] is not None for r in rows],
        }
    )
    return df.sort_values(["cluster", "path"]).reset_index(drop=True)


def write_plan_dir(
    plan_dir: str, root: str, rows=PLAN_ROWS, options=None, eps: float = 0.5
) -> None:
    """plan.parquet + summary.json + job.yaml, as the pipeline writes them."""
    buf = io.BytesIO()
    plan_frame(rows).to_parquet(buf, index=False)
    storage.write_url(storage.join_url(plan_dir, "plan.parquet"), buf.getvalue(), options)
    summary = {
        "counts": {"images": len(rows)},
        "settings": {
            "eps": eps,
            "metric": "euclidean",
            "root": root,
            "min_samples": 1,
            "keep": "first-path",
        },
        "timings": {"load": 1.25, "cluster": 3.5, "select": 0.2},
    }
    storage.write_url(
        storage.join_url(plan_dir, "summary.json"), json.dumps(summary).encode(), options
    )
    job = {
        "root": root,
        "eps": eps,
        "metric": "euclidean",
        "storage_options": {"secret": "***", "anon": False},
    }
    storage.write_url(storage.join_url(plan_dir, "job.yaml"), yaml.safe_dump(job).encode(), options)


def write_images_local(root: Path, rows=PLAN_ROWS) -> None:
    for path, *_, content in rows:
        if content is not None:
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(content)


def chromium_dom(page: Path, tmp_path: Path) -> str:
    """The DOM of ``page`` after load, from headless Chromium (no network, fresh profile)."""
    profile = tmp_path / f"chromium-profile-{page.stem}"
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def sections(text: str) -> list[int]:
    return [int(c) for c in re.findall(r'<section class="cl" id="c(-?\d+)"', text)]


def check_report_html(text: str) -> None:
    """What every report over PLAN_ROWS must show."""
    assert sections(text) == [0, 2, 1]  # riskiest first: max distance 0.45, 0.35, 0.30
    assert "<script>alert" not in text and html_escaped(EVIL) in text
    assert text.count("data:image/jpeg;base64,") == 7  # 9 shown - missing - unreadable
    assert 'data-status="missing"' in text and 'data-status="unreadable"' in text
    assert "http://" not in text and "https://" not in text  # nothing to fetch
    assert "d0.jpg" not in text and "e0.jpg" not in text  # singleton and noise not shown
    assert "1 missing, 1 unreadable" in text


def html_escaped(s: str) -> str:
    import html

    return html.escape(s, quote=True)


# -- tests ---------------------------------------------------------------------------------------
def test_thumbnail_jpeg_shrinks_and_flattens():
    jpeg, w, h = thumbnail_jpeg(picture(9, size=(1600, 1200)), 160)
    assert (w, h) == (160, 120)
    with Image.open(io.BytesIO(jpeg)) as im:
        assert im.format == "JPEG" and im.size == (160, 120)
    clear = Image.new("RGBA", (90, 300), (0, 0, 0, 0))  # transparent, one opaque square
    ImageDraw.Draw(clear).rectangle([30, 130, 60, 170], fill=(200, 0, 0, 255))
    buf = io.BytesIO()
    clear.save(buf, "PNG")
    jpeg, w, h = thumbnail_jpeg(buf.getvalue(), 160)
    assert h == 160 and w == 48
    with Image.open(io.BytesIO(jpeg)) as im:
        assert im.mode == "RGB" and im.getpixel((0, 0)) == pytest.approx((255, 255, 255), abs=12)
    with pytest.raises(Exception):  # noqa: B017 - whatever Pillow raises for garbage
        thumbnail_jpeg(b"not an image at all")


def test_make_thumbnails_statuses(tmp_path):
    root = tmp_path / "img"
    write_images_local(root)
    (root / "big.jpg").write_bytes(picture(2, size=(800, 800)))
    store = Store(str(root))
    paths = ["a0.jpg", "b1.jpg", "c2.jpg", "../outside.jpg", "big.jpg", "a0.jpg"]
    thumbs = make_thumbnails(store, paths, batch_size=2, progress=None)
    assert {p: t.status for p, t in thumbs.items()} == {
        "a0.jpg": "ok",
        "b1.jpg": "unreadable",
        "c2.jpg": "missing",
        "../outside.jpg": "outside-root",
        "big.jpg": "ok",
    }
    assert thumbs["a0.jpg"].data_uri.startswith("data:image/jpeg;base64,")
    assert thumbs["c2.jpg"].data_uri == ""
    small = make_thumbnails(store, ["big.jpg"], max_bytes=1000, progress=None)
    assert small["big.jpg"].status == "too-large"


@needs_chromium
def test_report_local_images(tmp_path):
    root, plan_dir = tmp_path / "images", tmp_path / "plan"
    write_images_local(root)
    write_plan_dir(str(plan_dir), str(root))
    result = build_report(str(plan_dir), store=Store(str(root)))
    assert result.url == str(plan_dir / "report.html") and result.pages == ["report.html"]
    assert result.clusters_total == 3 and result.clusters_shown == 3
    assert result.images_shown == 9
    assert result.thumbnails == {"missing": 1, "ok": 7, "unreadable": 1}
    text = (plan_dir / "report.html").read_text()
    check_report_html(text)
    assert "0.45" in text and "first-path" in text and "3.50 s" in text  # distance, settings
    summary = json.loads((plan_dir / "summary.json").read_text())
    assert summary["report"]["html"] == "report.html"
    assert summary["report"]["thumbnails"]["missing"] == 1
    assert summary["timings"]["cluster"] == 3.5  # the rest of the summary is kept
    dom = chromium_dom(plan_dir / "report.html", tmp_path)
    # every <img> decoded: 7 thumbnails + 2 charts; no element injected by the odd path
    assert 'data-images="9/9"' in dom
    assert dom.count('data-decoded="1"') == 9 and 'data-decoded="0"' not in dom
    assert "<script>alert" not in dom


@needs_chromium
@pytest.mark.s3
def test_report_s3_images_on_dask(tmp_path, s3, s3fs_client, dask_client):
    s3fs_client.mkdir("photos")
    for path, *_, content in PLAN_ROWS:
        if content is not None:
            s3fs_client.pipe(f"photos/set/{path}", content)
    root = "s3://photos/set"
    plan_dir = "s3://photos/plans/run1"  # the plan lives in the bucket too
    write_plan_dir(plan_dir, root, options=s3)
    url = write_report(plan_dir, store=Store(root, s3), client=dask_client)
    assert url == "s3://photos/plans/run1/report.html"
    text = s3fs_client.cat("photos/plans/run1/report.html").decode()
    check_report_html(text)
    summary = json.loads(s3fs_client.cat("photos/plans/run1/summary.json"))
    assert summary["report"]["thumbnails"] == {"missing": 1, "ok": 7, "unreadable": 1}
    assert "testing-secret-key" not in text
    local = tmp_path / "report.html"  # as a person would: downloaded, opened from disk
    local.write_text(text)
    assert 'data-images="9/9"' in chromium_dom(local, tmp_path)


def test_report_pages_are_capped_and_linked(tmp_path):
    rows = []
    for c in range(7):  # 7 clusters of 3; cluster c's farthest member at 0.05 * (c + 1)
        rows += [
            (f"k{c}.jpg", c, True, f"k{c}.jpg", 0.0, picture(10 + c)),
            (f"m{c}a.jpg", c, False, f"k{c}.jpg", 0.01, picture(10 + c)),
            (f"m{c}b.jpg", c, False, f"k{c}.jpg", 0.05 * (c + 1), picture(20 + c)),
        ]
    root, plan_dir = tmp_path / "images", tmp_path / "plan"
    write_images_local(root, rows)
    write_plan_dir(str(plan_dir), str(root), rows)
    result = build_report(
        str(plan_dir), store=Store(str(root)), clusters_per_page=2, max_pages=3, max_members=2
    )
    assert result.pages == ["report.html", "report-2.html", "report-3.html"]
    assert result.clusters_total == 7 and result.clusters_shown == 6
    assert result.images_shown == 12  # 2 members a cluster
    pages = [(plan_dir / p).read_text() for p in result.pages]
    assert [sections(p) for p in pages] == [[6, 5], [4, 3], [2, 1]]  # farthest first
    assert not (plan_dir / "report-4.html").exists()
    assert "Showing the 6 riskiest of 7" in pages[0] and "the other 1 clusters" in pages[0]
    assert '<a href="report-2.html">2</a>' in pages[0]
    assert '<a href="report.html">1</a>' in pages[2] and "<b>3</b>" in pages[2]
    # the keeper and the farthest member are shown; the nearest is counted as hidden
    assert "k6.jpg" in pages[0] and "m6b.jpg" in pages[0] and "m6a.jpg" not in pages[0]
    assert "+ 1 more member(s) not shown" in pages[0]
    assert "Cluster sizes" not in pages[1]  # the overview is on the first page only


def test_report_store_from_job_yaml_and_errors(tmp_path):
    root, plan_dir = tmp_path / "images", tmp_path / "plan"
    write_images_local(root)
    write_plan_dir(str(plan_dir), str(root))
    result = build_report(str(plan_dir), update_summary=False)  # root from job.yaml
    assert result.thumbnails["ok"] == 7
    assert "report" not in json.loads((plan_dir / "summary.json").read_text())
    with pytest.raises(InputError, match="no plan here"):
        write_report(str(tmp_path / "nowhere"), store=Store(str(root)))
    (plan_dir / "job.yaml").write_text("eps: 0.5\n")
    (plan_dir / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="names no 'root'"):
        write_report(str(plan_dir))
    with pytest.raises(ConfigError, match="clusters_per_page"):
        write_report(str(plan_dir), store=Store(str(root)), clusters_per_page=0)


def test_report_without_duplicates(tmp_path):
    rows = [("only.jpg", 0, True, "only.jpg", 0.0, picture(1))]
    root, plan_dir = tmp_path / "images", tmp_path / "plan"
    write_images_local(root, rows)
    write_plan_dir(str(plan_dir), str(root), rows)
    result = build_report(str(plan_dir), store=Store(str(root)))
    assert result.clusters_total == 0 and result.thumbnails == {}
    text = (plan_dir / "report.html").read_text()
    assert sections(text) == [] and "<section" not in text
    assert isinstance(Thumb("p", "missing").data_uri, str)


# -- cards: pixel size, bytes, why the keeper was kept; the warnings banner ----------------------
def test_cards_show_pixel_size_bytes_and_the_keep_reason(tmp_path):
    root, plan_dir = tmp_path / "img", tmp_path / "plan"
    write_images_local(root)
    write_plan_dir(str(plan_dir), str(root))
    plan = plan_frame().set_index("path")
    plan["width"] = pd.array([200] * len(plan), dtype="Int64")
    plan["height"] = pd.array([150] * len(plan), dtype="Int64")
    plan.loc["c0.jpg", ["width", "height"]] = (1600, 1200)
    plan.loc["b1.jpg", ["width", "height"]] = (pd.NA, pd.NA)  # header unreadable
    plan["keep_reason"] = pd.array([""] * len(plan), dtype="string")
    plan.loc["c0.jpg", "keep_reason"] = "most pixels (1600×1200 vs 200×150)"
    plan.loc["a0.jpg", "keep_reason"] = "name without copy marker (vs '<a1> (1).jpg')"
    plan.reset_index().to_parquet(plan_dir / "plan.parquet", index=False)
    build_report(str(plan_dir))
    text = (plan_dir / "report.html").read_text()
    check_report_html(text)
    size_c0 = len(picture(4, size=(1600, 1200)))
    assert f'<span class="px">1600×1200 · {size_c0 / 1024:.1f} KiB</span>' in text
    assert '<span class="why">kept: most pixels (1600×1200 vs 200×150)</span>' in text
    assert "kept: name without copy marker (vs &#x27;&lt;a1&gt; (1).jpg&#x27;)" in text
    b1 = text[text.index("b1.jpg</span>") :]
    assert b1.startswith('b1.jpg</span><span class="px">30 B</span>')  # no pixels: bytes only
    assert text.count('class="why"') == 2  # keepers only, and only those with a reason


def test_plans_without_pixels_or_reasons_still_render(tmp_path):
    root, plan_dir = tmp_path / "img", tmp_path / "plan"
    write_images_local(root)
    write_plan_dir(str(plan_dir), str(root))  # the columns of a plan from before issue 10
    assert not {"width", "height", "keep_reason"} & set(pd.read_parquet(plan_dir / "plan.parquet"))
    build_report(str(plan_dir))
    text = (plan_dir / "report.html").read_text()
    check_report_html(text)
    assert 'class="why"' not in text and "×" not in text
    assert '<span class="px">' in text  # the bytes are known
    assert 'role="alert"' not in text  # no warnings: no banner


def test_plan_warnings_are_a_banner(tmp_path):
    root, plan_dir = tmp_path / "img", tmp_path / "plan"
    write_images_local(root)
    write_plan_dir(str(plan_dir), str(root))
    summary = json.loads((plan_dir / "summary.json").read_text())
    summary["warnings"] = [
        "--protect 'Family/<b>*' matches none of the 11 feature paths",
        {"message": "the largest cluster holds 90% of the images"},
    ]
    (plan_dir / "summary.json").write_text(json.dumps(summary))
    build_report(str(plan_dir))
    text = (plan_dir / "report.html").read_text()
    banner = text[text.index('<div class="banner"') : text.index("</div>", text.index("banner"))]
    assert "2 warning(s) from the plan" in banner
    assert "--protect &#x27;Family/&lt;b&gt;*&#x27; matches none" in banner
    assert "the largest cluster holds 90% of the images" in banner
    assert text.index("banner") < text.index('<div class="cards">')  # above everything else


def test_a_hostile_path_is_escaped_in_every_template(tmp_path):
    """Every page template (report.html, its later pages, pairs.html) prints a hostile name,
    root and warning as text: no tag, no attribute breaks out."""
    from importlib.resources import files

    import numpy as np

    from dedup_batch.sweep import write_sweep

    templates = {p.name for p in files("dedup_batch").joinpath("templates").iterdir()}
    pages = {t for t in templates if not t.startswith("_")}
    assert pages == {"report.html.j2", "pairs.html.j2"}, "a new page template: test it here"
    root = tmp_path / EVIL.replace(".png", "")  # a root folder named like an attack, too
    rows = [
        (EVIL, 0, True, EVIL, 0.0, picture(1)),
        ("k/" + EVIL, 0, False, EVIL, 0.2, picture(2)),
        ("x.jpg", 1, True, "x.jpg", 0.0, picture(3)),
        ("y.jpg", 1, False, "x.jpg", 0.3, picture(4)),
    ]
    write_images_local(root, rows)
    plan_dir = tmp_path / "plan"
    write_plan_dir(str(plan_dir), str(root), rows)
    summary = json.loads((plan_dir / "summary.json").read_text())
    summary["warnings"] = [EVIL, {"message": EVIL}]
    (plan_dir / "summary.json").write_text(json.dumps(summary))
    build_report(str(plan_dir), store=Store(str(root)), clusters_per_page=1)
    paths = [r[0] for r in rows]
    X = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.0, 5.25]])
    write_sweep(paths, X, str(tmp_path / "sweep"), eps_values=[0.15, 0.2], store=Store(str(root)))
    written = [
        plan_dir / "report.html",
        plan_dir / "report-2.html",
        tmp_path / "sweep" / "pairs.html",
    ]
    for page in written:
        text = page.read_text()
        assert "<script>alert" not in text and "\"q'" not in text, page.name
        assert html_escaped(EVIL) in text, page.name
        assert text.count("<script>") == 1  # only the page's own (hashed) script
    first = written[0].read_text()
    assert first.count(f"<li>{html_escaped(EVIL)}</li>") == 2  # both warnings, as text
