"""Keep policies: the named policies, the sort keys they are made of, and their parsing.

The one list of keep policies (:data:`POLICIES`); ``config`` validates ``keep:`` against it,
``select`` sorts by it, the CLI's help lists it. Pure Python (no numpy or pandas), so that
``dedup-batch --help`` and the job-spec check start without loading the select stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

__all__ = [
    "CENTROID",
    "DEFAULT_POLICY",
    "KEYS",
    "POLICIES",
    "POLICY_CHOICES",
    "KeepPolicy",
    "parse_policy",
    "policy_problem",
]

#: Sort keys: name -> (what ascending puts first, what descending (``-name``) puts first).
KEYS: dict[str, tuple[str, str]] = {
    "pixels": ("fewest pixels", "most pixels"),
    "copy": ("name without copy marker", "name with copy marker"),
    "mtime": ("oldest", "newest"),
    "size": ("smallest file", "largest file"),
    "path": ("first path", "last path"),
}
#: ``centroid`` is a key too, but only as the first one: its value (the distance to the mean
#: vector of the members still to cover) changes as keepers are chosen, so it is not a
#: per-object value like the keys above.
CENTROID = "centroid"

#: The named policies (``--keep NAME``): each an alias of a key list. ``path`` ends every list
#: that does not name it, so ties never depend on input order.
POLICIES: dict[str, str] = {
    "original": "-pixels,copy,mtime,-size,path",
    "first-path": "path",
    "last-path": "-path",
    "largest-size": "-size,path",
    "smallest-size": "size,path",
    "newest": "-mtime,path",
    "oldest": "mtime,path",
    "centroid": "centroid,path",
}
DEFAULT_POLICY = "original"


@dataclass(frozen=True)
class KeepPolicy:
    """A parsed keep policy: its sort keys, in order, each ascending or descending.

    ``keys`` holds ``(name, descending)`` pairs; ``path`` is always present (appended when not
    given). ``centroid``, when used, is the first key.
    """

    text: str
    keys: tuple[tuple[str, bool], ...]

    @property
    def centroid(self) -> bool:
        return self.keys[0][0] == CENTROID

    @property
    def key_names(self) -> frozenset[str]:
        return frozenset(k for k, _ in self.keys)

    def describe(self) -> str:
        """The keys in words, e.g. ``most pixels, then name without copy marker, ...``."""
        words = [
            "nearest the cluster's mean vector" if k == CENTROID else KEYS[k][d]
            for k, d in self.keys
        ]
        return ", then ".join(words)


#: What ``--keep`` accepts, for error messages.
POLICY_CHOICES = (
    f"one of {', '.join(POLICIES)}, or a comma-separated list of sort keys "
    f"({', '.join(KEYS)}; -KEY sorts descending)"
)


def parse_policy(text: str) -> KeepPolicy:
    """Parse ``--keep``: a named policy (:data:`POLICIES`) or a comma-separated key list.

    A key sorts ascending (smallest value first, e.g. ``mtime``: oldest first); ``-key`` sorts
    descending (``-pixels``: most pixels first); ``+key`` is ascending too. The first member of
    the sorted cluster is the keeper.

    Raises
    ------
    ConfigError
        An unknown name or key, a key given twice, ``centroid`` anywhere but first.
    """
    policy, problem = _parse_policy(text)
    if policy is None:
        raise ConfigError(f"keep policy {text!r}: {problem}; use {POLICY_CHOICES}")
    return policy


def policy_problem(text: str) -> str | None:
    """What is wrong with ``text`` as a keep policy (one short phrase), or None if it parses."""
    return _parse_policy(text)[1] or None


def _parse_policy(text: str) -> tuple[KeepPolicy | None, str]:
    if not isinstance(text, str):
        return None, "not text"
    if not text.strip():
        return None, "empty"
    text = text.strip()
    keys: list[tuple[str, bool]] = []
    for i, raw in enumerate(POLICIES.get(text, text).split(",")):
        tok = raw.strip()
        desc = tok.startswith("-")
        name = tok[1:].strip() if tok[:1] in "+-" and tok else tok
        if name == CENTROID and i == 0 and not desc:
            keys.append((CENTROID, False))
            continue
        if name == CENTROID:
            return None, "centroid can only be the first key, without a sign"
        if name not in KEYS:
            return None, f"unknown policy or key {tok!r}"
        if any(k == name for k, _ in keys):
            return None, f"key {name!r} is given twice"
        keys.append((name, desc))
    if not any(k == "path" for k, _ in keys):
        keys.append(("path", False))
    return KeepPolicy(text, tuple(keys)), ""
