"""The driver's side of MLflow: is the server reachable, the job's one run found or created before the workers
start (with trainer/run_identity.py, which rank 0 also uses when the server was down at submission), spooled
metrics replayed, the run closed at the end. Its id lives in the run's storage so restarts reuse it."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from data_pipeline.errors import UserError
from trainer import storage
from trainer.config import RunConfig
from trainer.metric_logger import SPOOL_DIR, MetricLogger, has_spooled
from trainer.redaction import redact, secret_values
from trainer.run_identity import (RUN_ID_FILE, create_run, find_run, git_commit, log_config_artifacts,
                                  write_run_id)
from trainer.tracking import machine_spool_dir

log = logging.getLogger(__name__)

__all__ = ["default_tracking_uri", "ensure_run", "finish_run", "replay_spool", "check_reachable",
           "split_credentials", "TrackingAuthError"]


def default_tracking_uri(cfg: RunConfig, run_dir: Path | str | None) -> str:
    """tracking.uri, else a SQLite file beside the run folder (in the working folder for s3:// storage)."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    base = Path(run_dir).parent if run_dir is not None and not storage.is_remote(run_dir) else Path.cwd()
    return f"sqlite:///{(base / 'mlflow.db').resolve()}"


def spool_dir(run_dir: Path | str) -> Path:
    """Where metrics wait during an MLflow outage: in the run folder, or on this machine for s3:// storage
    (the same folder rank 0 uses when it runs here; trainer.tracking.spool_root)."""
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


def split_credentials(tracking_uri: str, environ: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """(the URI without user-info, the HTTP headers that authenticate like MLflow's client does).

    MLflow's client reads MLFLOW_TRACKING_USERNAME/PASSWORD (basic auth) or MLFLOW_TRACKING_TOKEN (bearer),
    and requests turns ``http://user:password@host`` into basic auth; urllib does neither (it took
    ``user:password@host`` for a host name: "Name or service not known").
    """
    env = os.environ if environ is None else environ
    parts = urllib.parse.urlsplit(tracking_uri)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    bare = urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    user, password = env.get("MLFLOW_TRACKING_USERNAME"), env.get("MLFLOW_TRACKING_PASSWORD")
    if not (user and password) and parts.username:
        user, password = urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or "")
    headers = {}
    if user:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password or ''}".encode()).decode()
    elif env.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = "Bearer " + env["MLFLOW_TRACKING_TOKEN"]
    return bare, headers


def tracking_secrets(tracking_uri: str) -> list[str]:
    """Every secret a tracking message could echo: the environment's, and the URI's password."""
    parts = urllib.parse.urlsplit(tracking_uri)
    extra = [p for p in (parts.password, urllib.parse.unquote(parts.password or "")) if p]
    return secret_values(dict(os.environ)) + extra


def shown_uri(tracking_uri: str) -> str:
    """The URI as printed or logged: a server's user:password@, or a database store's
    (postgresql://user:password@host/db), replaced by ***."""
    return redact(tracking_uri, tracking_secrets(tracking_uri))


class TrackingAuthError(UserError):
    """The tracking server answered but refused the credentials (or their absence)."""


def check_reachable(tracking_uri: str, timeout: float = 5.0, experiment: str = "unimo") -> None:
    """Raises OSError when an http(s) tracking server does not answer at all, TrackingAuthError when it
    refuses the credentials (HTTP 401/403 on an authenticated API call). Any other answer counts as reachable.

    MLflow's client retries a refused connection for ~4 minutes before failing; this probe fails in seconds.
    Credentials come from the URI's user-info, MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return
    bare, headers = split_credentials(tracking_uri)
    base = bare.rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(base + "/health", headers=headers),
                               timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # it answered (a proxy or an auth layer may refuse /health)
    query = urllib.parse.urlencode({"experiment_name": experiment})
    try:
        urllib.request.urlopen(
            urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/get-by-name?{query}", headers=headers),
            timeout=timeout).close()
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            how = "were refused" if headers else "are missing"
            raise TrackingAuthError(
                f"tracking.uri={redact(tracking_uri, tracking_secrets(tracking_uri))}: the MLflow server "
                f"answered HTTP {err.code}: its credentials {how}. Set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment, or put "
                "user:password@ in tracking.uri for a local run.") from None


def _unreachable_message(tracking_uri: str, err: Exception) -> str:
    secrets = tracking_secrets(tracking_uri)
    shown = redact(tracking_uri, secrets)
    return (f"MLflow tracking at {shown} is not reachable or refused the request "
            f"({type(err).__name__}: {redact(str(err), secrets)[:200]}). Start it (`unimo mlflow`), set "
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
    client.set_tag(run_id, STATE_TAG, "running")
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
        check_reachable(tracking_uri, experiment=cfg.tracking.experiment)
        client = open_client(tracking_uri)
        run_id = recorded_run_id(run_dir) or find_run(client, cfg, str(run_dir))
        if run_id is not None:
            _resume_run(client, cfg, run_id, secrets, id_file)
        else:
            run_id = create_run(client, cfg, str(run_dir), secrets, commit=git_commit())
    except (RunGone, TrackingAuthError):
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


# The job's end as the run's ``unimo.state`` tag (MLflow's own statuses have no "preempted"): running,
# finished, failed, or preempted (stopped by a SIGTERM after a checkpoint; status KILLED, to be resubmitted).
STATE_TAG = "unimo.state"


def finish_run(tracking_uri: str, run_id: str | None, ok: bool, cfg: RunConfig | None = None,
               run_dir: Path | str | None = None, preempted: bool = False,
               metrics: dict[str, float] | None = None, step: int = 0) -> str | None:
    """Marks the run finished, failed or preempted, after logging ``metrics`` (the job's goodput) at
    ``step``; returns its id (found in the run folder when it was created late)."""
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
        if ok and not preempted and cfg is not None and cfg.tracking.log_model and run_dir is not None:
            try:
                log_exported_model(client, run_id, run_dir)
            except Exception as err:  # noqa: BLE001 - the run still gets closed; the CLI export remains
                log.warning("tracking.log_model: the export failed (%s); `unimo export` it by hand", err)
        if metrics:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])
        state = "preempted" if preempted else "finished" if ok else "failed"
        client.set_tag(run_id, STATE_TAG, state)
        client.set_terminated(run_id, status={"preempted": "KILLED", "finished": "FINISHED"}.get(state,
                                                                                                "FAILED"))
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
        model_id = register_logged_model(client, run_id, out, found.step)
    client.set_tag(run_id, "unimo.exported_step", str(found.step))
    log.info("exported step %d into the MLflow run's artifacts model/ and as logged model %s",
             found.step, model_id)


def register_logged_model(client, run_id: str, export_dir: Path, step: int) -> str:
    """The export as an MLflow logged model of the run (MLflow 3: listed on the run's page and the
    experiment's Models tab, with its own artifacts), an output of the run at ``step``; returns the model
    id."""
    from mlflow.entities import LoggedModelOutput

    run = client.get_run(run_id)
    tags = {k: v for k, v in run.data.tags.items() if k in ("unimo.flavor", "unimo.run_name")}
    model = client.create_logged_model(run.info.experiment_id, name=run.info.run_name or "unimo",
                                       source_run_id=run_id, model_type="unimo",
                                       tags={**tags, "unimo.step": str(step)})
    try:
        client.log_model_artifacts(model.model_id, str(export_dir))
    except Exception:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    client.set_tag(run_id, "unimo.logged_model_id", model.model_id)
    return model.model_id
