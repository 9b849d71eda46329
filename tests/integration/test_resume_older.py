"""Resuming from a checkpoint older than the newest one on disk, and the run after that (issue #27).

A torn newest checkpoint (a kill during a save, a full disk) makes the next job resume from the one before and
save the same step again. Before one component owned the checkpoint folders, Ray Train's retention tracked the
torn and the new folder of that step as two entries of one path, evicting the older deleted the newer, and the
job after refused the run folder ("a reference to a checkpoint that does not exist anymore ... delete the
existing folder").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.recipes import DEBUG_CONFIG, jobs_bound, small_run

pytestmark = pytest.mark.integration

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's run snapshot, beside the step folders


def train(argv: list[str]) -> int:
    import ray

    from orchestrator.cli import main

    try:
        return main(["train", DEBUG_CONFIG, *argv])
    finally:
        ray.shutdown()


def folders(checkpoints: Path) -> list[str]:
    return sorted(p.name for p in checkpoints.iterdir() if p.is_dir())


@jobs_bound(3)
def test_torn_newest_then_two_more_jobs(synthetic_data, tmp_path, capfd):
    """The user's report in small: 4 steps (checkpoints 2 and 4), tear a shard of step 4, train to 6 (resumes
    from 2, saves 4 and 6 again), then to 8 with the same config: the last job must resume from 6 and finish,
    the torn folder kept aside for forensics, and Ray's run snapshot naming exactly the folders on disk."""
    storage, data = tmp_path / "runs", str(synthetic_data)
    checkpoints = storage / "older" / "checkpoints"
    # keep_last=2 as in configs/debug.yaml (the recipe's default keeps 10, which hides the eviction)
    extra = [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "checkpoint.keep_last=2"]

    def job(steps: int) -> str:
        capfd.readouterr()
        rc = train(small_run("older", storage, data, steps=steps, every=2, extra=extra))
        out = capfd.readouterr()
        text = out.out + out.err
        assert rc == 0, text[-3000:]
        return text

    job(4)
    assert {"step_00000002", "step_00000004"} <= set(folders(checkpoints))
    shard = checkpoints / "step_00000004" / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with open(shard, "r+b") as f:
        f.truncate(1000)  # a kill during the save or a full disk

    text = job(6)
    assert "skipping torn checkpoint" in text and "step_00000004" in text
    assert f"resumed from {checkpoints / 'step_00000002'} at step 2" in text
    aside = [name for name in folders(checkpoints) if name.startswith("step_00000004.torn-")]
    assert len(aside) == 1, folders(checkpoints)  # kept for forensics, under a name that says why
    assert (f"moved the torn checkpoint {checkpoints / 'step_00000004'} aside to "
            f"{checkpoints / aside[0]}" in text)

    text = job(8)
    assert f"resumed from {checkpoints / 'step_00000006'} at step 6" in text
    steps = [name for name in folders(checkpoints) if name.startswith("step_") and "." not in name]
    assert steps == ["step_00000006", "step_00000008"]  # keep_last=2, pruned by one owner
    assert aside[0] in folders(checkpoints)
    snapshot = json.loads((checkpoints / SNAPSHOT).read_text())
    named = {r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]}
    assert snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] == "step_00000008"
    assert named == set(steps), named  # the driver reconciles it with the disk after the job too
