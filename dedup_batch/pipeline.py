"""Orchestration: plan (load → cluster → select → write) and apply, on a Dask client.

Every stage takes the client as an argument; :func:`dask_client` makes one from the job spec
(an existing scheduler, or a ``LocalCluster`` sized to the machine).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dask
import numpy as np
import pandas as pd

from . import __version__
from .apply import ApplyResult, apply_plan
from .apply import restore as restore_trash
from .cluster import dbscan
from .cluster_dask import sample_rows
from .config import JobSpec
from .diagnose import plan_warnings
from .errors import ConfigError, InputError, StorageError
from .images import read_dimensions
from .load import load_features
from .plan_dask import select_on_workers
from .plandir import MANIFEST_FILE, SWEEP_DIR, PlanCounts, PlanDir
from .progress import StageTimer, log_dashboard, stage
from .report import ReportResult, build_report
from .secrets import merge_options, without_redacted
from .select import select_keepers
from .storage import Store

if TYPE_CHECKING:
    from .sweep import SweepResult

__all__ = [
    "PlanResult",
    "apply",
    "dask_client",
    "local_cluster",
    "plan",
    "report",
    "restore",
    "run",
    "sweep",
]

log = logging.getLogger(__name__)

#: Spec keys that only affect apply: a plan made with other values is still the same plan.
_APPLY_KEYS = frozenset(
    {
        "mode",
        "dry_run",
        "max_delete",
        "max_delete_fraction",
        "trash",
        "batch_size",
        "concurrency",
        "scheduler",
        "n_workers",
        "threads_per_worker",
        "distributed",
        "log_format",
        "report",
    }
)


@dataclass
class PlanResult:
    """What :func:`plan` produced: the plan table, its summary, and where they were written.

    ``plan`` is None when the plan was written as a dataset by the Dask workers (or reused
    from one) and so never held whole here: read it with ``PlanDir(out).plan_parts()``.
    """

    out: str
    plan: pd.DataFrame | None
    summary: dict[str, Any]
    reused: bool = False
    #: ``run --embed``: what the embed step did (an ``embed.EmbedResult``).
    embedded: Any = None


#: Dask settings for the LocalCluster dedup-batch starts, where the user's Dask config (its
#: YAML files, ``DASK_*`` variables) does not set them. Both only cost CPU on the cores the
#: job's tasks run on (docs/scaling.md, "Dask's own CPU"):
#: - the workers' statistical profiler, which feeds the dashboard's profile page, samples
#:   every thread's stack every 10 ms;
#: - the event loops' tick, a watchdog for a blocked loop (warned about after 3 s), runs every
#:   20 ms in the scheduler and each worker.
LOCAL_CLUSTER_CONFIG: dict[str, Any] = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
}


def local_cluster_config() -> dict[str, Any]:
    """:data:`LOCAL_CLUSTER_CONFIG` less the keys the user's own Dask config sets."""
    users = dask.config.collect()  # the YAML files and DASK_* variables, without defaults
    unset = object()
    return {
        k: v
        for k, v in LOCAL_CLUSTER_CONFIG.items()
        if dask.config.get(k, default=unset, config=users) is unset
    }


@contextmanager
def local_cluster(n_workers: int, threads_per_worker: int, **kwargs: Any) -> Iterator[Any]:
    """The ``LocalCluster`` of worker processes a job starts on this machine (on loopback,
    the dashboard on a free port), with :func:`local_cluster_config`'s settings. The workers
    take the settings with them when they start; the caller's config is left as it was."""
    from distributed import LocalCluster

    with dask.config.set(local_cluster_config()):
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            host="127.0.0.1",
            # port 0: never collide with another cluster on 8787 (served without bokeh too)
            dashboard_address="127.0.0.1:0",
            **kwargs,
        )
    with cluster:
        yield cluster


