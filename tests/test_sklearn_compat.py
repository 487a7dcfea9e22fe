"""Private scikit-learn names are imported in one module only (dedup_batch/_sklearn_compat.py),
and the scikit-learn release it states as its minimum is the one installed or older."""

from __future__ import annotations

import ast
import os

import sklearn
from sklearn.utils.fixes import parse_version

from dedup_batch import _sklearn_compat

# scikit-learn's private estimator methods (the package's own ``_validate_*`` helpers are not)
_SKLEARN_PRIVATE_METHODS = {"_validate_params", "_validate_data", "_check_n_features"}

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dedup_batch")


def _private_sklearn_uses(path):
    """(line, what) for each import of a private sklearn module or name and each call of a
    private method of scikit-learn's estimators (``._validate_params``, ``._validate_data``) in
    the file."""
    with open(path) as f:
        tree = ast.parse(f.read())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sklearn"):
            names = [node.module, *(a.name for a in node.names)]
            if any(part.startswith("_") for n in names for part in n.split(".")):
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("sklearn") and any(
                    p.startswith("_") for p in a.name.split(".")
                ):
                    out.append((node.lineno, a.name))
        elif isinstance(node, ast.Attribute) and node.attr in _SKLEARN_PRIVATE_METHODS:
            out.append((node.lineno, node.attr))
    return out


def test_private_sklearn_api_only_in_the_compat_module():
    found = {}
    for folder, _, files in os.walk(PKG):
        for name in sorted(files):
            path = os.path.join(folder, name)
            if name.endswith(".py") and name != "_sklearn_compat.py":
                uses = _private_sklearn_uses(path)
                if uses:
                    found[os.path.relpath(path, PKG)] = uses
    assert found == {}
    # and the checker sees them where they are
    assert _private_sklearn_uses(os.path.join(PKG, "_sklearn_compat.py"))


def test_stated_minimum_is_not_newer_than_the_installed_release():
    assert parse_version(_sklearn_compat.MIN_SKLEARN) <= parse_version(sklearn.__version__)
    assert callable(_sklearn_compat.get_chunk_n_rows)
    assert hasattr(_sklearn_compat.RadiusNeighbors, "compute")
