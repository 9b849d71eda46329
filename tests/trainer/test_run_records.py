"""Ray Train's run snapshot reconciled with the checkpoint folders (trainer/checkpointing/records.py).

The snapshots are written in Ray's own schema and read back by Ray's own CheckpointManager, which is what
refuses a run folder whose snapshot names a folder that is gone."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from trainer import checkpoint as ckpt
from trainer.checkpointing.records import SNAPSHOT, reconcile_ray_snapshot, reconcile_run


def write_ray_snapshot(checkpoints: Path, names: list[str]) -> None:
    """A snapshot as Ray Train 2.60 writes it after reporting ``names`` in this order (duplicates allowed)."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
        _TrainingResultState,
    )

    results = [_TrainingResultState(checkpoint_dir_name=n, metrics={"step": ckpt.step_of(n)}) for n in names]
    state = _CheckpointManagerState(
        checkpoint_results=results, checkpoint_report_indices=list(range(len(names))),
        latest_checkpoint_result=results[-1] if results else None, pending_training_results=[],
        pending_validation_specs=[], current_report_index=len(names), validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[], failed_validation_checkpoint_dir_names=[])
    (checkpoints / SNAPSHOT).write_text(state.model_dump_json())


def ray_loads(run: Path) -> str | None:
    """Ray's CheckpointManager restored from the run folder: the latest checkpoint's folder name it hands
    out."""
    from ray.train import CheckpointConfig
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
    from ray.train.v2._internal.execution.storage import StorageContext

    manager = CheckpointManager(CheckpointConfig(), StorageContext(str(run), "checkpoints"))
    latest = manager.latest_checkpoint_result
    return Path(latest.checkpoint.path).name if latest else None


def make_step(checkpoints: Path, step: int, manifest: bool = True) -> None:
    folder = checkpoints / ckpt.step_dir_name(step)
    folder.mkdir(parents=True)
    (folder / ckpt.STATE).write_text("{}")
    if manifest:
        ckpt.write_manifest(folder, ckpt.describe_files(folder), step)


def test_snapshot_naming_gone_folders_is_repaired_not_refused(tmp_path, caplog):
    """The issue's state: step 20 reported twice (torn, then saved again), 10 pruned, 20 moved aside."""
    from ray.train.v2._internal.exceptions import CheckpointManagerInitializationError

    checkpoints = tmp_path / "checkpoints"
    for step in (30, 40):
        make_step(checkpoints, step)
    make_step(checkpoints, 50)  # complete, but the driver died before Ray registered it
    (checkpoints / "step_00000020.torn-20261206T000000Z").mkdir()
    write_ray_snapshot(checkpoints, ["step_00000010", "step_00000020", "step_00000020", "step_00000030",
                                     "step_00000040"])
    with pytest.raises(CheckpointManagerInitializationError, match="does not exist anymore"):
        ray_loads(tmp_path)  # what the user met

    with caplog.at_level(logging.WARNING):
        reconcile_run(str(tmp_path), "start")
    assert "dropped 2 reference(s) to folders no longer there (step_00000010, step_00000020" in caplog.text
    assert "merged 1 duplicate" in caplog.text and "added 1 complete folder(s)" in caplog.text
    assert ray_loads(tmp_path) == "step_00000050"
    snap = json.loads((checkpoints / SNAPSHOT).read_text())
    assert [r["checkpoint_dir_name"] for r in snap["checkpoint_results"]] == \
        ["step_00000030", "step_00000040", "step_00000050"]
    assert reconcile_ray_snapshot(str(checkpoints)) == []  # agrees now: nothing more to do


def test_agreeing_snapshot_is_left_alone_and_unreadable_one_moved_aside(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    make_step(checkpoints, 10)
    make_step(checkpoints, 20, manifest=False)  # a torn folder stays referenced: the workers decide on it
    write_ray_snapshot(checkpoints, ["step_00000010", "step_00000020"])
    before = (checkpoints / SNAPSHOT).read_text()
    assert reconcile_ray_snapshot(str(checkpoints)) == []
    assert (checkpoints / SNAPSHOT).read_text() == before

    (checkpoints / SNAPSHOT).write_text('{"checkpoint_results": [')  # a write cut short
    changes = reconcile_ray_snapshot(str(checkpoints))
    assert len(changes) == 1 and "moved the unreadable run snapshot aside" in changes[0]
    assert not (checkpoints / SNAPSHOT).exists() and ray_loads(tmp_path) is None
    assert len(list(checkpoints.glob(SNAPSHOT + ".unreadable-*"))) == 1
    assert reconcile_ray_snapshot(str(tmp_path / "no-such-run" / "checkpoints")) == []
