"""The embed job: list, compare, compact, then read + decode + embed batches on Dask workers.

One Dask task per batch of images: it reads each object by its exact path, decodes it, embeds
the batch in micro-batches and writes one shard. The client keeps at most
``batches_per_thread`` batches in flight per worker thread, so memory on the workers and the
scheduler's task list stay bounded whatever the size of the bucket. A task only reports back
counts, timings and the errors of its batch; the vectors go straight to the output folder.

Safe to re-run and to run again after a crash: a task writes its shard under a name fixed
before it starts (a task run twice writes the same file), a shard becomes visible whole, and a
run embeds only what the shards do not already hold.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .._malloc import keep_heap
from ..errors import ConfigError, StorageError
from ..progress import StageTimer
from ..storage import Store
from .images import BadImage, decode_image, read_image
from .listing import batches, default_extensions, list_images, parse_extensions, plan_work
from .models import Model, get_model
from .output import (
    ERROR_COLUMNS,
    list_shards,
    model_key,
    new_run_id,
    read_errors,
    read_state,
    shard_bytes,
    shard_name,
    write_errors,
)

if TYPE_CHECKING:
    from ..config import JobSpec

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_BYTES",
    "SHARD_GLOB",
    "EmbedResult",
    "embed_for_spec",
    "embed_images",
]

log = logging.getLogger(__name__)

#: Images per Dask task (and per shard): large enough that a task's overhead (~ms) and a
#: shard's footer are small next to 256 decodes; small enough that progress moves and a lost
#: worker costs little.
DEFAULT_BATCH_SIZE = 256
#: Smallest batch a small run is split into (so that every worker thread gets one).
MIN_BATCH_SIZE = 16
#: Objects larger than this are not read (listed as errors): a 12 MP JPEG is 3-8 MB, a 50 MP
#: TIFF about 150 MB; the whole object is held in memory while it is decoded.
DEFAULT_MAX_BYTES = 256 << 20
#: Batches in flight per worker thread: one running, one queued, so a thread never waits on the
#: client between batches.
BATCHES_PER_THREAD = 2
#: Threads reading batches when no Dask client is given (decoders release the GIL).
_LOCAL_THREADS = min(8, (os.cpu_count() or 1) + 2)
#: Threads compacting shards (small reads and writes: latency-bound).
_COMPACT_THREADS = 8


@dataclass
class EmbedResult:
    """What :func:`embed_images` did.

    ``embedded``: images that got a vector in this run; ``unchanged``: images already in the
    shards (not read); ``errors``: objects that got no vector in this run (listed in
    ``embed-errors.csv``); ``known_bad``: earlier errors of objects unchanged since (not read,
    still listed); ``batches``: Dask tasks run. ``work`` sums the tasks' time per step
    (``read_s``, ``decode_s``, ``embed_s``, ``write_s``), ``timings`` the client's stages.
    """

    out: str
    run_id: str
    model: dict[str, Any]
    listed: int = 0
    embedded: int = 0
    unchanged: int = 0
    errors: int = 0
    known_bad: int = 0
    batches: int = 0
    shards_written: list[str] = field(default_factory=list)
    shards_compacted: int = 0
    shards_removed: int = 0
    errors_url: str = ""
    seconds: float = 0.0
    images_per_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    work: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        return asdict(self)

    def summary_line(self) -> str:
        """The CLI's one line: embedded, skipped unchanged, errors, images/s."""
        errs = self.errors + self.known_bad
        line = (
            f"embed: {self.embedded:,} images embedded, {self.unchanged:,} skipped unchanged, "
            f"{errs:,} errors"
        )
        if self.known_bad:
            line += f" ({self.known_bad:,} known from earlier runs)"
        line += f"; {self.images_per_s:,.1f} images/s -> {self.out}"
        if errs:
            line += f" (errors: {self.errors_url})"
        return line


