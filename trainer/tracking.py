"""MLflow logging from rank 0: metrics are queued by the step loop and sent in batches by a background thread.

One ``log_metric`` call costs ~50 ms against a server, so the step loop only appends to a queue; the thread
sends ``log_batch`` every ``flush_seconds``. When the server is unreachable the batch stays in the buffer and is
retried with backoff, so an outage delays metrics but loses none (unless the process dies).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call


class MetricLogger:
    """Buffered, asynchronous metric logging to one MLflow run."""

    def __init__(self, tracking_uri: str, run_id: str, flush_seconds: float = 2.0, client: Any = None):
        if client is None:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=tracking_uri)
        self._client = client
        self._run_id = run_id
        self._flush_seconds = flush_seconds
        self._pending: deque = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self.delivered = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="mlflow-logger", daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Queues metrics of one step; never blocks on the network."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        with self._lock:
            for key, value in metrics.items():
                self._pending.append(Metric(key=key, value=float(value), timestamp=ts, step=step))

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _take(self) -> list:
        with self._lock:
            return [self._pending[i] for i in range(min(MAX_BATCH, len(self._pending)))]

    def _drop(self, n: int) -> None:
        with self._lock:
            for _ in range(n):
                self._pending.popleft()

    def _send_some(self) -> bool:
        """Sends one batch; returns False when the server refused or was unreachable."""
        batch = self._take()
        if not batch:
            return True
        try:
            self._client.log_batch(self._run_id, metrics=batch, synchronous=True)
        except TypeError:  # older MLflow without the synchronous argument
            self._client.log_batch(self._run_id, metrics=batch)
        except Exception as err:  # noqa: BLE001 - any transport error means "keep and retry"
            self.failures += 1
            if self.failures == 1 or self.failures % 10 == 0:
                log.warning("MLflow unreachable (%s); %d metrics buffered, will retry", type(err).__name__,
                            self.pending())
            return False
        self._drop(len(batch))
        self.delivered += len(batch)
        return True

    def _run(self) -> None:
        backoff = self._flush_seconds
        while True:
            self._wake.wait(timeout=backoff)
            self._wake.clear()
            ok = True
            while ok and self.pending():
                ok = self._send_some()
            backoff = self._flush_seconds if ok else min(backoff * 2, 30.0)
            if self._stop and (not self.pending() or not ok):
                return

    def flush(self, timeout: float = 30.0) -> bool:
        """Delivers everything queued; returns whether the buffer emptied within ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.pending() and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.05)
        return not self.pending()

    def close(self, timeout: float = 60.0) -> bool:
        ok = self.flush(timeout)
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)
        if not ok:
            log.error("MLflow: %d metrics could not be delivered before shutdown", self.pending())
        return ok
