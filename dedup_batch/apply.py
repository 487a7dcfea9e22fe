"""Apply: delete the plan's duplicates (or move them to a trash), safely, in parallel.

``apply_plan(plan_dir, store=...)`` reads the plan in ``plan_dir`` (``plan.parquet``, or the
dataset ``plan/part-*.parquet`` one part at a time: a cluster never spans parts, so every check
below holds per part) and deletes exactly its
``keep == False`` rows outside noise (cluster -1), never a keeper:

1. **Checks before any request to the store**: the delete set is built from ``keep == False``
   and verified structurally (no path in it is a kept path or any row's ``keeper``, also after
   resolving paths, so ``a.jpg`` and ``./a.jpg`` cannot be one object kept and deleted); every
   path resolves under the root (:class:`~dedup_batch.errors.ScopeError` otherwise); the
   ``max_delete`` / ``max_delete_fraction`` limits (:class:`~dedup_batch.errors.SafetyError`).
2. **Deterministic batches** of at most ``batch_size`` paths: clusters in order of their first
   duplicate's path, a cluster never split unless it is larger than a batch, paths sorted inside
   a batch. Batch ids depend only on the plan and ``batch_size``, so a re-run finds its journal.
3. **One task per batch** on the Dask workers (or a local thread pool), at most ``concurrency``
   in flight. A task: reads the current state of the batch's objects and keepers (S3: ranged
   listings of keys that lie close together, one HEAD otherwise), skips every duplicate whose
   keeper is gone (``skipped_keeper_missing``) or that changed since the plan (ETag, or size and
   mtime: ``skipped_changed``), reports absent ones as ``already_absent``, optionally copies the
   rest to the trash and verifies the copies, records them (with their checksums) in
   ``plan_dir/journal/moving-NNNNNN.json`` before deleting anything, deletes them by exact key
   (S3: DeleteObjects with per-key results and retries, see
   :meth:`~dedup_batch.storage.Store.delete_exact`), then writes
   ``plan_dir/journal/batch-NNNNNN.json`` atomically. Whatever happens after the copies (the
   process killed, a delete whose answer is lost, a keeper gone before a resume), every object
   that may have left its path has a verified copy that :func:`restore` finds.
4. **Resume**: finished batches (every path deleted, trashed or already absent) are skipped; the
   rest are run again, which is safe because every step is idempotent (a task may also run
   twice when a Dask worker dies). At the end ``plan_dir/completion-report.csv`` lists every
   path of the delete set with ``path,status,error_code,message``.

Statuses: ``deleted``, ``trashed``, ``already_absent`` (done); ``skipped_keeper_missing``,
``skipped_changed``, ``failed`` (not done: ``ApplyResult.ok`` is False, the CLI exits 4);
``would_delete`` (dry run). :func:`restore` puts trashed objects back (``restored``,
``already_restored``; ``skipped_exists`` when a different object now sits at the original path,
``failed``).

The guard against deleting an object that changed since the plan is recorded as
``ApplyResult.guard``: ``"conditional+compare-then-delete"`` (S3 with ETags: the ETag is sent in
each ObjectIdentifier, and since moto and several S3-compatible stores ignore it there, it is
also compared just before deleting), ``"compare-then-delete"`` (size and mtime, or ETag, compared
before deleting: local files, memory://, S3 without ETags), ``"existence-only"`` (the plan has
no size, mtime or ETag).

Notes
-----
``memory://`` roots and plan directories live in one process: use them with ``client=None``.
Nothing here logs or writes storage options; error messages are scrubbed of secret values.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd

from .errors import (
    ConfigError,
    DedupError,
    IncompleteError,
    InputError,
    SafetyError,
    ScopeError,
    StorageError,
)
from .executor import DEFAULT_THREADS, run_tasks, total_threads
from .plandir import (
    COMPLETION_REPORT,
    JOURNAL_DIR,
    MANIFEST_FILE,
    RESTORE_REPORT,
    WOULD_DELETE_REPORT,
    PlanDir,
)
from .storage import ObjectStat, Store, md5_of_etag, trash_key

if TYPE_CHECKING:
    import distributed

__all__ = [
    "DONE_APPLY",
    "DONE_RESTORE",
    "ApplyResult",
    "apply_plan",
    "restore",
]

log = logging.getLogger(__name__)

JOURNAL_VERSION = 1
#: A delete request that failed as a whole after it was sent: its objects may be gone or not.
DELETE_UNANSWERED = "DeleteUnanswered"
#: Codes of paths whose whole request failed (the store down, or refusing us).
_WHOLE_REQUEST = frozenset({"RequestFailed", DELETE_UNANSWERED})

DELETED = "deleted"
TRASHED = "trashed"
ALREADY_ABSENT = "already_absent"
SKIPPED_KEEPER_MISSING = "skipped_keeper_missing"
SKIPPED_KEEPER_CHANGED = "skipped_keeper_changed"
SKIPPED_CHANGED = "skipped_changed"
SKIPPED_UNOBSERVED = "skipped_unobserved"
FAILED = "failed"
WOULD_DELETE = "would_delete"
RESTORED = "restored"
ALREADY_RESTORED = "already_restored"
SKIPPED_EXISTS = "skipped_exists"
WOULD_RESTORE = "would_restore"
#: Statuses after which an apply (restore) has nothing left to do for a path.
DONE_APPLY = frozenset({DELETED, TRASHED, ALREADY_ABSENT})
DONE_RESTORE = frozenset({RESTORED, ALREADY_RESTORED})

# Batches in flight on the local thread pool (client=None): executor.DEFAULT_THREADS.
#: With a Dask client: this many batches queued per worker thread, so no thread idles between
#: tasks, capped so that a large cluster does not exceed S3's per-prefix request rate.
TASKS_PER_WORKER_THREAD = 2
MAX_DEFAULT_CONCURRENCY = 64
#: Two keys of a batch are read with one S3 listing when at most this many other plan objects
#: lie between them in key order; a listed entry costs about 1/20 of a HEAD request, so this
#: keeps a listing never dearer than the HEADs it replaces.
LIST_GAP = 16
#: Non-done outcomes shown in ``ApplyResult.to_dict()`` (the full list is in the CSV report).
MAX_EXAMPLES = 20

_REPORT_COLUMNS = ["path", "status", "error_code", "message"]


class _Item(NamedTuple):
    """One path of the delete set, with what the plan saw of it and of its keeper."""

    path: str
    fs: str
    cluster: int
    keeper: str
    keeper_fs: str
    size: int | None
    mtime: float | None
    etag: str | None
    #: the keeper as the plan saw it: it must be unchanged before this path is deleted
    keeper_seen: ObjectStat | None = None

    @property
    def seen(self) -> ObjectStat:
        """This object as the plan saw it (kind None: a file or a link, as it was listed)."""
        return ObjectStat(
            self.size, math.nan if self.mtime is None else self.mtime, self.etag, None
        )


class _Record(NamedTuple):
    """One journal/report record of a path."""

    path: str
    status: str
    code: str = ""
    message: str = ""
    #: bytes deleted, trashed or restored
    bytes: int = 0
    #: ``"md5:<hex>"`` of the bytes moved to the trash (what restore must put back)
    checksum: str = ""


class _Batch(NamedTuple):
    id: int
    items: tuple[_Item, ...]
    #: paths to read together (see Store.stat_many): keys close in order, keepers included.
    groups: tuple[tuple[str, ...], ...]
    #: records of paths of this batch finished by an earlier run (kept in its journal file).
    prior: tuple[_Record, ...] = ()
    #: restore: the apply's ``trashed`` records of the batch's paths (size and checksum taken)
    took: tuple[_Record, ...] = ()


@dataclass
class ApplyResult:
    """What an apply (or restore) did.

    Attributes
    ----------
    plan_dir : str
        The plan directory.
    operation : str
        ``"apply"`` or ``"restore"``.
    dry_run : bool
        Nothing was touched; ``outcomes`` say what would be done.
    guard : str
        The change guard used (see the module docstring).
    trash : str or None
        The trash URL, if objects were moved there instead of deleted.
    planned : int
        Paths the plan deletes (restore: paths journaled as trashed).
    planned_bytes : int
        Their sizes from the plan, where known (bytes).
    counts : dict
        Number of paths per status.
    bytes_done : int
        Bytes deleted or trashed (restore: restored), from the sizes seen before acting.
    batches_total, batches_run, batches_skipped : int
        Batches in the plan, run now, skipped because the journal says they are finished.
    outcomes : DataFrame
        One row per path: ``path, status, error_code, message`` (sorted by path).
    report : str or None
        URL of the completion report written (None on a dry run).
    elapsed_s : float
        Wall time of the call (seconds).
    """

    plan_dir: str
    operation: str = "apply"
    dry_run: bool = False
    guard: str = "existence-only"
    trash: str | None = None
    planned: int = 0
    planned_bytes: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    bytes_done: int = 0
    batches_total: int = 0
    batches_run: int = 0
    batches_skipped: int = 0
    outcomes: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=_REPORT_COLUMNS))
    report: str | None = None
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        """False when any path was not done (skipped or failed): the CLI then exits 4."""
        done = DONE_RESTORE if self.operation == "restore" else DONE_APPLY
        done = done | {WOULD_DELETE, WOULD_RESTORE}
        return all(s in done for s in self.counts if self.counts[s])

    @property
    def not_done(self) -> int:
        """Number of paths skipped or failed."""
        done = DONE_RESTORE if self.operation == "restore" else DONE_APPLY
        done = done | {WOULD_DELETE, WOULD_RESTORE}
        return sum(n for s, n in self.counts.items() if s not in done)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary for ``summary.json`` (no per-path list beyond a few examples)."""
        done = DONE_RESTORE if self.operation == "restore" else DONE_APPLY
        bad = self.outcomes[~self.outcomes["status"].isin(done | {WOULD_DELETE, WOULD_RESTORE})]
        return {
            "operation": self.operation,
            "plan_dir": self.plan_dir,
            "dry_run": self.dry_run,
            "ok": self.ok,
            "guard": self.guard,
            "trash": self.trash,
            "planned": self.planned,
            "planned_bytes": self.planned_bytes,
            "counts": dict(sorted(self.counts.items())),
            "not_done": self.not_done,
            "bytes_done": self.bytes_done,
            "batches": {
                "total": self.batches_total,
                "run": self.batches_run,
                "skipped_finished": self.batches_skipped,
            },
            "report": self.report,
            "elapsed_s": round(self.elapsed_s, 3),
            "examples_not_done": bad.head(MAX_EXAMPLES).to_dict(orient="records"),
        }


