"""What the fault scenarios share: a scenario's result, a workspace of tiny artifacts, a loopback S3
server that can be stopped and restarted, and helpers to find and kill Ray actors.

Scenario functions take a `Workspace` and return `outcome(...)`: {scenario, injected, observed,
data_lost, passed, seconds, details}. The workspace builds what a scenario needs on first use (a
prepared and featurized synthetic dataset, a trained checkpoint) in its temporary root; a test can hand
it ready-made artifacts instead (assign `ws.dataset` / `ws.checkpoint`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import Any

from speeder_platform.config import SpeederConfig, load_config

log = logging.getLogger("speeder.bench")

# A tiny model and a tiny catalog: every scenario runs in seconds to a minute on 2 CPU cores.
TINY = ("model.max_history=8", "model.mrc.hidden_size=32", "model.mrc.num_layers=1", "trainer.num_workers=1",
        "trainer.epochs=1", "trainer.batch_size=16", "trainer.log_every=5", "trainer.stages=[1]",
        "featurize.text_encoder=hashing", "featurize.image_size=32", "featurize.batch_size=16",
        "featurize.sasrec.epochs=2", "featurize.sasrec.hidden_size=16", "featurize.sasrec.max_length=8",
        "prepare.synthetic.num_users=60", "prepare.synthetic.num_items=80", "prepare.synthetic.image_size=16",
        "prepare.max_history=8", "score.k=5", "score.batch_size=16", "score.actor_num_cpus=0.5",
        "serve.replica_num_cpus=0.5")
TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}  # moto takes any


def outcome(scenario: str, injected: str, observed: str, *, data_lost: bool, passed: bool, started: float,
            **details: Any) -> dict[str, Any]:
    """A scenario's result (started: its time.perf_counter() at the start)."""
    return {"scenario": scenario, "injected": injected, "observed": observed, "data_lost": bool(data_lost),
            "passed": bool(passed) and not data_lost, "seconds": round(time.perf_counter() - started, 1),
            "details": details}


class S3Server:
    """A moto S3 server on 127.0.0.1 that can be stopped and started again on the same port.

    moto keeps its buckets in the process, not in the server: a restarted server serves the same data,
    as a real endpoint does after a restart.
    """

    def __init__(self) -> None:
        from speeder_platform.bench.serve import _free_port

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server: Any = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def bucket(self) -> str:
        """A fresh bucket; its s3:// URI."""
        import boto3

        name = f"faults-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=name)
        return f"s3://{name}"

    @contextmanager
    def environment(self) -> Iterator[None]:
        """AWS_* variables pointing at this server, restored after. (Ray workers get the endpoint through
        worker_env but never the keys: they need `bench_credentials` from before Ray started.)"""
        with _environ(AWS_ENDPOINT_URL=self.endpoint, AWS_REGION="us-east-1", **TEST_CREDENTIALS):
            yield


@contextmanager
def bench_credentials() -> Iterator[None]:
    """The test server's credentials in the environment, restored after. Start Ray inside: its workers
    inherit them, as cluster nodes get theirs from an instance profile; no runtime_env carries keys."""
    with _environ(**TEST_CREDENTIALS):
        yield


@contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Workspace:
    """A temporary root and the artifacts scenarios share, each built on first use."""

    def __init__(self, root: str | None = None) -> None:
        self.root = root or tempfile.mkdtemp(prefix="speeder-faults-")
        self._owns_root = root is None
        self._s3: S3Server | None = None
        self._cleanups: list[Callable[[], None]] = []
        self.serve_url: str | None = None  # set by the serve scenarios' shared deployment

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def built(self, artifact: str) -> bool:
        """Whether `dataset` / `checkpoint` exists already (built, adopted or assigned)."""
        return artifact in self.__dict__  # where functools.cached_property keeps a computed value

    def adopt(self, artifact: str, uri: str) -> None:
        """Use what a scenario produced as the shared `dataset` / `checkpoint`, unless there is one."""
        self.__dict__.setdefault(artifact, uri)

    def config(self, *overrides: str) -> SpeederConfig:
        """The tiny settings on this workspace (output_root = root, data = the shared dataset if built)."""
        data = [f"data.uri={self.dataset}"] if self.built("dataset") else []
        return load_config(None, [f"output_root={self.root}", *TINY, *data, *overrides])

    @cached_property
    def dataset(self) -> str:
        """The synthetic catalog, prepared and featurized (hashed text, EfficientNet images, SASRec)."""
        from speeder_platform.data.prepare import prepare_dataset
        from speeder_platform.featurize.pipeline import run_featurize

        cfg = self.config(f"data.uri={self.path('data')}")
        prepare_dataset(cfg.prepare, cfg.data.uri)
        run_featurize(cfg)
        return cfg.data.uri

    @cached_property
    def checkpoint(self) -> str:
        """A checkpoint of a short real training run (stage 1) on the dataset."""
        from speeder_platform.train.driver import run_training

        cfg = self.config("trainer.max_steps_per_epoch=4", "trainer.run_name=workspace")
        return run_training(cfg).checkpoint

    @property
    def s3(self) -> S3Server:
        """The workspace's S3 server, started on first use and stopped by close()."""
        if self._s3 is None:
            self._s3 = S3Server()
            self._s3.start()
        return self._s3

    def on_close(self, cleanup: Callable[[], None]) -> None:
        """Run `cleanup` in close() (last registered, first run)."""
        self._cleanups.append(cleanup)

    def close(self, keep_root: bool = False) -> None:
        """Run the cleanups, stop the S3 server, delete the root (when this workspace made it)."""
        for cleanup in reversed(self._cleanups):
            try:
                cleanup()
            except Exception as err:  # noqa: BLE001 - one failed cleanup must not skip the others
                log.warning("cleanup %s failed: %s", getattr(cleanup, "__name__", cleanup), err)
        self._cleanups.clear()
        if self._s3 is not None:
            self._s3.stop()
        if keep_root:
            log.info("kept %s", self.root)
        elif self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)


# -- Ray actors -------------------------------------------------------------------------------------
def alive_actors(name_part: str) -> list[dict[str, Any]]:
    """ALIVE actors of this driver's Ray whose class name or repr contains `name_part` (state API)."""
    import ray
    from ray.util.state import list_actors

    found = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")],
                        limit=1000, raise_on_missing_output=False)
    return [a for a in found if name_part in a["class_name"] or name_part in (a["repr_name"] or "")]


def kill_pid(pid: int) -> None:
    """SIGKILL: no cleanup, no goodbye, as the kernel's OOM killer or a lost node would do it."""
    os.kill(pid, signal.SIGKILL)


def wait_for(predicate: Callable[[], Any], timeout_s: float, every_s: float = 0.3) -> Any:
    """Poll until predicate() is truthy (its value is returned) or the timeout passes (None).

    Exceptions while polling (a folder listed while deleted, the state API busy) count as "not yet".
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as err:  # noqa: BLE001 - polling a system under fault: look again
            log.debug("still waiting: %s", err)
            value = None
        if value:
            return value
        time.sleep(every_s)
    return None
