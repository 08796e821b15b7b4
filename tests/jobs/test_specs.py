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


def test_every_file_in_jobs_is_a_spec_a_serve_config_or_the_runtime_env() -> None:
    """No file in jobs/ that nothing checks: each one loads as what it is."""
    from ray.serve.schema import ServeDeploySchema

    for path in sorted((ROOT / "jobs").iterdir()):
        if path in SPECS:
            continue  # loaded and validated above
        data = yaml.safe_load(path.read_text())
        if path.name == "runtime_env.yaml":
            assert set(data) <= RUNTIME_ENV_KEYS
        else:
            assert path.name.startswith("serve"), f"jobs/{path.name}: neither a spec nor a Serve config"
            ServeDeploySchema.model_validate(data)  # raises on a malformed Serve config


def test_the_readme_lists_every_spec() -> None:
    readme = (ROOT / "README.md").read_text()
    assert [p.name for p in SPECS if f"jobs/{p.name}" not in readme] == []


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.name)
def test_spec_resources_are_consistent(spec: pathlib.Path) -> None:
    """What a spec asks for can run as asked: GPU training resolves to DeepSpeed with a ZeRO stage that
    saves whole checkpoints; outputs on S3 keep their checkpoints on S3 too (workers on other nodes
    must reach them); stage sample counts, when given, cover every stage."""
    from speeder_platform.train.worker import resolve_strategy

    cfg = load_config(str(spec))
    t = cfg.trainer
    strategy = resolve_strategy(t.strategy, t.use_gpu)
    if t.use_gpu:
        assert strategy == "deepspeed" and t.zero_stage in (1, 2)
    else:
        assert strategy == "ddp", f"{spec.name}: DeepSpeed without GPUs"
    if cfg.output_root.startswith("s3://"):
        assert t.storage_path.startswith("s3://"), f"{spec.name}: checkpoints off the shared store"
    if t.stage_samples:
        assert len(t.stage_samples) == len(t.stages)


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
