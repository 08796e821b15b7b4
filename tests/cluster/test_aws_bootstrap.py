"""cluster/aws_bootstrap.py against moto's in-process AWS: the security group and roles it creates, and what
Ray's own AWS config step (`ray up`) then does with cluster/aws-gpu.yaml: nothing wider than ours."""

import importlib.util
import json
import pathlib

import boto3
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = ROOT / "cluster" / "aws-gpu.yaml"
MY_CIDR = "198.51.100.7/32"  # stands for the operator's address (a documentation range)

spec = importlib.util.spec_from_file_location("aws_bootstrap", ROOT / "cluster" / "aws_bootstrap.py")
aws_bootstrap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(aws_bootstrap)


def config_with_ssh_from(cidr: str) -> dict:
    config = yaml.safe_load(CONFIG.read_text())
    config["provider"]["security_group"]["IpPermissions"][0]["IpRanges"] = [{"CidrIp": cidr}]
    return config


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path):
    """moto's in-process AWS, with fake credentials and no endpoint override (the loopback S3 fixture's)."""
    from moto import mock_aws

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("HOME", str(tmp_path))  # Ray's launcher writes its SSH key under ~/.ssh
    with mock_aws():
        yield boto3.client("ec2", region_name="us-east-1"), boto3.client("iam")


def inbound(ec2, group_id: str) -> set:
    group = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
    return aws_bootstrap.rules(group["IpPermissions"])


def test_group_allows_ssh_from_the_configured_cidr_and_members_only(aws) -> None:
    ec2, iam = aws
    group_id = aws_bootstrap.bootstrap(config_with_ssh_from(MY_CIDR), ec2, iam)
    assert inbound(ec2, group_id) == {("tcp", 22, 22, MY_CIDR), ("-1", -1, -1, group_id)}
    # Rerunning with a new address replaces the old one instead of adding to it.
    assert aws_bootstrap.bootstrap(config_with_ssh_from("192.0.2.0/28"), ec2, iam) == group_id
    assert inbound(ec2, group_id) == {("tcp", 22, 22, "192.0.2.0/28"), ("-1", -1, -1, group_id)}


