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
from trainer.preemption import EXIT_PREEMPTED
from trainer.config import RunConfig
from trainer.config_loader import to_dict
from trainer.checkpointing.stop import STOP_FILE

log = logging.getLogger(__name__)

LOOPBACK_ENV = {
    # Keeps an embedded single-machine Ray on 127.0.0.1 (Ray otherwise picks the external interface);
    # never set for a real multi-machine cluster.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray Train's controller polls its workers every 2 s, so a finished or failed worker group is noticed up
    # to 2 s late: each job's end and each restart waited ~1-2 s for nothing. On one machine (a few workers)
    # a poll every 0.5 s costs nothing measurable; on a real cluster Ray's default stays.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Ray Train's preemption watcher (an actor per worker group) follows a cloud node's drain notice; one
    # machine has none to follow (checkpoint.preemption_notice is unimo's own, per worker).
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
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
            raise ValueError(f"run.storage={cfg.run.storage}: use a local or shared folder or "
                             "s3://bucket/prefix")
        return storage.join(cfg.run.storage, cfg.run.name)
    return (Path(cfg.run.storage) / cfg.run.name).resolve()


# Every worker process of the job runs trainer.preemption.install at start: a SIGTERM to a training worker
# then checkpoints and stops the run instead of killing the worker. (A job-level field: Ray ignores the hook
# in an actor's own runtime_env; merged with a Jobs API submission's runtime_env.)
JOB_RUNTIME_ENV = {"worker_process_setup_hook": preemption.SETUP_HOOK}


# The embedded Ray's settings: no Python workers started ahead for the driver (Ray starts as many as the
# machine's CPUs, for tasks a unimo driver never runs; a prestarted worker stood idle through every job, ~1
# CPU-second each, while the actors started their own: docs/BENCHMARKS.md).
EMBEDDED_RAY_SETTINGS = {"prestart_worker_first_driver": False}


def init_ray(cfg: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if cfg.scaling.address:
        try:
            ray.init(address=cfg.scaling.address, log_to_driver=True, runtime_env=JOB_RUNTIME_ENV)
        except Exception as err:  # noqa: BLE001
            from trainer.redaction import redact, secret_values

            # Ray's text may echo the address or a token: no secret in an error message (docs/RELIABILITY.md)
            raise RuntimeError(redact(f"cannot reach the Ray cluster at {cfg.scaling.address} ({err}); check "
                                      "the address, that the head is running, and RAY_AUTH_TOKEN for token "
                                      "auth", secret_values(dict(os.environ)))) from None
        return
    for key, value in LOOPBACK_ENV.items():
        os.environ.setdefault(key, value)
    need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    # No dashboard unless asked for (scaling.dashboard): ten processes and ~2 CPU-seconds a job start, for
    # pages nobody opens on a one-machine run (MLflow is where a run is watched). address="local": a new
    # embedded instance even where RAY_ADDRESS is set or `ray start` ran on this machine (ray.init() would
    # join that cluster, and then refuse num_cpus); joining one is scaling.address's job.
    from orchestrator.ray_startup import with_startup_retry

    with_startup_retry(
        lambda: ray.init(address="local", num_cpus=max(need, os.cpu_count() or 1),
                         include_dashboard=cfg.scaling.dashboard, dashboard_host="127.0.0.1",
                         _node_ip_address="127.0.0.1",
                         _system_config={**EMBEDDED_RAY_SETTINGS,
                                         "worker_niceness": cfg.scaling.worker_niceness},
                         runtime_env={**JOB_RUNTIME_ENV, "env_vars": worker_env(cfg)}, log_to_driver=True),
        "the embedded Ray", cleanup=ray.shutdown)


def worker_env(cfg: RunConfig) -> dict[str, str]:
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION",
                                      "AWS_REGION", "AWS_PROFILE", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK",
                                      # the last two: fault tests
                                      "UNIMO_FAULT_GATE", "UNIMO_FAULT_GATE_TIMEOUT_S")
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


def fit(cfg: RunConfig, preflight: bool = True) -> TrainOutcome:
    """Runs the job to completion (resuming the run of the same name if it exists), holding the run lock.

    ``preflight``: run every check of orchestrator/preflight.py first (seconds), so a mistake in the inputs
    is reported before Ray or a worker starts; False only for tests that need a mistake to reach a worker.
    """
    from orchestrator.runlock import RunLock
    from trainer.config import adopt_remote_tokenizer_ids

    cfg = adopt_remote_tokenizer_ids(cfg)  # a local tokenizer's ids were taken when the config was loaded
    if preflight:
        run_preflight_quietly(cfg)
    else:
        cfg.check_ready_to_train()
    cfg = with_absolute_paths(cfg)
    run_dir = run_dir_of(cfg)
    storage.check_writable(str(run_dir))  # endpoint, credentials, bucket: named errors before anything starts
    # Taken before MLflow or Ray are touched: a refused second driver changes nothing (docs/RELIABILITY.md).
    # Losing the lock to another driver interrupts this one like Ctrl-C: Ray Train then aborts the run.
    lock = RunLock(run_dir).acquire().start_heartbeat(on_lost=_thread.interrupt_main)
    try:
        return _fit_locked(cfg, run_dir, lock.lost)
    finally:
        lock.release()


def run_preflight_quietly(cfg: RunConfig) -> None:
    """The pre-flight before a run: one line when it passes (plus its warnings); PreflightError otherwise."""
    from orchestrator.preflight import run_preflight

    started = time.monotonic()
    report = run_preflight(cfg)
    for check in report.warnings:
        print(f"[unimo] pre-flight warning: {check.name}: {check.detail}", file=sys.stderr, flush=True)
    print(f"[unimo] pre-flight: {len(report.checks)} checks passed in {time.monotonic() - started:.1f} s "
          "(`unimo check` prints them)", flush=True)


# How long a stop (the first SIGTERM) may take to reach a step boundary and save before the run is ended
# without a new checkpoint: below `unimo jobs stop`'s grace (300 s), so the driver ends itself with a message
# rather than being killed. A worker stuck in a storage retry loop or a hung step never reaches a boundary.
STOP_GRACE_ENV = "UNIMO_STOP_GRACE_S"
DEFAULT_STOP_GRACE_S = 240.0


def stop_grace_s() -> float:
    return float(os.environ.get(STOP_GRACE_ENV, DEFAULT_STOP_GRACE_S))


class StopTimedOut(RuntimeError):
    """A requested stop did not reach a step boundary in time: the run ended without a new checkpoint."""


class _StopState:
    """What the SIGTERM handler did: when a stop was asked for, and whether its grace ran out."""

    def __init__(self) -> None:
        self.requested_at: float | None = None
        self.timed_out = False
        self.timer: threading.Timer | None = None

    def expire(self) -> None:
        self.timed_out = True
        print(f"[unimo] the workers did not reach a step boundary within {stop_grace_s():.0f} s of the stop "
              f"request ({STOP_GRACE_ENV}); ending the run without a new checkpoint",
              file=sys.stderr, flush=True)
        # As a Ctrl-C: Ray Train's handler aborts the controller and its workers (no new worker group).
        _thread.interrupt_main()


@contextlib.contextmanager
def sigterm_as_exit(run_dir: Path | str, state: _StopState | None = None):
    """The first SIGTERM (preemption, a pod's termination) asks the workers to checkpoint at the next step and
    end cleanly (the STOP file the loop polls, in the run's folder or S3 prefix); if they do not within
    stop_grace_s(), or at a second SIGTERM, the run unwinds like an exception, so the run lock is released and
    the MLflow run closed instead of the process vanishing mid-way. No worker group starts after the first
    (the failure policy sees the STOP file)."""
    stop_file = storage.join(run_dir, STOP_FILE)
    storage.delete(stop_file)  # a stale request from an earlier job must not stop this one
    state = state or _StopState()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def _exit(signum, frame):
        if state.requested_at is None:
            state.requested_at = time.monotonic()
            storage.write_text(stop_file, f"SIGTERM at {time.time():.0f}\n")
            state.timer = threading.Timer(stop_grace_s(), state.expire)
            state.timer.daemon = True
            state.timer.start()
            print(f"[unimo] SIGTERM: the workers save a checkpoint at the next step and stop (within "
                  f"{stop_grace_s():.0f} s, else the run ends without one); send it again to abort without "
                  "saving", file=sys.stderr, flush=True)
            return
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    # Ray Train's fit() installs a SIGINT handler that aborts its controller and leaves it there: in a process
    # that goes on (a notebook, a test, a second job) a later Ctrl-C would call a controller that is gone.
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int in (signal.SIG_IGN, signal.SIG_DFL, None):
        # A driver started in the background by a non-interactive shell (`unimo train ... &`, a nohup'd
        # script) inherits SIGINT ignored, and Python then drops interrupt_main(): the end of the grace would
        # not end the run while nothing else had installed a handler (found when a test run started that way
        # spun forever after its grace). Python's own handler makes the interrupt arrive.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous_int is None else previous_int)
        if state.timer is not None:
            state.timer.cancel()


def scaling_config_of(cfg: RunConfig):
    """Ray Train's ScalingConfig; scaling.min_workers > 0 makes the worker group elastic
    (min..num_workers)."""
    import ray.train

    s = cfg.scaling
    workers = (s.min_workers, s.num_workers) if 0 < s.min_workers < s.num_workers else s.num_workers
    # use_gpu adds one GPU per worker: one DeepSpeed rank per GPU.
    return ray.train.ScalingConfig(num_workers=workers, use_gpu=s.use_gpu,
                                   resources_per_worker={"CPU": s.cpus_per_worker},
                                   placement_strategy=s.placement_strategy)


def failure_config_of(cfg: RunConfig):
    """Ray Train's FailureConfig: scaling.max_failures for worker-group failures (user errors are never
    retried, see orchestrator/failure_policy.py), and a worker group that cannot be placed (Ray retries its
    start every RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s, without end by default) given up after the
    cluster wait."""
    import math

    import ray.train
    from ray.train.v2._internal.constants import (DEFAULT_WORKER_GROUP_START_TIMEOUT_S,
                                                  WORKER_GROUP_START_TIMEOUT_S_ENV_VAR)

    from orchestrator.preflight import cluster_wait_s

    start_s = float(os.environ.get(WORKER_GROUP_START_TIMEOUT_S_ENV_VAR,
                                   DEFAULT_WORKER_GROUP_START_TIMEOUT_S))
    return ray.train.FailureConfig(max_failures=cfg.scaling.max_failures,
                                   controller_failure_limit=max(1, math.ceil(cluster_wait_s() / start_s)))


def error_log_path(run_dir: Path | str, run_name: str) -> Path:
    """Where a failed run's full error goes: the run's folder, or this machine's cache for s3:// storage."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "unimo" / run_name \
        if storage.is_remote(run_dir) else Path(run_dir)
    return base / "logs" / f"error-{time.strftime('%Y%m%d-%H%M%S')}.log"


def write_error_log(run_dir: Path | str, run_name: str, err: BaseException, detail: str = "") -> Path | None:
    """The full error (every worker's traceback; ``detail``: where a worker raised it) in a file; the console
    gets one paragraph naming it."""
    import traceback

    from trainer.redaction import redact, secret_values

    path = error_log_path(run_dir, run_name)
    text = ("".join(traceback.format_exception(err))
            + (f"\n--- where it was raised ---\n{detail}" if detail else ""))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(redact(text, secret_values(dict(os.environ))))
    except OSError as log_err:
        log.warning("could not write the error log %s: %s", path, log_err)
        return None
    return path


def failed_run_error(err: BaseException, run_dir: Path | str, cfg: RunConfig) -> Exception:
    """One short paragraph for a failed fit: a user error's own message, or the first line of each distinct
    worker failure; both name the log file holding the tracebacks."""
    from data_pipeline.errors import UserError
    from orchestrator.failure_policy import user_error_of

    user = user_error_of(err)
    path = write_error_log(run_dir, cfg.run.name, err, getattr(user, "detail", "") or "")
    where = f" (full traceback: {path})" if path else ""
    if user is not None:
        return UserError(f"{str(user).strip()}{where}")
    failures = getattr(err, "worker_failures", None) or {}
    controller = getattr(err, "controller_failure", None)
    if not failures and "WorkerGroupStartup" in type(controller).__name__:
        from orchestrator.preflight import CLUSTER_WAIT_ENV, cluster_wait_s

        s = cfg.scaling
        return RuntimeError(f"scaling: the worker group ({s.min_workers or s.num_workers} x "
                            f"{s.cpus_per_worker} CPU{' + 1 GPU' if s.use_gpu else ''}) could not be started "
                            f"within {CLUSTER_WAIT_ENV}={cluster_wait_s():.0f} s: the cluster lacks the "
                            f"resources ({_last_line(controller)}); add nodes or lower scaling.num_workers / "
                            f"cpus_per_worker{where}")
    causes = failures.values() if failures else [controller or err]
    firsts = sorted({_last_line(e) for e in causes})
    return RuntimeError(f"training failed (the worker group was retried up to scaling.max_failures="
                        f"{cfg.scaling.max_failures} times in a row without a new checkpoint"
                        f"{_total_cap(cfg)}): {'; '.join(firsts)}{where}")


def _total_cap(cfg: RunConfig) -> str:
    n = cfg.scaling.max_total_failures
    return f", at most scaling.max_total_failures={n} in all" if n else ""


def _last_line(err: BaseException) -> str:
    """The line of a traceback text that says what happened (its last), or the exception's name."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__)[:300]


def _fit_locked(cfg: RunConfig, run_dir: Path | str, lost: threading.Event | None = None) -> TrainOutcome:
    import ray.train
    from ray.train.v2.api.exceptions import TrainingFailedError

    from orchestrator.failure_policy import GuardedTorchTrainer
    from orchestrator.process_group import BoundStoreTorchConfig
    from orchestrator.preflight import check_cluster, check_shared_sqlite
    from orchestrator.tracking_setup import default_tracking_uri
    from trainer.checkpointing.records import reconcile_run
    from trainer.ray_worker import train_func

    job_start = time.time()  # goodput's zero: the attempts' ledgers from here on are this job's
    if not storage.is_remote(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = default_tracking_uri(cfg, run_dir)
    run_id = _run_and_ray(cfg, tracking_uri, run_dir)
    check_shared_sqlite(tracking_uri)  # before any worker writes to it
    shortage = check_cluster(cfg)  # an error for the embedded Ray; a warning with a wait limit on a cluster
    if shortage:
        print(f"[unimo] {shortage}", file=sys.stderr, flush=True)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # propagated by Ray Train to its controller
    payload = {"run_config": to_dict(cfg), "mlflow_run_id": run_id, "tracking_uri": tracking_uri,
               "control_dir": str(run_dir)}
    # Checkpoints go to <run>/checkpoints/step_XXXXXXXX through Ray Train's pyarrow filesystem (S3 or local).
    storage_path, storage_fs = storage.ray_storage(str(run_dir), cfg.checkpoint.upload_attempts)
    reconcile_run(str(run_dir), "start")  # Ray refuses a run whose snapshot names a folder that is gone
    stop_file = storage.join(run_dir, STOP_FILE)
    trainer = GuardedTorchTrainer(
        train_func,
        stop_file=stop_file,
        checkpoints_root=storage.join(run_dir, "checkpoints"),
        max_total_failures=cfg.scaling.max_total_failures,
        embedded=not cfg.scaling.address,
        train_loop_config=payload,
        scaling_config=scaling_config_of(cfg),
        torch_config=BoundStoreTorchConfig(),  # the rendezvous listens on the node's address only
        run_config=ray.train.RunConfig(
            name="checkpoints", storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=failure_config_of(cfg),
            # Ray keeps every folder: the rank-0 CheckpointManager alone decides what is kept and deletes the
            # rest (two owners deleted each other's folders: a step saved again after a torn one shares its
            # path).
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
            worker_runtime_env={"env_vars": worker_env(cfg)},
        ),
    )
    ok = stopped = False
    stop = _StopState()
    try:
        # Installed after ray.init, which sets its own (aborting) SIGTERM handler in this process.
        with sigterm_as_exit(run_dir, stop):
            try:
                result = trainer.fit()
            except TrainingFailedError as err:
                if not stopped_as_asked(err, _stop_requested(stop, stop_file)):
                    raise failed_run_error(err, run_dir, cfg) from None
                result = None  # the run stops as asked, resumable from its newest checkpoint
            except (KeyboardInterrupt, SystemExit, Exception):
                if stop.timed_out:
                    raise StopTimedOut(_stop_timed_out_message(run_dir)) from None
                raise
        if result is None:
            stopped = True
        else:
            ok = result.error is None
            if result.error is not None:
                raise failed_run_error(result.error, run_dir, cfg)
            # a SIGTERM to the driver (the STOP file) or to a worker (its flag rode the step's all-reduce)
            stopped = bool((result.metrics or {}).get("stopped_early")) or _stop_requested(stop, stop_file)
    finally:
        served = stop_file if stop.requested_at is not None and not ok else None
        run_id = _close_job(cfg, run_dir, job_start, tracking_uri, run_id, ok=ok, stopped=stopped,
                            served_stop=served, lost=lost)
    _clear_stop_file(stop_file)
    if result is None:
        return stopped_outcome(run_dir, tracking_uri, run_id)
    checkpoint = storage.url_of_ray_path(result.checkpoint.path, result.checkpoint.filesystem) \
        if result.checkpoint else None
    return TrainOutcome(run_dir=run_dir, checkpoint=checkpoint,
                        tracking_uri=tracking_uri, mlflow_run_id=run_id, metrics=dict(result.metrics or {}),
                        stopped_early=stopped)


def stopped_as_asked(err: BaseException, stop_requested: bool) -> bool:
    """Whether a worker group that failed ends the run as stopped rather than failed: a stop was asked for
    (the failure policy then starts no new group) and the failure is no user error. A spot reclaim or a
    drain often kills the workers outside the step loop, in a restore or a save, where they cannot stop at a
    step boundary: the run is as resumable as after a clean stop, and a failed run (exit 1) made `unimo
    submit --max-resubmits` give it up."""
    from orchestrator.failure_policy import user_error_of

    return stop_requested and user_error_of(err) is None


def _stop_requested(stop: _StopState, stop_file: str) -> bool:
    if stop.requested_at is not None:
        return True
    try:
        return storage.exists(stop_file)
    except OSError:  # storage unreachable: as if no stop was asked for
        return False


def _close_job(cfg: RunConfig, run_dir: Path | str, job_start: float, tracking_uri: str,
               run_id: str | None, *, ok: bool, stopped: bool, served_stop: str | None,
               lost: threading.Event | None) -> str | None:
    """The end of a job, however it ended: Ray's run snapshot reconciled with the folders (pruned or moved
    aside during the job), the goodput reported, the MLflow run closed (its id, found if created late), a
    served stop request cleared. Not by a driver that lost the run's lock: another driver took the run over
    (it found this one's lock stale) and its records are that driver's now; closing them here rewrote Ray's
    snapshot and marked the MLflow run failed under it."""
    from orchestrator.tracking_setup import finish_run
    from trainer.checkpointing.records import reconcile_run

    if lost is not None and lost.is_set():
        log.warning("this driver lost the run's lock to another driver: it leaves the run's records "
                    "(Ray's run snapshot, the MLflow run, the stop request) to that driver")
        return run_id
    reconcile_run(str(run_dir), "end")
    goodput_metrics, last_step = report_goodput(run_dir, job_start)
    run_id = finish_run(tracking_uri, run_id, ok, cfg=cfg, run_dir=run_dir, preempted=stopped,
                        metrics=goodput_metrics, step=last_step)
    if served_stop is not None:
        _clear_stop_file(served_stop)  # it must not stop the next job of this run
    return run_id


def _clear_stop_file(stop_file: str) -> None:
    """Deletes a served stop request. The job's outcome is decided: a storage blip here must not turn a
    finished or stopped run into a failed one (the next job clears a stale request at its start anyway)."""
    try:
        storage.delete(stop_file)
    except OSError as err:
        log.warning("could not delete the stop request %s (%s): the next job of this run deletes it at its "
                    "start", stop_file, err)


def stopped_outcome(run_dir: Path | str, tracking_uri: str, run_id: str | None) -> TrainOutcome:
    """The outcome of a run stopped by a failure after the stop request: it resumes from its newest complete
    checkpoint, whose step the summary names."""
    from trainer import checkpoint as ckpt

    try:
        newest = ckpt.newest_complete(storage.join(run_dir, "checkpoints"))
    except OSError:
        newest = None
    print(f"[unimo] a worker failed after the stop request: the run stops as asked; the same command resumes "
          f"it from its newest checkpoint{f' (step {newest.step})' if newest else ''}", flush=True)
    return TrainOutcome(run_dir=run_dir, checkpoint=str(newest.path) if newest else None,
                        tracking_uri=tracking_uri, mlflow_run_id=run_id or "",
                        metrics={"step": newest.step if newest else 0}, stopped_early=True)


def report_goodput(run_dir: Path | str, job_start: float) -> tuple[dict[str, float], int]:
    """The job's goodput (trainer/goodput.py), printed; returns its MLflow metrics and the last step trained
    ({} when no attempt left a ledger), which finish_run logs with the run's one client. A report only: no
    failure here changes the job's outcome."""
    from trainer import goodput

    try:
        ledgers = goodput.read_ledgers(str(run_dir), job_start)
        summary = goodput.summarize(ledgers, job_start, time.time())
    except OSError as err:
        log.warning("goodput: could not read the attempts' ledgers (%s)", err)
        return {}, 0
    if not summary:
        return {}, 0
    print(f"[unimo] {goodput.describe(summary)}", flush=True)
    return goodput.as_metrics(summary), ledgers[-1].step


def _run_and_ray(cfg: RunConfig, tracking_uri: str, run_dir: Path | str) -> str | None:
    """The job's MLflow run and Ray, side by side: they are independent and each takes seconds (MLflow's
    import, a new SQLite store's schema, server round trips; Ray's processes). Measured on 2 cores: 3.2 s and
    3.7 s one after the other. Ray starts in this (the main) thread, where it installs its signal handlers. A
    tracking error is reported first: it is the one the user can act on (a Ray that started ends with this
    process, as after any failed job)."""
    from concurrent.futures import ThreadPoolExecutor

    from orchestrator.tracking_setup import ensure_run

    with ThreadPoolExecutor(1, thread_name_prefix="unimo-mlflow-run") as pool:
        pending = pool.submit(ensure_run, cfg, tracking_uri, run_dir)
        try:
            init_ray(cfg)
        except BaseException:
            pending.result()  # raises the tracking error, if any, instead of Ray's
            raise
        return pending.result()


def _stop_timed_out_message(run_dir: Path | str) -> str:
    from trainer import checkpoint as ckpt

    try:
        found = ckpt.newest_complete(storage.join(run_dir, "checkpoints"))
    except OSError:
        found = None
    resume = (f"resumes from {found.path} (step {found.step})" if found
              else "starts from scratch (no checkpoint yet)")
    return (f"stopped on request WITHOUT a new checkpoint: the workers did not reach a step boundary within "
            f"{stop_grace_s():.0f} s (stuck retrying storage, or a hung step; set {STOP_GRACE_ENV} to wait "
            f"longer). Running the same command {resume}.")


def tracking_hint(tracking_uri: str, page: str = "") -> list[str]:
    """Where to look at the run: a tracking server is its own UI; a local store needs `mlflow ui`. ``page``:
    the run's page within the UI (``run_page``)."""
    from orchestrator.tracking_setup import shown_uri

    shown = shown_uri(tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        return [f"MLflow UI         : {shown.rstrip('/')}{page}"]
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    return [f"open the MLflow UI: {mlflow_bin} ui --backend-store-uri {shown} --host 127.0.0.1 "
            "--port 5000",
            f"                   then browse http://127.0.0.1:5000{page}"]


# MLflow 3's UI opens in its GenAI view unless the link asks for the model-training one (a browser then keeps
# the choice); the experiment's kind tag does not decide it (checked in headless Chromium, MLflow 3.17).
TRAINING_VIEW = "?workflowType=machine_learning"


def run_page(tracking_uri: str, run_id: str | None) -> str:
    """``/#/experiments/<id>/runs/<run>`` in the model-training view, or "" when the run cannot be looked
    up."""
    if not run_id:
        return ""
    try:
        from orchestrator.tracking_setup import check_reachable, open_client

        check_reachable(tracking_uri)  # seconds, not the client's minutes of retries
        experiment = open_client(tracking_uri).get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - only a convenience link: the summary names the run id anyway
        return ""
    return f"/#/experiments/{experiment}/runs/{run_id}{TRAINING_VIEW}"


def exit_code(out: TrainOutcome) -> int:
    return EXIT_PREEMPTED if out.stopped_early else 0


def held_out_line(metrics: dict) -> str:
    """The last evaluation's R@1 both ways against chance ("" when the run did not evaluate at its end)."""
    if "eval/t2i_R@1" not in metrics:
        return ""
    n = int(metrics.get("eval/candidates", 0))
    chance = f" (chance {1 / n:.3f})" if n > 0 else ""
    return (f"text->image R@1 {metrics['eval/t2i_R@1']:.3f} among {n} images{chance}, image->text R@1 "
            f"{metrics.get('eval/i2t_R@1', float('nan')):.3f}")


def print_summary(out: TrainOutcome) -> None:
    losses = {k: round(v, 4) for k, v in out.metrics.items() if str(k).startswith("loss/")}
    if out.stopped_early:
        step = int(out.metrics.get("step", 0))
        print(f"\n=== unimo: run preempted (stopped on request) at step {step} after saving a checkpoint; "
              f"exit status {EXIT_PREEMPTED}. To resume, run the same command again (same run.name): it "
              "continues from that checkpoint ===")
    else:
        print("\n=== unimo: run finished ===")
    print(f"final losses      : {losses}")
    held_out = held_out_line(out.metrics)
    if held_out:
        print(f"held-out          : {held_out}")
    print(f"checkpoint        : {out.checkpoint}")
    print(f"MLflow run id     : {out.mlflow_run_id}")
    for line in tracking_hint(out.tracking_uri, run_page(out.tracking_uri, out.mlflow_run_id)):
        print(line)
