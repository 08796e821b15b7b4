"""Starting or joining Ray, and the environment every Speeder worker gets.

`ensure_ray` joins a cluster when there is one (an explicit address, RAY_ADDRESS as set inside a Ray
job, or `ray.init` already called) and otherwise starts an embedded local Ray bound to 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from speeder_platform.config import SpeederConfig
from speeder_platform.offline import NO_TELEMETRY
from speeder_platform.redact import is_secret_name

log = logging.getLogger(__name__)

# Environment for every Ray worker: no telemetry, quiet logs. (HF_HUB_OFFLINE is forwarded, not forced:
# a GPU cluster may well download Llama-2 from the hub; the Makefile sets it for this offline machine.)
WORKER_ENV = {
    **NO_TELEMETRY,
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",  # our own progress lines; bars flood non-terminal logs
}
# Forwarded to workers when set on the driver (storage endpoint, region, caches). Never credentials: a
# runtime_env is shown on the dashboard and kept with every task. Cluster nodes get theirs from an
# instance profile / IRSA; an embedded local Ray's workers inherit the driver's environment at ray.init.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
                 "SPEEDER_CACHE", "OMP_NUM_THREADS", "DS_ACCELERATOR", "HF_HOME", "HF_HUB_OFFLINE")
# Set by Ray's job supervisor for a job's entrypoint: the job's own runtime_env (JSON).
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def worker_env() -> dict[str, str]:
    """The env_vars of every runtime_env Speeder builds: WORKER_ENV + the FORWARDED_ENV the driver has."""
    env = dict(WORKER_ENV)
    env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ and not is_secret_name(k)})
    return env


def _job_env_vars() -> set[str]:
    """Environment variables the enclosing Ray job's runtime_env already sets (empty outside a job)."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return set()
    try:
        return set((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError):
        return set()


# An embedded local Ray runs one job's steps back to back. Ray kills an idle worker process 1 s after its last
# task once there are more than CPUs, and the next task starts a new one, which imports torch again (~3-5 s of
# CPU): the score step's write and metadata tasks each paid it. Idle task workers are kept for 10 minutes
# (fault-bench scoring file: 434 -> 326 s of CPU, 263 -> 206 s of wall time on 2 cores).
LOCAL_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 600_000}


def ensure_ray(cfg: SpeederConfig | None = None) -> str:
    """Join or start Ray; returns "cluster" or "local"."""
    address = (cfg.ray.address if cfg is not None else None) or os.environ.get("RAY_ADDRESS")
    import ray

    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return "cluster" if os.environ.get("RAY_ADDRESS") else "local"
    # Inside a Ray job, Ray refuses a driver runtime_env that sets a variable the job's runtime_env sets.
    taken = _job_env_vars()
    runtime_env = {"env_vars": {k: v for k, v in worker_env().items() if k not in taken}}
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return "cluster"
    num_cpus = cfg.ray.num_cpus if cfg is not None else None
    log.info("starting an embedded local Ray (num_cpus=%s)", num_cpus or "all")
    # One machine, no node to be preempted: Ray Train's preemption watcher (an actor, a process per fit that
    # polls for node drains) has nothing to watch. Read by Ray Train's controller, which inherits this env.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # The dashboard (on loopback) serves the state API that Ray Train's placement-group cleaner polls;
    # without it the cleaner cannot work and floods the log with "Failed to query ... actor state".
    # address="local": always a new instance, never a cluster some `ray start` left on this machine.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", runtime_env=runtime_env, log_to_driver=True, configure_logging=False,
             _system_config=LOCAL_SYSTEM_CONFIG)
    return "local"


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0
