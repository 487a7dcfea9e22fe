"""End to end on local files: the demo, the notebook's behaviour, run/resume, CLI exit codes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
from sklearn.cluster import DBSCAN

from dedup_batch.cli import main
from dedup_batch.demo import DEMO_EPS, make_demo


def assert_one_error_line(stderr: str) -> str:
    """The CLI's failure output: exactly one ``error:`` line and no traceback."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("demo") / "data"
    return make_demo(base, n_images=30, seed=3) | {"base": base}


def fresh_copy(demo: dict, tmp_path: Path) -> tuple[Path, str]:
    """A private copy of the demo photos + features (tests delete from it)."""
    dst = tmp_path / "data"
    shutil.copytree(demo["base"], dst)
    return dst, str(dst / "features" / "part-*.parquet")


def test_plan_then_apply_removes_exactly_the_near_duplicates(
    demo: dict, tmp_path: Path, capsys
) -> None:
    base, features = fresh_copy(demo, tmp_path)
    photos, out = base / "photos", tmp_path / "plan"
    before = files_under(photos)
    code = main(
        [
            "plan",
            "--features",
            features,
            "--root",
            str(photos),
            "--eps",
            str(DEMO_EPS),
            "--out",
            str(out),
            "--n-workers",
            "1",
        ]
    )
    assert code == 0
    assert files_under(photos) == before  # plan deletes nothing
    assert "dry run: nothing deleted" in capsys.readouterr().out
    plan = pd.read_parquet(out / "plan.parquet")
    summary = json.loads((out / "summary.json").read_text())
    groups = demo["groups"]
    # one keeper per original, and each deleted file is a copy of its keeper's original
    assert plan["keep"].sum() == len(set(groups.values()))
    dup = plan[~plan["keep"]]
    assert all(groups[p] == groups[k] for p, k in zip(dup["path"], dup["keeper"], strict=True))
    assert summary["counts"]["delete"] == demo["duplicates"] == len(dup)
    assert summary["reclaimable_bytes"] == sum((photos / p).stat().st_size for p in dup["path"])
    assert set(summary["timings"]) >= {"load", "list", "cluster", "select"}

    assert main(["apply", str(out), "--n-workers", "1"]) == 0
    assert files_under(photos) == before - set(dup["path"])
    # a second apply of a finished plan is a no-op
    assert main(["apply", str(out), "--n-workers", "1"]) == 0
    assert files_under(photos) == before - set(dup["path"])


def notebook(features: pd.DataFrame, photos: Path, eps: float) -> None:
    """The seed notebook, verbatim in spirit: sklearn DBSCAN, keep the largest path."""
    labels = DBSCAN(min_samples=1, eps=eps).fit_predict(features)
    for label in set(labels):
        paths = sorted(features.index[labels == label], reverse=True)
        for path in paths[1:]:
            os.remove(os.path.join(photos, path))


@pytest.mark.parametrize("eps", [DEMO_EPS, 0.75, 1.0])
def test_notebook_settings_delete_exactly_what_the_notebook_deleted(
    demo: dict, tmp_path: Path, eps: float
) -> None:
    # The notebook's layout: a folder of images + features.pkl (index = relative path,
    # 256 float columns named 0..255). eps 0.75 and 1.0 chain distinct images together.
    base, _ = fresh_copy(demo, tmp_path)
    frames = [pd.read_parquet(f) for f in sorted((base / "features").glob("*.parquet"))]
    features = pd.concat(frames)
    features.columns = range(features.shape[1])
    features.index.name = None
    pkl = base / "features.pkl"
    features.to_pickle(pkl)
    theirs = tmp_path / "theirs"
    shutil.copytree(base / "photos", theirs)
    notebook(features, theirs, eps)

    code = main(
        [
            "run",
            "--features",
            str(pkl),
            "--allow-pickle",
            "--root",
            str(base / "photos"),
            "--eps",
            str(eps),
            "--keep",
            "last-path",
            "--max-keeper-distance",
            "none",
            "--out",
            str(tmp_path / "plan"),
            "--apply",
            # eps 1.0 chains most of the demo together: the notebook deleted more than half,
            # which apply refuses unless told otherwise
            "--max-delete-fraction",
            "1",
            "--n-workers",
            "1",
        ]
    )
    assert code == 0
    assert files_under(base / "photos") == files_under(theirs)
    assert len(files_under(theirs)) < len(features)


