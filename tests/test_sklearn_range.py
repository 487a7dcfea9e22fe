"""The lowest scikit-learn that ``pyproject.toml`` admits runs the engine with scikit-learn's
labels, not only the release this environment resolved to.

The installed release is the upper end (the suite runs on it). For the lower end this test puts
``scikit-learn==MIN_SKLEARN.*`` in a folder of its own (``pip install --target``, no dependencies:
numpy, scipy and joblib are the environment's) and runs scikit-learn's own DBSCAN tests against
the engine, plus a labels check on random and tie-heavy inputs, in a child process that imports
that release first. The engine's exactness depends on scikit-learn's private routines
(``dedup_batch/_sklearn_compat.py``), whose rounding a release may change: this is where such a
change shows.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import sklearn
from sklearn.utils.fixes import parse_version

from dedup_batch import _sklearn_compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIP = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--only-binary=:all:"]
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x"]

_CHILD = r"""
import sys
import numpy as np
import sklearn
from sklearn.cluster import DBSCAN as SkDBSCAN
from dedup_batch.cluster import DBSCAN

assert sklearn.__version__.startswith(sys.argv[1] + "."), sklearn.__version__
rng = np.random.default_rng(0)
for trial in range(40):
    n, d = int(rng.integers(2, 300)), int(rng.choice([2, 16, 64, 300]))
    if trial % 2:
        X = rng.integers(0, 3, (n, d)).astype(np.float32)  # a lattice: many ties at eps 1, sqrt 2
        eps = float(rng.choice([1.0, 2**0.5, 2.0]))
    else:
        X = rng.standard_normal((n, d)).astype(np.float32)
        noise = rng.standard_normal((n - n // 2, d)).astype(np.float32)
        X[n // 2 :] = X[: n - n // 2] + 0.05 * noise
        eps = float(np.sqrt(d) * 0.08)
    for metric in ("euclidean", "cosine"):
        for ms in (1, 3):
            if metric == "cosine" and not np.all(np.abs(X).sum(axis=1) > 0):
                continue
            a = DBSCAN(eps=eps, min_samples=ms, metric=metric).fit(X).labels_
            b = SkDBSCAN(eps=eps, min_samples=ms, metric=metric).fit(X).labels_
            assert np.array_equal(a, b), (trial, metric, ms)
print("labels ok", sklearn.__version__)
"""


def test_pyproject_bound_is_the_compat_modules_minimum():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        specs = re.findall(r'"scikit-learn\s*([^"]*)"', f.read())
    assert specs == [f">={_sklearn_compat.MIN_SKLEARN}"]
    assert parse_version(sklearn.__version__) >= parse_version(_sklearn_compat.MIN_SKLEARN)


@pytest.mark.timeout(900)
def test_lowest_supported_scikit_learn(tmp_path):
    low = _sklearn_compat.MIN_SKLEARN
    if sklearn.__version__.startswith(low + "."):
        pytest.skip(f"the installed scikit-learn {sklearn.__version__} is the lowest already")
    target = tmp_path / "sklearn-low"
    pip = subprocess.run(
        [*PIP, "--target", str(target), f"scikit-learn=={low}.*"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if pip.returncode != 0 and (
        "No matching distribution" in pip.stderr or "Could not find a version" in pip.stderr
    ):
        # no wheel of that release for this Python (a newer interpreter than the release)
        pytest.skip(f"no scikit-learn {low} wheel for this Python: {pip.stderr.strip()[-200:]}")
    assert pip.returncode == 0, pip.stderr[-2000:]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), ROOT]))
    labels = subprocess.run(
        [sys.executable, "-c", _CHILD, low], env=env, capture_output=True, text=True, timeout=600
    )
    assert labels.returncode == 0, labels.stderr[-3000:]
    suite = subprocess.run(
        [*PYTEST, os.path.join(ROOT, "tests", "test_cluster_sklearn_suite.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(tmp_path),
    )
    assert suite.returncode == 0 and " passed" in suite.stdout, suite.stdout[-3000:]
