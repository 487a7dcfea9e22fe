"""A user's first run: a disastrous eps is refused, nothing is silent, commands say the truth.

Each test runs the real CLI (``main``) on a small collection built here: files on disk, their
feature shard, a LocalCluster of one worker where the command starts one.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_safety import vec, write, write_features

from dedup_batch.cli import main
from dedup_batch.diagnose import knee
from dedup_batch.storage import Store

N_DISTINCT = 24


@pytest.fixture
def collection(tmp_path: Path) -> dict:
    """24 distinct images (10 apart), 6 of them with one copy (0.1 away)."""
    root = tmp_path / "photos"
    rows = []
    for g in range(N_DISTINCT):
        write(root / f"img{g:02d}.jpg", f"image {g}".encode() * 3)
        rows.append((f"img{g:02d}.jpg", vec(g)))
        if g < 6:
            write(root / f"img{g:02d} copy.jpg", f"copy {g}".encode())
            rows.append((f"img{g:02d} copy.jpg", vec(g, 0.1)))
    feats = tmp_path / "features.parquet"
    write_features(str(feats), rows)
    return {"root": root, "features": str(feats), "out": str(tmp_path / "plan"), "n": len(rows)}


def plan_args(c: dict, eps: float, *extra: str) -> list[str]:
    return [
        "plan",
        "--features",
        c["features"],
        "--root",
        str(c["root"]),
        "--eps",
        str(eps),
        "--out",
        c["out"],
        "--n-workers",
        "1",
        "--no-report",
        *extra,
    ]


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_an_eps_that_merges_everything_warns_and_apply_refuses(collection, capsys):
    before = files(collection["root"])
    assert main(plan_args(collection, 1000.0)) == 0
    summary = json.loads(Path(collection["out"], "summary.json").read_text())
    assert summary["counts"]["keep"] == 1
    text = " ".join(summary["warnings"])
    assert "largest cluster holds 30 of 30" in text and "beyond the knee" in text
    assert main(["apply", collection["out"]]) == 3
    err = capsys.readouterr().err
    assert "more than max_delete_fraction=0.5" in err and "--max-delete-fraction" in err
    assert files(collection["root"]) == before


def test_a_good_eps_gives_no_warning(collection):
    assert main(plan_args(collection, 0.5)) == 0
    summary = json.loads(Path(collection["out"], "summary.json").read_text())
    assert summary["warnings"] == [] and summary["counts"]["delete"] == 6


@pytest.mark.parametrize(
    ("curve", "expected"),
    [
        (np.r_[np.full(30, 0.01), np.linspace(0.9, 1.1, 70)], (0.89, 0.91)),  # floor, then images
        (np.r_[np.zeros(10), np.linspace(0.5, 0.6, 90)], (0.49, 0.51)),
        (np.full(50, 0.3), None),  # flat: no knee
        (np.arange(5.0), None),  # too few points
    ],
)
def test_knee_is_where_the_curve_leaves_its_floor(curve, expected):
    got = knee(np.random.default_rng(0).permutation(curve))
    if expected is None:
        assert got is None
    else:
        assert expected[0] <= got <= expected[1]


def test_a_root_without_the_feature_paths_is_an_error_with_a_hint(collection, capsys):
    wrong = collection["root"].parent  # one folder too high
    args = plan_args(collection, 0.5)
    args[args.index("--root") + 1] = str(wrong)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "none of the 30 feature paths has an object under root" in err
    assert f"did you mean --root '{collection['root']}'" in err
    assert not os.path.exists(os.path.join(collection["out"], "plan.parquet"))


def test_global_flags_work_after_the_command_and_show_in_its_help(collection, capsys):
    assert main([*plan_args(collection, 0.5), "-q", "--log-format", "json", "--debug"]) == 0
    for command in ("plan", "apply", "run", "restore", "report", "sweep", "demo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "--debug" in out and "--log-format" in out and "--quiet" in out, command


def test_reruns_say_already_finished_and_dry_run_lists(collection, capsys, tmp_path):
    assert main(plan_args(collection, 0.5)) == 0
    capsys.readouterr()
    assert main(["apply", collection["out"], "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would delete 6" in out and "path,keeper,cluster,size" in out
    assert "img00 copy.jpg" in out or "img00.jpg" in out
    assert os.path.exists(os.path.join(collection["out"], "would-delete.csv"))
    trash = str(tmp_path / "trash")
    assert main(["apply", collection["out"], "--trash", trash]) == 0
    assert "trashed 6" in capsys.readouterr().out
    assert main(["apply", collection["out"], "--trash", trash]) == 0
    assert "already finished: nothing to do" in capsys.readouterr().out
    assert main(["restore", collection["out"]]) == 0
    assert "restored 6" in capsys.readouterr().out
    assert main(["restore", collection["out"]]) == 0
    assert "already finished: nothing to do" in capsys.readouterr().out


def test_apply_hint_for_a_plan_in_a_bucket_carries_the_endpoint_not_the_secret(
    s3, s3fs_client, collection, capsys
):
    s3fs_client.mkdir("plans")
    opts = ["-o", f"endpoint_url={s3['endpoint_url']}", "-o", "key=testing-key-id"]
    opts += ["-o", "secret=do-not-print-this-9"]
    args = plan_args(collection, 0.5, *opts)
    args[args.index("--out") + 1] = "s3://plans/p1"
    assert main(args) == 0
    out = capsys.readouterr().out
    hint = out.split("To delete: ", 1)[1].splitlines()[0]
    assert hint.startswith(f"dedup-batch apply s3://plans/p1 -o endpoint_url={s3['endpoint_url']}")
    assert "do-not-print-this-9" not in out and "credential" in hint


def test_a_local_store_travels_to_workers_as_its_absolute_root(tmp_path, monkeypatch):
    (tmp_path / "photos").mkdir()
    monkeypatch.chdir(tmp_path)
    store = Store("./photos")
    monkeypatch.chdir("/")
    again = pickle.loads(pickle.dumps(store))
    assert again.root_path == str(tmp_path / "photos")
    assert again.resolve("a.jpg") == str(tmp_path / "photos" / "a.jpg")


def test_no_heartbeat_traceback_at_exit():
    # A stage left open (an abandoned generator) while the interpreter exits, with heartbeats
    # due every millisecond: nothing may be printed but the program's own output.
    script = textwrap.dedent(
        """
        import logging, sys
        from dedup_batch import progress
        progress.configure_logging("text", logging.WARNING, progress="heartbeat", heartbeat_s=0.001)
        def work():
            with progress.stage("left-open", total=10):
                yield 1
        g = work(); next(g)
        print("done")
        """
    )
    for _ in range(5):
        r = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0 and r.stdout == "done\n"
        assert "Traceback" not in r.stderr and "Exception" not in r.stderr, r.stderr