@contextmanager
def dask_client(spec: JobSpec, *, local: bool = True) -> Iterator[Any]:
    """A ``distributed.Client`` for the job (the one place a client is made).

    ``spec.scheduler`` (or ``$DASK_SCHEDULER_ADDRESS``) connects to that cluster; otherwise a
    ``LocalCluster`` of worker processes starts on this machine and stops on exit. Worker
    processes (not threads) keep a crashing or memory-hungry task from taking the job down.
    With ``local=False`` and no scheduler it yields ``None``: the stage runs on a thread pool
    (the report, whose reads do not pay for starting worker processes).
    """
    from distributed import Client

    address = spec.scheduler_address()
    if not address and not local:
        yield None
        return
    if address:
        try:
            # Dask's own setting (default 30s), so DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT works
            client = Client(address, timeout=dask.config.get("distributed.comm.timeouts.connect"))
        except (OSError, TimeoutError) as exc:
            raise StorageError(
                f"cannot reach the Dask scheduler at {address}: {exc}; check --scheduler"
            ) from None
        log.info(
            "dask: connected to %s (%d workers)",
            address,
            len(client.scheduler_info().get("workers", {})),
        )
        log_dashboard(client)
        try:
            yield client
        finally:
            client.close()
        return
    cpus = os.cpu_count() or 1
    n_workers = spec.n_workers or max(1, min(cpus, 8))
    threads = spec.threads_per_worker or 2  # I/O-bound stages (reads, deletes) overlap waits
    with local_cluster(n_workers, threads) as cluster, Client(cluster) as client:
        log.info("dask: LocalCluster with %d workers x %d threads", n_workers, threads)
        log_dashboard(client)
        yield client


def plan(spec: JobSpec, client: Any = None) -> PlanResult:
    """Load, cluster and select, then write the plan to ``spec.out``. Deletes nothing.

    Refuses an ``out`` that already holds an apply journal: that plan is being carried out,
    and a new plan written over it could not be resumed safely.
    """
    spec = _with_model_eps(spec)
    spec.require("features", "root", "eps")
    timer = StageTimer()
    store = Store(spec.root, spec.storage_options)  # type: ignore[arg-type]
    so = spec.storage_options
    out = PlanDir(spec.out, so)
    if out.has_journal():
        raise ConfigError(
            f"{spec.out} holds an apply journal from an earlier plan: finish it with "
            f"'dedup-batch apply {spec.out}', or choose another --out"
        )
    started = time.time()
    with timer.stage("load"):
        feats = load_features(
            spec.features,
            store=store,
            storage_options=so,
            allow_pickle=spec.allow_pickle,
            client=client,
            distributed=spec.distributed,
        )
    X, paths = feats.X, feats.paths
    if not isinstance(X, np.ndarray):  # the vectors stay on the workers (issue 14)
        paths = feats.path_array()
    with timer.stage("list"):
        objects, protected, protect_warnings = _objects(store, paths, spec.protect)
    with timer.stage("cluster", unit="tiles"):
        labels = _cluster(X, spec, client)
    with timer.stage("headers", unit="images") as st:
        objects = _with_dimensions(store, paths, labels, objects, client, st)
    X_warn, labels_warn = X, labels
    with timer.stage("select"):
        if isinstance(X, np.ndarray):
            table = select_keepers(
                paths,
                X,
                labels,
                objects,
                policy=spec.keep,
                protected=protected,
                max_keeper_distance=spec.keeper_distance(),
                metric=spec.metric,
            )
            counts = PlanCounts.of(table)
        else:  # on the workers; the warnings use a sample
            X_warn, labels_warn = sample_rows(X, labels)
            table, counts = select_on_workers(
                X,
                labels,
                paths,
                objects,
                protected,
                out=out,
                client=client,
                policy=spec.keep,
                max_keeper_distance=spec.keeper_distance(),
                metric=spec.metric,
            )
    warnings = plan_warnings(
        X_warn, labels_warn, eps=spec.eps, metric=spec.metric, min_samples=spec.min_samples
    )
    for w in warnings:
        log.warning("plan: %s", w)
    summary = _summary(spec, counts, feats.shards, feats.X.shape, timer.timings, started)
    summary["warnings"] = [*summary.get("warnings", []), *protect_warnings, *warnings]
    with timer.stage("write"):
        if table is not None:  # else the workers wrote it, as a dataset
            out.write_plan(table)
        # A local root is recorded absolute, so 'apply DIR' works from any directory.
        recorded = dataclasses.replace(spec, root=store.root_path) if store.is_local else spec
        out.write_job(recorded.to_yaml())
    summary["timings"] = timer.timings
    try:
        if spec.report:
            t0 = time.perf_counter()  # build_report logs its own stage
            # The report gets the plan and summary in memory: nothing is read back.
            made = build_report(
                out.url,
                store=store,
                client=client,
                storage_options=so,
                update_summary=False,
                plan=table,
                summary=summary,
            )
            timer.timings["report"] = round(time.perf_counter() - t0, 4)
            summary["report"] = made.summary_entry()
    finally:
        out.write_summary(summary)  # once, with the report entry (also when the report failed)
    return PlanResult(spec.out, table, summary)


