"""Finds or creates the job's single MLflow run; its id lives in the run's storage so restarts reuse it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from trainer import storage
from trainer.config import RunConfig
from trainer.tracking import (RUN_ID_FILE, SECRET_MARKERS, SPOOL_DIR, MetricLogger, create_run, find_run,
                              git_commit, has_spooled, log_config_artifacts, machine_spool_dir, redact,
                              safe_params, secret_values, write_run_id)

log = logging.getLogger(__name__)

__all__ = ["RUN_ID_FILE", "SECRET_MARKERS", "default_tracking_uri", "ensure_run", "finish_run", "safe_params",
           "git_commit", "replay_spool", "check_reachable"]


def default_tracking_uri(cfg: RunConfig, run_dir: Path | str | None) -> str:
    """tracking.uri, else a SQLite file beside the run folder (in the working folder for s3:// storage)."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    base = Path(run_dir).parent if run_dir is not None and not storage.is_remote(run_dir) else Path.cwd()
    return f"sqlite:///{(base / 'mlflow.db').resolve()}"


def spool_dir(run_dir: Path | str) -> Path:
    """Where metrics wait during an MLflow outage: in the run folder, or on this machine for s3:// storage (the
    same folder rank 0 uses when it runs here; trainer.tracking.spool_root)."""
    if storage.is_remote(run_dir):
        return machine_spool_dir(storage.name_of(run_dir))
    return Path(run_dir) / SPOOL_DIR


def recorded_run_id(run_dir: Path | str) -> str | None:
    """The MLflow run id kept in <run>/mlflow_run.json (a local file or an S3 object), if any."""
    text = storage.read_text(storage.join(run_dir, RUN_ID_FILE))
    return json.loads(text)["run_id"] if text else None


@contextlib.contextmanager
def schema_lock(tracking_uri: str):
    """One process at a time opens a SQLite tracking store for the first time.

    MLflow creates (and migrates) a new SQLite store's tables when a process first opens it; two jobs started
    together into the same storage share <storage>/mlflow.db and raced there ("table _alembic_tmp_experiments
    already exists", the second job refused to start). A lock file beside the database serialises that step.
    """
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    db = Path(tracking_uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def open_client(tracking_uri: str):
    """An MlflowClient whose store is open (a new SQLite store's tables created under schema_lock)."""
    from mlflow.tracking import MlflowClient

    with schema_lock(tracking_uri):
        return MlflowClient(tracking_uri=tracking_uri)  # opening the store creates a new one's tables


def check_reachable(tracking_uri: str, timeout: float = 5.0) -> None:
    """Raises OSError when an http(s) tracking server does not answer at all (any HTTP status is an answer).

    MLflow's client retries a refused connection for ~4 minutes before failing; this probe fails in seconds.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered (a proxy or an auth layer may refuse /health)


def _unreachable_message(tracking_uri: str, err: Exception) -> str:
    shown = redact(tracking_uri, [])
    return (f"MLflow tracking at {shown} is not reachable or refused the request "
            f"({type(err).__name__}: {redact(str(err), [])[:200]}). Start it (`unimo mlflow`), set "
            "tracking.uri to a reachable server, or set tracking.buffer_if_unreachable=true to train on and "
            "log later.")


class RunGone(RuntimeError):
    """The run recorded for this job no longer exists on the server (deleted in the UI)."""


def _resume_run(client, cfg: RunConfig, run_id: str, secrets: list[str], id_file: str) -> None:
    """A resubmission: counts it, sets the run running again, records the config it was resubmitted with."""
    try:
        run = client.get_run(run_id)
    except Exception as err:  # noqa: BLE001
        if getattr(err, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise RunGone(f"MLflow run {run_id} recorded in {id_file} does not exist on the tracking server "
                      f"(deleted?); delete {id_file} to start a new MLflow run for this job") from None
    if run.info.lifecycle_stage == "deleted":
        raise RunGone(f"MLflow run {run_id} recorded in {id_file} was deleted; restore it in the MLflow UI "
                      f"or delete {id_file} to start a new MLflow run for this job")
    restarts = int(run.data.tags.get("unimo.restarts", "0")) + 1
    client.set_tag(run_id, "unimo.restarts", str(restarts))
    client.update_run(run_id, status="RUNNING")
    # Params cannot change once logged: a resubmission's config (e.g. more steps) is kept as artifacts.
    log_config_artifacts(client, run_id, cfg, secrets, folder=f"config/restart_{restarts}")


def ensure_run(cfg: RunConfig, tracking_uri: str, run_dir: Path | str) -> str | None:
    """Returns the MLflow run id of this job, creating the run (params, tags, config) the first time.

    Unreachable server: a RuntimeError naming the URI, or None when tracking.buffer_if_unreachable is set
    (rank 0 then creates or finds the run once the server answers; metrics wait in its buffer meanwhile).
    """
    secrets = secret_values(dict(os.environ))
    id_file = storage.join(run_dir, RUN_ID_FILE)
    try:
        check_reachable(tracking_uri)
        client = open_client(tracking_uri)
        run_id = recorded_run_id(run_dir) or find_run(client, cfg, str(run_dir))
        if run_id is not None:
            _resume_run(client, cfg, run_id, secrets, id_file)
        else:
            run_id = create_run(client, cfg, str(run_dir), secrets, commit=git_commit())
    except RunGone:
        raise
    except Exception as err:  # noqa: BLE001 - every other failure means "the tracking server is not usable"
        message = _unreachable_message(tracking_uri, err)
        if cfg.tracking.buffer_if_unreachable:
            log.warning("%s Training on: metrics wait in memory and %s until it answers.", message,
                        spool_dir(run_dir))
            return None
        raise RuntimeError(message) from None
    write_run_id(run_dir, run_id, tracking_uri)
    replay_spool(tracking_uri, run_id, spool_dir(run_dir))
    return run_id


def replay_spool(tracking_uri: str, run_id: str, spool: Path, timeout: float = 120.0) -> bool:
    """Sends metrics earlier attempts left in ``spool`` (one folder per logger) before new ones are logged."""
    ok = True
    for folder in sorted(p for p in spool.iterdir() if p.is_dir()) if spool.is_dir() else []:
        if not has_spooled(folder):
            continue
        logger = MetricLogger(tracking_uri, run_id, flush_seconds=0.2, spool_dir=folder)
        n, files = logger.pending(), logger.pending_ops()
        done = logger.close(timeout=timeout)
        ok = ok and done
        log.info("MLflow: %s %d spooled metrics and %d artifacts from %s",
                 "replayed" if done else "could not replay", n, files, folder)
    return ok


def finish_run(tracking_uri: str, run_id: str | None, ok: bool, cfg: RunConfig | None = None,
               run_dir: Path | str | None = None) -> str | None:
    """Marks the run finished or failed; returns its id (found in the run folder when it was created late)."""
    try:
        check_reachable(tracking_uri)  # fail in seconds, not after the client's minutes of retries
        if run_id is None and run_dir is not None:
            run_id = recorded_run_id(run_dir)
        client = open_client(tracking_uri)
        if run_id is None and cfg is not None and run_dir is not None:
            run_id = find_run(client, cfg, str(run_dir))
        if run_id is None:
            log.warning("no MLflow run to close: the server was never reachable during this job; metrics "
                        "are kept in %s and go out at the next start of this run",
                        run_dir and spool_dir(run_dir))
            return None
        if run_dir is not None:
            write_run_id(run_dir, run_id, tracking_uri)
            replay_spool(tracking_uri, run_id, spool_dir(run_dir), timeout=30.0)
        if ok and cfg is not None and cfg.tracking.log_model and run_dir is not None:
            try:
                log_exported_model(client, run_id, run_dir)
            except Exception as err:  # noqa: BLE001 - the run still gets closed; the CLI export remains
                log.warning("tracking.log_model: the export failed (%s); `unimo export` it by hand", err)
        client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")
    except Exception as err:  # noqa: BLE001
        log.warning("could not mark MLflow run %s finished: %s", run_id, err)
    return run_id


def log_exported_model(client, run_id: str, run_dir: Path | str) -> None:
    """tracking.log_model: the newest valid checkpoint, exported as `unimo export` does, into model/."""
    from trainer.checkpoint import newest_valid
    from trainer.export import export_checkpoint

    with tempfile.TemporaryDirectory(prefix="unimo-export-") as tmp:
        found = newest_valid(storage.join(run_dir, "checkpoints"), cache_dir=Path(tmp) / "download")
        if found is None:
            log.warning("tracking.log_model: no valid checkpoint under %s to export",
                        storage.join(run_dir, "checkpoints"))
            return
        out = export_checkpoint(found.path, Path(tmp) / "model")
        client.log_artifacts(run_id, str(out), "model")
    client.set_tag(run_id, "unimo.exported_step", str(found.step))
    log.info("exported step %d into the MLflow run's artifacts model/", found.step)
