"""The job spec: every setting of a job, from a YAML file and/or CLI flags.

The YAML keys are the CLI flags with ``_`` for ``-`` (``--max-keeper-distance`` is
``max_keeper_distance``). Flags override the file. Validation happens once, here, at the boundary:
an unknown key, a wrong type or an out-of-range value is a :class:`ConfigError` naming the key
(and the file) and what to do.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import ConfigError
from .select import DEFAULT_POLICY, POLICIES, POLICY_CHOICES, policy_problem
from .storage import redact

__all__ = ["KEEP_POLICIES", "METRICS", "MODES", "JobSpec", "load_spec"]

#: The named keep policies (owned by :mod:`dedup_batch.select`); ``keep`` may also be a key list.
KEEP_POLICIES = tuple(POLICIES)
METRICS = ("euclidean", "cosine")
MODES = ("plan", "apply")
LOG_FORMATS = ("text", "json")


@dataclass
class JobSpec:
    """All settings of one job. Field names are the job-spec keys.

    ``max_keeper_distance`` is a float, ``None`` (no chain guard: the notebook's behaviour) or
    ``"eps"`` (the default: the same as ``eps``); use :meth:`keeper_distance` for the number.
    """

    # load
    features: list[str] = field(default_factory=list)
    root: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    allow_pickle: bool = False
    # cluster
    eps: float | None = None
    min_samples: int = 1
    metric: str = "euclidean"
    # select
    keep: str = DEFAULT_POLICY
    protect: list[str] = field(default_factory=list)
    max_keeper_distance: float | str | None = "eps"
    # output
    out: str = "./dedup-plan"
    report: bool = True
    # apply
    mode: str = "plan"
    dry_run: bool = False
    max_delete: int | None = None
    max_delete_fraction: float | None = None
    trash: str | None = None
    batch_size: int = 1000
    concurrency: int | None = None
    # dask
    scheduler: str | None = None
    n_workers: int | None = None
    threads_per_worker: int | None = None
    # logging
    log_format: str = "text"

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "job spec") -> JobSpec:
        """Build and validate a spec from a mapping (unknown keys are errors)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping of keys to values")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}"
            )
        spec = cls(**{k: v for k, v in data.items() if v is not None or k in _NULLABLE})
        spec.validate(source=source)
        return spec

    def merged(self, overrides: Mapping[str, Any], *, source: str = "flags") -> JobSpec:
        """A new spec: ``self`` with ``overrides`` applied (``None`` values are ignored)."""
        data = dataclasses.asdict(self)
        for k, v in overrides.items():
            if v is None:
                continue
            data[k] = v
        return JobSpec.from_mapping(data, source=source)

    # -- validation ------------------------------------------------------------------------
    def validate(self, *, source: str = "job spec") -> None:
        """Check types and ranges; normalise scalars given where lists are expected."""

        def bad(key: str, what: str) -> ConfigError:
            return ConfigError(f"{source}: '{key}' {what}")

        if isinstance(self.features, str):
            self.features = [self.features]
        if isinstance(self.protect, str):
            self.protect = [self.protect]
        _check_list_of_str(self.features, "features", bad)
        _check_list_of_str(self.protect, "protect", bad)
        if self.root is not None and not isinstance(self.root, str):
            raise bad("root", "must be a path or URL")
        if not isinstance(self.storage_options, Mapping):
            raise bad("storage_options", "must be a mapping of option names to values")
        self.storage_options = dict(self.storage_options)
        for key in ("allow_pickle", "report", "dry_run"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "must be true or false")
        if self.eps is not None:
            self.eps = _number(self.eps, "eps", bad)
            if not (self.eps > 0 and math.isfinite(self.eps)):
                raise bad("eps", f"must be a positive number, got {self.eps}")
        self.min_samples = _integer(self.min_samples, "min_samples", bad, minimum=1)
        if self.metric not in METRICS:
            raise bad("metric", f"must be one of {', '.join(METRICS)}, got {self.metric!r}")
        problem = policy_problem(self.keep)
        if problem:
            raise bad("keep", f"must be {POLICY_CHOICES}; got {self.keep!r} ({problem})")
        self.keep = self.keep.strip()
        mkd = self.max_keeper_distance
        if isinstance(mkd, str) and mkd.lower() in ("none", "null", "off"):
            self.max_keeper_distance = None
        elif mkd is not None and mkd != "eps":
            self.max_keeper_distance = _number(mkd, "max_keeper_distance", bad)
            if not self.max_keeper_distance >= 0:
                raise bad("max_keeper_distance", "must be >= 0, 'eps' or 'none'")
        if not isinstance(self.out, str) or not self.out:
            raise bad("out", "must be a path or URL")
        if self.mode not in MODES:
            raise bad("mode", f"must be 'plan' (dry run) or 'apply' (delete), got {self.mode!r}")
        if self.max_delete is not None:
            self.max_delete = _integer(self.max_delete, "max_delete", bad, minimum=0)
        if self.max_delete_fraction is not None:
            f = _number(self.max_delete_fraction, "max_delete_fraction", bad)
            if not 0 <= f <= 1:
                raise bad("max_delete_fraction", f"must be between 0 and 1, got {f}")
            self.max_delete_fraction = f
        if self.trash is not None and (not isinstance(self.trash, str) or not self.trash):
            raise bad("trash", "must be a path or URL")
        self.batch_size = _integer(self.batch_size, "batch_size", bad, minimum=1)
        if self.batch_size > 1000:
            raise bad("batch_size", "must be at most 1000 (the S3 DeleteObjects limit)")
        if self.concurrency is not None:
            self.concurrency = _integer(self.concurrency, "concurrency", bad, minimum=1)
        for key in ("n_workers", "threads_per_worker"):
            if getattr(self, key) is not None:
                setattr(self, key, _integer(getattr(self, key), key, bad, minimum=1))
        if self.scheduler is not None and not isinstance(self.scheduler, str):
            raise bad("scheduler", "must be an address such as tcp://host:8786")
        if self.log_format not in LOG_FORMATS:
            raise bad("log_format", f"must be one of {', '.join(LOG_FORMATS)}")

    def require(self, *keys: str, source: str = "job spec") -> None:
        """Raise :class:`ConfigError` unless every key in ``keys`` is set."""
        for key in keys:
            value = getattr(self, key)
            if value is None or value == []:
                flag = "--" + key.replace("_", "-")
                raise ConfigError(
                    f"{source}: '{key}' is required: pass {flag} or set it in --config"
                )

    # -- derived ---------------------------------------------------------------------------
    def keeper_distance(self) -> float | None:
        """The chain-guard distance: ``eps`` by default, ``None`` when disabled."""
        if self.max_keeper_distance == "eps":
            return self.eps
        return self.max_keeper_distance  # type: ignore[return-value]

    def scheduler_address(self) -> str | None:
        """``scheduler`` or, when unset, ``$DASK_SCHEDULER_ADDRESS``."""
        return self.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS") or None

    def to_dict(self, *, redact_secrets: bool = True) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if redact_secrets:
            data["storage_options"] = redact(self.storage_options)
        return data

    def to_yaml(self) -> str:
        """The spec as YAML, with secrets in ``storage_options`` redacted."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_NULLABLE = {"max_keeper_distance"}


def load_spec(path: str) -> dict[str, Any]:
    """Read a job-spec YAML file into a mapping (validated later by :class:`JobSpec`)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: job spec not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a job spec is a mapping of keys to values")
    # A YAML null for max_keeper_distance means "no chain guard".
    if "max_keeper_distance" in data and data["max_keeper_distance"] is None:
        data["max_keeper_distance"] = "none"
    return data


def _check_list_of_str(value: Any, key: str, bad: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise bad(key, "must be a list of paths or URLs")


def _number(value: Any, key: str, bad: Any) -> float:
    if isinstance(value, bool):
        raise bad(key, f"must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise bad(key, f"must be a number, got {value!r}") from None


def _integer(value: Any, key: str, bad: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise bad(key, f"must be an integer, got {value!r}")
    try:
        out = int(value)
    except ValueError:
        raise bad(key, f"must be an integer, got {value!r}") from None
    if out < minimum:
        raise bad(key, f"must be >= {minimum}, got {out}")
    return out
