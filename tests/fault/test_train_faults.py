"""Training under fault: a Ray Train worker killed mid-stage (checkpoints on S3), the `speeder train` driver
killed mid-stage and started again. Both resume from the last checkpoint Ray Train registered, never from
step 0, and end with a complete checkpoint that loads."""

from __future__ import annotations

import pytest

from speeder_platform.bench.faults.train import EPOCHS, STEPS, train_driver_restarted, train_worker_killed

pytestmark = [pytest.mark.fault, pytest.mark.integration]


def test_a_killed_worker_resumes_from_its_checkpoint(ws, ray_local) -> None:
    result = train_worker_killed(ws)
    assert result["passed"] and not result["data_lost"], result["observed"]
    assert result["details"]["killed"]["registered_step"] >= 1  # killed after a checkpoint was registered
    assert f"at step {EPOCHS * STEPS}/{EPOCHS * STEPS}" in result["observed"]
    assert result["details"]["checkpoint"].startswith("s3://")  # uploaded, resumed and finished on the store


def test_a_killed_driver_run_again_continues_the_stage(ws, ray_local) -> None:
    result = train_driver_restarted(ws)
    assert result["passed"] and not result["data_lost"], result["observed"]
    assert "stages.json not yet written" in result["observed"] and "final.json loads" in result["observed"]
