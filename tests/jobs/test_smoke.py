"""jobs/smoke.yaml end to end through the CLI, on S3: prepare, featurize, three stages, evaluate, score, report."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from speeder_platform import storage
from speeder_platform.config import load_config
from speeder_platform.jobs import run_steps
from speeder_platform.score import read_scores

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
SMALL = ["prepare.synthetic.num_users=80", "score.date=2026-11-27"]


def _cli(*args: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "speeder_platform.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_smoke_job_runs_end_to_end_on_s3_with_the_cli(ray_local, s3_bucket) -> None:
    """`speeder job` and `speeder report` as a user runs them, every input and output on the loopback S3
    server (the CLI process reaches it through the same AWS variables as AWS), then a rerun that continues."""
    root = f"{s3_bucket}/smoke"
    result = _cli("job", "jobs/smoke.yaml", f"output_root={root}", *SMALL, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"outputs under {root}" in result.stdout
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

    # The report of the finished job (as `make demo` writes it): time per step, curves, baselines, UI command.
    report = _cli("report", "jobs/smoke.yaml", f"output_root={root}", *SMALL, timeout=300)
    assert report.returncode == 0, report.stderr[-4000:]
    text = storage.read_bytes(f"{root}/report/report.md").decode()
    assert f"| **total** | **{summary['seconds']:.1f}** |" in text
    assert "| 1 text | text |" in text and "| SASRec |" in text and "| Popularity |" in text
    assert "80 users scored" in text
    assert text.rstrip().endswith("```") and f"speeder ui jobs/smoke.yaml output_root={root}" in text
    baselines = storage.read_json(f"{root}/eval/baselines.json")["models"]
    assert 0 <= baselines["SASRec"]["full_hr@10"] <= 1
    for png in ("training_curves.png", "accuracy.png", "time.png"):
        assert storage.read_bytes(f"{root}/report/{png}")[:8] == b"\x89PNG\r\n\x1a\n"

    # A rerun continues instead of starting over: prepare and featurize are skipped, training is done.
    cfg = load_config(str(ROOT / "jobs" / "smoke.yaml"), [f"output_root={root}", *SMALL,
                                                          "steps=[prepare,featurize,train]"])
    assert cfg.data.uri.startswith("s3://") and cfg.trainer.storage_path.startswith("s3://")
    again = run_steps(cfg)
    assert again["steps"]["prepare"]["result"] == {"skipped": True}
    assert again["steps"]["train"]["result"]["checkpoint"] == train["checkpoint"]
    assert again["steps"]["train"]["seconds"] < summary["steps"]["train"]["seconds"]
