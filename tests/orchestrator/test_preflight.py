"""Pre-flight (orchestrator/preflight.py, `unimo check`): each user mistake of issue #26 is named before a
worker starts, with the key it comes from and what to do; a good config passes and leaves nothing behind."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from data_pipeline.errors import UserError
from orchestrator.cli import main
from orchestrator.preflight import PreflightError, check_cluster, run_preflight
from tests.integration.recipes import DEBUG_CONFIG, data_overrides
from trainer.config import load_config
from trainer.config_loader import to_dict


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from data_pipeline.synthetic import write_synthetic_dataset

    out = tmp_path_factory.mktemp("pf-data")
    write_synthetic_dataset(str(out), n_pairs=40, n_text=40, n_images=40, n_eval=10, samples_per_shard=10)
    return out


def config(data: Path, tmp_path: Path, *extra: str):
    return load_config(DEBUG_CONFIG, [f"run.storage={tmp_path / 'runs'}", *data_overrides(str(data)), *extra])


def failing(cfg) -> str:
    with pytest.raises(PreflightError) as err:
        run_preflight(cfg)
    return str(err.value)


def test_a_good_config_passes_and_leaves_no_probe(data, tmp_path):
    report = run_preflight(config(data, tmp_path))
    names = [c.name for c in report.checks]
    assert names == ["stages", "run.storage", "tracking.uri", "data.tokenizer", "data.text.urls",
                     "data.image.urls", "data.pair.urls", "data.eval_pairs", "checkpoint (resume)", "scaling"]
    assert report.ok and not report.warnings
    assert not (tmp_path / "runs").exists()  # the probe and the folders made for it are removed


def test_missing_data_folder_is_named(data, tmp_path):
    msg = failing(config(data, tmp_path, f"data.pair.urls={tmp_path / 'nope'}"))
    assert msg.startswith("data.pair.urls:") and "no shards (" in msg and str(tmp_path / "nope") in msg


def test_fewer_shards_than_streams_is_no_error(data, tmp_path):
    # 4 shards per source; 2 ranks x 3 loader workers = 6 streams: the corpus's epochs are read by 4 of them
    assert run_preflight(config(data, tmp_path, "data.num_workers=3")).ok


def test_missing_tokenizer(data, tmp_path):
    msg = failing(config(data, tmp_path, f"data.tokenizer={tmp_path / 'tok.json'}"))
    assert msg.startswith("data.tokenizer:") and "not found" in msg


def test_tokenizer_against_the_model(data, tmp_path):
    from trainer.config_loader import ConfigError

    # A local tokenizer file is read when the config loads (special ids come from it); the pre-flight checks
    # the same for one on remote storage. Either way the user hears of it before anything starts.
    for override, words in (("model.text.vocab_size=100", "vocab_size"), ("model.text.mask_token_id=7",
                                                                          "mask_token_id")):
        with pytest.raises((ConfigError, PreflightError)) as err:
            run_preflight(config(data, tmp_path, override))
        assert words in str(err.value)


def test_a_shard_that_is_not_a_tar(data, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(4):
        (bad / f"shard-{i:06d}.tar").write_bytes(b"not a tar at all" * 100)
    msg = failing(config(data, tmp_path, f"data.image.urls={bad}"))
    assert msg.startswith("data.image.urls:") and "no usable image sample" in msg


def test_storage_that_cannot_be_written(data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    msg = failing(load_config(DEBUG_CONFIG, [f"run.storage={blocker}", *data_overrides(str(data))]))
    assert msg.startswith("run.storage:") and str(blocker) in msg


def _fake_checkpoint(run_dir: Path, cfg, step: int = 10, **state) -> Path:
    step_dir = run_dir / "checkpoints" / f"step_{step:08d}"
    step_dir.mkdir(parents=True)
    full = {"step": step, "world_size": 2, "config": to_dict(cfg), "data_states": [{}], **state}
    (step_dir / "trainer_state.json").write_text(json.dumps(full))
    (step_dir / "manifest.json").write_text(json.dumps({"step": step, "files": {}}))
    return step_dir


def test_resume_with_another_model_config(data, tmp_path):
    saved = config(data, tmp_path, "model.fusion.layers=1")
    _fake_checkpoint(tmp_path / "runs" / "debug", saved)
    msg = failing(config(data, tmp_path, "model.fusion.layers=2"))
    assert "another model config: model.fusion.layers: checkpoint has 1, config has 2" in msg
    assert "start a new run name" in msg


def test_resume_with_other_shards(data, tmp_path):
    cfg = config(data, tmp_path)
    cursor = {"seed": cfg.data.seed, "sources": {"pair": {"num_shards": 3, "digest": "0" * 16,
                                                          "seq_len": cfg.seq_len}}}
    _fake_checkpoint(tmp_path / "runs" / "debug", cfg, data_states=[cursor])
    msg = failing(cfg)
    assert msg.startswith("checkpoint (resume):") and "data.pair.urls" in msg and "read 3 shards" in msg


def test_resume_with_other_shards_schema_3(data, tmp_path):
    """Since checkpoint schema 3 the cursor is beside trainer_state.json (data_elastic_view.json)."""
    cfg = config(data, tmp_path)
    cursor = {"seed": cfg.data.seed, "sources": {"pair": {"num_shards": 3, "digest": "0" * 16,
                                                          "seq_len": cfg.seq_len}}}
    step_dir = _fake_checkpoint(tmp_path / "runs" / "debug", cfg, schema=3)
    state = json.loads((step_dir / "trainer_state.json").read_text())
    del state["data_states"]
    (step_dir / "trainer_state.json").write_text(json.dumps(state))
    (step_dir / "data_elastic_view.json").write_text(json.dumps(cursor))
    msg = failing(cfg)
    assert msg.startswith("checkpoint (resume):") and "data.pair.urls" in msg and "read 3 shards" in msg


def test_a_newer_checkpoint_with_a_file_cut_short_is_passed_over_as_the_trainer_does(data, tmp_path):
    """The newest checkpoint's elastic view (or trainer state) cut short after its manifest was written: the
    pre-flight checks the one before instead of ending the job on the unreadable JSON (the trainer skips the
    torn one too, naming the file). Found by the fault campaign."""
    from trainer import checkpoint as ckpt

    cfg = config(data, tmp_path)
    run = tmp_path / "runs" / "debug"
    for step in (8, 12):
        step_dir = _fake_checkpoint(run, cfg, step=step, schema=3)
        state = json.loads((step_dir / ckpt.STATE).read_text())
        del state["data_states"]
        (step_dir / ckpt.STATE).write_text(json.dumps(state))
        (step_dir / ckpt.ELASTIC_VIEW).write_text(json.dumps({"seed": cfg.data.seed, "sources": {}}))
        ckpt.write_manifest(step_dir, ckpt.describe_files(step_dir), step)
    for name in (ckpt.ELASTIC_VIEW, ckpt.STATE):
        torn = run / "checkpoints" / "step_00000012" / name
        whole = torn.read_text()
        torn.write_text(whole[: len(whole) // 2])  # as a truncate would leave it
        row = [c for c in run_preflight(cfg).checks if c.name == "checkpoint (resume)"][0]
        assert row.status == "ok" and "step_00000008 (step 8" in row.detail, (name, row)
        torn.write_text(whole)
    row = [c for c in run_preflight(cfg).checks if c.name == "checkpoint (resume)"][0]
    assert "step_00000012 (step 12" in row.detail  # whole again: the newest is checked


def test_resume_that_matches(data, tmp_path):
    cfg = config(data, tmp_path)
    _fake_checkpoint(tmp_path / "runs" / "debug", cfg)
    row = [c for c in run_preflight(cfg).checks if c.name == "checkpoint (resume)"][0]
    assert row.status == "ok" and "step 10" in row.detail


def _refused_endpoint() -> str:
    with socket.socket() as s:  # a port nobody listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_io_retries_bound_the_listing(data, tmp_path, monkeypatch):
    """data.io_retries=1: the listing of an S3 endpoint that refuses connections is tried twice, not nine
    times (the listing used a fixed budget of 8 retries with backoff up to 20 s)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", _refused_endpoint())
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKEUNIMOTEST000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret-unimo-preflight")
    msg = failing(config(data, tmp_path, "data.pair.urls=s3://bucket/pairs", "data.io_retries=1",
                         "data.io_backoff_s=0.01", "data.io_backoff_max_s=0.01"))
    assert msg.startswith("data.pair.urls:") and "after 2 attempts" in msg


