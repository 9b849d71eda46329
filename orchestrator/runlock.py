"""The run lock: one live driver per run name, held by a heartbeat lock file in <storage>/<run>/run.lock."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
# A driver refreshes its lock this often; a lock whose heartbeat is older than STALE_AFTER_S belongs to a
# driver that died on another machine (F3). On the same machine a dead pid frees the lock at once.
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0


class RunLocked(RuntimeError):
    """The run is held by another live driver."""


@dataclass
class LockOwner:
    """What the lock file holds: who owns the run and when it last said so."""

    token: str  # unique per acquisition: tells "my lock" from "a lock someone took over"
    host: str
    pid: int
    pid_started: float  # process start time, so a reused pid is not mistaken for the owner
    acquired: float
    heartbeat: float

    @classmethod
    def for_this_process(cls, now: float) -> "LockOwner":
        return cls(token=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(),
                   pid_started=process_start_time(os.getpid()) or 0.0, acquired=now, heartbeat=now)

    def describe(self, now: float) -> str:
        return (f"host {self.host}, pid {self.pid}, since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.acquired))}, "
                f"last heartbeat {now - self.heartbeat:.0f}s ago")


def process_start_time(pid: int) -> float | None:
    """Start time of a live process (None if it does not exist)."""
    import psutil  # a Ray dependency, so always present where the driver runs

    try:
        proc = psutil.Process(pid)
        # A killed driver whose parent has not reaped it yet is a zombie: gone for our purposes.
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return 0.0  # alive but not ours to inspect


def _owner_process_gone(owner: LockOwner) -> bool:
    if owner.host != socket.gethostname():
        return False  # another machine: only the heartbeat can tell
    started = process_start_time(owner.pid)
    if started is None:
        return True
    # A different start time means the pid was reused by an unrelated process.
    return bool(owner.pid_started and started and abs(started - owner.pid_started) > 1.0)


class RunLock:
    """Exclusive ownership of one run directory; see module docstring and docs/ORCHESTRATION.md."""

    def __init__(self, run_dir: str | Path, *, stale_after: float = STALE_AFTER_S, heartbeat: float = HEARTBEAT_S,
                 clock: Callable[[], float] = time.time):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.stale_after = stale_after
        self.heartbeat_s = heartbeat
        self.clock = clock
        self.owner: LockOwner | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----- reading ----------------------------------------------------------------------------------------
    def read(self) -> LockOwner | None:
        """The current owner; None if there is no lock. An unreadable file (a crash mid-write) gets an owner
        with no pid whose heartbeat is the file's mtime, so it goes stale like any other."""
        try:
            text = self.path.read_text()
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            return LockOwner(**json.loads(text))
        except (ValueError, TypeError):
            return LockOwner(token=f"unreadable-{mtime}", host="?", pid=-1, pid_started=0.0, acquired=mtime,
                             heartbeat=mtime)

    def stale_reason(self, owner: LockOwner) -> str | None:
        """Why ``owner`` no longer holds the run (None: it is live)."""
        age = self.clock() - owner.heartbeat
        if age > self.stale_after:
            return f"no heartbeat for {age:.0f}s (> {self.stale_after:.0f}s)"
        if owner.pid > 0 and _owner_process_gone(owner):
            return f"its driver (pid {owner.pid}) is no longer running on this host"
        return None

    # ----- acquiring --------------------------------------------------------------------------------------
    def acquire(self) -> "RunLock":
        """Takes the lock or raises RunLocked naming the owner; a stale lock is taken over with a warning."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            mine = LockOwner.for_this_process(self.clock())
            if self._create(mine):
                self.owner = mine
                return self
            current = self.read()
            if current is None:
                continue  # released between our attempt and the read: try again
            reason = self.stale_reason(current)
            if reason is None:
                raise RunLocked(
                    f"run {self.run_dir.name} is locked by a live driver ({current.describe(self.clock())}); "
                    f"lock file {self.path}. Wait for that job to end or stop it (`unimo jobs stop JOB`); a lock "
                    f"whose driver died frees itself after {self.stale_after:.0f}s without heartbeat.")
            if self._take_over(current, mine, reason):
                self.owner = mine
                return self
        raise RunLocked(f"run {self.run_dir.name}: could not take the lock {self.path} (contended); retry")

    def _create(self, owner: LockOwner) -> bool:
        # Written whole to a private file, then hard-linked into place: link() fails if the lock exists, and
        # a reader never sees a half-written lock.
        tmp = self.path.with_name(f"{LOCK_FILE}.{owner.token}.tmp")
        tmp.write_text(json.dumps(asdict(owner)))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, stale: LockOwner, mine: LockOwner, reason: str) -> bool:
        """Replaces a stale lock; a marker named by the stale token lets only one contender do so."""
        marker = self.path.with_name(f"{LOCK_FILE}.takeover.{stale.token}")
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        os.close(fd)
        try:
            again = self.read()
            if again is None or again.token != stale.token:
                return False  # someone else took it over (or released it) meanwhile
            self._write(mine)
            log.warning("took over the stale lock of run %s (%s; was %s)", self.run_dir.name, reason,
                        stale.describe(self.clock()))
            return True
        finally:
            marker.unlink(missing_ok=True)

    def _write(self, owner: LockOwner) -> None:
        tmp = self.path.with_name(f"{LOCK_FILE}.{owner.token}.tmp")
        tmp.write_text(json.dumps(asdict(owner)))
        os.replace(tmp, self.path)

    # ----- holding ----------------------------------------------------------------------------------------
    def refresh(self) -> bool:
        """One heartbeat; False (and ``lost`` set) if another driver has taken the lock over."""
        if self.owner is None:
            return False
        current = self.read()
        if current is None or current.token != self.owner.token:
            self.lost.set()
            return False
        self.owner.heartbeat = self.clock()
        self._write(self.owner)
        return True

    def start_heartbeat(self, on_lost: Callable[[], None] | None = None) -> "RunLock":
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    ok = self.refresh()
                except OSError as err:  # storage hiccup: keep trying; staleness needs many missed beats
                    log.warning("run lock heartbeat failed: %s", err)
                    continue
                if not ok:
                    log.error("lost the lock of run %s to another driver; this driver must stop",
                              self.run_dir.name)
                    if on_lost is not None:
                        on_lost()
                    return

        self._thread = threading.Thread(target=beat, name="unimo-runlock", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stops the heartbeat and removes the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.owner is None:
            return
        current = self.read()
        if current is not None and current.token == self.owner.token:
            self.path.unlink(missing_ok=True)
        self.owner = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
