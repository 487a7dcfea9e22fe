"""Keeper selection: every policy, key lists, copy markers, reasons, ties, protection, chain
guard, noise, missing objects; the policy engine against a sorted() reference."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.cluster import DBSCAN

from dedup_batch.config import KEEP_POLICIES, JobSpec
from dedup_batch.errors import ConfigError
from dedup_batch.select import (
    COPY_MARKERS,
    KEYS,
    PLAN_COLUMNS,
    POLICIES,
    copy_marker,
    parse_policy,
    select_keepers,
)

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
        ("original", "c.jpg"),  # no pixels known, no copy marker: the oldest
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
    assert (
        set(POLICIES)
        == set(KEEP_POLICIES)
        == {
            "original",
            "first-path",
            "last-path",
            "largest-size",
            "smallest-size",
            "newest",
            "oldest",
            "centroid",
        }
    )


@pytest.mark.parametrize(
    "policy", ["largest-size", "smallest-size", "newest", "oldest", "centroid", "original"]
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
    with pytest.raises(ConfigError, match="-mtime,path needs the object mtime"):
        select_keepers(PATHS, X, LABELS, None, policy="-mtime,path")
    with pytest.raises(ConfigError, match="keep policy 'biggest': unknown policy or key"):
        select_keepers(PATHS, X, LABELS, OBJECTS, policy="biggest")
    # the default needs nothing: unknown pixels, sizes and times fall back to the next key
    plan = select_keepers(PATHS, X, LABELS, None)
    assert keeper_of(plan) == ["a.jpg"]
    assert plan.set_index("path").loc["a.jpg", "keep_reason"] == "first path (every other key ties)"


def test_a_value_missing_for_some_members_sorts_last_whatever_the_direction() -> None:
    objects = OBJECTS.assign(mtime=[np.nan, 30.0, 10.0, 5.0])
    # b.jpg has no time (it is still observed: it has an ETag): it sorts last both ways
    assert keeper_of(select_keepers(PATHS, X, LABELS, objects, policy="oldest")) == ["c.jpg"]
    assert keeper_of(select_keepers(PATHS, X, LABELS, objects, policy="newest")) == ["a.jpg"]
    # pixels known for none of them: the next key decides (-size: b.jpg is the largest)
    assert keeper_of(select_keepers(PATHS, X, LABELS, objects, policy="pixels,-size,mtime")) == [
        "b.jpg"
    ]


# -- policies as key lists -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "keys"),
    [
        ("original", "-pixels,copy,mtime,-size,path"),
        ("first-path", "path"),
        ("last-path", "-path"),
        ("largest-size", "-size,path"),
        ("smallest-size", "size,path"),
        ("newest", "-mtime,path"),
        ("oldest", "mtime,path"),
        ("centroid", "centroid,path"),
    ],
)
def test_named_policies_are_aliases_of_key_lists(name: str, keys: str) -> None:
    assert parse_policy(name).keys == parse_policy(keys).keys
    rng = np.random.default_rng(len(keys))
    n = 12
    paths = [f"p/{i:02d}{' (1)' if i % 3 == 0 else ''}.jpg" for i in rng.permutation(n)]
    objects = pd.DataFrame(
        {
            "size": rng.integers(1, 4, n),
            "mtime": rng.integers(0, 3, n) * 1.0,
            "width": rng.integers(1, 3, n),
            "height": rng.integers(1, 3, n),
        }
    )
    x, labels = rng.normal(size=(n, 3)), np.repeat([0, 1, 2], 4)
    a = select_keepers(paths, x, labels, objects, policy=name)
    b = select_keepers(paths, x, labels, objects, policy=keys)
    pd.testing.assert_frame_equal(a, b)


def test_sign_convention_first_of_the_sorted_cluster_is_kept() -> None:
    # ascending: smallest value first; '-': largest first; '+' is ascending too
    assert keeper_of(select_keepers(PATHS, X, LABELS, OBJECTS, policy="size")) == ["a.jpg"]
    assert keeper_of(select_keepers(PATHS, X, LABELS, OBJECTS, policy="+size")) == ["a.jpg"]
    assert keeper_of(select_keepers(PATHS, X, LABELS, OBJECTS, policy="-size")) == ["b.jpg"]
    assert keeper_of(select_keepers(PATHS, X, LABELS, OBJECTS, policy="mtime")) == ["c.jpg"]
    assert keeper_of(select_keepers(PATHS, X, LABELS, OBJECTS, policy="-mtime")) == ["a.jpg"]
    assert parse_policy(" -pixels , mtime ").keys == (
        ("pixels", True),
        ("mtime", False),
        ("path", False),  # path ends every list: ties never depend on input order
    )
    assert parse_policy("original").describe() == (
        "most pixels, then name without copy marker, then oldest, then largest file, "
        "then first path"
    )
    assert set(KEYS) == {"pixels", "copy", "mtime", "size", "path"}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("biggest", "unknown policy or key 'biggest'"),
        ("-pixels,,path", "unknown policy or key ''"),
        ("size,-size", "'size' is given twice"),
        ("path,centroid", "centroid can only be the first key, without a sign"),
        ("-centroid", "centroid can only be the first key"),
        ("", "keep policy '': empty; use one of original, first-path"),
    ],
)
def test_bad_key_lists_are_refused(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_policy(text)


def test_job_spec_validates_keep_against_the_select_module() -> None:
    assert JobSpec().keep == "original"
    assert JobSpec.from_mapping({"keep": " -pixels,mtime "}).keep == "-pixels,mtime"
    must = r"job\.yaml: 'keep' must be one of original, .* got 'big' \(unknown policy or key"
    with pytest.raises(ConfigError, match=must):
        JobSpec.from_mapping({"keep": "big"}, source="job.yaml")
    with pytest.raises(ConfigError, match=r"'keep' must be one of .* got \['size'\] \(not text\)"):
        JobSpec.from_mapping({"keep": ["size"]})


# -- copy markers ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "IMG_1 (1).jpg",
        "IMG_1(2).JPG",
        "photo copy.jpg",
        "photo Copy 2.jpg",
        "photo copy2.jpeg",
        "x-edited.jpg",
        "x_edited.png",
        "IMG_1-Edit-2.jpg",
        "x (edited).jpg",
        "Copy of x.jpg",
        "copy (2) of x.jpg",
        "x - Copy.jpg",
        "x - Copy (3).jpg",
        "x_copy.jpg",
        "x-copy.jpg",
        "x (copy).jpg",
        "x (copy 2).jpg",
        "x (Jo's conflicted copy 2024-01-02).jpg",
        "x-scaled.jpg",
        "x-1024x768.jpg",
        "x_resized.jpg",
        "album/sub/IMG_1 (1).jpg",
        "noext (1)",
    ],
)
def test_copy_markers_are_found_in_the_file_name(name: str) -> None:
    assert copy_marker(name) is not None


@pytest.mark.parametrize(
    "name",
    [
        "IMG_1.jpg",
        "Holiday (2019).jpg",  # a year in brackets is not a counter
        "photocopy.jpg",
        "copy of/IMG_1.jpg",  # folders never count
        "x - Copy/IMG_1.jpg",
        "edited/x.jpg",
        "copyright.jpg",
        "x.copy.jpg",  # ".copy" before the extension: no tool we know writes it
    ],
)
def test_ordinary_names_carry_no_marker(name: str) -> None:
    assert copy_marker(name) is None


def test_copy_markers_are_documented_with_labels() -> None:
    labels = [label for label, _ in COPY_MARKERS]
    assert len(labels) == len(set(labels)) >= 8
    assert copy_marker(".hidden (1)") == "(N)"


# -- the original policy and its reasons ------------------------------------------------------
def plan_of(rows: list[tuple], policy: str = "original", **kw) -> pd.DataFrame:
    """rows: (path, size, mtime, width, height); one cluster, all within eps."""
    paths = [r[0] for r in rows]
    objects = pd.DataFrame(
        {
            "size": pd.array([r[1] for r in rows], dtype="Int64"),
            "etag": [f"e{i}" for i in range(len(rows))],  # observed even without a time
            "mtime": [float("nan") if r[2] is None else r[2] for r in rows],
            "width": pd.array([r[3] for r in rows], dtype="Int64"),
            "height": pd.array([r[4] for r in rows], dtype="Int64"),
        }
    )
    x = np.zeros((len(rows), 2))
    return select_keepers(paths, x, np.zeros(len(rows), int), objects, policy=policy, **kw)


def reason(plan: pd.DataFrame) -> str:
    return plan.loc[plan["keep"], "keep_reason"].item()


DAY = 86400.0


def test_original_prefers_most_pixels_then_clean_name_then_oldest_then_largest() -> None:
    plan = plan_of(
        [
            ("IMG_1 (1).jpg", 900, 5 * DAY, 4032, 3024),  # the full-size copy
            ("IMG_1.jpg", 500, 1 * DAY, 2016, 1512),  # the original, resized
        ]
    )
    assert keeper_of(plan) == ["IMG_1 (1).jpg"]
    assert reason(plan) == "most pixels (4032×3024 vs 2016×1512)"
    plan = plan_of(
        [
            ("photo copy.jpg", 900, 1 * DAY, 640, 480),
            ("photo.jpg", 800, 9 * DAY, 640, 480),
        ]
    )
    assert keeper_of(plan) == ["photo.jpg"]
    assert reason(plan) == "name without copy marker (vs 'photo copy.jpg')"
    plan = plan_of(
        [
            ("b.png", 900, 9 * DAY, 640, 480),
            ("a.jpg", 800, 2 * DAY, 640, 480),
        ]
    )
    assert keeper_of(plan) == ["a.jpg"]
    assert reason(plan) == "oldest (1970-01-03 vs 1970-01-10)"
    plan = plan_of([("b.jpg", 900, 3.0, 640, 480), ("a.jpg", 800, 3.0, 640, 480)])
    assert keeper_of(plan) == ["b.jpg"]
    assert reason(plan) == "largest file (900 vs 800 bytes)"
    plan = plan_of([("b.jpg", 900, 3.0, 640, 480), ("a.jpg", 900, 3.0, 640, 480)])
    assert keeper_of(plan) == ["a.jpg"]
    assert reason(plan) == "first path (every other key ties)"
    plan = plan_of([("b.jpg", 900, 3.0, 640, 480), ("a.jpg", 900, 4.0, 640, 480)])
    assert reason(plan) == "oldest (1970-01-01 00:00:03 UTC vs 1970-01-01 00:00:04 UTC)"


def test_unreadable_images_fall_back_to_the_other_keys() -> None:
    # the original's header could not be read: pixels unknown sorts last, so the copy with
    # known pixels wins on pixels; with both unknown the name decides
    plan = plan_of([("x (1).jpg", 900, 5 * DAY, 640, 480), ("x.jpg", 900, DAY, None, None)])
    assert keeper_of(plan) == ["x (1).jpg"]
    assert reason(plan) == "most pixels (640×480 vs unknown)"
    plan = plan_of([("x (1).jpg", 900, 5 * DAY, None, None), ("x.jpg", 900, DAY, None, None)])
    assert keeper_of(plan) == ["x.jpg"]
    assert reason(plan) == "name without copy marker (vs 'x (1).jpg')"
    plan = plan_of([("b.jpg", 900, None, None, None), ("c.jpg", 900, DAY, None, None)])
    assert keeper_of(plan) == ["c.jpg"]
    assert reason(plan) == "oldest (1970-01-02 vs unknown)"


def test_reasons_for_protected_singletons_noise_chains_and_deletions() -> None:
    x = np.array([[0.0], [0.5], [1.2], [1.5], [9.0], [20.0], [20.1], [20.2]])
    paths = ["c0.jpg", "c1.jpg", "c2.jpg", "c3.jpg", "solo.jpg", "p0.jpg", "p1.jpg", "n.jpg"]
    labels = np.array([0, 0, 0, 0, 1, 2, 2, -1])
    protected = np.array([False] * 6 + [True, False])
    plan = select_keepers(
        paths, x, labels, policy="path", protected=protected, max_keeper_distance=1.0
    ).set_index("path")
    assert plan.loc["c0.jpg", "keep_reason"] == "first path"
    assert plan.loc["c2.jpg", "keep_reason"] == (
        "chain guard: 1.2 from the nearest keeper > 1; first path"
    )
    assert plan.loc["solo.jpg", "keep_reason"] == "only member"
    assert plan.loc["p1.jpg", "keep_reason"] == "protected"
    assert plan.loc["n.jpg", "keep_reason"] == "noise (never deleted)"
    assert (plan.loc[~plan["keep"], "keep_reason"] == "").all()
    assert plan["keep_reason"].dtype == "string"
    seen = pd.DataFrame(
        {
            "exists": [False, True, True, True],
            "size": pd.array([None, 5, None, 5], dtype="Int64"),
            "etag": ["e0", "e1", None, "e3"],
            "kind": ["file", "file", "file", "link"],
        }
    )
    one = select_keepers(list("abcd"), np.zeros((4, 1)), np.zeros(4, int), seen).set_index("path")
    assert one["keep"].tolist() == [True, True, True, False]  # only the link is deleted
    assert one["keep_reason"].tolist() == [
        "not found (never deleted)",
        "only member that can be kept",
        "not observed at plan time (never deleted)",
        "",
    ]
    centroid = select_keepers(
        ["a", "b", "c"], np.array([[0.0], [1.0], [3.0]]), np.zeros(3, int), policy="centroid"
    ).set_index("path")
    assert centroid.loc["b", "keep_reason"] == "nearest the cluster's mean vector (0.3333 vs 1.333)"


# -- the engine against a straightforward reference --------------------------------------------
NAMES = ["IMG_1", "IMG_1 (1)", "photo copy", "Copy of x", "x", "x - Copy", "y-edited", "zz"]
KEY_LISTS = st.lists(
    st.tuples(st.sampled_from(sorted(KEYS)), st.booleans()),
    min_size=1,
    max_size=5,
    unique_by=lambda k: k[0],
)


def reference_keepers(rows: list[dict], keys: list[tuple[str, bool]]) -> dict[int, str]:
    """cluster -> keeper path: sort each cluster's members by the keys, take the first."""
    path_rank = {p: i for i, p in enumerate(sorted(r["path"] for r in rows))}
    keys = keys if any(k == "path" for k, _ in keys) else [*keys, ("path", False)]

    def sort_key(r: dict) -> tuple:
        out: list = []
        for name, desc in keys:
            v = {
                "path": path_rank[r["path"]],
                "copy": float(copy_marker(r["path"]) is not None),
                "pixels": r["pixels"],
                "size": r["size"],
                "mtime": r["mtime"],
            }[name]
            unknown = v is None
            out += [unknown, 0 if unknown else (-v if desc else v)]
        return tuple(out)

    clusters: dict[int, list[dict]] = {}
    for r in rows:
        clusters.setdefault(r["cluster"], []).append(r)
    return {c: sorted(members, key=sort_key)[0]["path"] for c, members in clusters.items()}


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 4),  # cluster
            st.sampled_from(NAMES),
            st.integers(1, 3),  # size: a listed object always has one
            st.one_of(st.none(), st.integers(0, 2)),  # mtime
            st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))),  # w, h
        ),
        min_size=1,
        max_size=30,
    ),
    KEY_LISTS,
    st.randoms(use_true_random=False),
)
def test_the_engine_equals_a_sorted_reference_whatever_the_input_order(
    members: list, keys: list, rnd
) -> None:
    rows = [
        {
            "cluster": c,
            "path": f"f{c}/{i:02d}/{name}.jpg",
            "size": size,
            "mtime": mtime,
            "wh": wh,
            "pixels": None if wh is None else wh[0] * wh[1],
        }
        for i, (c, name, size, mtime, wh) in enumerate(members)
    ]
    policy = ",".join(("-" if d else "") + k for k, d in keys)
    lead = keys[0][0]
    in_dups = [r for r in rows if sum(q["cluster"] == r["cluster"] for q in rows) > 1]
    if lead in ("size", "mtime") and in_dups and all(r[lead] is None for r in in_dups):
        with pytest.raises(ConfigError, match=f"needs the object {lead}"):
            select_keepers(
                [r["path"] for r in rows],
                np.zeros((len(rows), 1)),
                [r["cluster"] for r in rows],
                pd.DataFrame({lead: [np.nan] * len(rows)}),
                policy=policy,
            )
        return
    expected = reference_keepers(rows, keys)
    for _ in range(3):
        rnd.shuffle(rows)
        objects = pd.DataFrame(
            {
                "size": pd.array([r["size"] for r in rows], dtype="Int64"),
                "etag": [f"e{i}" for i in range(len(rows))],  # observed without a time too
                "mtime": [np.nan if r["mtime"] is None else float(r["mtime"]) for r in rows],
                "width": pd.array([r["wh"] and r["wh"][0] for r in rows], dtype="Int64"),
                "height": pd.array([r["wh"] and r["wh"][1] for r in rows], dtype="Int64"),
            }
        )
        labels = np.array([r["cluster"] for r in rows])
        x = np.zeros((len(rows), 2))  # all identical: the chain guard could never split them
        plan = select_keepers([r["path"] for r in rows], x, labels, objects, policy=policy)
        kept = plan[plan["keep"]]
        assert kept["cluster"].is_unique  # exactly one keeper per cluster
        assert dict(zip(kept["cluster"], kept["path"], strict=True)) == expected
        assert (plan.loc[plan["keep"], "keep_reason"] != "").all()


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


