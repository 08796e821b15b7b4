"""Create the security group and IAM roles cluster/aws-gpu.yaml names, so that `ray up` creates neither.

    python cluster/aws_bootstrap.py                   # once per account and region; rerun after an edit
    python cluster/aws_bootstrap.py --vpc-id vpc-0abc --config cluster/aws-gpu.yaml

Left to itself the Ray cluster launcher (ray 2.60, autoscaler/_private/aws/config.py) gives the head the
role ray-autoscaler-v1 with AmazonEC2FullAccess and AmazonS3FullAccess, and creates a security group that
allows SSH from 0.0.0.0/0 whatever `provider.security_group.IpPermissions` says. This creates, and on a
rerun converges to:

- the security group `provider.security_group.GroupName` in the VPC (the default VPC unless --vpc-id),
  inbound exactly the config's `IpPermissions` (SSH from your address) plus all traffic from the group
  itself; any other inbound rule is revoked. Outbound stays open (pip, image pulls, S3, the HF hub).
- for each node type's `IamInstanceProfile` name, a role and an instance profile of that name, trusted
  by EC2 (iam/ec2-trust-policy.json), holding exactly these inline policies: the head iam/s3-access.json
  and iam/autoscaler-head.json, the workers iam/s3-access.json. Other inline or attached policies go.

It prints the group's id, for `SecurityGroupIds` in the config. Run it with administrator credentials
from your machine: it needs IAM and EC2 rights the cluster itself never gets. Exercised against moto
(tests/cluster/test_aws_bootstrap.py), not against AWS, from this repository.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path
from typing import Any

import boto3
import yaml

logger = logging.getLogger("aws_bootstrap")

HERE = Path(__file__).resolve().parent
IAM_DIR = HERE / "iam"
HEAD_POLICIES = ("s3-access.json", "autoscaler-head.json")
WORKER_POLICIES = ("s3-access.json",)
# The value cluster/aws-gpu.yaml ships with: a documentation range that reaches nothing (RFC 5737).
PLACEHOLDER_CIDR = ipaddress.ip_network("203.0.113.0/24")

# One inbound permission: (protocol, from port, to port, source), the source a CIDR or a group id.
Rule = tuple[str, int, int, str]


class ConfigError(ValueError):
    """The cluster config asks for something this script will not create."""


def rules(permissions: list[dict[str, Any]]) -> set[Rule]:
    """EC2 IpPermissions (as in the config or as DescribeSecurityGroups returns them) as a set of rules."""
    out: set[Rule] = set()
    for p in permissions:
        proto = str(p["IpProtocol"])
        # "-1" (all traffic) has no ports; EC2 and moto return it with or without -1 ports.
        lo, hi = (-1, -1) if proto == "-1" else (int(p["FromPort"]), int(p["ToPort"]))
        out |= {(proto, lo, hi, r["CidrIp"]) for r in p.get("IpRanges", [])}
        out |= {(proto, lo, hi, r["CidrIpv6"]) for r in p.get("Ipv6Ranges", [])}
        out |= {(proto, lo, hi, g["GroupId"]) for g in p.get("UserIdGroupPairs", [])}
    return out


def permission(rule: Rule) -> dict[str, Any]:
    """One rule back as an EC2 IpPermission."""
    proto, lo, hi, source = rule
    p: dict[str, Any] = {"IpProtocol": proto}
    if proto != "-1":
        p.update(FromPort=lo, ToPort=hi)
    if source.startswith("sg-"):
        p["UserIdGroupPairs"] = [{"GroupId": source}]
    elif ":" in source:
        p["Ipv6Ranges"] = [{"CidrIpv6": source}]
    else:
        p["IpRanges"] = [{"CidrIp": source}]
    return p


def ssh_rules(config: dict[str, Any]) -> set[Rule]:
    """The config's inbound rules, refused unless each is SSH from a real, non-world CIDR."""
    field = "provider.security_group.IpPermissions"
    wanted = rules(config["provider"].get("security_group", {}).get("IpPermissions", []))
    if not wanted:
        raise ConfigError(f"{field}: empty; name the CIDR SSH may come from (`ray up` needs it)")
    for proto, lo, hi, source in sorted(wanted):
        if (proto, lo, hi) != ("tcp", 22, 22):
            raise ConfigError(f"{field}: {proto} {lo}-{hi} from {source}: only SSH (tcp 22) may be opened; "
                              "the dashboard and job server are reached through `ray dashboard`")
        try:
            net = ipaddress.ip_network(source, strict=False)
        except ValueError:
            raise ConfigError(f"{field}: {source!r} is not a CIDR") from None
        if net.prefixlen == 0:
            raise ConfigError(f"{field}: SSH from {source} is SSH from the whole internet")
        if net == PLACEHOLDER_CIDR:
            raise ConfigError(f"{field}: {source} is the placeholder; put your address there, e.g. "
                              "$(curl -s https://checkip.amazonaws.com)/32")
    return wanted


