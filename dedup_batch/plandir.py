"""The plan directory: the one owner of its file names, formats and schema checks.

A plan directory (``--out``: a local folder or any fsspec URL) holds

* the plan (one row per feature path; see docs/architecture.md), in one of two layouts:
  ``plan.parquet`` (one file: every plan up to :data:`PART_ROWS` rows) or the dataset
  ``plan/part-NNNNN.parquet`` + ``plan/_parts.json`` (larger plans; each part holds whole
  clusters, so every per-cluster invariant of apply holds within one part);
* ``summary.json``: counts, timings, warnings, and the ``report``/``apply``/``sweep`` entries;
* ``job.yaml``: the resolved job spec, secrets redacted;
* ``journal/``: apply's ``manifest.json`` and one record file per finished batch;
* ``completion-report.csv``, ``restore-report.csv``, ``would-delete.csv``: apply's reports;
* ``report.html`` (``report-N.html``) and ``sweep/``.

Every module that reads or writes one of these goes through :class:`PlanDir`, so a file's name,
its parsing and its error messages exist once. Writes are whole-file and atomic (see
:func:`dedup_batch.storage.write_url`): a reader sees the old file or the new one, never half.
A dataset is complete only once its ``_parts.json`` is written (last, after every part): a
reader reads the parts it lists and nothing else, so a half-written dataset or a part left
over from an earlier plan is never read.
"""

from __future__ import annotations

import io
import itertools
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import yaml

from . import storage
from .errors import InputError, one_line

__all__ = [
    "COMPLETION_REPORT",
    "JOB_FILE",
    "JOURNAL_DIR",
    "MANIFEST_FILE",
    "PARTS_FILE",
    "PART_NAME",
    "PART_ROWS",
    "PLAN_DATASET",
    "PLAN_FILE",
    "REPORT_FILE",
    "REQUIRED_COLUMNS",
    "RESTORE_REPORT",
    "SUMMARY_FILE",
    "SWEEP_DIR",
    "WOULD_DELETE_REPORT",
    "PlanCounts",
    "PlanDir",
]

PLAN_FILE = "plan.parquet"
SUMMARY_FILE = "summary.json"
JOB_FILE = "job.yaml"
JOURNAL_DIR = "journal"
MANIFEST_FILE = f"{JOURNAL_DIR}/manifest.json"
COMPLETION_REPORT = "completion-report.csv"
RESTORE_REPORT = "restore-report.csv"
WOULD_DELETE_REPORT = "would-delete.csv"
REPORT_FILE = "report.html"
SWEEP_DIR = "sweep"
#: Columns every plan has: older plans may lack the others of ``select.PLAN_COLUMNS`` (the
#: full list, which the select stage writes), and readers show what they have.
REQUIRED_COLUMNS = ("path", "cluster", "keep", "keeper")
#: The plan as a dataset: a folder of parts and the list of them, written last.
PLAN_DATASET = "plan"
PARTS_FILE = f"{PLAN_DATASET}/_parts.json"
#: Plans of more rows than this are written as a dataset of parts of about this many rows
#: (whole clusters each): a part is ~200 bytes a row in pandas, so ~200 MB to read, where the
#: whole plan of 100M rows would be 20 GB. Read when a plan is written, so a test can lower it.
PART_ROWS = 1_000_000
#: The names of a dataset's parts (:meth:`PlanDir.write_part`): the only files in ``plan/``,
#: besides ``_parts.json``, that a plan replaces or removes.
PART_NAME = re.compile(r"part-[0-9]{5,}\.parquet")
_PARTS_VERSION = 1