def test_gpus_that_are_not_there(data, tmp_path):
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    msg = failing(config(data, tmp_path, "scaling.use_gpu=true"))
    assert msg.startswith("scaling.use_gpu=true") and "needs 2 GPU(s); this machine has" in msg


def test_cluster_resources(data, tmp_path):
    cfg = config(data, tmp_path, "scaling.num_workers=2", "scaling.cpus_per_worker=4")
    assert check_cluster(cfg, {"CPU": 8.0}) is None
    with pytest.raises(UserError, match="embedded Ray.*CPU: needs 8, has 4"):
        check_cluster(cfg, {"CPU": 4.0})
    cfg.scaling.address = "ray://head:10001"
    warning = check_cluster(cfg, {"CPU": 4.0})
    assert "waiting up to" in warning and "UNIMO_CLUSTER_WAIT_S" in warning


def test_cli_check_prints_the_table_and_exits_1_at_the_first_error(data, tmp_path, capsys):
    base = [f"run.storage={tmp_path / 'runs'}", *data_overrides(str(data))]
    assert main(["check", DEBUG_CONFIG, *base]) == 0
    out = capsys.readouterr().out
    assert "OK     data.pair.urls" in out and "checks passed" in out
    assert main(["train", DEBUG_CONFIG, *base, f"data.text.urls={tmp_path / 'none'}", "--dry-run"]) == 1
    captured = capsys.readouterr()
    assert "ERROR  data.text.urls" in captured.out and "data.image.urls" not in captured.out
    assert "unimo: error: data.text.urls:" in captured.err


