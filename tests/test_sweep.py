"""The eps sweep: counts equal separate scikit-learn DBSCAN runs; scores on known answers."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.cluster import DBSCAN

from dedup_batch.errors import ConfigError, InputError
from dedup_batch.storage import Store
from dedup_batch.sweep import (
    deletion_scores,
    eps_forest,
    eps_range,
    k_distance,
    read_truth,
    sweep,
    write_sweep,
)


def sk_counts(X, eps, metric="euclidean", min_samples=1):
    labels = DBSCAN(eps=eps, min_samples=min_samples, metric=metric).fit(X).labels_
    member = labels >= 0
    clusters = len(np.unique(labels[member]))
    return labels, clusters, int(member.sum()) - clusters


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_counts_and_partitions_equal_sklearn_random(seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(25, 6))
    X = np.concatenate(
        [
            centres[rng.integers(0, 25, 300)] + rng.normal(scale=0.15, size=(300, 6)),
            rng.normal(size=(60, 6)) * 2,
        ]
    )
    X = np.concatenate([X, X[:20]])  # exact copies
    X = X.astype(np.float32 if seed % 2 else np.float64)
    eps = np.linspace(0.05, 1.2, 12)
    table = sweep(X, eps)
    forest = eps_forest(X, 1.2, progress=None)
    for row in table.itertuples(index=False):
        labels, clusters, deletions = sk_counts(X, row.eps)
        assert (row.clusters, row.deletions) == (clusters, deletions), row.eps
        assert forest.n_clusters(row.eps) == clusters
        np.testing.assert_array_equal(forest.labels(row.eps), labels)  # sklearn's numbering too


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ties_at_exactly_eps(seed):
    """Integer points: many distances are exactly 1, sqrt(2), 2; points at eps are neighbours."""
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 7, size=(150, 3)).astype(np.float64)
    eps = [1.0, math.sqrt(2), math.sqrt(3), 2.0, math.sqrt(5), 0.5, 3.0]
    table = sweep(X, eps)
    assert list(table["eps"]) == sorted(eps)
    for row in table.itertuples(index=False):
        labels, clusters, deletions = sk_counts(X, row.eps)
        assert (row.clusters, row.deletions) == (clusters, deletions), row.eps
        largest = np.bincount(labels).max()
        assert row.largest_cluster == largest


def test_cosine_with_parallel_vectors():
    rng = np.random.default_rng(5)
    base = rng.normal(size=(40, 8))
    X = np.concatenate([base, base[:10] * 3.0, base[10:15] + rng.normal(scale=0.05, size=(5, 8))])
    for e in (0.001, 0.01, 0.1, 0.5):
        row = sweep(X, [e], metric="cosine").iloc[0]
        _, clusters, deletions = sk_counts(X, e, metric="cosine")
        assert (row.clusters, row.deletions) == (clusters, deletions)


def test_min_samples_above_one_counts_noise():
    rng = np.random.default_rng(7)
    X = np.concatenate([rng.normal(size=(40, 2)) * 0.1, rng.normal(size=(20, 2)) * 3])
    table = sweep(X, [0.1, 0.3], min_samples=3)
    for row in table.itertuples(index=False):
        labels, clusters, deletions = sk_counts(X, row.eps, min_samples=3)
        assert (row.clusters, row.deletions, row.noise) == (
            clusters,
            deletions,
            int((labels < 0).sum()),
        )


def test_sweep_on_dask_equals_local(dask_client):
    rng = np.random.default_rng(11)
    X = rng.normal(size=(400, 5))
    local = sweep(X, [0.3, 0.6, 0.9])
    remote = sweep(X, [0.3, 0.6, 0.9], client=dask_client)
    eps_f = eps_forest(X, 0.9, client=dask_client, chunk_rows=50, progress=None)
    pd.testing.assert_frame_equal(local, remote)
    assert eps_f.n_clusters(0.6) == local.loc[1, "clusters"]


def test_precision_recall_known_answers():
    # truth: {a1,a2,a3} one image; {b1,b2} another; c alone.
    paths = np.array(["a1", "a2", "a3", "b1", "b2", "c"], dtype=object)
    groups = np.array([0, 0, 0, 1, 1, 2])
    # a perfect partition: 3 deletions (a2, a3, b2), all correct
    s = deletion_scores(np.array([0, 0, 0, 1, 1, 2]), paths, groups)
    assert (s["deletions"], s["correct"], s["ideal"]) == (3, 3, 3)
    assert s["precision"] == s["recall"] == s["f1"] == 1.0
    # everything in one cluster: keeper a1; deletes 5, of which a2, a3 correct
    s = deletion_scores(np.zeros(6, int), paths, groups)
    assert (s["deletions"], s["correct"]) == (5, 2)
    assert s["precision"] == pytest.approx(2 / 5) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 * 0.4 * (2 / 3) / (0.4 + 2 / 3))
    # b2 with c, keeper chosen by last-path: c kept, b2 deleted wrongly; a's split
    s = deletion_scores(np.array([0, 0, 1, 2, 3, 3]), paths, groups, keep="last-path")
    assert (s["deletions"], s["correct"]) == (2, 1)  # a1 (keeper a2) right, b2 (keeper c) wrong
    # nothing deleted: precision undefined, recall 0; noise never deleted
    s = deletion_scores(np.array([-1, -1, 0, 1, 2, 3]), paths, groups)
    assert s["deletions"] == 0 and math.isnan(s["precision"]) and s["recall"] == 0
    with pytest.raises(ConfigError, match="largest-size"):
        deletion_scores(np.zeros(6, int), paths, groups, keep="largest-size")


def test_sweep_scores_per_eps():
    # three points on a line at 0, 1, 3 (truth: 0 and 1 are the same image, 3 another)
    X = np.array([[0.0], [1.0], [3.0]])
    paths = ["p0", "p1", "p3"]
    truth = {"p0": "g", "p1": "g", "p3": "h"}
    t = sweep(X, [0.5, 1.0, 2.0], paths=paths, truth=truth).set_index("eps")
    assert list(t["deletions"]) == [0, 1, 2]
    assert list(t["correct"]) == [0, 1, 1]
    assert math.isnan(t.loc[0.5, "precision"]) and t.loc[0.5, "recall"] == 0
    assert (t.loc[1.0, "precision"], t.loc[1.0, "recall"], t.loc[1.0, "f1"]) == (1, 1, 1)
    assert t.loc[2.0, "precision"] == 0.5 and t.loc[2.0, "recall"] == 1
    assert t.loc[2.0, "f1"] == pytest.approx(2 / 3)


def test_k_distance_and_ranges():
    X = np.array([[0.0], [0.0], [1.0], [3.0], [7.0]])
    np.testing.assert_allclose(k_distance(X, 1), [0, 0, 1, 2, 4])
    np.testing.assert_allclose(k_distance(X, 2), [1, 1, 1, 3, 6])  # neighbour #2 of each
    assert len(k_distance(np.random.default_rng(0).normal(size=(500, 3)), 1, sample=50)) == 50
    np.testing.assert_allclose(eps_range(0.1, 0.5, 5), [0.1, 0.2, 0.3, 0.4, 0.5])
    with pytest.raises(ConfigError, match="eps-min"):
        eps_range(0.5, 0.1)
    with pytest.raises(ConfigError, match="positive"):
        sweep(X, [0.0, 1.0])


def test_read_truth(tmp_path):
    p = tmp_path / "truth.csv"
    p.write_text("path,group\na.jpg,1\nb.jpg,1\nc.jpg,2\n")
    assert read_truth(str(p)) == {"a.jpg": "1", "b.jpg": "1", "c.jpg": "2"}
    p.write_text("path,label\na.jpg,1\n")
    with pytest.raises(InputError, match="needs columns 'path' and 'group'"):
        read_truth(str(p))
    p.write_text("path,group\na.jpg,1\na.jpg,2\n")
    with pytest.raises(InputError, match=r"row 3: path 'a\.jpg' listed twice"):
        read_truth(str(p))


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (value, 255 - value, 90)).save(buf, "PNG")
    return buf.getvalue()


def test_write_sweep_outputs(tmp_path):
    root = tmp_path / "img"
    root.mkdir()
    X = np.array([[0.0], [0.1], [0.45], [0.52], [2.0], [2.01]])
    paths = [f"i{k}.png" for k in range(6)]
    for k, p in enumerate(paths[:-1]):  # i5.png is missing: a placeholder, not a crash
        (root / p).write_bytes(_png(40 * k))
    truth = {
        "i0.png": "a",
        "i1.png": "a",
        "i2.png": "b",
        "i3.png": "b",
        "i4.png": "c",
        "i5.png": "c",
    }
    out = tmp_path / "sweep"
    res = write_sweep(
        paths,
        X,
        str(out),
        eps_values=eps_range(0.05, 0.5, 10),
        truth=truth,
        pairs_eps=0.2,
        store=Store(str(root)),
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "k-distance.png",
        "pairs.html",
        "sweep.csv",
        "sweep.png",
    ]
    csv = pd.read_csv(out / "sweep.csv")
    assert list(csv.columns) == [
        "eps",
        "clusters",
        "duplicate_clusters",
        "largest_cluster",
        "deletions",
        "correct",
        "precision",
        "recall",
        "f1",
    ]
    assert len(csv) == 10 and csv["deletions"].is_monotonic_increasing
    for name in ("sweep.png", "k-distance.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width > 300
    page = (out / "pairs.html").read_text()
    inside, outside = page.split("Just outside eps")
    # merges below 0.2: (0,1) at 0.1, (2,3) at 0.07, (4,5) at 0.01; above: (1,2) at 0.35
    assert "i0.png" in inside and "i2.png" in inside and "d = 0.35" in outside
    assert 'data-status="missing"' in inside
    assert res.summary_entry()["pairs_eps"] == 0.2 and res.summary_entry()["csv"] == "sweep.csv"
    assert "precision" in res.format_table()


def _plan_labels(X, eps, metric="euclidean"):
    """The labels the plan gets: the pipeline's own DBSCAN (dedup_batch.cluster)."""
    from dedup_batch.cluster import DBSCAN as PlanDBSCAN

    return PlanDBSCAN(eps=eps, min_samples=1, metric=metric).fit(X).labels_


