"""Unit tests of run storage on S3 (moto's server on loopback): small files, checkpoint listing, verification,
torn-checkpoint skipping, retention, Ray's pyarrow filesystem, the start-up check's errors, and a resuming
node's partial download (only the files its ranks read, each once per node)."""

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


def test_retention_on_s3_keeps_the_newest_checkpoint_whose_every_file_landed(bucket, tmp_path):
    from tests.trainer.test_checkpoint import rank_1_still_uploading

    root = "s3://unit/whole/checkpoints"
    make_checkpoint(tmp_path / "src", 4)
    rank_1_still_uploading(tmp_path / "src", 8)
    upload(tmp_path / "src", root)
    assert ckpt.files_present(f"{root}/step_00000004") and not ckpt.files_present(f"{root}/step_00000008")
    assert ckpt.prune(root, keep_last=2, keep_every=0, pending=12) == []
    assert [c.step for c in ckpt.list_step_dirs(root)] == [8, 4]


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


# ---- a resuming node downloads only what its ranks read ----------------------------------------------------
SHARD = "ds/zero_pp_rank_{}_mp_rank_00_{}_states.pt"


def _four_rank_checkpoint(root: Path) -> Path:
    """A step folder as 4 ZeRO-3 ranks write it (2 nodes of 2): each rank's model and optimizer shard and
    data cursor file, DeepSpeed's shared files, the elastic view, the trainer state and the manifest."""
    import json

    d = root / ckpt.step_dir_name(8)
    (d / "ds").mkdir(parents=True)
    for rank in range(4):
        for kind in ("model", "optim"):
            (d / SHARD.format(rank, kind)).write_bytes(bytes([rank + 1]) * 3000)
        (d / ckpt.RANK_STATE.format(rank=rank)).write_text(json.dumps({"rank": rank}))
    (d / "latest").write_text("ds")
    (d / "zero_to_fp32.py").write_text("# DeepSpeed's script\n")
    (d / ckpt.ELASTIC_VIEW).write_text("{}")
    (d / ckpt.STATE).write_text(json.dumps({"schema": ckpt.SCHEMA_VERSION, "step": 8, "world_size": 4}))
    ckpt.write_manifest(d, ckpt.describe_files(d), 8)
    return d


def _resume_two_nodes(location: str, cache: Path, monkeypatch, reads_everything=lambda local, state: False):
    """verify_part of ranks 0-1 (node a) and 2-3 (node b), each node with its own cache folder; returns
    ({rank: Part}, {node: [files it downloaded]}) (one GET each: every file is small)."""
    from trainer.checkpointing.verification import verify_part

    got: dict[str, list[str]] = {"a": [], "b": []}
    real = storage.download_file
    node = "a"

    def recording(url, dest):
        got[node].append(url.removeprefix(location + "/"))
        return real(url, dest)

    monkeypatch.setattr(storage, "download_file", recording)
    parts = {}
    for rank in range(4):
        node = "a" if rank < 2 else "b"
        parts[rank] = verify_part(location, cache / node, rank, reads_everything, world_size=4)
    return parts, got


def _own_files(ranks) -> set[str]:
    return {SHARD.format(r, k) for r in ranks for k in ("model", "optim")} | {
        ckpt.RANK_STATE.format(rank=r) for r in ranks}


def test_a_resuming_node_downloads_only_its_ranks_files(bucket, tmp_path, monkeypatch):
    root = "s3://unit/partial/run/checkpoints"
    upload(_four_rank_checkpoint(tmp_path / "src").parent, root)
    location = f"{root}/{ckpt.step_dir_name(8)}"
    parts, got = _resume_two_nodes(location, tmp_path / "cache", monkeypatch)
    assert all(p.problem is None for p in parts.values())
    shared = {"latest", "zero_to_fp32.py", ckpt.STATE}  # the manifest came with the GET that decides
    # each file once per node: no rank downloads what another rank of its node already has
    assert sorted(got["a"]) == sorted(shared | _own_files([0, 1]))
    assert sorted(got["b"]) == sorted(shared | _own_files([2, 3]))
    copy_b = parts[2].local
    on_disk = {p.relative_to(copy_b).as_posix() for p in copy_b.rglob("*") if p.is_file()}
    assert on_disk == shared | _own_files([2, 3]) | {ckpt.MANIFEST}  # no shard of node a's ranks
    # a worker-count change at the same world size reads the elastic view: it is fetched when asked for
    ckpt.fetch_into(copy_b, location, [ckpt.ELASTIC_VIEW])
    assert (copy_b / ckpt.ELASTIC_VIEW).read_text() == "{}"
    ckpt.drop_copy(copy_b)
    assert not copy_b.exists() and not any(p.name.startswith(copy_b.name) for p in copy_b.parent.iterdir())


