"""The plan directory: the one owner of its file names, formats and schema checks.

A plan directory (``--out``: a local folder or any fsspec URL) holds

* ``plan.parquet``: the plan (one row per feature path; see docs/architecture.md);
* ``summary.json``: counts, timings, warnings, and the ``report``/``apply``/``sweep`` entries;
* ``job.yaml``: the resolved job spec, secrets redacted;
* ``journal/``: apply's ``manifest.json`` and one record file per finished batch;
* ``completion-report.csv``, ``restore-report.csv``, ``would-delete.csv``: apply's reports;
* ``report.html`` (``report-N.html``) and ``sweep/``.

Every module that reads or writes one of these goes through :class:`PlanDir`, so a file's name,
its parsing and its error messages exist once. Writes are whole-file and atomic (see
:func:`dedup_batch.storage.write_url`): a reader sees the old file or the new one, never half.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
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
    "PLAN_FILE",
    "REPORT_FILE",
    "REQUIRED_COLUMNS",
    "RESTORE_REPORT",
    "SUMMARY_FILE",
    "SWEEP_DIR",
    "WOULD_DELETE_REPORT",
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

    # -- plan.parquet ------------------------------------------------------------------------
    def read_plan(self) -> pd.DataFrame:
        """The plan, checked: it exists, parses, has :data:`REQUIRED_COLUMNS` and no empty
        ``path``/``cluster``/``keep``. Rows renumbered from 0.

        Raises
        ------
        InputError
            Naming the file (and the row) and saying to re-run ``dedup-batch plan``.
        """
        url = self.join(PLAN_FILE)
        try:
            raw = self.read_bytes(PLAN_FILE)
        except FileNotFoundError:
            raise InputError(
                f"no {PLAN_FILE} in {self.url!r}: no plan here; run 'dedup-batch plan --out "
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
        return plan.reset_index(drop=True)

    def write_plan(self, plan: pd.DataFrame) -> str:
        """Write ``plan`` as ``plan.parquet`` (no index); returns its URL."""
        buf = io.BytesIO()
        plan.to_parquet(buf, index=False)
        return self.write_bytes(PLAN_FILE, buf.getvalue())

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
