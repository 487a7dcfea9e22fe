"""The job spec: every setting of a job, from a YAML file and/or CLI flags.

The YAML keys are the CLI flags with ``_`` for ``-`` (``--max-keeper-distance`` is
``max_keeper_distance``). Flags override the file. Validation happens once, here, at the boundary:
an unknown key, a wrong type or an out-of-range value is a :class:`ConfigError` naming the key
(and the file) and what to do.

Each key's flags (spelling, help, type, choices, the commands that take it) are declared once,
in its field's metadata (:class:`Flag`); ``cli`` builds its parser from them.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import ConfigError
from .policies import DEFAULT_POLICY, POLICIES, POLICY_CHOICES, policy_problem
from .secrets import NON_SECRET_OPTIONS, redact

__all__ = [
    "CLI",
    "COMMON",
    "DISTRIBUTED",
    "GLOBAL",
    "JOB_COMMANDS",
    "KEEP_POLICIES",
    "LOG_FORMATS",
    "METRICS",
    "MODES",
    "RUN_EMBED",
    "TYPED_OPTIONS",
    "Flag",
    "JobSpec",
    "check_option_names",
    "coerce_storage_options",
    "load_spec",
    "parse_storage_options",
]

#: The named keep policies (owned by :mod:`dedup_batch.policies`); ``keep`` may also be a key list.
KEEP_POLICIES = tuple(POLICIES)
METRICS = ("euclidean", "cosine")
MODES = ("plan", "apply")
#: ``distributed``: leave the vectors on the Dask workers when they would not fit comfortably on
#: the client or one worker (``auto``), always, or never (see ``load.load_features``)
DISTRIBUTED = ("auto", "always", "never")
LOG_FORMATS = ("text", "json")


#: ``Flag.commands`` entry for a flag of the program itself, given before or after any command.
GLOBAL = "dedup-batch"
#: ``Flag.group`` of the flags every job command takes, listed first among its own options.
COMMON = "common"
#: The commands that build a :class:`JobSpec` from ``--config`` and their flags.
JOB_COMMANDS = ("plan", "apply", "run", "restore", "report", "sweep", "embed")
#: ``run``'s group of embed flags (``embed`` spells the same keys ``--model``, ``--out``, ...).
RUN_EMBED = "embed first (run --embed)"
#: The key of a :class:`JobSpec` field's metadata that holds its flags.
CLI = "cli"

_EMBED_EXTENSIONS_HELP = (
    "comma-separated file extensions to embed, case-insensitive (default "
    "jpg,jpeg,png,webp,gif,tif,tiff,bmp, plus heic,heif,avif where Pillow reads them)"
)
_KEEP_HELP = (
    "which image of a cluster to keep: a policy, or comma-separated sort keys where "
    "the first image of the sorted cluster is kept; KEY sorts ascending, -KEY descending. "
    "Keys: pixels (fewest first; -pixels: most first; width x height from the image "
    "header), copy (names without a copy marker such as ' (1)', ' copy', 'Copy of ', "
    "'-edited' first; -copy: marked first), mtime (oldest first; -mtime: newest first), "
    "size (smallest first; -size: largest first), path (first in code-point order; -path: "
    "last; ends every list), centroid (nearest the cluster's mean vector; first key only). "
    "Unknown values sort last. Policies: "
    + "; ".join(f"{name} = {keys}" for name, keys in POLICIES.items())
    + f" (default {DEFAULT_POLICY})"
)


@dataclass(frozen=True)
class Flag:
    """One way a job-spec key is spelt on the command line: part of a :class:`JobSpec` field.

    A field's metadata ``{CLI: (Flag, ...)}`` is the only place its flags are declared;
    ``cli`` turns each ``Flag`` into one ``argparse`` argument of every command in
    ``commands``. A key worded differently by some commands (``--root`` of ``plan`` and of
    ``embed``) has one ``Flag`` per wording. Within a ``--help`` group, flags are listed in
    field order. A flag stored under its key defaults to ``None``: when it is not given, the
    value from ``--config`` (or the field's default) stands.

    Parameters
    ----------
    commands : tuple of str
        The subcommands that take the flag (:data:`GLOBAL`: the program and every command).
    help : str
        The ``--help`` text.
    group : str or None, default None
        Title of the ``--help`` group it is listed in; ``None``: the command's own options,
        :data:`COMMON`: those too, before the command's own.
    flags : tuple of str, default ()
        Its spellings; ``()`` means the one derived from the key (``--max-keeper-distance``).
    dest : str or None, default None
        Where argparse stores it; ``None`` means the key, which the flag then overrides in the
        job spec. Another name is read by the command itself (``--apply``, ``-o``).
    metavar, type, choices, action
        As in :meth:`argparse.ArgumentParser.add_argument` (``action`` one of ``store``,
        ``append``, ``store_true``, ``store_false``).
    """

    commands: tuple[str, ...]
    help: str
    group: str | None = None
    flags: tuple[str, ...] = ()
    dest: str | None = None
    metavar: str | None = None
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    action: str = "store"


def _cli(*flags: Flag) -> dict[str, tuple[Flag, ...]]:
    return {CLI: flags}


@dataclass
class JobSpec:
    """All settings of one job. Field names are the job-spec keys.

    ``max_keeper_distance`` is a float, ``None`` (no chain guard: the notebook's behaviour) or
    ``"eps"`` (the default: the same as ``eps``); use :meth:`keeper_distance` for the number.
    Each field's metadata declares its command-line flags (:class:`Flag`, under :data:`CLI`).
    """

    # embed (run --embed): features computed from the images under root, before the plan
    embed: str | None = field(
        default=None,
        metadata=_cli(
            Flag(
                ("run",),
                "embed the new or changed images under --root with MODEL first (pdq, onnx:..., "
                "timm:..., open_clip:...), then plan their features (instead of --features)",
                group=RUN_EMBED,
                metavar="MODEL",
            ),
            Flag(
                ("embed",),
                "embedding model (default pdq: Meta's PDQ hash, 256 bits, no weights); also "
                "onnx:PATH[?options], timm:NAME[?weights=PATH], open_clip:ARCH/PRETRAINED "
                "(README: models)",
                group="embed",
                flags=("--model",),
                metavar="NAME[:ARG]",
            ),
        ),
    )
    embed_out: str | None = field(
        default=None,
        metadata=_cli(
            Flag(
                ("run",),
                "folder for the shards (default: OUT/features, beside the plan)",
                group=RUN_EMBED,
                metavar="URL",
            ),
            Flag(
                ("embed",),
                "folder for the feature shards (part-*.parquet) and embed-errors.csv (required; "
                "job-spec key embed_out); shards of earlier runs there are kept and only new or "
                "changed images are embedded",
                group="embed",
                flags=("--out",),
                metavar="URL",
            ),
        ),
    )
    embed_extensions: str | list[str] | None = field(
        default=None,
        metadata=_cli(
            Flag(("run",), _EMBED_EXTENSIONS_HELP, group=RUN_EMBED, metavar="LIST"),
            Flag(
                ("embed",),
                _EMBED_EXTENSIONS_HELP,
                group="embed",
                flags=("--extensions",),
                metavar="LIST",
            ),
        ),
    )
    embed_batch_size: int | None = field(
        default=None,
        metadata=_cli(
            Flag(
                ("run",),
                "images per Dask task (default 256)",
                group=RUN_EMBED,
                metavar="N",
                type=int,
            ),
            Flag(
                ("embed",),
                "images per Dask task and per shard, at most (default 256)",
                group="embed",
                flags=("--batch-size",),
                metavar="N",
                type=int,
            ),
        ),
    )
    # load
    features: list[str] = field(
        default_factory=list,
        metadata=_cli(
            Flag(
                ("plan", "run"),
                "feature shards: path, URL or glob (repeatable), e.g. "
                "'./features/*.parquet' or 's3://bkt/features/part-*.parquet'",
                group="plan",
                metavar="URL",
                action="append",
            ),
            Flag(
                ("sweep",),
                "feature shards: path, URL or glob (repeatable)",
                group="sweep",
                metavar="URL",
                action="append",
            ),
        ),
    )
    root: str | None = field(
        default=None,
        metadata=_cli(
            Flag(
                ("plan", "run"),
                "the image collection the feature paths are relative to; nothing "
                "outside it is ever deleted",
                group="plan",
                metavar="URL",
            ),
            Flag(
                ("report",),
                "image root (default: the 'root' recorded in DIR/job.yaml)",
                metavar="URL",
            ),
            Flag(
                ("sweep",),
                "the image collection the feature paths are relative to",
                group="sweep",
                metavar="URL",
            ),
            Flag(
                ("embed",),
                "the image collection to embed: a folder, s3://bucket/prefix or any fsspec URL",
                group="embed",
                metavar="URL",
            ),
        ),
    )
    storage_options: dict[str, Any] = field(
        default_factory=dict,
        metadata=_cli(
            Flag(
                JOB_COMMANDS,
                "fsspec storage option, e.g. endpoint_url=http://127.0.0.1:9000 "
                "(repeatable; dotted keys nest: client_kwargs.region_name=eu-west-1)",
                group=COMMON,
                flags=("--storage-option", "-o"),
                # text as given, parsed into the nested mapping by parse_storage_options
                dest="storage_option",
                metavar="KEY=VALUE",
                action="append",
            ),
        ),
    )
    allow_pickle: bool = field(
        default=False,
        metadata=_cli(
            Flag(
                ("plan", "run"),
                "read pandas pickle shards (.pkl): unpickling runs code from the file, "
                "so only for files you trust",
                group="plan",
                action="store_true",
            ),
            Flag(
                ("sweep",),
                "read pandas pickle shards (.pkl): runs code from the file",
                group="sweep",
                action="store_true",
            ),
        ),
    )
    # cluster
    eps: float | None = field(
        default=None,
        metadata=_cli(
            Flag(
                ("plan", "run"),
                "DBSCAN eps: the largest distance at which two images count as "
                "near-duplicates (required, unless the shards were made by 'embed', whose model "
                "gives its own)",
                group="plan",
                type=float,
            ),
            Flag(
                ("sweep",),
                "the eps to look at closely: marked on the plots, pairs.html shows the "
                "pairs just inside and outside it (default: the job's eps, else mid-range)",
                group="sweep",
                type=float,
            ),
        ),
    )
    min_samples: int = field(
        default=1,
        metadata=_cli(
            Flag(("plan", "run"), "DBSCAN min_samples (default 1)", group="plan", type=int),
            Flag(("sweep",), "DBSCAN min_samples (default 1)", group="sweep", type=int),
        ),
    )
    metric: str = field(
        default="euclidean",
        metadata=_cli(
            Flag(
                ("plan", "run"),
                "distance metric (default euclidean)",
                group="plan",
                choices=METRICS,
            ),
            Flag(("sweep",), "distance metric (default euclidean)", group="sweep", choices=METRICS),
        ),
    )
    # select
    keep: str = field(
        default=DEFAULT_POLICY,
        metadata=_cli(
            Flag(("plan", "run"), _KEEP_HELP, group="plan", metavar="POLICY"),
            Flag(
                ("sweep",),
                "keeper policy used to score deletions with --truth (default first-path)",
                group="sweep",
                choices=("first-path", "last-path"),
            ),
        ),
    )
    protect: list[str] = field(
        default_factory=list,
        metadata=_cli(
            Flag(
                ("plan", "run"),
                "never delete the images PATTERN matches (repeatable); they are kept before any "
                "other. Relative to --root (or an absolute path/URL under it), case-sensitive. "
                "Always a string prefix ('family' protects family/ and family-2/); with * ? or "
                "[ also a glob in which * crosses '/' ('family/*' protects family/ at any depth, "
                "'*.png' every PNG; [abc] is a character class and literal brackets alike). A "
                "pattern that matches nothing is a warning in the plan and the report",
                group="plan",
                metavar="PATTERN",
                action="append",
            ),
        ),
    )
    max_keeper_distance: float | str | None = field(
        default="eps",
        metadata=_cli(
            Flag(
                ("plan", "run"),
                "chain guard: add keepers until every deleted image is within D of its "
                "keeper (default: eps; 'none' = one keeper per cluster, as the notebook)",
                group="plan",
                metavar="D",
            ),
        ),
    )
    # output
    out: str = field(
        default="./dedup-plan",
        metadata=_cli(
            Flag(
                ("plan", "run"),
                "plan directory (default ./dedup-plan)",
                group="plan",
                metavar="DIR",
            ),
            Flag(
                ("sweep",),
                "where to write (default: DIR/sweep under the plan directory --out of the "
                "job spec, i.e. ./dedup-plan/sweep)",
                group="sweep",
                metavar="DIR",
            ),
        ),
    )
    report: bool = field(
        default=True,
        metadata=_cli(
            Flag(
                ("plan", "run"),
                "do not write report.html",
                group="plan",
                flags=("--no-report",),
                action="store_false",
            ),
        ),
    )
    # apply
    mode: str = field(
        default="plan",
        metadata=_cli(
            # run(apply_now=...) decides with mode: the flag is read by the command
            Flag(
                ("run",),
                "delete the duplicates after planning (default: plan only)",
                flags=("--apply",),
                dest="apply",
                action="store_true",
            ),
            Flag(
                ("demo",),
                "also delete the duplicates",
                flags=("--apply",),
                dest="apply",
                action="store_true",
            ),
        ),
    )
    dry_run: bool = field(
        default=False,
        metadata=_cli(
            Flag(
                ("apply", "run"),
                "touch nothing; report what would be deleted",
                group="apply",
                action="store_true",
            ),
            Flag(("restore",), "touch nothing; report what would be restored", action="store_true"),
        ),
    )
    max_delete: int | None = field(
        default=None,
        metadata=_cli(
            Flag(
                ("apply", "run"),
                "refuse the whole apply (exit 3) if the plan deletes more than N objects",
                group="apply",
                metavar="N",
                type=int,
            ),
        ),
    )
    max_delete_fraction: float | None = field(
        default=0.5,
        metadata=_cli(
            Flag(
                ("apply", "run"),
                "refuse the whole apply (exit 3) if it deletes more than this fraction "
                "of the plan's images that exist (default 0.5; 1 allows any)",
                group="apply",
                metavar="F",
                type=float,
            ),
        ),
    )
    trash: str | None = field(
        default=None,
        metadata=_cli(
            Flag(
                ("apply", "run"),
                "move duplicates under URL (keeping their relative paths) instead of deleting them",
                group="apply",
                metavar="URL",
            ),
            Flag(
                ("restore",), "the trash URL (default: the one the apply journaled)", metavar="URL"
            ),
        ),
    )
    batch_size: int = field(
        default=1000,
        metadata=_cli(
            Flag(("apply", "run"), "objects per delete request (<= 1000)", group="apply", type=int),
        ),
    )
    concurrency: int | None = field(
        default=None,
        metadata=_cli(
            Flag(("apply", "run"), "delete batches in flight at most", group="apply", type=int),
            Flag(("restore",), "restore batches in flight at most", type=int),
        ),
    )
    # dask
    scheduler: str | None = field(
        default=None,
        metadata=_cli(
            Flag(
                JOB_COMMANDS,
                "Dask scheduler address (default: $DASK_SCHEDULER_ADDRESS, else a "
                "LocalCluster on this machine)",
                group=COMMON,
                metavar="ADDR",
            ),
        ),
    )
    n_workers: int | None = field(
        default=None,
        metadata=_cli(
            Flag(JOB_COMMANDS, "LocalCluster worker processes", group=COMMON, type=int),
            Flag(("demo",), "LocalCluster worker processes", type=int),
        ),
    )
    threads_per_worker: int | None = field(
        default=None,
        metadata=_cli(
            Flag(JOB_COMMANDS, "LocalCluster threads per worker", group=COMMON, type=int),
        ),
    )
    #: auto|always|never: leave the vectors on the Dask workers (see load.DISTRIBUTED)
    distributed: str = field(
        default="auto",
        metadata=_cli(
            Flag(
                JOB_COMMANDS,
                "leave the vectors on the Dask workers: auto (default: when they would not fit "
                "comfortably on this machine or one worker), always, never",
                group=COMMON,
                choices=DISTRIBUTED,
            ),
        ),
    )
    # logging
    log_format: str = field(
        default="text",
        metadata=_cli(
            Flag(
                (GLOBAL,),
                "log lines as text (default) or one JSON object per line",
                group="output",
                choices=LOG_FORMATS,
            ),
        ),
    )

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
        self.storage_options = coerce_storage_options(self.storage_options, source=source)
        urls = [self.root, *self.features, self.out, self.trash, self.embed_out]
        check_option_names(
            self.storage_options, [u for u in urls if isinstance(u, str)], source=source
        )
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
        if self.distributed not in DISTRIBUTED:
            raise bad("distributed", f"must be one of {', '.join(DISTRIBUTED)}")
        if self.log_format not in LOG_FORMATS:
            raise bad("log_format", f"must be one of {', '.join(LOG_FORMATS)}")
        self._validate_embed(bad)

    def _validate_embed(self, bad: Any) -> None:
        keys = (self.embed, self.embed_out, self.embed_extensions, self.embed_batch_size)
        if all(v is None for v in keys):
            return
        # the embed package owns model names and extension lists (imported when used)
        from .embed import parse_extensions, parse_model

        if self.embed is not None:
            if not isinstance(self.embed, str):
                raise bad("embed", "must be a model name, e.g. pdq")
            try:
                parse_model(self.embed)
            except ConfigError as exc:
                raise bad("embed", f"names no model ({exc})") from None
        if self.embed_out is not None and (
            not isinstance(self.embed_out, str) or not self.embed_out
        ):
            raise bad("embed_out", "must be a path or URL")
        if self.embed_extensions is not None:
            try:
                parse_extensions(self.embed_extensions)
            except ConfigError as exc:
                raise bad("embed_extensions", f"is not a list of extensions ({exc})") from None
        if self.embed_batch_size is not None:
            self.embed_batch_size = _integer(
                self.embed_batch_size, "embed_batch_size", bad, minimum=1
            )

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


# -- storage options -------------------------------------------------------------------------
_BOOL = "true or false"
_INT = "a whole number >= 0"
_NUMBER = "a number >= 0 (seconds)"
_BOOL_OR_PATH = "true, false or the path of a CA bundle"

#: Storage options that are not strings: ``dotted name -> (kind, None allowed)``. A value given
#: as text (every ``-o KEY=VALUE``) is converted strictly; every other option stays the text
#: given, never YAML-parsed (``0123``, ``yes`` and ``x #y`` are credentials as often as not).
#: Each of these is a non-secret option (:data:`dedup_batch.secrets.NON_SECRET_OPTIONS`).
TYPED_OPTIONS: Mapping[str, tuple[str, bool]] = {
    "anon": (_BOOL, False),
    "use_ssl": (_BOOL, False),
    "requester_pays": (_BOOL, False),
    "version_aware": (_BOOL, False),
    "default_fill_cache": (_BOOL, False),
    "cache_regions": (_BOOL, False),
    "fixed_upload_size": (_BOOL, False),
    "skip_instance_cache": (_BOOL, False),
    "use_listings_cache": (_BOOL, False),
    "default_block_size": (_INT, True),
    "max_concurrency": (_INT, False),
    "max_paths": (_INT, True),
    "listings_expiry_time": (_NUMBER, True),
    "client_kwargs.use_ssl": (_BOOL, False),
    "client_kwargs.verify": (_BOOL_OR_PATH, True),
    "config_kwargs.connect_timeout": (_NUMBER, False),
    "config_kwargs.read_timeout": (_NUMBER, False),
    "config_kwargs.max_pool_connections": (_INT, False),
    "config_kwargs.tcp_keepalive": (_BOOL, False),
    "config_kwargs.parameter_validation": (_BOOL, False),
    "config_kwargs.inject_host_prefix": (_BOOL, False),
    "config_kwargs.retries.max_attempts": (_INT, False),
    "config_kwargs.retries.total_max_attempts": (_INT, False),
    "config_kwargs.s3.use_accelerate_endpoint": (_BOOL, False),
    "config_kwargs.s3.use_dualstack_endpoint": (_BOOL, False),
}

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TRUE = ("true", "yes", "1")
_FALSE = ("false", "no", "0")
_NONE = ("none", "null", "")


def parse_storage_options(
    items: Sequence[str],
    *,
    base: Mapping[str, Any] | None = None,
    source: str = "--storage-option",
) -> dict[str, Any]:
    """``-o KEY=VALUE`` flags as a nested mapping of strings (dotted keys nest).

    ``base`` (the job spec's ``storage_options``) is copied and the flags are set into it, so
    ``-o client_kwargs.region_name=...`` keeps the file's other ``client_kwargs``.

    Values are kept as the exact text given (no YAML parsing); known typed options are
    converted later, strictly, by :func:`coerce_storage_options`. No value ever appears in an
    error message: it may be a credential.

    Raises
    ------
    ConfigError
        An item without ``=``, a key that is not a dotted name (``endpoint-url``), or a key
        given both as a value and as a group (``a=1`` and ``a.b=2``).
    """
    out = _copy_tree(base or {})
    for n, item in enumerate(items, 1):
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"{source} number {n} is not KEY=VALUE (e.g. -o endpoint_url=http://host:9000)"
            )
        parts = key.split(".")
        for part in parts:
            _check_name(part, key, source)
        node = out
        *parents, leaf = parts
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"{source} {'.'.join(parts[: i + 1])!r} is given both as a value and as a "
                    f"group ({key!r}); keep one"
                )
        if isinstance(node.get(leaf), dict):
            raise ConfigError(f"{source} {key!r} is given both as a value and as a group; keep one")
        node[leaf] = raw
    return out


def _copy_tree(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _copy_tree(v) if isinstance(v, Mapping) else v for k, v in options.items()}


def _check_name(part: str, key: str, source: str) -> None:
    if _NAME.fullmatch(part):
        return
    fixed = re.sub(r"[^A-Za-z0-9_]", "_", part)
    hint = f"; did you mean {key.replace(part, fixed)!r}?" if _NAME.fullmatch(fixed) else ""
    raise ConfigError(
        f"{source} {key!r}: option names are letters, digits and '_' (dots nest){hint}"
    )


def coerce_storage_options(
    options: Mapping[str, Any], *, source: str = "job spec"
) -> dict[str, Any]:
    """A copy of ``options`` with the known typed options (:data:`TYPED_OPTIONS`) converted.

    Text is converted strictly (``true``/``false``/``yes``/``no``/``1``/``0``; whole or decimal
    numbers >= 0; ``none``/``null`` where allowed); other values must already have the type.
    Every other option is left exactly as given. Top-level names must be Python names.

    Raises
    ------
    ConfigError
        Naming the option and the expected kind, never the value.
    """
    for key in options:
        if not isinstance(key, str):
            raise ConfigError(f"{source}: storage option names must be text")
        _check_name(key, key, f"{source}: storage option")
    return _coerce(options, "", source)


def _coerce(options: Mapping[str, Any], prefix: str, source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in options.items():
        name = f"{prefix}{k}"
        if name in TYPED_OPTIONS:
            out[k] = _typed(name, v, source)
        elif isinstance(v, Mapping):
            out[k] = _coerce(v, name + ".", source)
        else:
            out[k] = v
    return out


def _typed(name: str, value: Any, source: str) -> Any:
    kind, nullable = TYPED_OPTIONS[name]
    bad = ConfigError(f"{source}: storage option {name!r} must be {kind}")
    if isinstance(value, str):
        text = value.strip().lower()
        if nullable and text in _NONE:
            return None
        if kind in (_BOOL, _BOOL_OR_PATH) and text in _TRUE + _FALSE:
            return text in _TRUE
        if kind == _BOOL_OR_PATH and value:
            return value
        if kind == _INT and re.fullmatch(r"[0-9]+", text):
            return int(text)
        if kind == _NUMBER and re.fullmatch(r"[0-9]+(\.[0-9]*)?|\.[0-9]+", text):
            return float(text)
        raise bad
    if value is None and nullable:
        return None
    if isinstance(value, bool):
        if kind in (_BOOL, _BOOL_OR_PATH):
            return value
        raise bad
    if kind == _INT and isinstance(value, int) and value >= 0:
        return value
    if kind == _NUMBER and isinstance(value, int | float) and math.isfinite(value) and value >= 0:
        return value
    raise bad


def check_option_names(
    options: Mapping[str, Any], urls: Sequence[str], *, source: str = "job spec"
) -> None:
    """Refuse storage option names the filesystem of ``urls`` does not take.

    s3fs hands names it does not know to botocore's session, which fails only at the first
    request (a misspelt ``endpoint-url`` is silently not an endpoint), so for ``s3://`` URLs
    the names are checked against s3fs's keyword arguments, and ``config_kwargs`` against
    botocore's ``Config``. Other backends are not checked.

    Raises
    ------
    ConfigError
        Naming the option and, where one is close, the option meant.
    """
    protocols = {u.split("://", 1)[0].lower() for u in urls if "://" in u}
    if not protocols & {"s3", "s3a"} or not options:
        return
    known, config_known = _s3_option_names()
    _check_known(options, known, "s3fs", "", source)
    config = options.get("config_kwargs")
    if isinstance(config, Mapping) and config_known:
        _check_known(config, config_known, "botocore's Config", "config_kwargs.", source)


def _check_known(
    options: Mapping[str, Any], known: frozenset[str], what: str, prefix: str, source: str
) -> None:
    for name in options:
        if name in known:
            continue
        close = difflib.get_close_matches(str(name), sorted(known), n=1)
        hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
        raise ConfigError(
            f"{source}: storage option {prefix + str(name)!r} is not an option of {what}{hint}"
        )


@functools.lru_cache(maxsize=1)
def _s3_option_names() -> tuple[frozenset[str], frozenset[str]]:
    """s3fs's keyword arguments (from the installed version) and botocore Config's."""
    import fsspec

    try:
        cls = fsspec.get_filesystem_class("s3")
    except (ImportError, ValueError):
        return frozenset(NON_SECRET_OPTIONS), frozenset()
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self":
                names.add(p.name)
    # fsspec's instance and listings caches take these; s3fs passes the rest of its keyword
    # arguments to aiobotocore's session, whose one user-facing argument is ``profile``.
    names |= {"skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths"}
    names |= {"profile"}
    try:
        from botocore.config import Config

        config = frozenset(Config.OPTION_DEFAULTS)
    except ImportError:
        config = frozenset()
    return frozenset(names), config
