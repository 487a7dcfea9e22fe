"""The ``dedup-batch`` command: a thin argparse layer over :mod:`dedup_batch.pipeline`.

Every job option is a flag here and a key in the job spec (``--config``); flags override the
file. Errors the user can fix print one line and exit 2 (usage/input), 3 (safety limit refused)
or 4 (finished, but some objects were not deleted); anything else exits 1, with a traceback only
under ``--debug``.
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
from .config import DISTRIBUTED, METRICS, JobSpec, load_spec, parse_storage_options
from .errors import ConfigError, DedupError
from .policies import KEYS, POLICIES

__all__ = ["main"]

log = logging.getLogger("dedup_batch.cli")

EXIT_INCOMPLETE = 4
EXIT_INTERRUPTED = 130


# -- argument groups -------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="YAML",
        help="job spec file (keys as these flags, with _); flags override it",
    )
    p.add_argument(
        "--storage-option",
        "-o",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="fsspec storage option, e.g. endpoint_url=http://127.0.0.1:9000 "
        "(repeatable; dotted keys nest: client_kwargs.region_name=eu-west-1)",
    )
    p.add_argument(
        "--scheduler",
        metavar="ADDR",
        help="Dask scheduler address (default: $DASK_SCHEDULER_ADDRESS, else a "
        "LocalCluster on this machine)",
    )
    p.add_argument("--n-workers", type=int, help="LocalCluster worker processes")
    p.add_argument("--threads-per-worker", type=int, help="LocalCluster threads per worker")
    p.add_argument(
        "--distributed",
        choices=DISTRIBUTED,
        help="leave the vectors on the Dask workers: auto (default: when they would not fit "
        "comfortably on this machine or one worker), always, never",
    )


def _add_plan(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("plan")
    g.add_argument(
        "--features",
        action="append",
        metavar="URL",
        help="feature shards: path, URL or glob (repeatable), e.g. "
        "'./features/*.parquet' or 's3://bkt/features/part-*.parquet'",
    )
    g.add_argument(
        "--root",
        metavar="URL",
        help="the image collection the feature paths are relative to; nothing "
        "outside it is ever deleted",
    )
    g.add_argument(
        "--allow-pickle",
        action="store_true",
        default=None,
        help="read pandas pickle shards (.pkl): unpickling runs code from the file, "
        "so only for files you trust",
    )
    g.add_argument(
        "--eps",
        type=float,
        help="DBSCAN eps: the largest distance at which two images count as "
        "near-duplicates (required, unless the shards were made by 'embed', whose model "
        "gives its own)",
    )
    g.add_argument("--min-samples", type=int, help="DBSCAN min_samples (default 1)")
    g.add_argument("--metric", choices=METRICS, help="distance metric (default euclidean)")
    g.add_argument(
        "--keep",
        metavar="POLICY",
        help="which image of a cluster to keep: a policy, or comma-separated sort keys where "
        "the first image of the sorted cluster is kept; KEY sorts ascending, -KEY descending. "
        "Keys: pixels (fewest first; -pixels: most first; width x height from the image "
        "header), copy (names without a copy marker such as ' (1)', ' copy', 'Copy of ', "
        "'-edited' first; -copy: marked first), mtime (oldest first; -mtime: newest first), "
        "size (smallest first; -size: largest first), path (first in code-point order; -path: "
        "last; ends every list), centroid (nearest the cluster's mean vector; first key only). "
        "Unknown values sort last. Policies: "
        + "; ".join(f"{name} = {keys}" for name, keys in POLICIES.items())
        + " (default original)",
    )
    g.add_argument(
        "--protect",
        action="append",
        metavar="PATTERN",
        help="never delete the images PATTERN matches (repeatable); they are kept before any "
        "other. Relative to --root (or an absolute path/URL under it), case-sensitive. Always "
        "a string prefix ('family' protects family/ and family-2/); with * ? or [ also a "
        "glob in which * crosses '/' ('family/*' protects family/ at any depth, '*.png' every "
        "PNG; [abc] is a character class and literal brackets alike). A pattern that matches "
        "nothing is a warning in the plan and the report",
    )
    g.add_argument(
        "--max-keeper-distance",
        metavar="D",
        help="chain guard: add keepers until every deleted image is within D of its "
        "keeper (default: eps; 'none' = one keeper per cluster, as the notebook)",
    )
    g.add_argument("--out", metavar="DIR", help="plan directory (default ./dedup-plan)")
    g.add_argument(
        "--no-report",
        dest="report",
        action="store_false",
        default=None,
        help="do not write report.html",
    )


def _add_apply(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("apply")
    g.add_argument(
        "--dry-run",
        action="store_true",
        default=None,
        help="touch nothing; report what would be deleted",
    )
    g.add_argument(
        "--max-delete",
        type=int,
        metavar="N",
        help="refuse the whole apply (exit 3) if the plan deletes more than N objects",
    )
    g.add_argument(
        "--max-delete-fraction",
        type=float,
        metavar="F",
        help="refuse the whole apply (exit 3) if it deletes more than this fraction "
        "of the plan's paths (default 0.5; 1 allows any)",
    )
    g.add_argument(
        "--trash",
        metavar="URL",
        help="move duplicates under URL (keeping their relative paths) instead of deleting them",
    )
    g.add_argument("--batch-size", type=int, help="objects per delete request (<= 1000)")
    g.add_argument("--concurrency", type=int, help="delete batches in flight at most")


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
    g = p.add_argument_group("sweep")
    g.add_argument(
        "--features",
        action="append",
        metavar="URL",
        help="feature shards: path, URL or glob (repeatable)",
    )
    g.add_argument(
        "--root",
        metavar="URL",
        help="the image collection the feature paths are relative to",
    )
    g.add_argument(
        "--allow-pickle",
        action="store_true",
        default=None,
        help="read pandas pickle shards (.pkl): runs code from the file",
    )
    g.add_argument("--eps-min", type=float, required=True, help="smallest eps to try")
    g.add_argument("--eps-max", type=float, required=True, help="largest eps to try")
    g.add_argument("--steps", type=int, default=20, help="eps values from min to max (default 20)")
    g.add_argument(
        "--eps",
        type=float,
        help="the eps to look at closely: marked on the plots, pairs.html shows the "
        "pairs just inside and outside it (default: the job's eps, else mid-range)",
    )
    g.add_argument("--min-samples", type=int, help="DBSCAN min_samples (default 1)")
    g.add_argument("--metric", choices=METRICS, help="distance metric (default euclidean)")
    g.add_argument(
        "--keep",
        choices=("first-path", "last-path"),
        help="keeper policy used to score deletions with --truth (default first-path)",
    )
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
    g.add_argument(
        "--out",
        metavar="DIR",
        help="where to write (default: DIR/sweep under the plan directory --out of the "
        "job spec, i.e. ./dedup-plan/sweep)",
    )


_EMBED_MODEL_HELP = (
    "embedding model (default pdq: Meta's PDQ hash, 256 bits, no weights); also "
    "onnx:PATH[?options], timm:NAME[?weights=PATH], open_clip:ARCH/PRETRAINED (README: models)"
)
_EMBED_EXTENSIONS_HELP = (
    "comma-separated file extensions to embed, case-insensitive (default "
    "jpg,jpeg,png,webp,gif,tif,tiff,bmp, plus heic,heif,avif where Pillow reads them)"
)


def _add_embed(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("embed")
    g.add_argument(
        "--root",
        metavar="URL",
        help="the image collection to embed: a folder, s3://bucket/prefix or any fsspec URL",
    )
    g.add_argument(
        "--out",
        dest="embed_out",
        metavar="URL",
        help="folder for the feature shards (part-*.parquet) and embed-errors.csv (required; "
        "job-spec key embed_out); shards of earlier runs there are kept and only new or "
        "changed images are embedded",
    )
    g.add_argument(
        "--model",
        dest="embed",
        metavar="NAME[:ARG]",
        help=_EMBED_MODEL_HELP,
    )
    g.add_argument(
        "--extensions",
        dest="embed_extensions",
        metavar="LIST",
        help=_EMBED_EXTENSIONS_HELP,
    )
    g.add_argument(
        "--batch-size",
        dest="embed_batch_size",
        type=int,
        metavar="N",
        help="images per Dask task and per shard, at most (default 256)",
    )


def _add_run_embed(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("embed first (run --embed)")
    g.add_argument(
        "--embed",
        metavar="MODEL",
        help="embed the new or changed images under --root with MODEL first (pdq, onnx:..., "
        "timm:..., open_clip:...), then plan their features (instead of --features)",
    )
    g.add_argument(
        "--embed-out",
        metavar="URL",
        help="folder for the shards (default: OUT/features, beside the plan)",
    )
    g.add_argument("--embed-extensions", metavar="LIST", help=_EMBED_EXTENSIONS_HELP)
    g.add_argument(
        "--embed-batch-size", type=int, metavar="N", help="images per Dask task (default 256)"
    )


def _add_global(p: argparse.ArgumentParser, default: Any) -> None:
    g = p.add_argument_group("output")
    g.add_argument(
        "--debug",
        action="store_true",
        default=default if default is not None else False,
        help="show tracebacks and debug logs",
    )
    g.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=default,
        help="log lines as text (default) or one JSON object per line",
    )
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
        "summary.json and job.yaml to --out. Deletes nothing.",
    )
    _add_common(sp)
    _add_plan(sp)
    sp.set_defaults(func=_cmd_plan)

    sp = sub.add_parser(
        "apply",
        help="delete the duplicates listed in a plan",
        description="Delete the keep=False objects of the plan in DIR, in "
        "batches on Dask workers. Journaled: re-run to resume.",
    )
    sp.add_argument("plan_dir", metavar="DIR", help="plan directory written by 'plan'")
    _add_common(sp)
    _add_apply(sp)
    sp.set_defaults(func=_cmd_apply)

    sp = sub.add_parser(
        "run",
        help="plan, then apply with --apply (or mode: apply)",
        description="Plan; then apply only when --apply is given or the job "
        "spec says 'mode: apply'. Re-running resumes.",
    )
    _add_common(sp)
    _add_plan(sp)
    _add_apply(sp)
    _add_run_embed(sp)
    sp.add_argument(
        "--apply",
        action="store_true",
        help="delete the duplicates after planning (default: plan only)",
    )
    sp.set_defaults(func=_cmd_run)

    sp = sub.add_parser(
        "restore",
        help="put back what 'apply --trash' moved",
        description="Copy the objects an apply moved to the trash back to their exact "
        "original paths (verified), then remove them from the trash. Objects that exist "
        "again at the original path are left alone.",
    )
    sp.add_argument("plan_dir", metavar="DIR", help="plan directory of the apply")
    _add_common(sp)
    sp.add_argument(
        "--trash", metavar="URL", help="the trash URL (default: the one the apply journaled)"
    )
    sp.add_argument(
        "--dry-run",
        action="store_true",
        default=None,
        help="touch nothing; report what would be restored",
    )
    sp.add_argument("--concurrency", type=int, help="restore batches in flight at most")
    sp.set_defaults(func=_cmd_restore)

    sp = sub.add_parser(
        "report",
        help="(re)build report.html for a plan directory",
        description="Write report.html (and report-2.html... for big plans) into DIR: "
        "totals, histograms, and the clusters as thumbnail grids, riskiest first. "
        "Self-contained: opens from a bucket or a laptop with no server.",
    )
    sp.add_argument("plan_dir", metavar="DIR", help="plan directory written by 'plan'")
    _add_common(sp)
    sp.add_argument(
        "--root",
        metavar="URL",
        help="image root (default: the 'root' recorded in DIR/job.yaml)",
    )
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
    _add_common(sp)
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
    _add_common(sp)
    _add_embed(sp)
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
    sp.add_argument("--apply", action="store_true", help="also delete the duplicates")
    sp.add_argument("--n-workers", type=int, help="LocalCluster worker processes")
    sp.set_defaults(func=_cmd_demo)
    return p


# -- spec assembly -------------------------------------------------------------------------
# Every job-spec key is a flag of the same name, but for these (set another way).
_SPEC_FLAGS = tuple(
    f.name for f in dataclasses.fields(JobSpec) if f.name not in ("storage_options", "mode")
)


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
    from .pipeline import dask_client, plan

    spec = _spec(args)
    with dask_client(spec) as client:
        result = plan(spec, client)
    _print_plan(result.summary, result.out)
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
