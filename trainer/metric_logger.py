"""The buffered MLflow metric logger: a queue the step loop appends to, a background sender, a disk spool.

One ``log_metric`` call costs ~50 ms against a server, so the step loop only appends to a queue; a background
thread sends ``log_batch`` every ``flush_seconds``. When the server is unreachable metrics stay queued and are
retried with backoff (capped at ``max_backoff``); past ``max_in_memory`` queued metrics, whole chunks move to
JSONL files in a spool folder, so a long outage costs disk, not memory. Order is kept: chunks leave in the
order they were filled, whether from memory or disk. At shutdown whatever is still undelivered is written to
the spool, and the next logger on that spool (the same rank after a restart, or the driver at the next
submission) sends it first. Delivery is at least once: a batch whose reply was lost may arrive twice; no
metric is dropped.

Which rank logs what is trainer/tracking.py; which MLflow run they log to is trainer/run_identity.py.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

# Metrics logged at a training step by others than rank 0's step loop: every node's machine samples and the
# driver's goodput summary. They do not say which training steps reached MLflow.
NOT_TRAINING_METRICS = ("system/", "goodput/")


def is_training_metric(key: str) -> bool:
    return not key.startswith(NOT_TRAINING_METRICS)


MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
SPOOL_DIR = "mlflow_spool"
UPLOAD_NOTE = "upload.json"  # beside a spooled artifact copy: where in the run it goes
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")
_SEGMENT_SEQ = itertools.count()


# ------------------------------------------------------------------------------------------- metric names

def metric_key(name: str) -> str:
    """A name MLflow accepts: ``@`` becomes ``_at_`` (``eval/i2t_R@1`` -> ``eval/i2t_R_at_1``), any other
    character MLflow refuses becomes ``_``. The server rejects a whole batch for one bad name, which would
    stall every metric queued behind it, so names are made valid when queued."""
    key = _BAD_KEY_CHARS.sub("_", name.replace("@", "_at_")).strip("/")
    key = re.sub(r"/+", "/", key)
    if not key or len(key) > 250:
        raise ValueError(f"metric name {name!r} cannot be logged to MLflow (empty or longer than 250 chars)")
    return key


# --------------------------------------------------------------------------------------------- the spool

@dataclass
class _Chunk:
    """Consecutive queued metrics, in memory (``records``) or spilled to a JSONL file (``path``)."""

    records: list | None
    name: str  # sorts like the queue: a spool replays in file-name order
    path: Path | None = None
    size: int = 0
    sent: int = 0  # records already delivered from the start of the chunk
    closed: bool = False  # no more appends

    def remaining(self) -> int:
        return self.size - self.sent


def _write_segment(folder: Path, name: str, records: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"seg-{name}.jsonl"
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)  # a segment is whole or absent
    return path


def _read_segment(path: Path) -> list:
    records = []
    with open(path) as f:
        for line in f:
            try:
                key, value, ts, step = json.loads(line)
                records.append((str(key), float(value), int(ts), int(step)))
            except (ValueError, TypeError):
                log.warning("skipping an unreadable line in MLflow spool %s", path)
    return records


def _sent_marker(path: Path) -> Path:
    return path.with_name(path.name + ".sent")


def _read_sent(path: Path) -> int:
    try:
        return int(_sent_marker(path).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _retire(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)
        _sent_marker(path).unlink(missing_ok=True)


def spooled_segments(folder: Path) -> list[Path]:
    return sorted(folder.glob("seg-*.jsonl")) if folder.is_dir() else []


def has_spooled(folder: Path) -> bool:
    """Whether a logger left undelivered metrics or artifact uploads in ``folder``."""
    return bool(spooled_segments(folder)) or any((folder / "artifacts").glob(f"*/{UPLOAD_NOTE}"))


# ------------------------------------------------------------------------------------------- the logger

def _is_request_error(err: Exception) -> bool:
    """True when the server understood the request and refused its content (retrying cannot help)."""
    return getattr(err, "error_code", "") in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")


class MetricLogger:
    """Buffered, asynchronous logging of metrics, tags and artifacts to one MLflow run (see the module doc).

    ``run_id`` may be None with a ``resolve_run(client) -> run id | None`` that finds or creates the run once
    the server answers (``tracking.buffer_if_unreachable``); until then everything waits in the buffer.
    """

    def __init__(self, tracking_uri: str, run_id: str | None, flush_seconds: float = 2.0, client: Any = None,
                 *, spool_dir: str | Path | None = None, max_in_memory: int = 100_000,
                 max_backoff: float = 30.0, resolve_run: Callable[[Any], str | None] | None = None):
        if client is None:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=tracking_uri)
        self._client = client
        self._run_id = run_id
        self._resolve = resolve_run
        self._flush_seconds = flush_seconds
        self._max_backoff = max(max_backoff, flush_seconds)
        self._chunk_size = max(1, max_in_memory // 4)  # memory holds at most ~4 chunks beyond the one sending
        self._max_in_memory = max_in_memory
        self._spool = Path(spool_dir) if spool_dir else None
        self._chunks: deque[_Chunk] = deque()
        self._ops: deque[tuple[Callable[[Any, str], None], str]] = deque()
        self._keys: dict[str, str] = {}
        self._last_name = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._closed = False
        self._queued = 0  # metrics not yet delivered, in memory and on disk
        self._in_memory = 0
        self.delivered = 0
        self.failures = 0
        self.rejected = 0
        self.spilled = 0
        # the highest training step among undelivered metrics an earlier logger left in the spool (-1: none):
        # a restart that trains those steps again must not log them a second time
        self.adopted_through = -1
        self._adopt_spool()
        self._thread = threading.Thread(target=self._run, name="mlflow-logger", daemon=True)
        self._thread.start()

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def spool_dir(self) -> Path:
        if self._spool is None:  # only created when first needed
            self._spool = Path(tempfile.mkdtemp(prefix="unimo-mlflow-spool-"))
        return self._spool

    # ----- producer side (the step loop; never touches the network) ---------------------------------------
    def log(self, metrics: dict[str, float], step: int) -> None:
        """Queues the metrics of one step."""
        ts = int(time.time() * 1000)
        records = [(self._key(k), float(v), ts, int(step)) for k, v in metrics.items()]
        with self._lock:
            tail = self._chunks[-1] if self._chunks else None
            if tail is None or tail.closed or tail.records is None:
                tail = _Chunk(records=[], name=self._new_name())
                self._chunks.append(tail)
            tail.records.extend(records)
            tail.size += len(records)
            self._queued += len(records)
            self._in_memory += len(records)
            if tail.size >= self._chunk_size:
                tail.closed = True
            if self._in_memory > self._max_in_memory:
                self._spill_locked(keep_first=True)

    def _new_name(self) -> str:
        """Chunk names increase even if this host's clock is behind the one that wrote an adopted spool."""
        self._last_name = max(time.time_ns(), self._last_name + 1)
        return f"{self._last_name:020d}"

    def _key(self, name: str) -> str:
        key = self._keys.get(name)
        if key is None:
            key = self._keys[name] = metric_key(name)
        return key

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        self.call(lambda client, run_id: client.log_batch(run_id, tags=batch), f"tags {sorted(tags)}")

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Queues a file upload; the file is copied first, so the caller may delete it right away."""
        src = Path(local_path)
        keep = self._artifact_folder()
        self._queue_upload(Path(shutil.copy2(src, keep / src.name)), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Queues a small text artifact (e.g. sample captions) at ``artifact_file`` inside the run."""
        path = self._artifact_folder() / Path(artifact_file).name
        path.write_text(text)
        parent = str(Path(artifact_file).parent)
        self._queue_upload(path, None if parent == "." else parent)

    def _artifact_folder(self) -> Path:
        folder = self.spool_dir / "artifacts" / f"{time.time_ns()}-{next(_SEGMENT_SEQ)}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _queue_upload(self, path: Path, artifact_path: str | None) -> None:
        # The note lets a later logger on this spool upload it if this process ends first.
        note = {"file": path.name, "artifact_path": artifact_path}
        (path.parent / UPLOAD_NOTE).write_text(json.dumps(note))

        def upload(client: Any, run_id: str) -> None:
            client.log_artifact(run_id, str(path), artifact_path)
            shutil.rmtree(path.parent, ignore_errors=True)

        self.call(upload, f"artifact {artifact_path or '.'}/{path.name}")

    def call(self, fn: Callable[[Any, str], None], what: str) -> None:
        """Queues ``fn(client, run_id)``, retried like a batch until it succeeds (tags, artifacts, ...)."""
        with self._lock:
            self._ops.append((fn, what))

    def pending(self) -> int:
        """Metrics queued and not yet delivered (memory and spool)."""
        with self._lock:
            return self._queued

    def pending_ops(self) -> int:
        with self._lock:
            return len(self._ops)

    # ----- spilling ---------------------------------------------------------------------------------------
    def _spill_locked(self, keep_first: bool) -> None:
        """Moves in-memory chunks to disk, oldest first; the chunk being sent stays unless shutting down."""
        for i, chunk in enumerate(self._chunks):
            if chunk.records is None or (keep_first and i == 0) or (keep_first and not chunk.closed):
                continue
            self._in_memory -= len(chunk.records)
            if chunk.path is None:  # a chunk loaded from a segment keeps it (and its .sent marker)
                rest = chunk.records[chunk.sent:]
                if rest:
                    chunk.path = _write_segment(self.spool_dir, chunk.name, rest)
                    self.spilled += len(rest)
                chunk.size, chunk.sent = len(rest), 0
            chunk.records, chunk.closed = None, True
            if self._in_memory <= self._max_in_memory // 2 and keep_first:
                return

    def _adopt_spool(self) -> None:
        """Queues segments a previous logger left in this spool (a crash, or an outage at shutdown)."""
        if self._spool is None:
            return
        for path in spooled_segments(self._spool):
            records = _read_segment(path)
            size = len(records)
            # the training steps these metrics belong to (the machine's samples ride on the same steps)
            self.adopted_through = max([self.adopted_through] + [
                r[3] for r in records[_read_sent(path):] if is_training_metric(r[0])])
            name = path.stem[len("seg-"):]
            chunk = _Chunk(records=None, name=name, path=path, size=size, sent=min(_read_sent(path), size),
                           closed=True)
            if name.isdigit():
                self._last_name = max(self._last_name, int(name))
            self._chunks.append(chunk)
            self._queued += chunk.remaining()
        for note in sorted((self._spool / "artifacts").glob(f"*/{UPLOAD_NOTE}")):
            try:
                meta = json.loads(note.read_text())
                self._queue_upload(note.parent / meta["file"], meta["artifact_path"])
            except (OSError, ValueError, KeyError):
                log.warning("skipping an unreadable artifact note %s", note)
        if self._chunks or self._ops:
            log.info("MLflow: %d metrics and %d artifacts left in %s by an earlier attempt go out first",
                     self._queued, len(self._ops), self._spool)

    # ----- consumer side (the background thread) ------------------------------------------------------------
    def _next_batch(self) -> tuple[_Chunk | None, list]:
        with self._lock:
            while self._chunks and not self._closed:
                chunk = self._chunks[0]
                if chunk.remaining() > 0:
                    break
                if not chunk.closed:
                    return None, []
                self._chunks.popleft()
                _retire(chunk.path)
            else:
                return None, []
            if chunk.records is None:  # a spilled chunk: load it for sending (at most one chunk in memory)
                chunk.records = _read_segment(chunk.path)
                chunk.size = len(chunk.records)
                self._in_memory += chunk.size
            return chunk, chunk.records[chunk.sent:chunk.sent + MAX_BATCH]

    def _ack(self, chunk: _Chunk, n: int) -> None:
        with self._lock:
            if self._closed:  # shutdown already spooled this batch: it may arrive twice, never zero times
                return
            chunk.sent += n
            self._queued -= n
            self.delivered += n
            if chunk.path is not None:
                _sent_marker(chunk.path).write_text(str(chunk.sent))
            if chunk.remaining() == 0:
                if chunk.closed:
                    self._in_memory -= len(chunk.records or [])
                    self._chunks.popleft()
                    _retire(chunk.path)
                else:  # the open tail chunk is fully sent: empty it in place
                    self._in_memory -= chunk.size
                    chunk.records, chunk.size, chunk.sent = [], 0, 0

    def _send(self, batch: list) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(key=k, value=v, timestamp=ts, step=s) for k, v, ts, s in batch]
        try:
            self._client.log_batch(self._run_id, metrics=metrics, synchronous=True)
        except TypeError:  # a client without the synchronous argument
            self._client.log_batch(self._run_id, metrics=metrics)

    def _send_one_by_one(self, batch: list) -> None:
        """A batch the server refused: send each metric alone; only the ones it refuses again are dropped."""
        for rec in batch:
            try:
                self._send([rec])
            except Exception as err:  # noqa: BLE001
                if not _is_request_error(err):
                    raise
                self.rejected += 1
                log.error("MLflow refused metric %s=%s at step %s: %s", rec[0], rec[1], rec[3], err)

    def _send_metrics(self) -> None:
        while True:
            chunk, batch = self._next_batch()
            if not batch:
                return
            try:
                self._send(batch)
            except Exception as err:  # noqa: BLE001
                if not _is_request_error(err):
                    raise
                self._send_one_by_one(batch)
            self._ack(chunk, len(batch))

    def _run_ops(self) -> None:
        while True:
            with self._lock:
                if not self._ops or self._closed:
                    return
                fn, what = self._ops[0]
            try:
                fn(self._client, self._run_id)
            except Exception as err:  # noqa: BLE001
                if not _is_request_error(err):
                    raise
                log.error("MLflow refused %s: %s", what, err)
            with self._lock:
                if self._ops and self._ops[0][0] is fn:
                    self._ops.popleft()

    def _deliver(self) -> bool:
        """Sends what is queued; False when the server is unreachable (or the run not found yet)."""
        try:
            if self._run_id is None:
                if self._resolve is None:
                    return False
                self._run_id = self._resolve(self._client)
                if self._run_id is None:
                    return False
                log.info("MLflow reachable again: logging to run %s", self._run_id)
            self._send_metrics()  # first: a failing artifact upload must not hold the metrics back
            self._run_ops()
            return True
        except Exception as err:  # noqa: BLE001 - any transport error means "keep and retry"
            self.failures += 1
            if self.failures == 1 or self.failures % 10 == 0:
                log.warning("MLflow unreachable (%s: %s); %d metrics buffered, will retry",
                            type(err).__name__, str(err)[:200], self.pending())
            return False

    def _run(self) -> None:
        delay = self._flush_seconds
        while not self._stop:
            self._wake.wait(timeout=delay)
            self._wake.clear()
            if self._stop:
                return
            ok = self._deliver()
            delay = self._flush_seconds if ok else min(delay * 2, self._max_backoff)

    def persist(self) -> int:
        """Moves every metric still queued in memory to the spool on disk; returns how many it wrote.

        Called before a checkpoint is committed: a SIGKILL after it (which skips ``close``) would otherwise
        lose the metrics of the checkpoint's last steps, and the restart, which resumes after them, would
        never log them again. The sender goes on from the spool in the same order; a batch in flight at the
        call counts against its segment's ``.sent`` marker, so nothing is sent twice by this move.
        """
        with self._lock:
            if self._closed:
                return 0
            before = self.spilled
            self._spill_locked(keep_first=False)
            return self.spilled - before

    # ----- shutdown ---------------------------------------------------------------------------------------
    def flush(self, timeout: float = 30.0) -> bool:
        """Delivers everything queued; returns whether it all went within ``timeout``."""
        deadline = time.monotonic() + timeout
        last_wake = 0.0
        while (self.pending() or self.pending_ops()) and time.monotonic() < deadline:
            if time.monotonic() - last_wake > 0.5:  # retry promptly, but not in a tight loop while it is down
                self._wake.set()
                last_wake = time.monotonic()
            time.sleep(0.02)
        return not (self.pending() or self.pending_ops())

    def close(self, timeout: float = 30.0) -> bool:
        """Flushes; what cannot be delivered within ``timeout`` is left in the spool for the next logger."""
        ok = self.flush(timeout)
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)
        with self._lock:
            self._closed = True
            if not ok:
                self._spill_locked(keep_first=False)
            lost_ops = [what for _, what in self._ops]
        if self._queued:
            log.error("MLflow: %d metrics not delivered before shutdown are kept in %s and will be sent by "
                      "the next start of this run", self._queued, self._spool)
        if lost_ops:
            log.error("MLflow: not applied before shutdown: %s", ", ".join(lost_ops))
        return ok

