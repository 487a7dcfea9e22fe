"""Exceptions that carry the CLI's exit code.

Every error the user can fix is a :class:`DedupError` whose message is one line naming the
file, field or row at fault and what to do. The CLI prints ``error: <message>`` and exits with
``exit_code``; anything else is a bug (exit 1, traceback only with ``--debug``).
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DedupError",
    "InputError",
    "SafetyError",
    "ScopeError",
    "StorageError",
]


class DedupError(Exception):
    """Base class of the errors a user can act on."""

    exit_code: int = 1


class ConfigError(DedupError):
    """Bad usage: an unknown job-spec key, a bad flag value, a missing required setting."""

    exit_code = 2


class InputError(DedupError):
    """Bad input data: a corrupt or mismatched shard, NaN vectors, duplicate paths, ..."""

    exit_code = 2


class ScopeError(InputError):
    """A feature path that resolves outside the job's ``root``: never deleted, always refused."""


class StorageError(DedupError):
    """The storage backend cannot be reached or refuses us (endpoint, credentials, bucket)."""

    exit_code = 2


class SafetyError(DedupError):
    """A safety limit refused the operation before anything was deleted (``--max-delete``...)."""

    exit_code = 3


class IncompleteError(StorageError):
    """The store stopped answering after part of an apply was done: exit 4 (not 2, which
    promises that nothing was deleted); the completion report says what was done."""

    exit_code = 4


def one_line(exc: BaseException, *, with_type: bool = False) -> str:
    """The first line of ``exc``'s message (its type name when it has none), for messages that
    quote an error from a library: error lines here are one line each."""
    text = str(exc).strip().splitlines()
    if not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {text[0]}" if with_type else text[0]
