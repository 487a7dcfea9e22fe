"""Shared fixtures: a real moto S3 server on loopback and real Dask clusters.

The S3 server is started once per session (as s3fs's own tests do) and reset before each test
that uses it through ``POST /moto-api/reset``. Dummy credentials go in the environment, so boto
and s3fs can never reach a real account.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

# Dummy credentials and loopback only: set before any boto/s3fs import can read the environment.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing-key-id")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("DASK_SCHEDULER_ADDRESS", None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL of a moto S3 server running on 127.0.0.1 for the whole session."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    old = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield endpoint
    finally:
        if old is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = old
        server.stop()


@pytest.fixture
def s3(s3_server: str) -> Iterator[dict]:
    """A freshly reset S3 server: yields ``storage_options`` for s3fs pointing at it.

    Also clears s3fs's instance cache, so no listing cached by an earlier test is reused.
    """
    import requests
    import s3fs

    requests.post(f"{s3_server}/moto-api/reset", timeout=10)
    s3fs.S3FileSystem.clear_instance_cache()
    yield {"endpoint_url": s3_server, "key": "testing-key-id", "secret": "testing-secret-key"}
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3fs_client(s3: dict):
    """An ``s3fs.S3FileSystem`` on the reset server (bucket creation, fixtures)."""
    import s3fs

    return s3fs.S3FileSystem(
        client_kwargs={"endpoint_url": s3["endpoint_url"]},
        key=s3["key"],
        secret=s3["secret"],
        skip_instance_cache=True,
    )


@pytest.fixture(scope="session")
def dask_client() -> Iterator:
    """A real ``distributed.Client`` on a 2-worker ``LocalCluster`` (processes), per session:
    the one a job starts (``pipeline.local_cluster``), with 1 thread per worker."""
    from distributed import Client

    from dedup_batch.pipeline import local_cluster

    with local_cluster(2, 1) as cluster, Client(cluster) as client:
        yield client
