"""MLflow outages: a job starts while the server is down, and later the server dies mid-run and comes back on
the same port; training goes on, no metric lost."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from trainer import fault_gate

from tests.integration.recipes import DEBUG_CONFIG, ONE_WORKER, STARTUP_S, small_run
from tests.integration.services import MlflowServer, free_port

pytestmark = pytest.mark.integration

STEPS = 12


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.2)


def logged_steps(uri: str, key: str = "loss/total") -> list[int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("outage")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, key)) if runs else []


def open_gate_when_reached(gate: Path, action) -> None:
    """Waits until rank 0 is held at ``gate`` (trainer/fault_gate.py), runs ``action``, then lets it go on."""
    try:
        wait_for(lambda: fault_gate.reached(gate, ranks=(0,)), 600, f"rank 0 at the gate {gate.name}")
        action()
    finally:  # opened even when the action failed: the run ends and the test reports the error
        fault_gate.release(gate)


class Outages(threading.Thread):
    """The server's life around one job, each change made while rank 0 is held at a step gate, so that it
    lands at the same step whatever the machine's speed: down when the job starts, up before step 5 (steps
    1-4 and the step-4 checkpoint ran before the run existed: rank 0 creates it late, replays the steps and
    uploads the queued manifest), killed before step 7 once steps 1-6 are in MLflow, back before step 11:
    steps 7-10 and the step-8 checkpoint run with the server down, and the job cannot end before it is
    back."""

    def __init__(self, server: MlflowServer, run_dir: Path, gates: Path):
        super().__init__(daemon=True)
        self.server, self.run_dir, self.gates = server, run_dir, gates
        self.error: BaseException | None = None
        self.seen: dict[str, int] = {}  # newest checkpoint step at each change

    def _newest_checkpoint(self) -> int:
        steps = [int(p.name.split("_")[1]) for p in (self.run_dir / "checkpoints").glob("step_*")]
        return max(steps, default=0)

    def _start(self, name: str) -> None:
        self.server.start()
        self.seen[name] = self._newest_checkpoint()

    def _kill(self) -> None:
        wait_for(lambda: len(logged_steps(self.server.uri)) >= 6, STARTUP_S, "steps 1-6 in MLflow")
        self.server.kill()
        self.seen["down"] = self._newest_checkpoint()

    def run(self) -> None:
        try:
            open_gate_when_reached(self.gates / "up", lambda: self._start("up"))
            open_gate_when_reached(self.gates / "down", self._kill)
            open_gate_when_reached(self.gates / "back", lambda: self._start("back"))
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err
            for gate in ("up", "down", "back"):  # let the run end now, not at the gates' timeout
                fault_gate.release(self.gates / gate)


def test_a_job_started_while_mlflow_is_down_then_through_an_outage_logs_every_step_once(
        synthetic_data, tmp_path, monkeypatch):
    """tracking.buffer_if_unreachable: training starts without the server and rank 0 creates the run once it
    is up; a later crash of the server (a kill, then a restart on the same port and database) loses nothing:
    the worker flushes on exit and the driver replays any spool, so every step is there, once, and the
    checkpoint manifests queued during the outage are uploaded. One worker (ONE_WORKER): what is tested is
    rank 0's logging."""
    import json

    import ray
    from mlflow.tracking import MlflowClient

    from orchestrator.cli import main

    storage = tmp_path / "runs"
    run_dir = storage / "outage"
    server = MlflowServer(tmp_path / "mlflow", free_port())  # not started yet
    gates = tmp_path / "gates"
    monkeypatch.setenv("UNIMO_FAULT_GATE", f"5:{gates / 'up'},7:{gates / 'down'},11:{gates / 'back'}")
    outages = Outages(server, run_dir, gates)
    try:
        outages.start()
        extra = [f"tracking.uri={server.uri}", "tracking.experiment=outage", "tracking.flush_seconds=0.5",
                 "tracking.buffer_if_unreachable=true", "tracking.system_metrics_seconds=2",
                 *ONE_WORKER]
        argv = ["train", DEBUG_CONFIG,
                *small_run("outage", storage, str(synthetic_data), steps=STEPS, every=4, extra=extra)]
        try:
            assert main(argv) == 0
        finally:
            ray.shutdown()
        outages.join(timeout=300)
        assert outages.error is None, outages.error
        # checkpoint 4 written before the server first came up, 8 while it was down
        assert outages.seen == {"up": 4, "down": 4, "back": 8}, outages.seen

        client = MlflowClient(server.uri)
        (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
        assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == run.info.run_id
        assert run.info.status == "FINISHED" and run.data.params["model.flavor"] == "debug"
        assert run.data.tags["unimo.run_name"] == "outage"
        for key in ("loss/total", "loss/itc", "lr", "throughput/pair_tokens_per_s", "perf/achieved_tflops",
                    "memory/rss_gb"):
            assert logged_steps(server.uri, key) == list(range(1, STEPS + 1)), key
        uploaded = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
        assert uploaded == {f"checkpoints/step_{s:08d}" for s in range(4, STEPS + 1, 4)}
        assert not list((run_dir / "mlflow_spool").rglob("seg-*.jsonl"))
        assert not list((run_dir / "mlflow_spool").rglob("upload.json"))
    finally:
        server.kill()
