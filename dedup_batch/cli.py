"""The ``dedup-batch`` command: a thin argparse layer over :mod:`dedup_batch.pipeline`.

Every job option is a flag here and a key in the job spec (``--config``); flags override the
file. The job-spec flags are generated from the :class:`~dedup_batch.config.JobSpec` field
metadata (:class:`~dedup_batch.config.Flag`); only the flags that are not job-spec keys are
written here.

Errors the user can fix print one line and exit 2 (usage/input), 3 (safety limit refused) or 4
(finished, but some objects were not deleted); anything else exits 1, with a traceback only under
``--debug``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

from . import __version__
from .config import (
    CLI,
    COMMON,
    GLOBAL,
    RUN_EMBED,
    JobSpec,
    load_spec,
    parse_storage_options,
)
from .errors import ConfigError, DedupError
from .policies import KEYS

__all__ = ["main"]

log = logging.getLogger("dedup_batch.cli")

EXIT_INCOMPLETE = 4
EXIT_INTERRUPTED = 130


# -- argument groups -------------------------------------------------------------------------
#: ``(key, Flag)`` for every flag the :class:`JobSpec` fields declare, in field order.
_FLAGS = tuple(
    (f.name, flag) for f in dataclasses.fields(JobSpec) for flag in f.metadata.get(CLI, ())
)


def _job_flags(
    p: argparse.ArgumentParser | argparse._ArgumentGroup,
    command: str,
    group: str | None,
    **overrides: Any,
) -> None:
    """Add the flags of ``command`` in ``group``, as the :class:`JobSpec` fields declare them.

    One argument per :class:`~dedup_batch.config.Flag`, in field order. A flag stored under its
    key defaults to ``None``, so that a flag not given leaves the job spec's value alone.
    """
    for key, flag in _FLAGS:
        if command not in flag.commands or flag.group != group:
            continue
        kw: dict[str, Any] = {"action": flag.action, "help": flag.help}
        kw["dest"] = flag.dest or key
        if kw["dest"] == key:
            kw["default"] = None
        for name in ("metavar", "type", "choices"):
            if getattr(flag, name) is not None:
                kw[name] = getattr(flag, name)
        kw.update(overrides)
        p.add_argument(*flag.flags or ("--" + key.replace("_", "-"),), **kw)


def _add_common(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument(
        "--config",
        metavar="YAML",
        help="job spec file (keys as these flags, with _); flags override it",
    )
    _job_flags(p, command, COMMON)


def _add_report_caps(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("report size")
    g.add_argument(
        "--clusters-per-page",
        type=int,
        default=50,
        metavar="N",
        help="clusters on each report page (default 50)",
    )
    g.add_argument(
        "--max-pages",
        type=int,
        default=20,
        metavar="N",
        help="report pages at most; riskier clusters come first (default 20)",
    )
    g.add_argument(
        "--max-members",
        type=int,
        default=24,
        metavar="N",
        help="thumbnails per cluster at most: keepers, then the farthest (default 24)",
    )
    g.add_argument(
        "--thumb-px", type=int, default=160, metavar="PX", help="thumbnail size (default 160)"
    )


def _add_sweep(p: argparse.ArgumentParser) -> None:
    """The sweep's job-spec flags, then its own (arguments of ``pipeline.sweep``)."""
    g = p.add_argument_group("sweep")
    _job_flags(g, "sweep", "sweep")
    g.add_argument("--eps-min", type=float, required=True, help="smallest eps to try")
    g.add_argument("--eps-max", type=float, required=True, help="largest eps to try")
    g.add_argument("--steps", type=int, default=20, help="eps values from min to max (default 20)")
    g.add_argument(
        "--truth",
        metavar="CSV",
        help="labelled CSV (path,group): print precision, recall and F1 of the "
        "deletions at each eps; a deletion is right when it shares its keeper's group",
    )
    g.add_argument(
        "-k",
        "--k",
        dest="k",
        type=int,
        help="neighbour rank for the k-distance plot (default min_samples)",
    )
    g.add_argument(
        "--pairs", type=int, default=12, help="pairs shown on each side of --eps (default 12)"
    )