def embed_images(
    root: str,
    out: str,
    *,
    model: str = "pdq",
    storage_options: Mapping[str, Any] | None = None,
    extensions: str | Iterable[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    client: Any = None,
    max_pixels: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    batches_per_thread: int = BATCHES_PER_THREAD,
) -> EmbedResult:
    """Embed the images under ``root`` into sharded Parquet feature files under ``out``.

    Parameters
    ----------
    root : str
        The image collection (a folder, ``s3://bucket/prefix``, any fsspec URL).
    out : str
        The output folder (local or any fsspec URL); earlier runs' shards there are reused.
    model : str, default "pdq"
        ``NAME[:ARG]`` (see :mod:`dedup_batch.embed.models`).
    storage_options : mapping, optional
        fsspec options for ``root`` and ``out``.
    extensions : str or iterable of str, optional
        File-name extensions to embed, case-insensitive; default: jpg, jpeg, png, webp, gif,
        tif, tiff, bmp, and heic, heif, avif where Pillow reads them (pillow-heif installed).
    batch_size : int, default 256
        Images per Dask task and per shard, at most: a run of fewer than ``batch_size`` images
        per worker thread is split finer (down to 16), so that every thread has a batch.
    client : distributed.Client, optional
        Run the batches on this cluster's workers; without it, on threads in this process.
    max_pixels : int, optional
        Images with more pixels (from the header) are refused as decompression bombs; default
        ``PIL.Image.MAX_IMAGE_PIXELS`` (about 89 MP).
    max_bytes : int, default 256 MiB
        Larger objects are refused without being read.
    batches_per_thread : int, default 2
        Batches in flight per worker thread.

    Returns
    -------
    EmbedResult

    Raises
    ------
    ConfigError
        Unknown model, bad extensions or batch size, or ``out`` holding shards of another model.
    StorageError
        The root cannot be listed, or a shard cannot be written.

    Notes
    -----
    Time: one listing of the root, one footer + four small columns per existing shard, then
    per new image one read, one decode (JPEGs at reduced scale) and one model call; with PDQ
    the decode is the larger part for photos of a few megapixels and up.

    Memory: on the client, the listing and the earlier shards' paths and stats (about 300 bytes
    per image). Per task: one object's bytes plus the model's micro-batch of decoded images
    (PDQ: 32 × 512 × 512 × 3 bytes ≈ 25 MB) and the batch's vectors.
    """
    from PIL import Image

    started = time.perf_counter()
    exts = parse_extensions(default_extensions() if extensions is None else extensions)
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    the_model = get_model(model)
    info = the_model.info()
    so = dict(storage_options or {})
    store = Store(root, so)
    out_store = Store(out, so)
    if max_pixels is None:
        max_pixels = int(Image.MAX_IMAGE_PIXELS or 0) or 2**62
    run_id = new_run_id()
    result = EmbedResult(out=out, run_id=run_id, model=info)
    timer = StageTimer()

    with timer.stage("list"):
        images = list_images(store, exts)
    result.listed = len(images)
    with timer.stage("state"):
        shards = list_shards(out_store)
        state, models = read_state(out_store, shards)
        _check_models(models, the_model, out_store)
        old_errors = read_errors(out_store)
    work = plan_work(images, state, old_errors, max_bytes=max_bytes)
    result.unchanged = work.unchanged
    result.known_bad = len(work.known_bad)
    log.info(
        "embed: %d images under %s: %d to embed, %d unchanged, %d known bad (model %s)",
        len(images),
        store.root,
        len(work.todo),
        work.unchanged,
        len(work.known_bad),
        the_model.spec,
    )
    if len(work.stale):
        with timer.stage("compact", total=work.stale["shard"].nunique(), unit="shards") as st:
            result.shards_compacted, result.shards_removed = _compact(
                out_store, work.stale, run_id, st.advance
            )

    new_errors: list[tuple] = []
    threads = sum(client.nthreads().values()) if client is not None else _LOCAL_THREADS
    jobs = batches(work.todo, _batch_size(len(work.todo), batch_size, threads))
    with timer.stage("embed", total=len(work.todo), unit="images") as st:
        t0 = time.perf_counter()
        task = _BatchTask(
            store=store,
            out=out_store,
            model=the_model.spec,
            run_id=run_id,
            max_pixels=max_pixels,
            max_bytes=max_bytes,
        )
        totals = {"read_s": 0.0, "decode_s": 0.0, "embed_s": 0.0, "write_s": 0.0}
        for res in _run_batches(task, jobs, client, batches_per_thread):
            result.embedded += res["embedded"]
            new_errors.extend(res["errors"])
            if res["shard"]:
                result.shards_written.append(res["shard"])
            for k in totals:
                totals[k] += res[k]
            st.advance(res["n"])
        embed_wall = time.perf_counter() - t0
    result.batches = len(jobs)
    result.work = {k: round(v, 4) for k, v in totals.items()}

    errors = pd.concat(
        [
            frame
            for frame in (
                work.refused,
                work.known_bad,
                pd.DataFrame(new_errors, columns=ERROR_COLUMNS),
            )
            if len(frame)
        ]
        or [pd.DataFrame(columns=ERROR_COLUMNS)],
        ignore_index=True,
    )
    result.errors = len(work.refused) + len(new_errors)
    with timer.stage("errors"):
        result.errors_url = write_errors(out_store, errors)
    result.timings = timer.timings
    result.seconds = round(time.perf_counter() - started, 4)
    result.images_per_s = round(result.embedded / embed_wall, 2) if embed_wall > 0 else 0.0
    return result


#: The shards of an output folder, as ``plan --features`` takes them (``OUT/part-*.parquet``).
SHARD_GLOB = "part-*.parquet"


def embed_for_spec(spec: JobSpec, client: Any = None) -> tuple[JobSpec, EmbedResult]:
    """``run --embed``: embed what is new or changed under ``spec.root``, then return the spec
    with ``features`` set to the shards (and the embed result).

    The shards go to ``spec.embed_out``, by default ``<out>/features`` (beside the plan, so a
    second ``run`` with the same ``--out`` reuses them and embeds only new or changed images).

    Raises
    ------
    ConfigError
        No ``root``, or ``features`` given as well (the plan would mix the embedded shards with
        other vectors; give one or the other).
    """
    from ..storage import join_url

    spec.require("root")
    out = spec.embed_out or join_url(spec.out, "features")
    shards = join_url(out, SHARD_GLOB)
    if spec.features and spec.features != [shards]:
        raise ConfigError(
            "give --features or --embed, not both: with --embed the features are the shards "
            f"embed writes ({shards})"
        )
    result = embed_images(
        spec.root,  # type: ignore[arg-type]
        out,
        model=spec.embed or "pdq",
        storage_options=spec.storage_options,
        extensions=spec.embed_extensions,
        batch_size=spec.embed_batch_size or DEFAULT_BATCH_SIZE,
        client=client,
    )
    log.info("%s", result.summary_line())
    return dataclasses.replace(spec, features=[shards], embed_out=out), result


def _batch_size(n: int, batch_size: int, threads: int) -> int:
    """``batch_size``, or less for a small run, so that every worker thread gets a batch."""
    per_thread = -(-n // max(1, threads))
    return max(1, min(batch_size, max(MIN_BATCH_SIZE, per_thread)))


def _check_models(models: Mapping[str, dict | None], model: Model, out: Store) -> None:
    """Refuse an output folder that holds shards of another model (or version)."""
    want = model_key(model.info())
    for shard, info in models.items():
        if info is None or model_key(info) != want:
            what = (
                "no model metadata"
                if info is None
                else (f"model {info.get('name')} {info.get('version')} ({info.get('dim')} dims)")
            )
            raise ConfigError(
                f"{out.url(shard)} holds features of {what}, but this run uses "
                f"{model.spec} {model.version} ({model.dim} dims): choose another --out (or "
                "move the old shards away to embed everything again)"
            )


def _compact(
    out: Store, stale: pd.DataFrame, run_id: str, advance: Callable[[int], None]
) -> tuple[int, int]:
    """Rewrite each shard holding stale rows without them (or remove it if nothing is left).

    The rewritten shard is written before the old one is removed: a crash in between leaves
    two identical rows for a path (``load`` keeps one), never a path with no row.
    Returns ``(rewritten, removed)`` shard counts.
    """
    groups = list(stale.groupby("shard", sort=True)["row"])

    def one(seq: int, shard: str, rows: pd.Series) -> int:
        raw = out.read_bytes(shard)
        if raw is None:
            return 0
        table = pq.read_table(pa.BufferReader(raw))
        mask = pa.array([True] * table.num_rows)
        if len(rows):
            keep = [True] * table.num_rows
            for r in rows:
                keep[int(r)] = False
            mask = pa.array(keep)
        kept = table.filter(mask)
        wrote = 0
        if kept.num_rows:
            buf = pa.BufferOutputStream()
            pq.write_table(kept, buf)
            new = f"{out.root_path}/{shard_name(run_id, seq, compacted=True)}"
            out.write_bytes(new, buf.getvalue().to_pybytes())
            wrote = 1
        res = out.delete_exact([shard])[shard]
        if res.status not in ("deleted", "already_absent"):
            raise StorageError(
                f"embed: cannot remove {out.url(shard)} after rewriting it ({res.code}: "
                f"{res.message}); remove it by hand before planning"
            )
        return wrote

    rewritten = 0
    with concurrent.futures.ThreadPoolExecutor(min(_COMPACT_THREADS, len(groups) or 1)) as pool:
        futs = [pool.submit(one, i, shard, rows) for i, (shard, rows) in enumerate(groups)]
        for fut in concurrent.futures.as_completed(futs):
            rewritten += fut.result()
            advance(1)
    return rewritten, len(groups) - rewritten


@dataclass(frozen=True)
class _BatchTask:
    """Everything a batch task needs besides its rows (pickled once per task: small)."""

    store: Store
    out: Store
    model: str
    run_id: str
    max_pixels: int
    max_bytes: int

    def __call__(self, seq: int, rows: Sequence[tuple]) -> dict[str, Any]:
        return _embed_batch(self, seq, rows)


#: Shard columns besides the vector and the model's extras, in the order a task fills them.
_COLUMNS = ("path", "size", "mtime", "etag", "width", "height")


def _embed_batch(task: _BatchTask, seq: int, rows: Sequence[tuple]) -> dict[str, Any]:
    """Read, decode and embed ``rows`` (``(fs_path, path, size, mtime, etag)``); write one
    shard. Runs on a worker. Bad objects become error rows; a failed write raises."""
    # freed memory reused from image to image (see dedup_batch._malloc: PDQ's 1-2 MB buffers
    # as fresh mmaps under Dask's nanny doubled the hash time per image)
    keep_heap()
    model = get_model(task.model)
    extras: dict[str, list] = {name: [] for name in model.extra_columns}
    cols: dict[str, list] = {k: [] for k in _COLUMNS}
    vectors = []
    errors: list[tuple] = []
    t = {"read_s": 0.0, "decode_s": 0.0, "embed_s": 0.0, "write_s": 0.0}

    def bad(row: tuple, kind: str, reason: str) -> None:
        errors.append((row[1], reason, kind, row[2], row[3], row[4]))

    for lo in range(0, len(rows), model.micro_batch):
        chunk, images = [], []
        for row in rows[lo : lo + model.micro_batch]:
            t0 = time.perf_counter()
            try:
                data = read_image(task.store, row[0], max_bytes=task.max_bytes)
            except BadImage as exc:
                bad(row, exc.kind, exc.reason)
                continue
            finally:
                t["read_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            try:
                dec = decode_image(
                    data,
                    max_pixels=task.max_pixels,
                    decode_px=model.decode_px,
                    min_px=model.min_px,
                )
            except BadImage as exc:
                bad(row, exc.kind, exc.reason)
                continue
            finally:
                t["decode_s"] += time.perf_counter() - t0
                del data
            chunk.append((row, dec.width, dec.height))
            images.append(dec.image)
        if not images:
            continue
        t0 = time.perf_counter()
        got = _embed_chunk(model, images)
        t["embed_s"] += time.perf_counter() - t0
        del images
        for (row, w, h), one in zip(chunk, got, strict=True):
            if isinstance(one, BadImage):
                bad(row, one.kind, one.reason)
                continue
            vec, extra = one
            vectors.append(vec)
            for k, v in zip(_COLUMNS, (*row[1:], w, h), strict=True):
                cols[k].append(v)
            for k in extras:
                extras[k].append(extra[k])
    shard = None
    if vectors:
        t0 = time.perf_counter()
        import numpy as np

        data = shard_bytes(
            {**cols, "embedding": np.stack(vectors), **extras},
            dim=model.dim,
            model_info=model.info(),
        )
        shard = f"{task.out.root_path}/{shard_name(task.run_id, seq)}"
        task.out.write_bytes(shard, data)
        shard = task.out.url(shard)
        t["write_s"] += time.perf_counter() - t0
    return {"n": len(rows), "embedded": len(vectors), "errors": errors, "shard": shard, **t}


def _embed_chunk(model: Model, images: list) -> list[Any]:
    """``(vector, extras)`` per image, or a :class:`BadImage` for an image the model refused.

    The micro-batch is embedded in one call; if that fails, image by image, so that one bad
    image costs only its own vector.
    """
    try:
        X, extra = model.embed_with_extras(images)
        return [(X[i], {k: v[i] for k, v in extra.items()}) for i in range(len(images))]
    except Exception as exc:
        if len(images) == 1:
            return [BadImage("corrupt", f"model {model.name} failed: {exc}")]
    return [one for img in images for one in _embed_chunk(model, [img])]


def _run_batches(
    task: _BatchTask, jobs: list[list[tuple]], client: Any, per_thread: int
) -> Iterable[dict[str, Any]]:
    """Run ``task`` over ``jobs`` with at most ``per_thread`` batches per thread in flight;
    yield each batch's result as it finishes."""
    if not jobs:
        return
    numbered = enumerate(jobs)
    if client is None:
        threads = min(_LOCAL_THREADS, len(jobs))
        window = max(1, per_thread * threads)
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            pending = {pool.submit(task, i, b) for i, b in itertools.islice(numbered, window)}
            try:
                while pending:
                    done, pending = concurrent.futures.wait(
                        pending, return_when=concurrent.futures.FIRST_COMPLETED
                    )
                    for fut in done:
                        yield _result(fut)
                        for i, b in itertools.islice(numbered, 1):
                            pending.add(pool.submit(task, i, b))
            finally:
                for fut in pending:
                    fut.cancel()
        return

    from distributed import as_completed

    threads = sum(client.nthreads().values()) or 1
    window = max(1, per_thread * threads)

    def submit(i: int, b: list[tuple]) -> Any:
        return client.submit(task, i, b, key=f"embed-{task.run_id}-{i:05d}", pure=False)

    first = [submit(i, b) for i, b in itertools.islice(numbered, window)]
    pending = set(first)
    queue = as_completed(first)
    try:
        for fut in queue:
            pending.discard(fut)
            res = _result(fut)
            fut.release()
            yield res
            for i, b in itertools.islice(numbered, 1):
                nxt = submit(i, b)
                pending.add(nxt)
                queue.add(nxt)
    finally:
        if pending:
            client.cancel(list(pending))


def _result(fut: Any) -> dict[str, Any]:
    # A task raises only when its shard cannot be written (StorageError) or on a bug; either
    # stops the run. The shards written so far stay: the next run does not embed them again.
    return fut.result()
