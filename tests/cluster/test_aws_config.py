"""cluster/aws-gpu.yaml against Ray's own autoscaler schema and the launch path `ray up` takes offline."""

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"

jsonschema = pytest.importorskip("jsonschema")
autoscaler = pytest.importorskip("ray.autoscaler")

CONFIG = CLUSTER / "aws-gpu.yaml"
GPU_INSTANCE_PREFIXES = ("g4dn.", "g5.", "g6.", "g6e.", "p3.", "p4d.", "p4de.", "p5.", "p5e.")


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_validates_against_ray_schema(config):
    schema = json.loads((Path(autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)


def test_survives_ray_up_config_preparation(config):
    # What `ray up` does before it touches AWS: merge the provider defaults, then validate the result.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(config)
    validate_config(prepared)
    # Our commands, not Ray's defaults (those pip-install a Ray wheel over the image's).
    assert prepared["setup_commands"] == config["setup_commands"]
    assert not any(
        "pip install" in c for c in prepared["head_setup_commands"] + prepared["worker_setup_commands"]
    )


def test_head_and_gpu_worker_types(config):
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    gpu = {
        k: v for k, v in workers.items() if v["node_config"]["InstanceType"].startswith(GPU_INSTANCE_PREFIXES)
    }
    assert gpu, "no GPU worker node type"
    for name, node_type in workers.items():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"], name
        assert node_type["node_config"]["ImageId"].startswith("ami-"), name
    assert config["idle_timeout_minutes"] > 0


def test_docker_image_and_token_auth(config):
    docker = config["docker"]
    assert "unimo-train" in docker["image"]
    assert "-e RAY_AUTH_MODE=token" in docker["run_options"]
    # The token reaches ~/.ray/auth_token (Ray's default path) from SSM, never from this file.
    assert any("~/.ray/auth_token" in c and "ssm" in c for c in config["setup_commands"])


def test_no_file_mounts_and_ray_started_in_workdir(config):
    assert config["file_mounts"] == {}
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert (
        "ray start --head" in head_start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    )
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker_start
    # Job entrypoints name configs/<name>.yaml relative to where Ray was started: the image's WORKDIR.
    assert "cd /opt/unimo" in head_start and "cd /opt/unimo" in worker_start


def test_no_secret_in_clear(no_clear_secrets):
    no_clear_secrets(CONFIG)