# -- public API -------------------------------------------------------------------------------
def apply_plan(
    plan_dir: str,
    *,
    store: Store,
    dry_run: bool = False,
    max_delete: int | None = None,
    max_delete_fraction: float | None = None,
    trash: str | None = None,
    batch_size: int = 1000,
    concurrency: int | None = None,
    client: distributed.Client | None = None,
    plan_storage_options: Mapping[str, Any] | None = None,
) -> ApplyResult:
    """Delete (or move to ``trash``) the plan's duplicates.

    Parameters
    ----------
    plan_dir : str
        Local path or fsspec URL of the plan directory (holds ``plan.parquet`` or the
        ``plan/`` dataset).
    store : Store
        The job root: every plan path is resolved with ``store.resolve``.
    dry_run : bool, default False
        Touch nothing; the result says what would be deleted (counts and bytes).
    max_delete : int, optional
        Refuse (:class:`SafetyError`, nothing deleted) if the plan deletes more objects.
    max_delete_fraction : float, optional
        Refuse if the plan deletes more than this fraction of its rows.
    trash : str, optional
        URL to move objects to (``trash/<path relative to root>``), verified before deleting.
        Must not overlap the root. Opened with ``store``'s storage options when on the same
        protocol.
    batch_size : int, default 1000
        Paths per batch (1 to 1000: one S3 DeleteObjects request). A re-run uses the batch
        size recorded in the journal.
    concurrency : int, optional
        Batches in flight at once. Default: 2 per Dask worker thread (at most 64), or 8 on the
        local thread pool.
    client : distributed.Client, optional
        Run the batches as tasks on this cluster; ``None`` runs them on a local thread pool.
    plan_storage_options : mapping, optional
        fsspec options for ``plan_dir``; default: ``store``'s when on the same protocol.

    Returns
    -------
    ApplyResult
        ``.ok`` is False when any path was skipped or failed.

    Raises
    ------
    InputError
        No or unreadable plan, or malformed rows (the message names the row).
    ScopeError
        A plan path resolves outside the root (nothing is touched).
    SafetyError
        A limit is exceeded, the plan is structurally unsafe (a keeper in the delete set), or
        the journal belongs to another plan. Nothing is touched.
    StorageError
        The store cannot be reached or refuses whole requests; finished batches stay
        journaled and a re-run resumes.

    Notes
    -----
    Memory on the client: one part of the plan at a time (a few hundred bytes per row), 8
    bytes per row (the cross-part identity check) and one record per path to delete.
    Requests: per batch one DeleteObjects (S3), plus reading the state of its objects: about
    one listing per 1000 neighbouring keys, one HEAD per isolated key or keeper.
    """
    t0 = time.perf_counter()
    if not 1 <= int(batch_size) <= 1000:
        raise ConfigError(f"batch_size must be between 1 and 1000, got {batch_size}")
    pdir = PlanDir.beside(plan_dir, store, plan_storage_options)
    scan = _scan(pdir, store)
    plan_store = pdir.store()
    _check_limits(scan.planned + len(scan.unseen), scan.rows, max_delete, max_delete_fraction)
    trash_store = _trash_store(trash, store)
    manifest = _read_manifest(plan_store, scan.digest, trash_store, plan_dir, store=store)
    if manifest is not None and int(manifest["batch_size"]) != int(batch_size):
        log.info(
            "apply: resuming with the journal's batch size %s (asked for %s)",
            manifest["batch_size"],
            batch_size,
        )
        batch_size = int(manifest["batch_size"])
    journal = _load_journal(plan_store, "batch-", scan.digest) if manifest is not None else {}
    # what earlier runs recorded as moving to the trash, batch by batch (see _check_and_delete)
    intents = _load_journal(plan_store, "moving-", scan.digest) if manifest is not None else {}
    result = ApplyResult(
        plan_dir=plan_dir,
        dry_run=dry_run,
        guard=scan.guard,
        trash=trash,
        planned=scan.planned,
        planned_bytes=scan.planned_bytes,
    )
    records: dict[str, _Record] = {r.path: r for r in scan.unseen}
    log.info(
        "apply%s: %d object(s) to %s, plan in %d part(s) (guard: %s)",
        " (dry run)" if dry_run else "",
        scan.planned,
        "move to trash" if trash else "delete",
        scan.parts,
        result.guard,
    )
    todo = _todo_by_part(
        pdir,
        store,
        int(batch_size),
        scan.part_digests,
        journal,
        DONE_APPLY,
        records,
        result,
        select=lambda bs: [b._replace(took=tuple(intents.get(b.id, ()))) for b in bs],
    )
    if dry_run:
        would: list[_Item] = []
        for part in todo:
            _mark_would(part, records, DONE_APPLY, WOULD_DELETE)
            would.extend(it for b in part for it in b.items)
        report = _write_would_delete(plan_store, would)
        return _finish(result, records, report, t0)
    if scan.planned and manifest is None:
        manifest = {
            "version": JOURNAL_VERSION,
            "plan_digest": scan.digest,
            "batch_size": int(batch_size),
            "trash": trash_store.root if trash_store is not None else None,
            # Trashed objects go under a folder of their own per plan, never over another
            # plan's (or another run's) copies.
            "trash_scope": _new_trash_scope() if trash_store is not None else None,
            "root": _root_id(store),
            # where the trash and the root resolve, and through which endpoint: a resume or
            # a restore must find the same ones, however they are spelled then
            "trash_id": _root_id(trash_store) if trash_store is not None else None,
            "endpoint": _endpoint_id(store),
        }
        _write_json(plan_store, MANIFEST_FILE, manifest)
    scope = (manifest or {}).get("trash_scope")
    task_args = (store, plan_store, trash_store, scan.digest, scope)
    stopped = _run_and_record(todo, _apply_batch, task_args, client, concurrency, "apply", records)
    result.batches_run = stopped.batches_run
    report = _write_report(plan_store, COMPLETION_REPORT, records)
    if stopped.error is not None:
        _stop(stopped.error, records, DONE_APPLY - {ALREADY_ABSENT}, report)
    return _finish(result, records, report, t0)