@pytest.mark.parametrize(
    ("name", "metric"),
    [("grid-3d", "euclidean"), ("grid-20d", "euclidean"), ("pdq-like", "euclidean"),
     ("cosine-f32", "cosine")],
)  # fmt: skip
def test_partition_at_every_eps_is_the_plans(name, metric):
    """The sweep's labels at each eps are the plan's labels, ties at exactly eps included:
    integer grids (distances exactly 1, sqrt(2), 2, ...; d=3 uses scikit-learn's tree, d=20
    its brute force) and +-1 'PDQ' vectors, where eps = 2 sqrt(k) sits exactly on Hamming k."""
    rng = np.random.default_rng(len(name))
    if name.startswith("grid"):
        d = 3 if name == "grid-3d" else 20
        X = np.zeros((160, d))
        X[:, :3] = rng.integers(0, 6, size=(160, 3))
        eps = [1.0, math.sqrt(2), math.sqrt(3), 2.0, math.sqrt(5), 0.5, 2.5]
    elif name == "pdq-like":
        base = rng.choice([-1.0, 1.0], size=(20, 64))
        flips = rng.integers(0, 64, size=(120, 3))
        X = base[rng.integers(0, 20, 120)].copy()
        for r, cols in enumerate(flips):
            X[r, cols[: r % 4]] *= -1  # 0-3 bits flipped: Hamming distances 0..6 apart
        X = X.astype(np.float32)
        eps = [2 * math.sqrt(k) for k in (1, 2, 3, 4, 6)]
    else:
        X = rng.normal(size=(200, 16)).astype(np.float32)
        X = np.concatenate([X, X[:50] + rng.normal(scale=0.05, size=(50, 16)).astype(np.float32)])
        eps = [0.001, 0.004, 0.01, 0.03]
    forest = eps_forest(X, max(eps), metric=metric, progress=None)
    table = sweep(X, eps, metric=metric)
    tied = 0
    for e, row in zip(sorted(eps), table.itertuples(index=False), strict=True):
        expected = _plan_labels(X, e, metric)
        np.testing.assert_array_equal(forest.labels(e), expected, err_msg=f"{name} eps {e}")
        assert forest.n_clusters(e) == expected.max() + 1
        assert row.clusters == expected.max() + 1 and row.deletions == len(X) - row.clusters
        tied += forest._tied(e)
    if name != "cosine-f32":  # exact ties exist there by construction, and were decided so
        assert tied >= 3