# -- --protect: prefixes and globs -------------------------------------------------------------
PROTECT_PATHS = [
    "family/a.jpg",
    "family/2019/b.jpg",
    "family-2/c.jpg",
    "scans [old]/d.jpg",
    "scans o/e.jpg",
    "x.png",
    "deep/er/f.PNG",
    "Family.jpg",
]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        # no glob characters: a string prefix of the path relative to root (S3 semantics)
        ("family", {"family/a.jpg", "family/2019/b.jpg", "family-2/c.jpg"}),
        ("family/", {"family/a.jpg", "family/2019/b.jpg"}),
        ("family/2019/b.jpg", {"family/2019/b.jpg"}),
        (".", set(PROTECT_PATHS)),
        # globs: * crosses '/', case matters
        ("family/*", {"family/a.jpg", "family/2019/b.jpg"}),
        ("*.png", {"x.png"}),
        ("*.[pP][nN][gG]", {"x.png", "deep/er/f.PNG"}),
        ("*/b.jpg", {"family/2019/b.jpg"}),
        ("family/?.jpg", {"family/a.jpg"}),
        ("**/f.PNG", {"deep/er/f.PNG"}),
        # a folder whose name holds glob characters: literal prefix and glob both protect
        ("scans [old]/", {"scans [old]/d.jpg"}),
        ("scans [old]/*", {"scans [old]/d.jpg", "scans o/e.jpg"}),
    ],
)
def test_protect_prefixes_and_globs(tmp_path, pattern: str, expected: set) -> None:
    from dedup_batch.pipeline import _protected
    from dedup_batch.storage import Store

    store = Store(str(tmp_path / "root [1]"))  # glob characters in the root change nothing
    full = [store.resolve(p) for p in PROTECT_PATHS]
    mask, warnings = _protected(store, full, [pattern])
    assert {p for p, m in zip(PROTECT_PATHS, mask, strict=True) if m} == expected
    assert warnings == []
    # an absolute path or URL under the root is the same pattern
    absolute, _ = _protected(store, full, [f"{store.root_path}/{pattern.lstrip('.')}"])
    assert (absolute == mask).all()


