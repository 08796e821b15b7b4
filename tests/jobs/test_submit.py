"""Job specs submitted to a real `ray start --head` on 127.0.0.1: through `speeder job --address` (Ray's
JobSubmissionClient) and through Ray's own CLI, `ray job submit ... -- jobs/smoke.yaml`."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator

import pytest

from testkit.net import free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def head() -> Iterator[str]:
    """A one-node Ray cluster started with Ray's CLI, its job server on a loopback port."""
    port, dashboard, agent, agent_grpc, runtime_env_agent, metrics, client = (free_port() for _ in range(7))
    # A short temp dir: Ray's socket paths under it must stay within AF_UNIX's 107 bytes, which pytest's
    # tmp_path under an xdist worker (/tmp/pytest-of-root/pytest-N/popen-gwK/...) already exceeds.
    temp = pathlib.Path(tempfile.mkdtemp(prefix="rayhead-", dir="/tmp"))
    # Token auth is off on both sides of this loopback test cluster (Ray 2.60 enables it by default).
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2", f"--temp-dir={temp}",
         # Free ports for the agents: the defaults (52365, ...) may be taken by another Ray on this machine,
         # and without its HTTP agent the head cannot accept jobs ("No available agent").
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={runtime_env_agent}", f"--metrics-export-port={metrics}",
         f"--ray-client-server-port={client}", "--disable-usage-stats"],
        env=env, stdout=(temp / "head.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, (temp / "head.log").read_text()[-2000:]
                time.sleep(1)
        yield address
    finally:
        with contextlib.suppress(ProcessLookupError):  # the head may have failed to start
            os.killpg(proc.pid, signal.SIGTERM)
        try:  # a graceful stop takes Ray ~30 s; after 10 s the whole process group goes
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def _submit(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a submission command; the job agent may need a few seconds after the head is up."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    deadline = time.time() + 120
    while True:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in out.stdout + out.stderr or time.time() > deadline:
            return out
        time.sleep(3)


def test_speeder_job_submits_through_job_submission_client(head, tmp_path) -> None:
    out_root = tmp_path / "run"
    cmd = [str(BIN / "speeder"), "job", "jobs/smoke.yaml", "--address", head, "steps=[prepare,featurize]",
           f"output_root={out_root}", "prepare.synthetic.num_users=40", "featurize.vision_encoder=none"]
    result = _submit(cmd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out_root / "job_summary.json").read_text())
    assert summary["ray"] == "cluster"  # inside the job, `speeder job` joined the cluster
    assert sorted(summary["steps"]) == ["featurize", "prepare"]
    assert (out_root / "data" / "features" / "default" / "items.parquet").exists()
    assert "step featurize done" in result.stdout + result.stderr  # the job's log was streamed back
    # A retry of the same submission (same spec, overrides and date) finds the job and does not run it again.
    again = _submit(cmd)
    assert again.returncode == 0 and "already submitted" in again.stdout + again.stderr
    assert "step featurize done" not in again.stdout + again.stderr


def test_ray_cli_runs_the_spec_as_an_executable_entrypoint(head, tmp_path) -> None:
    out_root = tmp_path / "cli"
    result = _submit([str(BIN / "ray"), "job", "submit", "--address", head, "--working-dir", ".",
                      "--runtime-env", "jobs/runtime_env.yaml", "--", "jobs/smoke.yaml", "steps=[prepare]",
                      f"output_root={out_root}", "prepare.synthetic.num_users=40"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in (result.stdout + result.stderr).lower()
    meta = json.loads((out_root / "data" / "meta.json").read_text())
    assert meta["source"] == "synthetic" and meta["counts"]["users"] > 0
