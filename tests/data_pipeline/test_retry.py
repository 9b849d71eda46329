"""S3 outages during reads: reads retry with backoff and continue; after the budget, a clear error."""

import os
import threading
import time

import boto3
import pytest

from data_pipeline.storage_io import DataReadError, RetryingReader, RetryPolicy

from .conftest import BUCKET


@pytest.fixture
def s3_object(s3_server):
    data = os.urandom(64 * 1024)
    boto3.client("s3").put_object(Bucket=BUCKET, Key="retry/blob.bin", Body=data)
    return f"s3://{BUCKET}/retry/blob.bin", data


def test_read_survives_a_server_outage(s3_server, s3_object):
    url, data = s3_object
    reader = RetryingReader(url, RetryPolicy(retries=8, backoff_s=0.2, backoff_max_s=1.0), block_bytes=4096)
    head = reader.read(8192)
    s3_server.stop()
    restart = threading.Timer(1.5, s3_server.start)
    restart.start()
    try:
        rest = b""
        while chunk := reader.read(4096):
            rest += chunk
    finally:
        restart.join()
    assert head + rest == data  # botocore's per-request retries or our reopening ones bridged the outage


def test_read_fails_loudly_after_the_retry_budget(s3_server, s3_object):
    url, _ = s3_object
    reader = RetryingReader(url, RetryPolicy(retries=1, backoff_s=0.05, backoff_max_s=0.1), block_bytes=4096)
    reader.read(4096)
    s3_server.stop()
    try:
        with pytest.raises(DataReadError, match="blob.bin.*after 2 attempts"):
            while reader.read(4096):
                pass
    finally:
        s3_server.start()


def test_shard_listing_at_start_waits_out_an_outage(s3_server, s3_data):
    import s3fs

    from data_pipeline.storage_io import list_shards

    s3fs.S3FileSystem.clear_instance_cache()  # no listing cached from earlier tests: this one must ask S3
    s3_server.stop()
    restart = threading.Timer(1.5, s3_server.start)
    restart.start()
    t0 = time.monotonic()
    try:
        assert len(list_shards(s3_data["pair"])) == 8
        assert time.monotonic() - t0 > 1.4  # it did wait for the server to come back
    finally:
        restart.join()