def ensure_security_group(ec2: Any, config: dict[str, Any], wanted: set[Rule], vpc_id: str | None) -> str:
    """Create or update the cluster's group so its inbound rules are exactly `wanted` plus itself; its id."""
    name = config["provider"]["security_group"]["GroupName"]
    if vpc_id is None:
        vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise ConfigError("this region has no default VPC: pass --vpc-id")
        vpc_id = vpcs[0]["VpcId"]
    filters = [{"Name": "group-name", "Values": [name]}, {"Name": "vpc-id", "Values": [vpc_id]}]
    found = ec2.describe_security_groups(Filters=filters)["SecurityGroups"]
    if found:
        group_id, current = found[0]["GroupId"], rules(found[0]["IpPermissions"])
    else:
        group_id = ec2.create_security_group(
            GroupName=name, VpcId=vpc_id, Description=f"Ray cluster {config['cluster_name']}: SSH + intra-cluster",
            TagSpecifications=[{"ResourceType": "security-group",
                                "Tags": [{"Key": "ray-cluster-name", "Value": config["cluster_name"]}]}],
        )["GroupId"]
        current = set()
    # Every member talks to every other on any port: GCS, raylets, object transfers, NCCL.
    target = wanted | {("-1", -1, -1, group_id)}
    if stale := current - target:
        logger.info("security group %s: revoking %s", group_id, sorted(stale))
        ec2.revoke_security_group_ingress(GroupId=group_id, IpPermissions=[permission(r) for r in sorted(stale)])
    if missing := target - current:
        ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[permission(r) for r in sorted(missing)])
    logger.info("security group %s (%s in %s): inbound %s", group_id, name, vpc_id, sorted(target))
    return group_id


def ensure_role(iam: Any, name: str, policy_files: tuple[str, ...]) -> None:
    """Role `name` trusted by EC2 with exactly these inline policies, in an instance profile of that name."""
    trust = (IAM_DIR / "ec2-trust-policy.json").read_text()
    try:
        iam.get_role(RoleName=name)
        iam.update_assume_role_policy(RoleName=name, PolicyDocument=trust)
    except iam.exceptions.NoSuchEntityException:
        iam.create_role(RoleName=name, AssumeRolePolicyDocument=trust,
                        Description="Speeder Ray cluster node (cluster/aws_bootstrap.py)")
    wanted = {Path(f).stem: (IAM_DIR / f).read_text() for f in policy_files}
    for policy in iam.list_role_policies(RoleName=name)["PolicyNames"]:
        if policy not in wanted:
            logger.info("role %s: deleting inline policy %s", name, policy)
            iam.delete_role_policy(RoleName=name, PolicyName=policy)
    for attached in iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"]:
        logger.info("role %s: detaching %s", name, attached["PolicyArn"])
        iam.detach_role_policy(RoleName=name, PolicyArn=attached["PolicyArn"])
    for policy, document in wanted.items():
        iam.put_role_policy(RoleName=name, PolicyName=policy, PolicyDocument=document)

    try:
        profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    except iam.exceptions.NoSuchEntityException:
        profile = iam.create_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    for role in profile["Roles"]:  # a profile holds one role
        if role["RoleName"] != name:
            iam.remove_role_from_instance_profile(InstanceProfileName=name, RoleName=role["RoleName"])
    if name not in {r["RoleName"] for r in profile["Roles"]}:
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
    logger.info("instance profile %s: %s", name, ", ".join(wanted))


def bootstrap(config: dict[str, Any], ec2: Any, iam: Any, vpc_id: str | None = None) -> str:
    """Everything above for one cluster config; the security group's id."""
    wanted = ssh_rules(config)
    profiles = {}
    for key, node_type in config["available_node_types"].items():
        profiles[key] = node_type["node_config"].get("IamInstanceProfile", {}).get("Name")
        if not profiles[key]:
            raise ConfigError(f"available_node_types.{key}.node_config.IamInstanceProfile.Name: missing "
                              "(without it the head gets Ray's EC2 and S3 full-access role)")
    for key, profile in profiles.items():  # only once the whole config has been checked
        ensure_role(iam, profile, HEAD_POLICIES if key == config["head_node_type"] else WORKER_POLICIES)
    return ensure_security_group(ec2, config, wanted, vpc_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(HERE / "aws-gpu.yaml"), help="Ray cluster launcher YAML")
    parser.add_argument("--vpc-id", help="VPC of the security group (default: the region's default VPC)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    config = yaml.safe_load(Path(args.config).read_text())
    region = config["provider"]["region"]
    try:
        group_id = bootstrap(config, boto3.client("ec2", region_name=region), boto3.client("iam"), args.vpc_id)
    except ConfigError as e:
        logger.error("%s: %s", args.config, e)
        return 2
    configured = {tuple(t["node_config"].get("SecurityGroupIds", [])) for t in config["available_node_types"].values()}
    if configured == {(group_id,)}:
        logger.info("SecurityGroupIds in %s already name %s: ray up %s", args.config, group_id, args.config)
    else:
        logger.info("now set SecurityGroupIds in %s to [%s], then: ray up %s", args.config, group_id, args.config)
    sys.stdout.write(group_id + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