def test_chain_guard_keeps_more_than_the_notebook_when_clusters_chain(
    demo: dict, tmp_path: Path
) -> None:
    base, features = fresh_copy(demo, tmp_path)
    args = [
        "plan",
        "--features",
        features,
        "--root",
        str(base / "photos"),
        "--eps",
        "1.0",
        "--n-workers",
        "1",
    ]
    assert main([*args, "--out", str(tmp_path / "guarded")]) == 0
    assert main([*args, "--out", str(tmp_path / "loose"), "--max-keeper-distance", "none"]) == 0
    guarded = pd.read_parquet(tmp_path / "guarded" / "plan.parquet")
    loose = pd.read_parquet(tmp_path / "loose" / "plan.parquet")
    assert guarded["keep"].sum() > loose["keep"].sum()
    assert guarded.loc[~guarded["keep"], "distance_to_keeper"].max() <= 1.0
    assert loose.loc[~loose["keep"], "distance_to_keeper"].max() > 1.0


def test_run_with_job_spec_and_resume(demo: dict, tmp_path: Path) -> None:
    base, features = fresh_copy(demo, tmp_path)
    spec = tmp_path / "job.yaml"
    spec.write_text(
        f"features: ['{features}']\nroot: '{base / 'photos'}'\neps: {DEMO_EPS}\n"
        f"out: '{tmp_path / 'plan'}'\nmode: apply\nn_workers: 1\n"
    )
    before = files_under(base / "photos")
    assert main(["run", "--config", str(spec), "--dry-run"]) == 0
    assert files_under(base / "photos") == before
    assert main(["run", "--config", str(spec)]) == 0
    after = files_under(base / "photos")
    assert len(after) == len(before) - demo["duplicates"]
    # a second run (a Job's pod started twice) reuses the plan and deletes nothing else
    assert main(["run", "--config", str(spec)]) == 0
    assert files_under(base / "photos") == after


def test_protect_prefix_is_never_deleted(demo: dict, tmp_path: Path) -> None:
    base, features = fresh_copy(demo, tmp_path)
    photos = base / "photos"
    assert (
        main(
            [
                "run",
                "--features",
                features,
                "--root",
                str(photos),
                "--eps",
                str(DEMO_EPS),
                "--protect",
                "family/",
                "--out",
                str(tmp_path / "p"),
                "--apply",
                "--n-workers",
                "1",
            ]
        )
        == 0
    )
    protected = {p for p in demo["groups"] if p.startswith("family/")}
    assert protected <= files_under(photos)


def test_max_delete_refuses_with_exit_3_and_deletes_nothing(
    demo: dict, tmp_path: Path, capsys
) -> None:
    base, features = fresh_copy(demo, tmp_path)
    before = files_under(base / "photos")
    code = main(
        [
            "run",
            "--features",
            features,
            "--root",
            str(base / "photos"),
            "--eps",
            str(DEMO_EPS),
            "--out",
            str(tmp_path / "p"),
            "--apply",
            "--max-delete",
            "1",
            "--n-workers",
            "1",
        ]
    )
    assert code == 3
    assert files_under(base / "photos") == before
    assert_one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["plan", "--root", "."], "'features' is required"),
        (["plan", "--features", "x.parquet", "--root", "."], "'eps' is required"),
        (["plan", "--features", "x.parquet", "--root", ".", "--eps", "-1"], "positive number"),
        (["plan", "--config", "/nonexistent/job.yaml"], "job spec not found"),
        (["apply", "/nonexistent/plan"], "not a plan directory"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], match: str, capsys) -> None:
    assert main([*args, "--n-workers", "1"]) == 2
    assert match in assert_one_error_line(capsys.readouterr().err)


