"""The job's one MLflow run: its experiment, its creation (tags, params, config artifacts), and its id file.

The id lives in the run's storage (``<run>/mlflow_run.json``), so every restart and resubmission of the run
logs to the same MLflow run. The driver finds or creates the run before the workers start
(orchestrator/tracking_setup.py ``ensure_run``); when MLflow was unreachable then, rank 0 does it here once
the server answers (``run_resolver``).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, Callable

from trainer.redaction import redact, safe_config, safe_params, secret_values

RUN_ID_FILE = "mlflow_run.json"


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


# MLflow 3's UI opens an experiment in the view this tag names; without it, it may infer the GenAI (traces)
# view. "custom_model_development" is its model-training view (runs, metrics, artifacts).
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
            "unimo.world_size": str(cfg.scaling.num_workers), "unimo.restarts": "0", "unimo.state": "running",
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



def run_resolver(cfg: Any, tracking_uri: str, create: bool) -> Callable[[Any], str | None]:
    """For a job started while MLflow was unreachable: finds (rank 0: creates) the run once it answers."""
    from trainer.tracking import local_run_dir

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
