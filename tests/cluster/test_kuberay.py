"""cluster/kuberay-*.yaml: the image rule, token auth, nothing exposed beyond the Kubernetes cluster, S3
through IRSA only, and a RayJob that names its scoring date and submission id."""

import pathlib
import re
import string

import pytest
import yaml

from speeder_platform.config import ConfigError, load_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
MANIFESTS = ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "kuberay-serviceaccount.yaml"]

# Field names of KubeRay v1.7.0's ray.io/v1 types (ray-operator/apis/ray/v1/raycluster_types.go and
# rayjob_types.go): the API server drops or, under kubectl's strict validation, rejects any other.
RAYCLUSTER_SPEC = {"upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
                   "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                   "historyServerOptions", "networkPolicy", "tlsOptions", "headGroupSpec", "rayVersion",
                   "workerGroupSpecs"}
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
               "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
               "entrypointNumGpus", "ttlSecondsAfterFinished", "preRunningDeadlineSeconds",
               "shutdownAfterJobFinishes", "suspend"}
HEAD_GROUP = {"template", "headService", "enableIngress", "ingressOptions", "resources", "labels",
              "rayStartParams", "serviceType"}
WORKER_GROUP = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                "priority", "resources", "labels", "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
AUTH_OPTIONS = {"enableK8sTokenAuth", "secretName", "mode"}


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def cluster_spec(name: str) -> dict:
    doc = load(name)
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_specs(name: str) -> list[tuple[str, dict]]:
    spec = cluster_spec(name)
    return [("head", spec["headGroupSpec"]["template"]["spec"])] + [
        (g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]


def walk(node, path=""):
    """Every (path, key, value) in a parsed manifest."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path, k, v
            yield from walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_fields_are_kuberays(name: str) -> None:
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1"
    if doc["kind"] == "RayJob":
        assert set(doc["spec"]) <= RAYJOB_SPEC, set(doc["spec"]) - RAYJOB_SPEC
    spec = cluster_spec(name)
    assert set(spec) <= RAYCLUSTER_SPEC, set(spec) - RAYCLUSTER_SPEC
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP, set(spec["headGroupSpec"]) - HEAD_GROUP
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP, set(group) - WORKER_GROUP


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_token_authentication_is_on(name: str) -> None:
    auth = cluster_spec(name)["authOptions"]
    assert set(auth) <= AUTH_OPTIONS
    assert auth["mode"] == "token" and not auth.get("enableK8sTokenAuth")  # the latter: RayCluster only


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_every_ray_container_runs_the_one_speeder_image(name: str) -> None:
    images = {c["image"] for _, pod in pod_specs(name) for c in pod["containers"]}
    assert len(images) == 1, images
    image = images.pop()
    repository, _, tag = image.rpartition(":")
    assert repository and tag and tag != "latest", image  # a pinned tag, built from cluster/Dockerfile
    assert "ray-ml" not in image and not repository.startswith("rayproject/")  # torch is not in Ray's images
    assert cluster_spec(name)["rayVersion"] == "2.60.0"


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml"])
def test_nothing_is_exposed_outside_the_kubernetes_cluster(name: str) -> None:
    spec = cluster_spec(name)
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert not spec["headGroupSpec"].get("enableIngress", False)
    for path, key, value in walk(load(name)):
        assert key not in ("hostPort", "hostNetwork", "nodePort"), f"{path}.{key}"
        assert not (key in ("type", "serviceType") and value in ("NodePort", "LoadBalancer")), f"{path}.{key}"


def test_long_lived_cluster_binds_the_dashboard_to_loopback() -> None:
    assert cluster_spec("kuberay-raycluster.yaml")["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"


def test_s3_through_irsa_service_accounts_and_no_static_keys() -> None:
    accounts = {d["metadata"]["name"]: d for d in yaml.safe_load_all((CLUSTER / "kuberay-serviceaccount.yaml")
                                                                     .read_text())}
    for account in accounts.values():
        assert account["kind"] == "ServiceAccount"
        role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
        assert re.fullmatch(r"arn:aws:iam::\$\{AWS_ACCOUNT_ID\}:role/[\w+=,.@-]+", role), role
    assert accounts["speeder-worker"]["automountServiceAccountToken"] is False
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        used = {group: pod["serviceAccountName"] for group, pod in pod_specs(name)}
        assert used["head"] == "speeder", name  # KubeRay binds its autoscaler's RBAC role to the head's account
        assert set(used.values()) <= set(accounts), (name, used)
        for _, pod in pod_specs(name):
            for container in pod["containers"]:
                names = {e["name"] for e in container.get("env", [])}
                assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}, name


def test_no_static_aws_credentials_anywhere_in_cluster() -> None:
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        text = path.read_text().lower()
        for needle in ("aws_secret_access_key", "aws_access_key_id", "aws_session_token"):
            assert needle not in text, f"{path.relative_to(ROOT)} mentions {needle}"
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", path.read_text()), path  # an access key id


def render_rayjob(date: str) -> dict:
    """What the nightly scheduler applies: `SCORE_DATE=... envsubst '$SCORE_DATE' < cluster/kuberay-rayjob.yaml`."""
    text = (CLUSTER / "kuberay-rayjob.yaml").read_text()
    return yaml.safe_load(string.Template(text).safe_substitute(SCORE_DATE=date))


def test_rayjob_names_its_date_in_the_job_the_submission_id_and_the_object() -> None:
    doc = render_rayjob("2026-11-27")
    assert doc["metadata"]["name"] == "speeder-score-2026-11-27"
    assert doc["spec"]["jobId"] == "speeder-score-2026-11-27"  # a retry of that date reuses it
    argv = doc["spec"]["entrypoint"].split()
    assert argv[:3] == ["speeder", "job", "jobs/score.yaml"]
    cfg = load_config(str(ROOT / argv[2]), argv[3:])  # exactly as `speeder job` reads the entrypoint
    assert cfg.score.date == "2026-11-27"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])  # a valid Kubernetes name


def test_unrendered_rayjob_cannot_score_an_unnamed_day() -> None:
    doc = load("kuberay-rayjob.yaml")
    assert not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])  # Kubernetes refuses it
    argv = doc["spec"]["entrypoint"].split()
    with pytest.raises(ConfigError, match="score.date"):
        load_config(str(ROOT / argv[2]), argv[3:])
