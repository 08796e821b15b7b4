"""`speeder bench speed`: both systems measured in fresh processes, ratios computed from one run."""

from __future__ import annotations

import json

import pytest

from speeder_platform import cli
from speeder_platform.bench.speed import format_report


@pytest.mark.integration
def test_bench_speed_measures_both_systems_and_writes_the_ratios(tmp_path, capsys) -> None:
    out = tmp_path / "speed.json"
    code = cli.main(["bench", "speed", "--backbone", "tiny-llama", "--dataset", str(tmp_path / "ml100k"),
                     "--train-steps", "1", "--infer-batches", "1", "--infer-batch", "2", "--threads", "1",
                     "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "train samples/s" in printed and "infer users/s (20 candidates)" in printed
    s, b = report["speeder"], report["baseline"]
    # One token per history item + the template vs titles + behaviour tokens for history and candidates.
    assert s["tokens_per_sample"] < 60 < 3 * s["tokens_per_sample"] < b["tokens_per_sample"]
    assert report["tokens_per_sample"]["ratio"] == pytest.approx(b["tokens_per_sample"] / s["tokens_per_sample"])
    assert report["train_speedup"] == pytest.approx(s["train_samples_per_s"] / b["train_samples_per_s"])
    # With the dense loss every history slot is a supervised target too: ~history length + 1 per sample.
    assert b["targets_per_sample"] == 1.0 and s["targets_per_sample"] > 5
    assert report["train_targets_speedup"] == pytest.approx(s["train_targets_per_s"] / b["train_targets_per_s"])
    assert "supervised next-item targets/s" in printed
    assert report["infer_speedup"] == pytest.approx(
        s["infer_candidates_users_per_s"] / b["infer_candidates_users_per_s"])
    for system in (s, b):
        assert system["train_samples_per_s"] > 0 and system["infer_catalog_users_per_s"] > 0
        assert system["peak_rss_mb"] > 100  # each system's own process: torch + the backbone
    assert report["settings"]["negative_cache_steps"] == 0  # the trainer's default, recorded
    assert set(s["profile_forward_s"]) == {"mrc_item_tokens", "llm_forward"}
    assert "Speeder forward, per training batch" in format_report(report)
