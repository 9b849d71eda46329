"""What Trainer.save writes into trainer_state.json (no secret) and how find_checkpoint refuses another model.

No DeepSpeed here: a stand-in engine writes one shard file, and a 1-rank gloo group serves the all-gather."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.integration.services import FAKE_AWS
from trainer import checkpoint as ckpt
from trainer.config import load_config
from trainer.loop import Trainer

SECRET = FAKE_AWS["AWS_SECRET_ACCESS_KEY"]


class _Engine:
    def save_checkpoint(self, root: str, tag: str, save_latest: bool) -> None:
        (Path(root) / tag).mkdir(parents=True)
        (Path(root) / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"weights")


class _Loader:
    def state_dict(self) -> dict:
        return {"version": 1}


class _Reporter:
    def report(self, metrics, checkpoint_dir, step) -> None: ...

    def latest_checkpoint(self):
        return None


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _saved_run(tmp_path: Path, overrides: list[str]) -> Path:
    """A run folder holding one checkpoint (step 1) written by Trainer.save; returns the run folder."""
    trainer = Trainer(load_config(None, overrides), rank=0, world_size=1, reporter=_Reporter())
    trainer.engine, trainer.loader = _Engine(), _Loader()
    root = trainer.save(1)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.move(str(root), run / "checkpoints" / ckpt.step_dir_name(1))
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


def test_resume_with_another_model_config_names_the_fields(tmp_path, one_rank_group):
    run = _saved_run(tmp_path, ["model.fusion.layers=2"])
    same = Trainer(load_config(None, ["model.fusion.layers=2"]), 0, 1, _Reporter(), control_dir=str(run))
    assert same.find_checkpoint()[1]["step"] == 1
    other = Trainer(load_config(None, ["model.fusion.layers=3"]), 0, 1, _Reporter(), control_dir=str(run))
    with pytest.raises(ValueError, match=r"was saved with another model config: "
                                         r"model\.fusion\.layers: checkpoint has 2, config has 3\. "
                                         r"Use the original config or start a new run name"):
        other.find_checkpoint()
