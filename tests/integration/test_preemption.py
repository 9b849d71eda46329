"""Preemption: SIGTERM to the job saves a checkpoint at the next step and ends it "preempted" (exit status 75,
MLflow status KILLED with the tag unimo.state=preempted), so that it gets resubmitted; a rerun resumes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.recipes import DEBUG_CONFIG, ROOT, STARTUP_S, small_run
from tests.integration.services import wildcard_listeners
from trainer.preemption import EXIT_PREEMPTED

pytestmark = pytest.mark.integration


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float, sink: list[str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise AssertionError("job ended early:\n" + "".join(sink[-50:]))
            continue
        sink.append(line)
        if needle in line:
            return
    raise AssertionError(f"no '{needle}' within {timeout}s:\n" + "".join(sink[-50:]))


def test_sigterm_checkpoints_then_resubmission_resumes(synthetic_data, tmp_path):
    storage = tmp_path / "runs"
    tracking = [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    argv = [sys.executable, "-m", "orchestrator.cli", "train", DEBUG_CONFIG,
            *small_run("preempt", storage, str(synthetic_data), steps=400, every=1000, extra=tracking)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    lines: list[str] = []
    try:
        wait_for_line(proc, "step 3/400", timeout=STARTUP_S, sink=lines)
        # the whole job - driver, embedded Ray, its dashboard and agents, the training workers - on loopback
        assert wildcard_listeners(proc.pid) == []
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines) + out
    assert proc.returncode == EXIT_PREEMPTED, text[-3000:]
    assert "stop requested: saving a checkpoint" in text
    assert "run preempted (stopped on request)" in text and "To resume, run the same command again" in text
    assert mlflow_state(tmp_path) == ("KILLED", "preempted")
    ckpts = sorted((storage / "preempt" / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1, ckpts
    stopped_at = json.loads((ckpts[0] / "trainer_state.json").read_text())["step"]
    assert 3 <= stopped_at < 400
    assert not (storage / "preempt" / "STOP").exists()

    # Resubmitting the same run resumes at that step (here with a plan that ends 2 steps later).
    again = [*argv[:5], *small_run("preempt", storage, str(synthetic_data), steps=stopped_at + 2, every=1000,
                                   extra=tracking)]
    done = subprocess.run(again, cwd=ROOT, capture_output=True, text=True, env=env, timeout=STARTUP_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"at step {stopped_at}" in done.stdout + done.stderr
    final = sorted((storage / "preempt" / "checkpoints").glob("step_*"))[-1]
    assert json.loads((final / "trainer_state.json").read_text())["step"] == stopped_at + 2
    assert mlflow_state(tmp_path) == ("FINISHED", "finished")


def mlflow_state(tmp_path) -> tuple[str, str]:
    """(status, unimo.state tag) of the test's one MLflow run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("unimo").experiment_id])
    return run.info.status, run.data.tags.get("unimo.state")


def test_sigterm_to_a_worker_checkpoints_and_the_run_stops_cleanly(synthetic_data, tmp_path):
    """Preemption as a node sees it: SIGTERM to one worker (not the driver). Every rank saves at the same next
    step and the job ends "preempted" (exit 75), not as a failed worker (max_failures=0 would fail the job).
    Resuming from a stop checkpoint is the test above."""
    from tests.orchestrator.faults import driver, registered, wait_for

    storage = tmp_path / "runs"
    tracking = [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    overrides = ["scaling.num_workers=2", "scaling.cpus_per_worker=1", "scaling.max_failures=0", *tracking]
    argv = ["train", DEBUG_CONFIG, *small_run("wterm", storage, str(synthetic_data), steps=400, every=1000,
                                                extra=overrides)]
    with driver(argv, tmp_path / "wterm.log") as run:
        wait_for(lambda: "step 3/400" in run.output(), STARTUP_S, "step 3", run)
        workers = wait_for(lambda: len(run.train_workers()) == 2 and run.train_workers(), 60,
                           "2 train workers", run)
        os.kill(workers[-1].pid, signal.SIGTERM)
        assert run.wait(timeout=240) == EXIT_PREEMPTED, run.tail()
        out = run.output()
    assert "SIGTERM on worker pid" in out, out[-3000:]
    assert "run preempted (stopped on request)" in out, out[-3000:]
    ckpts = sorted((storage / "wterm" / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1, ckpts
    state = json.loads((ckpts[0] / "trainer_state.json").read_text())
    assert 3 <= state["step"] < 400 and state["world_size"] == 2
    assert registered(storage / "wterm", state["step"])  # committed: what a resubmission resumes from
