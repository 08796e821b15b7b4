"""Every Ray node a cluster file starts loads Speeder's Serve proxy middleware.

Serve's proxy (one per node) reads RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH from its own environment,
inherited from the raylet that `ray start` runs; without it, `serve deploy jobs/serve.yaml` on a cluster
answers Serve's plain-text 503/408 instead of the API's JSON 503/504. The name and value come from
serve/proxy.py, so these checks follow the code.
"""

from __future__ import annotations

import importlib
import pathlib
import re
import shlex

import pytest
import yaml

from speeder_platform.serve.proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"]
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*")


def start_environment(command: str) -> dict[str, str]:
    """The variables a shell command line assigns in the environment of its `ray start`."""
    argv = shlex.split(command)
    env = {}
    for word in argv[:argv.index("ray")]:
        assert ASSIGNMENT.fullmatch(word), f"not an assignment before `ray start`: {word!r} in {command!r}"
        name, _, value = word.partition("=")
        env[name] = value
    assert argv[argv.index("ray") + 1] == "start", command
    return env


def ray_containers(name: str) -> list[tuple[str, dict]]:
    """(group, container) for every container of a KubeRay manifest's head and worker groups."""
    doc = yaml.safe_load((CLUSTER / name).read_text())
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
    pods += [(group["groupName"], group["template"]["spec"]) for group in spec["workerGroupSpecs"]]
    return [(group, container) for group, pod in pods for container in pod["containers"]]


def test_the_callback_names_the_middleware_factory() -> None:
    module, _, attribute = PROXY_CALLBACK.partition(":")
    factory = getattr(importlib.import_module(module), attribute)
    assert factory(), PROXY_CALLBACK  # what Serve's proxy calls: a non-empty list of middlewares


def test_every_ray_start_of_the_launcher_config_sets_the_proxy_callback() -> None:
    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    commands = {kind: [c for c in config[kind] if re.search(r"\bray start\b", c)]
                for kind in ("head_start_ray_commands", "worker_start_ray_commands")}
    assert all(commands.values()), commands  # the head and the workers both start Ray
    for command in commands["head_start_ray_commands"] + commands["worker_start_ray_commands"]:
        assert start_environment(command).get(PROXY_CALLBACK_ENV) == PROXY_CALLBACK, command


@pytest.mark.parametrize("name", KUBERAY)
def test_every_ray_container_of_the_kuberay_manifests_sets_the_proxy_callback(name: str) -> None:
    containers = ray_containers(name)
    assert {group for group, _ in containers} >= {"head", "gpu"}, containers
    for group, container in containers:
        values = [e.get("value") for e in container.get("env", []) if e["name"] == PROXY_CALLBACK_ENV]
        assert values == [PROXY_CALLBACK], f"{name}: {group}/{container['name']} sets {PROXY_CALLBACK_ENV} to {values}"
