"""The job's one MLflow run: creation, resume, unreachable server at start, no secrets, spool replay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.tracking_setup import RunGone, ensure_run, finish_run
from tests.integration.recipes import DEBUG_CONFIG
from tests.integration.services import FAKE_AWS, free_port
from trainer.config import load_config
from trainer.metric_logger import MetricLogger
from trainer.redaction import redact, safe_params, secret_values
from trainer.run_identity import RUN_ID_FILE, stage_plan


def cfg_for(tmp_path, *extra):
    return load_config(DEBUG_CONFIG, [f"run.storage={tmp_path / 'runs'}", "run.name=job",
                                      "tracking.experiment=t", *extra])


def sqlite_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_unreachable_server_at_start_is_a_clear_error_naming_the_uri(tmp_path, monkeypatch):
    import socket

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cfg = cfg_for(tmp_path, f"tracking.uri={uri}")
    tries = []  # connection attempts to the server: counted, not timed
    connect = socket.socket.connect

    def counted(sock, address):
        if isinstance(address, tuple) and address[1] == port:
            tries.append(address)
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", counted)
    with pytest.raises(RuntimeError) as err:
        ensure_run(cfg, uri, tmp_path / "runs" / "job")
    assert 1 <= len(tries) <= 2, tries  # one probe, not the MLflow client's minutes of retries
    assert uri in str(err.value) and "buffer_if_unreachable" in str(err.value)
    assert not (tmp_path / "runs" / "job" / RUN_ID_FILE).exists()


def test_unreachable_server_with_buffering_trains_on_without_a_run(tmp_path, caplog):
    uri = f"http://127.0.0.1:{free_port()}"
    cfg = cfg_for(tmp_path, f"tracking.uri={uri}", "tracking.buffer_if_unreachable=true")
    assert ensure_run(cfg, uri, tmp_path / "runs" / "job") is None
    assert uri in caplog.text


@pytest.mark.integration
def test_one_run_across_resubmissions(tmp_path):
    from mlflow.tracking import MlflowClient

    uri, run_dir = sqlite_uri(tmp_path), tmp_path / "runs" / "job"
    cfg = cfg_for(tmp_path)
    first = ensure_run(cfg, uri, run_dir)
    assert json.loads((run_dir / RUN_ID_FILE).read_text())["run_id"] == first
    assert ensure_run(cfg_for(tmp_path, "stages=[{name: s, steps: 9}]"), uri, run_dir) == first
    (run_dir / RUN_ID_FILE).unlink()  # a lost id file: the run is found again by its name and folder
    assert ensure_run(cfg, uri, run_dir) == first
    client = MlflowClient(uri)
    run = client.get_run(first)
    assert run.data.tags["unimo.restarts"] == "2" and run.data.tags["unimo.flavor"] == "debug"
    assert run.data.tags["mlflow.source.git.commit"] and run.data.params["model.flavor"] == "debug"
    files = {f.path for f in client.list_artifacts(first, "config")}
    assert {"config/resolved_config.json", "config/stage_plan.json", "config/restart_1"} <= files
    local = client.download_artifacts(first, "config/restart_1/stage_plan.json", str(tmp_path))
    plan = json.loads(Path(local).read_text())
    assert plan[0]["name"] == "s" and plan[0]["last_step"] == 9
    assert finish_run(uri, None, True, cfg=cfg, run_dir=run_dir) == first
    assert client.get_run(first).info.status == "FINISHED"


@pytest.mark.integration
def test_a_deleted_run_is_named_in_the_error(tmp_path):
    from mlflow.tracking import MlflowClient

    uri, run_dir = sqlite_uri(tmp_path), tmp_path / "runs" / "job"
    run_id = ensure_run(cfg_for(tmp_path), uri, run_dir)
    MlflowClient(uri).delete_run(run_id)
    with pytest.raises(RunGone, match=run_id):
        ensure_run(cfg_for(tmp_path), uri, run_dir)


@pytest.mark.integration
def test_metrics_spooled_by_an_earlier_attempt_are_replayed_at_the_next_start(tmp_path):
    from mlflow.tracking import MlflowClient

    uri, run_dir = sqlite_uri(tmp_path), tmp_path / "runs" / "job"

    class Down:
        def log_batch(self, *a, **k):
            raise ConnectionError("refused")

    spooled = MetricLogger("x", None, flush_seconds=0.01, client=Down(),
                           spool_dir=run_dir / "mlflow_spool" / "metrics")
    for step in range(1, 6):
        spooled.log({"loss/total": step / 10}, step)
    assert not spooled.close(timeout=0.2)
    run_id = ensure_run(cfg_for(tmp_path), uri, run_dir)
    history = MlflowClient(uri).get_metric_history(run_id, "loss/total")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
    assert not list((run_dir / "mlflow_spool" / "metrics").glob("seg-*"))


def test_no_secret_in_params(tmp_path, monkeypatch):
    for k, v in FAKE_AWS.items():
        monkeypatch.setenv(k, v)
    secret = FAKE_AWS["AWS_SECRET_ACCESS_KEY"]
    cfg = cfg_for(tmp_path, "tracking.uri=http://user:hunter2pass@mlflow.example:5000",
                  f"data.pair.urls=s3://bucket/{secret}/pairs")
    params = safe_params(cfg, secret_values(dict(__import__("os").environ)))
    blob = json.dumps(params)
    assert secret not in blob and "hunter2pass" not in blob
    assert params["tracking.uri"] == "http://***@mlflow.example:5000"
    assert params["model.flavor"] == "debug"


def test_redact_and_stage_plan(tmp_path):
    redacted = redact("s3://AKIA:sec@bucket/x and token-123456789", ["token-123456789"])
    assert redacted == "s3://***@bucket/x and ***"
    plan = stage_plan(cfg_for(tmp_path))
    assert [(p["name"], p["first_step"], p["last_step"]) for p in plan] == [("unimodal", 1, 60),
                                                                           ("crossmodal", 61, 300)]


@pytest.mark.integration
def test_rank0_creates_the_run_late_and_the_driver_finds_it(tmp_path):
    """Buffering: no run at start; rank 0 creates it once the server answers; the driver closes it."""
    from mlflow.tracking import MlflowClient

    from trainer.run_identity import run_resolver

    uri, cfg = sqlite_uri(tmp_path), cfg_for(tmp_path, "tracking.buffer_if_unreachable=true")
    run_dir = tmp_path / "runs" / "job"
    client = MlflowClient(uri)
    assert run_resolver(cfg, uri, create=False)(client) is None  # another node's sampler waits for rank 0
    run_id = run_resolver(cfg, uri, create=True)(client)
    assert json.loads((run_dir / RUN_ID_FILE).read_text())["run_id"] == run_id
    assert run_resolver(cfg, uri, create=False)(client) == run_id
    assert client.get_run(run_id).data.params["model.flavor"] == "debug"
    (run_dir / RUN_ID_FILE).unlink()
    assert finish_run(uri, None, True, cfg=cfg, run_dir=run_dir) == run_id  # found by name and folder
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.parametrize("key, secret", [
    ("tokenizer", False), ("pad_token_id", False), ("max_tokens", False), ("auth_token", True),
    ("token", True),
    ("aws_secret_access_key", True), ("password", True), ("db-password", True), ("api_key", True),
    ("credentials", True), ("secret", True), ("secrets_manager_region", False)])
def test_secret_keys_are_recognised_by_their_last_word(key, secret):
    from trainer.redaction import is_secret_key

    assert is_secret_key(key) is secret


def test_every_ordinary_setting_is_a_param(tmp_path):
    from trainer.config_loader import flatten, to_dict

    cfg = cfg_for(tmp_path)
    params, settings = set(safe_params(cfg)), set(flatten(to_dict(cfg)))
    assert settings <= params  # nothing of the shipped config is secret
    assert all(p.startswith("data.weights.") for p in params - settings)  # derived: each corpus's weight


JOB_START = """
import os, sys, time
import mlflow.tracking  # the heavy imports before the barrier, so the three open the store together
from orchestrator.tracking_setup import default_tracking_uri, ensure_run
from trainer.config import load_config
name, storage, barrier, jobs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cfg = load_config({config!r}, [f"run.storage={{storage}}", f"run.name={{name}}", "tracking.experiment=t"])
run_dir = f"{{storage}}/{{name}}"
uri = default_tracking_uri(cfg, run_dir)
open(os.path.join(barrier, name), "w").close()
deadline = time.monotonic() + 300  # reached only if a job died before the barrier
while len(os.listdir(barrier)) < jobs:  # every job opens the new store once all are ready
    if time.monotonic() > deadline:
        sys.exit(f"{{name}}: not every job reached the barrier in {{barrier}}")
    time.sleep(0.001)
print("run", ensure_run(cfg, uri, run_dir))
"""


@pytest.mark.integration
def test_jobs_started_together_share_a_new_sqlite_store(tmp_path):
    """Three jobs into one storage at once create its default <storage>/mlflow.db together: MLflow's table
    creation raced ("table _alembic_tmp_tags already exists", failing 3 of 3 processes before schema_lock), so
    all but the first job refused to start. Each now gets its run."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    storage = tmp_path / "runs"
    code = JOB_START.format(config=DEBUG_CONFIG)
    barrier = tmp_path / "ready"  # each job adds its name once imported; all wait for all three
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", code, f"job{i}", str(storage), str(barrier), "3"],
                              cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    try:
        outs = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:  # none left spinning at the barrier if one failed
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "run " in out, err[-2000:]
    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["job0", "job1", "job2"]
