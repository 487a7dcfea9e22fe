"""The one translator from backend exceptions to :class:`~dedup_batch.errors.StorageError`.

Every storage failure the user can fix (credentials, permissions, endpoint, bucket) becomes a
one-line :class:`StorageError` (exit 2) that names what was being done and what to check, with
the job's secrets scrubbed (:mod:`dedup_batch.secrets`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from ..errors import StorageError, one_line
from ..secrets import scrub, strip_userinfo

__all__ = ["is_backend_error", "setup_error", "storage_error", "translated"]

# Exceptions raised by the storage backends' client libraries that are not OSErrors (botocore's
# EndpointConnectionError, NoCredentialsError, ...): matched by the top-level module of their
# class, so that storage needs no hard import of any optional backend library.
_BACKEND_MODULES = frozenset(
    {
        "botocore",
        "aiobotocore",
        "aiohttp",
        "urllib3",
        "requests",
        "s3fs",
        "gcsfs",
        "adlfs",
        "google",
        "azure",
    }
)


def is_backend_error(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return True
    return any(c.__module__.split(".")[0] in _BACKEND_MODULES for c in type(exc).__mro__)


# Exception class names (anywhere in the class's MRO) by what the user has to check.
_CREDENTIAL_ERRORS = frozenset(
    {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "ProfileNotFound"}
)
_ENDPOINT_ERRORS = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ClientConnectorError",
        "ConnectionError",
        "ProxyConnectionError",
        "SSLError",
        "InvalidEndpointError",
    }
)


def _advice(exc: BaseException, options: Mapping[str, Any] | None) -> tuple[str, str]:
    """``(kind, what to check)`` for a backend exception; kind is ``credentials``,
    ``denied``, ``not_found``, ``endpoint`` or ``other``."""
    names = {c.__name__ for c in type(exc).__mro__}
    endpoint = (options or {}).get("endpoint_url")
    where = f" {strip_userinfo(endpoint)}" if isinstance(endpoint, str) and endpoint else ""
    if names & _CREDENTIAL_ERRORS:
        return "credentials", (
            "no usable credentials: set key/secret in storage_options, the AWS_* environment "
            "variables, a profile or a role"
        )
    if isinstance(exc, PermissionError):
        return "denied", (
            "access denied: check the credentials (key/secret, profile, role) and that they "
            "may use this bucket"
        )
    if isinstance(exc, FileNotFoundError):
        return "not_found", "not found: check the bucket and the path"
    if isinstance(exc, ConnectionError | TimeoutError) or names & _ENDPOINT_ERRORS:
        return "endpoint", (
            f"cannot reach the storage endpoint{where}: check endpoint_url (-o "
            "endpoint_url=... or $AWS_ENDPOINT_URL) and the network"
        )
    return "other", (
        "the storage backend refused the request: check endpoint_url and the credentials"
    )


def storage_error(
    where: str, exc: BaseException, options: Mapping[str, Any] | None
) -> StorageError:
    """Translate a backend exception into a one-line :class:`StorageError`.

    ``where`` names what was being done (a URL, or ``"DeleteObjects in bucket 'b' under
    's3://b/p'"``); the message adds what to check for this kind of failure (credentials,
    permissions, endpoint) and the backend's own words. Secrets from ``options`` never appear.
    """
    _, hint = _advice(exc, options)
    return StorageError(scrub(f"{where}: {hint} ({one_line(exc)})", options))


@contextmanager
def translated(
    where: str,
    options: Mapping[str, Any] | None,
    *,
    passthrough: tuple[type[BaseException], ...] = (FileNotFoundError,),
) -> Iterator[None]:
    """Run a backend call, turning its failures into :func:`storage_error`.

    ``passthrough`` errors (default ``FileNotFoundError``: callers decide what a missing object
    means) and errors already translated propagate unchanged. Anything that is not a backend
    error (see :func:`is_backend_error`) is a bug and propagates as it is. This is the one
    place that catches "any exception" around backend calls: botocore, aiohttp and fsspec
    errors have no common base class.
    """
    try:
        yield
    except (*passthrough, StorageError):
        raise
    except Exception as exc:
        if not is_backend_error(exc):
            raise
        raise storage_error(where, exc, options) from None


def setup_error(
    exc: BaseException, options: Mapping[str, Any] | None = None
) -> StorageError | None:
    """A :class:`StorageError` saying what to check when ``exc`` means the storage is set up
    wrong (no credentials, credentials refused, endpoint unreachable), else ``None``.

    For errors that escaped every narrower handler (the CLI's last resort): they are the
    user's to fix, not bugs. Secrets from ``options`` never appear in the message.
    """
    if not is_backend_error(exc):
        return None
    kind, hint = _advice(exc, options)
    if kind not in ("credentials", "denied", "endpoint"):
        return None
    return StorageError(scrub(f"storage: {hint} ({one_line(exc)})", options))
