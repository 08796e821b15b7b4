"""cluster/aws-gpu.yaml: valid for the installed Ray's cluster launcher, locked down, and in step with the IAM
policies in cluster/iam/ and the buckets the job specs use."""

import fnmatch
import ipaddress
import json
import pathlib
import shlex

import jsonschema
import pytest
import ray
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = ROOT / "cluster" / "aws-gpu.yaml"
IAM = ROOT / "cluster" / "iam"


@pytest.fixture
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def statements(policy_file: str) -> dict[str, dict]:
    return {s["Sid"]: s for s in json.loads((IAM / policy_file).read_text())["Statement"]}


def test_validates_against_the_installed_ray_schema(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_path = pathlib.Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(config))  # the schema plus Ray's own checks, as `ray up` runs them
    broken = {**config, "provider": {**config["provider"], "security_group": {"GroupName": "x", "Ingress": []}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_image_is_ray_not_ray_ml_and_matches_the_pinned_ray(config: dict) -> None:
    image = config["docker"]["image"]
    ray_pin = next(line.split("==")[1] for line in (ROOT / "constraints.txt").read_text().splitlines()
                   if line.startswith("ray=="))
    assert image == f"rayproject/ray:{ray_pin}-py311-gpu"


def test_ami_is_the_deep_learning_base_gpu_ami(config: dict) -> None:
    for name, node in config["available_node_types"].items():
        image_id = node["node_config"]["ImageId"]
        assert image_id.startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu"), name
    # The head may resolve that parameter when it launches workers: its policy says which one.
    parameter = image_id.removeprefix("resolve:ssm:")
    allowed = statements("autoscaler-head.json")["ResolveTheAmiParameterAtLaunch"]["Resource"]
    assert fnmatch.fnmatch(f"arn:aws:ssm:us-east-1::parameter{parameter}", allowed)


def test_dashboard_on_loopback_and_token_auth_on_every_node(config: dict) -> None:
    head = [shlex.split(c) for c in config["head_start_ray_commands"] if "ray start" in c]
    workers = [shlex.split(c) for c in config["worker_start_ray_commands"] if "ray start" in c]
    assert head and workers
    for argv in head + workers:
        assert argv[0] == "RAY_AUTH_MODE=token", argv  # in the environment of `ray start` itself
    assert "--dashboard-host=127.0.0.1" in head[0]
    assert not any(a.startswith("--dashboard-host") and a != "--dashboard-host=127.0.0.1" for a in head[0])
    # Every node gets the client's token at Ray's default path inside the container.
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"


def test_security_group_is_explicit_and_opens_only_ssh_from_a_narrow_cidr(config: dict) -> None:
    group = config["provider"]["security_group"]
    assert group["GroupName"]
    sources = []
    for p in group["IpPermissions"]:
        assert (p["IpProtocol"], p["FromPort"], p["ToPort"]) == ("tcp", 22, 22), p
        assert not p.get("UserIdGroupPairs") and not p.get("Ipv6Ranges")
        sources += [ipaddress.ip_network(r["CidrIp"]) for r in p["IpRanges"]]
    assert sources and all(net.prefixlen >= 8 for net in sources), sources  # never 0.0.0.0/0
    # Ray only creates (and opens to 0.0.0.0/0) a group for node types without SecurityGroupIds.
    for name, node in config["available_node_types"].items():
        assert node["node_config"].get("SecurityGroupIds"), name


def test_head_and_workers_have_their_own_instance_profiles(config: dict) -> None:
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]["node_config"]["IamInstanceProfile"]["Name"]
    workers = {n["node_config"]["IamInstanceProfile"]["Name"]
               for k, n in nodes.items() if k != config["head_node_type"]}
    assert head and workers and head not in workers
    assert "ray-autoscaler" not in head  # Ray's default role: EC2 and S3 full access
    # The head may hand the worker role, and only it, to the instances it launches.
    pass_role = statements("autoscaler-head.json")["PassOnlyTheWorkerRole"]
    assert [pass_role["Resource"].rsplit("/", 1)[1]] == sorted(workers)


def test_head_may_launch_and_terminate_only_this_clusters_workers(config: dict) -> None:
    head_policy = statements("autoscaler-head.json")
    launch = head_policy["LaunchOnlyThisClustersWorkerType"]["Condition"]["StringEquals"]
    worker_types = {n["node_config"]["InstanceType"] for k, n in config["available_node_types"].items()
                    if k != config["head_node_type"]}
    assert set(launch["ec2:InstanceType"]) == worker_types
    assert launch["aws:RequestTag/ray-cluster-name"] == config["cluster_name"]
    terminate = head_policy["RetagAndTerminateOnlyThisClustersInstances"]
    assert terminate["Condition"]["StringEquals"]["aws:ResourceTag/ray-cluster-name"] == config["cluster_name"]
    # Nothing in either policy is a service-wide wildcard action, and only listing has Resource "*".
    for policy in ("autoscaler-head.json", "s3-access.json"):
        for sid, s in statements(policy).items():
            assert not any(a.endswith(":*") or a == "*" for a in s["Action"]), (policy, sid)
            assert s["Resource"] != "*" or s["Action"] == ["ec2:DescribeInstances"], (policy, sid)


def test_s3_policy_names_exactly_the_buckets_the_job_specs_use() -> None:
    read, write = set(), set()
    for spec in (ROOT / "jobs").glob("*.yaml"):
        doc = yaml.safe_load(spec.read_text())
        if not isinstance(doc, dict) or "steps" not in doc:
            continue  # runtime_env.yaml and the Serve configs
        if doc.get("output_root", "").startswith("s3://"):
            write.add(doc["output_root"].split("/")[2])
        for value in (doc.get("prepare") or {}).values():
            if isinstance(value, str) and value.startswith("s3://"):
                read.add(value.split("/")[2])
    assert write, "no job spec writes to S3: is this test still reading the right files?"
    s3 = statements("s3-access.json")

    def buckets(sid: str) -> set[str]:
        return {arn.split(":::")[1].removesuffix("/*") for arn in s3[sid]["Resource"]}

    assert buckets("ListTheTwoBuckets") == read | write
    assert buckets("ReadWriteFeaturesCheckpointsAndScores") == write
    assert buckets("ReadRawReviewsAndImages") == read - write


def rsync_excludes(patterns: list[str], path: str) -> bool:
    """rsync --exclude for slash-less patterns: a pattern matches any component of the path."""
    assert all("/" not in p for p in patterns), "this check only models slash-less rsync patterns"
    return any(fnmatch.fnmatch(part, p) for part in path.split("/") for p in patterns)


def test_rsync_keeps_virtualenvs_runs_and_caches_off_the_nodes(config: dict) -> None:
    patterns = config["rsync_exclude"]
    for path in (".venv/lib/python3.11/site-packages/torch/__init__.py", "runs/ml100k/features/part-0.parquet",
                 ".git/objects/pack/x.pack", "test-artifacts/trace.zip", "speeder/__pycache__/model.pyc",
                 ".pytest_cache/v/cache", ".ruff_cache/0.17/x", "speeder.egg-info/PKG-INFO"):
        assert rsync_excludes(patterns, path), path
    for path in ("speeder/model.py", "jobs/train.yaml", "constraints.txt", "cluster/constraints-cuda.txt"):
        assert not rsync_excludes(patterns, path), path
    assert config["rsync_filter"] == [".gitignore"]
    assert config["file_mounts"]["/home/ray/speeder"] == "."
