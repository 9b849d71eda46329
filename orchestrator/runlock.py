"""The run lock: one live driver per run name, held by a heartbeat lock file in <storage>/<run>/run.lock.

On a local or shared file system the lock is created with link() (fails if it exists); on ``s3://`` storage it
is an object written with S3's conditional writes (If-None-Match to create, If-Match on the ETag to heartbeat,
take over or delete), which S3 applies atomically, so two drivers on different machines cannot both hold a
run.
"""

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

from trainer.storage import join, name_of, s3_client

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
# A driver refreshes its lock this often; a lock whose heartbeat is older than STALE_AFTER_S belongs to a
# driver that died on another machine (docs/RELIABILITY.md). On the same machine a dead pid frees it at once.
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
        since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.acquired))
        return (f"host {self.host}, pid {self.pid}, since {since}, "
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

    def __new__(cls, run_dir: str | Path, **kwargs):
        # RunLock("s3://bucket/prefix/run") is the S3 lock: callers need not know where the run lives.
        if cls is RunLock and str(run_dir).startswith("s3://"):
            return super().__new__(S3RunLock)
        return super().__new__(cls)

    def __init__(self, run_dir: str | Path, *, stale_after: float = STALE_AFTER_S,
                 heartbeat: float = HEARTBEAT_S, clock: Callable[[], float] = time.time):
        self.name = name_of(run_dir)
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.where = str(self.path)
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
        loaded = self._load()
        if loaded is None:
            return None
        text, mtime = loaded
        try:
            return LockOwner(**json.loads(text))
        except (ValueError, TypeError):
            return LockOwner(token=f"unreadable-{mtime}", host="?", pid=-1, pid_started=0.0, acquired=mtime,
                             heartbeat=mtime)

    def _load(self) -> tuple[str, float] | None:
        """(text, modification time) of the lock file; None if there is none."""
        try:
            return self.path.read_text(), self.path.stat().st_mtime
        except FileNotFoundError:
            return None

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
        self._prepare()
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
                    f"run {self.name} is locked by a live driver ({current.describe(self.clock())}); "
                    f"lock file {self.where}. Wait for that job to end or stop it (`unimo jobs stop JOB`); a "
                    f"lock whose driver died frees itself after {self.stale_after:.0f}s without heartbeat.")
            if self._take_over(current, mine, reason):
                self.owner = mine
                return self
        raise RunLocked(f"run {self.name}: could not take the lock {self.where} (contended); retry")

    def _prepare(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)

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
            log.warning("took over the stale lock of run %s (%s; was %s)", self.name, reason,
                        stale.describe(self.clock()))
            return True
        finally:
            marker.unlink(missing_ok=True)

    def _write(self, owner: LockOwner) -> bool:
        """Rewrites the lock we hold (False: it is no longer ours)."""
        tmp = self.path.with_name(f"{LOCK_FILE}.{owner.token}.tmp")
        tmp.write_text(json.dumps(asdict(owner)))
        os.replace(tmp, self.path)
        return True

    def _remove(self) -> None:
        self.path.unlink(missing_ok=True)

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
        if not self._write(self.owner):
            self.lost.set()
            return False
        return True

    def start_heartbeat(self, on_lost: Callable[[], None] | None = None) -> "RunLock":
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    ok = self.refresh()
                except Exception as err:  # noqa: BLE001 - a storage hiccup (OSError, botocore's errors): keep
                    # trying; staleness needs many missed beats
                    log.warning("run lock heartbeat failed: %s", err)
                    continue
                if not ok:
                    log.error("lost the lock of run %s to another driver; this driver must stop", self.name)
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
            self._remove()
        self.owner = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class S3RunLock(RunLock):
    """The run lock as the object ``<run url>/run.lock``, changed only by conditional writes.

    Every write names what it expects to find (no object, or the ETag last read), so a heartbeat never
    overwrites a lock another driver has just taken over, and of two drivers taking over one stale lock only
    one wins.
    """

    def __init__(self, run_dir: str | Path, **kwargs):
        super().__init__(run_dir, **kwargs)  # run_dir and path are unused here: every access is overridden
        from urllib.parse import urlparse

        url = urlparse(str(run_dir))
        self.bucket, self.key = url.netloc, join(url.path.strip("/"), LOCK_FILE).lstrip("/")
        self.where = f"s3://{self.bucket}/{self.key}"
        self._client = s3_client()
        self._etag: str | None = None  # of the lock object as last read

    def _prepare(self) -> None:
        pass  # S3 has no folders to create

    def _load(self) -> tuple[str, float] | None:
        try:
            got = self._client.get_object(Bucket=self.bucket, Key=self.key)
        except self._client.exceptions.NoSuchKey:
            self._etag = None
            return None
        self._etag = got["ETag"]
        return got["Body"].read().decode(), got["LastModified"].timestamp()

    def _put(self, owner: LockOwner, **condition) -> bool:
        """One conditional PUT; False when S3 says the condition no longer holds (someone else wrote)."""
        from botocore.exceptions import ClientError

        try:
            put = self._client.put_object(Bucket=self.bucket, Key=self.key,
                                          Body=json.dumps(asdict(owner)).encode(),
                                          ContentType="application/json", **condition)
        except ClientError as err:
            # 412: the condition failed; 409: a concurrent conditional write to the same key won the race.
            if err.response.get("Error", {}).get("Code") in ("PreconditionFailed",
                                                             "ConditionalRequestConflict"):
                return False
            raise
        self._etag = put["ETag"]
        return True

    def _create(self, owner: LockOwner) -> bool:
        return self._put(owner, IfNoneMatch="*")

    def _take_over(self, stale: LockOwner, mine: LockOwner, reason: str) -> bool:
        again = self.read()  # also records the ETag that the conditional write below expects
        if again is None or again.token != stale.token or not self._put(mine, IfMatch=self._etag):
            return False
        log.warning("took over the stale lock of run %s (%s; was %s)", self.name, reason,
                    stale.describe(self.clock()))
        return True

    def _write(self, owner: LockOwner) -> bool:
        return self._etag is not None and self._put(owner, IfMatch=self._etag)

    def _remove(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self._client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self._etag)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code")
            if code in ("NotImplemented", "InvalidArgument", "InvalidRequest"):
                # A server without conditional deletes: release() has just read the lock as ours.
                self._client.delete_object(Bucket=self.bucket, Key=self.key)
            elif code != "PreconditionFailed":  # 412: no longer ours, nothing to do
                log.warning("could not remove the run lock %s: %s", self.where, err)