def test_submit_runs_the_preflight_where_the_data_is(data, tmp_path, capsys):
    from orchestrator import jobs

    base = [f"run.storage={tmp_path / 'runs'}", *data_overrides(str(data))]
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreflightError, match="data.pair.urls"):
        jobs.prepare(DEBUG_CONFIG, [*base, f"data.pair.urls={tmp_path / 'empty'}"])
    jobs.prepare(DEBUG_CONFIG, base)
    assert "# pre-flight: 9 checks passed here" in capsys.readouterr().err
    # folders this machine does not have may be on the cluster's shared storage: the job checks them there
    jobs.prepare(DEBUG_CONFIG, [*base, f"data.pair.urls={tmp_path / 'on-the-cluster'}"])
    assert "pre-flight left to the cluster: not on this machine: data.pair.urls=" in capsys.readouterr().err


def test_a_database_store_is_named_without_its_password(tmp_path):
    from orchestrator.preflight import check_tracking

    cfg = load_config(DEBUG_CONFIG, ["tracking.uri=postgresql://mlflow:pg-s3cret@db.example:5432/mlflow"])
    shown = check_tracking(cfg, str(tmp_path))
    assert shown == "local store postgresql://***@db.example:5432/mlflow"


def test_a_sqlite_store_written_from_several_machines_is_refused_naming_the_fix():
    from orchestrator.preflight import check_shared_sqlite

    uri = "sqlite:////shared/runs/mlflow.db"
    with pytest.raises(UserError, match=r"written from 2 machines \(10.0.0.1, 10.0.0.2\).*unimo mlflow"):
        check_shared_sqlite(uri, ["10.0.0.1", "10.0.0.2", "10.0.0.2"])
    check_shared_sqlite(uri, ["127.0.0.1", "127.0.0.1"])  # nodes of one machine share its disk
    check_shared_sqlite("http://mlflow:5000", ["10.0.0.1", "10.0.0.2"])  # a server is the fix
