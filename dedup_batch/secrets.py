"""Secrets: which storage options may be shown, and scrubbing of everything else.

The one owner of the secrets policy. Storage options (``-o KEY=VALUE``, ``storage_options:`` in a
job spec) carry credentials under names nobody can list in advance (``key``, ``secret``,
``s3_additional_kwargs.SSECustomerKey``, ``connection_string``, ``credential``, a password inside
``endpoint_url``...), so the policy is an *allow-list*: only the options named in
:data:`NON_SECRET_OPTIONS` are ever written or shown, URLs among them without their userinfo;
every other value is written as ``***``.

* :func:`redact` is what may be written (``job.yaml``, ``summary.json``, reports, log fields);
* :func:`secret_values` is every string :func:`redact` hides (plus the userinfo of URLs), the
  strings to scrub out of free text such as a backend's error message;
* :func:`scrub` replaces them in a text.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "MIN_SECRET_LEN",
    "NON_SECRET_OPTIONS",
    "REDACTED",
    "SECRET_ENV",
    "URL_OPTIONS",
    "env_secret_values",
    "merge_options",
    "redact",
    "scrub",
    "secret_values",
    "strip_userinfo",
    "without_redacted",
]

#: What a hidden value is written as.
REDACTED = "***"

#: Storage options (dotted for nested mappings) whose values are not secrets: only these are
#: written or shown. Names are matched exactly (case-sensitive, as Python keyword arguments).
#: Sources: the keyword arguments of s3fs's ``S3FileSystem`` and fsspec's instance cache,
#: botocore's ``Config`` (``config_kwargs``) and the client's own (``client_kwargs``).
NON_SECRET_OPTIONS: frozenset[str] = frozenset(
    {
        # fsspec / s3fs
        "anon",
        "endpoint_url",
        "use_ssl",
        "requester_pays",
        "version_aware",
        "default_block_size",
        "default_fill_cache",
        "default_cache_type",
        "cache_regions",
        "max_concurrency",
        "fixed_upload_size",
        "skip_instance_cache",
        "use_listings_cache",
        "listings_expiry_time",
        "max_paths",
        "profile",
        "region",
        "region_name",
        # the client (boto3 / aiobotocore create_client)
        "client_kwargs.region_name",
        "client_kwargs.endpoint_url",
        "client_kwargs.use_ssl",
        "client_kwargs.verify",
        "client_kwargs.api_version",
        # botocore Config
        "config_kwargs.region_name",
        "config_kwargs.signature_version",
        "config_kwargs.connect_timeout",
        "config_kwargs.read_timeout",
        "config_kwargs.max_pool_connections",
        "config_kwargs.tcp_keepalive",
        "config_kwargs.parameter_validation",
        "config_kwargs.inject_host_prefix",
        "config_kwargs.request_checksum_calculation",
        "config_kwargs.response_checksum_validation",
        "config_kwargs.retries.max_attempts",
        "config_kwargs.retries.total_max_attempts",
        "config_kwargs.retries.mode",
        "config_kwargs.s3.addressing_style",
        "config_kwargs.s3.use_accelerate_endpoint",
        "config_kwargs.s3.use_dualstack_endpoint",
        # per-request arguments that name a setting, not a key
        "s3_additional_kwargs.ServerSideEncryption",
        "s3_additional_kwargs.SSECustomerAlgorithm",
        "s3_additional_kwargs.StorageClass",
        "s3_additional_kwargs.ACL",
        "s3_additional_kwargs.RequestPayer",
    }
)

#: Non-secret options that hold URLs: shown without userinfo (``user:password@``), query or
#: fragment, which is where an endpoint URL can carry a credential.
URL_OPTIONS: frozenset[str] = frozenset({"endpoint_url", "client_kwargs.endpoint_url"})

#: Environment variables whose values are secrets (scrubbed from every log line).
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")

#: Secrets shorter than this are not scrubbed from free text: replacing "a" everywhere would
#: garble every line. They are still written as ``***`` by :func:`redact`.
MIN_SECRET_LEN = 4

_SCALARS = (str, bool, int, float, type(None))


def redact(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """What may be written or shown of ``options``: a copy with every secret as ``"***"``.

    Parameters
    ----------
    options : mapping, optional
        Storage options, nested mappings for dotted names (``{"client_kwargs": {...}}``).

    Returns
    -------
    dict
        The same keys. A value is kept only when its dotted name is in
        :data:`NON_SECRET_OPTIONS` and it is a scalar; URLs (:data:`URL_OPTIONS`) lose their
        userinfo, query and fragment. Mappings are walked; everything else is ``"***"``.
    """
    return _redact(options or {}, "")


def _redact(options: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in options.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out[k] = _redact(v, name + ".")
        elif name in NON_SECRET_OPTIONS and isinstance(v, _SCALARS):
            out[k] = strip_userinfo(v) if name in URL_OPTIONS and isinstance(v, str) else v
        else:
            out[k] = REDACTED
    return out


def without_redacted(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` (as read back from a redacted ``job.yaml``) without the ``***`` values, at
    every depth: those credentials come again from the user or the environment."""
    return {
        k: (without_redacted(v) if isinstance(v, Mapping) else v)
        for k, v in (options or {}).items()
        if v != REDACTED
    }


