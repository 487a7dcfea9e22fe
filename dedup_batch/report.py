"""The HTML report of a plan: totals, histograms and clusters as thumbnail grids.

``report.html`` (and, for big plans, ``report-2.html``, ``report-3.html``...) is written into the
plan directory. Every page is self-contained, so it opens from a bucket or a laptop with no
server: inline CSS, thumbnails and charts as base64 ``data:`` URIs, one small inline script (it
only marks which thumbnails decoded), and a Content-Security-Policy that forbids loading anything
from the network. Every path is HTML-escaped.

Clusters come riskiest first: the largest distance from a deleted member to its keeper, then the
biggest clusters. Output is bounded: at most ``clusters_per_page`` clusters a page,
``max_pages`` pages and ``max_members`` thumbnails a cluster (keepers first, then the farthest
members); the first page says what was left out.

Thumbnails are made where the images are read: one task per batch of images on the Dask
workers when a client is given, a thread pool otherwise. Each image is read through the job's
:class:`~dedup_batch.storage.Store` (local, S3, any fsspec URL), decoded by Pillow (JPEG in draft
mode, which decodes at 1/2, 1/4 or 1/8 scale for a fraction of the memory and time) and shrunk
with ``thumbnail()``. A missing, unreadable, oversized or out-of-root image becomes a labelled
placeholder and is counted; it never stops the report.
"""

from __future__ import annotations

import base64
import datetime as _dt
import functools
import hashlib
import html
import io
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from . import storage
from .errors import ConfigError, InputError, ScopeError, StorageError, one_line
from .executor import run_batches
from .plandir import REPORT_FILE, PlanCounts, PlanDir
from .progress import Stage, stage
from .secrets import merge_options, without_redacted
from .select import parse_policy

__all__ = [
    "ReportResult",
    "Thumb",
    "build_report",
    "make_thumbnails",
    "thumbnail_jpeg",
    "write_report",
]

log = logging.getLogger(__name__)

#: Longest side of a thumbnail, in pixels: large enough to judge a near-duplicate by eye, small
#: enough (~4-8 KB as JPEG) that a page of 50 clusters stays a few megabytes.
THUMB_PX = 160
#: JPEG quality of thumbnails (Pillow scale 1-95).
THUMB_QUALITY = 75
#: Images larger than this are not read for a thumbnail (placeholder "too large").
MAX_IMAGE_BYTES = 64 * 1024 * 1024
#: Images per thumbnail task: big enough that task overhead (~1 ms) is small against reading
#: and decoding (~5-50 ms an image), small enough to spread a page over many workers.
THUMB_BATCH = 32
#: Threads for thumbnails when no Dask client is given (reading is mostly I/O wait).
THUMB_THREADS = 8
CLUSTERS_PER_PAGE = 50
MAX_PAGES = 20
MAX_MEMBERS = 24

#: Placeholder labels, by thumbnail status.
STATUS_LABELS = {
    "missing": "missing",
    "unreadable": "unreadable",
    "too-large": "too large",
    "outside-root": "outside root",
    "error": "read error",
}


# -- thumbnails ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Thumb:
    """One thumbnail, or why there is none.

    ``status`` is ``"ok"`` (``jpeg`` holds the JPEG bytes, ``width`` x ``height`` pixels) or one
    of ``missing``, ``unreadable``, ``too-large``, ``outside-root``, ``error`` (``reason`` says
    what happened, one line).
    """

    path: str
    status: str
    jpeg: bytes = b""
    width: int = 0
    height: int = 0
    reason: str = ""

    @property
    def data_uri(self) -> str:
        """The thumbnail as a ``data:image/jpeg;base64,...`` URI (empty when not ok)."""
        if self.status != "ok":
            return ""
        return "data:image/jpeg;base64," + base64.b64encode(self.jpeg).decode("ascii")