@dataclass
class PlanCounts:
    """Counts of a plan, summed over its parts (exact because a cluster never spans parts).

    Attributes
    ----------
    paths, noise, keep, delete, missing : int
        Rows; rows of cluster -1; kept rows; rows to delete; rows whose object was not found
        at plan time (``exists`` False; 0 for plans without the column).
    reclaimable_bytes : int
        Sum of the sizes of the rows to delete (unknown sizes count 0).
    sizes : Counter
        Cluster size -> number of clusters of that size (noise aside). Memory: one entry per
        distinct size, not per cluster.
    """

    paths: int = 0
    noise: int = 0
    keep: int = 0
    delete: int = 0
    missing: int = 0
    reclaimable_bytes: int = 0
    sizes: Counter = field(default_factory=Counter)

    @classmethod
    def of(cls, part: pd.DataFrame) -> PlanCounts:
        """The counts of one part (or of a whole plan held in memory)."""
        keep = part["keep"].astype(bool).to_numpy()
        cluster = part["cluster"].to_numpy(dtype=np.int64)
        size = (
            pd.to_numeric(part["size"], errors="coerce").to_numpy(dtype="float64", na_value=0)
            if "size" in part
            else np.zeros(len(part))
        )
        per_cluster = np.unique(cluster[cluster >= 0], return_counts=True)[1]
        return cls(
            paths=len(part),
            noise=int((cluster < 0).sum()),
            keep=int(keep.sum()),
            delete=int((~keep).sum()),
            missing=int((~part["exists"].astype(bool)).sum()) if "exists" in part else 0,
            reclaimable_bytes=int(np.nan_to_num(size[~keep]).sum()),
            sizes=Counter(
                {
                    int(k): int(v)
                    for k, v in zip(*np.unique(per_cluster, return_counts=True), strict=True)
                }
            ),
        )

    @classmethod
    def total(cls, parts: Iterable[pd.DataFrame]) -> PlanCounts:
        """The counts of every part, summed."""
        out = cls()
        for part in parts:
            out += cls.of(part)
        return out

    def __add__(self, other: PlanCounts) -> PlanCounts:
        return PlanCounts(
            self.paths + other.paths,
            self.noise + other.noise,
            self.keep + other.keep,
            self.delete + other.delete,
            self.missing + other.missing,
            self.reclaimable_bytes + other.reclaimable_bytes,
            self.sizes + other.sizes,
        )

    @property
    def clusters(self) -> int:
        """Clusters (noise aside)."""
        return sum(self.sizes.values())

    @property
    def duplicate_clusters(self) -> int:
        """Clusters of two or more rows."""
        return sum(v for k, v in self.sizes.items() if k > 1)


