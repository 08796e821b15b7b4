"""Batch scoring under fault: a killed scorer actor, an S3 endpoint that goes down while the partition
is written, two runs of the same date at once, a full disk; every user is scored exactly once and no
reader ever sees part of a partition."""

from __future__ import annotations

import pyarrow as pa
import pytest

from speeder_platform import storage
from speeder_platform.bench.faults.score import (
    disk_full_write,
    score_actor_killed,
    score_s3_outage,
    score_same_date_twice,
)

pytestmark = [pytest.mark.fault, pytest.mark.integration]


def test_a_killed_scorer_actor_is_restarted_and_every_user_scored_once(ws, ray_local) -> None:
    result = score_actor_killed(ws, users=3000)
    assert result["passed"] and not result["data_lost"], result["observed"]
    details = result["details"]
    assert details["killed"]["mid_job"]
    assert details["users_scored"] == details["rows"] == details["distinct"] == 3000


def test_an_s3_outage_during_the_write_is_retried_and_never_shows_a_partial_partition(ws, ray_local) -> None:
    result = score_s3_outage(ws, users=300)
    assert result["passed"] and not result["data_lost"], result["observed"]
    details = result["details"]
    assert details["outages"] == ["parquet writes", "commit"]
    assert details["commit_seconds"] >= 2.5  # the commit waited for the endpoint to come back
    assert details["reads"].get("complete", 0) > 0 and "PARTIAL" not in details["reads"]


def test_a_first_commit_still_copying_is_not_visible(s3_bucket) -> None:
    final = f"{s3_bucket}/scores/dt=2026-01-01"
    storage.write_table(pa.table({"a": [1, 2]}), f"{final}/run-abc/part-0.parquet")  # copied, no manifest yet
    with pytest.raises(FileNotFoundError):
        storage.read_table(final)
    storage.write_json(f"{final}/{storage.MANIFEST}", {"files": ["run-abc/part-0.parquet"]})  # the commit point
    assert storage.read_table(final).to_pydict() == {"a": [1, 2]}


def test_two_runs_of_one_date_at_once_leave_one_whole_partition(ws, ray_local) -> None:
    result = score_same_date_twice(ws, users=300)
    assert result["passed"] and not result["data_lost"], result["observed"]
    for where in ("local", "s3"):
        run = result["details"][where]
        assert run["errors"] == {} and run["once"] and len(run["whole_from"]) == 1  # one run's rows, all of them


def test_a_full_disk_fails_the_write_and_keeps_the_old_versions_whole(ws, ray_local) -> None:
    result = disk_full_write(ws, users=200)
    assert result["passed"] and not result["data_lost"], result["observed"]
    assert result["details"]["hits"]["fsync"] >= 1 and result["details"]["hits"]["write"] >= 1
    assert all("No space left on device" in e for e in result["details"]["errors"].values())
