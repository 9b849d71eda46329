"""Fixtures of the data pipeline tests: an S3 server (moto) on 127.0.0.1 and small synthetic datasets."""

import logging

import pytest

from tests.integration.services import S3Server

logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request drowns real output

BUCKET = "unimo-test"


@pytest.fixture(scope="session")
def s3_server():
    """An S3 server on loopback; the environment points boto at it with fake keys for the session."""
    server = S3Server()
    server.start()
    mp = pytest.MonkeyPatch()
    for key, value in {"AWS_ENDPOINT_URL": server.url, "AWS_ACCESS_KEY_ID": "testing-key-id",
                       "AWS_SECRET_ACCESS_KEY": "testing-secret-value", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():
        mp.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        mp.delenv(key, raising=False)
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield server
    mp.undo()
    server.stop()


@pytest.fixture(scope="session")
def s3_data(s3_server):
    """A small synthetic dataset on the S3 server: 8 shards of 10 samples per source."""
    from data_pipeline import write_synthetic_dataset

    return write_synthetic_dataset(f"s3://{BUCKET}/small", n_pairs=80, n_text=40, n_images=80, n_eval=20,
                                   samples_per_shard=10, image_size=16, seed=3)


@pytest.fixture(scope="session")
def local_data(tmp_path_factory):
    from data_pipeline import write_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_dataset(str(root), n_pairs=80, n_text=40, n_images=80, n_eval=20,
                                   samples_per_shard=10, image_size=16, seed=3)