def apply(plan_dir: str, spec: JobSpec, client: Any = None) -> ApplyResult:
    """Carry out the plan in ``plan_dir`` (see :func:`dedup_batch.apply.apply_plan`).

    The root and the non-secret storage options come from the plan's ``job.yaml``; secrets and
    overrides come from ``spec`` (flags, the job spec, or the environment).
    """
    so = spec.storage_options
    store = _plan_store(plan_dir, spec)
    with stage("apply", unit="batches"):
        result = apply_plan(
            plan_dir,
            store=store,
            dry_run=spec.dry_run,
            max_delete=spec.max_delete,
            max_delete_fraction=spec.max_delete_fraction,
            trash=spec.trash,
            batch_size=spec.batch_size,
            concurrency=spec.concurrency,
            client=client,
            plan_storage_options=so,
        )
    if not spec.dry_run:
        PlanDir(plan_dir, so).update_summary({"apply": result.to_dict()})
    return result


def restore(plan_dir: str, spec: JobSpec, client: Any = None) -> ApplyResult:
    """Put back what an apply with ``--trash`` moved (see :func:`dedup_batch.apply.restore`).

    The trash URL defaults to the one the apply journaled.
    """
    so = spec.storage_options
    store = _plan_store(plan_dir, spec)
    trash = spec.trash
    if trash is None:
        try:
            trash = json.loads(PlanDir(plan_dir, so).read_bytes(MANIFEST_FILE)).get("trash")
        except FileNotFoundError:
            trash = None
        if not trash:
            raise ConfigError(
                f"{plan_dir}: no apply with --trash is journaled here; nothing to restore "
                "(pass --trash URL if the plan directory moved)"
            )
    with stage("restore", unit="batches"):
        return restore_trash(
            plan_dir,
            store=store,
            trash=trash,
            client=client,
            plan_storage_options=so,
            dry_run=spec.dry_run,
            concurrency=spec.concurrency,
        )


def run(
    spec: JobSpec, client: Any = None, *, apply_now: bool = False
) -> tuple[PlanResult, ApplyResult | None]:
    """Plan, then apply when ``apply_now`` or ``spec.mode == "apply"``.

    When ``spec.out`` already holds a plan made from the same settings (a Kubernetes Job whose
    pod started twice, a re-run after a crash), that plan is reused and its apply resumed:
    re-planning after a partial delete could choose differently.

    With ``spec.embed`` (``run --embed MODEL``), the new or changed images under the root are
    embedded first (:func:`dedup_batch.embed.embed_for_spec`) and their shards planned; a plan
    already in ``spec.out`` is reused only when that embedded nothing new.
    """
    embedded = None
    if spec.embed:
        from .embed import embed_for_spec

        spec, embedded = embed_for_spec(spec, client)
    spec = _with_model_eps(spec)  # so that a re-run without --eps finds its plan again
    # a plan made before new or changed images were embedded is not the plan of these features
    fresh = embedded is not None and bool(
        embedded.embedded or embedded.shards_compacted or embedded.shards_removed
    )
    result = (None if fresh else _reusable_plan(spec)) or plan(spec, client)
    result.embedded = embedded
    if not (apply_now or spec.mode == "apply"):
        return result, None
    return result, apply(result.out, spec, client)


