"""The built-in demo: generated photos, embedded with PDQ on a real LocalCluster, then planned."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from dedup_batch.cli import main
from dedup_batch.embed import MODEL_KEY, PdqModel

pytest.importorskip("pdqhash")


def test_demo_embeds_with_pdq_and_plans_one_keeper_per_original(tmp_path: Path, capsys) -> None:
    base = tmp_path / "demo"
    assert main(["demo", "--dir", str(base), "--images", "40", "--n-workers", "1"]) == 0
    out = capsys.readouterr().out
    truth = pd.read_csv(base / "truth.csv")
    n, originals = len(truth), truth["group"].nunique()
    assert originals == 40 and n > originals  # some photos have copies
    assert re.search(rf"embed: {n} images embedded, 0 skipped unchanged, 0 errors", out)

    # the features are embed's PDQ shards, and the plan took PDQ's eps from them
    shards = sorted((base / "features").glob("part-*.parquet"))
    assert shards and (base / "features" / "embed-errors.csv").exists()
    info = json.loads(pq.read_schema(shards[0]).metadata[MODEL_KEY])
    assert (info["name"], info["dim"]) == ("pdq", 256)
    summary = json.loads((base / "plan" / "summary.json").read_text())
    assert summary["settings"]["embed"] == "pdq"
    assert summary["settings"]["eps"] == PdqModel.default_eps

    # every copy is planned for deletion with its own original as keeper, nothing else
    plan = pd.read_parquet(base / "plan" / "plan.parquet").merge(truth, on="path")
    assert sorted(plan.loc[plan["keep"], "path"]) == sorted(truth["group"].unique())
    dup = plan[~plan["keep"]]
    assert len(dup) == n - originals and (dup["keeper"] == dup["group"]).all()
    assert f"keep {originals}, delete {n - originals}" in out
