"""MLflow tracking from inside the job: the buffered logger, the run's creation and what each rank logs.

One ``log_metric`` call costs ~50 ms against a server, so the step loop only appends to a queue; a background
thread sends ``log_batch`` every ``flush_seconds``. When the server is unreachable metrics stay queued and are
retried with backoff (capped at ``max_backoff``); past ``max_in_memory`` queued metrics, whole chunks move to
JSONL files in a spool folder, so a long outage costs disk, not memory. Order is kept: chunks leave in the
order they were filled, whether from memory or disk. At shutdown whatever is still undelivered is written to
the spool, and the next logger on that spool (the same rank after a restart, or the driver at the next
submission) sends it first. Delivery is at least once: a batch whose reply was lost may arrive twice; no
metric is dropped.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
RUN_ID_FILE = "mlflow_run.json"
SPOOL_DIR = "mlflow_spool"
UPLOAD_NOTE = "upload.json"  # beside a spooled artifact copy: where in the run it goes
# Config keys never sent to MLflow: credentials must come from the environment, but a user may paste one.
# A key is secret when its last word is one of these (`auth_token`, `secret_access_key`), not when it merely
# contains one (`tokenizer`, `pad_token_id` are ordinary settings).
SECRET_MARKERS = ("secret", "password", "passwd", "token", "access_key", "secret_key", "credential",
                  "credentials", "api_key", "private_key")
_SECRET_KEY = re.compile(r"(^|[_.-])(" + "|".join(SECRET_MARKERS) + r")$", re.IGNORECASE)
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
            size = len(_read_segment(path))
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


# ------------------------------------------------------------------------------------------------ the run

def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key))


def secret_values(environ: dict[str, str]) -> list[str]:
    """Values of environment variables that look like credentials (to scrub them from what is logged)."""
    markers = ("SECRET", "TOKEN", "PASSWORD", "ACCESS_KEY", "CREDENTIAL", "API_KEY", "SESSION")
    return [v for k, v in environ.items() if any(m in k.upper() for m in markers) and len(v) >= 8]


def redact(text: str, secrets: list[str]) -> str:
    """Removes known secret values, URL user-info (``scheme://user:pass@host``) and URL query strings (a presigned
    or token-bearing URL carries its credential there, e.g. ``https://host/shard.tar?X-Amz-Signature=...``)."""
    text = re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", text)
    text = re.sub(r"(\w+://[^\s?'\"]*)\?[^\s'\"\],]+", r"\1?***", text)
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def safe_config(cfg: Any, secrets: list[str]) -> dict:
    """The resolved config tree without keys that name credentials and with secret values redacted."""
    from trainer.config_loader import to_dict

    def clean(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items() if not is_secret_key(str(k))}
        if isinstance(node, list):
            return [clean(v) for v in node]
        return redact(node, secrets) if isinstance(node, str) else node

    return clean(to_dict(cfg))


def safe_params(cfg: Any, secrets: list[str] | None = None) -> dict[str, str]:
    """The flattened resolved config as MLflow params, minus anything secret."""
    from data_pipeline.accounting import weight_params
    from trainer.config_loader import flatten

    secrets = secrets or []
    params = {k: redact(str(v), secrets)[:6000] for k, v in flatten(safe_config(cfg, secrets)).items()}
    return {**params, **(weight_params(cfg.data) if hasattr(cfg, "data") else {})}


def stage_plan(cfg: Any) -> list[dict]:
    """The stages with the global step range each covers (what the loop's ``stage_at`` follows)."""
    plan, start = [], 0
    for s in cfg.stages:
        plan.append({"name": s.name, "first_step": start + 1, "last_step": start + s.steps, "steps": s.steps,
                     "objectives": dict(s.objectives), "sources": sorted(s.sources()),
                     "frozen": list(s.frozen), "lr": s.lr or cfg.optimizer.lr,
                     "warmup_steps": s.warmup_steps})
        start += s.steps
    return plan


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def log_config_artifacts(client: Any, run_id: str, cfg: Any, secrets: list[str],
                         folder: str = "config") -> None:
    client.log_text(run_id, json.dumps(safe_config(cfg, secrets), indent=1), f"{folder}/resolved_config.json")
    client.log_text(run_id, json.dumps(stage_plan(cfg), indent=1), f"{folder}/stage_plan.json")


def find_run(client: Any, cfg: Any, run_dir: str) -> str | None:
    """The active run of this run name and storage folder, if one exists (when the id file is missing)."""
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None or "'" in run_dir or "'" in cfg.run.name:
        return None
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=1,
                              filter_string=f"tags.`unimo.run_name` = '{cfg.run.name}' and "
                                            f"tags.`unimo.run_dir` = '{run_dir}'")
    return runs[0].info.run_id if runs else None


