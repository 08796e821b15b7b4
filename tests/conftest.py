"""Shared fixtures: offline environment, one thread for tiny models, a loopback S3 server."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator

import pytest

from testkit.net import free_port

# Nothing in the tests may reach the internet, and tiny models run far faster on one thread.
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_HUB_DISABLE_TELEMETRY="1",
    GRADIO_ANALYTICS_ENABLED="False",
    RAY_USAGE_STATS_ENABLED="0",
    OMP_NUM_THREADS="1",
    TOKENIZERS_PARALLELISM="false",
    # Test clusters live on loopback: without this Ray rewrites 127.0.0.1 addresses to the machine's
    # external IP (and the GCS of a 127.0.0.1 node listens on loopback only). Read at `import ray`.
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
)


def pytest_configure(config: pytest.Config) -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3-compatible HTTP server (moto) on 127.0.0.1; yields its endpoint URL.

    The code under test reaches it exactly as it would reach AWS: through AWS_ENDPOINT_URL and the
    standard credential variables.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                            "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1")
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh bucket on the loopback server; yields its s3:// URI."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def _ray_session() -> Iterator[None]:
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_local(_ray_session: None, s3_server: str) -> None:
    """The embedded local Ray (2 CPUs, loopback), started once and shared by every test that needs it.

    It depends on the S3 server so that Ray's workers inherit its endpoint and credentials (worker
    environments are fixed when Ray starts). A test that shuts Ray down (to start a cluster of its
    own) gets it back in the next test.
    """
    from speeder_platform.ray_utils import ensure_ray

    ensure_ray()
