"""Secrets never leave the environment: not into a runtime_env, a checkpoint, a report, a log or an output.

The end-to-end test runs a tiny job (jobs/smoke.yaml, one stage) with an AWS secret key in the
environment and a token in the spec's runtime_env, then searches every file under the output root,
everything the run logged or printed, Ray's session logs and the runtime_envs Ray holds for its tasks
and actors (what the dashboard shows) for either value.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib

import pytest

from speeder_platform.config import ConfigError, load_config, to_dict
from speeder_platform.jobs import load_runtime_env
from speeder_platform.lineage import committed_features
from speeder_platform.ray_utils import FORWARDED_ENV, worker_env
from speeder_platform.redact import REDACTED, is_secret_name, redact

ROOT = pathlib.Path(__file__).resolve().parents[2]
SPEC = str(ROOT / "jobs" / "smoke.yaml")
ENV_SECRET = "envsecret-7b1c2d9e4f"  # AWS_SECRET_ACCESS_KEY of the run's environment
SPEC_SECRET = "specsecret-5a8e0c3b6d"  # a token in the spec's runtime_env


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN",
                                  "SPEEDER_API_KEY", "GITHUB_TOKEN", "db_password", "OPENAI_APIKEY",
                                  "GOOGLE_APPLICATION_CREDENTIALS", "my-secrets", "HF_TOKEN"])
def test_secret_like_names(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["TOKENIZERS_PARALLELISM", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_PROFILE",
                                  "HF_HUB_OFFLINE", "OMP_NUM_THREADS", "score.k"])
def test_ordinary_names(name: str) -> None:
    assert not is_secret_name(name)


def test_redact_env_vars_values_in_the_environment_and_url_passwords() -> None:
    environ = {"AWS_SECRET_ACCESS_KEY": ENV_SECRET, "TOKENIZERS_PARALLELISM": "false"}
    obj = {"runtime_env": {"env_vars": {"MY_TOKEN": "abc", "LEVEL": "debug"}, "pip": ["x"]},
           "note": f"key={ENV_SECRET}!", "uri": "https://user:hunter2@host/x", "n": 3, "flag": "false"}
    out = redact(obj, environ)
    assert out["runtime_env"] == {"env_vars": {"MY_TOKEN": REDACTED, "LEVEL": "debug"}, "pip": ["x"]}
    assert out["note"] == f"key={REDACTED}!" and out["uri"] == f"https://user:{REDACTED}@host/x"
    assert out["n"] == 3 and out["flag"] == "false"  # short values of secret-like names are not hunted
    assert obj["runtime_env"]["env_vars"]["MY_TOKEN"] == "abc"  # a copy: the config itself is untouched


def test_redact_a_command_line_with_secret_overrides() -> None:
    command = ["speeder", "report", "jobs/smoke.yaml", "runtime_env.env_vars.MY_TOKEN=abc123",
               "runtime_env.env_vars.LEVEL=debug", "score.k=5"]
    assert redact(command, {}) == ["speeder", "report", "jobs/smoke.yaml", f"runtime_env.env_vars.MY_TOKEN={REDACTED}",
                                   "runtime_env.env_vars.LEVEL=debug", "score.k=5"]


def test_workers_never_get_credentials_through_a_runtime_env(monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE0000")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-value")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    env = worker_env()
    assert env["AWS_REGION"] == "eu-west-1"  # storage settings still travel
    assert not [k for k in env if k.startswith("AWS_") and is_secret_name(k)]
    assert not [k for k in FORWARDED_ENV if is_secret_name(k)]


def test_a_submitted_runtime_env_with_secrets_is_refused(tmp_path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("steps: [prepare]\nruntime_env:\n  env_vars:\n    AWS_SECRET_ACCESS_KEY: x\n    LEVEL: debug\n")
    cfg = load_config(str(spec))
    with pytest.raises(ConfigError, match=r"runtime_env.env_vars: AWS_SECRET_ACCESS_KEY look like secrets"):
        load_runtime_env(str(spec), None, cfg)
    # The repository's own runtime_env.yaml passes (TOKENIZERS_PARALLELISM is no token).
    env = load_runtime_env(SPEC, None, load_config(SPEC))
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"


def _ray_state_text() -> str:
    """Every task's and actor's details as Ray's state API (and the dashboard) shows them, runtime_env included."""
    import ray
    from ray.util.state import list_actors, list_tasks

    address = ray.get_runtime_context().gcs_address
    found = [*list_tasks(address=address, detail=True, limit=10_000, raise_on_missing_output=False),
             *list_actors(address=address, detail=True, limit=10_000, raise_on_missing_output=False)]
    return json.dumps(found, default=str)


def _files_holding(root: pathlib.Path, markers: list[str]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits += [f"{path}: {m}" for m in markers if m.encode() in data]
    return hits


@pytest.mark.integration
def test_no_checkpoint_log_or_report_of_a_run_holds_a_secret(ray_local, tmp_path, monkeypatch, caplog, capfd) -> None:
    import ray

    from speeder_platform.jobs import run_steps

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    out = tmp_path / "run"
    cfg = load_config(SPEC, [f"output_root={out}", "prepare.synthetic.num_users=40", "featurize.vision_encoder=none",
                             "featurize.sasrec.epochs=1", "trainer.stages=[1]", "trainer.max_steps_per_epoch=4",
                             "score.date=2026-11-27", f"runtime_env.env_vars.MY_SERVICE_TOKEN={SPEC_SECRET}"])
    assert to_dict(cfg)["runtime_env"]["env_vars"]["MY_SERVICE_TOKEN"] == SPEC_SECRET  # it is in the config
    caplog.set_level(logging.INFO)
    summary = run_steps(cfg)
    assert sorted(summary["steps"]) == ["evaluate", "featurize", "prepare", "score", "train"]

    markers = [ENV_SECRET, SPEC_SECRET]
    meta = json.loads((pathlib.Path(summary["steps"]["train"]["result"]["checkpoint"]) / "meta.json").read_text())
    assert meta["config"]["runtime_env"]["env_vars"]["MY_SERVICE_TOKEN"] == REDACTED  # saved, without the value
    # (and the features it was trained on, by fingerprint: see tests/platform/test_lineage.py)
    fingerprint = committed_features(cfg.data.uri, "default").fingerprint
    assert fingerprint is not None and meta["features"]["fingerprint"] == fingerprint
    assert _files_holding(out, markers) == []
    logged = "\n".join(r.getMessage() for r in caplog.records) + "".join(capfd.readouterr())
    assert [m for m in markers if m in logged] == []
    session_logs = pathlib.Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    assert _files_holding(session_logs, markers) == []
    assert [m for m in markers if m in _ray_state_text()] == []
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == ENV_SECRET  # the run itself still had its credentials
