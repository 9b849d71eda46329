"""Checkpoint/resume through the real stack: run storage on S3, torn checkpoints skipped, export, elastic
resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.integration.recipes import DEBUG_CONFIG, jobs_bound, small_run

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


def s3_keys(bucket: str, prefix: str) -> dict[str, int]:
    """{key: size} of every object under ``prefix``."""
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


@jobs_bound(2)  # two jobs in a row (see jobs_bound)
def test_s3_storage_torn_skipped_elastic_resume_and_export(synthetic_data, tmp_path, capfd):
    """run.storage on the S3 server (moto on loopback), two corpora per modality: a 1-rank job's checkpoints,
    manifest and run files land in the bucket; a 2-rank resubmission skips a torn checkpoint (no manifest) and
    a corrupt one (flipped byte), both named, resumes elastically (1 -> 2 ranks, through the universal
    checkpoint, deleted once loaded) from the previous valid one in the same MLflow run, and the final
    checkpoint exports like zero_to_fp32. (2 -> 1 is test_faults_node.py's elastic node loss.)"""
    import tempfile

    import boto3

    from tests.integration.services import s3_server
    from trainer import storage as run_storage
    from trainer.checkpointing.universal import UNIVERSAL_PREFIX

    conversions = lambda: set(Path(tempfile.gettempdir()).glob(f"{UNIVERSAL_PREFIX}s3run-*"))  # noqa: E731
    before = conversions()
    data = str(synthetic_data)  # data stays local: this test is about checkpoint storage
    extra = [*CONSTANT_LR, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *two_corpora_each(data)]
    with s3_server():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="ckpts")
        run_url, prefix = "s3://ckpts/runs/s3run", "runs/s3run/"
        train(small_run("s3run", "s3://ckpts/runs", data, steps=4, every=2,
                        extra=extra + ["scaling.num_workers=1"]))

        keys = s3_keys("ckpts", prefix)
        run_id = json.loads(s3.get_object(Bucket="ckpts",
                                          Key=prefix + "mlflow_run.json")["Body"].read())["run_id"]
        assert prefix + "run.lock" not in keys and prefix + "STOP" not in keys  # released, no stop pending
        for step in (2, 4):
            ckpt = f"{prefix}checkpoints/step_{step:08d}/"
            manifest = json.loads(s3.get_object(Bucket="ckpts", Key=ckpt + "manifest.json")["Body"].read())
            assert manifest["step"] == step
            assert {ckpt + rel: meta["size"]
                    for rel, meta in manifest["files"].items()}.items() <= keys.items()
            assert sum("model_states" in rel for rel in manifest["files"]) == 1  # one ZeRO-3 shard per rank

        # Tear the newest checkpoint (a flipped byte) and leave a newer one without a manifest (a lost
        # upload).
        newest = f"{prefix}checkpoints/step_00000004/"
        shard = next(k for k in sorted(keys) if k.startswith(newest) and "model_states" in k)
        blob = bytearray(s3.get_object(Bucket="ckpts", Key=shard)["Body"].read())
        blob[len(blob) // 2] ^= 0xFF
        s3.put_object(Bucket="ckpts", Key=shard, Body=bytes(blob))
        s3.put_object(Bucket="ckpts", Key=f"{prefix}checkpoints/step_00000005/trainer_state.json", Body=b"{}")
        capfd.readouterr()

        train(small_run("s3run", "s3://ckpts/runs", data, steps=6, every=2, extra=extra))
        out = capfd.readouterr()
        text = out.out + out.err
        assert (f"skipping torn checkpoint: checkpoint {run_url}/checkpoints/step_00000005 has "
                "no manifest" in text)
        assert f"{run_url}/checkpoints/step_00000004: file ds/" in text and "fails its checksum" in text
        assert f"resumed from {run_url}/checkpoints/step_00000002 at step 2" in text
        assert "elastic: saved by 1 ranks, now 2" in text
        assert conversions() - before == set(), "the universal conversion was left behind"
        final = run_storage.join(run_url, "checkpoints", "step_00000006")
        local = tmp_path / "step_00000006"
        run_storage.download(final, local)
        state = json.loads((local / "trainer_state.json").read_text())
        assert state["step"] == 6 and state["mlflow_run_id"] == run_id  # one MLflow run across both jobs
        assert state["world_size"] == 2
        # the global batch stayed the same: 2 micro-batches per step whatever the world size
        assert state["config"]["train"]["global_micro_batches"] == 2
        # every modality's two corpora went through the elastic change in the data cursor (its elastic view
        # has each as a source; tests/data_pipeline/test_corpora.py checks exactly-once per corpus-epoch)
        from tests.orchestrator.faults import state_with_cursor

        sources = set(state_with_cursor(local)["data_cursor"]["sources"])
        assert {f"{m}/{c}" for m in ("text", "image", "pair") for c in "ab"} <= sources, sources
        check_export_matches_zero_to_fp32(local, tmp_path, source=final)  # `unimo export s3://...`


def check_export_matches_zero_to_fp32(step_dir: Path, tmp_path: Path, source: str | None = None) -> None:
    """`unimo export` (of ``source``, a checkpoint URL, else ``step_dir``) equals the zero_to_fp32.py script
    DeepSpeed ships in the checkpoint, and loads without it."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from orchestrator.cli import main
    from trainer.export import load_exported

    out = tmp_path / "export"
    assert main(["export", source or str(step_dir), str(out)]) == 0
    ref_dir = tmp_path / "zero_to_fp32"
    # (its safetensors mode refuses tied weights, so it writes a torch file here)
    subprocess.run([sys.executable, str(step_dir / "zero_to_fp32.py"), str(step_dir), str(ref_dir),
                    "--tag", "ds"],
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


def two_corpora_each(data: str) -> list[str]:
    """Every training modality as two weighted corpora of its 4 shards (1:3), as UNIMO's recipe mixes."""
    overrides = []
    for modality, folder in (("pair", "pairs"), ("text", "text"), ("image", "images")):
        shards = f"{data}/{folder}/shard-"
        overrides += [f"data.{modality}.urls=",
                      f"data.{modality}.corpora=[{{name: a, urls: '{shards}{{000000..000001}}.tar', "
                      f"weight: 1}}, {{name: b, urls: '{shards}{{000002..000003}}.tar', weight: 3}}]"]
    return overrides