def thumbnail_jpeg(
    data: bytes, size: int = THUMB_PX, quality: int = THUMB_QUALITY
) -> tuple[bytes, int, int]:
    """Decode image bytes and return ``(jpeg_bytes, width, height)`` of a thumbnail.

    The longest side becomes at most ``size`` pixels; EXIF orientation is applied; transparency
    is flattened onto white. JPEG sources are decoded in draft mode (reduced scale), so peak
    memory is about ``4 * w * h / s**2`` bytes for a draft scale ``s`` of up to 8.

    Raises
    ------
    Exception
        Whatever Pillow raises for bytes it cannot decode (``UnidentifiedImageError``,
        ``OSError`` for truncated files, ``DecompressionBombError``...).
    """
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG":
            im.draft("RGB", (size, size))
        im.load()
        img = ImageOps.exif_transpose(im) or im
        img.thumbnail((size, size))
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
            img = flat
        elif img.mode != "RGB":
            img = img.convert("RGB")
        out = io.BytesIO()
        img.save(out, "JPEG", quality=quality, optimize=True)
        return out.getvalue(), img.width, img.height


def _thumb_one(store: storage.Store, path: str, size: int, max_bytes: int) -> Thumb:
    try:
        fs_path = store.resolve(path)
        data = storage.read_object(store, fs_path, max_bytes=max_bytes)
    except ScopeError as exc:
        return Thumb(path, "outside-root", reason=str(exc))
    except FileNotFoundError:
        return Thumb(path, "missing", reason="not found")
    except InputError as exc:
        return Thumb(path, "too-large", reason=str(exc))
    except StorageError as exc:
        return Thumb(path, "error", reason=str(exc))
    except Exception as exc:  # a backend error we do not know: a placeholder, never a crash
        return Thumb(path, "error", reason=one_line(exc, with_type=True))
    try:
        jpeg, w, h = thumbnail_jpeg(data, size)
    except Exception as exc:  # corrupt, truncated, not an image, decompression bomb...
        return Thumb(path, "unreadable", reason=one_line(exc, with_type=True))
    return Thumb(path, "ok", jpeg, w, h)


def _thumb_batch(
    store: storage.Store, size: int, max_bytes: int, paths: Sequence[str]
) -> list[Thumb]:
    """One task: thumbnails of a batch of images (runs on a Dask worker or a thread)."""
    return [_thumb_one(store, p, size, max_bytes) for p in paths]


def make_thumbnails(
    store: storage.Store,
    paths: Iterable[str],
    *,
    client: Any = None,
    size: int = THUMB_PX,
    batch_size: int = THUMB_BATCH,
    max_bytes: int = MAX_IMAGE_BYTES,
    progress: Stage | str | None = "thumbnails",
) -> dict[str, Thumb]:
    """Make thumbnails of ``paths`` (plan paths, resolved under ``store``'s root).

    Parameters
    ----------
    store : Store
        Where the images are; pickled to the workers as ``(root, storage_options)``.
    paths : iterable of str
        Plan paths; duplicates are made once.
    client : distributed.Client, optional
        Run one task per ``batch_size`` images on its workers; without one, a local thread pool.
    size : int
        Longest side of a thumbnail, pixels.
    batch_size : int
        Images per task.
    max_bytes : int
        Larger images get a ``too-large`` placeholder instead of being read.
    progress : Stage or str or None
        A running stage to advance (by images), the name of a stage to open, or ``None``.

    Returns
    -------
    dict
        ``path -> Thumb`` for every path. Never raises for a bad image; a task that fails as a
        whole (a worker died twice) gives ``error`` placeholders for its batch.

    Notes
    -----
    Memory on the client: the JPEG bytes of all thumbnails (~4-8 KB each at 160 px).
    """
    unique = list(dict.fromkeys(paths))
    batches = [unique[i : i + batch_size] for i in range(0, len(unique), batch_size)]
    out: dict[str, Thumb] = {}
    for batch, fut in run_batches(
        _thumb_batch,
        batches,
        store,
        size,
        max_bytes,
        client=client,
        threads=THUMB_THREADS,
        progress=progress,
        name="thumbnails",
    ):
        try:
            for t in fut.result():
                out[t.path] = t
        except Exception as exc:  # the task as a whole failed (a worker died twice)
            reason = one_line(exc, with_type=True)
            log.warning("thumbnail task failed (%s); %d placeholders", reason, len(batch))
            for p in batch:
                out[p] = Thumb(p, "error", reason=reason)
    return out


