"""MLflow outage: the server dies mid-run, comes back on the same port; training goes on, no metric lost."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from trainer import fault_gate

from tests.integration.recipes import DEBUG_CONFIG, STARTUP_S, small_run
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


class Outage(threading.Thread):
    """Kills the server while rank 0 is held before step 5 (steps 1-4 delivered), and brings it back while
    rank 0 is held before step 9: steps 5-8 and the step-8 checkpoint run with the server down, whatever the
    machine's speed, and the job cannot end before the server is back."""

    def __init__(self, server: MlflowServer, run_dir: Path, gates: Path):
        super().__init__(daemon=True)
        self.server, self.run_dir, self.gates = server, run_dir, gates
        self.error: BaseException | None = None
        self.down_at = self.up_at = None  # newest checkpoint step when the server went down / came back

    def _newest_checkpoint(self) -> int:
        steps = [int(p.name.split("_")[1]) for p in (self.run_dir / "checkpoints").glob("step_*")]
        return max(steps, default=0)

    def _kill(self) -> None:
        wait_for(lambda: len(logged_steps(self.server.uri)) >= 4, STARTUP_S, "steps 1-4 in MLflow")
        self.server.kill()
        self.down_at = self._newest_checkpoint()

    def _restart(self) -> None:
        self.server.start()
        self.up_at = self._newest_checkpoint()

    def run(self) -> None:
        try:
            open_gate_when_reached(self.gates / "down", self._kill)
            open_gate_when_reached(self.gates / "up", self._restart)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err
            fault_gate.release(self.gates / "up")  # let the run end now, not at the gate's timeout


def test_metrics_survive_a_tracking_server_outage(synthetic_data, tmp_path, monkeypatch):
    import ray

    from orchestrator.cli import main

    storage = tmp_path / "runs"
    server = MlflowServer(tmp_path / "mlflow", free_port()).start()
    gates = tmp_path / "gates"
    monkeypatch.setenv("UNIMO_FAULT_GATE", f"5:{gates / 'down'},9:{gates / 'up'}")
    outage = Outage(server, storage / "outage", gates)
    try:
        outage.start()
        extra = [f"tracking.uri={server.uri}", "tracking.experiment=outage", "tracking.flush_seconds=0.5",
                 "tracking.system_metrics_seconds=2"]
        argv = ["train", DEBUG_CONFIG,
                *small_run("outage", storage, str(synthetic_data), steps=STEPS, every=4, extra=extra)]
        try:
            assert main(argv) == 0
        finally:
            ray.shutdown()
        outage.join(timeout=300)
        assert outage.error is None, outage.error
        assert (outage.down_at, outage.up_at) == (4, 8), "checkpoint 8 was to be written while it was down"
        # The worker flushes on exit and the driver replays any spool: every step is there, once.
        for key in ("loss/total", "loss/itc", "lr", "throughput/pair_tokens_per_s", "perf/achieved_tflops",
                    "memory/rss_gb"):
            assert logged_steps(server.uri, key) == list(range(1, STEPS + 1)), key
        # Checkpoint manifests queued during the outage were uploaded too; the spool is empty.
        from mlflow.tracking import MlflowClient

        client = MlflowClient(server.uri)
        (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
        uploaded = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
        assert uploaded == {f"checkpoints/step_{s:08d}" for s in range(4, STEPS + 1, 4)}
        assert not list((storage / "outage" / "mlflow_spool").rglob("seg-*.jsonl"))
        assert not list((storage / "outage" / "mlflow_spool").rglob("upload.json"))
    finally:
        server.kill()


def test_job_started_while_mlflow_is_down_logs_everything_once_it_is_up(synthetic_data,
                                                                        tmp_path, monkeypatch):
    """tracking.buffer_if_unreachable: training goes on; rank 0 creates the run once the server is up."""
    import json

    import ray
    from mlflow.tracking import MlflowClient

    from orchestrator.cli import main

    storage, steps = tmp_path / "runs", 12
    server = MlflowServer(tmp_path / "mlflow", free_port())  # not started yet
    run_dir = storage / "late"

    # The server starts while rank 0 is held before step 9 (checkpoints 4 and 8 written without it), so the
    # job cannot end before it is up, however slow the machine.
    gate = tmp_path / "gate"
    monkeypatch.setenv("UNIMO_FAULT_GATE", f"9:{gate}")
    starter = threading.Thread(target=open_gate_when_reached, args=(gate, server.start), daemon=True)
    try:
        starter.start()
        extra = [f"tracking.uri={server.uri}", "tracking.experiment=late",
                 "tracking.buffer_if_unreachable=true", "tracking.flush_seconds=0.5",
                 "tracking.system_metrics_seconds=0"]
        argv = ["train", DEBUG_CONFIG, *small_run("late", storage, str(synthetic_data), steps=steps, every=4,
                                                  extra=extra)]
        try:
            assert main(argv) == 0
        finally:
            ray.shutdown()
        starter.join(timeout=300)
        client = MlflowClient(server.uri)
        (run,) = client.search_runs([client.get_experiment_by_name("late").experiment_id])
        run_id = run.info.run_id
        assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == run_id
        history = client.get_metric_history(run_id, "loss/total")
        assert sorted(m.step for m in history) == list(range(1, steps + 1))
        assert run.info.status == "FINISHED" and run.data.params["model.flavor"] == "debug"
        assert run.data.tags["unimo.run_name"] == "late"
    finally:
        server.kill()