def _add_global(p: argparse.ArgumentParser, default: Any) -> None:
    g = p.add_argument_group("output")
    g.add_argument(
        "--debug",
        action="store_true",
        default=default if default is not None else False,
        help="show tracebacks and debug logs",
    )
    _job_flags(g, GLOBAL, "output", default=default)
    g.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default if default is not None else False,
        help="warnings and errors only",
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dedup-batch",
        description="Remove near-duplicate images: DBSCAN over their embeddings, one keeper per "
        "cluster, parallel deletes on Dask. Nothing is deleted without 'apply' or "
        "'run --apply'.",
    )
    p.add_argument("--version", action="version", version=f"dedup-batch {__version__}")
    _add_global(p, None)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # The global flags work after the command too (and show in COMMAND --help); there they
    # default to SUPPRESS, so a flag given before the command is not reset.
    glob = argparse.ArgumentParser(add_help=False)
    _add_global(glob, argparse.SUPPRESS)
    real_add = sub.add_parser

    def add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
        return real_add(name, parents=[glob], **kw)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    sp = sub.add_parser(
        "plan",
        help="cluster the features and write a plan (deletes nothing)",
        description="Load, cluster, choose keepers and write plan.parquet, "
        "summary.json and job.yaml to --out. Deletes nothing. A --config job spec with "
        "'embed: MODEL' embeds the new or changed images first, as 'run' does.",
    )
    _add_common(sp, "plan")
    _job_flags(sp.add_argument_group("plan"), "plan", "plan")
    sp.set_defaults(func=_cmd_plan)

    sp = sub.add_parser(
        "apply",
        help="delete the duplicates listed in a plan",
        description="Delete the keep=False objects of the plan in DIR, in "
        "batches on Dask workers. Journaled: re-run to resume.",
    )
    sp.add_argument("plan_dir", metavar="DIR", help="plan directory written by 'plan'")
    _add_common(sp, "apply")
    _job_flags(sp.add_argument_group("apply"), "apply", "apply")
    sp.set_defaults(func=_cmd_apply)

    sp = sub.add_parser(
        "run",
        help="plan, then apply with --apply (or mode: apply)",
        description="Plan; then apply only when --apply is given or the job "
        "spec says 'mode: apply'. Re-running resumes.",
    )
    _add_common(sp, "run")
    for group in ("plan", "apply", RUN_EMBED):
        _job_flags(sp.add_argument_group(group), "run", group)
    _job_flags(sp, "run", None)
    sp.set_defaults(func=_cmd_run)

    sp = sub.add_parser(
        "restore",
        help="put back what 'apply --trash' moved",
        description="Copy the objects an apply moved to the trash back to their exact "
        "original paths (verified), then remove them from the trash. Objects that exist "
        "again at the original path are left alone.",
    )
    sp.add_argument("plan_dir", metavar="DIR", help="plan directory of the apply")
    _add_common(sp, "restore")
    _job_flags(sp, "restore", None)
    sp.set_defaults(func=_cmd_restore)

    sp = sub.add_parser(
        "report",
        help="(re)build report.html for a plan directory",
        description="Write report.html (and report-2.html... for big plans) into DIR: "
        "totals, histograms, and the clusters as thumbnail grids, riskiest first. "
        "Self-contained: opens from a bucket or a laptop with no server.",
    )
    sp.add_argument("plan_dir", metavar="DIR", help="plan directory written by 'plan'")
    _add_common(sp, "report")
    _job_flags(sp, "report", None)
    _add_report_caps(sp)
    sp.set_defaults(func=_cmd_report)

    sp = sub.add_parser(
        "sweep",
        help="show how clusters and deletions move with eps (choose eps)",
        description="Cluster the features at every eps from --eps-min to --eps-max in one "
        "pass and write sweep.csv, sweep.png, k-distance.png and pairs.html (pairs just "
        "inside and just outside --eps). With --truth, print precision, recall and F1 "
        "of the deletions at each eps. Deletes nothing.",
    )
    _add_common(sp, "sweep")
    _add_sweep(sp)
    sp.set_defaults(func=_cmd_sweep)

    sp = sub.add_parser(
        "embed",
        help="compute features for the images under --root (PDQ by default)",
        description="List the images under --root, read and hash them on the Dask workers in "
        "batches, and write sharded Parquet features to --out for 'plan --features'. "
        "Incremental: only new or changed images are read. Unreadable images are listed in "
        "OUT/embed-errors.csv. Deletes nothing.",
    )
    _add_common(sp, "embed")
    _job_flags(sp.add_argument_group("embed"), "embed", "embed")
    sp.set_defaults(func=_cmd_embed)

    sp = sub.add_parser(
        "demo",
        help="build a small example collection and plan it",
        description="Write a folder of images with near-duplicates, embed them with PDQ "
        "on a local Dask cluster (as 'run --embed pdq'), then plan it (and apply with --apply).",
    )
    sp.add_argument(
        "--dir",
        default="./demo-data",
        help="where to build it (default ./demo-data; rebuilt each time)",
    )
    sp.add_argument("--images", type=int, default=120, help="distinct images (default 120)")
    _job_flags(sp, "demo", None)
    sp.set_defaults(func=_cmd_demo)
    return p


# -- spec assembly -------------------------------------------------------------------------
# The keys whose flags store under the key itself (the others are read by the commands:
# -o is merged into storage_options, --apply decides with mode).
_SPEC_FLAGS = tuple(dict.fromkeys(key for key, flag in _FLAGS if flag.dest in (None, key)))


