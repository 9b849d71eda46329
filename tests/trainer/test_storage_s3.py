"""Unit tests of run storage on S3 (moto's server on loopback): small files, checkpoint listing, verification,
torn-checkpoint skipping, retention, Ray's pyarrow filesystem and the start-up check's errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.integration.services import FAKE_AWS, s3_server, upload_folder
from tests.trainer.test_checkpoint import make_checkpoint
from trainer import checkpoint as ckpt
from trainer import storage

# Integration tier: moto's S3 server on loopback.
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bucket():
    """A fresh S3 server with the bucket ``unit``; yields the boto3 client."""
    import boto3

    with s3_server():
        client = boto3.client("s3")
        client.create_bucket(Bucket="unit")
        yield client


def upload(local, url):
    """Uploads with boto3, not through storage's own s3fs filesystem: in a run the checkpoints are written by
    another client (Ray's pyarrow), so no cache of ours may learn about them from the upload."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    upload_folder(Path(local), bucket, prefix.rstrip("/"))


def test_small_files_round_trip(bucket):
    url = "s3://unit/small/run/STOP"
    assert storage.read_text(url) is None and not storage.exists(url)
    storage.write_text(url, "SIGTERM\n")
    assert storage.exists(url) and storage.read_text(url) == "SIGTERM\n"
    storage.delete(url)
    storage.delete(url)  # a missing file is not an error
    assert not storage.exists(url)


def test_listing_skips_torn_checkpoints_and_names_them(bucket, tmp_path, caplog):
    root = "s3://unit/list/run/checkpoints"
    for step in (10, 20, 30):
        make_checkpoint(tmp_path / "src", step)
    (tmp_path / "src" / "step_00000030" / "manifest.json").unlink()  # an upload that never finished
    # A flipped byte in step 20: same size, wrong checksum.
    (tmp_path / "src" / "step_00000020" / "ds/zero_pp_rank_0_model_states.pt").write_bytes(b"abd" * 100)
    upload(tmp_path / "src", root)
    assert [c.step for c in ckpt.list_step_dirs(root)] == [30, 20, 10]
    with caplog.at_level(logging.WARNING):
        found = ckpt.newest_valid(root, cache_dir=tmp_path / "cache")
    assert found.step == 10 and (found.path / "manifest.json").is_file()  # a verified local copy
    assert f"{root}/step_00000030 has no manifest.json" in caplog.text
    assert f"{root}/step_00000020: file ds/zero_pp_rank_0_model_states.pt fails its checksum" in caplog.text
    # torn copy gone
    assert not any(p.name.startswith("step_00000020") for p in (tmp_path / "cache").iterdir())


def test_a_rewritten_step_folder_is_downloaded_again(bucket, tmp_path):
    root = "s3://unit/rewrite/checkpoints"
    upload(make_checkpoint(tmp_path / "a", 10).parent, root)
    first = ckpt.checked_local_copy(f"{root}/step_00000010", tmp_path / "cache")
    upload(make_checkpoint(tmp_path / "b", 10, {"trainer_state.json": b'{"new": 1}'}).parent, root)
    second = ckpt.checked_local_copy(f"{root}/step_00000010", tmp_path / "cache")
    assert first != second and (second / "trainer_state.json").read_bytes() == b'{"new": 1}'


def test_retention_deletes_on_s3_and_never_an_unfinished_upload(bucket, tmp_path):
    root = "s3://unit/prune/checkpoints"
    for step in (10, 20, 30, 40):
        make_checkpoint(tmp_path / "src", step)
    (tmp_path / "src" / "step_00000050" / "ds").mkdir(parents=True)
    (tmp_path / "src" / "step_00000050" / "ds" / "part").write_bytes(b"x")  # still uploading: no manifest
    upload(tmp_path / "src", root)
    removed = ckpt.prune(root, keep_last=1, keep_every=20)
    assert sorted(removed) == [f"{root}/step_00000010", f"{root}/step_00000030"]
    assert [c.step for c in ckpt.list_step_dirs(root)] == [50, 40, 20]
    keys = [o["Key"] for o in bucket.list_objects_v2(Bucket="unit", Prefix="prune/")["Contents"]]
    assert not any("step_00000010" in k or "step_00000030" in k for k in keys)


def test_ray_filesystem_reaches_the_same_bucket(bucket):
    path, fs = storage.ray_storage("s3://unit/ray/run")
    assert path == "unit/ray/run"
    with fs.open_output_stream(f"{path}/checkpoints/x.txt") as out:
        out.write(b"from pyarrow")
    assert storage.read_text("s3://unit/ray/run/checkpoints/x.txt") == "from pyarrow"
    assert storage.url_of_ray_path(f"{path}/checkpoints", fs) == "s3://unit/ray/run/checkpoints"
    assert storage.ray_storage("/tmp/runs/r") == ("/tmp/runs/r", None)


def test_missing_bucket_is_named(bucket):
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist") as err:
        storage.check_writable("s3://no-such-bucket/runs/r")
    assert "s3://no-such-bucket/runs/r" in str(err.value)
    storage.check_writable("s3://unit/runs/r")  # the bucket exists: no error


def test_unreachable_endpoint_names_the_url_and_what_to_set(monkeypatch):
    from tests.integration.services import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    for key, value in FAKE_AWS.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(storage.StorageError) as err:
        storage.check_writable("s3://some-bucket/runs/r")
    message = str(err.value)
    assert ("s3://some-bucket/runs/r" in message
            and "cannot reach the S3 endpoint http://127.0.0.1:" in message)
    assert "AWS_ENDPOINT_URL" in message and FAKE_AWS["AWS_SECRET_ACCESS_KEY"] not in message


def test_join_keeps_the_url_spelling():
    assert storage.join("s3://b/p/", "run", "/STOP") == "s3://b/p/run/STOP"
    assert storage.parent_of("s3://b/p/run/checkpoints/step_00000001") == "s3://b/p/run/checkpoints"
    assert ckpt.step_of("s3://b/p/run/checkpoints/step_00000012/") == 12


def test_download_shows_bytes_of_the_total_only_when_asked(tmp_path, capsys):
    """A checkpoint download from S3 draws a bar of bytes (total and ETA) on a terminal, nothing elsewhere."""
    import boto3

    from tests.integration.services import s3_server
    from trainer import storage

    with s3_server():
        capsys.readouterr()  # moto's start-up line
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="dlbucket")
        s3.put_object(Bucket="dlbucket", Key="ckpt/a.bin", Body=b"x" * 3000)
        s3.put_object(Bucket="dlbucket", Key="ckpt/ds/b.bin", Body=b"y" * 2000)
        storage.download("s3://dlbucket/ckpt", tmp_path / "quiet")  # captured stderr is not a terminal
        assert capsys.readouterr().err == ""
        storage.download("s3://dlbucket/ckpt", tmp_path / "shown", progress=True)
        err = capsys.readouterr().err
    assert "download ckpt" in err and "5.00k/5.00k" in err  # every byte of both files, of the listed total
    for copy in ("quiet", "shown"):
        assert (tmp_path / copy / "a.bin").read_bytes() == b"x" * 3000
        assert (tmp_path / copy / "ds" / "b.bin").read_bytes() == b"y" * 2000


