"""The tile's two ways to finish a block give scikit-learn's labels: the gathered path (the
low-rank screen's survivors only) and the fused path (the block's full product thresholded in
place, taken when the screen passes more than 1/FUSED_SHARE of the block: flat spectra, groups
of noisy copies). Each input runs with each path forced, on adversarial data: ties at eps,
duplicates, isotropic (flat) spectra, dense near-identical groups, both metrics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.cluster import DBSCAN as SkDBSCAN

import dedup_batch.cluster as cluster_mod
from dedup_batch.cluster import DBSCAN

#: FUSED_SHARE values forcing a path: 1 never fuses (a block never passes more than all its
#: pairs), 2**40 always fuses (any block with one survivor).
GATHERED, FUSED = 1, 2**40


def fit_both(
    X,
    share,
    screen=None,
    row_bytes=None,
    root_sample=None,
    leaf_scale=None,
    split_gain=None,
    screen_chunk=None,
    sub_product=None,
    **params,
):
    """Our labels and core rows equal scikit-learn's, with FUSED_SHARE = ``share``, the
    low-rank screen forced on or off (``screen``; None: measured, as in a real fit), the
    tiles' rows one whole copy (``row_bytes`` None) or built from the input in place with a row
    cache of ``row_bytes`` (see tests/test_cluster_rows.py), the component left out of a block
    found among ``root_sample`` of its rows' roots (1: the first row's, often not the largest)
    and left out when that saves 1/``split_gain`` of the block (1: never; 2**40: always), and
    leaves of ``leaf_scale`` * 32 rows, the screen's products ``screen_chunk`` columns at a
    time (chunks that pass nothing leave their part of the mask empty), and the survivors'
    values from one product of their rows and columns (``sub_product`` 2**40) or one dot
    per survivor (0)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cluster_mod, "FUSED_SHARE", share)
        if row_bytes is not None:
            mp.setattr(cluster_mod, "ROW_BYTES", row_bytes)
        if root_sample is not None:
            mp.setattr(cluster_mod, "ROOT_SAMPLE", root_sample)
        if leaf_scale is not None:
            mp.setattr(cluster_mod, "LEAF_SCALE", leaf_scale)
        if split_gain is not None:
            mp.setattr(cluster_mod, "_SPLIT_GAIN", split_gain)
        if screen_chunk is not None:
            mp.setattr(cluster_mod, "SCREEN_CHUNK", screen_chunk)
        if sub_product is not None:
            mp.setattr(cluster_mod, "SUB_PRODUCT_SHARE", sub_product)
        if screen is not None:
            mp.setattr(cluster_mod, "_screen_pays", lambda prep, work: screen)
        mp.setattr(cluster_mod, "LEAF", 32)
        mp.setattr(cluster_mod, "TILE", 96)
        ours = DBSCAN(**params).fit(X)
    ref = SkDBSCAN(**params).fit(X)
    np.testing.assert_array_equal(ours.labels_, ref.labels_)
    np.testing.assert_array_equal(ours.core_sample_indices_, ref.core_sample_indices_)


