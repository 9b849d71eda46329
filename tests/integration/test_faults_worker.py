"""A hung rank: the watchdog ends the job's stuck collective and Ray Train restarts the group.

(A worker SIGKILLed mid-run, F1, is the second schedule of tests/integration/test_fault_campaign.py: weights
bitwise equal to an uninterrupted run, each step once in MLflow, every sample once, the restart inside the
job and its goodput split.)"""

from __future__ import annotations

import os
import signal

import pytest

from trainer import fault_gate
from tests.integration.recipes import DEBUG_CONFIG, STARTUP_S, small_run
from tests.orchestrator.faults import driver, registered, wait_for

pytestmark = pytest.mark.integration

# Eval off: the faults under test do not involve it, and it costs time on a 2-core machine.
NO_EVAL = ["data.eval_pairs=", "scaling.num_workers=2", "scaling.cpus_per_worker=1"]


def test_a_frozen_rank_hangs_the_collective_and_the_watchdog_restarts_the_job(synthetic_data, tmp_path):
    """Hung rank: a rank stops making progress in a step (SIGSTOP: it sleeps forever, its threads too), so the
    other waits in an all-reduce that would take gloo's 30-minute timeout to fail. Its watchdog ends it within
    train.watchdog_seconds with a message naming the limit; Ray Train restarts the group from the step-4
    checkpoint and the job completes."""
    storage, data = tmp_path / "runs", str(synthetic_data)
    limit = 20
    argv = ["train", DEBUG_CONFIG, *small_run("frozen", storage, data, steps=8, every=4,
                                              extra=NO_EVAL + [f"train.watchdog_seconds={limit}"])]
    # Both ranks hold before step 6 (trainer/fault_gate.py) while one is frozen: the run cannot be over, or
    # not yet at its step-4 checkpoint, however fast the machine; the other rank then enters step 6 alone.
    gate = tmp_path / "gate"
    with driver(argv, tmp_path / "frozen.log", env={"UNIMO_FAULT_GATE": f"6:{gate}"}) as run:
        wait_for(lambda: fault_gate.reached(gate), 600, "both ranks at step 6",
                 run)
        wait_for(lambda: registered(storage / "frozen", 4), 300, "the step-4 checkpoint", run)
        workers = wait_for(lambda: len(run.train_workers()) == 2 and run.train_workers(), 60,
                           "2 train workers", run)
        frozen = workers[-1]
        os.kill(frozen.pid, signal.SIGSTOP)
        fault_gate.release(gate)  # the live rank goes on into step 6 and waits there for the frozen one
        # bounded by the limit plus slack for a loaded machine (the alternative is gloo's 30 minutes)
        wait_for(lambda: "[unimo watchdog]" in run.output(), limit + 60, "the watchdog", run)
        assert run.wait(timeout=STARTUP_S) == 0, run.tail()
        out = run.output()
    assert f"limit train.watchdog_seconds={limit}" in out
    assert "resumed from" in out and "at step 4" in out, out[-3000:]
    assert "step 8/8" in out