def test_a_torn_step_folder_is_moved_aside_and_the_run_snapshot_reconciled_on_s3(bucket, tmp_path):
    """What a resume from an older checkpoint does on S3: the torn folder is kept under a name that is no step
    folder (a server-side copy, then a delete) and Ray's run snapshot forgets it."""
    import json

    from trainer.checkpointing.manager import aside_name
    from trainer.checkpointing.records import SNAPSHOT, reconcile_ray_snapshot

    root = "s3://unit/aside/run/checkpoints"
    for step in (10, 20):
        make_checkpoint(tmp_path / "src", step)
    upload(tmp_path / "src", root)
    snapshot = {"checkpoint_results": [{"version": 0, "checkpoint_dir_name": n, "metrics": {}}
                                       for n in ("step_00000010", "step_00000020")],
                "checkpoint_report_indices": [0, 1], "current_report_index": 2,
                "latest_checkpoint_result": {"version": 0, "checkpoint_dir_name": "step_00000020",
                                             "metrics": {}}}
    storage.write_text(f"{root}/{SNAPSHOT}", json.dumps(snapshot))
    dest = f"{root}/{aside_name(f'{root}/step_00000020', 'torn')}"
    storage.move(f"{root}/step_00000020", dest)
    assert [c.step for c in ckpt.list_step_dirs(root)] == [10]
    assert (storage.exists(f"{dest}/manifest.json")
            and storage.exists(f"{dest}/ds/zero_pp_rank_0_model_states.pt"))
    assert reconcile_ray_snapshot(root) and reconcile_ray_snapshot(root) == []
    snapshot = json.loads(storage.read_text(f"{root}/{SNAPSHOT}"))
    assert snapshot["latest_checkpoint_result"]["checkpoint_dir_name"] == "step_00000010"
