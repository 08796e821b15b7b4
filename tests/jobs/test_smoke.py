"""jobs/smoke.yaml end to end: prepare, featurize, three stages, evaluate, score; locally and on S3."""

from __future__ import annotations

import json
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


def test_smoke_job_runs_end_to_end_with_the_cli(tmp_path) -> None:
    out = tmp_path / "smoke"
    result = subprocess.run([sys.executable, "-m", "speeder_platform.cli", "job", "jobs/smoke.yaml",
                             f"output_root={out}", *SMALL], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"outputs under {out}" in result.stdout
    summary = json.loads((out / "job_summary.json").read_text())
    assert sorted(summary["steps"]) == sorted(["prepare", "featurize", "train", "evaluate", "score"])
    stages = summary["steps"]["train"]["result"]["stages"]
    assert [s["stage"] for s in stages] == [1, 2, 3]  # the synthetic catalog has images: stage 2 runs
    assert stages[1]["modalities"] == ["text", "vision"]
    metrics = json.loads((out / "eval" / "metrics.json").read_text())["metrics"]
    assert 0 <= metrics["cand_hr@1"] <= 1 and metrics["cand_valid_ratio"] == 1.0
    scores = read_scores(str(out / "scores"), "2026-11-27")
    assert scores.num_rows == 80 and len(set(scores.column("user_id").to_pylist())) == 80

    # The report of the finished job (as `make demo` writes it): time per step, curves, baselines, UI command.
    report = subprocess.run([sys.executable, "-m", "speeder_platform.cli", "report", "jobs/smoke.yaml",
                             f"output_root={out}", *SMALL], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-4000:]
    text = (out / "report" / "report.md").read_text()
    assert f"| **total** | **{summary['seconds']:.1f}** |" in text
    assert "| 1 text | text |" in text and "| SASRec |" in text and "| Popularity |" in text
    assert "80 users scored" in text
    assert text.rstrip().endswith("```") and f"speeder ui jobs/smoke.yaml output_root={out}" in text
    baselines = json.loads((out / "eval" / "baselines.json").read_text())["models"]
    assert 0 <= baselines["SASRec"]["full_hr@10"] <= 1
    for png in ("training_curves.png", "accuracy.png", "time.png"):
        assert (out / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoke_job_with_everything_on_s3(ray_local, s3_bucket) -> None:
    root = f"{s3_bucket}/smoke"
    cfg = load_config(str(ROOT / "jobs" / "smoke.yaml"), [f"output_root={root}", *SMALL, "trainer.stages=[1,3]"])
    assert cfg.data.uri.startswith("s3://") and cfg.trainer.storage_path.startswith("s3://")
    summary = run_steps(cfg)
    assert summary["ray"] == "local"
    assert storage.exists(f"{root}/data/features/default/items.parquet")
    assert summary["steps"]["train"]["result"]["checkpoint"].startswith(f"{root}/train/")
    assert storage.read_json(f"{root}/eval/metrics.json")["metrics"]["cand_samples"] == 80
    assert read_scores(f"{root}/scores", "2026-11-27").num_rows == 80
    # A rerun continues instead of starting over: prepare and featurize are skipped, training is done.
    again = run_steps(cfg)
    assert again["steps"]["prepare"]["result"] == {"skipped": True}
    assert again["steps"]["train"]["seconds"] < summary["steps"]["train"]["seconds"]