# -- building the report -------------------------------------------------------------------------
@dataclass
class ReportResult:
    """What :func:`build_report` wrote.

    ``url`` is the first page; ``pages`` every page (file names relative to the plan directory);
    ``thumbnails`` counts thumbnails by status (``ok``, ``missing``, ``unreadable``...).
    """

    url: str
    pages: list[str]
    clusters_total: int
    clusters_shown: int
    images_shown: int
    thumbnails: dict[str, int] = field(default_factory=dict)

    def summary_entry(self) -> dict[str, Any]:
        """The ``report`` entry of ``summary.json``."""
        return {
            "html": self.pages[0] if self.pages else None,
            "pages": self.pages,
            "clusters_total": self.clusters_total,
            "clusters_shown": self.clusters_shown,
            "images_shown": self.images_shown,
            "thumbnails": dict(self.thumbnails),
        }


def write_report(
    plan_dir: str,
    *,
    store: storage.Store | None = None,
    client: Any = None,
    storage_options: Mapping[str, Any] | None = None,
    clusters_per_page: int = CLUSTERS_PER_PAGE,
    max_pages: int = MAX_PAGES,
    max_members: int = MAX_MEMBERS,
    thumb_px: int = THUMB_PX,
    update_summary: bool = True,
) -> str:
    """Write ``report.html`` (and ``report-N.html``) for the plan in ``plan_dir``.

    See :func:`build_report` for the parameters. Returns the URL (or local path) of
    ``report.html``.
    """
    return build_report(
        plan_dir,
        store=store,
        client=client,
        storage_options=storage_options,
        clusters_per_page=clusters_per_page,
        max_pages=max_pages,
        max_members=max_members,
        thumb_px=thumb_px,
        update_summary=update_summary,
    ).url


