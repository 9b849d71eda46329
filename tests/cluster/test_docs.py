"""docs/CLUSTER.md stays in step with cluster/: the files it names exist, its names match the YAML."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "CLUSTER.md").read_text()


def test_every_cluster_file_named_exists():
    named = set(re.findall(r"`(cluster/[\w./-]+)`", DOC))
    assert named, "the doc names no cluster files"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, missing


def test_names_in_commands_match_the_manifests():
    cluster = yaml.safe_load((ROOT / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    assert f"svc/{cluster['metadata']['name']}-head-svc" in DOC
    assert f"rayjob {job['metadata']['name']}" in DOC
    assert f"secret generic {cluster['spec']['authOptions']['secretName']}" in DOC
    aws = yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text())
    assert "/unimo/ray-auth-token" in " ".join(aws["setup_commands"]) and "/unimo/ray-auth-token" in DOC


def test_no_secret_in_clear(no_clear_secrets):
    no_clear_secrets(ROOT / "docs" / "CLUSTER.md")
