"""`unimo mlflow` starts a tracking server on loopback that answers /health and accepts a run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.integration.services import free_port, wait_http, wildcard_listeners

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_unimo_mlflow_serves_health_and_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    port = free_port()
    cmd = [sys.executable, "-m", "orchestrator.cli", "mlflow", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
           "--artifacts-destination", str(tmp_path / "artifacts")]
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    env.pop("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", None)  # the CLI's own default is under test
    with open(tmp_path / "server.log", "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_http(f"{uri}/health", timeout=120)
        client = MlflowClient(uri)
        run = client.create_run(client.create_experiment("cli"))
        client.log_metric(run.info.run_id, "loss/total", 1.5, step=1)
        assert client.get_run(run.info.run_id).data.metrics == {"loss/total": 1.5}
        assert f"MLflow UI: http://127.0.0.1:{port}" in (tmp_path / "server.log").read_text()
        # MLflow 3 would have launched its job runner by now (right after spawning the web server); tracking
        # needs none, so the CLI turns it off.
        children = [" ".join(c.cmdline()) for c in psutil.Process(proc.pid).children()]
        runners = [c for c in children if "mlflow.server.jobs" in c or "huey" in c]
        assert not runners, runners
        assert wildcard_listeners(proc.pid) == []  # the server and its workers: loopback only
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the CLI execs the server: its whole session goes
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
