"""Node loss: a node of a 2-node local Ray cluster is lost mid-run; the job goes on, every sample seen once.

Fixed size: the job waits for the node (or another) to come back, then resumes from the last checkpoint.
Elastic (scaling.min_workers=1): the job goes on with the workers left, at a smaller world size.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cluster.local_cluster import add_worker, start_head, stop_all, wait_for_node_state
from trainer import fault_gate
from tests.integration.recipes import DEBUG_CONFIG, STARTUP_S, small_run
from tests.orchestrator.faults import consumed, driver, final_state, registered, shard_sizes, wait_for
from trainer.config import load_config

pytestmark = pytest.mark.integration

NO_EVAL = ["data.eval_pairs=", "scaling.num_workers=2", "scaling.cpus_per_worker=1"]
NODE = "lc-node-b"
GROUP_START = "Attempting to start training worker group"  # Ray Train logs it at each attempt
# A checkpoint every 4 steps; the node goes while both ranks are held before step 6, so the run resumes at 4.
STEPS, EVERY, HOLD = 8, 4, 6


@pytest.fixture
def two_nodes():
    """A head and one worker node of 1 CPU each, so the two training workers land one per node."""
    head = start_head(1, auth=True)
    try:
        add_worker(head, 1, name=NODE)
        yield head
    finally:
        stop_all(head)


def _expected(argv: list[str], source: str) -> int:
    cfg = load_config(DEBUG_CONFIG, argv[2:])
    return cfg.total_steps * cfg.train.global_micro_batches * getattr(cfg.data, source).batch_size


def _check_exactly_once(argv: list[str], run_dir: Path, data: Path) -> dict:
    state = final_state(run_dir)
    assert state["step"] == STEPS
    for source, folder in (("pair", "pairs"), ("image", "images")):
        got = consumed(state, source, shard_sizes(data / folder))
        assert got == _expected(argv, source), f"{source}: {got} distinct samples seen, expected " \
                                               f"{_expected(argv, source)} ({STEPS} steps x global batch)"
    return state


def _lose_node_after_first_checkpoint(head, run, run_dir: Path, gate: Path) -> None:
    """Both ranks are held before step HOLD (trainer/fault_gate.py) while the node goes: the run can be
    neither over nor short of its first checkpoint, however fast the machine."""
    wait_for(lambda: fault_gate.reached(gate), 600, f"both ranks at step {HOLD}", run)
    wait_for(lambda: registered(run_dir, EVERY), 300, f"the step-{EVERY} checkpoint", run)
    node = next(w for w in head.workers if w.name == NODE)
    node.stop()  # its raylet exits (SIGTERM) and takes its training worker with it
    wait_for_node_state(head, NODE, "DEAD", timeout=30)
    fault_gate.release(gate)  # the restarted group passes step HOLD


def test_node_lost_job_waits_for_it_and_completes_exactly_once(two_nodes, synthetic_data, tmp_path):
    head, storage = two_nodes, tmp_path / "runs"
    argv = ["train", DEBUG_CONFIG, *small_run("f2", storage, str(synthetic_data), steps=STEPS, every=EVERY,
                                              extra=NO_EVAL + [f"scaling.address={head.address}"])]
    gate = tmp_path / "gate"
    with driver(argv, tmp_path / "f2.log",
                env={**head.client_env(), "UNIMO_FAULT_GATE": f"{HOLD}:{gate}"}) as run:
        starts = run.output().count(GROUP_START)
        _lose_node_after_first_checkpoint(head, run, storage / "f2", gate)
        # Ray Train's next attempt now waits for its placement group: 2 workers of 1 CPU do not fit on the
        # head alone. The job must still be running once that attempt has begun.
        wait_for(lambda: run.output().count(GROUP_START) > starts, STARTUP_S, "the next worker-group start",
                 run)
        assert run.proc.poll() is None, run.tail()
        add_worker(head, 1, name=NODE)  # the node comes back
        assert run.wait(timeout=STARTUP_S) == 0, run.tail()
        out = run.output()
    assert f"at step {EVERY}" in out, out[-3000:]
    _check_exactly_once(argv, storage / "f2", synthetic_data)


def test_node_lost_elastic_job_goes_on_with_fewer_workers(two_nodes, synthetic_data, tmp_path):
    head, storage = two_nodes, tmp_path / "runs"
    argv = ["train", DEBUG_CONFIG, *small_run("f2e", storage, str(synthetic_data), steps=STEPS, every=EVERY,
                                              extra=NO_EVAL + [f"scaling.address={head.address}",
                                                               "scaling.min_workers=1"])]
    gate = tmp_path / "gate"
    env = {**head.client_env(), "UNIMO_FAULT_GATE": f"{HOLD}:{gate}"}
    with driver(argv, tmp_path / "f2e.log", env=env) as run:
        _lose_node_after_first_checkpoint(head, run, storage / "f2e", gate)
        code = run.wait(timeout=STARTUP_S)
        out = run.output()
    assert code == 0, out[-4000:]
    state = _check_exactly_once(argv, storage / "f2e", synthetic_data)
    assert state["world_size"] == 1  # it really went on without the lost node
    # ... at once: the restart counted the nodes alive (orchestrator/failure_policy.py's
    # FreshViewElasticPolicy), where Ray's own policy, its view up to 20 s old, first tried the old size and
    # waited out Ray Train's 60 s worker-group start timeout
    sizes = re.findall(r"Attempting to start training worker group of size (\d+)", out)
    assert sizes == ["2", "1"], sizes