def build_report(
    plan_dir: str,
    *,
    store: storage.Store | None = None,
    client: Any = None,
    storage_options: Mapping[str, Any] | None = None,
    clusters_per_page: int = CLUSTERS_PER_PAGE,
    max_pages: int = MAX_PAGES,
    max_members: int = MAX_MEMBERS,
    thumb_px: int = THUMB_PX,
    update_summary: bool = True,
    plan: pd.DataFrame | None = None,
    summary: Mapping[str, Any] | None = None,
) -> ReportResult:
    """Build the HTML report of a plan directory.

    Parameters
    ----------
    plan_dir : str
        Folder or URL holding the plan (``plan.parquet`` or the ``plan/`` dataset;
        ``summary.json`` and ``job.yaml`` are used when present). The pages are written here.
    store : Store, optional
        Where the images are. Default: ``Store(root, options)`` with ``root`` from
        ``job.yaml`` and its non-secret storage options updated with ``storage_options``
        (credentials come from there or from the environment: ``job.yaml`` holds none).
    client : distributed.Client, optional
        Make thumbnails on its workers (else a local thread pool).
    storage_options : mapping, optional
        fsspec options for ``plan_dir``; default: the store's, when ``plan_dir`` is on the same
        remote protocol, else none.
    clusters_per_page, max_pages, max_members : int
        Output bounds: at most ``clusters_per_page * max_pages`` clusters, each with at most
        ``max_members`` thumbnails. A page holds at most ``clusters_per_page * max_members``
        thumbnails (~6 MB at the defaults).
    thumb_px : int
        Longest side of a thumbnail, pixels.
    update_summary : bool
        Add a ``report`` entry (see :meth:`ReportResult.summary_entry`) to ``summary.json`` if
        it exists.
    plan, summary : optional
        The plan table and its summary when the caller holds them (the pipeline, right after
        planning): then the plan, ``summary.json`` and ``job.yaml`` are not read back.

    Returns
    -------
    ReportResult

    Notes
    -----
    The plan is read part by part (see :meth:`~dedup_batch.plandir.PlanDir.plan_parts`), twice:
    once for the per-cluster table and the counts, once for the members of the clusters shown.
    Memory: one part (~200 bytes a row), one row per cluster with duplicates, and 8 bytes per
    row to delete (the distance histogram). Thumbnails are made page by page, so the client
    holds one page's thumbnails at a time.
    """
    for name, value in (
        ("clusters_per_page", clusters_per_page),
        ("max_pages", max_pages),
        ("max_members", max_members),
        ("thumb_px", thumb_px),
    ):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"report: '{name}' must be a positive integer, got {value!r}")
    pdir = PlanDir.beside(plan_dir, store, storage_options)
    job: dict[str, Any] = {}
    held = plan

    def parts() -> Iterable[pd.DataFrame]:
        return [held] if held is not None else pdir.plan_parts()

    if plan is None:
        pdir.require_plan()  # no plan: say so before anything else
        summary = pdir.read_summary() if summary is None else summary
        job = pdir.read_job()
    summary = dict(summary or {})
    if store is None:
        root = job.get("root") or (summary.get("settings") or {}).get("root")
        if not root:
            raise ConfigError(
                f"{plan_dir}: job.yaml names no 'root'; pass the image root "
                "(--root) to build the report"
            )
        # job.yaml holds the non-secret options; secrets come from the caller or the environment
        image_options = merge_options(
            without_redacted(job.get("storage_options")), pdir.storage_options
        )
        store = storage.Store(root, image_options)
    settings = {**(job or {}), **(summary.get("settings") or {})}
    clusters, counts_, distances = _scan_parts(parts())
    shown = clusters.iloc[: clusters_per_page * max_pages]
    n_pages = max(1, math.ceil(len(shown) / clusters_per_page))
    pages = ["report.html"] + [f"report-{k}.html" for k in range(2, n_pages + 1)]
    members = _members_to_show(parts(), shown["cluster"].to_numpy(), max_members)
    counts: dict[str, int] = {}
    images_shown = 0
    first_views: list[dict[str, Any]] = []
    n_thumbs = int(sum(len(m) for m in members.values()))
    log.info(
        "report: %d clusters with duplicates, showing %d on %d page(s), %d thumbnails",
        len(clusters),
        len(shown),
        n_pages,
        n_thumbs,
        extra={
            "event": "report_plan",
            "clusters": len(clusters),
            "shown": len(shown),
            "pages": n_pages,
            "thumbnails": n_thumbs,
        },
    )
    with stage("report", total=n_thumbs, unit="images") as st:
        for k in range(n_pages):
            page_clusters = shown.iloc[k * clusters_per_page : (k + 1) * clusters_per_page]
            page_paths = [p for c in page_clusters["cluster"] for p in members[c]["path"]]
            thumbs = make_thumbnails(store, page_paths, client=client, size=thumb_px, progress=st)
            for t in thumbs.values():
                counts[t.status] = counts.get(t.status, 0) + 1
            images_shown += len(page_paths)
            views = [
                _cluster_view(row, members[row.cluster], thumbs, settings, rank)
                for rank, row in enumerate(
                    page_clusters.itertuples(index=False), start=k * clusters_per_page + 1
                )
            ]
            if k == 0:
                first_views = views
                continue
            page = render(
                "report.html.j2",
                title=f"dedup-batch report, page {k + 1} of {n_pages}",
                overview=None,
                pages=pages,
                current=k,
                clusters=views,
            )
            pdir.write_text(pages[k], page)
    overview = _overview_view(
        counts_, distances, clusters, shown, summary, settings, counts, n_pages, max_members, store
    )
    page = render(
        "report.html.j2",
        title="dedup-batch report",
        overview=overview,
        pages=pages,
        current=0,
        clusters=first_views,
    )
    url = pdir.write_text(REPORT_FILE, page)
    result = ReportResult(
        url=url,
        pages=pages,
        clusters_total=len(clusters),
        clusters_shown=len(shown),
        images_shown=images_shown,
        thumbnails=dict(sorted(counts.items())),
    )
    bad = {k: v for k, v in counts.items() if k != "ok"}
    log.info(
        "report: wrote %s (%d page(s)); thumbnails %s",
        url,
        n_pages,
        ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none",
        extra={"event": "report_written", "url": url, "thumbnails": result.thumbnails},
    )
    if bad:
        log.warning(
            "report: %d image(s) shown as placeholders (%s)",
            sum(bad.values()),
            ", ".join(f"{v} {k}" for k, v in sorted(bad.items())),
        )
    if update_summary:
        pdir.update_summary({"report": result.summary_entry()})
    return result


