"""cluster/kuberay/*.yaml: RayCluster/RayJob structure, GPU resources, token from a Secret, entrypoint."""

import re
import secrets
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "cluster" / "kuberay"
ENTRYPOINT = re.compile(r"^unimo train (configs/[A-Za-z0-9_.-]+\.yaml)\b")
RUN_NAME = re.compile(r"\brun\.name=([A-Za-z0-9][A-Za-z0-9_.-]{0,99})(\s|$)")  # trainer/config.py RunSection
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
SENSITIVE_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY|API_KEY|CREDENTIAL")


def load(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]
    assert len(docs) == 1, f"{name}: expected one document"
    return docs[0]


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return load("raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return load("rayjob.yaml")


def pod_templates(cluster_spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", cluster_spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in cluster_spec["workerGroupSpecs"]
    ]
    return [(name, group["template"]["spec"]) for name, group in groups]


def all_containers(doc: dict) -> list[tuple[str, dict]]:
    spec = doc["spec"]
    cluster_spec = spec.get("rayClusterSpec", spec)
    found = [(name, c) for name, pod in pod_templates(cluster_spec) for c in pod["containers"]]
    if "submitterPodTemplate" in spec:
        found += [("submitter", c) for c in spec["submitterPodTemplate"]["spec"]["containers"]]
    return found


def check_cluster_spec(spec: dict) -> None:
    # KubeRay refuses authOptions.mode=token below Ray 2.52, the first release with token auth.
    assert tuple(int(x) for x in spec["rayVersion"].split(".")[:2]) >= (2, 52), spec["rayVersion"]
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    workers = spec["workerGroupSpecs"]
    assert workers, "no worker group"
    for group in workers:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
    for name, pod in pod_templates(spec):
        containers = pod["containers"]
        assert containers and containers[0]["image"], name
        # KubeRay treats the first container as the Ray container and sizes Ray from its resources.
        resources = containers[0]["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[kind]), f"{name}: {kind} lacks cpu/memory"
        assert pod["securityContext"]["runAsNonRoot"] is True, name
    gpu_groups = [
        g
        for g in workers
        if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0
    ]
    assert gpu_groups, "no GPU worker group"
    for group in gpu_groups:
        res = group["template"]["spec"]["containers"][0]["resources"]
        # Kubernetes rejects GPU requests that differ from the limits.
        assert (
            res["requests"].get("nvidia.com/gpu", res["limits"]["nvidia.com/gpu"])
            == res["limits"]["nvidia.com/gpu"]
        )


def test_raycluster_structure(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1" and raycluster["kind"] == "RayCluster"
    # KubeRay derives pod and service names from it: a DNS-1035 label of at most 53 characters.
    assert DNS_1035.fullmatch(raycluster["metadata"]["name"]) and len(raycluster["metadata"]["name"]) <= 53
    check_cluster_spec(raycluster["spec"])


def test_rayjob_structure(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    # Its cluster is named after it plus a suffix, hence 6 characters fewer than a RayCluster's.
    assert DNS_1035.fullmatch(rayjob["metadata"]["name"]) and len(rayjob["metadata"]["name"]) <= 47
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 0
    check_cluster_spec(spec["rayClusterSpec"])


def test_rayjob_entrypoint_names_a_config_and_a_run(rayjob):
    entrypoint = " ".join(rayjob["spec"]["entrypoint"].split())
    match = ENTRYPOINT.match(entrypoint)
    assert match, entrypoint
    config = ROOT / match.group(1)
    # configs/ is written by another part of the project; until that file exists only its shape is checked.
    if not config.exists():
        assert config.parent == ROOT / "configs"
    assert RUN_NAME.search(entrypoint), "the entrypoint must name the run (run.name=...) so retries resume it"
    assert "scaling.address=auto" in entrypoint, "without it the job would start an embedded Ray of its own"


def test_rayjob_asks_for_the_gpus_its_cluster_has(rayjob):
    entrypoint = rayjob["spec"]["entrypoint"]
    workers = int(re.search(r"scaling\.num_workers=(\d+)", entrypoint).group(1))
    gpus = sum(
        g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert workers == gpus


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_token_comes_from_the_secret_everywhere(name):
    doc = load(name)
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    secret = spec["authOptions"]["secretName"]
    for where, container in all_containers(doc):
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token", where
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret, "key": "auth_token"}, where


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_no_secret_value_in_clear(name, no_clear_secrets):
    doc = load(name)
    assert doc["kind"] != "Secret"
    for where, container in all_containers(doc):
        for entry in container.get("env", []):
            if SENSITIVE_ENV.search(entry["name"]):
                assert "value" not in entry and "secretKeyRef" in entry.get("valueFrom", {}), (
                    where,
                    entry["name"],
                )
    no_clear_secrets(KUBERAY / name)


def test_one_image_everywhere(raycluster, rayjob):
    aws = yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text())
    images = {c["image"] for doc in (raycluster, rayjob) for _, c in all_containers(doc)} | {
        aws["docker"]["image"]
    }
    assert len(images) == 1, images


def test_secret_scanner_catches_pasted_credentials(find_secrets):
    # Built at run time so that this file itself holds nothing that looks like a credential.
    token = secrets.token_hex(32)
    assert find_secrets(f"RAY_AUTH_TOKEN={token}")
    assert find_secrets(f"  - name: RAY_AUTH_TOKEN\n    value: {token}")
    assert find_secrets("AKIA" + "Q" * 16)
    assert find_secrets("-----BEGIN " + "RSA PRIVATE KEY-----")
    assert not find_secrets("RAY_AUTH_TOKEN=$(cat ~/.ray/auth_token)")
