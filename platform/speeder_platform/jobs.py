"""`speeder job SPEC.yaml`: run a job spec's steps on an embedded local Ray, or submit it to a cluster.

    speeder job jobs/smoke.yaml                                   # local Ray, everything under runs/smoke
    speeder job jobs/smoke.yaml output_root=s3://bucket/smoke     # same, outputs on object storage
    speeder job jobs/train.yaml --address http://head:8265        # submitted through JobSubmissionClient
    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- jobs/train.yaml

A spec is a config file with a `steps` list (prepare, featurize, train, evaluate, score) and a
shebang first line (`#!/usr/bin/env -S speeder job`) that YAML reads as a comment, so the spec is
itself an executable entrypoint for Ray's own CLI. Inside a Ray job (RAY_ADDRESS set by the job
supervisor) `speeder job` joins that cluster instead of starting a local Ray.

Re-running a spec continues it: prepare and featurize are skipped when their outputs exist with the
same settings, training skips finished stages and resumes the unfinished one from its checkpoint;
evaluate and score always run (they are idempotent).

A submission carries a deterministic `submission_id` (from the spec, its overrides and the date), and the
date goes into the job as `score.date`: a retried submission (a nightly scheduler that lost the answer)
finds its job already on the cluster, reports it and follows it instead of running it twice.
Secret-like env_vars (`redact.is_secret_name`) are refused in a submitted runtime_env, which the
dashboard shows; nodes get credentials from an instance profile or IRSA.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from speeder_platform import storage
from speeder_platform.config import ConfigError, SpeederConfig, load_config, to_dict
from speeder_platform.redact import redact, secret_env_vars

log = logging.getLogger("speeder.job")

PREPARED_MARKER = "_prepared.json"  # the prepare settings a dataset was made with
DEFAULT_EXCLUDES = [".git", ".venv", "runs", "test-artifacts", "**/__pycache__", "*.egg-info"]


def _prepare_step(cfg: SpeederConfig) -> dict[str, Any]:
    from speeder_platform.data.prepare import prepare_dataset

    marker = storage.join(cfg.data.uri, PREPARED_MARKER)
    settings = to_dict(cfg.prepare)
    if storage.exists(marker) and storage.read_json(marker) == settings:
        log.info("prepare: %s already holds this dataset (same settings); skipping", cfg.data.uri)
        return {"skipped": True}
    report = prepare_dataset(cfg.prepare, cfg.data.uri)
    storage.write_json(marker, settings)
    log.info("prepare: %s", report.summary())
    return {"users": report.users, "items": report.items, "interactions": report.interactions}


def _featurize_step(cfg: SpeederConfig) -> dict[str, Any]:
    from speeder_platform.featurize.pipeline import run_featurize

    return run_featurize(cfg).to_dict()


def _train_step(cfg: SpeederConfig) -> dict[str, Any]:
    from speeder_platform.train.driver import run_training

    summary = run_training(cfg)
    log.info("train: final checkpoint %s\n%s", summary.checkpoint, summary.table())
    return {"checkpoint": summary.checkpoint, "stages": summary.stages}


def _evaluate_step(cfg: SpeederConfig) -> dict[str, Any]:
    from speeder_platform.evaluate import run_evaluate

    return run_evaluate(cfg)


def _score_step(cfg: SpeederConfig) -> dict[str, Any]:
    from speeder_platform.score import run_score

    return run_score(cfg).to_dict()


STEP_FUNCTIONS = {"prepare": _prepare_step, "featurize": _featurize_step, "train": _train_step,
                  "evaluate": _evaluate_step, "score": _score_step}


def run_steps(cfg: SpeederConfig) -> dict[str, Any]:
    """Run the spec's steps in order on the current (or a new local) Ray; writes job_summary.json."""
    from speeder_platform.ray_utils import ensure_ray

    if not cfg.steps:
        raise ValueError("steps: the spec lists no steps (prepare, featurize, train, evaluate, score)")
    where = ensure_ray(cfg) if any(s in ("featurize", "train", "score") for s in cfg.steps) else "none"
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"output_root": cfg.output_root, "ray": where, "steps": {}}
    for step in cfg.steps:
        s0 = time.perf_counter()
        log.info("== step %s", step)
        result = STEP_FUNCTIONS[step](cfg)
        summary["steps"][step] = {"seconds": round(time.perf_counter() - s0, 1), "result": result}
        log.info("== step %s done in %.1fs", step, time.perf_counter() - s0)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    storage.write_json(storage.join(cfg.output_root, "job_summary.json"), redact(summary))
    return summary


