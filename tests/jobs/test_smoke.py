"""jobs/smoke.yaml end to end on S3 (prepare, featurize, three stages, evaluate, score, report), and no
secret of the run in anything it leaves behind.

One run serves both checks, because a whole job is the costliest thing the suite does: `speeder job`
runs in this process on the shared local Ray (a CLI process would start a Ray of its own: minutes of
CPU on 2 cores), with an AWS secret key in the environment and a token in the spec's runtime_env;
`speeder report` then runs as a separate CLI process that reaches the loopback S3 server exactly as it
would reach AWS. Every object under the output root, everything the run logged or printed (Ray
forwards its workers' logs), Ray's session logs and the runtime_envs Ray holds for its tasks and
actors (what the dashboard shows) are then searched for either secret.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import sys

import pytest

from speeder_platform import storage
from speeder_platform.cli import main as speeder
from speeder_platform.config import load_config, to_dict
from speeder_platform.lineage import committed_features
from speeder_platform.redact import REDACTED
from speeder_platform.score import read_scores

ROOT = pathlib.Path(__file__).resolve().parents[2]
SPEC = str(ROOT / "jobs" / "smoke.yaml")
pytestmark = pytest.mark.integration
ENV_SECRET = "envsecret-7b1c2d9e4f"  # AWS_SECRET_ACCESS_KEY of the run's environment
SPEC_SECRET = "specsecret-5a8e0c3b6d"  # a token in the spec's runtime_env
SMALL = ["prepare.synthetic.num_users=80", "score.date=2026-11-27",
         f"runtime_env.env_vars.MY_SERVICE_TOKEN={SPEC_SECRET}"]


def _cli(*args: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "speeder_platform.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _files_holding(root: pathlib.Path, markers: list[str]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits += [f"{path}: {m}" for m in markers if m.encode() in data]
    return hits


def _ray_state_text() -> str:
    """Every task's and actor's details as Ray's state API (and the dashboard) shows them, runtime_env included."""
    import ray
    from ray.util.state import list_actors, list_tasks

    address = ray.get_runtime_context().gcs_address
    found = [*list_tasks(address=address, detail=True, limit=10_000, raise_on_missing_output=False),
             *list_actors(address=address, detail=True, limit=10_000, raise_on_missing_output=False)]
    return json.dumps(found, default=str)


def test_smoke_job_runs_end_to_end_on_s3_and_leaves_no_secret(ray_local, s3_bucket, tmp_path, monkeypatch,
                                                              caplog, capfd) -> None:
    import ray

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)  # the loopback server takes any key
    caplog.set_level(logging.INFO)
    root = f"{s3_bucket}/smoke"
    cfg = load_config(SPEC, [f"output_root={root}", *SMALL])
    assert cfg.data.uri.startswith("s3://") and cfg.trainer.storage_path.startswith("s3://")
    assert to_dict(cfg)["runtime_env"]["env_vars"]["MY_SERVICE_TOKEN"] == SPEC_SECRET

    assert speeder(["job", SPEC, f"output_root={root}", *SMALL]) == 0
    printed = capfd.readouterr()
    assert f"outputs under {root}" in printed.out
    summary = storage.read_json(f"{root}/job_summary.json")
    assert summary["ray"] == "local"
    assert sorted(summary["steps"]) == sorted(["prepare", "featurize", "train", "evaluate", "score"])
    assert storage.exists(f"{root}/data/features/default/items.parquet")
    train = summary["steps"]["train"]["result"]
    assert train["checkpoint"].startswith(f"{root}/train/")
    assert [s["stage"] for s in train["stages"]] == [1, 2, 3]  # the synthetic catalog has images: stage 2 runs
    assert train["stages"][1]["modalities"] == ["text", "vision"]
    metrics = storage.read_json(f"{root}/eval/metrics.json")["metrics"]
    assert 0 <= metrics["cand_hr@1"] <= 1 and metrics["cand_valid_ratio"] == 1.0 and metrics["cand_samples"] == 80
    scores = read_scores(f"{root}/scores", "2026-11-27")
    assert scores.num_rows == 80 and len(set(scores.column("user_id").to_pylist())) == 80
    # The checkpoint keeps its config without the token's value, and the features it was trained on.
    meta = storage.read_json(f"{train['checkpoint']}/meta.json")
    assert meta["config"]["runtime_env"]["env_vars"]["MY_SERVICE_TOKEN"] == REDACTED
    fingerprint = committed_features(cfg.data.uri, "default").fingerprint
    assert fingerprint is not None and meta["features"]["fingerprint"] == fingerprint

    # The report of the finished job (as `make demo` writes it), from a CLI process of its own.
    report = _cli("report", SPEC, f"output_root={root}", *SMALL, timeout=300)
    assert report.returncode == 0, report.stderr[-4000:]
    text = storage.read_bytes(f"{root}/report/report.md").decode()
    assert f"| **total** | **{summary['seconds']:.1f}** |" in text
    assert "| 1 text | text |" in text and "| SASRec |" in text and "| Popularity |" in text
    assert "80 users scored" in text
    assert text.rstrip().endswith("```") and f"speeder ui {SPEC} output_root={root}" in text
    baselines = storage.read_json(f"{root}/eval/baselines.json")["models"]
    assert 0 <= baselines["SASRec"]["full_hr@10"] <= 1
    for png in ("training_curves.png", "accuracy.png", "time.png"):
        assert storage.read_bytes(f"{root}/report/{png}")[:8] == b"\x89PNG\r\n\x1a\n"

    # A rerun continues instead of starting over: prepare and featurize are skipped, training is done.
    assert speeder(["job", SPEC, f"output_root={root}", *SMALL, "steps=[prepare,featurize,train]"]) == 0
    again = storage.read_json(f"{root}/job_summary.json")
    assert again["steps"]["prepare"]["result"] == {"skipped": True}
    assert again["steps"]["train"]["result"]["checkpoint"] == train["checkpoint"]
    assert again["steps"]["train"]["seconds"] < summary["steps"]["train"]["seconds"]

    # No secret anywhere: outputs, logs (driver and forwarded worker logs), Ray's session logs and state.
    markers = [ENV_SECRET, SPEC_SECRET]
    assert _files_holding(pathlib.Path(storage.download_dir(root, str(tmp_path / "outputs"))), markers) == []
    rerun = capfd.readouterr()
    logged = "\n".join(r.getMessage() for r in caplog.records) + printed.out + printed.err + rerun.out + rerun.err
    assert [m for m in markers if m in logged + report.stdout + report.stderr] == []
    session_logs = pathlib.Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    assert _files_holding(session_logs, markers) == []
    assert [m for m in markers if m in _ray_state_text()] == []
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == ENV_SECRET  # the run itself still had its credentials