class PlanDir:
    """One plan directory, opened with its fsspec options.

    Parameters
    ----------
    url : str
        Local path or fsspec URL of the folder.
    storage_options : mapping, optional
        fsspec options for ``url`` (the job's; local paths ignore them).

    Notes
    -----
    Holds no file contents: every read goes to storage (a plan directory is small except
    ``plan.parquet``, about 200 bytes a row once in pandas).
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = str(url)
        self.storage_options = dict(storage_options or {})

    def __repr__(self) -> str:  # never shows storage_options: they may hold credentials
        return f"PlanDir({self.url!r})"

    @classmethod
    def beside(
        cls,
        url: str,
        store: storage.Store | None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> PlanDir:
        """The plan directory at ``url``, with ``storage_options`` when given, else the image
        store's when the directory is on the same remote protocol (an S3 plan next to S3
        images), else none: a local folder never gets a remote store's endpoint or keys."""
        if storage_options is not None:
            return cls(url, storage_options)
        remote = store is not None and not store.is_local and "://" in url
        if remote and url.split("://", 1)[0] in store.protocols:  # type: ignore[union-attr]
            return cls(url, store.storage_options)  # type: ignore[union-attr]
        return cls(url)

    # -- names -------------------------------------------------------------------------------
    def join(self, *names: str) -> str:
        """The URL (or local path) of ``names`` inside the directory."""
        return storage.join_url(self.url, *names)

    def exists(self, name: str) -> bool:
        """Whether the file or folder ``name`` exists in the directory."""
        return storage.url_exists(self.join(name), self.storage_options)

    def has_journal(self) -> bool:
        """Whether an apply has started here (a new plan must not be written over it)."""
        return self.exists(JOURNAL_DIR)

    def store(self) -> storage.Store:
        """A :class:`~dedup_batch.storage.Store` rooted here, for the journal's exact-path
        listing and atomic small files."""
        return storage.Store(self.url, self.storage_options)

    # -- whole files -------------------------------------------------------------------------
    def read_bytes(self, name: str) -> bytes:
        """The bytes of ``name``; :class:`FileNotFoundError` when it is not there."""
        return storage.read_url(self.join(name), self.storage_options)

    def write_bytes(self, name: str, data: bytes) -> str:
        """Write ``name`` whole and atomically; returns its URL."""
        url = self.join(name)
        storage.write_url(url, data, self.storage_options)
        return url

    def write_text(self, name: str, text: str) -> str:
        """Write ``name`` as UTF-8 text; returns its URL."""
        return self.write_bytes(name, text.encode("utf-8"))

    # -- the plan: plan.parquet or the plan/ dataset ---------------------------------------------
    def plan_layout(self) -> str | None:
        """``"file"`` (``plan.parquet``), ``"dataset"`` (``plan/_parts.json``) or None (no plan).

        Raises
        ------
        InputError
            Both layouts are present (which plan is meant cannot be known), or ``plan/`` holds
            parts but no ``_parts.json`` (a dataset whose writing did not finish).
        """
        file, dataset = self.exists(PLAN_FILE), self.exists(PARTS_FILE)
        if file and dataset:
            raise InputError(
                f"{self.url} holds both {PLAN_FILE} and {PARTS_FILE}: which is the plan is "
                "unknown; re-run 'dedup-batch plan' into an empty --out"
            )
        if dataset:
            return "dataset"
        if file:
            return "file"
        if self.exists(PLAN_DATASET):
            raise InputError(
                f"{self.join(PLAN_DATASET)} has no {PARTS_FILE.rsplit('/', 1)[-1]}: the plan's "
                "writing did not finish; re-run 'dedup-batch plan'"
            )
        return None

    def require_plan(self) -> str:
        """The plan's layout (see :meth:`plan_layout`); :class:`InputError` when there is none."""
        layout = self.plan_layout()
        if layout is None:
            raise InputError(
                f"no {PLAN_FILE} in {self.url!r}: no plan here; run 'dedup-batch plan --out "
                f"{self.url}' first"
            )
        return layout

    def plan_parts(self) -> Iterator[pd.DataFrame]:
        """The plan, one part at a time (``plan.parquet`` is one part), each checked.

        Every part is checked as :meth:`read_plan` checks a plan (columns, no empty
        ``path``/``cluster``/``keep``) and, in a dataset, against ``_parts.json``: its row count,
        and every cluster (-1 aside: noise rows stand alone) within the part's cluster range,
        the ranges of the parts disjoint, so that no cluster spans two parts. Each part's
        ``attrs["source"]`` is its URL (for error messages); rows are renumbered from 0.

        Yields
        ------
        DataFrame
            One part: about 200 bytes a row in pandas, at most about :data:`PART_ROWS` rows
            unless a single cluster is larger. Only one part is held at a time.

        Raises
        ------
        InputError
            No plan, an unreadable part, a failed check: naming the file (and row).
        """
        if self.require_plan() == "file":
            yield self._read_part(PLAN_FILE)
            return
        entries = self._parts_entries()
        for entry in entries:
            part = self._read_part(f"{PLAN_DATASET}/{entry['name']}")
            url = part.attrs["source"]
            if len(part) != int(entry["rows"]):
                raise InputError(
                    f"{url}: {len(part)} rows, {PARTS_FILE} says {entry['rows']}; the plan "
                    "changed after it was written: re-run 'dedup-batch plan'"
                )
            lo, hi = entry["clusters"] if entry["clusters"] is not None else (0, -1)
            cl = part["cluster"].to_numpy(dtype=np.int64)
            out = np.flatnonzero((cl != -1) & ((cl < lo) | (cl > hi)))
            if len(out):
                raise InputError(
                    f"{url} row {out[0]}: cluster {cl[out[0]]} lies outside the part's clusters "
                    f"{lo}..{hi}: a cluster may span two parts; re-run 'dedup-batch plan'"
                )
            yield part

    def plan_rows(self) -> int:
        """Rows in the plan (a dataset: from ``_parts.json``, no part read)."""
        if self.plan_layout() == "dataset":
            return sum(int(e["rows"]) for e in self._parts_entries())
        return sum(len(p) for p in self.plan_parts())

    def read_plan(self) -> pd.DataFrame:
        """The whole plan, checked (see :meth:`plan_parts`); rows renumbered from 0.

        For small plans and tests: a dataset is concatenated here, whole. ``apply`` and
        ``report`` read :meth:`plan_parts` instead.

        Raises
        ------
        InputError
            Naming the file (and the row) and saying to re-run ``dedup-batch plan``.
        """
        parts = list(self.plan_parts())
        plan = parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)
        plan.attrs.clear()
        return plan.reset_index(drop=True)

    def write_plan(self, plan: pd.DataFrame, *, part_rows: int | None = None) -> str:
        """Write ``plan``: as ``plan.parquet`` (no index) when it has at most ``part_rows``
        rows (default :data:`PART_ROWS`), else as the dataset ``plan/``, cut between clusters
        into parts of about ``part_rows`` rows. Removes the other layout. Returns the URL of
        the file or of ``_parts.json``.

        ``plan`` must list each cluster's rows together (select sorts by cluster, then path).
        """
        limit = PART_ROWS if part_rows is None else int(part_rows)
        if len(plan) <= limit:
            self._remove_plan(dataset=True)
            return self._write_parquet(PLAN_FILE, plan)
        cl = plan["cluster"].to_numpy(dtype=np.int64)
        # A cut may fall only where the cluster changes (noise rows stand alone).
        starts = np.flatnonzero(np.r_[True, (cl[1:] != cl[:-1]) | (cl[1:] == -1)])
        cuts = [0]
        while cuts[-1] + limit < len(plan):
            k = int(np.searchsorted(starts, cuts[-1] + limit))
            cuts.append(int(starts[k]) if k < len(starts) else len(plan))
        if cuts[-1] != len(plan):
            cuts.append(len(plan))
        self.start_dataset()
        entries = [
            self.write_part(i, plan.iloc[a:b]) for i, (a, b) in enumerate(itertools.pairwise(cuts))
        ]
        return self.finish_dataset(entries)

    def start_dataset(self) -> None:
        """Remove any plan here (either layout) before the parts of a new dataset are written."""
        self._remove_plan(dataset=True)
        self._remove_plan(dataset=False)

    def write_part(self, index: int, part: pd.DataFrame) -> dict[str, Any]:
        """Write part ``index`` of a dataset (run by a Dask worker or the client); returns its
        entry for :meth:`finish_dataset`: ``name``, ``rows`` and ``clusters`` (the lowest and
        highest cluster in it, noise aside; None when it holds none)."""
        name = f"part-{int(index):05d}.parquet"
        cl = part["cluster"].to_numpy(dtype=np.int64)
        cl = cl[cl != -1]
        clusters = [int(cl.min()), int(cl.max())] if len(cl) else None
        self._write_parquet(f"{PLAN_DATASET}/{name}", part.reset_index(drop=True))
        return {"name": name, "rows": len(part), "clusters": clusters}

    def finish_dataset(self, entries: Sequence[Mapping[str, Any]]) -> str:
        """Write ``_parts.json`` (last: it makes the dataset the plan); returns its URL.

        Raises
        ------
        InputError
            Two parts' cluster ranges overlap (a cluster could span them): nothing is written.
        """
        entries = [dict(e) for e in entries]
        _check_ranges(entries, self.join(PARTS_FILE))
        doc = {"version": _PARTS_VERSION, "parts": entries}
        return self.write_text(PARTS_FILE, json.dumps(doc, indent=1) + "\n")

    def _parts_entries(self) -> list[dict[str, Any]]:
        url = self.join(PARTS_FILE)
        redo = "re-run 'dedup-batch plan'"
        try:
            doc = json.loads(self.read_bytes(PARTS_FILE))
            entries = list(doc["parts"])
            for e in entries:
                name, rows = str(e["name"]), int(e["rows"])
                if "/" in name or not name.endswith(".parquet") or rows < 0:
                    raise ValueError(f"bad part {name!r}")
                if e["clusters"] is not None:
                    e["clusters"] = [int(e["clusters"][0]), int(e["clusters"][1])]
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{url}: cannot parse ({one_line(exc)}); {redo}") from None
        if doc.get("version") != _PARTS_VERSION:
            raise InputError(
                f"{url}: version {doc.get('version')!r} is not {_PARTS_VERSION}; {redo}"
            )
        _check_ranges(entries, url)
        return entries

    def _read_part(self, name: str) -> pd.DataFrame:
        url = self.join(name)
        try:
            raw = self.read_bytes(name)
        except FileNotFoundError:
            raise InputError(
                f"no {name} in {self.url!r}: no plan here; run 'dedup-batch plan --out "
                f"{self.url}' first"
            ) from None
        try:
            plan = pd.read_parquet(io.BytesIO(raw))
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise InputError(
                f"{url}: not a readable Parquet plan ({one_line(exc, with_type=True)}); "
                "re-run 'dedup-batch plan'"
            ) from None
        missing = [c for c in REQUIRED_COLUMNS if c not in plan.columns]
        if missing:
            raise InputError(
                f"{url}: plan lacks column(s) {', '.join(missing)}; re-run 'dedup-batch plan'"
            )
        for col in ("path", "cluster", "keep"):
            bad = np.flatnonzero(plan[col].isna().to_numpy())
            if len(bad):
                raise InputError(f"{url} row {bad[0]}: {col} is empty; re-run 'dedup-batch plan'")
        plan = plan.reset_index(drop=True)
        plan.attrs["source"] = url
        # how messages name it: "plan" for the one file (as before parts), else the part
        plan.attrs["name"] = "plan" if name == PLAN_FILE else name
        return plan

    def _write_parquet(self, name: str, frame: pd.DataFrame) -> str:
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        return self.write_bytes(name, buf.getvalue())

    def _remove_plan(self, *, dataset: bool) -> None:
        """Remove ``plan.parquet``, or the dataset (``_parts.json`` first, so that what is left
        of it is never read as a plan), by exact name: only the names a plan writes
        (:data:`PART_NAME`). Anything else in ``plan/`` is not the plan's (a folder of the
        user's that happens to be called ``plan``, in an ``--out`` that is an image folder)
        and stays: writing a plan deletes nothing else."""
        store = self.store()
        if not dataset:
            if self.exists(PLAN_FILE):
                store.delete_exact([store.resolve(PLAN_FILE)])
            return
        folder = store.resolve(PLAN_DATASET)
        manifest = store.resolve(PARTS_FILE)
        files = store.list_files(folder)
        store.delete_exact([f for f in files if f == manifest])
        store.delete_exact([f for f in files if PART_NAME.fullmatch(f.rsplit("/", 1)[-1])])

    # -- summary.json ------------------------------------------------------------------------
    def read_summary(self) -> dict[str, Any]:
        """``summary.json`` as a dict; ``{}`` when there is none."""
        return self._read_mapping(SUMMARY_FILE, json.loads)

    def write_summary(self, summary: Mapping[str, Any]) -> str:
        """Write ``summary.json`` whole (one atomic write); returns its URL."""
        text = json.dumps(dict(summary), indent=2, default=str) + "\n"
        return self.write_text(SUMMARY_FILE, text)

    def update_summary(self, entries: Mapping[str, Any]) -> bool:
        """Merge ``entries`` into ``summary.json`` if it exists (read, update, one atomic write).

        Returns False (and writes nothing) when there is no summary: a report or sweep of a
        plan directory written by hand must not invent one.
        """
        if not self.exists(SUMMARY_FILE):
            return False
        summary = self.read_summary()
        summary.update(entries)
        self.write_summary(summary)
        return True

    # -- job.yaml ----------------------------------------------------------------------------
    def read_job(self, *, required: bool = False) -> dict[str, Any]:
        """``job.yaml`` as a plain mapping (``yaml.safe_load``: never builds objects).

        Parameters
        ----------
        required : bool
            Raise :class:`InputError` when there is none (apply, restore) instead of
            returning ``{}`` (the report, which can be given ``--root``).
        """
        url = self.join(JOB_FILE)
        redo = "re-run 'dedup-batch plan' to write the plan directory again"
        try:
            raw = self.read_bytes(JOB_FILE)
        except FileNotFoundError:
            if required:
                raise InputError(
                    f"{self.url} is not a plan directory (no {JOB_FILE}): run "
                    "'dedup-batch plan' first"
                ) from None
            return {}
        try:
            data = yaml.safe_load(raw)
        except (yaml.YAMLError, UnicodeDecodeError):
            # safe_load refuses python tags (!!python/object...) as it should
            raise InputError(
                f"{url} is not a job spec dedup-batch wrote (not plain YAML); {redo}"
            ) from None
        if not isinstance(data, dict):
            if not required:  # the report only looks up keys in it: an empty file is no plan's
                return {}
            raise InputError(
                f"{url} is not a job spec dedup-batch wrote (not a mapping of keys to values); "
                f"{redo}"
            )
        return data

    def write_job(self, text: str) -> str:
        """Write ``job.yaml`` (the caller redacts secrets: see ``JobSpec.to_yaml``)."""
        return self.write_text(JOB_FILE, text)

    # -- helpers -----------------------------------------------------------------------------
    def _read_mapping(self, name: str, parse: Any) -> dict[str, Any]:
        url = self.join(name)
        try:
            data = parse(self.read_bytes(name).decode("utf-8"))
        except FileNotFoundError:
            return {}
        except (ValueError, yaml.YAMLError) as exc:  # JSONDecodeError, UnicodeDecodeError
            raise InputError(
                f"{url}: cannot parse ({one_line(exc, with_type=True)}); fix or delete it"
            ) from None
        return data if isinstance(data, dict) else {}


def _check_ranges(entries: Sequence[Mapping[str, Any]], url: str) -> None:
    """Raise :class:`InputError` when two parts' cluster ranges overlap."""
    ranges = sorted((tuple(e["clusters"]), e["name"]) for e in entries if e["clusters"] is not None)
    for (lo, hi), name in ranges:
        if lo > hi:
            raise InputError(f"{url}: {name} has the empty cluster range {lo}..{hi}")
    for ((_, hi), name), ((lo2, hi2), name2) in itertools.pairwise(ranges):
        if lo2 <= hi:
            raise InputError(
                f"{url}: the clusters of {name} (..{hi}) and {name2} ({lo2}..{hi2}) overlap: "
                "a cluster would span two parts; re-run 'dedup-batch plan'"
            )
