"""The tokenizer and the data sources a checkpoint was trained on: recorded at save, checked at resume (an
error naming both, or with data.on_change=continue a fresh data cursor), the tokenizer kept in the checkpoint
and exported from there, and checkpoints from before the records resuming unchecked.

No DeepSpeed here: the real Trainer loads the tokenizer file and the real CheckpointManager saves and
resumes, with a stand-in engine writing one ZeRO-3 shard and a 1-rank gloo group serving the all-gather.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from data_pipeline.tokenizer import save_tokenizer, train_tokenizer
from trainer import checkpoint as ckpt
from trainer.checkpointing.identity import DataChanged
from trainer.config import load_config
from trainer.export import checkpoint_tokenizer, export_tokenizer
from trainer.loop import Trainer
from tests.trainer.checkpoint_fakes import NoReporter, StubEngine, StubLoader

CURSOR_LOADER = StubLoader({"version": 1, "cursor": "where the data was"})

CAPTIONS = ["a red circle", "a blue square", "a green triangle"]


def _tokenizer(path: Path, texts: list[str]) -> str:
    return save_tokenizer(train_tokenizer(texts, vocab_size=60, kind="wordlevel"), str(path))


def _trainer(tmp_path: Path, tokenizer: str, overrides: tuple[str, ...] = ()) -> Trainer:
    # the ZeRO-3 layout the stand-in engine writes, resumed under stage 3: no conversion
    cfg = load_config(None, [f"data.tokenizer={tokenizer}", "deepspeed.zero_stage=3", "run.name=identity",
                             *overrides])
    trainer = Trainer(cfg, 0, 1, NoReporter(), control_dir=str(tmp_path / "run"))
    trainer.load_tokenizer()
    return trainer


def _save(trainer: Trainer, tmp_path: Path, step: int = 3) -> Path:
    """A checkpoint of ``step`` saved by the trainer's manager, where the run's storage holds it."""
    root = trainer.checkpoints.save_local(step, StubEngine(), CURSOR_LOADER, {})
    dest = tmp_path / "run" / "checkpoints" / ckpt.step_dir_name(step)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(root), dest)
    return dest


def _resume(trainer: Trainer):
    return trainer.checkpoints.load(lambda universal: StubEngine())


def test_the_checkpoint_keeps_the_tokenizer_and_its_hash(tmp_path, one_rank_group):
    tok = _tokenizer(tmp_path / "tok" / "tokenizer.json", CAPTIONS)
    step = _save(_trainer(tmp_path, tok), tmp_path)
    ckpt.verify(step)  # tokenizer.json is in the manifest, with its checksum
    assert (step / ckpt.TOKENIZER).read_bytes() == Path(tok).read_bytes()
    state = ckpt.read_state(step)
    assert state["schema"] == ckpt.SCHEMA_VERSION >= 2  # the data identity is recorded from schema 2 on
    assert state["data_identity"]["tokenizer_sha256"] == ckpt.sha256_file(Path(tok))
    progress = _resume(_trainer(tmp_path, tok))  # the same tokenizer: resumes with its cursor
    assert progress.step == 3 and progress.data_state["cursor"] == "where the data was"  # its own file


def test_another_tokenizer_is_an_error_naming_the_checkpoint_both_hashes_and_the_fix(tmp_path,
                                                                                    one_rank_group):
    tok = _tokenizer(tmp_path / "tok" / "tokenizer.json", CAPTIONS)
    step = _save(_trainer(tmp_path, tok), tmp_path)
    trained_with = ckpt.sha256_file(Path(tok))
    _tokenizer(Path(tok), CAPTIONS + ["a yellow star"])  # the file is replaced after training
    with pytest.raises(DataChanged) as err:
        _resume(_trainer(tmp_path, tok))
    message = str(err.value)
    assert f"cannot resume from checkpoint {step}: the tokenizer differs" in message
    assert trained_with in message and ckpt.sha256_file(Path(tok)) in message
    assert f"{step}/tokenizer.json" in message  # where the original is kept
    assert "Resume with the original tokenizer" in message and "data.on_change=continue" in message


def test_on_change_continue_restores_the_weights_and_starts_a_fresh_data_cursor(tmp_path, one_rank_group,
                                                                                caplog):
    tok = _tokenizer(tmp_path / "tok" / "tokenizer.json", CAPTIONS)
    _save(_trainer(tmp_path, tok), tmp_path)
    _tokenizer(Path(tok), CAPTIONS + ["a yellow star"])
    with caplog.at_level(logging.WARNING):
        progress = _resume(_trainer(tmp_path, tok, ("data.on_change=continue",)))
    assert progress.step == 3  # the weights and optimizer of step 3 were loaded
    assert progress.data_state is None  # the loader starts the data from scratch
    assert "data.on_change=continue" in caplog.text and "the data cursor starts afresh" in caplog.text


def _with_corpora(coco_urls: str, weight: float = 1.0, extra: str = "") -> tuple[str, ...]:
    corpora = f"{{name: coco, urls: '{coco_urls}', weight: {weight}}}" + extra
    return (f"data.pair.corpora=[{corpora}]",)


def test_a_corpus_of_the_same_name_with_other_urls_is_a_change_weights_and_new_corpora_are_not(
        tmp_path, one_rank_group):
    tok = _tokenizer(tmp_path / "tok" / "tokenizer.json", CAPTIONS)
    _save(_trainer(tmp_path, tok, _with_corpora("s3://data/coco/")), tmp_path)
    # what the data cursor handles by design (docs/DATA.md): another weight, an added corpus
    changed_mix = _with_corpora("s3://data/coco/", weight=0.3, extra=", {name: sbu, urls: 's3://data/sbu/'}")
    assert _resume(_trainer(tmp_path, tok, changed_mix)).data_state is not None
    with pytest.raises(DataChanged, match=r"corpus pair/coco lists other URLs than when the checkpoint was "
                                          r"saved \(URL digest [0-9a-f]{16}, now [0-9a-f]{16}\)"):
        _resume(_trainer(tmp_path, tok, _with_corpora("s3://other-bucket/coco/")))


def test_a_checkpoint_from_before_the_records_resumes_unchecked(tmp_path, one_rank_group, caplog):
    """Schema 1: no data_identity in the state, no tokenizer.json in the folder."""
    tok = _tokenizer(tmp_path / "tok" / "tokenizer.json", CAPTIONS)
    step = _save(_trainer(tmp_path, tok), tmp_path)
    state = json.loads((step / ckpt.STATE).read_text())
    del state["data_identity"]
    (step / ckpt.STATE).write_text(json.dumps({**state, "schema": 1}))
    (step / ckpt.TOKENIZER).unlink()
    ckpt.write_manifest(step, ckpt.describe_files(step), 3)
    _tokenizer(Path(tok), CAPTIONS + ["a yellow star"])  # would be refused if the checkpoint said otherwise
    with caplog.at_level(logging.INFO):
        progress = _resume(_trainer(tmp_path, tok))
    assert progress.step == 3 and progress.data_state is not None
    assert caplog.text.count("saved before unimo recorded the tokenizer and the data sources") == 1


def test_export_takes_the_checkpoint_s_tokenizer_not_the_configured_file_as_it_is_now(
        tmp_path, one_rank_group, caplog):
    tok = _tokenizer(tmp_path / "tok" / "tokenizer.json", CAPTIONS)
    trained_with = Path(tok).read_bytes()
    step = _save(_trainer(tmp_path, tok), tmp_path)
    _tokenizer(Path(tok), CAPTIONS + ["a yellow star"])  # changed after training
    assert Path(tok).read_bytes() != trained_with
    state = ckpt.read_state(step)
    export_tokenizer(step, state, tmp_path / "exported.json")
    assert (tmp_path / "exported.json").read_bytes() == trained_with
    # and what `unimo eval` decodes captions with
    assert Path(checkpoint_tokenizer(step, state)).read_bytes() == trained_with

    (step / ckpt.TOKENIZER).unlink()  # a checkpoint from before: the configured file, with a warning
    export_tokenizer(step, state, tmp_path / "old.json")
    assert (tmp_path / "old.json").read_bytes() == Path(tok).read_bytes()
    assert f"checkpoint {step} holds no tokenizer.json (saved before unimo kept one)" in caplog.text
