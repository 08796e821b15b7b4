"""Secrets stay out of everything a run writes: checkpoints, job summaries, reports, logs.

Credentials reach Speeder through the environment (AWS keys on a laptop; on a cluster, instance
profiles or IRSA and no keys at all), never through a config. But a spec's `runtime_env.env_vars` is
where users put environment variables, and a config is saved into every checkpoint's meta.json, so
whatever a run writes goes through `redact` first:

- values under a secret-like name (a part of the name, split on `_ - .`, is KEY, SECRET, TOKEN,
  PASSWORD, PASSWD, CREDENTIAL or SESSION, or ends with one: AWS_SECRET_ACCESS_KEY, APIKEY, DB_PASSWORD;
  not TOKENIZERS_PARALLELISM) in an `env_vars` / `env` mapping;
- any string equal to, or containing, the value of a secret-like variable of this process's
  environment (an AWS key pasted into some other field);
- the password of a URL with credentials in it (`https://user:pw@host`);
- the value of a dotlist override that sets a secret-like env var (`runtime_env.env_vars.MY_TOKEN=...`),
  as a command line written into a report carries it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "<redacted>"
SECRET_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "PASSWD", "CREDENTIAL", "SESSION")
ENV_MAPPINGS = ("env_vars", "env")  # mappings whose keys are environment variable names
MIN_SECRET_CHARS = 8  # shorter values ("1", "false") are settings, and replacing them everywhere would garble
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]+:)[^/\s@]+(?P<tail>@)")
# A dotlist override that sets an env var, as a command line carries it: runtime_env.env_vars.MY_TOKEN=value
_ENV_OVERRIDE = re.compile(r"(?P<head>(?:^|\.)(?:env_vars|env)\.(?P<name>[A-Za-z_][\w.-]*)=)(?P<value>\S+)")


def is_secret_name(name: str) -> bool:
    """Whether an environment variable (or key) name looks like it holds a secret."""
    for part in re.split(r"[_.\-]", name.upper()):
        for word in SECRET_WORDS:
            if part in (word, word + "S") or part.endswith(word):
                return True
    return False


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the secret-like variables of an environment (default: this process's), longest first."""
    env = os.environ if environ is None else environ
    found = {v for k, v in env.items() if is_secret_name(k) and len(v) >= MIN_SECRET_CHARS}
    return sorted(found, key=len, reverse=True)


def _redact_string(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    text = _ENV_OVERRIDE.sub(lambda m: m["head"] + (REDACTED if is_secret_name(m["name"]) else m["value"]), text)
    return _URL_PASSWORD.sub(rf"\g<head>{REDACTED}\g<tail>", text)


def redact(obj: Any, environ: Mapping[str, str] | None = None) -> Any:
    """A copy of a JSON-like structure (dicts, lists, scalars) with the secrets in it replaced by REDACTED."""
    secrets = secret_values(environ)

    def walk(value: Any, env_mapping: bool = False) -> Any:
        if isinstance(value, Mapping):
            return {k: (REDACTED if env_mapping and is_secret_name(str(k)) else walk(v, str(k) in ENV_MAPPINGS))
                    for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [walk(v) for v in value]
        if isinstance(value, str):
            return _redact_string(value, secrets)
        return value

    return walk(obj)


def secret_env_vars(env_vars: Mapping[str, Any]) -> list[str]:
    """The secret-like names among a runtime_env's env_vars (sorted)."""
    return sorted(k for k in env_vars if is_secret_name(str(k)))
