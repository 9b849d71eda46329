"""The driver's stop request: a STOP file in the run's folder or S3 prefix, polled by rank 0."""

from __future__ import annotations

import logging
import time

from trainer import storage

log = logging.getLogger(__name__)

STOP_FILE = "STOP"
# On S3 the STOP file costs a request: rank 0 looks at most this often (a preemption notice gives ~30 s).
REMOTE_STOP_POLL_S = 2.0


class StopFile:
    """Whether the driver has asked for a stop (it drops STOP on SIGTERM); a STOP seen once stays seen."""

    def __init__(self, run_location: str | None):
        self.path = storage.join(run_location, STOP_FILE) if run_location else None
        self._seen = False
        self._polled = float("-inf")

    def requested(self) -> bool:
        if self._seen or self.path is None:
            return self._seen
        now = time.monotonic()
        if storage.is_remote(self.path):
            if now - self._polled < REMOTE_STOP_POLL_S:
                return False
            self._polled = now
        try:
            self._seen = storage.exists(self.path)
        except OSError as err:  # an S3 hiccup must not end the run: the next poll asks again
            log.warning("could not check %s: %s", self.path, err)
        return self._seen
