"""Shared fixtures: offline environment, one thread for tiny models, a loopback S3 server."""

from __future__ import annotations

import fcntl
import logging
import os
import uuid
from collections.abc import Callable, Iterator

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


# Parallel runs (`make test`: pytest -n 3 --dist loadgroup). Each xdist worker is its own process with its
# own session fixtures: one loopback S3 server and one embedded Ray (ray_local) per worker, on free ports
# with their own session folders under /tmp/ray. The unit of work sent to a worker is a test module, in
# file order, so module-scoped fixtures (a Serve instance, a `ray start --head`, a featurized workspace)
# are built once; the modules of one SHARED_WORKER group run on one worker, one after the other.
# (xdist's own xdist_group marks do nothing with pytest 9, which no longer has Item._nodeid.)
SHARED_WORKER = {
    # Their assertions time Serve's answers (a 503 within 2 s, a 504 soon after the timeout, recovery after
    # a killed replica): never two of them at once.
    "tests/platform/test_serve.py": "serve-timing",
    "tests/fault/test_serve_faults.py": "serve-timing",
}
# The modules that take longest (CI durations) are handed out first, so that no worker is left with one of
# them at the end; the rest follow in file order, integration tests before unit tests.
SLOWEST_FIRST = (
    "tests/fault/test_features_faults.py",
    "tests/jobs/test_smoke.py",
    "tests/platform/test_train.py",
    "tests/fault/test_serve_faults.py",
    "tests/jobs/test_submit.py",
    "tests/platform/test_score.py",
    "tests/fault/test_score_faults.py",
    "tests/platform/test_featurize.py",
    "tests/platform/test_multinode.py",
)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):  # noqa: ANN201 - an xdist scheduler
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return SHARED_WORKER.get(path, path)

    config.option.loadscopereorder = False  # hand the units out in collection order (below)
    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("loadgroup", default=False):  # set on xdist's workers under --dist loadgroup
        return

    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]

    slow = {module(i) for i in items if i.get_closest_marker("integration") or i.get_closest_marker("fault")}

    def rank(item: pytest.Item) -> tuple[int, int]:
        path = module(item)
        return (0, SLOWEST_FIRST.index(path)) if path in SLOWEST_FIRST else (1 if path in slow else 2, 0)

    items.sort(key=rank)  # stable: modules stay whole, in file order within a rank


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
def _ray_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], None]]:
    """Yields start(): the embedded local Ray of this process, started if it is not running; stopped at the end.

    Under xdist the workers take turns to start theirs (a file lock): Ray starts a dozen processes that
    import for seconds, and several starts at once on 2 cores made a raylet give up waiting for its agent.
    """
    import ray

    from speeder_platform.ray_utils import ensure_ray

    lock = tmp_path_factory.getbasetemp().parent / "ray-start.lock" if os.environ.get("PYTEST_XDIST_WORKER") else None

    def start_or_clean_up() -> None:
        try:
            ensure_ray()
        except BaseException:
            ray.shutdown()  # a start that failed half-way leaves its GCS and dashboard running otherwise
            raise

    def start() -> None:
        if ray.is_initialized():
            return
        if lock is None:
            start_or_clean_up()
            return
        with open(lock, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                start_or_clean_up()
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    yield start
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_local(_ray_session: Callable[[], None], s3_server: str) -> None:
    """The embedded local Ray (2 CPUs, loopback), started once and shared by every test that needs it.

    It depends on the S3 server so that Ray's workers inherit its endpoint and credentials (worker
    environments are fixed when Ray starts). A test that shuts Ray down (to start a cluster of its
    own) gets it back in the next test.
    """
    _ray_session()