def report(
    plan_dir: str,
    spec: JobSpec,
    client: Any = None,
    *,
    clusters_per_page: int | None = None,
    max_pages: int | None = None,
    max_members: int | None = None,
    thumb_px: int | None = None,
) -> ReportResult:
    """(Re)build the HTML report of the plan in ``plan_dir`` (see
    :func:`dedup_batch.report.build_report`); its ``report`` entry goes into ``summary.json``.

    The images are read under ``spec.root`` when given, else under the plan's own root
    (``job.yaml``); the bounds default to the report's.
    """
    store = Store(spec.root, spec.storage_options) if spec.root else None
    bounds = {
        "clusters_per_page": clusters_per_page,
        "max_pages": max_pages,
        "max_members": max_members,
        "thumb_px": thumb_px,
    }
    return build_report(
        plan_dir,
        store=store,
        client=client,
        storage_options=spec.storage_options,
        **{k: v for k, v in bounds.items() if v is not None},
    )


def sweep(
    spec: JobSpec,
    client: Any = None,
    *,
    eps_values: Any,
    out: str | None = None,
    k: int | None = None,
    truth: str | None = None,
    keep: str | None = None,
    n_pairs: int = 12,
) -> SweepResult:
    """Sweep ``eps_values`` over the job's features (see :func:`dedup_batch.sweep.run_sweep`).

    Writes into ``out``, by default the ``sweep/`` folder of the plan directory ``spec.out``,
    whose ``summary.json`` (if there is one) then gets a ``sweep`` entry. The pairs page shows
    the pairs around ``spec.eps`` (default: the middle of the sweep). Returns the
    :class:`~dedup_batch.sweep.SweepResult`.
    """
    from .sweep import run_sweep

    spec.require("features", "root")
    plan_dir = PlanDir(spec.out, spec.storage_options)
    result = run_sweep(
        spec.features,
        out=out or plan_dir.join(SWEEP_DIR),
        store=Store(spec.root, spec.storage_options),  # type: ignore[arg-type]
        eps_values=eps_values,
        metric=spec.metric,
        min_samples=spec.min_samples,
        k=k,
        truth=truth,
        keep=keep or "first-path",
        pairs_eps=spec.eps,
        n_pairs=n_pairs,
        storage_options=spec.storage_options,
        allow_pickle=spec.allow_pickle,
        client=client,
    )
    if not out:
        plan_dir.update_summary({"sweep": {**result.summary_entry(), "dir": SWEEP_DIR}})
    return result


# -- helpers -------------------------------------------------------------------------------
def _with_model_eps(spec: JobSpec) -> JobSpec:
    """``spec`` with the shards' model eps when it has none: shards made by 'embed' record
    their model and its default eps (read from the Parquet footers only)."""
    if spec.eps is not None or not spec.features:
        return spec
    from .embed.output import default_eps

    found = default_eps(spec.features, spec.storage_options, metric=spec.metric)
    if found is None:
        return spec
    log.info("plan: eps %.6g, model %s's default (no --eps)", found[0], found[1]["name"])
    return dataclasses.replace(spec, eps=found[0])