def test_group_that_ray_opened_to_the_world_is_closed(aws) -> None:
    ec2, iam = aws
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    group_id = ec2.create_security_group(GroupName="speeder-gpu", Description="as ray up makes it",
                                         VpcId=vpc)["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    assert aws_bootstrap.bootstrap(config_with_ssh_from(MY_CIDR), ec2, iam) == group_id
    assert inbound(ec2, group_id) == {("tcp", 22, 22, MY_CIDR), ("-1", -1, -1, group_id)}


def test_roles_hold_exactly_the_policies_in_cluster_iam(aws) -> None:
    ec2, iam = aws
    iam.create_role(RoleName="speeder-gpu-worker", AssumeRolePolicyDocument=(
        ROOT / "cluster" / "iam" / "ec2-trust-policy.json").read_text())
    too_wide = iam.create_policy(PolicyName="s3-full", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    iam.attach_role_policy(RoleName="speeder-gpu-worker", PolicyArn=too_wide["Policy"]["Arn"])
    aws_bootstrap.bootstrap(config_with_ssh_from(MY_CIDR), ec2, iam)

    def policies(role: str) -> dict:
        names = iam.list_role_policies(RoleName=role)["PolicyNames"]
        return {n: iam.get_role_policy(RoleName=role, PolicyName=n)["PolicyDocument"] for n in names}

    iam_dir = ROOT / "cluster" / "iam"
    s3, head = (json.loads((iam_dir / f).read_text()) for f in ("s3-access.json", "autoscaler-head.json"))
    assert policies("speeder-gpu-head") == {"s3-access": s3, "autoscaler-head": head}
    assert policies("speeder-gpu-worker") == {"s3-access": s3}
    for role in ("speeder-gpu-head", "speeder-gpu-worker"):
        assert iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"] == []  # the wide policy detached
        profile = iam.get_instance_profile(InstanceProfileName=role)["InstanceProfile"]
        assert [r["RoleName"] for r in profile["Roles"]] == [role]


@pytest.mark.parametrize("cidr, message", [
    ("0.0.0.0/0", "whole internet"),
    ("::/0", "whole internet"),
    ("203.0.113.0/24", "placeholder"),  # what cluster/aws-gpu.yaml ships with
    ("not-a-cidr", "not a CIDR"),
])
def test_refuses_world_placeholder_and_malformed_cidrs(cidr: str, message: str) -> None:
    with pytest.raises(aws_bootstrap.ConfigError, match=message):
        aws_bootstrap.ssh_rules(config_with_ssh_from(cidr))


def test_refuses_opening_anything_but_ssh() -> None:
    config = config_with_ssh_from(MY_CIDR)
    config["provider"]["security_group"]["IpPermissions"].append(
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": MY_CIDR}]})
    with pytest.raises(aws_bootstrap.ConfigError, match="only SSH"):
        aws_bootstrap.ssh_rules(config)


def test_refused_config_creates_nothing(aws) -> None:
    ec2, iam = aws
    with pytest.raises(aws_bootstrap.ConfigError):
        aws_bootstrap.bootstrap(config_with_ssh_from("0.0.0.0/0"), ec2, iam)
    assert [g["GroupName"] for g in ec2.describe_security_groups()["SecurityGroups"]] == ["default"]
    assert iam.list_roles()["Roles"] == []


def test_cli_refuses_the_shipped_placeholder(aws, capsys: pytest.CaptureFixture) -> None:
    assert aws_bootstrap.main(["--config", str(CONFIG)]) == 2
    assert capsys.readouterr().out == ""  # no group id for a script to pick up


def test_cli_prints_the_group_id_for_the_config(aws, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    ec2, _ = aws
    config = tmp_path / "aws-gpu.yaml"
    config.write_text(yaml.safe_dump(config_with_ssh_from(MY_CIDR)))
    assert aws_bootstrap.main(["--config", str(config)]) == 0
    group_id = capsys.readouterr().out.strip()
    assert inbound(ec2, group_id) == {("tcp", 22, 22, MY_CIDR), ("-1", -1, -1, group_id)}


def test_ray_up_then_creates_no_role_and_no_group_of_its_own(aws) -> None:
    """Ray's AWS config step, as `ray up` runs it, on cluster/aws-gpu.yaml with the bootstrapped group."""
    from ray.autoscaler._private.aws import utils
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.util import prepare_config

    ec2, iam = aws
    group_id = aws_bootstrap.bootstrap(config_with_ssh_from(MY_CIDR), ec2, iam)
    config = config_with_ssh_from(MY_CIDR)
    for node in config["available_node_types"].values():
        node["node_config"]["SecurityGroupIds"] = [group_id]

    utils.resource_cache.cache_clear()  # Ray caches boto3 clients across calls: make them moto's
    utils.client_cache.cache_clear()
    try:
        resolved = bootstrap_aws(prepare_config(config))
    finally:
        utils.resource_cache.cache_clear()
        utils.client_cache.cache_clear()

    roles = {r["RoleName"] for r in iam.list_roles()["Roles"]}
    assert roles == {"speeder-gpu-head", "speeder-gpu-worker"}  # no ray-autoscaler-v1 (EC2 + S3 full access)
    groups = {g["GroupName"] for g in ec2.describe_security_groups()["SecurityGroups"]}
    assert groups == {"default", "speeder-gpu"}
    assert inbound(ec2, group_id) == {("tcp", 22, 22, MY_CIDR), ("-1", -1, -1, group_id)}
    for node in resolved["available_node_types"].values():
        assert node["node_config"]["SecurityGroupIds"] == [group_id]
    assert "IamInstanceProfile" not in resolved["head_node"]  # Ray filled in no default profile


def test_ray_up_without_our_group_would_open_ssh_to_the_world() -> None:
    """Why every node type names the group: the rules Ray gives a group it creates (ray 2.60)."""
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    ours = [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": MY_CIDR}]}]
    opened = aws_bootstrap.rules(_create_default_inbound_rules({"sg-1"}, ours))
    assert ("tcp", 22, 22, "0.0.0.0/0") in opened
