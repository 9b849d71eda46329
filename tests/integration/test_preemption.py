"""Preemption: a SIGTERM to the job - to its driver (a scheduler, a pod's deletion) or to one of its training
workers (a spot reclaim signals the node's processes) - saves a checkpoint at the next step and ends the job
"preempted" (exit status 75, MLflow status KILLED with the tag unimo.state=preempted), so that it is
resubmitted; the resubmission resumes from that checkpoint."""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.integration.recipes import DEBUG_CONFIG, jobs_bound, STARTUP_S, small_run
from tests.integration.services import wildcard_listeners
from tests.orchestrator.faults import driver, registered, wait_for
from trainer.preemption import EXIT_PREEMPTED

pytestmark = pytest.mark.integration


def mlflow_state(tmp_path) -> tuple[str, str]:
    """(status, unimo.state tag) of the test's one MLflow run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("unimo").experiment_id])
    return run.info.status, run.data.tags.get("unimo.state")


def saved_steps(storage) -> list[int]:
    return [json.loads((d / "trainer_state.json").read_text())["step"]
            for d in sorted((storage / "preempt" / "checkpoints").glob("step_*"))]


@jobs_bound(2)  # two jobs in a row (see jobs_bound)
def test_sigterm_to_the_driver_then_to_a_worker_of_the_resubmission(synthetic_data, tmp_path):
    """Two jobs of one run, 2 workers each, max_failures=0 (a worker that died instead of stopping would fail
    the job): the first gets a SIGTERM to its driver, the resubmission resumes there and gets a SIGTERM to one
    of its workers. Each ends preempted with a checkpoint at the step it reached."""
    storage = tmp_path / "runs"
    overrides = ["scaling.num_workers=2", "scaling.cpus_per_worker=1", "scaling.max_failures=0",
                 f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    argv = ["train", DEBUG_CONFIG, *small_run("preempt", storage, str(synthetic_data), steps=400, every=1000,
                                                extra=overrides)]
    with driver(argv, tmp_path / "first.log") as run:
        wait_for(lambda: "step 3/400" in run.output(), STARTUP_S, "step 3", run)
        # the whole job - driver, embedded Ray, its dashboard and agents, the training workers - on loopback
        assert wildcard_listeners(run.proc.pid) == []
        run.proc.send_signal(signal.SIGTERM)
        assert run.wait(timeout=240) == EXIT_PREEMPTED, run.tail()
        text = run.output()
    assert "stop requested: saving a checkpoint" in text
    assert "run preempted (stopped on request)" in text and "To resume, run the same command again" in text
    assert mlflow_state(tmp_path) == ("KILLED", "preempted")
    [first] = saved_steps(storage)
    assert 3 <= first < 400 and not (storage / "preempt" / "STOP").exists()

    with driver(argv, tmp_path / "second.log") as run:
        wait_for(lambda: f"at step {first}" in run.output(), STARTUP_S, f"the resume at step {first}", run)
        wait_for(lambda: f"step {first + 2}/400" in run.output(), STARTUP_S, "two more steps", run)
        workers = wait_for(lambda: len(run.train_workers()) == 2 and run.train_workers(), 60,
                           "2 train workers", run)
        os.kill(workers[-1].pid, signal.SIGTERM)
        assert run.wait(timeout=240) == EXIT_PREEMPTED, run.tail()
        out = run.output()
    assert "SIGTERM on worker pid" in out and "run preempted (stopped on request)" in out, out[-3000:]
    assert mlflow_state(tmp_path) == ("KILLED", "preempted")
    second = saved_steps(storage)[-1]
    assert second > first + 1
    state = json.loads((storage / "preempt" / "checkpoints" / f"step_{second:08d}" / "trainer_state.json")
                       .read_text())
    assert state["world_size"] == 2
    assert registered(storage / "preempt", second)  # committed: what the next resubmission resumes from
