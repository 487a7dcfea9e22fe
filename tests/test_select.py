"""Keeper selection: every policy, ties, protection, chain guard, noise, missing objects."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.cluster import DBSCAN

from dedup_batch.errors import ConfigError
from dedup_batch.select import PLAN_COLUMNS, POLICIES, select_keepers

# One cluster of three (a, b, c at 0, 0.1, 0.2) and a singleton d far away.
PATHS = ["b.jpg", "a.jpg", "c.jpg", "d.jpg"]
X = np.array([[0.1], [0.0], [0.2], [5.0]])
LABELS = np.array([0, 0, 0, 1])
OBJECTS = pd.DataFrame(
    {
        "size": [300, 100, 200, 50],
        "mtime": [20.0, 30.0, 10.0, 5.0],
        "etag": ["e1", "e2", "e3", "e4"],
        "exists": [True, True, True, True],
    }
)


def keeper_of(plan: pd.DataFrame, cluster: int = 0) -> list[str]:
    rows = plan[(plan["cluster"] == cluster) & plan["keep"]]
    return sorted(rows["path"])


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("first-path", "a.jpg"),
        ("last-path", "c.jpg"),
        ("largest-size", "b.jpg"),
        ("smallest-size", "a.jpg"),
        ("newest", "a.jpg"),
        ("oldest", "c.jpg"),
        ("centroid", "b.jpg"),
    ],
)
def test_each_policy_picks_its_keeper(policy: str, expected: str) -> None:
    plan = select_keepers(PATHS, X, LABELS, OBJECTS, policy=policy)
    assert keeper_of(plan) == [expected]
    dup = plan[(plan["cluster"] == 0) & ~plan["keep"]]
    assert set(dup["keeper"]) == {expected}
    assert keeper_of(plan, 1) == ["d.jpg"]
    assert list(plan.columns) == list(PLAN_COLUMNS)


def test_policies_cover_the_documented_names() -> None:
    assert set(POLICIES) == {
        "first-path",
        "last-path",
        "largest-size",
        "smallest-size",
        "newest",
        "oldest",
        "centroid",
    }


@pytest.mark.parametrize(
    "policy", ["largest-size", "smallest-size", "newest", "oldest", "centroid"]
)
def test_ties_are_broken_by_path_not_input_order(policy: str) -> None:
    paths = ["z.jpg", "m.jpg", "k.jpg"]
    x = np.zeros((3, 2))  # identical vectors: centroid ties too
    objects = pd.DataFrame({"size": [7, 7, 7], "mtime": [1.0, 1.0, 1.0]})
    for perm in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        plan = select_keepers(
            [paths[i] for i in perm], x, np.zeros(3, int), objects.iloc[perm], policy=policy
        )
        assert keeper_of(plan) == ["k.jpg"]


def test_distance_to_keeper_is_in_the_metric() -> None:
    plan = select_keepers(PATHS, X, LABELS, OBJECTS, policy="first-path").set_index("path")
    assert plan.loc["c.jpg", "distance_to_keeper"] == pytest.approx(0.2)
    assert plan.loc["a.jpg", "distance_to_keeper"] == 0.0
    vecs = np.array([[1.0, 0.0], [1.0, 1.0]])
    plan = select_keepers(["a", "b"], vecs, np.array([0, 0]), metric="cosine").set_index("path")
    assert plan.loc["b", "distance_to_keeper"] == pytest.approx(1 - 1 / np.sqrt(2))


def test_protected_objects_are_never_deleted_and_preferred() -> None:
    protected = np.array([False, False, True, False])  # c.jpg
    plan = select_keepers(PATHS, X, LABELS, OBJECTS, policy="first-path", protected=protected)
    assert keeper_of(plan) == ["c.jpg"]
    both = np.array([True, False, True, False])
    plan = select_keepers(PATHS, X, LABELS, OBJECTS, policy="first-path", protected=both)
    assert keeper_of(plan) == ["b.jpg", "c.jpg"]
    assert plan.set_index("path").loc["a.jpg", "keeper"] == "b.jpg"  # nearest keeper


def test_chain_guard_adds_keepers_until_every_duplicate_is_close() -> None:
    # A chain 0, 1, 2, ..., 9 with eps 1: one DBSCAN cluster spanning 9 units.
    x = np.arange(10, dtype=float)[:, None]
    paths = [f"{i:02d}.jpg" for i in range(10)]
    labels = DBSCAN(eps=1.0, min_samples=1).fit_predict(x)
    assert len(set(labels)) == 1
    guarded = select_keepers(paths, x, labels, max_keeper_distance=1.0)
    dup = guarded[~guarded["keep"]]
    assert (dup["distance_to_keeper"] <= 1.0).all()
    assert keeper_of(guarded) == ["00.jpg", "02.jpg", "04.jpg", "06.jpg", "08.jpg"]
    loose = select_keepers(paths, x, labels, max_keeper_distance=None)
    assert keeper_of(loose) == ["00.jpg"]
    assert loose["distance_to_keeper"].max() == 9.0


def test_noise_is_never_deleted() -> None:
    x = np.array([[0.0], [0.1], [0.2], [9.0]])
    labels = DBSCAN(eps=0.15, min_samples=3).fit_predict(x)
    plan = select_keepers(["a", "b", "c", "n"], x, labels)
    noise = plan[plan["cluster"] == -1]
    assert list(noise["path"]) == ["n"] and noise["keep"].all()
    assert plan["keep"].sum() == 2


def test_missing_objects_are_never_keepers_and_never_deleted() -> None:
    objects = OBJECTS.copy()
    objects["exists"] = [True, False, True, True]  # a.jpg is gone
    objects.loc[1, "size"] = pd.NA
    plan = select_keepers(PATHS, X, LABELS, objects, policy="first-path")
    row = plan.set_index("path")
    assert row.loc["a.jpg", "keep"] and row.loc["a.jpg", "keeper"] == "a.jpg"
    assert set(row.loc[~row["keep"], "keeper"]) == {"b.jpg"}
    gone = select_keepers(PATHS, X, LABELS, objects.assign(exists=[False] * 3 + [True]))
    assert gone[gone["cluster"] == 0]["keep"].all()  # nothing to delete, nothing chosen


def test_policy_needing_sizes_without_sizes_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="largest-size needs the object size"):
        select_keepers(PATHS, X, LABELS, None, policy="largest-size")
    with pytest.raises(ConfigError, match="unknown keep policy"):
        select_keepers(PATHS, X, LABELS, OBJECTS, policy="biggest")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 30), st.integers(0, 30)), min_size=1, max_size=40, unique=True
    ),
    st.floats(0.5, 6.0),
    st.sampled_from(sorted(POLICIES)),
    st.booleans(),
)
def test_invariants_on_random_plans(points: list, eps: float, policy: str, guard: bool) -> None:
    x = np.array(points, dtype=float)
    n = len(x)
    paths = [f"img/{i:03d}[{i % 3}].jpg" for i in range(n)]
    rng = np.random.default_rng(n)
    objects = pd.DataFrame({"size": rng.integers(1, 5, n), "mtime": rng.integers(0, 3, n) * 1.0})
    labels = DBSCAN(eps=eps, min_samples=1).fit_predict(x)
    plan = select_keepers(
        paths, x, labels, objects, policy=policy, max_keeper_distance=eps if guard else None
    )
    # exactly one keeper per cluster without the guard, at least one with it
    per_cluster = plan.groupby("cluster")["keep"].sum()
    assert (per_cluster >= 1).all()
    if not guard:
        assert (per_cluster == 1).all()
    else:
        assert (plan.loc[~plan["keep"], "distance_to_keeper"] <= eps + 1e-12).all()
    # every duplicate points at a keeper of its own cluster
    keepers = plan[plan["keep"]].set_index("path")["cluster"]
    dup = plan[~plan["keep"]]
    assert (keepers.loc[dup["keeper"]].to_numpy() == dup["cluster"].to_numpy()).all()
    assert sorted(plan["path"]) == sorted(paths)
