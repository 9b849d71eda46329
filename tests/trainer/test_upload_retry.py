"""S3 outage in checkpoint uploads: the filesystem Ray Train uploads through retries, keeps its retry budget
across the pickle that carries it to the workers, and after the budget fails naming the key and bucket.

The S3 server is moto's on loopback (real HTTP through pyarrow's AWS SDK), stopped and started again on the
same port for the outage.
"""

from __future__ import annotations

import os
import pickle
import threading

import pytest

from tests.integration.services import S3Server
from trainer import storage

pytestmark = pytest.mark.integration
OUTAGE_S = 6.0


@pytest.fixture
def server(monkeypatch):
    srv = S3Server()
    srv.start()
    env = {"AWS_ENDPOINT_URL": srv.url, "AWS_ACCESS_KEY_ID": "testing-key-id",
           "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_SECRET_ACCESS_KEY": "testing-secret-value", "AWS_EC2_METADATA_DISABLED": "true"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(key, raising=False)
    import boto3

    boto3.client("s3").create_bucket(Bucket="ckpt")
    yield srv
    srv.stop()


@pytest.fixture
def folder(tmp_path):
    """A checkpoint-like folder: one file large enough for a multipart upload, one small."""
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "shard.pt").write_bytes(os.urandom(12 << 20))
    (tmp_path / "manifest.json").write_text('{"files": {}}')
    return tmp_path


def upload_during_outage(folder, fs, path: str, srv: S3Server, outage_s: float) -> None:
    import pyarrow.fs

    srv.stop()
    back = threading.Timer(outage_s, srv.start)
    back.start()
    try:
        pyarrow.fs.copy_files(str(folder), path, destination_filesystem=fs)
    finally:
        back.join()


def test_upload_survives_an_outage_with_the_budget_the_workers_get(server, folder):
    path, fs = storage.ray_storage("s3://ckpt/runs/r", attempts=10)
    fs = pickle.loads(pickle.dumps(fs))  # what Ray Train's controller and workers hold
    assert fs.attempts == 10
    upload_during_outage(folder, fs, f"{path}/step_1", server, outage_s=OUTAGE_S)
    import boto3

    got = boto3.client("s3").get_object(Bucket="ckpt", Key="runs/r/step_1/ds/shard.pt")["Body"].read()
    assert got == (folder / "ds" / "shard.pt").read_bytes()


def test_pyarrows_default_budget_loses_the_same_upload(server, folder):
    """The control: without our retry budget the same outage fails the upload (3 attempts back off at most
    about 3 s in all; 10 attempts up to about 110 s)."""
    import pyarrow.fs

    _, fs = storage.ray_storage("s3://ckpt/runs/r")
    plain = pyarrow.fs.S3FileSystem(region=fs.region, endpoint_override=server.url.split("//")[1],
                                    scheme="http")
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        upload_during_outage(folder, plain, "ckpt/runs/r/step_2", server, outage_s=OUTAGE_S)


def test_after_the_budget_the_upload_fails_naming_the_key(server, folder):
    import pyarrow.fs

    path, fs = storage.ray_storage("s3://ckpt/runs/r", attempts=2)
    server.stop()
    try:
        with pytest.raises(OSError, match=r"bucket 'ckpt'.*NETWORK_CONNECTION"):
            pyarrow.fs.copy_files(str(folder), f"{path}/step_3",
                                  destination_filesystem=pickle.loads(pickle.dumps(fs)))
    finally:
        server.start()
