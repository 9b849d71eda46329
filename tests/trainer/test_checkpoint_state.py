"""What the CheckpointManager writes into trainer_state.json (no secret), how it refuses another model, and
how it resumes from an older checkpoint than a torn newest one (moved aside, retention by one owner).

No DeepSpeed here: a stand-in engine writes one shard file, and a 1-rank gloo group serves the all-gather."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.integration.services import FAKE_AWS
from trainer import checkpoint as ckpt
from trainer.config import load_config
from trainer.checkpointing.manager import CheckpointManager
from tests.trainer.checkpoint_fakes import NoReporter, StubEngine, StubLoader

SECRET = FAKE_AWS["AWS_SECRET_ACCESS_KEY"]


def _manager(overrides: list[str], run: Path | None = None) -> CheckpointManager:
    return CheckpointManager(load_config(None, overrides), rank=0, world_size=1, reporter=NoReporter(),
                             run_location=str(run) if run else None)


def _saved_run(tmp_path: Path, overrides: list[str], steps: tuple[int, ...] = (1,)) -> Path:
    """A run folder holding checkpoints (step 1 by default) written by CheckpointManager.save_local."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    for step in steps:
        root = _manager(overrides).save_local(step, StubEngine(), StubLoader(), {})
        shutil.move(str(root), run / "checkpoints" / ckpt.step_dir_name(step))
    return run


def test_checkpoint_state_holds_no_secret(tmp_path, monkeypatch, one_rank_group):
    for key, value in FAKE_AWS.items():
        monkeypatch.setenv(key, value)
    run = _saved_run(tmp_path, ["tracking.uri=http://user:hunter2pass@mlflow.example:5000",
                                f"data.pair.urls=s3://bucket/{SECRET}/pairs"])
    step = run / "checkpoints" / ckpt.step_dir_name(1)
    ckpt.verify(step)
    text = (step / ckpt.STATE).read_text()
    assert "hunter2pass" not in text and SECRET not in text
    state = json.loads(text)
    assert state["config"]["tracking"]["uri"] == "http://***@mlflow.example:5000"
    assert state["config"]["model"]["flavor"] == "debug"  # what resume and export read is all there
    assert state["schema"] == ckpt.SCHEMA_VERSION


def test_resume_with_another_model_config_names_the_fields(tmp_path, one_rank_group):
    run = _saved_run(tmp_path, ["model.fusion.layers=2"])
    assert _manager(["model.fusion.layers=2"], run).find().state["step"] == 1
    with pytest.raises(ValueError, match=r"was saved with another model config: "
                                         r"model\.fusion\.layers: checkpoint has 2, config has 3\. "
                                         r"Use the original config or start a new run name"):
        _manager(["model.fusion.layers=3"], run).find()


class _RecordingEngine:
    def __init__(self):
        self.loaded: list[str] = []

    def load_checkpoint(self, path: str, tag: str, **_) -> None:
        self.loaded.append(Path(path).name)


@pytest.mark.integration  # the universal conversion runs in a subprocess
def test_a_torn_newest_is_moved_aside_and_the_older_one_restored(tmp_path, one_rank_group, caplog):
    """The same step is then saved again into a fresh folder; retention (keep_last=2) sees only real ones."""
    run = _saved_run(tmp_path, [], steps=(2, 4, 6))
    checkpoints = run / "checkpoints"
    (checkpoints / "step_00000006" / ckpt.MANIFEST).unlink()  # step 6: a kill during its save
    shard = checkpoints / "step_00000004" / "ds" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    shard.write_bytes(b"w")  # step 4: truncated
    # the fake engine writes a ZeRO-3 layout: resumed under stage 3, no conversion (trainer/zero_stage.py)
    manager = _manager(["checkpoint.keep_last=1", "deepspeed.zero_stage=3"], run)
    engine = _RecordingEngine()
    progress = manager.load(lambda universal: engine)
    assert progress.step == 2 and engine.loaded == ["step_00000002"]
    names = sorted(p.name for p in checkpoints.iterdir())
    assert [n.split("-")[0] for n in names] == ["step_00000002", "step_00000004.torn", "step_00000006.torn"]
    assert (checkpoints / names[1] / "ds" / shard.name).read_bytes() == b"w"  # kept as it was, for forensics
    assert f"moved the torn checkpoint {checkpoints / 'step_00000004'} aside" in caplog.text

    class Tracker:
        texts: dict[str, str] = {}

        def log_text(self, text, name):
            self.texts[name] = text

    manager.attach(Tracker())
    assert "was torn and moved aside" in Tracker.texts["checkpoints/step_00000004/moved_aside.txt"]


def test_retention_counts_the_checkpoint_still_uploading(tmp_path, one_rank_group):
    """Ray keeps every folder (num_to_keep=None): the manager prunes, keeping the newest complete one until
    the pending upload is complete."""
    run = _saved_run(tmp_path, [], steps=(2, 4, 6))
    manager = _manager(["checkpoint.keep_last=2"], run)
    removed = manager.prune(pending=8)
    assert sorted(Path(p).name for p in removed) == ["step_00000002", "step_00000004"]
    assert [c.step for c in ckpt.list_step_dirs(run / "checkpoints")] == [6]
    assert manager.prune(pending=None) == []


class _FailingEngine:
    def zero_optimization_stage(self) -> int:
        return 3  # its files are named as stage 3's

    def save_checkpoint(self, root: str, tag: str, save_latest: bool, client_state=None) -> None:
        (Path(root) / tag).mkdir(parents=True)
        (Path(root) / tag / "part.pt").write_bytes(b"half")
        raise OSError(28, "No space left on device")


def test_no_space_is_named_before_saving_and_partial_saves_never_stay(tmp_path, monkeypatch, one_rank_group):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    manager = _manager([], tmp_path / "run")
    leftover = tmp_path / "tmp" / f"{manager._save_prefix()}7-r0-abcd"  # a job that died mid-save
    leftover.mkdir()
    other_run = tmp_path / "tmp" / "unimo-ckpt-other-12345678-7-r0-abcd"
    other_run.mkdir()
    manager.load(lambda universal: None)  # no checkpoint: starts from scratch, and tidies the node
    assert not leftover.exists() and other_run.exists()

    with pytest.raises(OSError, match="No space left"):
        manager.save_local(3, _FailingEngine(), StubLoader(), {})
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == [other_run.name]  # the partial one is gone

    root = manager.save_local(4, StubEngine(), StubLoader(), {})
    assert manager.last_size == sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    manager.last_size = 1 << 60  # the last checkpoint was larger than this disk
    with pytest.raises(OSError, match=rf"not enough free space in {tmp_path / 'tmp'} for rank 0's checkpoint "
                                      rf"save of step 5: it needs about {1 << 60} bytes"):
        manager.save_local(5, StubEngine(), StubLoader(), {})