# MLflow 3's UI opens an experiment in the view this tag names; without it, it may infer the GenAI (traces) view.
# "custom_model_development" is its model-training view (runs, metrics, artifacts).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def training_experiment(client: Any, name: str) -> str:
    """The id of experiment ``name``, created if needed, tagged to open in MLflow's model-training view (an
    experiment that already names its kind keeps it)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def create_run(client: Any, cfg: Any, run_dir: str, secrets: list[str], commit: str | None = None) -> str:
    """Creates the job's run with tags, params (the flattened config, no secrets) and config artifacts."""
    from mlflow.entities import Param

    exp_id = training_experiment(client, cfg.tracking.experiment)
    tags = {"unimo.run_name": cfg.run.name, "unimo.run_dir": run_dir, "unimo.flavor": cfg.model.flavor,
            "unimo.world_size": str(cfg.scaling.num_workers), "unimo.restarts": "0",
            "mlflow.source.git.commit": commit or git_commit()}
    run_id = client.create_run(exp_id, run_name=cfg.run.name, tags=tags).info.run_id
    params = [Param(k, v) for k, v in safe_params(cfg, secrets).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])
    log_config_artifacts(client, run_id, cfg, secrets)
    return run_id


def write_run_id(run_dir: Path | str, run_id: str, tracking_uri: str) -> None:
    """<run>/mlflow_run.json, in the run's folder or S3 prefix, replaced whole."""
    from trainer import storage

    storage.write_text(storage.join(run_dir, RUN_ID_FILE),
                       json.dumps({"run_id": run_id, "tracking_uri": redact(tracking_uri, [])}))


# --------------------------------------------------------------------------------- what each rank logs

def local_run_dir(cfg: Any) -> Path | None:
    """The run's storage folder as a worker sees it, when it is an absolute local (or shared) path."""
    storage = cfg.run.storage
    if "://" in storage or not Path(storage).is_absolute():
        return None  # Ray Train workers run in their own working directory: a relative path points elsewhere
    return Path(storage).resolve() / cfg.run.name


def spool_root(cfg: Any) -> Path:
    run_dir = local_run_dir(cfg)
    if run_dir is not None:
        return run_dir / SPOOL_DIR
    return machine_spool_dir(cfg.run.name)


def machine_spool_dir(run_name: str) -> Path:
    """The spool on this machine, for a run whose storage folder a worker cannot write (s3://, relative)."""
    return Path(tempfile.gettempdir()) / "unimo-mlflow-spool" / run_name


def _peers(rank: int, world_size: int, gpu: str | None) -> list[dict]:
    """Host name and GPU of every rank (one small all-gather at start) to find each node's first rank."""
    me = {"host": socket.gethostname(), "gpu": gpu}
    try:
        import torch.distributed as dist

        if world_size > 1 and dist.is_available() and dist.is_initialized():
            out: list = [None] * world_size
            dist.all_gather_object(out, me)
            return out
    except ImportError:
        pass
    return [me if r == rank else {"host": me["host"], "gpu": None} for r in range(world_size)]


def _count_attempt(client: Any, run_id: str) -> None:
    tags = client.get_run(run_id).data.tags
    client.set_tag(run_id, "unimo.attempts", str(int(tags.get("unimo.attempts", "0")) + 1))


