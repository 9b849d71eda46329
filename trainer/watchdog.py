"""A watchdog that ends the worker when training makes no progress for too long (hung collective, stalled
read).

Without it a stuck rank waits on the collective timeout (30 minutes by default, and a peer that is frozen
rather than dead may never trip it); ending the process lets Ray's failure policy restart the group from the
last checkpoint within the configured timeout instead.

Steps are held to ``train.watchdog_seconds``. The phases that are not steps and can legitimately take much
longer (start-up: engine build and checkpoint restore; evaluation; a checkpoint save) run under ``phase()``
with their own, longer limit (``train.watchdog_phase_seconds``): a collective that hangs inside a save or a
restore still ends the worker, with a message naming the phase, instead of waiting forever on a paused
watchdog.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Callable, Iterator

STEP_SETTING = "train.watchdog_seconds"
PHASE_SETTING = "train.watchdog_phase_seconds"


class Watchdog:
    def __init__(self, timeout_s: float, name: str = "worker", exit_code: int = 70,
                 on_expire: Callable[[float, str], None] | None = None, phase_timeout_s: float | None = None):
        self.timeout_s = timeout_s
        self.phase_timeout_s = phase_timeout_s if phase_timeout_s is not None else timeout_s
        self.name = name
        self.exit_code = exit_code
        self._on_expire = on_expire or self._exit
        self._last = time.monotonic()
        # (what is running, its limit, the setting that sets it): read by the watch thread as one tuple, so it
        # never sees a phase's name with the step's limit
        self._current = ("a training step", timeout_s, STEP_SETTING)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="unimo-watchdog", daemon=True)

    def start(self) -> None:
        self._last = time.monotonic()
        if not self._thread.is_alive():
            self._thread.start()

    def beat(self) -> None:
        self._last = time.monotonic()

    @contextlib.contextmanager
    def phase(self, what: str) -> Iterator[None]:
        """Runs the block under the phase limit; the step limit (and a fresh beat) is back afterwards, also
        when the block raised."""
        previous = self._current
        self._current = (what, self.phase_timeout_s, PHASE_SETTING)
        self.beat()
        try:
            yield
        finally:
            self.beat()  # first: the watch thread must not see the step limit against the phase's last beat
            self._current = previous

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        while True:
            _, limit, _ = self._current
            if self._stopped.wait(min(5.0, max(0.05, limit / 10))):
                return
            what, limit, setting = self._current
            idle = time.monotonic() - self._last
            if idle > limit:
                self._on_expire(idle, f"no progress in {what} for {idle:.0f}s (limit {setting}={limit:.0f})")
                return

    def _exit(self, idle: float, why: str) -> None:
        sys.stderr.write(f"[unimo watchdog] {self.name}: {why}; a collective is hung or a read stalled. "
                         "Ending this worker so the job restarts from its last checkpoint.\n")
        sys.stderr.flush()
        os._exit(self.exit_code)