def merge_options(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base``, nested mappings merged key by key (``over`` wins)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge_options(out[k], v)
        else:
            out[k] = v
    return out


def strip_userinfo(url: str) -> str:
    """``url`` without ``user:password@``, query and fragment (``http://h:9000/p``).

    Text that does not parse as a URL with a host is hidden whole (``"***"``): it cannot be
    shown safely.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError:
        return REDACTED
    if not parts.scheme or not host:
        return REDACTED if "@" in url or "?" in url or "#" in url else url
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc = f"{netloc}:{port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def secret_values(options: Mapping[str, Any] | None) -> list[str]:
    """Every secret string in ``options``, longest first: what to scrub out of free text.

    The string form of every value :func:`redact` hides (lists: each item), and the userinfo,
    password, query and fragment of the URLs it shows, raw and percent-decoded. Booleans,
    ``None`` and strings shorter than :data:`MIN_SECRET_LEN` are left out.
    """
    found: set[str] = set()
    _collect(options or {}, "", found)
    return sorted((v for v in found if len(v) >= MIN_SECRET_LEN), key=len, reverse=True)


def _collect(options: Mapping[str, Any], prefix: str, found: set[str]) -> None:
    for k, v in options.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            _collect(v, name + ".", found)
        elif name in NON_SECRET_OPTIONS and isinstance(v, _SCALARS):
            if name in URL_OPTIONS and isinstance(v, str):
                found.update(_url_secrets(v))
        else:
            found.update(_strings(v))


def _strings(value: Any) -> list[str]:
    if value is None or isinstance(value, bool):
        return []
    if isinstance(value, list | tuple | set | frozenset):
        return [s for item in value for s in _strings(item)]
    return [str(value)]


def _url_secrets(url: str) -> list[str]:
    if strip_userinfo(url) == REDACTED:
        return [url]
    parts = urllib.parse.urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    raw = [userinfo, parts.password or "", parts.username or "", parts.query, parts.fragment]
    out = [s for s in raw if s]
    return out + [urllib.parse.unquote(s) for s in out]


def env_secret_values() -> list[str]:
    """The values of the secret environment variables (:data:`SECRET_ENV`) that are set."""
    return [os.environ[v] for v in SECRET_ENV if len(os.environ.get(v) or "") >= MIN_SECRET_LEN]


def scrub(text: str, secrets: Mapping[str, Any] | Iterable[str] | None) -> str:
    """``text`` with every secret replaced by ``***``.

    Parameters
    ----------
    text : str
        Free text: a log line, a backend's error message.
    secrets : mapping or iterable of str
        Storage options (their :func:`secret_values` are replaced) or the secret strings.
        Longer secrets are replaced first, so that one containing another is hidden whole.
    """
    if not secrets:
        return text
    values = (
        secret_values(secrets)
        if isinstance(secrets, Mapping)
        else sorted((s for s in secrets if len(s) >= MIN_SECRET_LEN), key=len, reverse=True)
    )
    for value in values:
        if value in text:
            text = text.replace(value, REDACTED)
    return text