def _spec(args: argparse.Namespace) -> JobSpec:
    base: dict[str, Any] = {}
    source = "flags"
    if getattr(args, "config", None):
        base = load_spec(args.config)
        source = args.config
    spec = JobSpec.from_mapping(base, source=source)
    overrides = {k: getattr(args, k) for k in _SPEC_FLAGS if getattr(args, k, None) is not None}
    flags = getattr(args, "storage_option", None) or []
    overrides["storage_options"] = parse_storage_options(flags, base=spec.storage_options)
    spec = spec.merged(overrides, source="flags") if overrides else spec
    from .progress import register_secrets

    register_secrets(spec.storage_options)  # scrubbed from every log line from here on
    if spec.log_format != (args.log_format or "text"):  # the job spec may ask for JSON logs
        from .progress import configure_logging

        configure_logging(spec.log_format, logging.getLogger("dedup_batch").level)
    return spec


# -- commands ------------------------------------------------------------------------------
def _cmd_plan(args: argparse.Namespace) -> int:
    from .pipeline import dask_client, plan, run

    spec = _spec(args)
    with dask_client(spec) as client:
        if spec.embed:
            # a job spec that embeds (embed: MODEL): its plan is run's dry run, embed included;
            # a job spec's 'mode: apply' is for run, never for plan
            result, _ = run(spec.merged({"mode": "plan"}), client)
            print(result.embedded.summary_line())
        else:
            result = plan(spec, client)
    _print_plan(result.summary, result.out, reused=result.reused)
    print(f"dry run: nothing deleted. To delete: {_apply_hint(spec, result.out)}")
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    from .pipeline import apply, dask_client

    spec = _spec(args)
    with dask_client(spec) as client:
        result = apply(args.plan_dir, spec, client)
    return _print_apply(result)


def _cmd_restore(args: argparse.Namespace) -> int:
    from .pipeline import dask_client, restore

    spec = _spec(args)
    with dask_client(spec) as client:
        result = restore(args.plan_dir, spec, client)
    return _print_apply(result)


def _cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import dask_client, run

    spec = _spec(args)
    with dask_client(spec) as client:
        planned, applied = run(spec, client, apply_now=args.apply)
    if planned.embedded is not None:
        print(planned.embedded.summary_line())
    _print_plan(planned.summary, planned.out, reused=planned.reused)
    if applied is None:
        print(f"dry run: nothing deleted. To delete: {_apply_hint(spec, planned.out)}")
        return 0
    return _print_apply(applied)


def _cmd_report(args: argparse.Namespace) -> int:
    from .pipeline import dask_client, report

    spec = _spec(args)
    with dask_client(spec, local=False) as client:
        result = report(
            args.plan_dir,
            spec,
            client,
            clusters_per_page=args.clusters_per_page,
            max_pages=args.max_pages,
            max_members=args.max_members,
            thumb_px=args.thumb_px,
        )
    bad = {k: v for k, v in result.thumbnails.items() if k != "ok"}
    print(
        f"report: {result.clusters_shown:,} of {result.clusters_total:,} clusters with "
        f"duplicates on {len(result.pages)} page(s) -> {result.url}"
    )
    if bad:
        print("note: placeholders for " + ", ".join(f"{v} {k}" for k, v in sorted(bad.items())))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .pipeline import dask_client, sweep
    from .sweep import eps_range

    spec = _spec(args)
    # checked before a LocalCluster starts: a missing key or a bad range costs no cluster
    spec.require("features", "root")
    eps_values = eps_range(args.eps_min, args.eps_max, args.steps)
    with dask_client(spec) as client:
        result = sweep(
            spec,
            client,
            eps_values=eps_values,
            out=args.out,
            k=args.k,
            truth=args.truth,
            keep=args.keep,
            n_pairs=args.pairs,
        )
    print(result.format_table())
    print("sweep: wrote " + ", ".join(result.files.values()))
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from .embed import embed_for_spec, get_model
    from .pipeline import dask_client

    spec = _spec(args)
    if not spec.embed_out:
        raise ConfigError("embed: --out is required (or embed_out in --config)")
    get_model(spec.embed or "pdq")  # an unknown model or a missing package: before Dask starts
    with dask_client(spec) as client:
        _, result = embed_for_spec(spec, client)
    print(result.summary_line())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    code = 0
    planned, applied = run_demo(
        args.dir, n_images=args.images, apply_now=args.apply, n_workers=args.n_workers
    )
    print(planned.embedded.summary_line())
    _print_plan(planned.summary, planned.out)
    if applied is None:
        print(f"dry run: nothing deleted. To delete: dedup-batch apply {planned.out}")
    else:
        code = _print_apply(applied)
    return code