def _objects(
    store: Store, paths: np.ndarray, protect: list[str]
) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    listing = store.list_objects()
    full = [store.resolve(p) for p in paths]
    objects = listing.reindex(full)
    objects["exists"] = objects["size"].notna().to_numpy()
    missing = int((~objects["exists"]).sum())
    if len(paths) and missing == len(paths):
        raise InputError(_no_object_hint(store, paths, listing))
    if missing:
        log.warning(
            "%d of %d feature paths have no object under %s: they are never kept and never deleted",
            missing,
            len(paths),
            store.root,
        )
    protected, warnings = _protected(store, full, protect)
    return objects.reset_index(drop=True), protected, warnings


def _protected(store: Store, full: list[str], patterns: list[str]) -> tuple[np.ndarray, list[str]]:
    """Which of ``full`` (exact paths under the root) the ``--protect`` patterns protect.

    Returns the mask and one warning for each pattern that protects none of them: a typo in a
    protect pattern must not pass silently, since the objects it meant are then deletable.
    """
    protected = np.zeros(len(full), dtype=bool)
    warnings = []
    for pattern in patterns:
        hit = _protect_match(store, pattern, full)
        if not hit.any():
            msg = (
                f"--protect {pattern!r} matches none of the {len(full):,} feature paths under "
                f"{store.root}: it protects nothing (check spelling and case; see "
                "'dedup-batch plan --help' for the matching rules)"
            )
            log.warning("%s", msg)
            warnings.append(msg)
        protected |= hit
    return protected, warnings


def _protect_match(store: Store, pattern: str, full: list[str]) -> np.ndarray:
    # Relative to root or an absolute path/URL under it. Always a string prefix (S3 semantics:
    # "albums/2019" protects "albums/2019/x.jpg" and "albums/2019-b/y.jpg"). With * ? or [ it is
    # also an fnmatch pattern on the path relative to root, where * crosses "/" ("family/*"
    # protects family/ at any depth) and case matters; [...] is a character class and, as well,
    # literal brackets. All of these, because a folder may be called "scans [old]" and
    # protecting more is the safe side.
    prefix = _protect_prefix(store, pattern)
    hit = np.fromiter((f.startswith(prefix) for f in full), dtype=bool, count=len(full))
    if any(c in pattern for c in "*?["):
        root = store.root_path.rstrip("/") + "/"
        rel = prefix[len(root) :]
        globs = [rel, rel.replace("[", "[[]")] if "[" in rel else [rel]
        rx = re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))
        hit |= np.fromiter(
            (rx.match(f[len(root) :]) is not None for f in full), dtype=bool, count=len(full)
        )
    return hit


def _no_object_hint(store: Store, paths: np.ndarray, listing: pd.DataFrame) -> str:
    """The message for a root under which no feature path has an object: what to check."""
    first = str(paths[0])
    msg = (
        f"none of the {len(paths):,} feature paths has an object under root {store.root!r} "
        f"(e.g. {first!r} would be {store.url(store.resolve(first))!r}); "
    )
    # The usual mistake: the root is one folder too high or too low. Look for the first path
    # at the end of a listed object, which gives the root it is relative to.
    tail = "/" + first
    for fs_path in listing.index[:200_000]:
        if str(fs_path).endswith(tail):
            return msg + f"did you mean --root {store.url(str(fs_path)[: -len(tail)])!r}?"
    common = os.path.commonpath([str(p) for p in paths[:10_000]]) if len(paths) > 1 else ""
    if common:
        msg += f"the feature paths all start with {common + '/'!r}; "
    return msg + "set --root to the folder (or bucket prefix) the feature paths are relative to"


def _protect_prefix(store: Store, prefix: str) -> str:
    if prefix in (".", "./", "") or prefix.rstrip("/") in (store.root_path, store.root.rstrip("/")):
        return store.root_path.rstrip("/") + "/"
    # resolve() folds a trailing "/" on local roots; here it means "the folder, not family-2/"
    full = store.resolve(prefix)
    return full + "/" if prefix.endswith("/") and not full.endswith("/") else full