def restore(
    plan_dir: str,
    *,
    store: Store,
    trash: str,
    client: distributed.Client | None = None,
    plan_storage_options: Mapping[str, Any] | None = None,
    dry_run: bool = False,
    concurrency: int | None = None,
) -> ApplyResult:
    """Put back the objects an apply moved to ``trash``, then remove them from the trash.

    Works from the apply journal (paths with status ``trashed``), in the same batches. Per
    path: copy ``trash/<relative path>`` back to the exact original path, verify it (size,
    ETag/MD5), delete the trash copy. A path where an object already exists again is left alone
    (``skipped_exists``) unless it is identical to the trash copy (a re-run after a crash
    between copying back and removing the copy), in which case the copy is removed. Journaled
    in ``journal/restore-NNNNNN.json``; report in ``plan_dir/restore-report.csv``. Re-running is
    safe and finishes the rest.

    Parameters and errors as :func:`apply_plan`; ``trash`` must be the URL the apply used.
    """
    t0 = time.perf_counter()
    pdir = PlanDir.beside(plan_dir, store, plan_storage_options)
    scan = _scan(pdir, store)
    plan_store = pdir.store()
    trash_store = _trash_store(trash, store)
    assert trash_store is not None
    manifest = _read_manifest(
        plan_store, scan.digest, trash_store, plan_dir, store=store, check_trash=False
    )
    if manifest is None:
        raise InputError(f"no apply journal in {plan_dir!r}: nothing was moved to the trash")
    if not _same_trash(manifest, trash_store):
        raise ConfigError(
            f"the apply in {plan_dir!r} used trash "
            f"{manifest.get('trash_id') or manifest.get('trash')!r}, not {trash!r} (here "
            f"{_root_id(trash_store)!r}): pass that trash URL"
        )
    applied = _load_journal(plan_store, "batch-", scan.digest)
    # Every object an apply may have taken from its path: what a batch recorded as moving to
    # the trash before deleting (a batch killed before its journal file, a delete whose answer
    # was lost, a keeper gone before the resume), then what the batches journaled as trashed.
    # Each with the checksum its verified copy had.
    moving = _load_journal(plan_store, "moving-", scan.digest)
    trashed = {r.path: r for recs in moving.values() for r in recs}
    trashed.update((r.path, r) for recs in applied.values() for r in recs if r.status == TRASHED)
    journal = _load_journal(plan_store, "restore-", scan.digest)
    result = ApplyResult(
        plan_dir=plan_dir,
        operation="restore",
        dry_run=dry_run,
        guard="compare-then-copy",
        trash=trash,
        planned=len(trashed),
    )
    records: dict[str, _Record] = {}
    log.info("restore: %d object(s), plan in %d part(s)", len(trashed), scan.parts)

    def to_restore(batches: list[_Batch]) -> list[_Batch]:
        """The apply's batches cut to the paths it took (same ids: the journal's)."""
        out = [
            _Batch(
                b.id,
                kept,
                tuple((it.fs,) for it in kept),
                took=tuple(trashed[i.path] for i in kept),
            )
            for b in batches
            if (kept := tuple(it for it in b.items if it.path in trashed))
        ]
        result.planned_bytes += sum(it.size or 0 for b in out for it in b.items)
        return out

    todo = _todo_by_part(
        pdir,
        store,
        int(manifest["batch_size"]),
        scan.part_digests,
        journal,
        DONE_RESTORE,
        records,
        result,
        select=to_restore,
    )
    if dry_run:
        for part in todo:
            _mark_would(part, records, DONE_RESTORE, WOULD_RESTORE)
        return _finish(result, records, None, t0)
    task_args = (store, plan_store, trash_store, scan.digest, manifest.get("trash_scope"))
    stopped = _run_and_record(
        todo, _restore_batch, task_args, client, concurrency, "restore", records
    )
    result.batches_run = stopped.batches_run
    report = _write_report(plan_store, RESTORE_REPORT, records)
    if stopped.error is not None:
        _stop(stopped.error, records, frozenset({RESTORED}), report)
    return _finish(result, records, report, t0)


class _Stopped(NamedTuple):
    batches_run: int
    #: the message of the whole-request failure that stopped the run, or None
    error: str | None


def _run_and_record(
    todo: Iterable[Sequence[_Batch]],
    fn: Callable[..., list[_Record]],
    args: tuple[Any, ...],
    client: distributed.Client | None,
    concurrency: int | None,
    what: str,
    records: dict[str, _Record],
) -> _Stopped:
    """Run the batches, part by part of the plan (``todo`` yields each part's batches),
    recording every path's outcome; stop early (``error`` set) when the first batches of this
    run all fail as whole requests: the store is down or refuses us, and every further batch
    would only wait for the same timeouts."""
    run = 0
    worked = False
    try:
        for part in todo:
            for _, recs in _run_batches(part, fn, args, client, concurrency, what):
                run += 1
                for r in recs:
                    records[r.path] = r
                down = bool(recs) and all(r.code in _WHOLE_REQUEST for r in recs)
                worked = worked or not down
                if down and not worked:
                    return _Stopped(run, recs[0].message)
    except Exception as exc:
        # A batch could not even journal itself (the plan directory is unreachable), or the
        # cluster lost it: its objects may be done, so exit 2's "nothing was deleted" would
        # not be true.
        detail = str(exc) if isinstance(exc, DedupError) else f"{type(exc).__name__}: {exc}"
        raise IncompleteError(
            f"{what} stopped: {detail}; objects of the batches in flight may already be done: "
            "re-run the same command to resume"
        ) from exc
    return _Stopped(run, None)