def isotropic_with_copies(rng, n, d, dense_share, noise, dtype):
    """Isotropic unit rows (no principal direction prunes), a share of them replaced by one
    vector plus independent noise (a dense near-identical group), and some exact copies."""
    X = rng.standard_normal((n, d))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    k = int(dense_share * n)
    if k:
        idx = rng.choice(n, k, replace=False)
        X[idx] = X[idx[0]] + noise * rng.standard_normal((k, d)) / np.sqrt(d)
    dup = rng.choice(n, n // 10, replace=False)
    X[dup[: len(dup) // 2]] = X[dup[len(dup) // 2 :][: len(dup) // 2]]
    return X.astype(dtype)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    d=st.sampled_from([16, 40, 128]),
    n=st.integers(2, 600),
    dense_share=st.sampled_from([0.0, 0.3, 0.8]),
    noise=st.sampled_from([1e-3, 0.3, 1.0]),
    min_samples=st.sampled_from([1, 2, 5]),
    metric=st.sampled_from(["euclidean", "cosine"]),
    dtype=st.sampled_from([np.float32, np.float64]),
    share=st.sampled_from([GATHERED, FUSED, 16]),
    # the engine's other switches (see fit_both)
    knobs=st.fixed_dictionaries(
        {
            "screen": st.sampled_from([None, True, False]),
            # the whole copy; rows built in place keeping no leaf; a cache evicting on every fit
            "row_bytes": st.sampled_from([None, 0, 6 * 32 * 130 * 4]),
            # every root, the first row's only (a component often not the largest), a few
            "root_sample": st.sampled_from([None, 1, 7]),
            "leaf_scale": st.sampled_from([1, 2, 3]),
            "split_gain": st.sampled_from([None, 1, 2**40]),
            "screen_chunk": st.sampled_from([None, 7, 32]),
            "sub_product": st.sampled_from([None, 0, 2**40]),
        }
    ),
)
def test_flat_spectra_and_dense_groups(
    seed, d, n, dense_share, noise, min_samples, metric, dtype, share, knobs
):
    rng = np.random.default_rng(seed)
    X = isotropic_with_copies(rng, n, d, dense_share, noise, dtype)
    # eps near the typical distance of two isotropic unit rows (sqrt 2) and near the group's
    # spread, so that many pairs of both kinds sit close to it
    for eps in (1.3, noise * 1.2) if metric == "euclidean" else (0.8, noise**2 * 0.7):
        fit_both(X, share, **knobs, eps=eps, min_samples=min_samples, metric=metric)


@pytest.mark.parametrize(
    ("share", "screen", "sub_product"),
    [(GATHERED, True, 0), (GATHERED, True, 2**40), (FUSED, True, None), (16, False, None)],
)
@pytest.mark.parametrize("min_samples", [1, 3])
@pytest.mark.parametrize("d", [16, 40])
def test_ties_exactly_at_eps(share, screen, sub_product, min_samples, d):
    # Integer points: squared distances are exact integers, so many pairs sit exactly at eps.
    rng = np.random.default_rng(d + min_samples)
    X = rng.integers(0, 3, size=(500, d)).astype(np.float32)
    for eps in (2.0, float(np.sqrt(5.0)), 3.0):
        fit_both(X, share, screen, sub_product=sub_product, eps=eps, min_samples=min_samples)


def test_fused_path_taken_only_where_the_screen_does_not_pay(monkeypatch):
    # The adaptive choices: isotropic rows (the 32-d screen passes most pairs) take the fused
    # path; rows spread over 8 directions, mostly farther apart than eps (the screen prunes),
    # do not. (Along one or two directions the rows would need coordinates so large against
    # eps that the engine delegates to scikit-learn, and nothing would be tested.)
    calls, screens = [], []
    orig = cluster_mod._fused_block
    orig_pays = cluster_mod._screen_pays

    def spy_pays(prep, work):
        screens.append(orig_pays(prep, work))
        return screens[-1]

    def spy(*args):
        out = orig(*args)
        calls.append(len(out[0]))
        return out

    monkeypatch.setattr(cluster_mod, "_fused_block", spy)
    monkeypatch.setattr(cluster_mod, "_screen_pays", spy_pays)
    rng = np.random.default_rng(3)
    X = isotropic_with_copies(rng, 3000, 256, 0.0, 0.0, np.float32)
    fit_both(X, cluster_mod.FUSED_SHARE, eps=1.35, min_samples=1)
    assert calls
    assert screens == [False]  # measured: the 32-d screen prunes nothing on isotropic rows
    calls.clear()
    screens.clear()
    X = 0.001 * rng.standard_normal((3000, 256))
    X[:, :8] += rng.uniform(0, 1.2, (3000, 8))
    fit_both(X, cluster_mod.FUSED_SHARE, eps=0.3, min_samples=1)
    assert not calls
    assert screens == [True]