def _with_dimensions(
    store: Store,
    paths: np.ndarray,
    labels: np.ndarray,
    objects: pd.DataFrame,
    client: Any,
    progress: Any,
) -> pd.DataFrame:
    """``objects`` with ``width`` and ``height`` from the image headers.

    Read only for the existing members of clusters with duplicates: a singleton is kept
    whatever its size, and in a real bucket most images are singletons, so reading every header
    during the listing would cost one request per object for nothing.
    """
    dup = pd.Series(labels).duplicated(keep=False).to_numpy() & (labels != -1)
    rows = np.flatnonzero(dup & objects["exists"].to_numpy(dtype=bool))
    dims = read_dimensions(
        store, [store.resolve(p) for p in paths[rows]], client=client, progress=progress
    )
    out = objects.copy()
    for col in ("width", "height"):
        values = pd.array([pd.NA] * len(out), dtype="Int64")
        values[rows] = dims[col].array
        out[col] = values
    return out


def _cluster(X: np.ndarray, spec: JobSpec, client: Any) -> np.ndarray:
    return dbscan(X, spec.eps, min_samples=spec.min_samples, metric=spec.metric, client=client)[1]


def _summary(
    spec: JobSpec,
    counts: PlanCounts,
    shards: tuple[str, ...],
    shape: tuple[int, ...],
    timings: dict[str, float],
    started: float,
) -> dict[str, Any]:
    """``summary.json``'s content, from the plan's counts (summed over its parts)."""
    return {
        "version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "root": spec.root,
        "features": {"shards": len(shards), "rows": int(shape[0]), "dim": int(shape[1])},
        "counts": {
            "paths": counts.paths,
            "clusters": counts.clusters,
            "duplicate_clusters": counts.duplicate_clusters,
            "noise": counts.noise,
            "keep": counts.keep,
            "delete": counts.delete,
            "missing": counts.missing,
            # keepers beyond one per cluster: chain guard and protected objects
            "extra_keepers": counts.keep - counts.clusters - counts.noise,
        },
        "clusters_by_size": {str(k): int(v) for k, v in sorted(counts.sizes.items())},
        "largest_cluster": max(counts.sizes, default=0),
        "reclaimable_bytes": counts.reclaimable_bytes,
        "settings": spec.to_dict(),
        "timings": timings,
    }


def _planned_spec(plan_dir: str, so: dict[str, Any]) -> JobSpec:
    """The plan's job spec; ``so`` (the user's storage options) is checked against its root."""
    from .config import check_option_names

    pdir = PlanDir(plan_dir, so)
    data = pdir.read_job(required=True)
    planned = JobSpec.from_mapping(data, source=pdir.join("job.yaml"))
    check_option_names(so, [planned.root] if planned.root else [], source="storage options")
    return planned


def _plan_store(plan_dir: str, spec: JobSpec) -> Store:
    """The plan's root, opened with its non-secret options overlaid by ``spec``'s."""
    planned = _planned_spec(plan_dir, spec.storage_options)
    options = merge_options(without_redacted(planned.storage_options), spec.storage_options)
    return Store(planned.root, options)  # type: ignore[arg-type]


def _reusable_plan(spec: JobSpec) -> PlanResult | None:
    so = spec.storage_options
    out = PlanDir(spec.out, so)
    try:
        layout = out.plan_layout()
        planned = _planned_spec(spec.out, so) if layout else None
    except (InputError, ConfigError):
        return None
    if planned is None:
        return None
    mine = {k: v for k, v in spec.to_dict().items() if k not in _APPLY_KEYS}
    theirs = {k: v for k, v in planned.to_dict().items() if k not in _APPLY_KEYS}
    if mine != theirs:
        return None
    log.info("%s already holds a plan from the same settings: reusing it", spec.out)
    # a dataset is not read whole: apply and report read it part by part
    table = out.read_plan() if layout == "file" else None
    return PlanResult(spec.out, table, out.read_summary(), reused=True)