def _stop(message: str, records: Mapping[str, _Record], acted: frozenset[str], report: str) -> None:
    """Raise for a run stopped by a store that does not answer: exit 2 when nothing was ever
    done to any object of the plan, else exit 4 (the report lists what was done)."""
    hint = "re-run the same command to resume once the store answers"
    if any(r.status in acted for r in records.values()):
        raise IncompleteError(
            f"stopped: {message}; part of the plan was already done (see {report}): {hint}"
        )
    if any(r.code == DELETE_UNANSWERED for r in records.values()):
        raise IncompleteError(
            f"stopped: {message}; part of the plan may already be done (see {report}): {hint}"
        )
    raise StorageError(f"{message}; nothing was deleted or moved: {hint}")


# -- the tasks (run on workers) ---------------------------------------------------------------
def _apply_batch(
    store: Store,
    plan_store: Store,
    trash_store: Store | None,
    digest: str,
    scope: str | None,
    batch: _Batch,
) -> list[_Record]:
    """Check, (trash and) delete one batch; journal it. Idempotent: safe to run twice.

    Never raises for the state of one object or one failed request: every path of the batch
    gets a record (``failed`` with the reason where the store refused or could not be reached),
    so that one bad object or a flaky endpoint never stops the rest of the apply.
    """

    def moving(records: list[_Record]) -> None:
        _write_json(
            plan_store,
            f"{JOURNAL_DIR}/moving-{batch.id:06d}.json",
            {
                "version": JOURNAL_VERSION,
                "plan_digest": digest,
                "batch": batch.id,
                "records": records,
            },
        )
        # a restore of this batch (after an earlier run was stopped) is void once its objects
        # are moved again: the next restore must look at them afresh, not trust its journal
        plan_store.delete_exact([plan_store.resolve(f"{JOURNAL_DIR}/restore-{batch.id:06d}.json")])

    check = functools.partial(_check_and_delete, moving=moving)
    out = _every_path(check, store, trash_store, scope, batch)
    return _journal(plan_store, "batch", digest, batch, [out[it.path] for it in batch.items])


def _every_path(
    fn: Callable[..., None], store: Store, other: Store | None, scope: str | None, batch: _Batch
) -> dict[str, _Record]:
    """``fn(store, other, scope, batch, out)``'s records, one per path of the batch: when a
    whole request fails, the paths not yet decided are ``failed`` with its reason."""
    out: dict[str, _Record] = {}
    try:
        fn(store, other, scope, batch, out)
    except Exception as exc:  # a whole request failed: report the batch's rest, go on
        msg = _failure(store, exc)
        for it in batch.items:
            if it.path not in out:
                out[it.path] = _Record(it.path, FAILED, "RequestFailed", msg)
    return out


def _failure(store: Store, exc: BaseException) -> str:
    """A failed whole request's reason as a path's record gives it: one line, no secrets."""
    msg = str(exc) if isinstance(exc, DedupError) else f"{type(exc).__name__}: {exc}"
    return store._scrub(" ".join(msg.split()))


def _check_and_delete(
    store: Store,
    trash_store: Store | None,
    scope: str | None,
    batch: _Batch,
    out: dict[str, _Record],
    *,
    moving: Callable[[list[_Record]], None],
) -> None:
    """One batch's checks, copies to the trash and deletes, each path's record into ``out``.

    With a trash: the verified copies are recorded (``moving``: path, size, checksum, with
    those earlier runs recorded, ``batch.took``) before any delete is sent, so an object never
    leaves its path without a record of its copy. A resumed batch takes an object found
    absent and in the trash as trashed (a run that copied and deleted it, then died), whatever
    its keeper has become since, if the copy is what was recorded."""
    # S3 reports LastModified at different resolutions in HEAD and in listings: there the
    # ETag alone says whether an object changed.
    mtimes = not store.is_s3
    stats = store.stat_many(batch.groups)
    took = {r.path: r for r in batch.took}
    in_trash = {}
    if trash_store is not None:
        gone = [it for it in batch.items if stats.get(it.fs) is None]
        in_trash = _in_trash_many(store, trash_store, scope, gone, took) if gone else {}
    act: list[tuple[_Item, int]] = []
    for it in batch.items:
        cur = stats.get(it.fs)
        keeper = stats.get(it.keeper_fs)
        if it.path in in_trash:
            out[it.path] = in_trash[it.path]
            continue
        if keeper is None or keeper.kind not in ("file", "link"):
            out[it.path] = _Record(
                it.path,
                SKIPPED_KEEPER_MISSING,
                "KeeperMissing",
                f"keeper {it.keeper!r} not found: duplicate left alone",
            )
        elif it.keeper_seen is None or (
            why := it.keeper_seen.differs(keeper, compare_mtime=mtimes)
        ):
            out[it.path] = _Record(
                it.path,
                SKIPPED_KEEPER_CHANGED,
                "KeeperChanged",
                f"keeper {it.keeper!r} is not the object the plan saw "
                f"({why or 'not observed at plan time'}): duplicate left alone",
            )
        elif cur is None:
            out[it.path] = _Record(
                it.path, ALREADY_ABSENT, "NoSuchKey", "not found before deleting"
            )
        elif (why := it.seen.differs(cur, compare_mtime=mtimes)) is not None:
            out[it.path] = _Record(it.path, SKIPPED_CHANGED, "Changed", why)
        elif trash_store is not None and cur.kind == "link":
            out[it.path] = _Record(
                it.path,
                SKIPPED_CHANGED,
                "SymbolicLink",
                "a symbolic link is not moved to the trash: left alone",
            )
        else:
            act.append((it, int(cur.size or 0)))
    sums: dict[str, str] = {}
    if trash_store is not None:
        copied = []
        for it, size in act:
            dst = _trash_path(store, trash_store, scope, it)
            r = store.copy_exact(it.fs, trash_store, dst)
            if r.status == "exists" and _same_object(store, it.fs, trash_store, dst):
                # An earlier run of this task copied it and stopped before deleting.
                r = r._replace(status="copied", checksum=trash_store.checksum(dst))
            if r.status == "copied":
                copied.append((it, size))
                sums[it.path] = r.checksum
            elif r.status == "absent":
                out[it.path] = _Record(it.path, ALREADY_ABSENT, r.code, "vanished before copying")
            elif r.status == "exists":
                out[it.path] = _Record(
                    it.path,
                    FAILED,
                    "TrashOccupied",
                    "a different object already lies at its trash location: left alone",
                )
            else:
                out[it.path] = _Record(it.path, FAILED, r.code, f"copy to trash: {r.message}")
        act = copied
        if act:
            now = {
                it.path: _Record(it.path, TRASHED, "", "moving to the trash", size, sums[it.path])
                for it, size in act
            }
            moving(list({**took, **now}.values()))
    done_status = TRASHED if trash_store is not None else DELETED
    try:
        results = store.delete_exact(
            [it.fs for it, _ in act],
            etags={it.fs: it.etag for it, _ in act if it.etag},
            expect={it.fs: it.seen for it, _ in act},
        )
    except Exception as exc:  # sent, but no answer: the objects may be gone or not
        msg = _failure(store, exc)
        for it, _ in act:
            out[it.path] = _Record(
                it.path,
                FAILED,
                DELETE_UNANSWERED,
                f"the delete request failed and may have been carried out: {msg}",
            )
        return
    for it, size in act:
        r = results[it.fs]
        if r.status == "deleted":
            out[it.path] = _Record(it.path, done_status, "", "", size, sums.get(it.path, ""))
        elif r.status == "already_absent":
            out[it.path] = _Record(it.path, ALREADY_ABSENT, r.code, "not found when deleting")
        elif r.status == "changed":
            out[it.path] = _Record(
                it.path,
                SKIPPED_CHANGED,
                r.code,
                r.message or "the store refused the conditional delete",
            )
        else:
            out[it.path] = _Record(it.path, FAILED, r.code, r.message)