def test_the_rank_that_converts_still_gets_every_file(bucket, tmp_path, monkeypatch):
    root = "s3://unit/partial-convert/run/checkpoints"
    d = _four_rank_checkpoint(tmp_path / "src")
    upload(d.parent, root)

    def first_of_node_converts(local, state):  # as CheckpointManager._reads_everything, for node a only
        return local.parent.name == "a"

    parts, got = _resume_two_nodes(f"{root}/{ckpt.step_dir_name(8)}", tmp_path / "cache", monkeypatch,
                                   first_of_node_converts)
    assert all(p.problem is None for p in parts.values())
    # node a: every file (but the manifest, read before), each once; node b: only its ranks' part
    assert sorted(got["a"]) == sorted(set(ckpt.read_manifest(d)["files"]))
    assert sorted(got["b"]) == sorted({"latest", "zero_to_fp32.py", ckpt.STATE} | _own_files([2, 3]))


def test_a_torn_file_is_caught_by_the_rank_that_reads_it_and_sizes_by_every_rank(bucket, tmp_path,
                                                                                   monkeypatch):
    """Rank 3's optimizer shard torn on S3: node a never downloads it, rank 3 finds it (the agreement,
    verification.findings, then makes every rank skip the checkpoint); a truncated one is found by every
    rank from the node's listing, without downloading it."""
    root = "s3://unit/partial-torn/run/checkpoints"
    d = _four_rank_checkpoint(tmp_path / "src")
    torn = SHARD.format(3, "optim")
    (d / torn).write_bytes(bytes([9]) * 3000)  # same size, other content: only rank 3's hash sees it
    upload(d.parent, root)
    location = f"{root}/{ckpt.step_dir_name(8)}"
    parts, got = _resume_two_nodes(location, tmp_path / "cache", monkeypatch)
    assert [r for r, p in parts.items() if p.problem] == [3]  # the ranks whose vote skips the checkpoint
    assert parts[3].problem == f"checkpoint {location}: file {torn} fails its checksum"
    assert torn not in got["a"]

    (d / torn).write_bytes(b"cut")  # a truncated upload
    upload(d.parent, root)
    parts, got = _resume_two_nodes(location, tmp_path / "cache2", monkeypatch)
    assert all(p.problem == f"checkpoint {location}: file {torn} has size 3, manifest says 3000"
               for p in parts.values())
    assert torn not in got["a"] + got["b"]


def test_an_s3_outage_is_an_oserror_that_the_stop_poll_and_the_failure_policy_ride_out(bucket, monkeypatch,
                                                                                       caplog):
    """S3 unreachable (every connection reset by the fault campaign's outage switch in front of moto): a
    remote call fails, after the client's own retries, with StorageUnreachable, an OSError naming the
    location. So the stop-file poll answers "no stop yet" and the failure policy "no progress seen" instead
    of raising: before, botocore's EndpointConnectionError (no OSError) escaped both, and a 45 s outage ended
    the campaign's job (the controller's failure decision raised). Once S3 answers again, so does storage."""
    import os

    from orchestrator.failure_policy import newest_saved_step
    from tests.integration.outage_proxy import OutageProxy
    from trainer.checkpointing.stop import StopFile

    storage.write_text("s3://unit/outage/run/STOP", "stop")
    with OutageProxy(int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        proxy.outage()
        with caplog.at_level(logging.WARNING):
            assert StopFile("s3://unit/outage/run").requested() is False
            assert newest_saved_step("s3://unit/outage/run/checkpoints") == -1
        assert "could not check s3://unit/outage/run/STOP: cannot reach run storage" in caplog.text
        assert "could not list s3://unit/outage/run/checkpoints: cannot reach run storage" in caplog.text
        assert proxy.refused > 2  # the clients retried through the outage before giving up
        proxy.restore()
        assert StopFile("s3://unit/outage/run").requested() is True


def test_retention_that_cannot_reach_s3_warns_and_the_save_goes_on(bucket, tmp_path, monkeypatch, caplog,
                                                                   one_rank_group):
    """Rank 0's retention after a save lists and deletes on S3 with s3fs's short retries, while the save's
    upload has a budget of about a minute and a half: in an outage longer than the former, retention warns and
    the save returns (it used to raise out of the training loop and fail the worker group); the next save
    prunes what this one could not."""
    import os

    from tests.integration.outage_proxy import OutageProxy
    from tests.trainer.checkpoint_fakes import StubEngine, StubLoader
    from tests.trainer.test_checkpoint_state import _manager

    run = "s3://unit/retention/run"
    for step in (1, 2, 3):  # three complete checkpoints: keep_last=2 deletes one
        make_checkpoint(tmp_path, step=step)
        upload(tmp_path / ckpt.step_dir_name(step), f"{run}/checkpoints/{ckpt.step_dir_name(step)}")
    manager = _manager(["checkpoint.keep_last=2", "checkpoint.async_upload=false"])
    manager.run_location = run
    with OutageProxy(int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        proxy.outage()
        with caplog.at_level(logging.WARNING):
            manager.save(4, StubEngine(), StubLoader(), {}, {})  # returns: no exception
        assert "retention after the save of step 4 could not reach s3://unit/retention/run/checkpoints" \
            in caplog.text
        proxy.restore()
        assert [c.step for c in ckpt.list_step_dirs(f"{run}/checkpoints")] == [3, 2, 1]  # nothing deleted
        manager.prune()  # S3 back: what the save could not do
        assert [c.step for c in ckpt.list_step_dirs(f"{run}/checkpoints")] == [3, 2]
