"""Checkpoint/resume through the real stack: torn checkpoints skipped, export, elastic resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.integration.recipes import DEBUG_CONFIG, small_run

pytestmark = pytest.mark.integration

CONSTANT_LR = ["optimizer.schedule=constant", "optimizer.warmup_steps=0"]


def train(argv: list[str]) -> None:
    import ray

    from orchestrator.cli import main

    try:
        assert main(["train", DEBUG_CONFIG, *argv]) == 0
    finally:
        ray.shutdown()


def step_dirs(storage: Path, name: str) -> list[Path]:
    return sorted((storage / name / "checkpoints").glob("step_*"))


# Bitwise equality after a resume at the same world size (2 ranks, 20 steps vs 10 + resume + 10) is checked by
# tests/integration/test_faults_worker.py, where the resume follows a SIGKILLed worker.


def test_torn_checkpoint_is_skipped_with_a_warning(synthetic_data, tmp_path, capfd):
    storage, data = tmp_path / "runs", str(synthetic_data)
    tracking = [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    train(small_run("torn", storage, data, steps=6, every=3, extra=CONSTANT_LR + tracking))
    dirs = step_dirs(storage, "torn")
    assert [d.name for d in dirs] == ["step_00000003", "step_00000006"]
    newest = dirs[-1]
    # Flip one byte of a shard of the newest checkpoint: its manifest checksum no longer matches.
    shard = next(p for p in sorted((newest / "ds").iterdir()) if "model_states" in p.name)
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    train(small_run("torn", storage, data, steps=8, every=3, extra=CONSTANT_LR + tracking))
    out = capfd.readouterr()
    text = out.out + out.err
    assert "skipping torn checkpoint" in text and "step_00000006" in text
    assert "resumed from" in text and "step_00000003" in text
    final = step_dirs(storage, "torn")[-1]
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["step"] == 8
    check_export_matches_zero_to_fp32(final, tmp_path)
    shutil.rmtree(storage, ignore_errors=True)


def check_export_matches_zero_to_fp32(step_dir: Path, tmp_path: Path) -> None:
    """`unimo export` equals the zero_to_fp32.py script DeepSpeed ships in the checkpoint, and loads without it."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from orchestrator.cli import main
    from trainer.export import load_exported

    out = tmp_path / "export"
    assert main(["export", str(step_dir), str(out)]) == 0
    ref_dir = tmp_path / "zero_to_fp32"
    # (its safetensors mode refuses tied weights, so it writes a torch file here)
    subprocess.run([sys.executable, str(step_dir / "zero_to_fp32.py"), str(step_dir), str(ref_dir), "--tag", "ds"],
                   check=True, env=dict(os.environ, DS_ACCELERATOR="cpu"), capture_output=True)
    ref = {}
    for f in sorted(ref_dir.glob("*.bin")):
        ref.update(torch.load(f, map_location="cpu", weights_only=True))
    ours = load_file(str(out / "model.safetensors"))
    ref = {k.removeprefix("model."): v for k, v in ref.items()}
    assert ref and set(ref) == set(ours)
    assert all(torch.equal(ref[k], ours[k]) for k in ref)
    model = load_exported(out)
    ids = torch.tensor([[2, 10, 11, 3]])
    assert model.encode_text(ids, torch.ones_like(ids))[-1].shape[:2] == (1, 4)
    assert (out / "tokenizer.json").is_file()


def test_elastic_resume_one_to_two(synthetic_data, tmp_path, capfd):
    """1 -> 2 ranks through the universal checkpoint (2 -> 1 is test_faults_node.py's elastic node loss)."""
    storage, data = tmp_path / "runs", str(synthetic_data)
    tracking = [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    train(small_run("elastic", storage, data, steps=4, every=4,
                    extra=CONSTANT_LR + tracking + ["scaling.num_workers=1"]))
    train(small_run("elastic", storage, data, steps=8, every=4, extra=CONSTANT_LR + tracking))
    text = capfd.readouterr()
    text = text.out + text.err
    assert "elastic: saved by 1 ranks, now 2" in text
    states = [json.loads((d / "trainer_state.json").read_text()) for d in step_dirs(storage, "elastic")]
    assert [(s["step"], s["world_size"]) for s in states] == [(4, 1), (8, 2)]
    # the global batch stayed the same: 2 micro-batches per step whatever the world size
    assert all(s["config"]["train"]["global_micro_batches"] == 2 for s in states)