def _apply_hint(spec: JobSpec, out: str) -> str:
    """The command that applies the plan in ``out``, runnable as printed.

    ``apply DIR`` reads the root and the non-secret storage options from ``DIR/job.yaml``;
    but a plan directory in a bucket can only be read with those options, so they are part
    of the command then (secrets never are: the user is told to pass them again).
    """
    from .storage import redact

    cmd = ["dedup-batch", "apply", out]
    remote = "://" in out and not out.startswith("file://")
    secret = False
    if remote:
        for key, value in _flatten(redact(spec.storage_options)):
            if value == "***":
                secret = True
            else:
                cmd += ["-o", f"{key}={value}"]
    text = " ".join(shlex.quote(c) for c in cmd)
    if secret:
        text += "  (plus the credential options you gave this command)"
    return text


def _flatten(options: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in (options or {}).items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _print_plan(summary: dict[str, Any], out: str, *, reused: bool = False) -> None:
    c = summary["counts"]
    mb = summary["reclaimable_bytes"] / 1e6
    print(
        f"plan{' (reused)' if reused else ''}: {c['paths']:,} images in {c['clusters']:,} "
        f"clusters ({c['duplicate_clusters']:,} with duplicates); keep {c['keep']:,}, "
        f"delete {c['delete']:,} ({mb:,.1f} MB) -> {out}"
    )
    if c.get("missing"):
        print(f"note: {c['missing']:,} feature paths have no object under the root")


def _print_apply(result: Any) -> int:
    info = result.to_dict()
    what = info.get("operation", "apply") + (" (dry run)" if info.get("dry_run") else "")
    counts = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in info["counts"].items())
    batches = info["batches"]
    if batches["total"] and not batches["run"] and batches["skipped_finished"] == batches["total"]:
        # Every batch was journaled as finished by an earlier run: nothing was touched now.
        print(f"{what}: already finished: nothing to do (earlier runs: {counts})")
    else:
        print(f"{what}: {info['planned']:,} planned; {counts or 'nothing to do'}")
    if info.get("dry_run") and result.report:
        _print_head(result.report, DRY_RUN_LINES)
    if not result.ok:
        print(
            f"{what} finished, but {info['not_done']:,} objects were not done: see "
            f"{info.get('report') or 'completion-report.csv'}",
            file=sys.stderr,
        )
        return EXIT_INCOMPLETE
    return 0


def _keep_values_attached(argv: Sequence[str]) -> list[str]:
    """``--keep -pixels,path`` as ``--keep=-pixels,path``.

    argparse reads a value that starts with '-' as the next option and stops with "expected
    one argument"; a descending first key is the common case (the default starts with one).
    """
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--keep" and arg[:1] == "-" and arg[1:].split(",")[0] in KEYS:
            out[-1] = f"--keep={arg}"
        else:
            out.append(arg)
    return out


#: Lines of would-delete.csv a dry run prints.
DRY_RUN_LINES = 10


def _print_head(url: str, n: int) -> None:
    from .storage import read_url

    if "://" in url and not url.startswith("file://"):
        print(f"  the list: {url}")
        return
    try:
        lines = read_url(url).decode("utf-8").splitlines()
    except (OSError, ValueError):
        return
    for line in lines[: n + 1]:
        print("  " + line)
    if len(lines) > n + 1:
        print(f"  ... {len(lines) - 1 - n:,} more in {url}")


# -- entry point ---------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    from .progress import configure_logging

    parser = _parser()
    args = parser.parse_args(_keep_values_attached(sys.argv[1:] if argv is None else argv))
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    configure_logging(args.log_format or "text", level)
    # distributed's own INFO chatter (worker start/stop) drowns the job's lines
    logging.getLogger("distributed").setLevel(logging.DEBUG if args.debug else logging.ERROR)
    try:
        return int(args.func(args) or 0)
    except DedupError as exc:
        from .progress import scrub_message

        if args.debug:
            _print_traceback()
        print(scrub_message(f"error: {exc}"), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        from .progress import scrub_message
        from .storage import setup_error

        if args.debug:
            _print_traceback()
        # No credentials, refused credentials, an unreachable endpoint: the user's to fix.
        setup = setup_error(exc)
        if setup is not None:
            print(scrub_message(f"error: {setup}"), file=sys.stderr)
            return setup.exit_code
        # A bug: say so in one line, traceback only with --debug.
        print(
            scrub_message(
                f"error: unexpected {type(exc).__name__}: {exc} (re-run with --debug for the "
                "traceback)"
            ),
            file=sys.stderr,
        )
        return 1


def _print_traceback() -> None:
    from .progress import scrub_message

    print(scrub_message(traceback.format_exc()), end="", file=sys.stderr)
