"""Every job spec loads and validates; specs are executable entrypoints; cluster definitions are complete."""

import os
import pathlib

import pytest
import yaml

from speeder_platform.config import load_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
# serve*.yaml are Ray Serve config files (`serve run`), not job specs.
SPECS = sorted(p for p in (ROOT / "jobs").glob("*.yaml")
               if p.name != "runtime_env.yaml" and not p.name.startswith("serve"))
RUNTIME_ENV_KEYS = {"working_dir", "py_modules", "excludes", "pip", "uv", "conda", "env_vars", "container",
                    "image_uri", "config", "py_executable", "java_jars", "nsight", "worker_process_setup_hook"}


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.name)
def test_spec_loads_and_is_an_executable_entrypoint(spec: pathlib.Path) -> None:
    cfg = load_config(str(spec))
    assert cfg.steps, f"{spec.name} lists no steps"
    first = spec.read_text().splitlines()[0]
    assert first == "#!/usr/bin/env -S speeder job"
    assert os.access(spec, os.X_OK), f"{spec.name} is not executable (chmod +x)"
    # The header comment says how to run it.
    assert "speeder job jobs/" in spec.read_text() or "ray job submit" in spec.read_text()


def test_expected_specs_exist() -> None:
    names = {p.name for p in SPECS}
    assert {"smoke.yaml", "train.yaml", "score.yaml", "demo.yaml"} <= names


def test_production_spec_is_gpu_deepspeed_on_s3() -> None:
    cfg = load_config(str(ROOT / "jobs" / "train.yaml"))
    assert cfg.model.backbone == "meta-llama/Llama-2-7b-hf"
    assert cfg.trainer.use_gpu and cfg.trainer.strategy == "deepspeed" and cfg.trainer.num_workers == 8
    assert cfg.output_root.startswith("s3://") and cfg.trainer.storage_path.startswith("s3://")
    assert "blip2" in cfg.featurize.vision_encoder


def test_runtime_env_holds_only_runtime_env_keys() -> None:
    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    assert set(env) <= RUNTIME_ENV_KEYS, set(env) - RUNTIME_ENV_KEYS
    assert env["working_dir"] == "."
    assert ".venv" in env["excludes"]


def test_aws_cluster_launcher_definition() -> None:
    c = yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text())
    for key in ("cluster_name", "max_workers", "provider", "available_node_types", "head_node_type",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in c, key
    assert c["provider"]["type"] == "aws" and c["provider"]["region"]
    assert c["head_node_type"] in c["available_node_types"]
    for name, node in c["available_node_types"].items():
        assert {"node_config", "resources", "min_workers", "max_workers"} <= set(node), name
        assert node["node_config"]["InstanceType"]
    gpu_nodes = [n for n in c["available_node_types"].values() if n["resources"].get("GPU", 0) > 0]
    assert gpu_nodes, "no GPU node type"
    assert any("ray start --head" in cmd for cmd in c["head_start_ray_commands"])


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_kuberay_manifests(name: str) -> None:
    doc = yaml.safe_load((ROOT / "cluster" / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        assert spec["entrypoint"].startswith("speeder job jobs/")
        assert (ROOT / spec["entrypoint"].split()[2]).exists()
        assert set(yaml.safe_load(spec["runtimeEnvYAML"])) <= RUNTIME_ENV_KEYS
        spec = spec["rayClusterSpec"]
    else:
        assert doc["kind"] == "RayCluster"
    assert spec["rayVersion"] == "2.60.0"
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head
    ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265} <= ports
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] and "nvidia.com/gpu" in container["resources"]["limits"]