def _scan_parts(parts: Iterable[pd.DataFrame]) -> tuple[pd.DataFrame, PlanCounts, np.ndarray]:
    """One pass over the plan's parts: the clusters with duplicates, riskiest first (see
    :func:`_rank_clusters`; exact per part, as a cluster never spans parts), the plan's counts,
    and the distances of the rows to delete (for the histogram; NaN dropped)."""
    ranked, dists = [], []
    counts = PlanCounts()
    for part in parts:
        ranked.append(_rank_clusters(part))
        counts += PlanCounts.of(part)
        if "distance_to_keeper" in part:
            d = pd.to_numeric(
                part.loc[~part["keep"].astype(bool), "distance_to_keeper"], errors="coerce"
            )
            dists.append(d.dropna().to_numpy(dtype=np.float64))
    clusters = ranked[0] if len(ranked) == 1 else _riskiest_first(pd.concat(ranked))
    return clusters, counts, np.concatenate(dists) if dists else np.empty(0)


def _riskiest_first(agg: pd.DataFrame) -> pd.DataFrame:
    agg = agg.assign(_d=agg["max_distance"].fillna(-1.0))
    agg = agg.sort_values(
        ["_d", "size", "cluster"], ascending=[False, False, True], kind="mergesort"
    )
    return agg.drop(columns="_d").reset_index(drop=True)


def _rank_clusters(plan: pd.DataFrame) -> pd.DataFrame:
    """One row per cluster with duplicates, riskiest first.

    Columns ``cluster``, ``size``, ``n_delete``, ``max_distance`` (over the members to delete),
    ``bytes`` (reclaimable). Order: ``max_distance`` descending, ``size`` descending, then
    ``cluster`` ascending (deterministic).
    """
    df = plan[plan["cluster"] >= 0]
    dist = df["distance_to_keeper"] if "distance_to_keeper" in df else pd.Series(np.nan, df.index)
    size = df["size"] if "size" in df else pd.Series(pd.NA, df.index)
    delete = ~df["keep"].astype(bool)
    work = pd.DataFrame(
        {
            "cluster": df["cluster"].to_numpy(),
            "one": 1,
            "del": delete.to_numpy().astype(np.int64),
            "ddist": np.where(delete, pd.to_numeric(dist, errors="coerce"), np.nan),
            "dbytes": np.where(delete, pd.to_numeric(size, errors="coerce").fillna(0), 0),
        }
    )
    agg = (
        work.groupby("cluster", sort=True)
        .agg(
            size=("one", "sum"),
            n_delete=("del", "sum"),
            max_distance=("ddist", "max"),
            bytes=("dbytes", "sum"),
        )
        .reset_index()
    )
    return _riskiest_first(agg[agg["size"] > 1])


def _members_to_show(
    parts: Iterable[pd.DataFrame], clusters: np.ndarray, max_members: int
) -> dict[int, pd.DataFrame]:
    """For each cluster: keepers first (by path), then deletions farthest first, capped.

    Reads each part once and keeps only the rows of ``clusters``."""
    subs = [p[p["cluster"].isin(clusters)] for p in parts]
    sub = pd.concat(subs).copy() if subs else pd.DataFrame(columns=["cluster", "keep", "path"])
    if "distance_to_keeper" not in sub:
        sub["distance_to_keeper"] = np.nan
    sub["_k"] = ~sub["keep"].astype(bool)
    sub["_d"] = -pd.to_numeric(sub["distance_to_keeper"], errors="coerce").fillna(0.0)
    sub = sub.sort_values(["cluster", "_k", "_d", "path"], kind="mergesort")
    out: dict[int, pd.DataFrame] = {}
    for c, grp in sub.groupby("cluster", sort=False):
        out[int(c)] = grp.head(max_members).drop(columns=["_k", "_d"])
        out[int(c)].attrs["hidden"] = len(grp) - min(len(grp), max_members)
    return out


