"""Driver kill: SIGKILLed mid-run; the same command resumes from the newest valid checkpoint, one MLflow run.

Also: while the first driver lives, a second `unimo train` of the same run is refused and changes nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.integration.recipes import DEBUG_CONFIG, STARTUP_S, small_run
from tests.orchestrator.faults import driver, final_state, registered, wait_for

pytestmark = pytest.mark.integration

NO_EVAL = ["data.eval_pairs=", "scaling.num_workers=2", "scaling.cpus_per_worker=1"]
# Long enough that the first driver is still training when it is killed: the step-10 checkpoint, then the
# refused second driver (a few seconds, in which a fast machine trains 10+ debug steps), then the kill.
STEPS = 40


def _second_driver_is_refused(argv: list[str], run_dir: Path, capsys) -> None:
    from orchestrator.cli import main

    lock_before = (run_dir / "run.lock").read_text()
    run_id_before = (run_dir / "mlflow_run.json").read_bytes()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"run {run_dir.name} is locked by a live driver" in err, err
    # Nothing of the run changed: same lock owner, same MLflow run (its restart count is checked at the end).
    assert json.loads((run_dir / "run.lock").read_text())["token"] == json.loads(lock_before)["token"]
    assert (run_dir / "mlflow_run.json").read_bytes() == run_id_before


def test_driver_killed_then_rerun_resumes_with_one_mlflow_run(synthetic_data, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from trainer.checkpoint import newest_valid

    storage, data = tmp_path / "runs", str(synthetic_data)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["train", DEBUG_CONFIG, *small_run("f3", storage, data, steps=STEPS, every=10,
                                              extra=NO_EVAL + [f"tracking.uri={tracking}",
                                                               "tracking.experiment=f3"])]
    run_dir = storage / "f3"

    with driver(argv, tmp_path / "first.log") as first:
        wait_for(lambda: registered(run_dir, 10), STARTUP_S, "the step-10 checkpoint", first)
        _second_driver_is_refused(argv, run_dir, capsys)
        first.kill()
        # The embedded Ray's raylet shares the fate of the driver that started it, so no worker of the dead
        # driver trains on (or writes a checkpoint) beside the next one. (Ray 2.60 leaves its dashboard and
        # runtime-env agents orphaned; they hold no run state and are killed at cleanup.)
        wait_for(lambda: not any(n.startswith(("ray::RayTrainWorker", "ray::TrainController", "raylet"))
                                 for n in first.leftover_names()), 60,
                 "the dead driver's Ray workers to exit")
        # Read only now: a worker may finish writing a checkpoint in the moment after the driver dies.
        resume_step = newest_valid(run_dir / "checkpoints").step
    assert 10 <= resume_step < STEPS, f"the first driver finished before it was killed ({resume_step})"
    lock = json.loads((run_dir / "run.lock").read_text())  # left behind by the SIGKILL

    t_restart_ms = int(time.time() * 1000)
    with driver(argv, tmp_path / "second.log") as second:
        assert second.wait(timeout=STARTUP_S) == 0, second.tail()
        out = second.output()

    assert f"at step {resume_step}" in out, out[-3000:]
    assert "took over the stale lock" in out and f"pid {lock['pid']}" in out
    assert not (run_dir / "run.lock").exists()  # released at the end
    state = final_state(run_dir)
    assert state["step"] == STEPS

    client = MlflowClient(tracking_uri=tracking)
    runs = client.search_runs([client.get_experiment_by_name("f3").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert state["mlflow_run_id"] == run.info.run_id
    assert run.data.tags["unimo.restarts"] == "1" and run.info.status == "FINISHED"
    # Each step once in the history: the second driver re-trains the steps after its checkpoint, but logs only
    # those the run does not have yet (what the killed one logged before it died stays), to the end.
    history = client.get_metric_history(run.info.run_id, "loss/total")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    resumed = sorted(m.step for m in history if m.timestamp >= t_restart_ms)
    assert resumed and resumed[0] > resume_step and resumed[-1] == STEPS, resumed