def _restore_batch(
    store: Store,
    plan_store: Store,
    trash_store: Store,
    digest: str,
    scope: str | None,
    batch: _Batch,
) -> list[_Record]:
    """Copy one batch back from the trash and remove the trash copies; journal it.

    A trash copy goes back only if it is byte for byte what the apply took (its size and
    checksum as journaled), and never over an object that exists at the original path.
    """
    out = _every_path(_check_and_restore, store, trash_store, scope, batch)
    return _journal(plan_store, "restore", digest, batch, [out[it.path] for it in batch.items])


def _check_and_restore(
    store: Store,
    trash_store: Store,
    scope: str | None,
    batch: _Batch,
    out: dict[str, _Record],
) -> None:
    took = {r.path: r for r in batch.took}
    tpaths = {it.fs: _trash_path(store, trash_store, scope, it) for it in batch.items}
    orig = store.stat_many(batch.groups)
    intrash = trash_store.stat_many([(t,) for t in tpaths.values()])
    remove: list[tuple[_Item, int]] = []
    for it in batch.items:
        t = tpaths[it.fs]
        cur, tcur = orig.get(it.fs), intrash.get(t)
        rec = took.get(it.path)
        if tcur is None:
            if cur is not None and rec is not None and _matches(store, it.fs, cur, rec):
                out[it.path] = _Record(it.path, ALREADY_RESTORED, "", "")
            else:
                out[it.path] = _Record(
                    it.path,
                    FAILED,
                    "TrashMissing",
                    "the trash copy is gone and the original is not back",
                )
        elif rec is None or not _matches(trash_store, t, tcur, rec):
            out[it.path] = _Record(
                it.path,
                FAILED,
                "TrashChanged",
                "the trash copy is not what the apply took (size or checksum differ): left alone",
            )
        elif cur is not None:
            if _same_object(store, it.fs, trash_store, t):
                remove.append((it, int(tcur.size or 0)))
            else:
                out[it.path] = _Record(
                    it.path,
                    SKIPPED_EXISTS,
                    "ObjectExists",
                    "a different object now exists at the path: trash copy kept",
                )
        else:
            # streamed, written only where nothing is (If-None-Match): an object the user
            # uploads there meanwhile is never overwritten
            r = trash_store.copy_exact(t, store, it.fs, server_side=False)
            if r.status == "copied" or (
                r.status == "exists" and _same_object(store, it.fs, trash_store, t)
            ):
                remove.append((it, int(tcur.size or 0)))
            elif r.status == "exists":
                out[it.path] = _Record(
                    it.path,
                    SKIPPED_EXISTS,
                    "ObjectExists",
                    "a different object appeared at the path: trash copy kept",
                )
            else:
                out[it.path] = _Record(it.path, FAILED, r.code, f"copy back: {r.message}")
    results = trash_store.delete_exact([tpaths[it.fs] for it, _ in remove])
    for it, size in remove:
        r = results[tpaths[it.fs]]
        if r.status in ("deleted", "already_absent"):
            out[it.path] = _Record(it.path, RESTORED, "", "", size)
        else:
            out[it.path] = _Record(
                it.path,
                FAILED,
                r.code,
                f"restored, but the trash copy was not removed: {r.message}",
            )


def _mark_would(
    todo: Sequence[_Batch], records: dict[str, _Record], done: frozenset[str], status: str
) -> None:
    """Dry run: record ``status`` (would delete / restore) for every path not already done."""
    for b in todo:
        for it in b.items:
            if it.path not in records or records[it.path].status not in done:
                records[it.path] = _Record(it.path, status, "", "", it.size or 0)


def _journal(
    plan_store: Store, kind: str, digest: str, batch: _Batch, records: list[_Record]
) -> list[_Record]:
    """Write one finished batch's records (with those of earlier runs) to the journal."""
    _write_json(
        plan_store,
        f"{JOURNAL_DIR}/{kind}-{batch.id:06d}.json",
        {
            "version": JOURNAL_VERSION,
            "plan_digest": digest,
            "batch": batch.id,
            "records": [*batch.prior, *records],
        },
    )
    return records