# -- HTML ----------------------------------------------------------------------------------------
_CSS = """
:root{--keep:#1a7f37;--del:#cf222e;--near:#bf8700;--ink:#1f2328;--mute:#656d76;--line:#d0d7de}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
color:var(--ink);margin:0 auto;max-width:1400px;padding:16px 24px;background:#fff}
h1{font-size:22px;margin:4px 0 2px}h2{font-size:17px;margin:26px 0 8px}
.sub{color:var(--mute);margin:0 0 14px;overflow-wrap:anywhere}
.cols{display:flex;flex-wrap:wrap;gap:10px 60px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.card{border:1px solid var(--line);border-radius:8px;padding:8px 14px;min-width:130px}
.card b{display:block;font-size:20px}.card span{color:var(--mute);font-size:12px}
.card.del b{color:var(--del)}.card.keep b{color:var(--keep)}.card.warn b{color:var(--near)}
.charts{display:flex;flex-wrap:wrap;gap:16px}.charts img{max-width:100%;
border:1px solid var(--line);border-radius:6px}
table.kv{border-collapse:collapse;font-size:13px}table.kv td{padding:2px 14px 2px 0}
table.kv td:first-child{color:var(--mute)}
.note{background:#fff8c5;border:1px solid #d4a72c66;border-radius:6px;padding:8px 12px}
nav.pages{margin:18px 0;display:flex;flex-wrap:wrap;gap:6px}
nav.pages a,nav.pages b{padding:3px 9px;border:1px solid var(--line);border-radius:6px;
text-decoration:none}nav.pages b{background:var(--ink);color:#fff}
section.cl{border:1px solid var(--line);border-radius:10px;margin:14px 0;padding:10px 12px}
section.cl h3{font-size:14px;margin:0 0 8px;font-weight:600}
section.cl h3 .m{color:var(--mute);font-weight:400}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:172px;border:2px solid var(--line);border-radius:8px;padding:5px;
background:#f6f8fa}
figure.keep{border-color:var(--keep)}figure.del{border-color:var(--del);border-style:dashed}
figure .img{height:160px;display:flex;align-items:center;justify-content:center}
figure img{max-width:160px;max-height:160px;display:block}
.ph{width:150px;height:110px;display:flex;align-items:center;justify-content:center;
border:1px dashed #8c959f;border-radius:6px;color:#57606a;background:repeating-linear-gradient(
45deg,#eaeef2,#eaeef2 8px,#f6f8fa 8px,#f6f8fa 16px);font-weight:600;text-align:center}
figcaption{font-size:11.5px;margin-top:4px;overflow-wrap:anywhere}
.badge{display:inline-block;border-radius:4px;padding:0 5px;font-size:11px;font-weight:700;
color:#fff;margin-right:4px}.badge.keep{background:var(--keep)}.badge.del{background:var(--del)}
.d{font-variant-numeric:tabular-nums}.d.near{color:var(--near);font-weight:700}
.more{color:var(--mute);font-size:12px;margin-top:6px}
.p{display:block;color:var(--mute)}
.px{display:block;font-variant-numeric:tabular-nums}
.why{display:block;color:var(--keep)}
.banner{background:#fff1e5;border:1px solid #bc4c00;border-radius:6px;padding:8px 12px;
margin:10px 0}.banner ul{margin:4px 0 0;padding-left:20px}
"""

# Marks each thumbnail that decoded (naturalWidth > 0) and counts them on <body>: lets a
# headless browser (and the tests) check the page renders, and does nothing else.
_SCRIPT = (
    "addEventListener('load',function(){var n=0,a=document.images;"
    "for(var i=0;i<a.length;i++){var ok=a[i].complete&&a[i].naturalWidth>0;"
    "a[i].setAttribute('data-decoded',ok?'1':'0');if(ok)n++}"
    "document.body.setAttribute('data-images',n+'/'+a.length)});"
)
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
# Nothing may load from the network; only this exact script runs (an injected one would not).
_CSP = (
    f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    f"script-src 'sha256-{_SCRIPT_HASH}'; base-uri 'none'; form-action 'none'"
)


