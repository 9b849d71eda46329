"""The Ray Train driver: starts (or joins) Ray, sets up tracking, runs TorchTrainer, prints where to look."""

from __future__ import annotations

import _thread
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from trainer import preemption, storage
from trainer.config import RunConfig
from trainer.config_loader import to_dict
from trainer.loop import STOP_FILE

log = logging.getLogger(__name__)

LOOPBACK_ENV = {
    # Keeps an embedded single-machine Ray on 127.0.0.1 (Ray otherwise picks the external interface);
    # never set for a real multi-machine cluster.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


@dataclass
class TrainOutcome:
    run_dir: Path | str  # a local folder, or the run's s3:// URL
    checkpoint: str | None
    tracking_uri: str
    mlflow_run_id: str
    metrics: dict
    stopped_early: bool = False


def run_dir_of(cfg: RunConfig) -> Path | str:
    """The run's folder (local or shared file system) or its ``s3://bucket/prefix/<name>`` URL."""
    if storage.is_remote(cfg.run.storage):
        if not cfg.run.storage.startswith("s3://"):
            raise ValueError(f"run.storage={cfg.run.storage}: use a local or shared folder or s3://bucket/prefix")
        return storage.join(cfg.run.storage, cfg.run.name)
    return (Path(cfg.run.storage) / cfg.run.name).resolve()


# Every worker process of the job runs trainer.preemption.install at start: a SIGTERM to a training worker then
# checkpoints and stops the run instead of killing the worker. (A job-level field: Ray ignores the hook in an
# actor's own runtime_env; merged with a Jobs API submission's runtime_env.)
JOB_RUNTIME_ENV = {"worker_process_setup_hook": preemption.SETUP_HOOK}


def init_ray(cfg: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if cfg.scaling.address:
        try:
            ray.init(address=cfg.scaling.address, log_to_driver=True, runtime_env=JOB_RUNTIME_ENV)
        except Exception as err:  # noqa: BLE001
            from trainer.tracking import redact, secret_values

            # Ray's text may echo the address or a token: no secret in an error message (docs/RELIABILITY.md)
            raise RuntimeError(redact(f"cannot reach the Ray cluster at {cfg.scaling.address} ({err}); check the "
                                      "address, that the head is running, and RAY_AUTH_TOKEN for token auth",
                                      secret_values(dict(os.environ)))) from None
        return
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner polls every second: without
    # it the cleaner logs a warning each time and could not free the workers' resources if the controller died.
    # address="local": a new embedded instance even where RAY_ADDRESS is set or `ray start` ran on this machine
    # (ray.init() would join that cluster, and then refuse num_cpus); joining one is scaling.address's job.
    from orchestrator.ray_startup import with_startup_retry

    with_startup_retry(
        lambda: ray.init(address="local", num_cpus=max(need, os.cpu_count() or 1), include_dashboard=True,
                         dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
                         runtime_env={**JOB_RUNTIME_ENV, "env_vars": worker_env(cfg)}, log_to_driver=True),
        "the embedded Ray", cleanup=ray.shutdown)


def worker_env(cfg: RunConfig) -> dict[str, str]:
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION",
                                      "AWS_REGION", "AWS_PROFILE", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")
           if k in os.environ}
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    # Ray Train's print patch sends each worker print to both the log and stdout: the console saw it twice.
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    # torch.distributed deprecation chatter from inside DeepSpeed, once per collective, drowns the progress.
    env["PYTHONWARNINGS"] = "ignore::FutureWarning,ignore::UserWarning:torch.distributed.nn.functional"
    return env


def _absolute(path: str) -> str:
    """Local paths made absolute (Ray workers do not run in the driver's folder); URLs and "" unchanged."""
    if not path or "://" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` whose local paths (storage, data, tokenizer, init weights) are absolute."""
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.run.storage = _absolute(cfg.run.storage)
    cfg.data.map_urls(_absolute)  # every modality's urls and its corpora's
    cfg.data.eval_pairs = _absolute(cfg.data.eval_pairs)
    cfg.data.tokenizer = _absolute(cfg.data.tokenizer)
    cfg.model.text_init = _absolute(cfg.model.text_init)
    cfg.model.vision_init = _absolute(cfg.model.vision_init)
    return cfg


def fit(cfg: RunConfig) -> TrainOutcome:
    """Runs the job to completion (resuming the run of the same name if it exists), holding the run lock."""
    from orchestrator.runlock import RunLock

    cfg.check_ready_to_train()
    cfg = with_absolute_paths(cfg)
    run_dir = run_dir_of(cfg)
    storage.check_writable(str(run_dir))  # endpoint, credentials, bucket: named errors before anything starts
    # Taken before MLflow or Ray are touched: a refused second driver changes nothing (docs/RELIABILITY.md).
    # Losing the lock to another driver interrupts this one like Ctrl-C: Ray Train then aborts the run.
    lock = RunLock(run_dir).acquire().start_heartbeat(on_lost=_thread.interrupt_main)
    try:
        return _fit_locked(cfg, run_dir)
    finally:
        lock.release()


@contextlib.contextmanager
def sigterm_as_exit(run_dir: Path | str):
    """The first SIGTERM (preemption, a pod's termination) asks the workers to checkpoint at the next step and
    end cleanly (the STOP file the loop polls, in the run's folder or S3 prefix); a second one unwinds like an
    exception, so the run lock is released and the MLflow run closed instead of the process vanishing mid-way."""
    stop_file = storage.join(run_dir, STOP_FILE)
    storage.delete(stop_file)  # a stale request from an earlier job must not stop this one
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum, frame):
        if not storage.exists(stop_file):
            storage.write_text(stop_file, f"SIGTERM at {time.time():.0f}\n")
            print("[unimo] SIGTERM: the workers save a checkpoint at the next step and stop; send it again to "
                  "abort without saving", file=sys.stderr, flush=True)
            return
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def scaling_config_of(cfg: RunConfig):
    """Ray Train's ScalingConfig; scaling.min_workers > 0 makes the worker group elastic (min..num_workers)."""
    import ray.train

    s = cfg.scaling
    workers = (s.min_workers, s.num_workers) if 0 < s.min_workers < s.num_workers else s.num_workers
    # use_gpu adds one GPU per worker: one DeepSpeed rank per GPU.
    return ray.train.ScalingConfig(num_workers=workers, use_gpu=s.use_gpu,
                                   resources_per_worker={"CPU": s.cpus_per_worker},
                                   placement_strategy=s.placement_strategy)


def _fit_locked(cfg: RunConfig, run_dir: Path | str) -> TrainOutcome:
    import ray.train
    from ray.train.torch import TorchTrainer

    from orchestrator.tracking_setup import default_tracking_uri, ensure_run, finish_run
    from trainer.checkpointing.records import reconcile_run
    from trainer.ray_worker import train_func

    if not storage.is_remote(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = default_tracking_uri(cfg, run_dir)
    run_id = ensure_run(cfg, tracking_uri, run_dir)
    init_ray(cfg)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # propagated by Ray Train to its controller
    payload = {"run_config": to_dict(cfg), "mlflow_run_id": run_id, "tracking_uri": tracking_uri,
               "control_dir": str(run_dir)}
    # Checkpoints go to <run>/checkpoints/step_XXXXXXXX through Ray Train's pyarrow filesystem (S3 or local).
    storage_path, storage_fs = storage.ray_storage(str(run_dir), cfg.checkpoint.upload_attempts)
    reconcile_run(str(run_dir), "start")  # Ray refuses a run whose snapshot names a folder that is gone
    trainer = TorchTrainer(
        train_func,
        train_loop_config=payload,
        scaling_config=scaling_config_of(cfg),
        run_config=ray.train.RunConfig(
            name="checkpoints", storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            # Ray keeps every folder: the rank-0 CheckpointManager alone decides what is kept and deletes the rest
            # (two owners deleted each other's folders: a step saved again after a torn one shares its path).
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
            worker_runtime_env={"env_vars": worker_env(cfg)},
        ),
    )
    ok = False
    try:
        # Installed after ray.init, which sets its own (aborting) SIGTERM handler in this process.
        with sigterm_as_exit(run_dir):
            result = trainer.fit()
        ok = result.error is None
        if result.error is not None:
            raise result.error
    finally:
        reconcile_run(str(run_dir), "end")  # folders pruned or moved aside during the job
        run_id = finish_run(tracking_uri, run_id, ok, cfg=cfg, run_dir=run_dir)  # found if created late
    stop_file = storage.join(run_dir, STOP_FILE)
    stopped = storage.exists(stop_file) or bool((result.metrics or {}).get("stopped_early"))
    storage.delete(stop_file)
    checkpoint = storage.url_of_ray_path(result.checkpoint.path, result.checkpoint.filesystem) \
        if result.checkpoint else None
    return TrainOutcome(run_dir=run_dir, checkpoint=checkpoint,
                        tracking_uri=tracking_uri, mlflow_run_id=run_id, metrics=dict(result.metrics or {}),
                        stopped_early=stopped)


def print_summary(out: TrainOutcome) -> None:
    losses = {k: round(v, 4) for k, v in out.metrics.items() if str(k).startswith("loss/")}
    if out.stopped_early:
        print(f"\n=== unimo: run stopped on request at step {int(out.metrics.get('step', 0))}; run the same "
              "command (same run.name) to resume ===")
    else:
        print("\n=== unimo: run finished ===")
    print(f"final losses      : {losses}")
    print(f"checkpoint        : {out.checkpoint}")
    print(f"MLflow run id     : {out.mlflow_run_id}")
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    print(f"open the MLflow UI: {mlflow_bin} ui --backend-store-uri {out.tracking_uri} --host 127.0.0.1 --port 5000")
    print("                   then browse http://127.0.0.1:5000")
