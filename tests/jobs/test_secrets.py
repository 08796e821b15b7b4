"""Secrets never leave the environment: not into a runtime_env, a checkpoint, a report, a log or an output.

These are the unit tests of redaction and of what workers are given. The end-to-end check, a whole job
run with an AWS secret key in the environment and a token in the spec's runtime_env, then every output,
log and runtime_env Ray holds searched for either value, shares the smoke job's run:
tests/jobs/test_smoke.py.
"""

from __future__ import annotations

import pathlib

import pytest

from speeder_platform.config import ConfigError, load_config
from speeder_platform.jobs import load_runtime_env
from speeder_platform.ray_utils import FORWARDED_ENV, worker_env
from speeder_platform.redact import REDACTED, is_secret_name, redact

ROOT = pathlib.Path(__file__).resolve().parents[2]
SPEC = str(ROOT / "jobs" / "smoke.yaml")
ENV_SECRET = "envsecret-7b1c2d9e4f"  # an AWS_SECRET_ACCESS_KEY


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
