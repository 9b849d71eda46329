"""Finds or creates the job's single MLflow run; its id lives in the run's storage so restarts reuse it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

from trainer.config import RunConfig
from trainer.config_loader import flatten, to_dict

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run.json"
# Config keys never sent to MLflow: credentials must come from the environment, but a user may still paste one.
SECRET_MARKERS = ("secret", "password", "token", "access_key", "credential")


def default_tracking_uri(cfg: RunConfig, run_dir: Path | None) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    base = run_dir.parent if run_dir is not None else Path.cwd()
    return f"sqlite:///{(base / 'mlflow.db').resolve()}"


def safe_params(cfg: RunConfig) -> dict[str, str]:
    params = {}
    for key, value in flatten(to_dict(cfg)).items():
        if any(m in key.lower() for m in SECRET_MARKERS):
            continue
        params[key] = str(value)[:6000]
    return params


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def ensure_run(cfg: RunConfig, tracking_uri: str, run_dir: Path) -> str:
    """Returns the MLflow run id of this job, creating the run (with params and tags) the first time."""
    from mlflow.entities import Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    id_file = run_dir / RUN_ID_FILE
    try:
        if id_file.is_file():
            run_id = json.loads(id_file.read_text())["run_id"]
            run = client.get_run(run_id)
            restarts = int(run.data.tags.get("unimo.restarts", "0")) + 1
            client.set_tag(run_id, "unimo.restarts", str(restarts))
            client.update_run(run_id, status="RUNNING")
            return run_id
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
        tags = {"unimo.run_name": cfg.run.name, "unimo.flavor": cfg.model.flavor,
                "unimo.world_size": str(cfg.scaling.num_workers), "unimo.restarts": "0",
                "mlflow.source.git.commit": git_commit()}
        run = client.create_run(exp_id, run_name=cfg.run.name, tags=tags)
        run_id = run.info.run_id
        params = [Param(k, v) for k, v in safe_params(cfg).items()]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i:i + 100])
        client.log_text(run_id, json.dumps(to_dict(cfg), indent=1), "config/resolved_config.json")
    except Exception as err:  # noqa: BLE001 - every failure here means "the tracking server is not usable"
        raise RuntimeError(f"MLflow tracking at {tracking_uri} is not reachable or refused the request "
                           f"({type(err).__name__}: {str(err)[:200]}). Start it (`unimo mlflow`) or set "
                           "tracking.uri to a reachable server.") from None
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = id_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"run_id": run_id, "tracking_uri": tracking_uri}))
    os.replace(tmp, id_file)
    return run_id


def finish_run(tracking_uri: str, run_id: str, ok: bool) -> None:
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=tracking_uri).set_terminated(run_id, status="FINISHED" if ok else "FAILED")
    except Exception as err:  # noqa: BLE001
        log.warning("could not mark MLflow run %s finished: %s", run_id, err)
