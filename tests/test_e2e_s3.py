"""The whole job on S3 through the CLI: features, images, plan, report and journal in a bucket.

A real moto server (tests/conftest.py), the real CLI and a real LocalCluster: the workers read the
shards, make the thumbnails and delete.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from dedup_batch.cli import main
from dedup_batch.demo import DEMO_EPS, make_demo

pytestmark = pytest.mark.s3

SECRET = "testing-secret-key"  # the fixture's secret: must never be written or printed


def bucket_keys(fs, prefix: str) -> set[str]:
    fs.invalidate_cache()  # the CLI changed the bucket behind this client's listing cache
    return {k[len(prefix) + 1 :] for k in fs.find(prefix)}


@pytest.fixture
def photo_bucket(s3, s3fs_client, tmp_path: Path) -> dict:
    """The demo collection uploaded to s3://photos/lib, with glob decoys beside it."""
    info = make_demo(tmp_path / "demo", n_images=16, seed=11)
    s3fs_client.mkdir("photos")
    photos = Path(info["root"])
    for f in photos.rglob("*"):
        if f.is_file():
            s3fs_client.pipe(f"photos/lib/{f.relative_to(photos).as_posix()}", f.read_bytes())
    for f in sorted((tmp_path / "demo" / "features").glob("*.parquet")):
        s3fs_client.pipe(f"photos/features/{f.name}", f.read_bytes())
    # "scans [old]/x" as a glob matches "scans o/x": such decoys must survive every delete
    decoys = {
        p.replace("scans [old]/", "scans o/")
        for p in info["groups"]
        if p.startswith("scans [old]/")
    }
    for d in decoys:
        s3fs_client.pipe(f"photos/lib/{d}", b"decoy")
    return info | {"decoys": decoys}


def cli(*args: str, s3: dict) -> int:
    return main(
        [
            *args,
            "-o",
            f"endpoint_url={s3['endpoint_url']}",
            "-o",
            f"key={s3['key']}",
            "-o",
            f"secret={s3['secret']}",
            "--n-workers",
            "1",
        ]
    )


def plan_on_s3(out: str, *extra: str, s3: dict) -> int:
    """``dedup-batch plan`` of the photo bucket at the demo's eps."""
    return cli(
        "plan",
        "--features",
        "s3://photos/features/part-*.parquet",
        "--root",
        "s3://photos/lib",
        "--eps",
        str(DEMO_EPS),
        "--out",
        out,
        *extra,
        s3=s3,
    )


def test_plan_report_apply_on_s3(photo_bucket: dict, s3, s3fs_client, capsys) -> None:
    plan_url = "s3://photos/plans/run1"
    assert plan_on_s3(plan_url, s3=s3) == 0
    names = bucket_keys(s3fs_client, "photos/plans/run1")
    assert {"plan.parquet", "summary.json", "job.yaml", "report.html"} <= names
    plan = pd.read_parquet(s3fs_client.open("photos/plans/run1/plan.parquet"))
    assert plan["etag"].notna().all()  # recorded from the listing, for the conditional delete
    summary = json.loads(s3fs_client.cat("photos/plans/run1/summary.json"))
    assert summary["counts"]["delete"] == photo_bucket["duplicates"]
    assert summary["report"]["thumbnails"].get("ok", 0) > 0

    assert cli("apply", plan_url, s3=s3) == 0
    left = bucket_keys(s3fs_client, "photos/lib")
    assert left == set(plan.loc[plan["keep"], "path"]) | photo_bucket["decoys"]
    assert "completion-report.csv" in bucket_keys(s3fs_client, "photos/plans/run1")

    # nothing written to the bucket or printed holds the secret
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    for key in s3fs_client.find("photos/plans"):
        assert SECRET.encode() not in s3fs_client.cat(key), key


def test_denied_delete_exits_4_and_rerun_finishes(
    photo_bucket: dict, s3, s3fs_client, capsys
) -> None:
    plan_url = "s3://photos/plans/run2"
    assert plan_on_s3(plan_url, "--no-report", s3=s3) == 0
    plan = pd.read_parquet(s3fs_client.open("photos/plans/run2/plan.parquet"))
    # moto matches policy resources as regular expressions: pick a key without metacharacters
    plain = [p for p in plan.loc[~plan["keep"], "path"] if re.fullmatch(r"[\w ./-]+", p)]
    victim = sorted(plain)[0]
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:DeleteObject",
                "Resource": [f"arn:aws:s3:::photos/lib/{victim}"],
            }
        ],
    }
    s3fs_client.call_s3("put_bucket_policy", Bucket="photos", Policy=json.dumps(policy))
    assert cli("apply", plan_url, s3=s3) == 4
    assert "were not done" in capsys.readouterr().err
    assert victim in bucket_keys(s3fs_client, "photos/lib")
    report = pd.read_csv(s3fs_client.open("photos/plans/run2/completion-report.csv"))
    row = report.set_index("path").loc[victim]
    assert row["status"] == "failed" and row["error_code"] == "AccessDenied"

    s3fs_client.call_s3("delete_bucket_policy", Bucket="photos")
    assert cli("apply", plan_url, s3=s3) == 0
    assert (
        bucket_keys(s3fs_client, "photos/lib")
        == set(plan.loc[plan["keep"], "path"]) | photo_bucket["decoys"]
    )


def test_wrong_endpoint_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(
        [
            "plan",
            "--features",
            "s3://photos/features/*.parquet",
            "--root",
            "s3://photos/lib",
            "--eps",
            "0.3",
            "--out",
            str(tmp_path / "p"),
            "-o",
            f"endpoint_url=http://127.0.0.1:{port}",
            "-o",
            "config_kwargs.retries.max_attempts=1",
            "--n-workers",
            "1",
        ]
    )
    assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and f"127.0.0.1:{port}" in err[0]