def format_summary(summary: dict[str, Any], cfg: SpeederConfig) -> str:
    """Where the time went and where the outputs are."""
    lines = [f"job finished in {summary['seconds']:.0f}s (Ray: {summary['ray']}); outputs under "
             f"{summary['output_root']}"]
    for step, info in summary["steps"].items():
        lines.append(f"  {step:<10} {info['seconds']:>7.1f}s")
    steps = summary["steps"]
    outputs = []
    if "prepare" in steps:
        outputs.append(("dataset", cfg.data.uri))
    if "featurize" in steps:
        outputs.append(("features", storage.join(cfg.data.uri, "features", cfg.featurize.name)))
    if "train" in steps:
        outputs.append(("checkpoint", steps["train"]["result"]["checkpoint"]))
    if "evaluate" in steps:
        outputs.append(("metrics", storage.join(cfg.evaluate.out, "metrics.md")))
    if "score" in steps:
        outputs.append(("scores", steps["score"]["result"].get("partition", cfg.score.out)))
    lines += [f"  {name:<10} {uri}" for name, uri in outputs]
    return "\n".join(lines)


def load_runtime_env(spec_path: str, explicit: str | None, cfg: SpeederConfig) -> dict[str, Any]:
    """runtime_env for submission: jobs/runtime_env.yaml (or --runtime-env FILE), then the spec's own
    `runtime_env:` keys on top. working_dir defaults to the current folder."""
    path = Path(explicit) if explicit else Path(spec_path).with_name("runtime_env.yaml")
    env: dict[str, Any] = {"working_dir": ".", "excludes": list(DEFAULT_EXCLUDES)}
    if path.exists():
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a runtime_env file must hold a mapping")
        env.update(loaded)
    elif explicit:
        raise FileNotFoundError(f"runtime env file not found: {explicit}")
    env.update(cfg.runtime_env)
    secrets = secret_env_vars(env.get("env_vars") or {})
    if secrets:
        raise ConfigError(f"runtime_env.env_vars: {', '.join(secrets)} look like secrets; a runtime_env is shown on "
                          "the dashboard and kept with every task: give the nodes an instance profile / IRSA role "
                          "(or a mounted secret) instead")
    return env


def job_date(cfg: SpeederConfig) -> str:
    """The date a job runs for: score.date, else today (UTC) at submission."""
    return cfg.score.date or datetime.datetime.now(datetime.UTC).date().isoformat()


def submission_id(spec_path: str, overrides: list[str], date: str) -> str:
    """The Ray submission id of a spec with these overrides for one date: the same on every retry.

    speeder-<spec name>-<date>-<12 hex of sha256(spec text, overrides)>; a changed spec or override is
    another job. The date is in the name, so a `score.date` override is left out of the digest: a retry
    that names the date it defaulted to the first time is the same job. (Ray's job server refuses a second
    job with an id it has seen.)
    """
    spec = Path(spec_path)
    rest = [o for o in overrides if o.split("=", 1)[0].strip() != "score.date"]
    digest = hashlib.sha256(json.dumps([spec.read_text(), rest]).encode()).hexdigest()[:12]
    name = re.sub(r"[^a-z0-9]+", "-", spec.stem.lower()).strip("-") or "spec"
    return f"speeder-{name}-{date}-{digest}"


def submit(spec_path: str, overrides: list[str], address: str, runtime_env_file: str | None = None,
           wait: bool = True) -> int:
    """Submit `speeder job SPEC overrides` to a cluster's job server and stream its logs; exit code.

    A job with the same submission id already on the cluster is not submitted again: a running one is
    followed, a finished one's outcome is the exit code.
    """
    import asyncio

    from ray.job_submission import JobStatus, JobSubmissionClient

    cfg = load_config(spec_path, overrides)  # fail fast on a bad spec, before anything is uploaded
    runtime_env = load_runtime_env(spec_path, runtime_env_file, cfg)
    date = job_date(cfg)
    job_id = submission_id(spec_path, overrides, date)
    # The date goes in explicitly: a job that starts after midnight (queued, retried) scores the day it is for.
    args = overrides if cfg.score.date else [*overrides, f"score.date={date}"]
    rel = os.path.relpath(spec_path, runtime_env.get("working_dir", "."))
    entrypoint = shlex.join(["speeder", "job", rel, *args])
    client = JobSubmissionClient(address)
    try:
        client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=job_id)
        log.info("submitted %s as %s to %s", entrypoint, job_id, address)
    except RuntimeError as err:
        if "already exists" not in str(err):  # Ray: "Job with submission_id ... already exists"
            raise
        status = client.get_job_status(job_id)
        log.warning("job %s (%s for %s) was already submitted to %s (%s): not submitting it again", job_id,
                    spec_path, date, address, status)
        if status.is_terminal():  # nothing to follow: its outcome is the answer
            if status != JobStatus.SUCCEEDED:
                log.error("to run job %s again: ray job delete %s, then submit again", job_id, job_id)
            return 0 if status == JobStatus.SUCCEEDED else 1
    if not wait:
        sys.stdout.write(job_id + "\n")
        return 0

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(tail())
    status = client.get_job_status(job_id)
    log.info("job %s: %s", job_id, status)
    return 0 if status == JobStatus.SUCCEEDED else 1


def run_job(spec_path: str, overrides: list[str], address: str | None = None,
            runtime_env_file: str | None = None) -> int:
    if address:
        return submit(spec_path, overrides, address, runtime_env_file)
    cfg = load_config(spec_path, overrides)
    summary = run_steps(cfg)
    sys.stdout.write(format_summary(summary, cfg) + "\n")
    return 0
