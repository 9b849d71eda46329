"""pyarrow's S3 filesystem with a retry budget that survives pickling (checkpoint uploads through Ray Train).

Ray Train pickles the run's storage filesystem to its controller and workers, and pyarrow's
``S3FileSystem.__reduce__`` drops ``retry_strategy`` (pyarrow 25: the rebuilt filesystem is back at the default
of 3 attempts, which gave up on a 2-second S3 outage after 0.6 s here). This subclass carries the attempt count
through the pickle and sets it again on the other side.
"""

from __future__ import annotations

import pyarrow.fs


def _rebuild(attempts: int, options: dict) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(attempts, **options)


class RetryingS3FileSystem(pyarrow.fs.S3FileSystem):
    """An S3FileSystem whose every request is tried ``attempts`` times with the AWS SDK's standard backoff."""

    def __init__(self, attempts: int, **options):
        super().__init__(retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=attempts), **options)
        self.attempts = attempts

    def __reduce__(self):
        _, (options,) = super().__reduce__()  # pyarrow's own (S3FileSystem._reconstruct, (options,))
        return _rebuild, (self.attempts, options)