def test_protect_patterns_that_match_nothing_are_warnings(tmp_path) -> None:
    from dedup_batch.errors import ScopeError
    from dedup_batch.pipeline import _protected
    from dedup_batch.storage import Store

    store = Store(f"memory://{tmp_path.name}/lib")
    full = [store.resolve(p) for p in PROTECT_PATHS]
    mask, warnings = _protected(store, full, ["family/", "FAMILY/*", "nope"])
    assert mask.sum() == 2
    assert len(warnings) == 2
    assert warnings[0].startswith("--protect 'FAMILY/*' matches none of the 8 feature paths")
    assert warnings[1].startswith("--protect 'nope' matches none")
    with pytest.raises(ScopeError, match=r"contains '\.\.'"):
        _protected(store, full, ["../elsewhere/*"])


def test_the_cli_takes_key_lists_and_refuses_bad_ones_before_any_work(capsys) -> None:
    from dedup_batch.cli import _keep_values_attached, _parser, _spec, main

    argv = ["plan", "--keep", "-pixels,mtime", "--protect", "family/*"]
    spec = _spec(_parser().parse_args(_keep_values_attached(argv)))
    assert spec.keep == "-pixels,mtime" and spec.protect == ["family/*"]
    assert _keep_values_attached(["--keep", "-o", "x"]) == ["--keep", "-o", "x"]  # not a key
    flags = ["--features", "nowhere/*.parquet", "--root", "nowhere", "--eps", "1"]
    assert main(["plan", *flags, "--keep", "-pixels,bogus"]) == 2
    err = capsys.readouterr().err
    assert "'keep' must be one of original, first-path" in err
    assert "(unknown policy or key 'bogus')" in err
