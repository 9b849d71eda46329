"""Every storage client unimo builds, with its retry policy, in one place.

Four users talk to storage, each with the policy its job needs:
- reading shards, the tokenizer and listings (data_pipeline): fsspec (s3fs for ``s3://``), one attempt per
  request; ``data.io_retries`` with its backoff is the whole budget (the retry loops of storage_io.py);
- run storage: small files, listings, downloads (trainer/storage.py): fsspec with s3fs's own retries and no
  listings cache, because other writers change the run folder;
- the start-up check and the S3 run lock: a boto3 client, 3 attempts, 5 s to connect, so a wrong endpoint is
  reported in seconds;
- checkpoint uploads by Ray Train: a pyarrow S3 filesystem, ``checkpoint.upload_attempts`` tries per request,
  kept through the pickle that takes it to the workers.

Credentials are never passed here: boto, s3fs and pyarrow find them in the environment, the profile or the
instance role. The endpoint comes from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (read once, by
``endpoint_url``). This module sits in the lowest layer so that the data pipeline and the trainer share it.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # boto's order: the S3-specific one wins
CREDENTIALS_HELP = ("credentials are found by boto: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
                    "the default profile in ~/.aws/credentials (AWS_SHARED_CREDENTIALS_FILE), then the "
                    "container/instance role; the endpoint comes from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL")


def endpoint_url() -> str | None:
    """The S3 endpoint boto would use; None means AWS itself."""
    for var in ENDPOINT_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return None


def fsspec_filesystem(url: str, *, one_attempt: bool, listings_cache: bool = True):
    """(fsspec filesystem, path) for ``url``. ``one_attempt``: each S3 request is tried once (the caller's own
    retry loop is the budget); otherwise s3fs and botocore retry as they do by default. ``listings_cache``:
    False where other writers change what is listed (a cached listing hands s3fs an old ETag, which it sends
    as If-Match, so reading an object rewritten since fails with PreconditionFailed)."""
    import fsspec

    options: dict = {}
    if url.startswith("s3://"):
        if one_attempt:
            # botocore's `max_attempts: 2` meant 3 attempts (it counts retries) with sleeps of up to 1 s for
            # each of a listing's 2 requests: 3.4 s per listing attempt against a refused endpoint.
            options["config_kwargs"] = {"retries": {"total_max_attempts": 1, "mode": "standard"}}
        if not listings_cache:
            options["use_listings_cache"] = False
        if endpoint_url():
            # Named explicitly so fsspec's instance cache never hands back a filesystem made for another
            # endpoint (the environment changed since: a test's S3 server, or a process that talks to two).
            options["endpoint_url"] = endpoint_url()
    fs, path = fsspec.core.url_to_fs(url, **options)
    if one_attempt and url.startswith("s3://"):
        fs.retries = 1  # s3fs's own loop retries each call 5 times around botocore's attempts
    return fs, path


def s3_client():
    """A boto3 S3 client that fails fast (the start-up check and the run lock)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint_url(),
                        config=Config(connect_timeout=5, read_timeout=30,
                                      retries={"max_attempts": 3, "mode": "standard"}))


def _rebuild(attempts: int, options: dict):
    return _retrying_s3_class()(attempts, **options)


_RETRYING_S3 = None


def _retrying_s3_class():
    """pyarrow's S3 filesystem with a retry budget that survives pickling. Ray Train pickles the run's storage
    filesystem to its controller and workers, and pyarrow's ``S3FileSystem.__reduce__`` drops
    ``retry_strategy`` (pyarrow 25: the rebuilt filesystem is back at the default of 3 attempts, which gave up
    on a 2-second S3 outage after 0.6 s). The subclass carries the attempt count through the pickle and sets
    it again. Built on first use so that importing this module does not import pyarrow."""
    global _RETRYING_S3
    if _RETRYING_S3 is None:
        import pyarrow.fs

        class RetryingS3FileSystem(pyarrow.fs.S3FileSystem):
            """An S3FileSystem whose every request is tried ``attempts`` times with the AWS standard
            backoff."""

            def __init__(self, attempts: int, **options):
                super().__init__(retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=attempts),
                                 **options)
                self.attempts = attempts

            def __reduce__(self):
                _, (options,) = super().__reduce__()  # pyarrow's own (S3FileSystem._reconstruct, (options,))
                return _rebuild, (self.attempts, options)

        _RETRYING_S3 = RetryingS3FileSystem
    return _RETRYING_S3


def upload_filesystem(s3_url: str, attempts: int):
    """(path, pyarrow filesystem) through which Ray Train uploads checkpoints to ``s3_url``. pyarrow 25 does
    not read AWS_ENDPOINT_URL (checked: it resolves the bucket at *.amazonaws.com), so the endpoint is passed
    here; keys stay in the environment, where pyarrow's default credential chain finds them on every
    worker."""
    url = urlparse(s3_url)
    options: dict = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                     or "us-east-1"}
    endpoint = endpoint_url()
    if endpoint:
        parsed = urlparse(endpoint)
        options.update(endpoint_override=parsed.netloc + parsed.path.rstrip("/"),
                       scheme=parsed.scheme or "https")
    return f"{url.netloc}{url.path}".rstrip("/"), _retrying_s3_class()(attempts, **options)
