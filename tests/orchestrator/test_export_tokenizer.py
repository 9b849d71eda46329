"""`unimo export` of a real ZeRO-3 checkpoint writes the tokenizer the checkpoint was trained with, kept in
the checkpoint, even after the configured tokenizer file was changed."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipeline.tokenizer import save_tokenizer, train_tokenizer
from orchestrator.cli import main
from tests.orchestrator.checkpoints import write_checkpoint
from trainer import checkpoint as ckpt

# Integration tier: a real ZeRO-3 checkpoint written by a child process.
pytestmark = pytest.mark.integration

pytest.importorskip("deepspeed")


def test_export_writes_the_tokenizer_trained_with_not_the_configured_file_as_it_is_now(tmp_path):
    configured = tmp_path / "tokenizer" / "tokenizer.json"
    save_tokenizer(train_tokenizer(["a red circle", "a blue square"], vocab_size=60, kind="wordlevel"),
                   str(configured))
    trained_with = configured.read_bytes()
    step = write_checkpoint(tmp_path / "runs" / "exp", str(configured))
    assert (step / ckpt.TOKENIZER).read_bytes() == trained_with  # kept in the checkpoint, in its manifest
    save_tokenizer(train_tokenizer(["a green triangle", "a yellow star"], vocab_size=60, kind="wordlevel"),
                   str(configured))  # the file is replaced after training
    assert configured.read_bytes() != trained_with

    out = tmp_path / "export"
    assert main(["export", str(step), str(out)]) == 0
    assert (out / "tokenizer.json").read_bytes() == trained_with
    assert Path(out / "model.safetensors").is_file()
