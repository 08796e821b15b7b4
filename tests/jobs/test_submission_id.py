"""A submission has a deterministic id per spec and date, so a retried submission never runs the job twice.

Against a stand-in for Ray's JobSubmissionClient that refuses a known id as Ray's job server does
(tests/jobs/test_submit.py submits to a real `ray start --head`).
"""

from __future__ import annotations

import pathlib

import pytest
from ray.job_submission import JobStatus

from speeder_platform import jobs

ROOT = pathlib.Path(__file__).resolve().parents[2]
SPEC = str(ROOT / "jobs" / "smoke.yaml")


class FakeJobServer:
    """Ray's job server as a submitter sees it: ids are unique, a known one is refused."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict] = {}
        self.status = JobStatus.RUNNING

    def client(self, address: str) -> FakeJobServer:
        return self

    def submit_job(self, *, entrypoint: str, runtime_env: dict, submission_id: str) -> str:
        if submission_id in self.jobs:  # the job server's message (job_manager.py)
            raise RuntimeError(f"Request failed with status code 400: Job with submission_id {submission_id} "
                               "already exists. Please use a different submission_id..")
        self.jobs[submission_id] = {"entrypoint": entrypoint, "runtime_env": runtime_env}
        return submission_id

    def get_job_status(self, job_id: str) -> JobStatus:
        return self.status

    async def tail_job_logs(self, job_id: str):  # noqa: ANN201 - an async generator, like Ray's
        yield f"logs of {job_id}\n"


@pytest.fixture
def server(monkeypatch) -> FakeJobServer:
    fake = FakeJobServer()
    monkeypatch.setattr("ray.job_submission.JobSubmissionClient", fake.client)
    return fake


def test_the_id_depends_on_spec_overrides_and_date_only(tmp_path) -> None:
    first = jobs.submission_id(SPEC, ["score.k=5"], "2026-11-27")
    assert first == jobs.submission_id(SPEC, ["score.k=5"], "2026-11-27")  # a retry: the same id
    assert first.startswith("speeder-smoke-2026-11-27-")
    assert first != jobs.submission_id(SPEC, ["score.k=5"], "2026-11-28")
    assert first != jobs.submission_id(SPEC, ["score.k=6"], "2026-11-27")
    # The date is the id's own part: naming it explicitly (a retry that pins the date) is the same job.
    assert first == jobs.submission_id(SPEC, ["score.k=5", "score.date=2026-11-27"], "2026-11-27")
    edited = tmp_path / "smoke.yaml"
    edited.write_text(pathlib.Path(SPEC).read_text() + "\n# edited\n")
    assert first != jobs.submission_id(str(edited), ["score.k=5"], "2026-11-27")


def test_a_retried_submission_is_reported_and_followed_not_run_again(server, capsys, caplog) -> None:
    overrides = ["output_root=/tmp/speeder-job", "score.date=2026-11-27"]
    assert jobs.submit(SPEC, overrides, "http://head:8265", wait=False) == 0
    (job_id, job), = server.jobs.items()
    assert job_id == jobs.submission_id(SPEC, overrides, "2026-11-27")
    server.status = JobStatus.SUCCEEDED
    caplog.clear()
    assert jobs.submit(SPEC, overrides, "http://head:8265") == 0  # the retry
    assert list(server.jobs) == [job_id]  # still one job
    assert f"job {job_id}" in caplog.text and "already submitted" in caplog.text
    assert "not submitting it again" in caplog.text
    server.status = JobStatus.FAILED
    assert jobs.submit(SPEC, overrides, "http://head:8265") == 1  # its outcome, and how to rerun it
    assert f"ray job delete {job_id}" in caplog.text
    server.status = JobStatus.RUNNING
    capsys.readouterr()
    jobs.submit(SPEC, overrides, "http://head:8265")  # a running one is followed (here it never ends)
    assert f"logs of {job_id}" in capsys.readouterr().out and list(server.jobs) == [job_id]


def test_the_date_is_passed_explicitly(server, monkeypatch) -> None:
    monkeypatch.setattr(jobs, "job_date", lambda cfg: cfg.score.date or "2026-12-31")
    jobs.submit(SPEC, ["output_root=/tmp/speeder-job"], "http://head:8265", wait=False)
    (job_id, job), = server.jobs.items()
    assert job["entrypoint"].endswith("output_root=/tmp/speeder-job score.date=2026-12-31")
    assert "-2026-12-31-" in job_id