@functools.lru_cache(maxsize=1)
def _env() -> Any:
    """The Jinja2 environment of ``dedup_batch/templates`` (autoescaping on, strict names)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("dedup_batch", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        # Every value is escaped with html.escape(quote=True), as these pages always were
        # (&quot; and &#x27; rather than markupsafe's &#34; and &#39;): the same bytes for the
        # same plan. Values already marked safe (the CSS, the script, rendered macros) pass.
        finalize=_escaped,
    )
    env.globals["status_label"] = lambda status: STATUS_LABELS.get(status, status)
    return env


def _escaped(value: Any) -> Any:
    from markupsafe import Markup

    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))


def render(template: str, **context: Any) -> str:
    """Render ``template`` (a file of ``dedup_batch/templates``) into a self-contained page.

    Every page gets the inline CSS, the decode-marking script and the CSP; every value in
    ``context`` is HTML-escaped where the template prints it (autoescaping: a file name such
    as ``<script>.png`` stays text).
    """
    from markupsafe import Markup

    page = {"csp": Markup(_CSP), "css": Markup(_CSS), "script": Markup(_SCRIPT)}
    return str(_env().get_template(template).render(**page, **context))


def _dist_view(d: Any, eps: float | None) -> dict[str, Any]:
    """A distance as the templates show it: text, share of eps, near (>= 80% of eps)."""
    if _missing(d):
        return {"text": None, "near": False, "frac": ""}
    d = float(d)
    return {
        "text": f"{d:.4g}",
        "near": eps is not None and eps > 0 and d >= 0.8 * eps,
        "frac": f" ({100 * d / eps:.0f}% of eps)" if eps else "",
    }


def _cluster_view(
    row: Any,
    members: pd.DataFrame,
    thumbs: Mapping[str, Thumb],
    settings: Mapping[str, Any],
    rank: int,
) -> dict[str, Any]:
    """One cluster section of a report page (see ``templates/report.html.j2``)."""
    eps = _float_or_none(settings.get("eps"))
    n_keepers = int(members["keep"].astype(bool).sum())
    paths = set(members["path"])
    views = []
    for m in members.itertuples(index=False):
        keep = bool(m.keep)
        why = getattr(m, "keep_reason", None)
        views.append(
            {
                "cls": "keep" if keep else "del",
                "badge": "KEEP" if keep else "DELETE",
                "thumb": thumbs.get(m.path),
                "path": m.path,
                "dist": None if keep else _dist_view(getattr(m, "distance_to_keeper", None), eps),
                "facts": _facts(m),
                "why": why if keep and not _missing(why) and why else None,
                # the keeper's name when it is not the obvious one (several, or not shown)
                "to": m.keeper if not keep and (n_keepers > 1 or m.keeper not in paths) else None,
            }
        )
    md = row.max_distance
    return {
        "cluster": int(row.cluster),
        "rank": rank,
        "size": int(row.size),
        "n_delete": int(row.n_delete),
        "risk": None if md is None or math.isnan(md) else _dist_view(md, eps),
        "reclaim": _human_bytes(row.bytes) if row.bytes else "",
        "members": views,
        "hidden": int(members.attrs.get("hidden", 0)),
    }


def _facts(m: Any) -> str:
    """Pixel size and bytes of a member, when the plan has them (plans made before these
    columns existed show what they have)."""
    w, h, size = (getattr(m, k, None) for k in ("width", "height", "size"))
    facts = []
    if not _missing(w) and not _missing(h):
        facts.append(f"{int(w)}×{int(h)}")
    if not _missing(size):
        facts.append(_human_bytes(size))
    return " · ".join(facts)


def _missing(v: Any) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def _policy_words(keep: Any) -> str | None:
    """``original (most pixels, then ...)``: the keep policy and what it prefers, in words."""
    if not keep:
        return None
    try:
        return f"{keep} ({parse_policy(str(keep)).describe()})"
    except ConfigError:  # a plan from a version with other policies: show it as written
        return str(keep)


def _overview_view(
    tally: PlanCounts,
    distances: np.ndarray,
    clusters: pd.DataFrame,
    shown: pd.DataFrame,
    summary: Mapping[str, Any],
    settings: Mapping[str, Any],
    counts: Mapping[str, int],
    n_pages: int,
    max_members: int,
    store: storage.Store,
) -> dict[str, Any]:
    """The first page's head: cards, charts, settings, timings, warnings."""
    n, n_del, noise = tally.paths, tally.delete, tally.noise
    reclaim, not_found = tally.reclaimable_bytes, tally.missing
    eps = _float_or_none(settings.get("eps"))
    cards = [
        ("", f"{n:,}", "images in plan"),
        ("", f"{len(clusters):,}", "clusters with duplicates"),
        ("del", f"{n_del:,}", f"to delete ({100 * n_del / n:.1f}%)" if n else "to delete"),
        ("keep", f"{n - n_del:,}", "to keep"),
        ("", _human_bytes(reclaim), "reclaimable"),
    ]
    if noise:
        cards.append(("", f"{noise:,}", "noise (never deleted)"))
    if not_found:
        cards.append(("warn", f"{not_found:,}", "not found at plan time"))
    bad = {k: v for k, v in counts.items() if k != "ok"}
    if bad:
        cards.append(
            (
                "warn",
                f"{sum(bad.values()):,}",
                "shown as placeholders: "
                + ", ".join(f"{v} {STATUS_LABELS.get(k, k)}" for k, v in sorted(bad.items())),
            )
        )
    keys = [
        ("root", store.root),
        ("eps", settings.get("eps")),
        ("metric", settings.get("metric")),
        ("min_samples", settings.get("min_samples")),
        ("keep policy", _policy_words(settings.get("keep"))),
        ("max keeper distance", settings.get("max_keeper_distance")),
        ("generated", _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
    ]
    timings = summary.get("timings") or {}
    warnings = [
        w.get("message", w) if isinstance(w, Mapping) else w for w in summary.get("warnings") or []
    ]
    return {
        "root": store.root,
        "warnings": warnings,
        "cards": [{"cls": c, "value": v, "text": t} for c, v, t in cards],
        "charts": _charts(distances, clusters, eps),
        "settings": [(k, v) for k, v in keys if v is not None],
        "timings": [
            (k, f"{float(v):.2f} s") for k, v in timings.items() if _float_or_none(v) is not None
        ],
        "max_members": max_members,
        "shown": len(shown),
        "total": len(clusters),
        "capped": len(clusters) - len(shown),
        "n_pages": n_pages,
    }


def _charts(distances: np.ndarray, clusters: pd.DataFrame, eps: float | None) -> list[tuple]:
    """``(alt text, data: URI)`` of the histograms (PNG, inline)."""
    imgs = []
    if len(clusters):
        imgs.append(("cluster sizes", _size_hist_png(clusters["size"].to_numpy())))
    if len(distances):
        imgs.append(("distance to keeper", _distance_hist_png(distances, eps)))
    return [(a, "data:image/png;base64," + base64.b64encode(p).decode()) for a, p in imgs]


def _figure(w: float = 5.6, h: float = 2.9) -> Any:
    # The object API with an Agg canvas: no pyplot global state, safe in any thread.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _size_hist_png(sizes: np.ndarray) -> bytes:
    fig = _figure()
    ax = fig.add_subplot()
    top = int(sizes.max())
    if top <= 30:
        bins = np.arange(1.5, top + 1.5)
    else:  # log-spaced bins: a few huge clusters must not flatten the rest
        bins = np.unique(np.round(np.geomspace(1.5, top + 0.5, 30)))
        ax.set_xscale("log")
    counts, _, _ = ax.hist(sizes, bins=bins, color="#0969da", edgecolor="white")
    if counts.max() > 50:  # many small clusters and few big ones: keep the big ones visible
        ax.set_yscale("log")
    if top <= 30:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("cluster size (images)")
    ax.set_ylabel("clusters")
    ax.set_title(f"Cluster sizes ({len(sizes):,} clusters with duplicates)", fontsize=10)
    return _png(fig)


def _distance_hist_png(d: np.ndarray, eps: float | None) -> bytes:
    fig = _figure()
    ax = fig.add_subplot()
    ax.hist(d, bins=40, color="#cf222e", edgecolor="white")
    if eps:
        ax.axvline(eps, color="#1f2328", ls="--", lw=1)
        ax.text(eps, ax.get_ylim()[1] * 0.95, " eps", va="top", fontsize=9)
    ax.set_xlabel("distance to keeper")
    ax.set_ylabel("images to delete")
    ax.set_title("How far each deletion is from its keeper", fontsize=10)
    return _png(fig)


def _human_bytes(n: Any) -> str:
    n = float(n or 0)
    # Powers of 1024, so binary unit names (KiB, MiB, ...).
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _float_or_none(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f
