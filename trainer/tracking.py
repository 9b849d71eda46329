"""MLflow tracking from inside the job: what each rank logs, and where.

Rank 0 logs the run's metrics, tags and artifacts through a buffered MetricLogger (trainer/metric_logger.py);
the first rank of every node samples its machine (trainer/system_metrics.py). The run they log to is found or
created by trainer/run_identity.py; what must never be logged is trainer/redaction.py's job.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

from trainer.metric_logger import SPOOL_DIR, MetricLogger, is_training_metric
from trainer.run_identity import run_resolver

log = logging.getLogger(__name__)


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


def logged_through(tracking_uri: str, run_id: str | None) -> int:
    """The highest step the run already has a metric at (-1: none, or MLflow did not answer in seconds).

    A restart resumes from its last checkpoint and trains the steps after it again (to the same values):
    their metrics are in the run already and would appear twice in each chart's history. One ``get_run``:
    MLflow keeps each metric's latest (highest-step) value with the run. Only rank 0's training metrics count:
    the machines' samples (``system/``, from every node's sampler) and the driver's ``goodput/`` summary ride
    on steps that rank 0's own metrics may not have reached MLflow at (a rank 0 killed with metrics still
    queued); counting them skipped those steps for good.
    """
    if not run_id:
        return -1
    try:
        from mlflow.tracking import MlflowClient

        # one try within MLFLOW_HTTP_REQUEST_TIMEOUT: start_tracking sets no retries for this process
        metrics = getattr(MlflowClient(tracking_uri).get_run(run_id).data, "_metric_objs", [])  # MLflow 3
        return max((m.step for m in metrics if is_training_metric(m.key)), default=-1)
    except Exception as err:  # noqa: BLE001 - without it a re-run step may be logged twice, nothing worse
        log.warning("could not read the steps already logged to MLflow run %s (%s); steps trained again "
                    "after this restart may appear twice", run_id, err)
        return -1


class RunTracker:
    """One rank's tracking: rank 0 logs metrics, tags and artifacts; each node's first rank samples it.

    ``skip_through``: steps up to this one are already in the run (trained again after a restart): not
    logged again."""

    def __init__(self, metrics: MetricLogger | None = None, sampler: Any = None,
                 node_logger: MetricLogger | None = None, skip_through: int = -1):
        self.metrics = metrics
        self._sampler = sampler
        self._node_logger = node_logger
        self.skip_through = skip_through

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.metrics is not None and step > self.skip_through:
            self.metrics.log(metrics, step)

    def checkpoint_saved(self, root: Path, step: int) -> None:
        """Rank 0, before the checkpoint just written is uploaded: the metrics of its steps go to the spool on
        disk (a kill from here on, before they reach MLflow, must not lose steps the restart will not train
        again), and its manifest is queued as an artifact under ``checkpoints/step_XXXXXXXX``."""
        from trainer.checkpoint import MANIFEST, step_dir_name

        if self.metrics is None:
            return
        self.metrics.persist()
        if (Path(root) / MANIFEST).is_file():
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
    skip_through = -1
    if rank == 0:
        skip_through = logged_through(tracking_uri, run_id)
        metrics = MetricLogger(tracking_uri, run_id, t.flush_seconds, spool_dir=spool_root(cfg) / "metrics",
                               resolve_run=None if run_id else run_resolver(cfg, tracking_uri, create=True))
        # steps still in the spool (a kill after a checkpoint's metrics were persisted) are in the run too
        skip_through = max(skip_through, metrics.adopted_through)
        metrics.set_tags({"unimo.world_size": world_size, "unimo.nodes": nodes,
                          "unimo.resumed_from_step": step_fn()})
        metrics.call(_count_attempt, "attempt count")
    if rank == node_ranks[0] and t.system_metrics_seconds > 0:
        sink = metrics
        if sink is None:
            node_logger = sink = MetricLogger(
                tracking_uri, run_id, t.flush_seconds, spool_dir=spool_root(cfg) / f"system-{host}",
                resolve_run=None if run_id else run_resolver(cfg, tracking_uri, create=False))
        run_dir = local_run_dir(cfg)
        gpus = [peers[r]["gpu"] for r in node_ranks if peers[r]["gpu"]]
        sampler = SystemSampler(host, sink.log, step_fn, t.system_metrics_seconds, gpus,
                                disk_path=str(run_dir.parent) if run_dir and run_dir.parent.exists() else "/")
        sampler.start()
    return RunTracker(metrics, sampler, node_logger, skip_through)