def test_bad_input_exits_2_before_anything_is_deleted(demo: dict, tmp_path: Path, capsys) -> None:
    base, _ = fresh_copy(demo, tmp_path)
    bad = pd.read_parquet(next((base / "features").glob("*.parquet")))
    bad.iloc[2, 5] = np.nan
    bad.to_parquet(base / "features" / "part-9999.parquet")
    before = files_under(base / "photos")
    code = main(
        [
            "run",
            "--features",
            str(base / "features" / "*.parquet"),
            "--root",
            str(base / "photos"),
            "--eps",
            str(DEMO_EPS),
            "--out",
            str(tmp_path / "p"),
            "--apply",
            "--n-workers",
            "1",
        ]
    )
    assert code == 2
    assert "part-9999.parquet" in assert_one_error_line(capsys.readouterr().err)
    assert files_under(base / "photos") == before


def test_demo_command(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--dir", str(tmp_path / "d"), "--images", "12", "--n-workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "plan:" in out and "dedup-batch apply" in out
    assert (tmp_path / "d" / "plan" / "plan.parquet").exists()
    truth = pd.read_csv(tmp_path / "d" / "truth.csv")
    assert list(truth.columns) == ["path", "group"] and len(truth) >= 12
    # never wipes a folder it did not make
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("x")
    assert main(["demo", "--dir", str(tmp_path / "mine"), "--n-workers", "1"]) == 2
    assert (tmp_path / "mine" / "precious.txt").exists()


def test_report_and_sweep_are_pipeline_calls(demo: dict, tmp_path: Path) -> None:
    """pipeline.report rebuilds the report of a plan directory (root from its job.yaml);
    pipeline.sweep writes into the plan's sweep/ folder and notes it in summary.json."""
    import dataclasses

    from dedup_batch import pipeline
    from dedup_batch.config import JobSpec

    base, features = fresh_copy(demo, tmp_path)
    out = tmp_path / "plan"
    spec = JobSpec.from_mapping(
        {
            "features": [features],
            "root": str(base / "photos"),
            "eps": DEMO_EPS,
            "out": str(out),
            "report": False,
        }
    )
    planned = pipeline.plan(spec)
    assert not (out / "report.html").exists() and "report" not in planned.summary
    made = pipeline.report(str(out), dataclasses.replace(spec, root=None), max_members=2)
    assert made.url == str(out / "report.html") and (out / "report.html").is_file()
    assert made.clusters_total == planned.summary["counts"]["duplicate_clusters"]
    assert json.loads((out / "summary.json").read_text())["report"]["pages"] == made.pages
    swept = pipeline.sweep(spec, eps_values=[DEMO_EPS / 2, DEMO_EPS])
    assert (out / "sweep" / "sweep.csv").is_file() and (out / "sweep" / "pairs.html").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sweep"]["dir"] == "sweep" and summary["report"]["pages"] == made.pages
    # the chain guard can only keep more than DBSCAN's one keeper per cluster
    assert swept.table["deletions"].iloc[-1] >= planned.summary["counts"]["delete"]


def _cluster_settings(dask_worker) -> tuple:
    return (
        "profile" in dask_worker.periodic_callbacks,
        dask_worker._tick_interval,
        dask.config.get("distributed.worker.profile.enabled"),
    )


def test_the_jobs_local_cluster_runs_without_the_profiler_and_a_1s_tick():
    from distributed import Client

    from dedup_batch.pipeline import LOCAL_CLUSTER_CONFIG, local_cluster

    before = {k: dask.config.get(k) for k in LOCAL_CLUSTER_CONFIG}
    with local_cluster(2, 1) as cluster, Client(cluster) as client:
        assert set(client.run(_cluster_settings).values()) == {(False, 1.0, False)}
        assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler._tick_interval) == 1
    # the caller's own config is left as it was
    assert {k: dask.config.get(k) for k in LOCAL_CLUSTER_CONFIG} == before


@pytest.mark.parametrize(
    ("variable", "value", "kept"),
    [
        ("DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED", "True", "distributed.admin.tick.interval"),
        ("DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL", "20ms", "distributed.worker.profile.enabled"),
    ],
)
def test_a_setting_in_the_users_dask_config_wins(monkeypatch, variable, value, kept):
    from dedup_batch.pipeline import local_cluster_config

    monkeypatch.setenv(variable, value)
    assert set(local_cluster_config()) == {kept}