class RunTracker:
    """One rank's tracking: rank 0 logs metrics, tags and artifacts; each node's first rank samples it."""

    def __init__(self, metrics: MetricLogger | None = None, sampler: Any = None,
                 node_logger: MetricLogger | None = None):
        self.metrics = metrics
        self._sampler = sampler
        self._node_logger = node_logger

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.metrics is not None:
            self.metrics.log(metrics, step)

    def checkpoint_saved(self, root: Path, step: int) -> None:
        """Logs the manifest of the checkpoint just written (rank 0) under ``checkpoints/step_XXXXXXXX``."""
        from trainer.checkpoint import MANIFEST, step_dir_name

        if self.metrics is not None and (Path(root) / MANIFEST).is_file():
            self.metrics.log_artifact(Path(root) / MANIFEST, f"checkpoints/{step_dir_name(step)}")

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.metrics is not None:
            self.metrics.log_text(text, artifact_file)

    def close(self) -> None:
        if self._sampler is not None:
            self._sampler.stop()
        for logger in (self._node_logger, self.metrics):
            if logger is not None:
                logger.close()


def start_tracking(cfg: Any, rank: int, world_size: int, run_id: str | None, tracking_uri: str,
                   step_fn: Callable[[], int]) -> RunTracker:
    """Starts this rank's part of tracking; every rank must call it (it runs one all-gather)."""
    if not tracking_uri:
        return RunTracker()
    import torch

    from trainer.system_metrics import SystemSampler, gpu_identity

    # The logger retries with its own backoff and buffer; MLflow's client would otherwise retry each call for
    # ~4 minutes inside the thread. Only this worker process is affected, and a user's setting wins.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    gpu = gpu_identity(torch.cuda.current_device(), os.environ.get("CUDA_VISIBLE_DEVICES")) \
        if torch.cuda.is_available() else None
    peers = _peers(rank, world_size, gpu)
    host = peers[rank]["host"]
    node_ranks = [r for r, p in enumerate(peers) if p["host"] == host]
    nodes = len({p["host"] for p in peers})
    t = cfg.tracking
    metrics = node_logger = sampler = None
    if rank == 0:
        metrics = MetricLogger(tracking_uri, run_id, t.flush_seconds, spool_dir=spool_root(cfg) / "metrics",
                               resolve_run=None if run_id else _run_resolver(cfg, tracking_uri, create=True))
        metrics.set_tags({"unimo.world_size": world_size, "unimo.nodes": nodes,
                          "unimo.resumed_from_step": step_fn()})
        metrics.call(_count_attempt, "attempt count")
    if rank == node_ranks[0] and t.system_metrics_seconds > 0:
        sink = metrics
        if sink is None:
            node_logger = sink = MetricLogger(
                tracking_uri, run_id, t.flush_seconds, spool_dir=spool_root(cfg) / f"system-{host}",
                resolve_run=None if run_id else _run_resolver(cfg, tracking_uri, create=False))
        run_dir = local_run_dir(cfg)
        gpus = [peers[r]["gpu"] for r in node_ranks if peers[r]["gpu"]]
        sampler = SystemSampler(host, sink.log, step_fn, t.system_metrics_seconds, gpus,
                                disk_path=str(run_dir.parent) if run_dir and run_dir.parent.exists() else "/")
        sampler.start()
    return RunTracker(metrics, sampler, node_logger)


def _run_resolver(cfg: Any, tracking_uri: str, create: bool) -> Callable[[Any], str | None]:
    """For a job started while MLflow was unreachable: finds (rank 0: creates) the run once it answers."""
    run_dir = local_run_dir(cfg)

    def resolve(client: Any) -> str | None:
        key = str(run_dir) if run_dir else cfg.run.name
        if run_dir is not None and (run_dir / RUN_ID_FILE).is_file():
            return json.loads((run_dir / RUN_ID_FILE).read_text())["run_id"]
        run_id = find_run(client, cfg, key)
        if run_id is None and create:
            run_id = create_run(client, cfg, key, secret_values(dict(os.environ)))
        if run_id is not None and create and run_dir is not None:
            write_run_id(run_dir, run_id, tracking_uri)
        return run_id

    return resolve