def _new_trash_scope() -> str:
    """A folder name under the trash URL for one plan's apply: sortable and unique."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def _trash_path(store: Store, trash_store: Store, scope: str | None, it: _Item) -> str:
    """Where ``it`` lies in the trash: ``<trash>/<scope>/<trash_key(path)>`` (journals written
    before trash scopes: ``<trash>/<path>``)."""
    rel = store.relative(it.fs)
    if scope is None:
        return trash_store.resolve(rel)
    return trash_store.resolve(f"{scope}/{trash_key(rel)}")


def _in_trash_many(
    store: Store,
    trash_store: Store,
    scope: str | None,
    items: Sequence[_Item],
    took: Mapping[str, _Record],
) -> dict[str, _Record]:
    """The ``trashed`` records of those of ``items`` that this plan's trash folder holds as
    they were taken (a task that copied and deleted them, then died before journaling), by
    path; one listing request for all. ``took``: the copies recorded before the deletes
    (size and checksum): a copy must match its record. Without one (journals written before
    those records), as the plan saw the object (size, and an ETag's MD5)."""
    dst = {it.path: _trash_path(store, trash_store, scope, it) for it in items}
    stats = trash_store.stat_many([(p,) for p in dst.values()])
    out = {}
    for it in items:
        cur = stats.get(dst[it.path])
        if cur is None or cur.kind != "file":
            continue
        size = int(cur.size or 0)
        if (rec := took.get(it.path)) is not None:
            if size != int(rec.bytes) or trash_store.checksum(dst[it.path], cur) != rec.checksum:
                continue
            checksum = rec.checksum
        else:
            if it.size is not None and size != int(it.size):
                continue
            if it.etag and md5_of_etag(it.etag) and md5_of_etag(cur.etag) != md5_of_etag(it.etag):
                continue
            checksum = trash_store.checksum(dst[it.path], cur)
        out[it.path] = _Record(it.path, TRASHED, "", "already in the trash", size, checksum)
    return out


def _same_object(a: Store, pa: str, b: Store, pb: str) -> bool:
    """Whether the objects at ``pa`` (in ``a``) and ``pb`` (in ``b``) hold the same bytes."""
    sa = a.stat_many([(pa,)]).get(pa)
    sb = b.stat_many([(pb,)]).get(pb)
    if sa is None or sb is None or sa.kind != "file" or sb.kind != "file":
        return False
    return sa.size == sb.size and a.checksum(pa, sa) == b.checksum(pb, sb)


def _matches(store: Store, path: str, cur: ObjectStat, rec: _Record) -> bool:
    """Whether the object at ``path`` is what ``rec`` journaled (size, then checksum)."""
    if cur.kind != "file" or int(cur.size or 0) != int(rec.bytes):
        return False
    return not rec.checksum or store.checksum(path, cur) == rec.checksum


# -- running batches --------------------------------------------------------------------------
def _run_batches(
    batches: Sequence[_Batch],
    fn: Callable[..., list[_Record]],
    args: tuple[Any, ...],
    client: distributed.Client | None,
    concurrency: int | None,
    what: str,
) -> Iterator[tuple[_Batch, list[_Record]]]:
    """Run ``fn(*args, batch)`` for every batch, at most ``concurrency`` at once; yield results
    as they finish. On an error (or Ctrl-C) nothing new starts; batches already running finish
    (local pool) or are cancelled (Dask), and the error propagates."""
    if client is None:
        n = concurrency or DEFAULT_THREADS
    else:
        n = concurrency or min(
            MAX_DEFAULT_CONCURRENCY, TASKS_PER_WORKER_THREAD * total_threads(client)
        )
    t0 = time.perf_counter()
    tasks = run_tasks(fn, batches, *args, client=client, threads=n, max_in_flight=n, name=what)
    for done, (b, fut) in enumerate(tasks, start=1):
        recs = fut.result()
        _log_progress(what, done, len(batches), t0)
        yield b, recs


def _log_progress(what: str, done: int, total: int, t0: float) -> None:
    step = max(1, total // 10)
    if done == total or done % step == 0:
        rate = done / max(time.perf_counter() - t0, 1e-9)
        log.info("%s: %d/%d batches (%.1f batches/s)", what, done, total, rate)


# -- plan, checks, batches --------------------------------------------------------------------
class _Scan(NamedTuple):
    """What the first pass over the plan's parts found (the plan itself is not kept)."""

    rows: int
    parts: int
    #: rows to delete that were checked and will be acted on, and their sizes (bytes)
    planned: int
    planned_bytes: int
    #: ``skipped_unobserved`` records (rows to delete that the plan never saw)
    unseen: list[_Record]
    #: fingerprint of the delete set, and of each part's (checked again when it is run)
    digest: str
    part_digests: list[str]
    guard: str


def _scan(pdir: PlanDir, store: Store) -> _Scan:
    """Check every part of the plan and fingerprint its delete set, before anything is done.

    One part is held at a time. Across parts, every path's identity (``store.resolve``) must
    be new: a cluster never spans parts (``PlanDir.plan_parts`` checks it), so the per-part
    checks of :func:`_delete_set` plus this one are the whole-plan checks. Memory: 8 bytes a
    row (a 64-bit hash of each identity; a collision refuses the plan, never deletes more).
    """
    whole = hashlib.sha256()
    part_digests: list[str] = []
    seen = np.empty(0, dtype=np.uint64)
    rows = planned = planned_bytes = 0
    unseen: list[_Record] = []
    etag = version = False
    for part in pdir.plan_parts():
        items, resolved, skipped = _delete_set(part, store)
        ids = np.fromiter(
            (int.from_bytes(hashlib.blake2b(f.encode(), digest_size=8).digest()) for f in resolved),
            dtype=np.uint64,
            count=len(resolved),
        )
        again = np.flatnonzero(np.isin(ids, seen))
        if len(again):
            i = int(again[0])
            raise SafetyError(
                f"{_where(part)} row {i}: path {part['path'].iloc[i]!r} names the same object as "
                "a row of an earlier part; nothing was deleted: re-run `dedup-batch plan`"
            )
        seen = np.union1d(seen, ids)
        own = hashlib.sha256()
        for h in (whole, own):
            _digest_update(h, items)
        part_digests.append(own.hexdigest())
        # the share a limit weighs is of the objects there are: rows the plan found no
        # object for (exists = false) would dilute it (9,000 missing rows and 1,000 images,
        # 900 of them deleted, is 9% of the rows and 90% of the images)
        rows += int(part["exists"].astype(bool).sum()) if "exists" in part.columns else len(part)
        planned += len(items)
        planned_bytes += sum(it.size or 0 for it in items)
        unseen += skipped
        etag = etag or any(it.etag for it in items)
        version = version or any(
            it.etag or it.size is not None or it.mtime is not None for it in items
        )
    guard = "existence-only"
    if store.is_s3 and etag:
        guard = "conditional+compare-then-delete"
    elif version:
        guard = "compare-then-delete"
    return _Scan(
        rows,
        len(part_digests),
        planned,
        planned_bytes,
        unseen,
        whole.hexdigest(),
        part_digests,
        guard,
    )


def _todo_by_part(
    pdir: PlanDir,
    store: Store,
    batch_size: int,
    digests: Sequence[str],
    journal: Mapping[int, list[_Record]],
    done: frozenset[str],
    records: dict[str, _Record],
    result: ApplyResult,
    *,
    select: Callable[[list[_Batch]], list[_Batch]] | None = None,
) -> Iterator[list[_Batch]]:
    """Second pass: each part's batches still to run, one part at a time.

    Batch ids continue from part to part, so they depend only on the plan and
    ``batch_size`` (a one-file plan's are those of the whole plan, as before parts existed).
    Records already final in ``journal`` go into ``records``; ``result``'s batch counts grow
    as parts are read. A part that differs from what :func:`_scan` checked (the plan was
    rewritten meanwhile) raises :class:`SafetyError` before any of its batches runs.
    """
    first = 0
    for k, part in enumerate(pdir.plan_parts()):
        items, resolved, _ = _delete_set(part, store)
        own = hashlib.sha256()
        _digest_update(own, items)
        if k >= len(digests) or own.hexdigest() != digests[k]:
            raise SafetyError(
                f"{_where(part)} changed while it was being applied; nothing more was "
                "deleted: re-run the same command to resume with the plan as it is now"
            )
        batches = _make_batches(items, batch_size, resolved if store.is_s3 else None, first=first)
        first += len(batches)
        if select is not None:
            batches = select(batches)
        todo, finished = _split_done(batches, journal, done)
        records.update(finished)
        result.batches_total += len(batches)
        result.batches_skipped += len(batches) - len(todo)
        yield todo


def _trash_store(trash: str | None, store: Store) -> Store | None:
    if trash is None:
        return None
    probe = Store(trash)
    same = bool(set(probe.protocols) & set(store.protocols))
    ts = Store(trash, store.storage_options) if same and not store.is_local else probe
    if same:
        a = store.root_path.rstrip("/") + "/"
        b = ts.root_path.rstrip("/") + "/"
        if a.startswith(b) or b.startswith(a):
            raise ConfigError(
                f"trash {trash!r} overlaps root {store.root!r}: choose a trash location "
                "outside the root that does not contain it"
            )
    return ts


def _delete_set(plan: pd.DataFrame, store: Store) -> tuple[list[_Item], list[str], list[_Record]]:
    """The delete set, structurally checked and resolved; every plan path resolved; and the
    ``skipped_unobserved`` records of rows to delete that the plan never saw.

    Only what was seen is deleted: a row is deleted only if the plan recorded its object
    (``exists``, a size, and an ETag or a modification time) and the same of its keeper, so
    that each can be compared with what is there at apply time. Plans written by this version
    never mark other rows for deletion; older plans may, and those rows are left alone here.
    """
    where = _where(plan)
    paths = plan["path"].astype(str).to_numpy()
    keep = plan["keep"].astype(bool).to_numpy()
    cluster = plan["cluster"].astype("int64").to_numpy()
    keeper = plan["keeper"].to_numpy()
    dup = pd.Series(paths).duplicated(keep=False).to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise InputError(f"{where} row {i}: path {paths[i]!r} is listed more than once")
    resolved = []
    for i, p in enumerate(paths):
        try:
            resolved.append(store.resolve(p, real=False))
        except ScopeError as exc:
            raise ScopeError(f"{where} row {i}: {exc}; nothing was deleted") from None
    fs_of = dict(zip(paths, resolved, strict=True))
    same = pd.Series(resolved).duplicated(keep=False).to_numpy()
    if same.any():
        i = int(np.flatnonzero(same)[0])
        raise InputError(
            f"{where} row {i}: path {paths[i]!r} names the same object as another row; "
            "write each path once"
        )
    row_of = {p: i for i, p in enumerate(paths)}
    kept = {p for p, k in zip(paths, keep, strict=True) if k}
    keepers = {str(k) for k in keeper if isinstance(k, str)}
    items: list[_Item] = []
    unseen: list[_Record] = []
    sizes = plan["size"] if "size" in plan.columns else None
    mtimes = plan["mtime"] if "mtime" in plan.columns else None
    etags = plan["etag"] if "etag" in plan.columns else None
    exists = plan["exists"].astype(bool).to_numpy() if "exists" in plan.columns else None

    def seen(i: int) -> ObjectStat | None:
        size, mtime, etag = _opt_int(sizes, i), _opt_float(mtimes, i), _opt_str(etags, i)
        if (exists is not None and not exists[i]) or size is None or (etag is mtime is None):
            return None
        return ObjectStat(size, math.nan if mtime is None else mtime, etag, None)

    for i in np.flatnonzero(~keep & (cluster != -1)):
        p, k = paths[i], keeper[i]
        if not isinstance(k, str) or not k:
            raise SafetyError(f"{where} row {i}: {p!r} is to be deleted but has no keeper")
        if p in kept or p in keepers or p == k:
            raise SafetyError(
                f"{where} row {i}: {p!r} is both to be deleted and a keeper; the plan is "
                "inconsistent, nothing was deleted: re-run `dedup-batch plan`"
            )
        j = row_of.get(k)
        if j is None or not keep[j]:
            raise SafetyError(
                f"{where} row {i}: keeper {k!r} of {p!r} is not a kept row of the plan; "
                "nothing was deleted: re-run `dedup-batch plan`"
            )
        if cluster[j] != cluster[i]:
            raise SafetyError(
                f"{where} row {i}: keeper {k!r} is in cluster {cluster[j]}, not {cluster[i]}; "
                "nothing was deleted: re-run `dedup-batch plan`"
            )
        mine, theirs = seen(int(i)), seen(int(j))
        if mine is None or theirs is None:
            who = "it" if mine is None else f"its keeper {k!r}"
            unseen.append(
                _Record(
                    p,
                    SKIPPED_UNOBSERVED,
                    "NotObserved",
                    f"the plan did not see {who} (missing, or no size and version): left alone",
                )
            )
            continue
        items.append(
            _Item(
                path=p,
                fs=fs_of[p],
                cluster=int(cluster[i]),
                keeper=k,
                keeper_fs=fs_of[k],
                size=mine.size,
                mtime=None if math.isnan(mine.mtime) else mine.mtime,
                etag=mine.etag,
                keeper_seen=theirs._replace(kind="file"),
            )
        )
    return items, resolved, unseen


def _where(part: pd.DataFrame) -> str:
    """How error messages name a plan part: ``plan`` for ``plan.parquet`` (as before parts
    existed), else the part's file name."""
    return str(part.attrs.get("name", "plan"))


def _opt_int(col: pd.Series | None, i: int) -> int | None:
    if col is None or pd.isna(col.iloc[i]):
        return None
    return int(col.iloc[i])


def _opt_float(col: pd.Series | None, i: int) -> float | None:
    if col is None or pd.isna(col.iloc[i]):
        return None
    return float(col.iloc[i])


def _opt_str(col: pd.Series | None, i: int) -> str | None:
    if col is None or pd.isna(col.iloc[i]) or not str(col.iloc[i]):
        return None
    return str(col.iloc[i])


def _check_limits(n: int, total: int, max_delete: int | None, fraction: float | None) -> None:
    if max_delete is not None and n > max_delete:
        raise SafetyError(
            f"the plan deletes {n} objects, more than max_delete={max_delete}; nothing was "
            "deleted: review the plan or raise --max-delete"
        )
    if fraction is not None and total and n / total > fraction:
        raise SafetyError(
            f"the plan deletes {n} of {total} objects ({n / total:.1%}), more than "
            f"max_delete_fraction={fraction:g}; nothing was deleted: review the plan or raise "
            "--max-delete-fraction"
        )


def _digest_update(h: Any, items: Sequence[_Item]) -> None:
    """Add a part's delete set to the plan's fingerprint ``h`` (a hashlib object): a journal
    only ever resumes the plan it was made for. A one-file plan's is the fingerprint of its
    whole delete set, sorted by path."""
    for it in sorted(items, key=lambda x: x.path):
        h.update(f"{it.path}\t{it.keeper}\t{it.etag or ''}\t{it.size}\n".encode())


def _make_batches(
    items: Sequence[_Item], batch_size: int, all_fs: Sequence[str] | None, *, first: int = 0
) -> list[_Batch]:
    """Pack whole clusters into batches of at most ``batch_size`` paths, deterministically.

    Clusters go in order of their first duplicate's path; a cluster that does not fit in the
    current batch starts a new one; one larger than a batch fills whole batches and its rest
    continues into the next. ``all_fs`` (every plan path, resolved; S3 only) tells which keys
    lie close together in key order so they can be read with one listing (in a dataset plan:
    the part's paths, so a listing may cover objects of other parts too: more entries read,
    never fewer objects checked). Ids start at ``first``.
    """
    by_cluster: dict[str, list[_Item]] = {}
    for it in items:
        by_cluster.setdefault(it.keeper, []).append(it)
    groups = sorted(
        (sorted(v, key=lambda x: x.path) for v in by_cluster.values()), key=lambda v: v[0].path
    )
    raw: list[list[_Item]] = []
    cur: list[_Item] = []
    for g in groups:
        if len(cur) + len(g) > batch_size and cur and len(g) <= batch_size:
            raw.append(cur)
            cur = []
        for it in g:
            cur.append(it)
            if len(cur) == batch_size:
                raw.append(cur)
                cur = []
    if cur:
        raw.append(cur)
    order = np.sort(np.asarray(all_fs, dtype=object)) if all_fs is not None else None
    out = []
    for i, b in enumerate(raw):
        b.sort(key=lambda x: x.path)
        out.append(_Batch(first + i, tuple(b), _read_groups(b, order)))
    return out


def _read_groups(items: Sequence[_Item], order: np.ndarray | None) -> tuple[tuple[str, ...], ...]:
    keys = sorted({it.fs for it in items} | {it.keeper_fs for it in items})
    if order is None:
        return tuple((k,) for k in keys)
    # Python orders str by code point, which is also UTF-8 byte order: the order S3 lists in.
    ranks = np.searchsorted(order, np.asarray(keys, dtype=object))
    out: list[list[str]] = [[keys[0]]]
    for prev, k, r0, r1 in zip(keys, keys[1:], ranks, ranks[1:], strict=False):
        if r1 - r0 - 1 <= LIST_GAP and prev.split("/", 1)[0] == k.split("/", 1)[0]:
            out[-1].append(k)
        else:
            out.append([k])
    return tuple(tuple(n) for g in out for n in _narrow(g, order))


def _narrow(keys: list[str], order: np.ndarray) -> list[list[str]]:
    """Split a group whose common prefix covers far more objects than its key range.

    A listing reads ``Prefix`` = the group's common prefix from just before its first key;
    some servers (moto, several S3-compatible stores) scan everything under the prefix for
    each page, so a group is split by the next character after the prefix until the prefix
    holds at most about twice the objects of the range (counted in the plan).
    """
    if len(keys) < 2:
        return [keys]
    prefix = os.path.commonprefix([keys[0], keys[-1]])  # noqa: RUF071 (characters wanted)
    lo, hi = np.searchsorted(order, np.asarray([keys[0], keys[-1]], dtype=object))
    first = np.searchsorted(order, prefix)
    end = np.searchsorted(order, prefix + "\U0010ffff")
    if end - first <= 2 * (hi - lo + 1) + LIST_GAP:
        return [keys]
    parts: dict[str, list[str]] = {}
    for k in keys:
        parts.setdefault(k[len(prefix) : len(prefix) + 1], []).append(k)
    return [n for part in parts.values() for n in _narrow(part, order)]


# -- journal and report -----------------------------------------------------------------------
def _write_json(plan_store: Store, rel: str, obj: Any) -> None:
    plan_store.write_bytes(plan_store.resolve(rel), json.dumps(obj, ensure_ascii=False).encode())


def _root_id(store: Store) -> str:
    """The root as a journal records it: its canonical URL, without secrets."""
    return store._scrub(store.url(store.root_path))


def _endpoint_id(store: Store) -> str | None:
    """The endpoint an S3 store's requests go to (without secrets), None elsewhere: one
    bucket name on two endpoints (a mirror, a MinIO beside AWS) is two roots."""
    if not store.is_s3:
        return None
    return store._scrub(str(store.fs.s3.meta.endpoint_url))


def _same_trash(manifest: Mapping[str, Any], trash_store: Store | None) -> bool:
    """Whether ``trash_store`` is the trash the journaled apply used: compared where it
    resolves (``trash_id``: a relative trash from another working folder is another trash),
    or as spelled for journals written before that was recorded."""
    if "trash_id" in manifest:
        return manifest["trash_id"] == (_root_id(trash_store) if trash_store else None)
    return manifest.get("trash") == (trash_store.root if trash_store is not None else None)


def _read_manifest(
    plan_store: Store,
    digest: str,
    trash_store: Store | None,
    plan_dir: str,
    *,
    store: Store,
    check_trash: bool = True,
) -> dict[str, Any] | None:
    data = plan_store.read_bytes(plan_store.resolve(MANIFEST_FILE))
    if data is None:
        return None
    try:
        manifest = json.loads(data)
    except ValueError:
        raise InputError(
            f"{plan_dir}/{MANIFEST_FILE} is corrupt: move the journal folder away to start over"
        ) from None
    if manifest.get("plan_digest") != digest:
        raise SafetyError(
            f"the journal in {plan_dir}/{JOURNAL_DIR} belongs to another plan (the plan changed "
            "after an apply started); nothing was deleted: use a new plan directory"
        )
    recorded = manifest.get("root")
    if recorded is not None and recorded != _root_id(store):
        # The same plan digest under another root (a backup copy, another bucket) would
        # delete there objects this plan never listed. Compared as the root resolves now,
        # never as it is spelled: the same spelling may lead elsewhere since the journal began
        # (a root that has become a link to a backup copy).
        raise SafetyError(
            f"the journal in {plan_dir}/{JOURNAL_DIR} was written for root {recorded!r}, not "
            f"{_root_id(store)!r}; nothing was deleted: resume with the plan's root (see "
            "job.yaml), or make a new plan for this root"
        )
    if manifest.get("endpoint") is not None and manifest["endpoint"] != _endpoint_id(store):
        raise SafetyError(
            f"the journal in {plan_dir}/{JOURNAL_DIR} was written for {recorded!r} at endpoint "
            f"{manifest['endpoint']!r}, not {_endpoint_id(store)!r}; nothing was deleted: "
            "resume with the plan's endpoint, or make a new plan for this one"
        )
    if check_trash and not _same_trash(manifest, trash_store):
        # Finishing a trashed run without the trash (or the other way round) would leave part
        # of the duplicates restorable and part gone for good.
        raise SafetyError(
            f"the apply journaled in {plan_dir} used trash="
            f"{manifest.get('trash_id') or manifest.get('trash')!r}; re-run with the same trash "
            "setting"
        )
    return manifest


def _load_journal(plan_store: Store, prefix: str, digest: str) -> dict[int, list[_Record]]:
    out: dict[int, list[_Record]] = {}
    folder = plan_store.resolve(JOURNAL_DIR)
    for full in plan_store.list_files(folder):
        name = full.rsplit("/", 1)[-1]
        if not (name.startswith(prefix) and name.endswith(".json")):
            continue
        data = plan_store.read_bytes(full)
        try:
            rec = json.loads(data or b"")
        except ValueError:
            # Writes are atomic, so this is damage from outside: redo that batch.
            log.warning("journal: ignoring unreadable %s (that batch will run again)", name)
            continue
        if rec.get("plan_digest") != digest:
            continue
        out[int(rec["batch"])] = [_Record(*r) for r in rec["records"]]
    return out


def _split_done(
    batches: Sequence[_Batch], journal: Mapping[int, list[_Record]], done: Iterable[str]
) -> tuple[list[_Batch], dict[str, _Record]]:
    """Batches still to run (only their unfinished paths) and the records already final."""
    done = frozenset(done)
    records: dict[str, _Record] = {}
    todo = []
    for b in batches:
        prev = {r.path: r for r in journal.get(b.id, [])}
        rest = tuple(it for it in b.items if getattr(prev.get(it.path), "status", "") not in done)
        for it in b.items:
            if it.path in prev:
                records[it.path] = prev[it.path]
        if rest:
            if len(rest) == len(b.items):
                todo.append(b)
            else:
                again = {it.path for it in rest}
                kept = tuple(prev[it.path] for it in b.items if it.path not in again)
                todo.append(b._replace(items=rest, prior=kept))
    return todo, records


def _write_report(plan_store: Store, rel: str, records: Mapping[str, _Record]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(_REPORT_COLUMNS)
    for path in sorted(records):
        r = records[path]
        w.writerow([r.path, r.status, r.code, " ".join(str(r.message).split())])
    full = plan_store.resolve(rel)
    plan_store.write_bytes(full, buf.getvalue().encode("utf-8"))
    return plan_store.url(full)


def _write_would_delete(plan_store: Store, items: Sequence[_Item]) -> str:
    """``would-delete.csv``: what an apply would delete now (``path,keeper,cluster,size``)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "keeper", "cluster", "size"])
    for it in sorted(items, key=lambda x: (x.cluster, x.path)):
        w.writerow([it.path, it.keeper, it.cluster, "" if it.size is None else it.size])
    full = plan_store.resolve(WOULD_DELETE_REPORT)
    plan_store.write_bytes(full, buf.getvalue().encode("utf-8"))
    return plan_store.url(full)


def _finish(
    result: ApplyResult, records: Mapping[str, _Record], report: str | None, t0: float
) -> ApplyResult:
    rows = [tuple(records[p])[:4] for p in sorted(records)]
    result.outcomes = pd.DataFrame(rows, columns=_REPORT_COLUMNS)
    counts: dict[str, int] = {}
    for r in records.values():
        counts[r.status] = counts.get(r.status, 0) + 1
    result.counts = counts
    result.bytes_done = sum(
        int(r.bytes) for r in records.values() if r.status in (DELETED, TRASHED, RESTORED)
    )
    result.report = report
    result.elapsed_s = time.perf_counter() - t0
    level = logging.INFO if result.ok else logging.WARNING
    log.log(
        level,
        "%s%s: %s",
        result.operation,
        " (dry run)" if result.dry_run else "",
        ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "nothing to do",
    )
    return result
