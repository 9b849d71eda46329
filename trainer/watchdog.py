"""A watchdog that ends the worker when a step makes no progress for too long (hung collective, stalled read).

Without it a stuck rank waits on the collective timeout (30 minutes by default); ending the process lets Ray's
failure policy restart the group from the last checkpoint within the configured timeout instead.
"""

from __future__ import annotations

import os
import sys
import threading
import time


class Watchdog:
    def __init__(self, timeout_s: float, name: str = "worker", exit_code: int = 70, on_expire=None):
        self.timeout_s = timeout_s
        self.name = name
        self.exit_code = exit_code
        self._on_expire = on_expire or self._exit
        self._last = time.monotonic()
        self._paused = False
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="unimo-watchdog", daemon=True)

    def start(self) -> None:
        self._last = time.monotonic()
        self._thread.start()

    def beat(self) -> None:
        self._last = time.monotonic()

    def pause(self) -> None:
        """Checkpoint saves can legitimately take long; they are not steps."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self.beat()

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        period = min(5.0, max(0.05, self.timeout_s / 10))
        while not self._stopped.wait(period):
            idle = time.monotonic() - self._last
            if not self._paused and idle > self.timeout_s:
                self._on_expire(idle)
                return

    def _exit(self, idle: float) -> None:
        sys.stderr.write(f"[unimo watchdog] {self.name}: no training progress for {idle:.0f}s "
                         f"(limit train.watchdog_seconds={self.timeout_s:.0f}); a collective is hung or a read "
                         "stalled. Ending this worker so the job restarts from its last checkpoint.\n")
        sys.stderr.flush()
        os._exit(self.exit_code)
